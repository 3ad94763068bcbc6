//! Graceful shutdown: stop admitting, let running calls finish up to a
//! deadline, cancel the rest cleanly, and report what happened.
//!
//! On SIGTERM: stop accepting, finish in-flight work within 30 s, close
//! connections. axum's and hyper-util's graceful shutdown wait forever (no
//! deadline), and a streamed response keeps them waiting.
//!
//! - [`Shutdown::layer`] goes **outermost**, so it sees every call. After
//!   [`trigger`](Shutdown::trigger), new calls get
//!   [`RejectKind::ShuttingDown`](crate::RejectKind::ShuttingDown) at once (with a
//!   retry-after hint for the load balancer's next pick), and readiness turns false
//!   the same instant ([`Shutdown::readiness`]), so traffic moves away before
//!   draining starts. A caller already waiting for the inner service to be
//!   ready is woken by the trigger and refused the same way.
//! - In-flight calls are counted until their response — or, with
//!   `release_on_stream_end` / `release_on_body_end`, until the streamed body ends.
//! - [`drain`](Shutdown::drain) waits for them up to a deadline; at the deadline
//!   the calls still waiting for their response are cancelled (their inner futures
//!   dropped at their next poll, the caller answered `ShuttingDown`; a future
//!   nobody polls any more is counted cancelled all the same), and the
//!   [`DrainReport`] puts each call in flight at the trigger in exactly one of
//!   completed, cancelled and still streaming, and counts the calls refused
//!   after it. Waiters released from a watched line are also counted apart
//!   (`queued_released`): those that came through this layer are among the
//!   completed too.
//! - Lines registered with [`watch`](Shutdown::watch) — a bulkhead's, a
//!   pacer's, a quota's wait mode, the Redis semaphore's and budget's, or any
//!   [`Close`] of yours — are closed at the trigger: their waiting callers are
//!   answered `ShuttingDown` at once, never left hanging.
//! - [`signal`] resolves on SIGTERM or Ctrl-C (feature `signal`).
//!
//! ```
//! use semaforo::shutdown::Shutdown;
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), semaforo::BoxError> {
//! let shutdown = Shutdown::new();
//! let mut svc = ServiceBuilder::new()
//!     .layer(shutdown.layer())
//!     .service(service_fn(|_: ()| async {
//!         tokio::time::sleep(Duration::from_secs(5)).await;
//!         Ok::<_, std::io::Error>("done")
//!     }));
//! let running = tokio::spawn(svc.ready().await?.call(()));
//! tokio::task::yield_now().await;
//! shutdown.trigger();
//! assert!(!shutdown.is_ready());
//! assert!(svc.ready().await?.call(()).await.is_err()); // refused after the trigger
//! let report = shutdown.drain(Duration::from_secs(30)).await;
//! assert_eq!((report.completed, report.cancelled, report.rejected), (1, 0, 1));
//! assert_eq!(running.await?.unwrap(), "done");
//! # Ok(()) }
//! ```

mod service;

pub use crate::close::Close;
#[cfg(feature = "http")]
pub use service::{CutAtDeadline, DrainCut, DRAIN_EVENT};
pub use service::{HoldInFlight, InFlight, ResponseFuture, ShutdownLayer, ShutdownService};

use crate::observe::{Event, EventKind, ListenerSlot, Observer, ShutdownPhase};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// The lines to close at the trigger.
#[derive(Default)]
struct Lines(Vec<Box<dyn Close>>);

impl std::fmt::Debug for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} lines", self.0.len())
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) triggered: AtomicBool,
    pub(crate) in_flight: AtomicU64,
    /// Calls that ended after the trigger (an end before it is not counted:
    /// the drain reports only what ended after it).
    pub(crate) completed: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) rejected: AtomicU64,
    released: AtomicU64,
    /// Counts now riding with a streamed response (its body or stream):
    /// the rest of `in_flight` is waiting for a response.
    pub(crate) streaming: AtomicU64,
    pub(crate) idle: Notify,
    /// Cancelled at the drain deadline.
    pub(crate) cancel: CancellationToken,
    /// Cancelled at the trigger: wakes callers waiting for readiness.
    pub(crate) stop: CancellationToken,
    ready: watch::Sender<bool>,
    /// The lines closed at the trigger.
    lines: Mutex<Lines>,
    pub(crate) retry_after: Duration,
    listener: std::sync::RwLock<ListenerSlot>,
}

