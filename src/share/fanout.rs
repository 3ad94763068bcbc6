//! One streamed answer read by several callers ([`FanOut`]).

use super::{Served, Share, SharedError};
use crate::error::BoxError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use slab::Slab;
use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

type Upstream = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>;

/// Shares a streamed `http::Response<B>`: every caller gets the same
/// status, headers and chunks; the upstream body is read once, by whichever
/// caller asks first for the next chunk (so the caller whose call ran may
/// drop its body mid-stream: the others go on). A caller that joins while
/// the answer streams first gets the chunks already sent — as long as the
/// replay buffer still holds them all (`max_buffer` bytes); later joiners
/// call on their own. A caller that stops reading does not hold the others
/// back: when the chunks it has not read pass `max_buffer`, it is cut (its
/// body ends with an error) and the buffer is trimmed.
///
/// What the upstream body holds (a bulkhead permit, a pacer's reservation,
/// a breaker's verdict) is held until its end or until every caller has
/// dropped its body: one call, seen once by the layers below.
#[derive(Debug, Clone, Copy)]
pub struct FanOut {
    max_buffer: usize,
}

impl Default for FanOut {
    fn default() -> Self {
        FanOut::new(1 << 20)
    }
}

impl FanOut {
    /// Shares streamed answers with a replay buffer of `max_buffer` bytes
    /// (default 1 MiB).
    pub fn new(max_buffer: usize) -> Self {
        FanOut { max_buffer }
    }
}

/// A streamed answer being shared (see [`FanOut`]).
pub struct KeptStream {
    status: http::StatusCode,
    version: http::Version,
    headers: http::HeaderMap,
    tee: Arc<Tee>,
}

impl fmt::Debug for KeptStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeptStream")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl KeptStream {
    fn response(&self, body: FanOutBody, served: Served) -> http::Response<FanOutBody> {
        let mut res = http::Response::new(body);
        *res.status_mut() = self.status;
        *res.version_mut() = self.version;
        *res.headers_mut() = self.headers.clone();
        res.extensions_mut().insert(served);
        res
    }
}

struct Tee {
    state: Mutex<TeeState>,
    /// Readers waiting for the next chunk: a lock of its own, so an
    /// upstream that wakes inside its own `poll_frame` (while the state's
    /// lock is held) does not deadlock.
    wakers: Mutex<Vec<Waker>>,
    max_buffer: usize,
}

struct TeeState {
    upstream: Option<Upstream>,
    /// Chunks from index `base` on.
    chunks: VecDeque<Bytes>,
    base: usize,
    bytes: usize,
    /// How the stream ended: its trailers, or its error.
    end: Option<Result<Option<http::HeaderMap>, SharedError>>,
    /// Each reader's next chunk (`None`: cut).
    readers: Slab<Option<usize>>,
    /// No chunk has been trimmed: a new reader can start from the first.
    joinable: bool,
    /// Called once the stream can no longer be joined.
    on_settled: Option<Box<dyn FnOnce() + Send>>,
    /// Readers registered at the first chunk for callers that were waiting
    /// when the answer came ([`Share::reserve`]): each is handed to one of
    /// them. One never handed out is a reader that does not read: cut once
    /// it is `max_buffer` behind, like any slow reader.
    reserved: Vec<usize>,
}

impl Tee {
    fn lock(&self) -> MutexGuard<'_, TeeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self, w: &Waker) {
        let mut ws = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if !ws.iter().any(|x| x.will_wake(w)) {
            ws.push(w.clone());
        }
    }

    fn wake_all(&self) {
        let ws = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in ws {
            w.wake();
        }
    }

    /// Ends joinability (once), calling the settle hook outside the lock.
    fn settle(st: &mut TeeState) -> Option<Box<dyn FnOnce() + Send>> {
        st.joinable = false;
        st.on_settled.take()
    }
}

/// Wakes every reader waiting for the upstream's next chunk. Weak: the
/// upstream keeps this waker, and must not keep the tee (and so itself)
/// alive.
struct WakeAll(std::sync::Weak<Tee>);

impl Wake for WakeAll {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(tee) = self.0.upgrade() {
            tee.wake_all();
        }
    }
}

/// One caller's view of a shared streamed answer.
pub struct FanOutBody {
    tee: Arc<Tee>,
    reader: usize,
}

impl fmt::Debug for FanOutBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FanOutBody").finish_non_exhaustive()
    }
}

