//! Singleflight: identical calls while one is in flight wait for its answer
//! instead of calling again.
//!
//! The classroom scenario: 50 teachers ask for the same plan at once; the
//! first call goes upstream, the other 49 wait for it and get its answer —
//! one call paid, one place in the pacer, the bulkhead and the breaker.
//!
//! - **Which calls are the same**: a [`RequestKey`] (a closure
//!   `Fn(&Req) -> Option<K>`, or the LLM preset's
//!   [`LlmKey`](crate::llm::LlmKey)); `None` bypasses. Keys are compared with
//!   `Eq`, never trusted on a hash.
//! - **How the answer is shared**: a [`Share`] — [`Cloned`]
//!   by default, [`WholeResponse`](crate::share::WholeResponse) for
//!   `http::Response<Bytes>`. The caller whose call ran gets its answer as
//!   it came; the others get [`Share::give`]'s copy (marked
//!   [`Served::Coalesced`](crate::share::Served)).
//! - **Until when**: a call is in flight until the future of the caller
//!   whose call ran is dropped — a caller arriving after the answer came
//!   but before that future is dropped gets the same answer. A cache above
//!   stores the answer in that interval, so no identical call falls between
//!   the flight and the cache. (`.await` drops a future as it answers; one
//!   kept after its answer keeps its answer joinable.) An error is not
//!   given to callers arriving after it came: they call again.
//! - **Errors** from the upstream are shared too: every waiting caller gets
//!   the same error (a
//!   [`SharedError`] that displays as the
//!   original and has it as its `source`, so classifiers and
//!   [`Rejected::find`](crate::Rejected::find) see through it) — the caller
//!   whose call ran as well when anyone waited for it (alone, it gets the
//!   error as it came: walk `source()` rather than `downcast` the error
//!   itself); nothing is
//!   retried here. Put a retry layer *inside* this one (the LLM preset
//!   does) and the waiting callers ride along on the retries too — one
//!   retried call for all of them. A quota's refusal (`QuotaExceeded`) is
//!   not shared: it is a verdict on the caller it refused, keyed by who it
//!   is; a waiting caller then goes on with its own request.
//! - **Cancellation**: when the caller whose call runs drops it, the call is
//!   dropped (nothing else polls it) and one waiting caller takes over with
//!   its own request (its own service clone, polled ready); the others wait
//!   for that one. Nobody hangs, nobody gets an error for it.
//! - **Readiness**: `poll_ready` is always ready; a call that goes on polls a
//!   clone of the inner service ready in its future, and a caller that waits
//!   for another's answer never waits for (nor holds) the inner service's
//!   readiness — behind a busy `ConcurrencyLimit`, 5 identical calls are
//!   still one.
//!
//! Cost: one key, one short lock on a map (no allocation but the flight of
//! a call that runs).
//!
//! ```
//! use semaforo::coalesce::CoalesceLayer;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let c = calls.clone();
//! let upstream = service_fn(move |topic: String| {
//!     c.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         tokio::time::sleep(std::time::Duration::from_secs(1)).await;
//!         Ok::<_, std::io::Error>(format!("plan: {topic}"))
//!     }
//! });
//! // The key: the topic itself.
//! let svc = CoalesceLayer::new(|t: &String| Some(t.clone())).layer(upstream);
//! let answers = futures::future::join_all(
//!     (0..50).map(|_| svc.clone().oneshot("el ciclo del agua".to_string())),
//! )
//! .await;
//! assert!(answers.iter().all(|a| a.as_deref().ok() == Some("plan: el ciclo del agua")));
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! # }
//! ```

use crate::error::BoxError;
use crate::hashing::HashMap;
use crate::observe::{Event, EventKind, ListenerSlot, Observer, ShareOutcome};
use crate::share::{Cloned, RequestKey, Served, Share, SharedError};
use pin_project::pin_project;
use slab::Slab;
use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use tower_layer::Layer;
use tower_service::Service;

