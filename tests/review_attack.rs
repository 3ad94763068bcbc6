//! A review of suspected defects, one test (or two) each, written to fail
//! while the defect was there: a router re-asking deployments that refused
//! for longer than its deadline, a quota's global refusal hiding the key's
//! wait, adaptive limit changes told out of order, a keyed pacer's outlook
//! ignoring the place a sweep would free. Public API only, paused time.
#![allow(clippy::type_complexity)]

use semaforo::bulkhead::{Aimd, Bulkhead};
use semaforo::classify::{classify_error, Class, ClassError};
use semaforo::observe::EventKind;
use semaforo::pace::{Cost, KeyedPace, Pace};
use semaforo::quota::{Quota, Rate, RateLimit};
use semaforo::route::{Deployment, Router};
use semaforo::{BoxError, RejectKind, Rejected};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, ServiceExt};

type Svc = BoxCloneSyncService<u64, &'static str, BoxError>;

/// A client answering its name at once; counts calls.
fn ok_client(name: &'static str, calls: Arc<AtomicUsize>) -> Svc {
    BoxCloneSyncService::new(service_fn(move |_n: u64| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(name) }
    }))
}

/// Spends `n` tokens of `pace` now.
async fn spend(pace: &Pace, n: u64) {
    pace.layer()
        .weigh(|n: &u64| Cost::tokens(*n))
        .layer(service_fn(|n: u64| async move { Ok::<_, BoxError>(n) }))
        .oneshot(n)
        .await
        .unwrap();
}

/// Counts the router's `Routed` events (attempts sent).
fn count_routed(n: Arc<AtomicUsize>) -> impl Fn(&semaforo::observe::Event<'_>) + Send + Sync {
    move |e| {
        if matches!(e.kind, EventKind::Routed { .. }) {
            n.fetch_add(1, Ordering::SeqCst);
        }
    }
}

// ---------------------------------------------------------------------------
// 1. route: "router deadline < budget retry_after"
// ---------------------------------------------------------------------------

/// Both deployments' pacers (max_wait 5 s) would start a 3,000-token call
/// only in 30 s; the router's deadline is 10 s. Expected: a prompt refusal
/// with a retry_after (not a Timeout, no waiting).
#[tokio::test(start_paused = true)]
async fn router_deadline_pacer_refusal_is_prompt_with_retry_after() {
    let c = Arc::new(AtomicUsize::new(0));
    let mk = |name: &'static str| {
        let p = Pace::builder()
            .tokens_per_minute(6_000)
            .max_wait(Duration::from_secs(5))
            .build()
            .unwrap();
        let svc = BoxCloneSyncService::new(
            p.layer()
                .weigh(|n: &u64| Cost::tokens(*n))
                .layer(ok_client(name, c.clone())),
        );
        (Deployment::new(name, svc).pace(p.clone()), p)
    };
    let (a, pa) = mk("a");
    let (b, pb) = mk("b");
    spend(&pa, 6_000).await;
    spend(&pb, 6_000).await;
    let router = Router::builder()
        .deployment(a)
        .deployment(b)
        .weigh(|n: &u64| Cost::tokens(*n))
        .deadline(Duration::from_secs(10))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let err = router.oneshot(3_000).await.unwrap_err();
    let took = t0.elapsed();
    let r = Rejected::from_box(&err).expect("a refusal");
    println!("router (pacer refusal): {r} after {took:?}");
    assert_eq!(took, Duration::ZERO, "not prompt");
    assert_ne!(r.kind(), RejectKind::Timeout);
    let ra = r.retry_after().expect("a retry_after");
    // The pacer itself would say 25 s (30 s − max_wait); the router's own
    // "exact" is the start, 30 s. Either is fine; nothing else is.
    assert!(
        ra >= Duration::from_secs(25) && ra <= Duration::from_secs(30),
        "retry_after {ra:?}"
    );
    assert_eq!(c.load(Ordering::SeqCst), 0);
}

