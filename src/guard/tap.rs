//! [`Tapped`]: the one wrapper every layer puts around a streamed answer.

use super::{Guard, StreamEnd};
use futures_core::Stream;
use pin_project::pin_project;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What a [`Tap`] wants after an item passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Flow {
    /// Let the stream go on.
    Continue,
    /// End the stream after this item: the next poll yields what
    /// [`Tap::then`] gives (if anything), then the end.
    End,
}

/// Something that watches a streamed answer through [`Tapped`]: sees every
/// item (a `Stream`'s `Ok` item, or an `http_body::Frame`) and every error, may
/// end the stream after an item or while the inner one is waiting (a deadline,
/// a drain), and is told once how the stream ended.
///
/// `D` is the item type (for a body, `http_body::Frame<B::Data>` from the
/// `http-body` crate), `E` the inner error type. Every [`Guard`] is a tap that
/// only waits for the end and keeps the error type (a blanket impl: a type
/// that is a `Guard` cannot also implement `Tap` itself).
///
/// The end a tap is told: [`StreamEnd::Completed`] when the inner stream
/// ends, or a body's last frame says `is_end_stream()`, or the tap ends it
/// (after [`Flow::End`] or a cut from [`poll_waiting`](Self::poll_waiting))
/// with nothing or an `Ok` item appended; [`StreamEnd::Failed`] when an error
/// is yielded (the inner one, or an `Err` the tap appended);
/// [`StreamEnd::Dropped`] when it is dropped before any of those.
///
/// ```
/// use futures::{stream, StreamExt};
/// use semaforo::guard::{Flow, StreamEnd, Tap, Tapped};
///
/// /// Ends a stream after its third item.
/// struct FirstThree(usize);
/// impl<D, E> Tap<D, E> for FirstThree {
///     type Error = E;
///     fn item(&mut self, _item: &D) -> Flow {
///         self.0 += 1;
///         if self.0 == 3 { Flow::End } else { Flow::Continue }
///     }
///     fn error(&mut self, error: E) -> E { error }
///     fn end(self, end: StreamEnd) { assert_eq!(end, StreamEnd::Completed) }
/// }
///
/// # futures::executor::block_on(async {
/// let numbers = stream::iter((1..=10).map(Ok::<_, std::io::Error>));
/// let got: Vec<_> = Tapped::new(numbers, FirstThree(0)).map(Result::unwrap).collect().await;
/// assert_eq!(got, [1, 2, 3]);
/// # });
/// ```
pub trait Tap<D, E>: Sized {
    /// The error the tapped stream yields.
    type Error;

    /// An item passed (it is yielded as it is).
    #[inline]
    fn item(&mut self, _item: &D) -> Flow {
        Flow::Continue
    }

    /// The inner stream failed with `error`: what the tapped stream yields
    /// instead (then it ends, [`StreamEnd::Failed`]).
    fn error(&mut self, error: E) -> Self::Error;

    /// Asked while the inner stream is waiting: `Ready(x)` cuts the stream now,
    /// yielding `x` if it is `Some`, then the end. Register `cx` before
    /// returning `Pending`, as any `poll` method.
    #[inline]
    fn poll_waiting(&mut self, _cx: &mut Context<'_>) -> Poll<Option<Result<D, Self::Error>>> {
        Poll::Pending
    }

    /// After [`Flow::End`]: the item to yield before the end, if any.
    #[inline]
    fn then(&mut self) -> Option<Result<D, Self::Error>> {
        None
    }

    /// Called exactly once, when the stream ends, fails or is dropped.
    #[inline]
    fn end(self, _end: StreamEnd) {}
}

impl<G: Guard, D, E> Tap<D, E> for G {
    type Error = E;

    #[inline]
    fn error(&mut self, error: E) -> E {
        error
    }

    #[inline]
    fn end(self, end: StreamEnd) {
        self.finish(end);
    }
}

/// A body or stream watched by a [`Tap`] until it ends, fails or is dropped;
/// the tap is told which, exactly once.
///
/// - A `Stream` of `Result<T, E>` with a `Tap<T, E>`: yields `Result<T, Tap::Error>`.
/// - An `http_body::Body` with a `Tap<Frame<B::Data>, B::Error>` (feature
///   `http`): a body with the same data and the tap's error type. A body ends
///   at its last frame when `is_end_stream()` says so (hyper stops polling
///   there), and a body empty from the start ends when it is wrapped.
///
/// After the end it is fused: it yields `None` and never polls the inner one
/// again. Cancel safety: dropping it before the end tells the tap
/// [`StreamEnd::Dropped`]. It is `Unpin` when the inner stream is.
#[pin_project]
pub struct Tapped<S, T> {
    /// Declared first, so dropped first: a tap told "dropped" (a permit
    /// given back, an in-flight count let go) finds the inner stream gone
    /// already — a drain that sees the count fall sees nothing of it left.
    #[pin]
    inner: S,
    /// The tap, told [`StreamEnd::Dropped`] when dropped before the end.
    tap: Slot<T>,
    /// The tap asked to end after the item just yielded.
    ending: bool,
}