/// What a finished flight left for its followers: `Result<Kept, SharedError>`.
type Answer = Arc<dyn Any + Send + Sync>;

enum FlightState {
    Running {
        waiters: Slab<Option<Waker>>,
    },
    Done(Answer),
    /// The caller whose call ran dropped it: a follower takes over.
    Abandoned,
}

struct Flight {
    state: Mutex<FlightState>,
}

impl Flight {
    fn lock(&self) -> MutexGuard<'_, FlightState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins a running flight: `None` when it is not running.
    fn join(&self) -> Option<usize> {
        match &mut *self.lock() {
            FlightState::Running { waiters } => Some(waiters.insert(None)),
            _ => None,
        }
    }

    /// Ends the flight in `state` and wakes its followers.
    fn finish(&self, state: FlightState) {
        let old = std::mem::replace(&mut *self.lock(), state);
        if let FlightState::Running { waiters } = old {
            for w in waiters.into_iter().filter_map(|(_, w)| w) {
                w.wake();
            }
        }
    }

    fn followers(&self) -> usize {
        match &*self.lock() {
            FlightState::Running { waiters } => waiters.len(),
            _ => 0,
        }
    }
}

/// A key's call in flight: its id, and its flight once someone else
/// joined (a call nobody joins allocates nothing).
struct Slot {
    id: u64,
    flight: Option<Arc<Flight>>,
    /// Its answer came and the caller whose call ran still holds its
    /// future: a caller arriving now gets that answer (a cache above stores
    /// it before that future is dropped, so no caller falls between the
    /// flight's end and the cache).
    answered: bool,
}

fn running() -> Arc<Flight> {
    Arc::new(Flight {
        state: Mutex::new(FlightState::Running {
            waiters: Slab::new(),
        }),
    })
}

struct Flights<K> {
    map: Mutex<HashMap<K, Slot>>,
    next_id: std::sync::atomic::AtomicU64,
    obs: Observer,
}