/// Both deployments answer 429 with Retry-After 60 s; the deadline is 10 s.
/// Expected: the 429 comes back at once (its 60 s kept), not a Timeout.
#[tokio::test(start_paused = true)]
async fn router_deadline_throttled_answers_come_back_at_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let throttled = |calls: Arc<AtomicUsize>| -> Svc {
        BoxCloneSyncService::new(service_fn(move |_n: u64| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                Err::<&'static str, BoxError>(
                    ClassError::new(
                        Class::Throttled {
                            retry_after: Some(Duration::from_secs(60)),
                        },
                        "429",
                    )
                    .into(),
                )
            }
        }))
    };
    let router = Router::builder()
        .deployment(Deployment::new("a", throttled(calls.clone())))
        .deployment(Deployment::new("b", throttled(calls.clone())))
        .max_attempts(10)
        .deadline(Duration::from_secs(10))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let err = router.oneshot(1).await.unwrap_err();
    let took = t0.elapsed();
    let class = classify_error(err.as_ref());
    println!("router (429s): {err} class {class:?} after {took:?}, calls {calls:?}");
    assert_eq!(took, Duration::ZERO, "not prompt");
    assert!(
        Rejected::from_box(&err).is_none_or(|r| r.kind() != RejectKind::Timeout),
        "a Timeout hides the Retry-After"
    );
    assert!(
        class
            .retry_after()
            .is_some_and(|ra| ra >= Duration::from_secs(59)),
        "class {class:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "each deployment once");
}

/// Each deployment's own layer (a `RateLimit`, 1 a minute, spent) refuses
/// with `QuotaExceeded` and a retry_after of ~60 s; the router's deadline is
/// 10 s (max_attempts 10). Expected: the refusal comes back at once, each
/// deployment asked once — nothing can succeed before the deadline. A
/// demanding user (and the router's own backoff docs: "never before that
/// deployment's own Retry-After") expects the refusal's retry_after to hold
/// the deployment back.
#[tokio::test(start_paused = true)]
async fn router_deadline_deployment_refusal_retry_after_is_honoured() {
    let calls = Arc::new(AtomicUsize::new(0));
    let routed = Arc::new(AtomicUsize::new(0));
    let mk = |name: &'static str| {
        let rl = RateLimit::builder(Rate::per_minute(1).burst(1))
            .build()
            .unwrap();
        rl.try_take().unwrap(); // spent for 60 s
        let svc: Svc = BoxCloneSyncService::new(
            tower::ServiceBuilder::new()
                .map_err(Into::<BoxError>::into)
                .layer(rl.layer())
                .service(ok_client(name, calls.clone())),
        );
        Deployment::new(name, svc)
    };
    let router = Router::builder()
        .deployment(mk("a"))
        .deployment(mk("b"))
        .max_attempts(10)
        .deadline(Duration::from_secs(10))
        .on_event(count_routed(routed.clone()))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let res = router.oneshot(1).await;
    let took = t0.elapsed();
    let err = res.unwrap_err();
    let r = Rejected::from_box(&err);
    println!(
        "router (deployment refusals): {err} after {took:?}, attempts sent {}",
        routed.load(Ordering::SeqCst)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let r = r.expect("a refusal");
    assert_ne!(
        r.kind(),
        RejectKind::Timeout,
        "a Timeout hides the retry_after"
    );
    assert!(
        r.retry_after()
            .is_some_and(|ra| ra >= Duration::from_secs(45)),
        "retry_after {:?}",
        r.retry_after()
    );
    assert_eq!(
        routed.load(Ordering::SeqCst),
        2,
        "deployments that said 'not for ~60 s' were asked again within a 10 s deadline \
         (took {took:?})"
    );
    assert!(took < Duration::from_secs(1), "waited {took:?} for nothing");
}

// ---------------------------------------------------------------------------
// 2. quota: "quota global refusal hides plan wait"
// ---------------------------------------------------------------------------

