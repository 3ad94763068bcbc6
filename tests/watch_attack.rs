//! An outside attack on "starts recorded only once a line watches"
//! (`EtaSource::watch`): a pacer (`Pace`, `KeyedPace`) records the instants
//! its calls start only once a bulkhead is wired to it, or after a first
//! projection. Public API only.

use semaforo::bulkhead::{Bulkhead, QueueTicket, TicketStatus};
use semaforo::eta::{EtaSource, Projection};
use semaforo::pace::{Cost, KeyedPace, Limit, Pace, Unit};
use semaforo::BoxError;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};

const MS: Duration = Duration::from_millis(1);

/// A request: its key (model), how long the upstream works on it, its ticket.
#[derive(Debug, Clone)]
struct R {
    key: Option<String>,
    work: Duration,
    ticket: QueueTicket,
}

fn req(key: Option<&str>, work: Duration) -> R {
    R {
        key: key.map(str::to_owned),
        work,
        ticket: QueueTicket::new(),
    }
}

type Log = Arc<Mutex<Vec<(Option<String>, Instant)>>>;
type Svc = BoxCloneService<R, (), BoxError>;

fn upstream(
    log: Log,
) -> impl tower::Service<R, Response = (), Error = std::io::Error, Future = impl Send> + Clone + Send
{
    tower::service_fn(move |r: R| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push((r.key.clone(), Instant::now()));
            tokio::time::sleep(r.work).await;
            Ok::<_, std::io::Error>(())
        }
    })
}

/// bulkhead (tickets) → pace → upstream.
fn through_pace(bulkhead: &Bulkhead, pace: &Pace, log: Log) -> Svc {
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(bulkhead.layer().ticket(|r: &R| Some(r.ticket.clone())))
            .layer(pace.layer().weigh(|_: &R| Cost::requests(1)))
            .service(upstream(log)),
    )
}

/// bulkhead (tickets) → keyed pace → upstream.
fn through_keyed(bulkhead: &Bulkhead, keyed: &KeyedPace, log: Log) -> Svc {
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(bulkhead.layer().ticket(|r: &R| Some(r.ticket.clone())))
            .layer(
                keyed
                    .layer()
                    .key(|r: &R| r.key.clone())
                    .weigh(|_: &R| Cost::requests(1)),
            )
            .service(upstream(log)),
    )
}

/// A keyed pace alone (no bulkhead) → upstream.
fn keyed_only(keyed: &KeyedPace, log: Log) -> Svc {
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(
                keyed
                    .layer()
                    .key(|r: &R| r.key.clone())
                    .weigh(|_: &R| Cost::requests(1)),
            )
            .service(upstream(log)),
    )
}

/// One request every 10 s, burst 1.
fn slow_pace() -> Pace {
    Pace::builder()
        .limit(Limit::new(Unit::Requests, 1, Duration::from_secs(10)))
        .max_wait(Duration::from_secs(600))
        .build()
        .unwrap()
}

fn generous() -> semaforo::pace::PaceBuilder {
    Pace::builder().requests_per_minute(600_000)
}

fn bulkhead(n: u32, service: Duration) -> Bulkhead {
    Bulkhead::builder(n)
        .max_queue(100)
        .expected_service_time(service)
        .build()
        .unwrap()
}

fn eta(t: &QueueTicket) -> Duration {
    match t.status() {
        TicketStatus::Waiting(s) => s.eta.expect("an ETA"),
        other => panic!("not waiting: {other:?}"),
    }
}