impl<K: std::hash::Hash + Eq> Flights<K> {
    fn new(obs: Observer) -> Self {
        Flights {
            map: Mutex::new(HashMap::default()),
            next_id: std::sync::atomic::AtomicU64::new(0),
            obs,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Slot>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes `key`'s entry if it is still call `id`'s.
    fn forget(map: &mut HashMap<K, Slot>, key: &K, id: u64) {
        if map.get(key).is_some_and(|s| s.id == id) {
            map.remove(key);
        }
    }
}

/// Joins the flight of `key` or starts one.
enum Entry<K: std::hash::Hash + Eq> {
    Follow(Follow),
    Lead(Lead<K>),
}

/// `live` says whether a finished flight's answer can still be joined (a
/// stream being read), `takes` whether a caller joining now would take it
/// (see [`takes`]): an answer it would not take is never followed — it
/// would come back here, find the same answer and spin.
fn enter<K: std::hash::Hash + Eq + Clone>(
    flights: &Arc<Flights<K>>,
    key: K,
    live: impl Fn(&Answer) -> bool,
    takes: impl Fn(&Answer) -> bool,
) -> Entry<K> {
    use std::collections::hash_map::Entry as MapEntry;
    let mut map = flights.lock();
    let id = flights
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // One hash: the entry is looked up once.
    let mut occupied = match map.entry(key.clone()) {
        MapEntry::Vacant(v) => {
            v.insert(Slot {
                id,
                flight: None,
                answered: false,
            });
            drop(map);
            return Entry::Lead(Lead {
                flights: flights.clone(),
                key,
                id,
                finished: false,
                holds_slot: false,
            });
        }
        MapEntry::Occupied(o) => o,
    };
    {
        let slot = occupied.get_mut();
        // Joined under the map's lock: the leader's end (which takes the
        // map's lock first) sees every follower.
        let f = slot.flight.get_or_insert_with(running).clone();
        if let Some(w) = f.join() {
            return Entry::Follow(Follow {
                flight: f,
                slot: Some(w),
            });
        }
        let done = match &*f.lock() {
            FlightState::Done(a) => Some(a.clone()),
            _ => None,
        };
        if done
            .as_ref()
            .is_some_and(|a| takes(a) && (slot.answered || live(a)))
        {
            // Answered, its caller's future still held (or a stream still
            // joinable): its answer at once.
            return Entry::Follow(Follow {
                flight: f,
                slot: None,
            });
        }
    }
    // Finished and not joinable (or abandoned): a new call.
    occupied.insert(Slot {
        id,
        flight: None,
        answered: false,
    });
    drop(map);
    Entry::Lead(Lead {
        flights: flights.clone(),
        key,
        id,
        finished: false,
        holds_slot: false,
    })
}

/// The caller whose call runs: its flight ends when it does (or is
/// abandoned if it is dropped first).
struct Lead<K: std::hash::Hash + Eq> {
    flights: Arc<Flights<K>>,
    key: K,
    id: u64,
    finished: bool,
    /// The answered slot stays in the map until this is dropped.
    holds_slot: bool,
}

impl<K: std::hash::Hash + Eq + Clone + Send + Sync + 'static> Lead<K> {
    /// Ends the flight with `res`: the leader's own output, after keeping
    /// a copy for the callers that waited or come while this caller's
    /// future is held (a stream: while it can be joined).
    ///
    /// `finished` is set last: if the caller's code panics on the way (the
    /// answer's `clone` in `keep`), [`Lead`]'s drop abandons the flight and
    /// one waiting caller takes over — none hangs.
    fn finish<R, Sh: Share<R>>(
        &mut self,
        share: &Sh,
        res: Result<R, BoxError>,
    ) -> Result<Sh::Output, BoxError> {
        let mut map = self.flights.lock();
        let Some(slot) = map.get_mut(&self.key).filter(|s| s.id == self.id) else {
            // Not ours any more (cannot happen while this lead lives).
            self.finished = true;
            drop(map);
            return res.map(|r| share.pass(r));
        };
        let flight = slot.flight.get_or_insert_with(running).clone();
        let answer: Result<Sh::Kept, SharedError>;
        let out = match res {
            Ok(r) => {
                let (out, kept) = share.keep(r);
                answer = Ok(kept);
                Ok(out)
            }
            // Alone, or refused by a quota below (a verdict on this
            // caller, keyed by who it is, not an answer): the original
            // error to this caller; the others, if any, go on (one takes
            // over, the rest follow it).
            Err(e)
                if flight.followers() == 0
                    || crate::Rejected::find(e.as_ref())
                        .is_some_and(|r| r.kind().is_about_the_caller()) =>
            {
                map.remove(&self.key);
                self.finished = true;
                flight.finish(FlightState::Abandoned);
                return Err(e);
            }
            Err(e) => {
                let shared = SharedError::new(e);
                answer = Err(shared.clone());
                Err(Box::new(shared) as BoxError)
            }
        };
        // The callers waiting now get the whole answer, however much of
        // it this caller reads before they are polled.
        if let Ok(k) = &answer {
            share.reserve(k, flight.followers());
        }
        // A stream being read stays joinable: its entry goes when the
        // stream settles (ends, passes its replay buffer, or loses its
        // last reader). A whole answer stays until this caller's future is
        // dropped; an error goes now (a later caller calls again).
        let joinable = matches!(&answer, Ok(k) if share.joinable(k));
        let settle = match &answer {
            Ok(k) if joinable => Some(k.clone()),
            _ => None,
        };
        let held = answer.is_ok() && !share.late_joiners();
        if held {
            slot.answered = true;
        } else if !joinable {
            map.remove(&self.key);
        }
        flight.finish(FlightState::Done(Arc::new(answer)));
        self.finished = true;
        self.holds_slot = held;
        drop(map);
        if let Some(kept) = settle {
            let (flights, key, id) = (self.flights.clone(), self.key.clone(), self.id);
            share.on_settled(
                &kept,
                Box::new(move || {
                    let mut map = flights.lock();
                    Flights::forget(&mut map, &key, id);
                }),
            );
        }
        out
    }
}

impl<K: std::hash::Hash + Eq> Drop for Lead<K> {
    fn drop(&mut self) {
        if self.holds_slot {
            // Its answer was there for callers coming meanwhile: no more.
            let mut map = self.flights.lock();
            Flights::forget(&mut map, &self.key, self.id);
        } else if !self.finished {
            let mut map = self.flights.lock();
            let flight = map
                .get(&self.key)
                .filter(|s| s.id == self.id)
                .and_then(|s| s.flight.clone());
            Flights::forget(&mut map, &self.key, self.id);
            if let Some(f) = flight {
                f.finish(FlightState::Abandoned);
            }
        }
    }
}

/// A caller waiting for another's answer.
struct Follow {
    flight: Arc<Flight>,
    slot: Option<usize>,
}

impl Drop for Follow {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            if let FlightState::Running { waiters } = &mut *self.flight.lock() {
                waiters.try_remove(slot);
            }
        }
    }
}