impl FanOutBody {
    /// The body of a caller that was waiting when the answer came: a
    /// reader registered for it at the start ([`Share::reserve`]), or a
    /// new one if none is left.
    fn reserved(tee: &Arc<Tee>) -> Self {
        let reader = tee.lock().reserved.pop();
        match reader {
            Some(reader) => FanOutBody {
                tee: tee.clone(),
                reader,
            },
            None => FanOutBody::new(tee),
        }
    }

    fn new(tee: &Arc<Tee>) -> Self {
        let mut st = tee.lock();
        // A stream no longer joinable from its start: this reader is cut
        // (its first poll errs) rather than given a stream without its head.
        let start = (st.joinable || st.base == 0).then_some(0);
        let reader = st.readers.insert(start);
        drop(st);
        FanOutBody {
            tee: tee.clone(),
            reader,
        }
    }
}

impl Drop for FanOutBody {
    fn drop(&mut self) {
        let hook = {
            let mut st = self.tee.lock();
            st.readers.try_remove(self.reader);
            // Nobody reads: nobody can join (a new caller would wait on a
            // stream nobody pulls). The upstream body goes with the last
            // handle on the stream: the readers and the callers still
            // about to read (the upstream's waker holds none). Readers
            // reserved for waiting callers do not count: such a caller
            // still reads, through its own handle on the stream.
            let hook = if st.readers.len() <= st.reserved.len() {
                Tee::settle(&mut st)
            } else {
                None
            };
            let trimmed = trim(&mut st, self.tee.max_buffer);
            hook.or(trimmed)
        };
        if let Some(h) = hook {
            h();
        }
    }
}

/// Drops chunks every reader has read (once nobody can join any more);
/// past `max` bytes, ends joinability, then cuts the slowest readers.
fn trim(st: &mut TeeState, max: usize) -> Option<Box<dyn FnOnce() + Send>> {
    let mut hook = None;
    loop {
        let min = st.readers.iter().filter_map(|(_, p)| *p).min();
        if !st.joinable {
            let upto = min.unwrap_or(usize::MAX);
            while st.base < upto {
                let Some(c) = st.chunks.pop_front() else {
                    break;
                };
                st.bytes -= c.len();
                st.base += 1;
            }
        }
        // The newest chunk is allowed on top of the bound: a reader that
        // has not yet taken it is not behind.
        let newest = st.chunks.back().map_or(0, Bytes::len);
        if st.bytes.saturating_sub(newest) <= max {
            return hook;
        }
        if st.joinable {
            // Over the bound: a new caller could not get the first chunks.
            hook = Tee::settle(st).or(hook);
            continue;
        }
        let Some(slowest) = min else {
            st.base += st.chunks.len();
            st.chunks.clear();
            st.bytes = 0;
            return hook;
        };
        for (_, p) in st.readers.iter_mut() {
            if *p == Some(slowest) {
                *p = None;
            }
        }
    }
}