impl Shared {
    /// A call that came after the trigger. If `counted` (it slipped past the
    /// first look and was counted in `in_flight` before it looked again), the
    /// count is taken back without counting it as completed (no `InFlight`
    /// was made, so none ends). The refusal is counted and told. Out of line:
    /// the admitted call's path stays small.
    #[cold]
    #[inline(never)]
    pub(crate) fn refuse_triggered(&self, counted: bool) -> Box<crate::error::Rejected> {
        if counted && self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
        self.rejected.fetch_add(1, Ordering::Relaxed);
        let r = crate::error::Rejected::new("shutdown", crate::error::RejectKind::ShuttingDown)
            .with_retry_after(self.retry_after);
        self.emit(EventKind::Rejected {
            kind: r.kind(),
            retry_after: r.retry_after(),
        });
        Box::new(r)
    }

    /// Emits `kind` (phases and refusals: never on a call that passes).
    pub(crate) fn emit(&self, kind: EventKind) {
        let listener = self
            .listener
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone();
        Observer::new(None, listener).emit("shutdown", kind);
    }
}

/// How long a drain waits, after cancelling at its deadline, for the cancelled
/// calls and cut bodies to unwind and be counted.
pub const UNWIND: Duration = Duration::from_secs(1);

/// What a drain did. Every call in flight when the trigger came (admitted by
/// the shutdown layer, not yet over) is in exactly one of `completed`,
/// `cancelled` and `still_streaming`; calls that ended before the trigger are
/// in none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DrainReport {
    /// Calls in flight at the trigger that finished during the drain (their
    /// response, or their stream, ended — with an answer or an error,
    /// including a waiter released from a line with `ShuttingDown` — or
    /// their caller let go of them: a client that disconnects during the
    /// drain counts here, the call no longer holds anything).
    pub completed: u64,
    /// Calls cut at the deadline: still waiting for their response (answered
    /// `ShuttingDown` at their next poll, or dropped unpolled), or event
    /// streams ended with the drain event (`DRAIN_EVENT`, feature `http`).
    pub cancelled: u64,
    /// Calls refused after the trigger.
    pub rejected: u64,
    /// Callers waiting in a watched line (a bulkhead's, a pacer's, any
    /// [`Close`]) answered `ShuttingDown` at the trigger. Not a part of the
    /// partition above: those that came through this layer are counted in
    /// `completed` as well (their call ended with that answer).
    pub queued_released: u64,
    /// Streamed bodies still open after the deadline (not cut: use
    /// `cut_bodies_at_deadline`; they are counted when the client lets go).
    /// Only responses followed to their end (`release_on_stream_end`,
    /// `release_on_body_end`, `cut_bodies_at_deadline`) stream: a call
    /// still waiting for its response is never here.
    pub still_streaming: u64,
}

/// A shutdown switch and drain. Cheap to clone; clones share it.
#[derive(Debug, Clone)]
pub struct Shutdown {
    shared: Arc<Shared>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    /// A running (not triggered) shutdown; refusals after the trigger suggest
    /// retrying in 1 s (on another instance).
    pub fn new() -> Self {
        Shutdown::with_retry_after(Duration::from_secs(1))
    }

    /// As [`new`](Self::new), with the retry-after hint of refusals.
    pub fn with_retry_after(retry_after: Duration) -> Self {
        Shutdown {
            shared: Arc::new(Shared {
                triggered: AtomicBool::new(false),
                in_flight: AtomicU64::new(0),
                completed: AtomicU64::new(0),
                cancelled: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                released: AtomicU64::new(0),
                streaming: AtomicU64::new(0),
                idle: Notify::new(),
                cancel: CancellationToken::new(),
                stop: CancellationToken::new(),
                ready: watch::Sender::new(true),
                lines: Mutex::new(Lines::default()),
                retry_after,
                listener: std::sync::RwLock::new(ListenerSlot::default()),
            }),
        }
    }