/// The coalescing layer: see the [module docs](self).
#[must_use = "a layer does nothing until it wraps a service"]
pub struct CoalesceLayer<RK: RequestKey<Req>, Req, Sh = Cloned> {
    /// Passes every call on (a preset without coalescing).
    off: bool,
    key: RK,
    share: Sh,
    flights: Arc<Flights<RK::Key>>,
    _req: std::marker::PhantomData<fn(Req)>,
}

impl<RK: RequestKey<Req>, Req, Sh: Clone> Clone for CoalesceLayer<RK, Req, Sh> {
    fn clone(&self) -> Self {
        CoalesceLayer {
            off: self.off,
            key: self.key.clone(),
            share: self.share.clone(),
            flights: self.flights.clone(),
            _req: std::marker::PhantomData,
        }
    }
}

impl<RK: RequestKey<Req>, Req, Sh> fmt::Debug for CoalesceLayer<RK, Req, Sh> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceLayer")
            .field("name", &self.flights.obs.name)
            .field("in_flight", &self.flights.lock().len())
            .finish()
    }
}

impl<RK: RequestKey<Req>, Req> CoalesceLayer<RK, Req, Cloned> {
    /// Coalesces calls with equal keys (answers shared by cloning; see
    /// [`share`](Self::share)). Every service this layer makes, and their
    /// clones, share one set of calls in flight: two services of one layer
    /// with the same key share answers — give each its own layer (or keys
    /// of their own) when they call different things. A service answering
    /// another type under the same key never takes that answer: it calls on
    /// its own.
    pub fn new(key: RK) -> Self {
        CoalesceLayer {
            off: false,
            key,
            share: Cloned,
            flights: Arc::new(Flights::new(Observer::new(None, None))),
            _req: std::marker::PhantomData,
        }
    }
}

impl<RK: RequestKey<Req>, Req, Sh> CoalesceLayer<RK, Req, Sh> {
    /// How answers are shared (e.g. [`WholeResponse`](crate::share::WholeResponse)).
    pub fn share<Sh2>(self, share: Sh2) -> CoalesceLayer<RK, Req, Sh2> {
        CoalesceLayer {
            off: self.off,
            key: self.key,
            share,
            flights: self.flights,
            _req: std::marker::PhantomData,
        }
    }