/// Plan 1 a minute per key, global 1 a second. "ana" calls once (admitted),
/// then again at once: the global limit refuses (look first), saying 1 s —
/// but ana's plan needs 60 s. Retrying after that retry_after is refused again.
#[tokio::test(start_paused = true)]
async fn quota_global_refusal_accounts_for_the_plan_wait() {
    let quota = Quota::builder()
        .plan("free", Rate::per_minute(1).burst(1))
        .global(Rate::per_second(1).burst(1))
        .build::<&'static str>()
        .unwrap();
    let free = quota.plan_id("free").unwrap();
    let api = tower::ServiceBuilder::new()
        .layer(quota.layer(move |u: &&'static str| (*u, free)))
        .service(service_fn(|_: &'static str| async {
            Ok::<_, std::io::Error>("ok")
        }));
    api.clone().oneshot("ana").await.unwrap();
    let err = api.clone().oneshot("ana").await.unwrap_err();
    let r = Rejected::from_box(&err).unwrap();
    let ra = r.retry_after().unwrap();
    println!("quota: first refusal {r} (retry_after {ra:?})");
    tokio::time::sleep(ra).await;
    let again = api.clone().oneshot("ana").await;
    if let Err(e) = &again {
        println!(
            "quota: after waiting {ra:?}, refused again: {e} ({:?})",
            Rejected::from_box(e).and_then(|r| r.retry_after())
        );
    }
    assert!(
        ra >= Duration::from_secs(59),
        "retry_after {ra:?}: the key's plan needs ~60 s, the caller comes back too early"
    );
    assert!(again.is_ok());
}

// ---------------------------------------------------------------------------
// 5. adaptive: "LimitChanged order"
// ---------------------------------------------------------------------------

/// Two limit changes on two threads: 10 → 8 (thread A) then 8 → 6 (main).
/// Thread A is slow between setting the limit and telling its listeners (a
/// first listener that takes its time — any preemption does the same). A
/// second listener, which keeps "the limit" from the events (as the
/// `semaforo_adaptive_limit` gauge does), ends on 8 while the limit is 6.
#[test]
fn adaptive_limit_changed_events_arrive_in_order() {
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let entered_tx = Mutex::new(entered_tx);
    let first = AtomicBool::new(true);
    let log: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let log2 = log.clone();
    let bulkhead = Bulkhead::builder(10)
        .limit(Aimd::new())
        .max_queue(10)
        .on_event(move |e| {
            if let EventKind::LimitChanged { .. } = e.kind {
                if first.swap(false, Ordering::SeqCst) {
                    entered_tx.lock().unwrap().send(()).unwrap();
                    let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(5));
                }
            }
        })
        .on_event(move |e| {
            if let EventKind::LimitChanged { from, to, .. } = e.kind {
                log2.lock().unwrap().push((from, to));
            }
        })
        .build()
        .unwrap();
    let b2 = bulkhead.clone();
    let a = std::thread::spawn(move || b2.set_max_concurrent(8));
    entered_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("thread A's event reached its first listener");
    bulkhead.set_max_concurrent(6);
    go_tx.send(()).unwrap();
    a.join().unwrap();
    let seen = log.lock().unwrap().clone();
    let limit = bulkhead.snapshot().limit;
    println!("adaptive: events in delivery order {seen:?}; limit now {limit}");
    assert_eq!(
        seen.last().map(|(_, to)| *to),
        Some(limit),
        "the last LimitChanged says {:?}, the limit is {limit}",
        seen.last()
    );
    assert!(
        seen.windows(2).all(|w| w[0].1 == w[1].0),
        "events out of order: {seen:?}"
    );
}

// ---------------------------------------------------------------------------
// 6. route: "outlook_at vs pick sweep"
// ---------------------------------------------------------------------------

