//! Where a fallback answer comes from: a value, a closure, a service, the
//! cache's last good answer.

use super::{Failure, ReadyAnswer, Source};
use crate::error::BoxError;
use pin_project::pin_project;
use std::fmt;
use std::future::{ready, Future};
use std::pin::Pin;
use std::task::{Context, Poll};
use tower_service::Service;

/// A fixed answer, cloned for each fallback (see [`value`]).
#[derive(Debug, Clone)]
pub struct Value<T>(T);

/// Answers every accepted failure with a clone of `v` (keep it cheap to
/// clone: `Bytes`, an `Arc`, a short `String`).
pub fn value<T: Clone + Send + Sync + 'static>(v: T) -> Value<T> {
    Value(v)
}

impl<Req, T: Clone + Send + Sync + 'static> Source<Req, T> for Value<T> {
    type Memo = ();
    type Future = ReadyAnswer<T>;

    fn memo(&self, _: &mut Req) -> Option<()> {
        Some(())
    }

    fn answer(&self, _: (), _: &Failure<'_>) -> Self::Future {
        ready(Ok(self.0.clone()))
    }
}

/// An answer made by a closure from the failure (see [`from_fn`]).
#[derive(Clone)]
pub struct FromFn<F>(F);

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FromFn")
    }
}

/// Answers with `f(&failure)`; an `Err` from it is a failed fallback (the
/// caller gets the original result).
pub fn from_fn<F, Res>(f: F) -> FromFn<F>
where
    F: Fn(&Failure<'_>) -> Result<Res, BoxError> + Send + Sync + 'static,
{
    FromFn(f)
}

impl<Req, Res, F> Source<Req, Res> for FromFn<F>
where
    F: Fn(&Failure<'_>) -> Result<Res, BoxError> + Send + Sync + 'static,
{
    type Memo = ();
    type Future = ReadyAnswer<Res>;

    fn memo(&self, _: &mut Req) -> Option<()> {
        Some(())
    }

    fn answer(&self, _: (), failure: &Failure<'_>) -> Self::Future {
        ready((self.0)(failure))
    }
}

/// Another service, called with a clone of the request (see [`service`]).
#[derive(Debug, Clone)]
pub struct ServiceSource<S>(S);

/// Answers from `svc` (a clone of it per fallback, polled ready, called with
/// a clone of the request kept from before the inner call: `Req: Clone`).
pub fn service<S>(svc: S) -> ServiceSource<S> {
    ServiceSource(svc)
}

impl<S, Req, Res> Source<Req, Res> for ServiceSource<S>
where
    S: Service<Req, Response = Res> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    Req: Clone,
{
    type Memo = Req;
    type Future = ServiceAnswer<S, Req>;

    fn memo(&self, req: &mut Req) -> Option<Req> {
        Some(req.clone())
    }

    fn answer(&self, req: Req, _: &Failure<'_>) -> Self::Future {
        ServiceAnswer {
            state: Call::Ready {
                svc: self.0.clone(),
                req: Some(req),
            },
        }
    }
}

#[pin_project(project = CallProj)]
enum Call<S: Service<Req>, Req> {
    Ready {
        svc: S,
        req: Option<Req>,
    },
    Calling(#[pin] S::Future),
    /// Answered (or failed to get ready): polled again, an error.
    Done,
}

/// The fallback call of a [`ServiceSource`]: the service polled ready, then
/// called. Cancel safety: dropping it drops the call.
#[pin_project]
pub struct ServiceAnswer<S: Service<Req>, Req> {
    #[pin]
    state: Call<S, Req>,
}

impl<S: Service<Req>, Req> fmt::Debug for ServiceAnswer<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServiceAnswer")
    }
}

impl<S, Req> Future for ServiceAnswer<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let out = match this.state.as_mut().project() {
                CallProj::Done => {
                    return Poll::Ready(Err(crate::error::polled_after_done("fallback service")))
                }
                CallProj::Ready { svc, req } => match std::task::ready!(svc.poll_ready(cx)) {
                    Err(e) => Err(e.into()),
                    Ok(()) => {
                        let Some(req) = req.take() else {
                            this.state.set(Call::Done);
                            continue;
                        };
                        let fut = svc.call(req);
                        this.state.set(Call::Calling(fut));
                        continue;
                    }
                },
                CallProj::Calling(fut) => std::task::ready!(fut.poll(cx)).map_err(Into::into),
            };
            this.state.set(Call::Done);
            return Poll::Ready(out);
        }
    }
}

#[cfg(feature = "cache")]
pub use stale_source::{stale, Stale};

#[cfg(feature = "cache")]
mod stale_source {
    use super::*;
    use crate::cache::Cache;
    use crate::share::{RequestKey, Served, Share};
    use std::hash::Hash;

    /// The last good answer for the same request (see [`stale`]).
    pub struct Stale<RK, K, V, Sh> {
        cache: Cache<K, V>,
        key: RK,
        share: Sh,
    }

    impl<RK: Clone, K, V, Sh: Clone> Clone for Stale<RK, K, V, Sh> {
        fn clone(&self) -> Self {
            Stale {
                cache: self.cache.clone(),
                key: self.key.clone(),
                share: self.share.clone(),
            }
        }
    }

    impl<RK, K, V, Sh> fmt::Debug for Stale<RK, K, V, Sh> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Stale")
        }
    }

    /// Answers with what `cache` keeps for the request's key — fresh or
    /// past its TTL (within the cache's
    /// [`stale_for`](crate::cache::CacheBuilder::stale_for)) — handed out by
    /// `share` marked [`Served::Cache`] with its age and `stale: true` when
    /// past its TTL. Give the cache's own key and share (the LLM preset's
    /// [`LlmKey`](crate::llm::LlmKey) and
    /// [`WholeResponse`](crate::share::WholeResponse)). No entry: the
    /// fallback fails and the caller gets the original result.
    ///
    /// The key is computed before the inner call (the LLM key is left in
    /// the request's extensions, so the cache inside reads it instead of
    /// computing it again).
    pub fn stale<RK, K, V, Sh>(cache: &Cache<K, V>, key: RK, share: Sh) -> Stale<RK, K, V, Sh> {
        Stale {
            cache: cache.clone(),
            key,
            share,
        }
    }

    impl<Req, Res, RK, K, V, Sh> Source<Req, Res> for Stale<RK, K, V, Sh>
    where
        RK: RequestKey<Req, Key = K>,
        K: Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
        Sh: Share<Res, Kept = V, Output = Res>,
    {
        type Memo = K;
        type Future = ReadyAnswer<Res>;

        fn memo(&self, req: &mut Req) -> Option<K> {
            let key = self.key.key(req)?;
            self.key.remember(req, &key);
            Some(key)
        }

        fn answer(&self, key: K, _: &Failure<'_>) -> Self::Future {
            ready(match self.cache.stale(&key) {
                Some((kept, age)) => Ok(self.share.give(
                    &kept,
                    Served::Cache {
                        age,
                        stale: age >= self.cache.ttl(),
                    },
                )),
                None => Err("fallback: no answer kept for this request".into()),
            })
        }
    }
}