    /// Calls `f` for each shutdown event (draining, drained or cut, refusals
    /// after the trigger); see [`observe`](crate::observe). Clones share them.
    /// Listeners add up: a second `on_event` keeps the first (both are called, in order).
    pub fn on_event(&self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) {
        self.shared
            .listener
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set(f);
    }

    /// The layer; put it outermost.
    pub fn layer(&self) -> ShutdownLayer {
        ShutdownLayer::new(self.shared.clone())
    }

    /// Closes `line` at the trigger: its waiters are answered
    /// `ShuttingDown` at once (counted in [`DrainReport::queued_released`]),
    /// never left hanging. Given after the trigger, it is closed now.
    ///
    /// ```
    /// use semaforo::bulkhead::Bulkhead;
    /// use semaforo::pace::Pace;
    /// use semaforo::shutdown::Shutdown;
    ///
    /// let shutdown = Shutdown::new();
    /// let bulkhead = Bulkhead::builder(5).max_queue(45).build()?;
    /// let pace = Pace::builder().tokens_per_minute(30_000).build()?;
    /// shutdown.watch(bulkhead.clone());
    /// shutdown.watch(pace.clone());
    /// shutdown.trigger();
    /// assert!(bulkhead.snapshot().closed);
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn watch(&self, line: impl Close + 'static) {
        let mut lines = self.shared.lines.lock().unwrap_or_else(|e| e.into_inner());
        if self.shared.triggered.load(Ordering::Acquire) {
            drop(lines);
            self.shared
                .released
                .fetch_add(line.close(), Ordering::Relaxed);
            return;
        }
        lines.0.push(Box::new(line));
    }

    /// Stop admitting: readiness turns false, new calls are refused, watched
    /// lines are closed. Idempotent.
    pub fn trigger(&self) {
        // SeqCst: see `InFlight`'s drop.
        if self.shared.triggered.swap(true, Ordering::SeqCst) {
            return;
        }
        self.shared.ready.send_replace(false);
        self.shared.stop.cancel();
        self.shared.emit(EventKind::Shutdown {
            phase: ShutdownPhase::Draining,
        });
        let lines =
            std::mem::take(&mut *self.shared.lines.lock().unwrap_or_else(|e| e.into_inner()));
        for line in lines.0 {
            self.shared
                .released
                .fetch_add(line.close(), Ordering::Relaxed);
        }
    }

    /// `true` until the trigger: the shallow readiness check.
    pub fn is_ready(&self) -> bool {
        !self.shared.triggered.load(Ordering::Acquire)
    }