    /// Names this layer in events. (Starts a new set of calls in flight:
    /// call it before making services.)
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        let listener = self.flights.obs.listener.clone();
        self.flights = Arc::new(Flights::new(Observer::new(Some(name.into()), listener)));
        self
    }

    /// Calls `f` for each event ([`EventKind::Shared`] with `Coalesced`,
    /// `TookOver`, `Bypassed`). Listeners add up. (Starts a new set of
    /// calls in flight: call it before making services.)
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        let mut slot = ListenerSlot(self.flights.obs.listener.clone());
        slot.set(f);
        self.flights = Arc::new(Flights::new(Observer::new(
            self.flights.obs.name.clone(),
            slot.0,
        )));
        self
    }

    /// A layer that passes every call on, untouched.
    #[cfg(feature = "llm")]
    pub(crate) fn off(mut self) -> Self {
        self.off = true;
        self
    }

    /// Calls in flight that others could join now.
    pub fn in_flight(&self) -> usize {
        self.flights.lock().len()
    }
}

impl<S, RK: RequestKey<Req>, Req, Sh: Clone> Layer<S> for CoalesceLayer<RK, Req, Sh> {
    type Service = CoalesceService<S, RK, Req, Sh>;

    fn layer(&self, inner: S) -> Self::Service {
        CoalesceService {
            off: self.off,
            inner,
            key: self.key.clone(),
            share: self.share.clone(),
            flights: self.flights.clone(),
        }
    }
}

/// The service made by [`CoalesceLayer`].
pub struct CoalesceService<S, RK: RequestKey<Req>, Req, Sh = Cloned> {
    off: bool,
    inner: S,
    key: RK,
    share: Sh,
    flights: Arc<Flights<RK::Key>>,
}

impl<S: Clone, RK: RequestKey<Req>, Req, Sh: Clone> Clone for CoalesceService<S, RK, Req, Sh> {
    fn clone(&self) -> Self {
        CoalesceService {
            off: self.off,
            inner: self.inner.clone(),
            key: self.key.clone(),
            share: self.share.clone(),
            flights: self.flights.clone(),
        }
    }
}

impl<S: fmt::Debug, RK: RequestKey<Req>, Req, Sh> fmt::Debug for CoalesceService<S, RK, Req, Sh> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceService")
            .field("inner", &self.inner)
            .field("name", &self.flights.obs.name)
            .finish()
    }
}

impl<S, RK, Req, Sh> Service<Req> for CoalesceService<S, RK, Req, Sh>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    RK: RequestKey<Req>,
    Sh: Share<S::Response>,
{
    type Response = Sh::Output;
    type Error = BoxError;
    type Future = CoalesceFuture<S, RK, Req, Sh>;

    /// Always ready (unless off): a caller that will wait for another's
    /// answer must not wait for the inner service's readiness; each call
    /// that goes on polls a clone of the inner service ready in its future.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.off {
            return self.inner.poll_ready(cx).map_err(Into::into);
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        if self.off {
            let fut = self.inner.call(req);
            return CoalesceFuture::new(self, State::Direct { fut });
        }
        let Some(key) = self.key.key(&req) else {
            self.flights.obs.emit_often(
                "coalesce",
                EventKind::Shared {
                    outcome: ShareOutcome::Bypassed,
                },
            );
            let svc = self.inner.clone();
            return CoalesceFuture::new(
                self,
                State::Ready {
                    svc,
                    req: Some(req),
                    lead: None,
                },
            );
        };
        self.key.remember(&mut req, &key);
        let share = &self.share;
        let state = match enter(
            &self.flights,
            key.clone(),
            |a| live::<S::Response, Sh>(share, a),
            |a| takes::<S::Response, Sh>(share, a),
        ) {
            Entry::Lead(lead) => State::Ready {
                svc: self.inner.clone(),
                req: Some(req),
                lead: Some(lead),
            },
            // This caller carries a clone in case it must take over.
            Entry::Follow(follow) => State::Follow {
                follow,
                svc: Some(self.inner.clone()),
                req: Some(req),
                key: Some(key),
            },
        };
        CoalesceFuture::new(self, state)
    }
}

