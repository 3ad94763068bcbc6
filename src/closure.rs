//! Our policies around a plain `async` closure, without tower.
//!
//! Every capability is a tower layer; a caller who has no tower service —
//! a job, a database call, an SDK method — runs a closure through the same
//! layer instead. The classification, the events and the shared state are
//! the layer's own: a breaker opened by closure calls refuses tower calls
//! too, and the other way round.
//!
//! - `breaker.call(|| async { … })`, `retry.call(…)`, `bulkhead.call(…)`,
//!   `timeout.call(…)`: one policy with its default classification
//!   ([`ErrorClassifier`](crate::classify::ErrorClassifier): an `Err` by its
//!   error chain — I/O, timeouts, our refusals — an `Ok` is a success);
//! - [`run`]`(&layer, || async { … })`: any layer, with its own classifier
//!   (`breaker.layer().classify(…)`), or a whole `ServiceBuilder` stack.
//!
//! The closure returns `Result<T, E>` with any `E: Into<BoxError>`; the
//! classifier sees it boxed (`Result<&T, &BoxError>`), and the answer is
//! `Result<T, BoxError>` (downcast to get `E` back, or a
//! [`Rejected`](crate::Rejected)).
//! Retrying calls the closure again, so it is an `FnMut` (called once per
//! attempt, never twice at once); it need not be `Clone`.
//!
//! An `Err` of a type the classifiers do not know is `Transient`, so it is
//! retried and counts against a breaker. Say what your errors mean with a
//! classifier (the closure's error arrives boxed):
//!
//! ```
//! use semaforo::classify::{classify_error, Class, Permanent};
//! use semaforo::retry::Retry;
//! use semaforo::{closure, BoxError};
//!
//! #[derive(Debug)]
//! enum DbError { NotFound, Busy }
//! impl std::fmt::Display for DbError {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { write!(f, "{self:?}") }
//! }
//! impl std::error::Error for DbError {}
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let by_kind = |r: Result<&String, &BoxError>| match r {
//!     Ok(_) => Class::Success,
//!     Err(e) => match e.downcast_ref::<DbError>() {
//!         Some(DbError::NotFound) => Class::permanent(Permanent::NotFound),
//!         Some(DbError::Busy) => Class::Overloaded { retry_after: None },
//!         None => classify_error(e.as_ref()),
//!     },
//! };
//! let retry = Retry::builder().max_attempts(3).build()?;
//! let calls = std::sync::atomic::AtomicU32::new(0);
//! let err = closure::run(&retry.layer().classify(by_kind), || async {
//!     calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!     Err::<String, _>(DbError::NotFound)
//! })
//! .await
//! .unwrap_err();
//! assert!(matches!(err.downcast_ref::<DbError>(), Some(DbError::NotFound)));
//! assert_eq!(calls.into_inner(), 1, "NotFound is not retried");
//! # Ok(()) }
//! ```
//!
//! | tower | closure |
//! |---|---|
//! | `ServiceBuilder::new().layer(breaker.layer()).service(svc)` then `svc.ready().await?.call(req).await` | `breaker.call(\|\| async { … }).await` |
//! | `.layer(retry.layer().classify(c))` | `closure::run(&retry.layer().classify(c), \|\| async { … }).await` |
//!
//! ```
//! use semaforo::breaker::Breaker;
//! use semaforo::retry::Retry;
//! use semaforo::{closure, BoxError, RejectKind, Rejected};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let breaker = Breaker::builder().consecutive_failures(2).build()?;
//! for _ in 0..2 {
//!     let down = breaker.call(|| async {
//!         Err::<(), _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
//!     });
//!     assert!(down.await.is_err());
//! }
//! let err = breaker.call(|| async { Ok::<_, std::io::Error>("never called") }).await.unwrap_err();
//! assert_eq!(Rejected::from_box(&err).map(|r| r.kind()), Some(RejectKind::CircuitOpen));
//!
//! // A whole stack: retry around a breaker, around the closure.
//! let retry = Retry::builder().max_attempts(3).build()?;
//! let breaker = Breaker::builder().build()?;
//! let stack = tower::ServiceBuilder::new().layer(retry.layer()).layer(breaker.layer());
//! let answer = closure::run(&stack, || async { Ok::<_, std::io::Error>(42) }).await?;
//! assert_eq!(answer, 42);
//! # Ok(()) }
//! ```

use crate::error::BoxError;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

/// The `call` method of a policy handle with a `layer()`: the closure run
/// through that layer (written once for every handle).
macro_rules! call_method {
    ($what:literal) => {
        #[doc = concat!(
                    "Runs the `async` closure `f` through this ", $what,
                    ", with its default classification: the same as [`layer`](Self::layer) ",
                    "around a service, without tower (see [`closure`](crate::closure)). ",
                    "A retry calls the closure again for each attempt."
                )]
        ///
        /// # Errors
        #[doc = concat!(
                    "The closure's error, boxed, or a [`Rejected`](crate::Rejected) when the ",
                    $what, " refused the call."
                )]
        pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, crate::BoxError>
        where
            F: FnMut() -> Fut,
            Fut: std::future::Future<Output = Result<T, E>>,
            E: Into<crate::BoxError>,
        {
            crate::closure::run(&self.layer(), f).await
        }
    };
}
pub(crate) use call_method;

/// An `async` closure as a service of `()` (what a layer wraps in [`run`]);
/// its error is boxed. Clones share the closure (a retry clones the
/// service it wraps), so any `FnMut` will do.
pub struct Closure<F>(Arc<Mutex<F>>);

impl<F> Clone for Closure<F> {
    fn clone(&self) -> Self {
        Closure(self.0.clone())
    }
}

impl<F> fmt::Debug for Closure<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Closure")
    }
}

impl<F> Closure<F> {
    /// The closure as a service.
    pub fn new(f: F) -> Self {
        Closure(Arc::new(Mutex::new(f)))
    }
}

impl<F, Fut, T, E> Service<()> for Closure<F>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Response = T;
    type Error = BoxError;
    type Future = ClosureFuture<Fut>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: ()) -> Self::Future {
        // Held only while the closure makes its future, not while it runs.
        let mut f = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        ClosureFuture((*f)())
    }
}

/// The future of a [`Closure`]: the closure's own, its error boxed.
#[pin_project::pin_project]
pub struct ClosureFuture<Fut>(#[pin] Fut);

impl<Fut> fmt::Debug for ClosureFuture<Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClosureFuture")
    }
}

impl<Fut, T, E> Future for ClosureFuture<Fut>
where
    Fut: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().0.poll(cx).map(|r| r.map_err(Into::into))
    }
}

/// Runs `f` once through `layer` (one of ours, with its classifier, or a
/// `ServiceBuilder` stack of several): waits until the stack is ready, then
/// calls it.
///
/// # Errors
/// What the stack returns: the closure's error (boxed, perhaps after
/// retries), or a [`Rejected`](crate::Rejected) when a layer refused the call (the closure
/// was then not called).
///
/// Cancel safety: dropping the future drops the closure's running future
/// and whatever the layers hold (a permit, a probe slot), as for any call.
pub async fn run<L, F, T>(layer: &L, f: F) -> Result<T, BoxError>
where
    L: Layer<Closure<F>>,
    L::Service: Service<(), Response = T>,
    <L::Service as Service<()>>::Error: Into<BoxError>,
{
    let mut svc = layer.layer(Closure::new(f));
    poll_fn(|cx| svc.poll_ready(cx)).await.map_err(Into::into)?;
    svc.call(()).await.map_err(Into::into)
}