/// The tap of a [`Tapped`] (`None` once told the end); dropped with it still
/// there, it tells it [`StreamEnd::Dropped`] — after the inner stream, a
/// field declared before it, was dropped.
struct Slot<T> {
    tap: Option<T>,
    /// Tells the tap it was dropped: `Drop` cannot name the item and error
    /// types `Tap::end` is reached through, so the constructor (which can)
    /// leaves this here.
    dropped: fn(T),
}

impl<T> Drop for Slot<T> {
    fn drop(&mut self) {
        if let Some(t) = self.tap.take() {
            (self.dropped)(t);
        }
    }
}

impl<S, T> Tapped<S, T> {
    /// Wraps a `Stream` of `Result`s.
    pub fn new<D, E>(inner: S, tap: T) -> Self
    where
        S: Stream<Item = Result<D, E>>,
        T: Tap<D, E>,
    {
        Tapped::with(inner, tap, |t| Tap::<D, E>::end(t, StreamEnd::Dropped))
    }

    fn with(inner: S, tap: T, dropped: fn(T)) -> Self {
        Tapped {
            inner,
            tap: Slot {
                tap: Some(tap),
                dropped,
            },
            ending: false,
        }
    }

    /// Wraps an `http_body::Body`; a body that is already at its end (hyper
    /// will never poll it) ends at once, [`StreamEnd::Completed`].
    #[cfg(feature = "http")]
    pub fn body(inner: S, tap: T) -> Self
    where
        S: http_body::Body,
        T: Tap<http_body::Frame<S::Data>, S::Error>,
    {
        let ended = inner.is_end_stream();
        let mut t = Tapped::with(inner, tap, |t| {
            Tap::<http_body::Frame<S::Data>, S::Error>::end(t, StreamEnd::Dropped)
        });
        if ended {
            end(&mut t.tap.tap, StreamEnd::Completed);
        }
        t
    }

    /// The wrapped body or stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The tap, until it was told the end.
    pub fn tap(&self) -> Option<&T> {
        self.tap.tap.as_ref()
    }

    /// `true` once the tap was told the end.
    pub fn is_finished(&self) -> bool {
        self.tap.tap.is_none()
    }
}

#[inline]
fn end<T: Tap<D, E>, D, E>(tap: &mut Option<T>, how: StreamEnd) {
    if let Some(t) = tap.take() {
        t.end(how);
    }
}

/// Tells the tap the end that `out` is, if it is one.
#[inline]
fn settle<T: Tap<D, E>, D, E, Err>(tap: &mut Option<T>, out: &Option<Result<D, Err>>) {
    match out {
        None => end(tap, StreamEnd::Completed),
        Some(Err(_)) => end(tap, StreamEnd::Failed),
        Some(Ok(_)) => {}
    }
}

/// One step of a tapped stream or body, the same for both: `poll` polls the inner one.
#[inline]
fn step<S, T, D, E>(
    mut inner: Pin<&mut S>,
    tap: &mut Option<T>,
    ending: &mut bool,
    cx: &mut Context<'_>,
    poll: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<Option<Result<D, E>>>,
    ended_at: impl FnOnce(&S) -> bool,
) -> Poll<Option<Result<D, T::Error>>>
where
    T: Tap<D, E>,
{
    let Some(t) = tap.as_mut() else {
        return Poll::Ready(None);
    };
    if *ending {
        let out = t.then();
        // What the tap appended is the last item: the stream ends with it.
        match &out {
            Some(Err(_)) => end(tap, StreamEnd::Failed),
            _ => end(tap, StreamEnd::Completed),
        }
        return Poll::Ready(out);
    }
    let out = match poll(inner.as_mut(), cx) {
        Poll::Ready(Some(Ok(item))) => {
            if t.item(&item) == Flow::End {
                *ending = true;
            } else if ended_at(&inner) {
                end(tap, StreamEnd::Completed);
            }
            return Poll::Ready(Some(Ok(item)));
        }
        Poll::Ready(Some(Err(e))) => Some(Err(t.error(e))),
        Poll::Ready(None) => None,
        Poll::Pending => match t.poll_waiting(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(cut) => {
                // Cut: the appended item (if any) is the last one.
                match &cut {
                    Some(Err(_)) => end(tap, StreamEnd::Failed),
                    _ => end(tap, StreamEnd::Completed),
                }
                return Poll::Ready(cut);
            }
        },
    };
    settle(tap, &out);
    Poll::Ready(out)
}