type KReq = (Option<&'static str>, u64);
type KSvc = BoxCloneSyncService<KReq, &'static str, BoxError>;

/// Deployment "a": a `KeyedPace` (6,000 TPM per key, max_keys 1) whose one
/// place is held by an idle key "k1", and whose overflow pacer is spent by
/// keyless calls (3,000 tokens in 30 s there). A call for key "k2" would
/// sweep "k1" away and get a fresh pacer: it starts now. Deployment "b"
/// starts it in 20 s. Expected: "a", at once. The router (and
/// `KeyedPace::start_for`) reads the overflow pacer instead.
#[tokio::test(start_paused = true)]
async fn router_outlook_matches_the_pacer_the_call_gets() {
    let kp = KeyedPace::builder(Pace::builder().tokens_per_minute(6_000))
        .max_keys(1)
        .build()
        .unwrap();
    let key = |r: &KReq| r.0.map(String::from);
    let client = |name: &'static str| -> KSvc {
        BoxCloneSyncService::new(service_fn(move |_r: KReq| async move {
            Ok::<_, BoxError>(name)
        }))
    };
    let a_svc: KSvc = BoxCloneSyncService::new(
        kp.layer()
            .key(key)
            .weigh(|r: &KReq| Cost::tokens(r.1))
            .layer(client("a")),
    );
    // "k1" takes the one place, idle; keyless calls spend the overflow.
    drop(kp.get(Some("k1")));
    assert_eq!(kp.keys(), vec!["k1".to_string()]);
    a_svc.clone().oneshot((None, 6_000)).await.unwrap();

    let pb = Pace::builder().tokens_per_minute(6_000).build().unwrap();
    spend(&pb, 5_000).await;
    let b_svc: KSvc = BoxCloneSyncService::new(
        pb.layer()
            .weigh(|r: &KReq| Cost::tokens(r.1))
            .layer(client("b")),
    );
    let now = Instant::now();
    let told = kp
        .start_for(Some("k2"), &Cost::tokens(3_000))
        .map(|at| at.saturating_duration_since(now));
    println!("router outlook: KeyedPace::start_for(k2) says {told:?}");

    let router = Router::builder()
        .deployment(Deployment::new("a", a_svc.clone()).pace(kp.clone()))
        .deployment(Deployment::new("b", b_svc).pace(pb.clone()))
        .weigh(|r: &KReq| Cost::tokens(r.1))
        .key(key)
        .build()
        .unwrap();
    let t0 = Instant::now();
    let got = router.oneshot((Some("k2"), 3_000)).await.unwrap();
    let took = t0.elapsed();
    println!(
        "router outlook: routed to {got:?} after {took:?}; keys now {:?}",
        kp.keys()
    );
    // What "a" really does with the call: a fresh pacer for k2, at once.
    let t1 = Instant::now();
    let direct = a_svc.clone().oneshot((Some("k3"), 3_000)).await.unwrap();
    println!(
        "router outlook: the same call sent to 'a' directly (key k3): {direct:?} after {:?}",
        t1.elapsed()
    );
    assert_eq!(
        (got, took),
        ("a", Duration::ZERO),
        "the router waited {took:?} on '{got}' (start_for said {told:?})"
    );
}

/// A listener that changes the limit itself while told of a change: no
/// deadlock, and its change is told after the one it was told of.
#[test]
fn adaptive_a_listener_changing_the_limit_is_told_in_order() {
    let me: Arc<std::sync::OnceLock<Bulkhead>> = Arc::default();
    let me2 = me.clone();
    let log: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let log2 = log.clone();
    let bulkhead = Bulkhead::builder(10)
        .limit(Aimd::new())
        .max_queue(10)
        .on_event(move |e| {
            if let EventKind::LimitChanged { from, to, .. } = e.kind {
                log2.lock().unwrap().push((from, to));
                if to == 8 {
                    if let Some(b) = me2.get() {
                        b.set_max_concurrent(5);
                    }
                }
            }
        })
        .build()
        .unwrap();
    me.set(bulkhead.clone()).ok();
    bulkhead.set_max_concurrent(8);
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen, vec![(10, 8), (8, 5)]);
    assert_eq!(bulkhead.snapshot().limit, 5);
}