impl Body for FanOutBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let tee = this.tee.clone();
        let mut hook = None;
        let out = {
            let mut st = tee.lock();
            loop {
                let Some(Some(pos)) = st
                    .readers
                    .get(this.reader)
                    .copied()
                    .filter(|p| p.is_none_or(|p| p >= st.base))
                else {
                    break Poll::Ready(Some(Err(BoxError::from(
                        "coalesce: this caller fell too far behind the shared stream",
                    ))));
                };
                if pos < st.base + st.chunks.len() {
                    let chunk = st.chunks[pos - st.base].clone();
                    if let Some(Some(p)) = st.readers.get_mut(this.reader) {
                        *p = pos + 1;
                    }
                    hook = trim(&mut st, tee.max_buffer).or(hook);
                    break Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                if let Some(end) = &st.end {
                    // Every chunk read: the end, once per reader.
                    let end = end.clone();
                    if let Some(Some(p)) = st.readers.get_mut(this.reader) {
                        *p = usize::MAX / 2;
                    }
                    break match end {
                        Ok(Some(trailers)) if pos < usize::MAX / 2 => {
                            Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                        }
                        Ok(_) => Poll::Ready(None),
                        Err(e) if pos < usize::MAX / 2 => {
                            Poll::Ready(Some(Err(Box::new(e) as BoxError)))
                        }
                        Err(_) => Poll::Ready(None),
                    };
                }
                // Pull the next frame for everyone.
                let Some(up) = st.upstream.as_mut() else {
                    st.end = Some(Ok(None));
                    continue;
                };
                // Registered first: a wake during the poll reaches this reader.
                tee.wait(cx.waker());
                let waker = Waker::from(Arc::new(WakeAll(Arc::downgrade(&tee))));
                let mut ucx = Context::from_waker(&waker);
                // The upstream body is the caller's code: if it panics, the
                // stream ends in an error for every reader (they would
                // otherwise wait for a chunk nobody pulls any more).
                let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    up.as_mut().poll_frame(&mut ucx)
                }))
                .unwrap_or_else(|_| {
                    Poll::Ready(Some(Err(BoxError::from(
                        "coalesce: the shared upstream body panicked",
                    ))))
                });
                match polled {
                    Poll::Pending => {
                        break Poll::Pending;
                    }
                    Poll::Ready(None) => {
                        st.upstream = None;
                        st.end = Some(Ok(None));
                    }
                    Poll::Ready(Some(Err(e))) => {
                        st.upstream = None;
                        st.end = Some(Err(SharedError::new(e)));
                    }
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => {
                            st.bytes += data.len();
                            st.chunks.push_back(data);
                            tee.wake_all();
                        }
                        Err(frame) => {
                            if let Ok(t) = frame.into_trailers() {
                                st.upstream = None;
                                st.end = Some(Ok(Some(t)));
                            }
                        }
                    },
                }
                if st.end.is_some() {
                    // Ended: nobody can join any more; wake the others.
                    hook = Tee::settle(&mut st).or(hook);
                    tee.wake_all();
                }
            }
        };
        if let Some(h) = hook {
            h();
        }
        out
    }

    fn is_end_stream(&self) -> bool {
        let st = self.tee.lock();
        match st.readers.get(self.reader) {
            Some(Some(pos)) => {
                *pos >= usize::MAX / 2
                    || (matches!(st.end, Some(Ok(None))) && *pos >= st.base + st.chunks.len())
            }
            _ => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl<B> Share<http::Response<B>> for FanOut
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Kept = Arc<KeptStream>;
    type Output = http::Response<FanOutBody>;

    fn keep(&self, res: http::Response<B>) -> (http::Response<FanOutBody>, Arc<KeptStream>) {
        let (parts, body) = res.into_parts();
        let tee = Arc::new(Tee {
            state: Mutex::new(TeeState {
                upstream: Some(Box::pin(http_body_util::BodyExt::map_err(body, Into::into))),
                chunks: VecDeque::new(),
                base: 0,
                bytes: 0,
                end: None,
                readers: Slab::new(),
                joinable: true,
                on_settled: None,
                reserved: Vec::new(),
            }),
            wakers: Mutex::new(Vec::new()),
            max_buffer: self.max_buffer,
        });
        let out = FanOutBody::new(&tee);
        let kept = Arc::new(KeptStream {
            status: parts.status,
            version: parts.version,
            headers: parts.headers.clone(),
            tee,
        });
        (http::Response::from_parts(parts, out), kept)
    }

    fn pass(&self, res: http::Response<B>) -> http::Response<FanOutBody> {
        self.keep(res).0
    }

    fn give(&self, kept: &Arc<KeptStream>, served: Served) -> http::Response<FanOutBody> {
        kept.response(FanOutBody::new(&kept.tee), served)
    }

    /// Registers `callers` readers at the stream's start, before the
    /// caller whose call ran can read (and trim) anything.
    fn reserve(&self, kept: &Arc<KeptStream>, callers: usize) {
        let mut st = kept.tee.lock();
        for _ in 0..callers {
            let reader = st.readers.insert(Some(0));
            st.reserved.push(reader);
        }
    }

    fn give_reserved(&self, kept: &Arc<KeptStream>, served: Served) -> http::Response<FanOutBody> {
        kept.response(FanOutBody::reserved(&kept.tee), served)
    }

    fn late_joiners(&self) -> bool {
        true
    }

    fn joinable(&self, kept: &Arc<KeptStream>) -> bool {
        kept.tee.lock().joinable
    }

    fn on_settled(&self, kept: &Arc<KeptStream>, f: Box<dyn FnOnce() + Send>) {
        let run_now = {
            let mut st = kept.tee.lock();
            if st.joinable {
                st.on_settled = Some(f);
                None
            } else {
                Some(f)
            }
        };
        if let Some(f) = run_now {
            f();
        }
    }

    fn served(&self, res: &http::Response<B>) -> Option<Served> {
        res.extensions().get::<Served>().copied()
    }
}