    /// A `watch` of readiness, for a `/readyz` endpoint or a load balancer hook.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.shared.ready.subscribe()
    }

    /// Calls in flight now: admitted calls whose response (or streamed body)
    /// is not over yet. A call refused after the trigger is never counted
    /// once the trigger is visible to it; one that arrives *as* the trigger
    /// comes may be counted for an instant before it is refused, so a reading
    /// taken while such calls race the trigger can be one per racing call
    /// above the admitted calls (the drain does not wait for those: it
    /// returns once it has seen 0 after the trigger).
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Triggers (if not yet), waits for in-flight calls up to `deadline`, then
    /// cancels the rest (calls still waiting for their response, bodies cut with
    /// `cut_bodies_at_deadline`), lets them unwind (at most [`UNWIND`]) and reports.
    pub async fn drain(&self, deadline: Duration) -> DrainReport {
        self.trigger();
        let until = crate::time::after(tokio::time::Instant::now(), deadline);
        // `in_flight` also counts, for an instant, a call being refused after
        // the trigger (counted, then taken back): once it has been seen at 0
        // after the trigger nothing admitted is left, so only the deadline
        // decides a cut, never a later reading.
        let mut cut = false;
        loop {
            let idle = self.shared.idle.notified();
            if self.in_flight() == 0 {
                break;
            }
            if tokio::time::timeout_at(until, idle).await.is_err() {
                cut = self.in_flight() > 0;
                break;
            }
        }
        if cut {
            self.shared.cancel.cancel();
            // Cancelled futures and cut bodies finish at their next poll, which
            // other tasks (a server's connections) run: give them up to
            // `UNWIND` to be counted.
            let until = tokio::time::Instant::now() + UNWIND;
            loop {
                let idle = self.shared.idle.notified();
                if self.in_flight() == 0 {
                    break;
                }
                yield_once().await;
                if self.in_flight() == 0 || tokio::time::timeout_at(until, idle).await.is_err() {
                    break;
                }
            }
        }
        self.shared.emit(EventKind::Shutdown {
            phase: if cut {
                ShutdownPhase::Cut
            } else {
                ShutdownPhase::Drained
            },
        });
        // Still counted after the unwind: open streams, and calls cut while
        // waiting for their response whose futures were not polled since
        // (they answer `ShuttingDown` at their next poll, and are counted
        // cancelled then or when dropped: in this report already).
        let (open, streaming) = if cut {
            let open = self.in_flight();
            (
                open,
                self.shared.streaming.load(Ordering::Acquire).min(open),
            )
        } else {
            (0, 0)
        };
        DrainReport {
            completed: self.shared.completed.load(Ordering::Acquire),
            cancelled: self
                .shared
                .cancelled
                .load(Ordering::Acquire)
                .saturating_add(open - streaming),
            rejected: self.shared.rejected.load(Ordering::Acquire),
            queued_released: self.shared.released.load(Ordering::Acquire),
            still_streaming: streaming,
        }
    }
}

/// Lets other tasks run once (without needing tokio's `rt` feature).
async fn yield_once() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

/// Installs handlers for SIGTERM and Ctrl-C (SIGINT) **now**, and returns a
/// future that resolves when either arrives (Ctrl-C only outside unix).
/// Feature `signal`.
///
/// Call it before you announce that you are listening: a SIGTERM that
/// arrives after `signal()` returned is never lost (it is not a lazy `async
/// fn` that installs its handlers at the first poll).
///
/// # Errors
///
/// Called outside a tokio runtime, or in one built without its IO driver
/// (`enable_io` / `enable_all`), or when the OS refuses a handler. It is an
/// error, not a shutdown: without handlers, the default action of the signal
/// applies.
///
/// # Panics
///
/// None.
///
/// ```no_run
/// # async fn serve() -> std::io::Result<()> {
/// let stop = semaforo::shutdown::signal()?; // handlers in place from here
/// println!("listening");
/// stop.await;
/// # Ok(()) }
/// ```
#[cfg(feature = "signal")]
pub fn signal() -> std::io::Result<Signal> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(std::io::Error::other(
            "shutdown::signal() needs a tokio runtime",
        ));
    }
    // tokio panics (instead of answering an error) in a runtime without its
    // IO driver: turn that into the error it is.
    let install = || -> std::io::Result<Signal> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal as unix_signal, SignalKind};
            Ok(Signal {
                term: unix_signal(SignalKind::terminate())?,
                int: unix_signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(windows)]
        {
            Ok(Signal {
                ctrl_c: tokio::signal::windows::ctrl_c()?,
            })
        }
    };
    std::panic::catch_unwind(install).unwrap_or_else(|_| {
        Err(std::io::Error::other(
            "shutdown::signal() needs a tokio runtime with its IO driver enabled",
        ))
    })
}

/// The future of [`signal()`]: ready when SIGTERM or Ctrl-C arrives.
/// Cancel safe: dropping it removes nothing but this listener.
#[cfg(feature = "signal")]
#[derive(Debug)]
#[must_use = "a Signal does nothing unless awaited"]
pub struct Signal {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(windows)]
    ctrl_c: tokio::signal::windows::CtrlC,
}

#[cfg(feature = "signal")]
impl std::future::Future for Signal {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        #[cfg(unix)]
        {
            if self.term.poll_recv(cx).is_ready() || self.int.poll_recv(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        #[cfg(windows)]
        {
            if self.ctrl_c.poll_recv(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    }
}