impl<S: std::fmt::Debug, T: std::fmt::Debug> std::fmt::Debug for Tapped<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tapped")
            .field("inner", &self.inner)
            .field("tap", &self.tap.tap)
            .field("ending", &self.ending)
            .finish()
    }
}

impl<S, T, D, E> Stream for Tapped<S, T>
where
    S: Stream<Item = Result<D, E>>,
    T: Tap<D, E>,
{
    type Item = Result<D, T::Error>;

    #[inline]
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        step(
            this.inner,
            &mut this.tap.tap,
            this.ending,
            cx,
            S::poll_next,
            |_| false,
        )
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match (&self.tap.tap, self.ending) {
            (None, _) => (0, Some(0)),
            (Some(_), true) => (0, Some(1)),
            // The tap may end it early or append one item.
            (Some(_), false) => (0, self.inner.size_hint().1.and_then(|n| n.checked_add(1))),
        }
    }
}

impl<S, T, D, E> futures_core::FusedStream for Tapped<S, T>
where
    S: Stream<Item = Result<D, E>>,
    T: Tap<D, E>,
{
    fn is_terminated(&self) -> bool {
        self.tap.tap.is_none()
    }
}

#[cfg(feature = "http")]
impl<B, T> http_body::Body for Tapped<B, T>
where
    B: http_body::Body,
    T: Tap<http_body::Frame<B::Data>, B::Error>,
{
    type Data = B::Data;
    type Error = T::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, T::Error>>> {
        let this = self.project();
        step(
            this.inner,
            &mut this.tap.tap,
            this.ending,
            cx,
            B::poll_frame,
            // hyper (and `http_body_util::BodyExt::collect`) stop polling once
            // `is_end_stream()` is true after the last frame, then drop the
            // body: a body that says it has ended has completed.
            B::is_end_stream,
        )
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match (&self.tap.tap, self.ending) {
            (None, _) => true,
            // Something may still be appended.
            (Some(_), true) => false,
            (Some(_), false) => self.inner.is_end_stream(),
        }
    }

    /// The inner body's while it flows (a tap that cuts or appends is for
    /// streamed bodies, which have no exact length); exactly 0 after the end.
    fn size_hint(&self) -> http_body::SizeHint {
        match (&self.tap.tap, self.ending) {
            (None, _) => http_body::SizeHint::with_exact(0),
            (Some(_), true) => http_body::SizeHint::new(),
            (Some(_), false) => self.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{stream, StreamExt};
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};

    /// A tap that records the ends it is told, ends after item `end_after`
    /// (appending `then`), and cuts while waiting with `cut`.
    #[derive(Default)]
    struct Probe {
        ends: Arc<Mutex<Vec<StreamEnd>>>,
        seen: usize,
        end_after: Option<usize>,
        then: Option<Result<u32, String>>,
        cut: Option<Option<Result<u32, String>>>,
    }

    impl Tap<u32, String> for Probe {
        type Error = String;
        fn item(&mut self, _item: &u32) -> Flow {
            self.seen += 1;
            if Some(self.seen) == self.end_after {
                Flow::End
            } else {
                Flow::Continue
            }
        }
        fn error(&mut self, error: String) -> String {
            format!("tapped: {error}")
        }
        fn poll_waiting(&mut self, _cx: &mut Context<'_>) -> Poll<Option<Result<u32, String>>> {
            match self.cut.take() {
                Some(cut) => Poll::Ready(cut),
                None => Poll::Pending,
            }
        }
        fn then(&mut self) -> Option<Result<u32, String>> {
            self.then.take()
        }
        fn end(self, end: StreamEnd) {
            self.ends.lock().unwrap().push(end);
        }
    }

    fn poll<S: Stream + Unpin>(s: &mut S) -> Poll<Option<S::Item>> {
        let waker = futures::task::noop_waker();
        s.poll_next_unpin(&mut Context::from_waker(&waker))
    }

    #[test]
    fn end_after_an_item_appends_then_ends_and_says_failed_once() {
        let probe = Probe {
            end_after: Some(2),
            then: Some(Err("boom".into())),
            ..Probe::default()
        };
        let ends = probe.ends.clone();
        let mut s = Tapped::new(stream::iter((1..=5).map(Ok::<u32, String>)), probe);
        assert_eq!(poll(&mut s), Poll::Ready(Some(Ok(1))));
        assert_eq!(poll(&mut s), Poll::Ready(Some(Ok(2))));
        assert!(
            ends.lock().unwrap().is_empty(),
            "the appended item is still to come"
        );
        assert_eq!(s.size_hint(), (0, Some(1)));
        assert_eq!(poll(&mut s), Poll::Ready(Some(Err("boom".into()))));
        assert_eq!(poll(&mut s), Poll::Ready(None));
        assert_eq!(poll(&mut s), Poll::Ready(None), "fused");
        drop(s);
        assert_eq!(*ends.lock().unwrap(), vec![StreamEnd::Failed]);
    }

    #[test]
    fn end_with_nothing_to_append_completes() {
        let probe = Probe {
            end_after: Some(1),
            ..Probe::default()
        };
        let ends = probe.ends.clone();
        let mut s = Tapped::new(stream::iter((1..=5).map(Ok::<u32, String>)), probe);
        assert_eq!(poll(&mut s), Poll::Ready(Some(Ok(1))));
        assert_eq!(poll(&mut s), Poll::Ready(None));
        assert_eq!(*ends.lock().unwrap(), vec![StreamEnd::Completed]);
    }

    #[test]
    fn a_cut_while_waiting_is_the_last_item() {
        for (cut, want) in [
            (Some(Err("cut".to_string())), StreamEnd::Failed),
            (Some(Ok(9)), StreamEnd::Completed),
            (None, StreamEnd::Completed),
        ] {
            let probe = Probe {
                cut: Some(cut.clone()),
                ..Probe::default()
            };
            let ends = probe.ends.clone();
            let polled = Arc::new(Mutex::new(0));
            let p = polled.clone();
            let inner = stream::poll_fn(move |_| {
                *p.lock().unwrap() += 1;
                Poll::<Option<Result<u32, String>>>::Pending
            });
            let mut s = Tapped::new(inner, probe);
            assert_eq!(poll(&mut s), Poll::Ready(cut));
            assert_eq!(poll(&mut s), Poll::Ready(None));
            assert_eq!(*polled.lock().unwrap(), 1, "never polled after the cut");
            assert_eq!(*ends.lock().unwrap(), vec![want]);
        }
    }

    #[test]
    fn an_inner_error_goes_through_the_tap_and_ends() {
        let probe = Probe::default();
        let ends = probe.ends.clone();
        let items = vec![Ok(1), Err("io".to_string()), Ok(3)];
        let got: Vec<_> =
            futures::executor::block_on(Tapped::new(stream::iter(items), probe).collect());
        assert_eq!(got, vec![Ok(1), Err("tapped: io".to_string())]);
        assert_eq!(*ends.lock().unwrap(), vec![StreamEnd::Failed]);
    }

    #[test]
    fn dropped_at_each_point_is_told_once() {
        // Before the first poll, after an item, and with an appended item pending.
        for polls in 0..=2 {
            let probe = Probe {
                end_after: Some(2),
                then: Some(Err("late".into())),
                ..Probe::default()
            };
            let ends = probe.ends.clone();
            let mut s = Tapped::new(stream::iter((1..=5).map(Ok::<u32, String>)), probe);
            for _ in 0..polls {
                let _ = poll(&mut s);
            }
            drop(s);
            assert_eq!(
                *ends.lock().unwrap(),
                vec![StreamEnd::Dropped],
                "after {polls} polls"
            );
        }
    }

    #[cfg(feature = "http")]
    mod body {
        use super::*;
        use bytes::Bytes;
        use http_body::{Body, Frame};
        use http_body_util::BodyExt;

        /// Ends after the frame that carries `!`, appending an error.
        struct Bang(Arc<Mutex<Vec<StreamEnd>>>, bool);
        impl<E: std::fmt::Display> Tap<Frame<Bytes>, E> for Bang {
            type Error = String;
            fn item(&mut self, f: &Frame<Bytes>) -> Flow {
                self.1 = f.data_ref().is_some_and(|d| d.contains(&b'!'));
                if self.1 {
                    Flow::End
                } else {
                    Flow::Continue
                }
            }
            fn error(&mut self, error: E) -> String {
                error.to_string()
            }
            fn then(&mut self) -> Option<Result<Frame<Bytes>, String>> {
                self.1.then(|| Err("bang".to_string()))
            }
            fn end(self, end: StreamEnd) {
                self.0.lock().unwrap().push(end);
            }
        }

        /// Reads a body the way hyper does: it stops once `is_end_stream()`.
        async fn like_hyper<B: Body + Unpin>(mut b: B) -> (usize, Option<B::Error>) {
            let mut frames = 0;
            while !b.is_end_stream() {
                match b.frame().await {
                    Some(Ok(_)) => frames += 1,
                    Some(Err(e)) => return (frames, Some(e)),
                    None => break,
                }
            }
            (frames, None)
        }

        #[tokio::test]
        async fn an_append_after_the_last_frame_is_read_by_a_reader_that_stops_at_the_end() {
            let ends = Arc::new(Mutex::new(Vec::new()));
            // `Full` is at its end right after its one frame.
            let inner = http_body_util::Full::new(Bytes::from_static(b"data: !\n\n"));
            let tapped = Tapped::body(inner, Bang(ends.clone(), false));
            assert!(!tapped.is_end_stream());
            let (frames, err) = like_hyper(tapped).await;
            assert_eq!((frames, err.as_deref()), (1, Some("bang")));
            assert_eq!(*ends.lock().unwrap(), vec![StreamEnd::Failed]);
        }

        #[tokio::test]
        async fn a_body_ends_at_its_last_frame_and_an_empty_one_at_once() {
            let ends = Arc::new(Mutex::new(Vec::new()));
            let inner = http_body_util::Full::new(Bytes::from_static(b"ok"));
            let tapped = Tapped::body(inner, Bang(ends.clone(), false));
            assert_eq!(
                tapped.size_hint().exact(),
                Some(2),
                "the inner length passes"
            );
            let (frames, err) = like_hyper(tapped).await;
            assert_eq!((frames, err), (1, None));
            assert_eq!(*ends.lock().unwrap(), vec![StreamEnd::Completed]);

            let ends = Arc::new(Mutex::new(Vec::new()));
            let tapped = Tapped::body(
                http_body_util::Empty::<Bytes>::new(),
                Bang(ends.clone(), false),
            );
            assert!(tapped.is_end_stream() && tapped.is_finished());
            assert_eq!(tapped.size_hint().exact(), Some(0));
            assert_eq!(*ends.lock().unwrap(), vec![StreamEnd::Completed]);
            drop(tapped);
            assert_eq!(ends.lock().unwrap().len(), 1, "told once");
        }
    }

    proptest! {
        /// Whatever the inner stream yields and wherever the tap ends it: the
        /// tap is told exactly once; what comes out is the inner items up to
        /// the first error or the tap's end, then the appended item, then
        /// nothing; and the end it is told matches the last item.
        #[test]
        fn told_once_and_the_output_is_a_prefix(
            items in proptest::collection::vec(prop_oneof![3 => (0u32..100).prop_map(Ok), 1 => Just(Err("e".to_string()))], 0..12),
            end_after in proptest::option::of(1usize..12),
            then in proptest::option::of(prop_oneof![Just(Ok(1000u32)), Just(Err("t".to_string()))]),
            read in 0usize..16,
        ) {
            let probe = Probe { end_after, then: then.clone(), ..Probe::default() };
            let ends = probe.ends.clone();
            let mut s = Tapped::new(stream::iter(items.clone()), probe);
            let mut out = Vec::new();
            for _ in 0..read {
                match poll(&mut s) {
                    Poll::Ready(Some(x)) => out.push(x),
                    Poll::Ready(None) => break,
                    Poll::Pending => unreachable!("an iter stream is never pending"),
                }
            }
            let finished = s.is_finished();
            drop(s);
            // The model.
            let mut want = Vec::new();
            let mut want_end = StreamEnd::Completed;
            let mut oks = 0;
            for item in &items {
                match item {
                    Ok(v) => {
                        want.push(Ok(*v));
                        oks += 1;
                        if Some(oks) == end_after {
                            if let Some(t) = &then {
                                want.push(t.clone());
                                if t.is_err() { want_end = StreamEnd::Failed; }
                            }
                            break;
                        }
                    }
                    Err(e) => {
                        want.push(Err(format!("tapped: {e}")));
                        want_end = StreamEnd::Failed;
                        break;
                    }
                }
            }
            prop_assert_eq!(&out[..], &want[..out.len().min(want.len())]);
            let ends = ends.lock().unwrap().clone();
            prop_assert_eq!(ends.len(), 1);
            // Reading past the last item always reaches the end.
            prop_assert!(read <= want.len() || finished);
            if finished {
                prop_assert_eq!(&out, &want);
                prop_assert_eq!(ends[0], want_end);
            } else {
                prop_assert_eq!(ends[0], StreamEnd::Dropped);
            }
        }
    }
}