#[pin_project(project = StateProj)]
enum State<S: Service<Req>, K: std::hash::Hash + Eq, Req> {
    Direct {
        #[pin]
        fut: S::Future,
    },
    Lead {
        #[pin]
        fut: S::Future,
        lead: Option<Lead<K>>,
    },
    /// Led and answered: the lead is kept (its answer joinable) until the
    /// future is dropped. Polled again, an error.
    Answered {
        lead: Option<Lead<K>>,
    },
    Follow {
        follow: Follow,
        svc: Option<S>,
        req: Option<Req>,
        key: Option<K>,
    },
    /// Getting its service ready, to lead a flight (or to call alone).
    Ready {
        svc: S,
        req: Option<Req>,
        lead: Option<Lead<K>>,
    },
    Done,
}

/// The future of [`CoalesceService`].
///
/// Cancel safety: dropping the caller whose call runs drops that call and
/// hands the flight to a waiting caller; dropping a waiting caller only
/// leaves.
#[pin_project]
pub struct CoalesceFuture<S: Service<Req>, RK: RequestKey<Req>, Req, Sh> {
    #[pin]
    state: State<S, RK::Key, Req>,
    share: Sh,
    flights: Arc<Flights<RK::Key>>,
}

impl<S: Service<Req>, RK: RequestKey<Req>, Req, Sh> fmt::Debug for CoalesceFuture<S, RK, Req, Sh> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Direct { .. } => "direct",
            State::Lead { .. } => "lead",
            State::Answered { .. } => "answered",
            State::Follow { .. } => "follow",
            State::Ready { .. } => "getting ready",
            State::Done => "done",
        };
        f.debug_struct("CoalesceFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S: Service<Req>, RK: RequestKey<Req>, Req, Sh: Clone> CoalesceFuture<S, RK, Req, Sh> {
    fn new(svc: &CoalesceService<S, RK, Req, Sh>, state: State<S, RK::Key, Req>) -> Self {
        CoalesceFuture {
            state,
            share: svc.share.clone(),
            flights: svc.flights.clone(),
        }
    }
}