/// Polls the tickets every 10 ms until each is admitted; the instants.
async fn admitted_at(tickets: &[QueueTicket]) -> Vec<Instant> {
    let mut at = vec![None; tickets.len()];
    let deadline = Instant::now() + Duration::from_secs(600);
    while at.iter().any(Option::is_none) {
        assert!(Instant::now() < deadline, "never admitted");
        for (i, t) in tickets.iter().enumerate() {
            if at[i].is_none() && !matches!(t.status(), TicketStatus::Waiting(_)) {
                at[i] = Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    at.into_iter().map(Option::unwrap).collect()
}

fn spawn(svc: &Svc, r: R) -> tokio::task::JoinHandle<Result<(), BoxError>> {
    tokio::spawn(svc.clone().oneshot(r))
}

fn assert_sorted(s: &[Instant], what: &str) {
    assert!(
        s.windows(2).all(|w| w[0] <= w[1]),
        "{what}: not in order: {s:?}"
    );
}

/// 1. Wired before any call: the ETAs are exact (the pacer decides) and
///    never earlier than the permit really frees.
#[tokio::test(start_paused = true)]
async fn pace_wired_before_calls_etas_exact_and_not_early() {
    let service = Duration::from_secs(3);
    let pace = slow_pace();
    let b = bulkhead(2, service);
    b.set_eta_source(Some(Arc::new(pace.clone())));
    let log = Log::default();
    let svc = through_pace(&b, &pace, log.clone());
    let t0 = Instant::now();
    let reqs: Vec<R> = (0..4).map(|_| req(None, service)).collect();
    let tickets: Vec<QueueTicket> = reqs.iter().map(|r| r.ticket.clone()).collect();
    let mut tasks = Vec::new();
    for r in reqs {
        tasks.push(spawn(&svc, r));
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = Instant::now();
    assert_eq!(pace.projection(now).started(), [t0], "call 1's start");
    // Call 1 runs 0–3 s; call 2 holds a permit, waits in the pacer until 10 s
    // (runs to 13 s); call 3 is admitted at 3 s (starts at 20 s), call 4 at 13 s.
    let (e3, e4) = (eta(&tickets[2]), eta(&tickets[3]));
    let at = admitted_at(&tickets[2..]).await;
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let real3 = at[0] - now;
    let real4 = at[1] - now;
    println!("eta3 {e3:?} real {real3:?}; eta4 {e4:?} real {real4:?}");
    assert_eq!(e3, Duration::from_millis(2_500));
    assert_eq!(e4, Duration::from_millis(12_500));
    // Polled every 10 ms: the real admission is at most 10 ms after the poll.
    assert!(e3 + 10 * MS >= real3 && e4 + 10 * MS >= real4);
    let starts: Vec<Instant> = log.lock().unwrap().iter().map(|l| l.1).collect();
    assert_eq!(
        pace.projection(Instant::now()).started(),
        &starts[..],
        "every start recorded, in order"
    );
}

/// 2. Wired after calls already started: the calls before the wiring are not
///    seen, so the ETA is later than exact, never earlier; calls after the
///    wiring are seen (exact again).
#[tokio::test(start_paused = true)]
async fn pace_wired_after_calls_never_early_then_exact() {
    let service = Duration::from_secs(3);
    let pace = slow_pace();
    let b = bulkhead(2, service);
    let log = Log::default();
    let svc = through_pace(&b, &pace, log.clone());
    let t0 = Instant::now();
    let reqs: Vec<R> = (0..4).map(|_| req(None, service)).collect();
    let tickets: Vec<QueueTicket> = reqs.iter().map(|r| r.ticket.clone()).collect();
    let mut tasks = Vec::new();
    for r in reqs {
        tasks.push(spawn(&svc, r));
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.set_eta_source(Some(Arc::new(pace.clone())));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Call 1 (started at 0 before the wiring) is unseen: assumed to end one
    // service time from now (4 s), really at 3 s.
    let e3 = eta(&tickets[2]);
    assert!(
        pace.projection(Instant::now()).started().is_empty(),
        "the start before the wiring is not seen"
    );
    assert_eq!(e3, service, "conservative: now + service");
    assert!(
        e3 >= Duration::from_secs(2),
        "never earlier than the real 2 s"
    );
    // At 11 s: call 2 started at 10 s (after the wiring: seen), call 3 holds
    // a permit and waits in the pacer (starts at 20 s); call 4's permit frees
    // at 13 s.
    tokio::time::sleep_until(t0 + Duration::from_secs(11)).await;
    assert_eq!(
        pace.projection(Instant::now()).started(),
        [t0 + Duration::from_secs(10)]
    );
    let e4 = eta(&tickets[3]);
    let at = admitted_at(&tickets[3..]).await;
    let real4 = at[0] - (t0 + Duration::from_secs(11));
    println!("eta4 {e4:?} real {real4:?}");
    assert_eq!(e4, Duration::from_secs(2));
    assert!(e4 + 10 * MS >= real4);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let _ = log;
}

/// 3. A keyed pacer wired before calls records every key's starts: a given
///    key, keys built from the template after the wiring, keys past
///    `max_keys` (the overflow pacer), no key, and a key rebuilt after a sweep.
#[tokio::test(start_paused = true)]
async fn keyed_wired_records_given_built_overflow_and_swept_keys() {
    // 600 a minute: a key's pacer is not idle (swept) for 0.1 s after a call.
    let keyed = KeyedPace::builder(Pace::builder().requests_per_minute(600))
        .key("g", generous())
        .shared(Pace::builder().requests_per_minute(6_000_000))
        .max_keys(2)
        .build()
        .unwrap();
    let b = bulkhead(8, Duration::from_secs(1));
    b.set_eta_source(Some(Arc::new(keyed.clone())));
    let log = Log::default();
    let svc = through_keyed(&b, &keyed, log.clone());
    for k in [Some("g"), Some("a"), Some("b"), Some("c"), None, Some("a")] {
        svc.clone().oneshot(req(k, MS)).await.unwrap();
        tokio::time::advance(MS).await;
    }
    let keys = keyed.keys();
    println!("keys {keys:?}");
    assert!(
        !keys.contains(&"c".to_string()),
        "c went to the overflow pacer"
    );
    let starts: Vec<Instant> = log.lock().unwrap().iter().map(|l| l.1).collect();
    let seen = keyed.projection(Instant::now()).started().to_vec();
    assert_sorted(&seen, "keyed");
    assert_eq!(seen, starts, "every key's start, the overflow's too");
    assert_eq!(
        keyed.overflow().projection(Instant::now()).started().len(),
        2,
        "c and no key"
    );
    assert_eq!(
        keyed
            .peek("a")
            .unwrap()
            .projection(Instant::now())
            .started()
            .len(),
        2
    );
    // A sweep forgets idle keys; a key built in a freed place records too.
    tokio::time::advance(Duration::from_secs(5)).await;
    svc.clone()
        .oneshot(req(Some("d"), Duration::ZERO))
        .await
        .unwrap();
    let keys = keyed.keys();
    println!("after the sweep: keys {keys:?}");
    if keys.contains(&"d".to_string()) {
        assert_eq!(
            keyed
                .peek("d")
                .unwrap()
                .projection(Instant::now())
                .started()
                .len(),
            1,
            "a key built after a sweep records"
        );
    }
    let all = keyed.projection(Instant::now()).started().to_vec();
    assert_eq!(
        all.last(),
        Some(&Instant::now()),
        "d's start is seen: {all:?}"
    );
}

/// 4. `KeyedPace::from(pace)`: wiring the keyed one watches the pace itself
///    (one pacer), and the other way round.
#[tokio::test(start_paused = true)]
async fn keyed_from_pace_shares_the_watch_both_ways() {
    // Keyed wired; calls go through the Pace directly and through the keyed.
    let pace = Pace::builder()
        .requests_per_minute(600_000)
        .build()
        .unwrap();
    let keyed = KeyedPace::from(pace.clone());
    let b = bulkhead(4, Duration::from_secs(1));
    b.set_eta_source(Some(Arc::new(keyed.clone())));
    let log = Log::default();
    let direct = through_pace(&b, &pace, log.clone());
    let via = through_keyed(&b, &keyed, log.clone());
    direct.clone().oneshot(req(None, MS)).await.unwrap();
    tokio::time::advance(MS).await;
    via.clone().oneshot(req(Some("x"), MS)).await.unwrap();
    tokio::time::advance(MS).await;
    via.clone().oneshot(req(None, MS)).await.unwrap();
    let starts: Vec<Instant> = log.lock().unwrap().iter().map(|l| l.1).collect();
    assert_eq!(keyed.projection(Instant::now()).started(), &starts[..]);
    assert_eq!(pace.projection(Instant::now()).started(), &starts[..]);

    // Pace wired first; a KeyedPace made from it afterwards sees its starts.
    let pace = Pace::builder()
        .requests_per_minute(600_000)
        .build()
        .unwrap();
    let b = bulkhead(4, Duration::from_secs(1));
    b.set_eta_source(Some(Arc::new(pace.clone())));
    let log = Log::default();
    let direct = through_pace(&b, &pace, log.clone());
    direct.clone().oneshot(req(None, MS)).await.unwrap();
    let keyed = KeyedPace::from(pace.clone());
    tokio::time::advance(MS).await;
    keyed_only(&keyed, log.clone())
        .oneshot(req(Some("y"), MS))
        .await
        .unwrap();
    let starts: Vec<Instant> = log.lock().unwrap().iter().map(|l| l.1).collect();
    assert_eq!(keyed.projection(Instant::now()).started(), &starts[..]);
}

/// 5. Watching a clone, one key's pacer from `get`/`peek`, the overflow or
///    the shared pacer watches every pacer of the keyed one (one flag).
#[tokio::test(start_paused = true)]
async fn watching_any_part_watches_the_whole_keyed_pacer() {
    type Watch = fn(&KeyedPace);
    let ways: [(&str, Watch); 7] = [
        ("clone", |k| k.clone().watch()),
        ("get(a) before any call", |k| k.get(Some("a")).watch()),
        ("get(a).clone()", |k| k.get(Some("a")).clone().watch()),
        ("peek(given)", |k| k.peek("g").unwrap().watch()),
        ("overflow", |k| k.overflow().watch()),
        ("shared", |k| k.shared().unwrap().watch()),
        ("get(a) first projection", |k| {
            let _ = k.get(Some("a")).projection(Instant::now());
        }),
    ];
    for (what, watch) in ways {
        let keyed = KeyedPace::builder(Pace::builder().requests_per_minute(600))
            .key("g", generous())
            .shared(Pace::builder().requests_per_minute(6_000_000))
            .max_keys(3)
            .build()
            .unwrap();
        let log = Log::default();
        let svc = keyed_only(&keyed, log.clone());
        // Unwatched calls first: never recorded.
        svc.clone().oneshot(req(Some("z"), MS)).await.unwrap();
        tokio::time::advance(MS).await;
        watch(&keyed);
        log.lock().unwrap().clear();
        for k in [Some("a"), Some("b"), Some("g"), Some("c"), Some("e"), None] {
            svc.clone().oneshot(req(k, MS)).await.unwrap();
            tokio::time::advance(MS).await;
        }
        let starts: Vec<Instant> = log.lock().unwrap().iter().map(|l| l.1).collect();
        let seen = keyed.projection(Instant::now()).started().to_vec();
        assert_eq!(seen, starts, "watched by {what}: keys {:?}", keyed.keys());
    }
}

/// 6. Unwatched pacers never record (whatever else is asked of them:
///    snapshots, `start_for`, `get`, `peek`, `pacers`); the first projection
///    sees nothing, the next call is seen.
#[tokio::test(start_paused = true)]
async fn unwatched_never_records_first_projection_empty() {
    let pace = Pace::builder()
        .requests_per_minute(600_000)
        .build()
        .unwrap();
    let keyed = KeyedPace::builder(generous())
        .key("g", generous())
        .shared(Pace::builder().requests_per_minute(6_000_000))
        .max_keys(4)
        .build()
        .unwrap();
    let b = bulkhead(4, Duration::from_secs(1)); // not wired
    let log = Log::default();
    let svc_p = through_pace(&b, &pace, log.clone());
    let svc_k = through_keyed(&b, &keyed, log.clone());
    for i in 0..300u32 {
        svc_p.clone().oneshot(req(None, MS)).await.unwrap();
        let k = format!("k{}", i % 7);
        svc_k.clone().oneshot(req(Some(&k), MS)).await.unwrap();
        svc_k.clone().oneshot(req(Some("g"), MS)).await.unwrap();
        if i % 50 == 0 {
            let _ = pace.snapshot();
            let _ = pace.start_for(&Cost::requests(1));
            let _ = keyed.start_for(Some("new"), &Cost::requests(1));
            let _ = keyed.start_for(Some("k1"), &Cost::requests(1));
            let _ = keyed.get(Some("g")).snapshot();
            let _ = keyed.peek("k1");
            let _ = keyed.pacers();
            let _ = keyed.keys();
            let _ = b.snapshot();
        }
        tokio::time::advance(MS).await;
    }
    assert!(pace.projection(Instant::now()).started().is_empty());
    assert!(keyed.projection(Instant::now()).started().is_empty());
    for (k, p) in keyed.pacers() {
        assert!(p.projection(Instant::now()).started().is_empty(), "{k}");
    }
    tokio::time::advance(MS).await;
    let t = Instant::now();
    svc_p
        .clone()
        .oneshot(req(None, Duration::ZERO))
        .await
        .unwrap();
    svc_k
        .clone()
        .oneshot(req(Some("k3"), Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(pace.projection(Instant::now()).started(), [t]);
    assert_eq!(keyed.projection(Instant::now()).started(), [t]);
}

/// 7. The record keeps the last 256 starts, in order, per pacer; the keyed
///    projection merges them, sorted, at most 256.
#[tokio::test(start_paused = true)]
async fn record_bounded_in_order_and_within_the_run() {
    let keyed = KeyedPace::builder(generous()).max_keys(5).build().unwrap();
    let b = bulkhead(4, Duration::from_secs(1));
    b.set_eta_source(Some(Arc::new(keyed.clone())));
    let log = Log::default();
    let svc = through_keyed(&b, &keyed, log.clone());
    let t0 = Instant::now();
    for i in 0..1_000u32 {
        let k = format!("k{}", i % 9); // 5 own pacers, 4 keys in overflow
        svc.clone().oneshot(req(Some(&k), MS)).await.unwrap();
        tokio::time::advance(MS).await;
    }
    let now = Instant::now();
    let seen = keyed.projection(now).started().to_vec();
    let starts: Vec<Instant> = log.lock().unwrap().iter().map(|l| l.1).collect();
    assert_eq!(seen.len(), 256);
    assert_sorted(&seen, "keyed");
    assert_eq!(seen, starts[starts.len() - 256..], "the most recent 256");
    assert!(seen.iter().all(|s| *s >= t0 && *s <= now));
    for (k, p) in keyed.pacers() {
        let s = p.projection(now).started().to_vec();
        assert!(s.len() <= 256, "{k}");
        assert_sorted(&s, &k);
    }
    let o = keyed.overflow().projection(now).started().to_vec();
    assert!(o.len() <= 256);
    assert_sorted(&o, "overflow");
}

/// 8. Real threads (each its own current-thread runtime) calling a Pace and
///    a KeyedPace while other threads watch parts of them and project:
///    nothing panics, the record stays at most 256, every instant is within
///    the run (not before the first call), keyed projections sorted.
#[test]
fn threads_calling_while_watch_flips() {
    for round in 0..3 {
        let pace = Pace::builder()
            .requests_per_minute(u64::MAX / 4)
            .build()
            .unwrap();
        let keyed = KeyedPace::builder(Pace::builder().requests_per_minute(u64::MAX / 4))
            .shared(Pace::builder().tokens_per_minute(u64::MAX / 4))
            .max_keys(16)
            .build()
            .unwrap();
        let t_go = std::time::Instant::now();
        let t_go = Instant::from_std(t_go);
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut callers = Vec::new();
        for th in 0..4u32 {
            let (pace, keyed, calls) = (pace.clone(), keyed.clone(), calls.clone());
            callers.push(std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let log = Log::default();
                    let mut p = ServiceBuilder::new()
                        .layer(pace.layer().weigh(|_: &u32| Cost::requests(1)))
                        .service(tower::service_fn(|_: u32| async {
                            Ok::<_, std::io::Error>(())
                        }));
                    let mut k = keyed_only(&keyed, log.clone());
                    for i in 0..4_000u32 {
                        tower::Service::call(p.ready().await.unwrap(), i)
                            .await
                            .unwrap();
                        let key = format!("k{}", (i * 7 + th) % 24); // past max_keys too
                        let key = if i % 13 == 0 { None } else { Some(key) };
                        tower::Service::call(
                            k.ready().await.unwrap(),
                            R {
                                key,
                                work: Duration::ZERO,
                                ticket: QueueTicket::new(),
                            },
                        )
                        .await
                        .unwrap();
                        calls.fetch_add(2, Ordering::Relaxed);
                        if i % 100 == 0 {
                            log.lock().unwrap().clear();
                        }
                    }
                });
            }));
        }
        let watchers: Vec<_> = (0..2)
            .map(|w| {
                let (pace, keyed, stop, calls) =
                    (pace.clone(), keyed.clone(), stop.clone(), calls.clone());
                std::thread::spawn(move || {
                    let mut bad = Vec::new();
                    let mut disorder = 0usize;
                    let mut looks = 0usize;
                    // Let some calls go unwatched first.
                    while calls.load(Ordering::Relaxed) < 2_000 && !stop.load(Ordering::Relaxed) {
                        std::thread::yield_now();
                    }
                    match w {
                        0 => {
                            pace.clone().watch();
                            keyed.get(Some("k5")).watch();
                        }
                        _ => {
                            keyed.overflow().watch();
                            let b = Bulkhead::builder(1).build().unwrap();
                            b.set_eta_source(Some(Arc::new(pace.clone())));
                        }
                    }
                    while !stop.load(Ordering::Relaxed) {
                        looks += 1;
                        let now = Instant::now();
                        let ps = pace.projection(now).started().to_vec();
                        let ks = keyed.projection(now).started().to_vec();
                        // Calls record while we look: the bound is after.
                        let now = Instant::now();
                        if ps.len() > 256 || ks.len() > 256 {
                            bad.push(format!("len {} {}", ps.len(), ks.len()));
                        }
                        for s in ps.iter().chain(&ks) {
                            if *s < t_go || *s > now {
                                bad.push(format!(
                                    "instant outside the run: {:?} before go / {:?} after now",
                                    t_go.checked_duration_since(*s),
                                    s.checked_duration_since(now)
                                ));
                            }
                        }
                        if !ks.windows(2).all(|w| w[0] <= w[1]) {
                            bad.push("keyed not sorted".into());
                        }
                        if !ps.windows(2).all(|w| w[0] <= w[1]) {
                            disorder += 1;
                        }
                        for (_, p) in keyed.pacers() {
                            let s = p.projection(now).started().to_vec();
                            let now = Instant::now();
                            if s.len() > 256 {
                                bad.push("key len".into());
                            }
                            if s.iter().any(|s| *s < t_go || *s > now) {
                                bad.push("key instant outside the run".into());
                            }
                            if !s.windows(2).all(|w| w[0] <= w[1]) {
                                disorder += 1;
                            }
                        }
                        std::thread::yield_now();
                    }
                    (bad, disorder, looks)
                })
            })
            .collect();
        for c in callers {
            c.join().expect("a caller panicked");
        }
        stop.store(true, Ordering::Relaxed);
        let mut bad = Vec::new();
        for w in watchers {
            let (b, disorder, looks) = w.join().expect("a watcher panicked");
            println!("round {round}: {looks} looks, {disorder} out of order (Pace's ring, documented), {} bad", b.len());
            bad.extend(b);
        }
        bad.dedup();
        assert!(
            bad.is_empty(),
            "round {round}: {:?}",
            &bad[..bad.len().min(10)]
        );
        // Quiet now: every pacer's record is in order, within the run, and
        // every key (built before or after the watch) records a new call.
        let now = Instant::now();
        let s = pace.projection(now).started().to_vec();
        assert_eq!(s.len(), 256);
        assert!(s.iter().all(|x| *x >= t_go && *x <= now));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let svc = keyed_only(&keyed, Log::default());
            for (k, p) in keyed.pacers() {
                let before = p.projection(Instant::now()).started().last().copied();
                svc.clone()
                    .oneshot(req(Some(&k), Duration::ZERO))
                    .await
                    .unwrap();
                let after = p.projection(Instant::now()).started().last().copied();
                assert!(
                    after.is_some() && after != before || after.is_some(),
                    "{k}: {before:?} {after:?}"
                );
                assert!(
                    after > before || before.is_none(),
                    "{k}: a new call recorded ({before:?} → {after:?})"
                );
            }
        });
    }
}

/// 9. A source of one's own that forwards `projection` but not `watch`
///    (the default: nothing): recorded from the first ticket look on; the
///    ETA is late, never early.
#[tokio::test(start_paused = true)]
async fn a_wrapper_without_watch_is_late_never_early() {
    #[derive(Debug)]
    struct Wrap(Pace);
    impl EtaSource for Wrap {
        fn projection(&self, now: Instant) -> Box<dyn Projection + '_> {
            self.0.projection(now)
        }
    }
    let service = Duration::from_secs(3);
    let pace = slow_pace();
    let b = bulkhead(2, service);
    b.set_eta_source(Some(Arc::new(Wrap(pace.clone()))));
    let svc = through_pace(&b, &pace, Log::default());
    let reqs: Vec<R> = (0..3).map(|_| req(None, service)).collect();
    let tickets: Vec<QueueTicket> = reqs.iter().map(|r| r.ticket.clone()).collect();
    let mut tasks = Vec::new();
    for r in reqs {
        tasks.push(spawn(&svc, r));
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let e3 = eta(&tickets[2]);
    let now = Instant::now();
    let at = admitted_at(&tickets[2..]).await;
    println!("eta {e3:?}, real {:?}", at[0] - now);
    assert!(e3 + 10 * MS >= at[0] - now, "never early");
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// 10. Two bulkheads on one keyed pacer, one unwired (None) again: the
///     watch stays (starts keep being recorded), the ETAs of the other stay.
#[tokio::test(start_paused = true)]
async fn unwiring_keeps_recording_for_the_other_line() {
    let keyed = KeyedPace::builder(generous()).build().unwrap();
    let b1 = bulkhead(4, Duration::from_secs(1));
    let b2 = bulkhead(4, Duration::from_secs(1));
    b1.set_eta_source(Some(Arc::new(keyed.clone())));
    b2.set_eta_source(Some(Arc::new(keyed.clone())));
    b1.set_eta_source(None);
    let log = Log::default();
    let svc = through_keyed(&b1, &keyed, log.clone());
    for k in ["a", "b", "c"] {
        svc.clone().oneshot(req(Some(k), MS)).await.unwrap();
        tokio::time::advance(MS).await;
    }
    assert_eq!(keyed.projection(Instant::now()).started().len(), 3);
}

/// 11. Keys at their limit: a bulkhead wired to a keyed pacer before any
///     call; the waiting key's ticket ETA is exact, with the key built
///     after the wiring (its start must be recorded, or the ETA would be
///     `now + service`).
#[tokio::test(start_paused = true)]
async fn keyed_eta_exact_for_a_key_built_after_the_wiring() {
    let service = Duration::from_secs(3);
    let keyed = KeyedPace::builder(
        Pace::builder()
            .limit(Limit::new(Unit::Requests, 1, Duration::from_secs(10)))
            .max_wait(Duration::from_secs(600)),
    )
    .build()
    .unwrap();
    let b = bulkhead(2, service);
    b.set_eta_source(Some(Arc::new(keyed.clone())));
    let svc = through_keyed(&b, &keyed, Log::default());
    let reqs: Vec<R> = (0..4).map(|_| req(Some("m"), service)).collect();
    let tickets: Vec<QueueTicket> = reqs.iter().map(|r| r.ticket.clone()).collect();
    let mut tasks = Vec::new();
    for r in reqs {
        tasks.push(spawn(&svc, r));
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = Instant::now();
    let (e3, e4) = (eta(&tickets[2]), eta(&tickets[3]));
    let at = admitted_at(&tickets[2..]).await;
    println!(
        "eta3 {e3:?} real {:?}; eta4 {e4:?} real {:?}",
        at[0] - now,
        at[1] - now
    );
    assert_eq!(e3, Duration::from_millis(2_500));
    assert_eq!(e4, Duration::from_millis(12_500));
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[cfg(feature = "llm")]
mod llm {
    use super::*;
    use bytes::Bytes;
    use semaforo::llm::{LlmStack, Tier};
    use tower::Layer;

    fn tier(rpm: u64, tpm: u64) -> Tier {
        Tier {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        }
    }

    fn chat(model: &str, max_tokens: u64, t: &QueueTicket) -> http::Request<Bytes> {
        let mut r = http::Request::post("/v1/chat/completions")
            .body(Bytes::from(format!(
                r#"{{"model":"{model}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":""}}]}}"#
            )))
            .unwrap();
        r.extensions_mut().insert(t.clone());
        r
    }

    fn client(
        service: Duration,
        log: Arc<Mutex<Vec<Instant>>>,
    ) -> impl tower::Service<
        http::Request<Bytes>,
        Response = http::Response<Bytes>,
        Error = std::io::Error,
        Future = impl Send,
    > + Clone
           + Send {
        tower::service_fn(move |_r: http::Request<Bytes>| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(Instant::now());
                tokio::time::sleep(service).await;
                Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(
                    br#"{"usage":{"prompt_tokens":0,"completion_tokens":9000,"total_tokens":9000}}"#,
                )))
            }
        })
    }

    /// 12. The preset end to end: its keyed pacer records from the build
    ///     (not from the first projection); the queued ticket gets an ETA
    ///     within 10 % of when its permit really frees, never well before.
    async fn preset_case(user_pace: bool) {
        let service = Duration::from_secs(1);
        let mut builder = LlmStack::openai(tier(100_000, 10_000)).bulkhead(
            Bulkhead::builder(2)
                .max_queue(10)
                .expected_service_time(service)
                .build()
                .unwrap(),
        );
        if user_pace {
            builder = builder.pace(
                KeyedPace::builder(
                    Pace::builder()
                        .requests_per_minute(100_000)
                        .tokens_per_minute(10_000),
                )
                .build()
                .unwrap(),
            );
        }
        let stack = builder.build().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let svc = stack.layer().layer(client(service, log.clone()));
        let t0 = Instant::now();
        let tickets: Vec<QueueTicket> = (0..4).map(|_| QueueTicket::new()).collect();
        let mut tasks = Vec::new();
        for t in &tickets {
            let r = chat("a", 9_000, t);
            tasks.push(tokio::spawn(svc.clone().oneshot(r)));
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Watched at build: the first call's start is seen by the very
        // first projection.
        let seen = stack.pace().projection(Instant::now()).started().to_vec();
        assert_eq!(seen, log.lock().unwrap().clone(), "user pace {user_pace}");
        assert_eq!(seen, [t0]);
        tokio::time::sleep(Duration::from_millis(1_400)).await;
        let now = Instant::now();
        // Calls 2 and 3 hold the permits, waiting in the pacer (~54 s,
        // ~108 s); call 4's permit frees when call 2 ends.
        let e = tickets[3]
            .queue_status()
            .and_then(|s| s.eta)
            .expect("an ETA");
        let at = admitted_at(&tickets[3..]).await;
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let real = at[0] - now;
        println!(
            "user pace {user_pace}: eta {e:?}, real {real:?}, upstream starts {:?}",
            log.lock()
                .unwrap()
                .iter()
                .map(|s| *s - t0)
                .collect::<Vec<_>>()
        );
        assert!(
            (e.as_secs_f64() - real.as_secs_f64()).abs() <= 0.1 * real.as_secs_f64(),
            "ETA {e:?}, real {real:?}"
        );
        assert!(e + 10 * MS >= real.mul_f64(0.9));
    }

    #[tokio::test(start_paused = true)]
    async fn llm_preset_etas_and_starts_recorded_from_build() {
        preset_case(false).await;
    }

    #[tokio::test(start_paused = true)]
    async fn llm_preset_with_a_users_keyed_pace() {
        preset_case(true).await;
    }
}