impl<S, RK, Req, Sh> Future for CoalesceFuture<S, RK, Req, Sh>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    RK: RequestKey<Req>,
    Sh: Share<S::Response>,
{
    type Output = Result<Sh::Output, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Direct { fut } => {
                    let res = std::task::ready!(fut.poll(cx)).map_err(Into::into);
                    this.state.set(State::Done);
                    return Poll::Ready(res.map(|r| this.share.pass(r)));
                }
                StateProj::Lead { fut, lead } => {
                    let res = std::task::ready!(fut.poll(cx)).map_err(Into::into);
                    let Some(mut l) = lead.take() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(crate::error::polled_after_done("coalesce")));
                    };
                    let out = l.finish(this.share, res);
                    this.state.set(State::Answered { lead: Some(l) });
                    return Poll::Ready(out);
                }
                StateProj::Answered { .. } => {
                    return Poll::Ready(Err(crate::error::polled_after_done("coalesce")));
                }
                StateProj::Follow {
                    follow,
                    svc,
                    req,
                    key,
                } => {
                    let answer = {
                        let mut st = follow.flight.lock();
                        match &mut *st {
                            FlightState::Running { waiters } => {
                                match follow.slot.and_then(|s| waiters.get_mut(s)) {
                                    Some(w) => match w {
                                        Some(old) if old.will_wake(cx.waker()) => {}
                                        w => *w = Some(cx.waker().clone()),
                                    },
                                    None => {
                                        follow.slot =
                                            Some(waiters.insert(Some(cx.waker().clone())));
                                    }
                                }
                                return Poll::Pending;
                            }
                            FlightState::Done(a) => Some(a.clone()),
                            FlightState::Abandoned => None,
                        }
                    };
                    // Waiting when the answer came (its slot was still
                    // there): an answer was reserved for it.
                    let waited = follow.slot.take().is_some();
                    // A stream that can no longer be joined from its start is
                    // no answer for a caller that joined late: it goes on its own.
                    let given = answer.as_ref().and_then(|a| {
                        a.downcast_ref::<Result<Sh::Kept, SharedError>>()
                            .and_then(|r| match r {
                                Ok(kept) if waited => {
                                    Some(Ok(this.share.give_reserved(kept, Served::Coalesced)))
                                }
                                Ok(kept)
                                    if this.share.late_joiners() && !this.share.joinable(kept) =>
                                {
                                    None
                                }
                                Ok(kept) => Some(Ok(this.share.give(kept, Served::Coalesced))),
                                Err(e) => Some(Err(Box::new(e.clone()) as BoxError)),
                            })
                    });
                    if let Some(out) = given {
                        this.flights.obs.emit_often(
                            "coalesce",
                            EventKind::Shared {
                                outcome: ShareOutcome::Coalesced,
                            },
                        );
                        this.state.set(State::Done);
                        return Poll::Ready(out);
                    }
                    // Abandoned (or another service's answer under the same
                    // key): follow a newer flight, or take over.
                    let (Some(s), Some(r), Some(k)) = (svc.take(), req.take(), key.take()) else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(crate::error::polled_after_done("coalesce")));
                    };
                    let share = &*this.share;
                    match enter(
                        this.flights,
                        k.clone(),
                        |a| live::<S::Response, Sh>(share, a),
                        |a| takes::<S::Response, Sh>(share, a),
                    ) {
                        Entry::Follow(f) => this.state.set(State::Follow {
                            follow: f,
                            svc: Some(s),
                            req: Some(r),
                            key: Some(k),
                        }),
                        Entry::Lead(lead) => {
                            this.flights.obs.emit(
                                "coalesce",
                                EventKind::Shared {
                                    outcome: ShareOutcome::TookOver,
                                },
                            );
                            this.state.set(State::Ready {
                                svc: s,
                                req: Some(r),
                                lead: Some(lead),
                            });
                        }
                    }
                }
                StateProj::Ready { svc, req, lead } => {
                    let ready = std::task::ready!(svc.poll_ready(cx)).map_err(Into::into);
                    let Some(r) = req.take() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(crate::error::polled_after_done("coalesce")));
                    };
                    match (ready, lead.take()) {
                        (Ok(()), Some(l)) => {
                            let fut = svc.call(r);
                            this.state.set(State::Lead { fut, lead: Some(l) });
                        }
                        (Ok(()), None) => {
                            let fut = svc.call(r);
                            this.state.set(State::Direct { fut });
                        }
                        (Err(e), Some(mut l)) => {
                            let out = l.finish(this.share, Err(e));
                            this.state.set(State::Done);
                            return Poll::Ready(out);
                        }
                        (Err(e), None) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(e));
                        }
                    }
                }
                StateProj::Done => {
                    return Poll::Ready(Err(crate::error::polled_after_done("coalesce")))
                }
            }
        }
    }
}

/// Whether a finished flight's answer can still be joined.
fn live<R, Sh: Share<R>>(share: &Sh, a: &Answer) -> bool {
    a.downcast_ref::<Result<Sh::Kept, SharedError>>()
        .is_some_and(|r| matches!(r, Ok(k) if share.joinable(k)))
}

/// Whether a caller joining a finished flight now would take its answer:
/// one of its own service's type (another service of the same layer may
/// answer another type under the same key), and for a stream one it can
/// still read from its start. The same rule as a follower's when it finds
/// the answer (`given` in the `Follow` state).
fn takes<R, Sh: Share<R>>(share: &Sh, a: &Answer) -> bool {
    a.downcast_ref::<Result<Sh::Kept, SharedError>>()
        .is_some_and(|r| match r {
            Ok(k) => !share.late_joiners() || share.joinable(k),
            Err(_) => true,
        })
}

crate::inner_access!([S, RK: RequestKey<Req>, Req, Sh] CoalesceService<S, RK, Req, Sh>);
