//! An outside attack on the pacer's lock-free healthy path (commit 2f76d63):
//! one or two rolling cells reserved by one 128-bit compare-and-swap, the
//! locked paths taking the `tat`s back. Public API only.

mod support;

use semaforo::classify::{Class, RateLimitInfo, RateLimitWindow};
use semaforo::eta::EtaSource;
use semaforo::pace::{Cost, Limit, Observed, Pace, Unit};
use semaforo::{BoxError, RejectKind, Rejected};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::Rng;
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};

/// One call: its estimate, what the upstream answers.
#[derive(Debug, Clone, Default)]
struct Req {
    id: usize,
    tokens: u64,
    /// Answer `Throttled` with this `retry_after`.
    throttle: Option<Duration>,
    /// The real usage (reconcile), in tokens.
    real: Option<u64>,
}

type Svc = BoxCloneService<Req, Req, BoxError>;

/// The pacer as a service; every call the inner service sees is logged
/// (id, instant, tokens).
fn service(pace: &Pace, log: Arc<Mutex<Vec<(usize, Instant, u64)>>>) -> Svc {
    let svc = ServiceBuilder::new()
        .layer(
            pace.layer()
                .weigh(|r: &Req| Cost::tokens(r.tokens))
                .observe(|r: &Req| Observed {
                    usage: r.real.map(Cost::tokens),
                    info: None,
                })
                .classify(|r: Result<&Req, &std::io::Error>| match r {
                    Ok(Req {
                        throttle: Some(d), ..
                    }) => Class::Throttled {
                        retry_after: Some(*d),
                    },
                    _ => Class::Success,
                }),
        )
        .service(tower::service_fn(move |r: Req| {
            log.lock().unwrap().push((r.id, Instant::now(), r.tokens));
            async move { Ok::<_, std::io::Error>(r) }
        }));
    BoxCloneService::new(svc)
}

fn new_log() -> Arc<Mutex<Vec<(usize, Instant, u64)>>> {
    Arc::new(Mutex::new(Vec::new()))
}

fn announce(requests: Option<(u64, u64)>, tokens: Option<(u64, u64)>) -> RateLimitInfo {
    let w = |(limit, remaining): (u64, u64)| RateLimitWindow {
        limit: Some(limit),
        remaining: Some(remaining),
        reset: None,
    };
    RateLimitInfo {
        requests: requests.map(w),
        tokens: tokens.map(w),
        ..RateLimitInfo::default()
    }
}

// ---------------------------------------------------------------------------
// (1) Many threads, real clock: the rate bound over every window.
// ---------------------------------------------------------------------------

/// Checks, for every window [a, b] whose ends are observed instants, that the
/// units of the calls surely admitted inside it (read-before ≥ a,
/// read-after ≤ b) are at most `burst + rate × (b − a)` (+ `slack`).
fn check_windows(
    calls: &[(Instant, Instant, u64)],
    burst: f64,
    per_sec: f64,
    slack: f64,
) -> Result<(), String> {
    let mut by_before: Vec<_> = calls.to_vec();
    by_before.sort_by_key(|c| c.0);
    let step = (by_before.len() / 800).max(1);
    for i in (0..by_before.len()).step_by(step) {
        let a = by_before[i].0;
        let mut inside: Vec<(Instant, u64)> = by_before[i..].iter().map(|c| (c.1, c.2)).collect();
        inside.sort_by_key(|c| c.0);
        let mut sum = 0u128;
        for (b, units) in inside {
            sum += u128::from(units);
            let allowed = burst + per_sec * (b - a).as_secs_f64() + slack;
            if sum as f64 > allowed {
                return Err(format!(
                    "{sum} units admitted within {:?} (allowed {allowed:.3})",
                    b - a
                ));
            }
        }
    }
    Ok(())
}

/// 8 tasks on a 4-worker runtime hammer one RPM + TPM pacer (max_wait 0) with
/// mixed costs while another task keeps calling `snapshot`, `start_for`,
/// `learn` (lower, higher and equal announced limits, with remaining counts)
/// and the inner service answers `Throttled` (1 ms) now and then. Over every
/// window the admitted requests and tokens stay within the configured bound.
#[test]
fn threads_with_learn_snapshot_and_throttles_never_exceed_the_rate_bound() {
    hammer(
        1_200,
        60_000,
        &[0, 1, 7, 40, 333, 5_000, 60_000, 60_001],
        true,
        8,
        6_000,
    );
}

/// The contended case: a budget the calls mostly fit (6,000 RPM, 600,000
/// TPM, small costs), so most admissions race on the compare-and-swap; the
/// chaos thread only snapshots, peeks and announces the configured limits
/// (each a take-back and hand-over of the word).
#[test]
fn contended_lock_free_admissions_never_exceed_the_rate_bound() {
    hammer(6_000, 600_000, &[0, 1, 7, 40, 333], false, 8, 1_500);
}

fn hammer(rpm: u64, tpm: u64, costs: &'static [u64], lower: bool, tasks_n: u64, per_task: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    for round in 0..6u64 {
        let t_build = Instant::now();
        let pace = Pace::builder()
            .requests_per_minute(rpm)
            .tokens_per_minute(tpm)
            .max_wait(Duration::ZERO)
            .build()
            .unwrap();
        let admitted = Arc::new(Mutex::new(Vec::<(Instant, Instant, u64)>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let never = Arc::new(AtomicU64::new(0));
        rt.block_on(async {
            let log = new_log();
            let svc = service(&pace, log.clone());
            let mut tasks = Vec::new();
            for t in 0..tasks_n {
                let mut svc = svc.clone();
                let admitted = admitted.clone();
                let refused = refused.clone();
                let never = never.clone();
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng(0x9E37_79B9 ^ ((t + 1) * 7919 + round));
                    for i in 0..per_task {
                        let tokens = costs[rng.below(costs.len() as u64) as usize];
                        let throttle =
                            (lower && rng.below(500) == 0).then_some(Duration::from_millis(1));
                        // A throttled call's tokens are given back by design
                        // (the upstream did not count them): such calls
                        // carry none, so the bound stays exact.
                        let tokens = if throttle.is_some() { 0 } else { tokens };
                        let req = Req {
                            id: i,
                            tokens,
                            throttle,
                            real: None,
                        };
                        let before = Instant::now();
                        let r = svc.ready().await.unwrap().call(req).await;
                        let after = Instant::now();
                        match r {
                            Ok(_) => admitted.lock().unwrap().push((before, after, tokens)),
                            Err(e) => {
                                let rej = Rejected::from_box(&e).expect("a rejection");
                                assert_eq!(rej.kind(), RejectKind::BudgetExceeded, "{e}");
                                if rej.retry_after().is_none() {
                                    never.fetch_add(1, Ordering::Relaxed);
                                    assert!(tokens > tpm, "{e}");
                                } else {
                                    refused.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        if i % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                }));
            }
            let chaos = {
                let pace = pace.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng(42 + round);
                    let mut k = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        k += 1;
                        match if lower {
                            rng.below(6)
                        } else {
                            [0, 1, 3, 5][rng.below(4) as usize]
                        } {
                            0 => {
                                let s = pace.snapshot();
                                assert!(
                                    s.dims.iter().all(|d| d.available.is_finite()
                                        && d.available >= 0.0
                                        && d.available <= d.capacity + 1e-6),
                                    "{s:?}"
                                );
                            }
                            1 => {
                                let _ = pace.start_for(&Cost::tokens(rng.below(70_000)));
                            }
                            2 => pace.learn(&announce(
                                Some((rng.below(2 * rpm) + 1, rng.below(rpm))),
                                Some((rng.below(2 * tpm) + 1, rng.below(tpm))),
                            )),
                            3 => pace.learn(&announce(Some((rpm, rpm)), Some((tpm, tpm)))),
                            4 => pace.learn(&announce(None, Some((tpm * 10, tpm * 10)))),
                            _ => {
                                let _ = pace.projection(Instant::now()).started().len();
                            }
                        }
                        if k % 16 == 0 {
                            std::thread::yield_now();
                        }
                    }
                    k
                })
            };
            for t in tasks {
                t.await.unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            let k = chaos.join().unwrap();
            assert!(k > 10, "the chaos thread ran {k} times");
        });
        let elapsed = t_build.elapsed().as_secs_f64();
        let calls = admitted.lock().unwrap().clone();
        let reqs: Vec<_> = calls.iter().map(|c| (c.0, c.1, 1)).collect();
        let total_tokens: u64 = calls.iter().map(|c| c.2).sum();
        eprintln!(
            "round {round}: {} admitted, {total_tokens} tokens, {} refused, {} never, {elapsed:.3}s",
            calls.len(),
            refused.load(Ordering::Relaxed),
            never.load(Ordering::Relaxed),
        );
        // Globally, since the build.
        assert!(
            calls.len() as f64 <= rpm as f64 + rpm as f64 / 60.0 * elapsed + 1e-6,
            "{} requests in {elapsed}s",
            calls.len()
        );
        assert!(
            total_tokens as f64 <= tpm as f64 + tpm as f64 / 60.0 * elapsed + 1e-3,
            "{total_tokens} tokens in {elapsed}s"
        );
        check_windows(&reqs, rpm as f64, rpm as f64 / 60.0, 1e-6).unwrap();
        check_windows(&calls, tpm as f64, tpm as f64 / 60.0, 1e-3).unwrap();
    }
}

// ---------------------------------------------------------------------------
// (2) FIFO on paused time.
// ---------------------------------------------------------------------------

/// 300 callers arriving one after another (mixed costs, some 0 tokens that
/// would fit at once, some throttled answers, `learn` and `snapshot` between
/// arrivals): once anyone waits, nobody arriving later starts before them.
#[tokio::test(start_paused = true)]
async fn nobody_overtakes_a_waiter() {
    for two in [false, true] {
        let mut b = Pace::builder().tokens_per_minute(6_000);
        if two {
            b = b.requests_per_minute(600);
        }
        let pace = b.build().unwrap();
        let log = new_log();
        let svc = service(&pace, log.clone());
        let mut rng = Rng(7);
        let mut tasks = Vec::new();
        let mut arrived_while_waiting = 0;
        for id in 0..300usize {
            let tokens = [0, 1, 50, 500, 2_000, 6_000][rng.below(6) as usize];
            let throttle = (rng.below(40) == 0).then_some(Duration::from_millis(rng.below(3_000)));
            let real = (rng.below(4) == 0).then(|| rng.below(4_000));
            match rng.below(5) {
                0 => {
                    let _ = pace.snapshot();
                }
                1 => pace.learn(&announce(None, Some((6_000, rng.below(6_000))))),
                _ => {}
            }
            if pace.snapshot().waiting > 0 {
                arrived_while_waiting += 1;
            }
            let svc = svc.clone();
            tasks.push(tokio::spawn(svc.oneshot(Req {
                id,
                tokens,
                throttle,
                real,
            })));
            // Let it reach the pacer (and join the line) before the next one.
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let log = log.lock().unwrap().clone();
        assert_eq!(log.len(), 300);
        let order: Vec<usize> = log.iter().map(|l| l.0).collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert!(arrived_while_waiting > 50, "{arrived_while_waiting}");
        assert_eq!(order, sorted, "two={two}: start order differs from arrival");
        // And the starts are non-decreasing in time.
        assert!(log.windows(2).all(|w| w[0].1 <= w[1].1));
    }
}

/// The precise case: the bucket holds 100 of 1,000 tokens; a call of 500
/// waits 24 s; a newcomer of 0 tokens, or of 50 (which fit now), must not
/// start before it — on a one-cell and a two-cell pacer.
#[tokio::test(start_paused = true)]
async fn a_newcomer_that_fits_waits_behind_the_line() {
    for two in [false, true] {
        let mut b = Pace::builder().tokens_per_minute(1_000);
        if two {
            b = b.requests_per_minute(1_000);
        }
        let pace = b.build().unwrap();
        let log = new_log();
        let svc = service(&pace, log.clone());
        let t0 = Instant::now();
        svc.clone()
            .oneshot(Req {
                id: 0,
                tokens: 900,
                ..Req::default()
            })
            .await
            .unwrap();
        let waiter = tokio::spawn(svc.clone().oneshot(Req {
            id: 1,
            tokens: 500,
            ..Req::default()
        }));
        tokio::task::yield_now().await;
        assert_eq!(pace.snapshot().waiting, 1);
        let a = tokio::spawn(svc.clone().oneshot(Req {
            id: 2,
            tokens: 0,
            ..Req::default()
        }));
        let b2 = tokio::spawn(svc.clone().oneshot(Req {
            id: 3,
            tokens: 50,
            ..Req::default()
        }));
        tokio::task::yield_now().await;
        assert_eq!(pace.snapshot().waiting, 3);
        for t in [waiter, a, b2] {
            t.await.unwrap().unwrap();
        }
        let log = log.lock().unwrap().clone();
        let ids: Vec<usize> = log.iter().map(|l| l.0).collect();
        assert_eq!(ids, [0, 1, 2, 3], "two={two}");
        let at: Vec<Duration> = log.iter().map(|l| l.1 - t0).collect();
        // 400 tokens to refill at 1,000/min: 24 s. Then 0 tokens at once,
        // 50 tokens: bucket at 0, 50 refill in 3 s.
        assert_eq!(at[1], Duration::from_secs(24), "{at:?}");
        assert_eq!(at[2], Duration::from_secs(24), "{at:?}");
        assert_eq!(at[3], Duration::from_secs(27), "{at:?}");
        // Free again: a call that fits goes at once (the lock-free path is back).
        let t1 = Instant::now();
        tokio::time::sleep(Duration::from_secs(60)).await;
        svc.clone()
            .oneshot(Req {
                id: 4,
                tokens: 1_000,
                ..Req::default()
            })
            .await
            .unwrap();
        assert_eq!(t1.elapsed(), Duration::from_secs(60));
        assert_eq!(pace.snapshot().dims[0].available, 0.0);
    }
}

// ---------------------------------------------------------------------------
// (3) close() while calls race.
// ---------------------------------------------------------------------------

/// Tasks on a 4-worker runtime call in a loop (some wait in line); `close`
/// is called mid-way. No call that began after `close` returned is admitted;
/// every waiter is answered (no hang); everything after is ShuttingDown.
#[test]
fn close_while_calls_race() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    for round in 0..20u64 {
        let pace = Pace::builder()
            .requests_per_minute(60_000)
            .tokens_per_minute(60_000)
            .build()
            .unwrap();
        let closed = Arc::new(AtomicBool::new(false));
        let after_close = Arc::new(AtomicU64::new(0));
        let admitted = Arc::new(AtomicU64::new(0));
        let shut = Arc::new(AtomicU64::new(0));
        let released = rt.block_on(async {
            let svc = service(&pace, new_log());
            let mut tasks = Vec::new();
            for t in 0..8u64 {
                let mut svc = svc.clone();
                let (closed, after_close, admitted, shut) = (
                    closed.clone(),
                    after_close.clone(),
                    admitted.clone(),
                    shut.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng(round * 31 + t + 1);
                    loop {
                        let began_closed = closed.load(Ordering::SeqCst);
                        let req = Req {
                            tokens: rng.below(3_000),
                            ..Req::default()
                        };
                        match svc.ready().await.unwrap().call(req).await {
                            Ok(_) => {
                                admitted.fetch_add(1, Ordering::Relaxed);
                                if began_closed {
                                    after_close.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            Err(e) => {
                                let r = Rejected::from_box(&e).expect("a rejection");
                                assert_eq!(r.kind(), RejectKind::ShuttingDown, "{e}");
                                shut.fetch_add(1, Ordering::Relaxed);
                                if began_closed {
                                    break;
                                }
                            }
                        }
                    }
                }));
            }
            // Let them run into the line.
            // Close at various points: inside the burst (40 calls of ~1,500
            // tokens) and once callers wait in line.
            while admitted.load(Ordering::Relaxed) < (round * 3) % 30 {
                tokio::task::yield_now().await;
            }
            let released = pace.close();
            closed.store(true, Ordering::SeqCst);
            for t in tasks {
                tokio::time::timeout(Duration::from_secs(20), t)
                    .await
                    .expect("a caller hung after close")
                    .unwrap();
            }
            released
        });
        eprintln!(
            "close round {round}: {} admitted, {released} released",
            admitted.load(Ordering::Relaxed)
        );
        assert_eq!(after_close.load(Ordering::SeqCst), 0, "round {round}");
        assert!(shut.load(Ordering::Relaxed) >= 8);
        let s = pace.snapshot();
        assert_eq!(s.waiting, 0, "round {round}: released {released}");
        // Closed stays closed: no lock-free admission either.
        assert_eq!(pace.start_for(&Cost::tokens(0)), None);
    }
}

// ---------------------------------------------------------------------------
// (4) Extreme configurations.
// ---------------------------------------------------------------------------

fn try_call(
    svc: &Svc,
    tokens: u64,
) -> impl std::future::Future<Output = Result<Instant, (RejectKind, Option<Duration>)>> + Send {
    let svc = svc.clone();
    async move {
        match svc
            .oneshot(Req {
                tokens,
                ..Req::default()
            })
            .await
        {
            Ok(_) => Ok(Instant::now()),
            Err(e) => {
                let r = Rejected::from_box(&e).unwrap_or_else(|| panic!("{e}"));
                Err((r.kind(), r.retry_after()))
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn one_per_hour_and_burst_one() {
    let pace = Pace::builder()
        .limit(Limit::new(Unit::Requests, 1, Duration::from_secs(3_600)))
        .max_wait(Duration::ZERO)
        .build()
        .unwrap();
    let svc = service(&pace, new_log());
    let t0 = Instant::now();
    assert_eq!(try_call(&svc, 5).await, Ok(t0));
    let r = try_call(&svc, 5).await.unwrap_err();
    assert_eq!(r.0, RejectKind::BudgetExceeded);
    let ra = r.1.unwrap();
    assert!(
        ra.abs_diff(Duration::from_secs(3_600)) <= Duration::from_millis(1),
        "{ra:?}"
    );
    tokio::time::sleep(Duration::from_secs(3_599)).await;
    assert!(try_call(&svc, 5).await.is_err());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(try_call(&svc, 5).await.is_ok());

    // Burst 1 token on a 600/min cell: 1 fits, 2 never, 0 always while not in debt.
    let pace = Pace::builder()
        .limit(Limit::tokens_per_minute(600).burst(1))
        .requests_per_minute(1_000_000)
        .max_wait(Duration::ZERO)
        .build()
        .unwrap();
    let svc = service(&pace, new_log());
    assert!(try_call(&svc, 1).await.is_ok());
    assert!(try_call(&svc, 1).await.is_err());
    assert_eq!(
        try_call(&svc, 2).await.unwrap_err(),
        (RejectKind::BudgetExceeded, None)
    );
    for _ in 0..100 {
        assert!(
            try_call(&svc, 0).await.is_ok(),
            "0 tokens on an empty (not owing) bucket"
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(try_call(&svc, 1).await.is_ok());
    let s = pace.snapshot();
    assert_eq!(s.dims[1].capacity, 1_000_000.0);
    // 102 requests admitted over 100 ms at 16,667/s: full but for the last one.
    assert!(
        (s.dims[1].available - (1_000_000.0 - 1.0)).abs() < 1e-6,
        "{s:?}"
    );
    assert_eq!(s.dims[0].available, 0.0, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn u64_max_limits_and_costs() {
    for extra in [false, true] {
        let mut b = Pace::builder()
            .tokens_per_minute(u64::MAX)
            .requests_per_minute(u64::MAX);
        if extra {
            b = b.output_tokens_per_minute(1); // never binds Cost::tokens: the locked path
        }
        let pace = b.max_wait(Duration::ZERO).build().unwrap();
        let svc = service(&pace, new_log());
        for _ in 0..1_000 {
            assert!(try_call(&svc, u64::MAX / 1_000_000).await.is_ok());
        }
        let s = pace.snapshot();
        assert!(s.dims.iter().all(|d| d.available.is_finite()), "{s:?}");
        // A cost of u64::MAX on a limit of u64::MAX: what does it do? Both
        // paths must agree (compared in `extremes_agree` below); it must not
        // corrupt the cells into NaN.
        let _ = try_call(&svc, u64::MAX).await;
        let s = pace.snapshot();
        assert!(
            s.dims
                .iter()
                .all(|d| d.available.is_finite() && !d.capacity.is_nan()),
            "extra={extra}: {s:?}"
        );
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert!(try_call(&svc, 1).await.is_ok(), "extra={extra}");
    }
}

/// The same extreme sequence on a two-cell (lock-free) and a three-cell
/// (locked) pacer: the same answers.
#[tokio::test(start_paused = true)]
async fn extremes_agree() {
    let seq: &[(u64, u64)] = &[
        (0, u64::MAX),
        (0, 1),
        (0, 0),
        (1, u64::MAX / 2),
        (0, u64::MAX / 2),
        (59_000, 1),
        (1_000, 1),
        (0, 0),
        (30_000, u64::MAX),
    ];
    let mut outs = Vec::new();
    for extra in [false, true] {
        let mut b = Pace::builder()
            .tokens_per_minute(u64::MAX)
            .requests_per_minute(1);
        if extra {
            b = b.output_tokens_per_minute(1);
        }
        let pace = b.max_wait(Duration::from_secs(30)).build().unwrap();
        let svc = service(&pace, new_log());
        let t0 = Instant::now();
        let mut out = Vec::new();
        for (ms, tokens) in seq {
            tokio::time::sleep(Duration::from_millis(*ms)).await;
            out.push(try_call(&svc, *tokens).await.map(|t| t - t0));
        }
        outs.push(out);
    }
    eprintln!("extremes: {:?}", outs[0]);
    assert_eq!(outs[0], outs[1]);
}

// ---------------------------------------------------------------------------
// (5) + (6) One, two and three cells: the same decisions, with throttles,
// learned limits and reconciles (refunds and debts).
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Started(Duration),
    Refused(RejectKind, Option<Duration>),
}

/// Runs one random script on pacers built by `build` (all in one paused
/// runtime, same virtual instants), returns each one's outcomes and final
/// snapshot of the first `cells` dims.
async fn script(
    seed: u64,
    builders: Vec<Pace>,
    cells: usize,
) -> Vec<(Vec<Outcome>, Vec<(f64, Duration)>)> {
    let t0 = Instant::now();
    let svcs: Vec<Svc> = builders.iter().map(|p| service(p, new_log())).collect();
    let results: Vec<Arc<Mutex<Vec<Option<Outcome>>>>> = builders
        .iter()
        .map(|_| Arc::new(Mutex::new(Vec::new())))
        .collect();
    let mut rng = Rng(seed);
    let mut tasks = Vec::new();
    for id in 0..250usize {
        let tokens = match rng.below(10) {
            0 => 0,
            1 => 10_000,
            2 => 10_001,
            _ => rng.below(3_000),
        };
        let throttle = (rng.below(30) == 0).then(|| Duration::from_millis(rng.below(5_000)));
        let real = match rng.below(3) {
            0 => Some(rng.below(6_000)),
            _ => None,
        };
        let learn = match rng.below(12) {
            0 => Some(announce(
                Some((rng.below(200) + 1, rng.below(200))),
                Some((rng.below(20_000) + 1, rng.below(10_000))),
            )),
            1 => Some(announce(Some((100, 100)), Some((10_000, 10_000)))),
            _ => None,
        };
        let snap = rng.below(4) == 0;
        for (k, (pace, svc)) in builders.iter().zip(&svcs).enumerate() {
            if let Some(info) = &learn {
                pace.learn(info);
            }
            if snap {
                let _ = pace.snapshot();
            }
            let svc = svc.clone();
            let res = results[k].clone();
            res.lock().unwrap().push(None);
            tasks.push(tokio::spawn(async move {
                let out = match svc
                    .oneshot(Req {
                        id,
                        tokens,
                        throttle,
                        real,
                    })
                    .await
                {
                    Ok(_) => Outcome::Started(t0.elapsed()),
                    Err(e) => {
                        let r = Rejected::from_box(&e).unwrap_or_else(|| panic!("{e}"));
                        Outcome::Refused(r.kind(), r.retry_after())
                    }
                };
                res.lock().unwrap()[id] = Some(out);
            }));
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(rng.below(1_500))).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    builders
        .iter()
        .zip(&results)
        .map(|(p, r)| {
            let s = p.snapshot();
            let now = Instant::now();
            (
                r.lock()
                    .unwrap()
                    .iter()
                    .map(|o| o.clone().unwrap())
                    .collect(),
                s.dims[..cells]
                    .iter()
                    .map(|d| (d.available, d.full_at.saturating_duration_since(now)))
                    .collect(),
            )
        })
        .collect()
}

/// A run's outcomes and its cells at the end (available, until full).
type Run = (Vec<Outcome>, Vec<(f64, Duration)>);

fn same(a: &[Run], what: &str) {
    for (k, x) in a.iter().enumerate().skip(1) {
        let first_diff = x.0.iter().zip(&a[0].0).position(|(p, q)| p != q);
        assert_eq!(
            first_diff,
            None,
            "{what}: pacer {k} differs at call {first_diff:?}: {:?} vs {:?}",
            first_diff.map(|i| &x.0[i]),
            first_diff.map(|i| &a[0].0[i])
        );
        for (d, (p, q)) in x.1.iter().zip(&a[0].1).enumerate() {
            assert!(
                (p.0 - q.0).abs() < 1e-6 && p.1.abs_diff(q.1) <= Duration::from_micros(1),
                "{what}: pacer {k} dim {d}: {p:?} vs {q:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn one_two_three_cells_decide_alike() {
    for seed in 1..=6u64 {
        for max_wait in [
            Duration::ZERO,
            Duration::from_secs(4),
            Duration::from_secs(600),
        ] {
            // Two binding cells: lock-free vs locked (a third that never binds).
            let two = |extra: bool| {
                let mut b = Pace::builder()
                    .requests_per_minute(100)
                    .tokens_per_minute(10_000)
                    .max_wait(max_wait);
                if extra {
                    b = b.output_tokens_per_minute(5);
                }
                b.build().unwrap()
            };
            let got = script(seed, vec![two(false), two(true)], 2).await;
            same(
                &got,
                &format!("two cells, seed {seed}, max_wait {max_wait:?}"),
            );
            assert!(got[0].0.iter().any(|o| matches!(o, Outcome::Refused(..))));
            // One binding cell: alone (lock-free), with a non-binding second
            // (lock-free), with two (locked).
            let one = |extras: usize| {
                let mut b = Pace::builder().tokens_per_minute(10_000).max_wait(max_wait);
                if extras >= 1 {
                    b = b.output_tokens_per_minute(5);
                }
                if extras >= 2 {
                    b = b.limit(Limit::new(Unit::OutputTokens, 7, Duration::from_secs(1)));
                }
                b.build().unwrap()
            };
            let got = script(seed, vec![one(0), one(1), one(2)], 1).await;
            same(
                &got,
                &format!("one cell, seed {seed}, max_wait {max_wait:?}"),
            );
        }
    }
}

// ---------------------------------------------------------------------------
// (7) ETAs after many calls.
// ---------------------------------------------------------------------------

/// 1,000 lock-free calls of 100 tokens (paused time, 10 ms apart): the
/// projection remembers the last 256 starts, oldest first, the last one
/// being the latest call; the typical cost is 100 tokens, so its next start
/// is what `start_for(100 tokens)` says.
#[tokio::test(start_paused = true)]
async fn projection_after_many_lock_free_calls() {
    let pace = Pace::builder()
        .requests_per_minute(6_000)
        .tokens_per_minute(600_000)
        .build()
        .unwrap();
    // A line watches it (as a bulkhead's `set_eta_source` does): its starts
    // are recorded from here on.
    pace.watch();
    let svc = service(&pace, new_log());
    let mut last = Instant::now();
    for _ in 0..1_000 {
        last = try_call(&svc, 100).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now = Instant::now();
    let mut p = pace.projection(now);
    let started = p.started().to_vec();
    assert_eq!(started.len(), 256);
    assert!(started.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(*started.last().unwrap(), last);
    assert_eq!(started[255] - started[0], Duration::from_millis(20 * 255));
    assert_eq!(p.waiting(), 0);
    assert_eq!(p.next_start(now), Some(now));
    // Drain the bucket with typical calls: the 600,001st token / 6,001st request.
    // The projection played forward with typical calls vs the real pacer
    // taking the same calls now: the same number fit at once, and the
    // projected start of the next one is the real refusal's retry_after.
    let mut projected_now: u32 = 0;
    let mut next = now;
    for _ in 0..7_000 {
        next = p.next_start(now).unwrap();
        if next != now {
            break;
        }
        projected_now += 1;
    }
    drop(p);
    assert_eq!(pace.start_for(&Cost::tokens(100)), Some(now));
    let mut real_now = 0;
    let refusal = loop {
        match pace.start_for(&Cost::tokens(100)) {
            Some(t) if t == now => {
                try_call(&svc, 100).await.unwrap();
                real_now += 1;
            }
            other => break other,
        }
        assert!(real_now < 7_000);
    };
    eprintln!(
        "projected {projected_now} at once, then {:?}; real {real_now}, then {:?}",
        next - now,
        refusal.map(|r| r - now)
    );
    // Float noise may cost the last unit of 6,000 (and the projection one
    // more); more would be a projection out of step with the cells.
    assert!((5_998..=6_000).contains(&projected_now), "{projected_now}");
    assert!(
        projected_now.abs_diff(real_now) <= 1,
        "{projected_now} vs {real_now}"
    );
    assert!(refusal.unwrap().saturating_duration_since(next) <= Duration::from_millis(10));
}

/// Real clock, four threads of lock-free calls: afterwards the projection's
/// record of starts holds 256 instants, every one within the run, in order
/// (the record is an estimate while calls race, exact once they stopped?
/// at least within the run).
#[test]
fn projection_record_after_threads() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let t0 = Instant::now();
    let pace = Pace::builder()
        .requests_per_minute(1_000_000)
        .tokens_per_minute(100_000_000)
        .build()
        .unwrap();
    pace.watch();
    let n = Arc::new(AtomicUsize::new(0));
    rt.block_on(async {
        let svc = service(&pace, new_log());
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let svc = svc.clone();
            let n = n.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..2_000 {
                    if try_call(&svc, 100).await.is_ok() {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let end = Instant::now();
    assert_eq!(n.load(Ordering::Relaxed), 8_000);
    let mut p = pace.projection(end);
    let started = p.started().to_vec();
    assert_eq!(started.len(), 256);
    assert!(
        started.iter().all(|s| *s >= t0 && *s <= end),
        "an instant outside the run"
    );
    let unordered = started.windows(2).filter(|w| w[0] > w[1]).count();
    eprintln!("{unordered} of 255 neighbours out of order");
    assert_eq!(p.waiting(), 0);
    // Starts are rounded up to the microsecond (`instant_at`).
    let next = p.next_start(end).unwrap();
    assert!(
        next >= end && next - end < Duration::from_micros(1),
        "{:?}",
        next - end
    );
}

// ---------------------------------------------------------------------------
// Extra: the count of waiters and the `tat`s after a pause ends with nobody
// calling, then lock-free calls resume exactly at the right time.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn after_a_pause_lock_free_calls_resume_on_time() {
    let pace = Pace::builder()
        .requests_per_minute(60)
        .tokens_per_minute(6_000)
        .max_wait(Duration::ZERO)
        .build()
        .unwrap();
    let svc = service(&pace, new_log());
    let t0 = Instant::now();
    svc.clone()
        .oneshot(Req {
            tokens: 100,
            throttle: Some(Duration::from_secs(5)),
            ..Req::default()
        })
        .await
        .unwrap();
    assert!(pace.snapshot().paused_until.is_some());
    // Paused: refused at once.
    let r = try_call(&svc, 1).await.unwrap_err();
    assert_eq!(r.0, RejectKind::BudgetExceeded);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(try_call(&svc, 1).await, Ok(t0 + Duration::from_secs(5)));
    // Requests cut to 75 %: 45/min → 1 request per 1.333 s. Burst 60 × 0.75? The
    // cell says; the sum over a minute from here stays within the snapshot's count.
    let cap = pace.snapshot().dims[0].capacity;
    let mut n = 0;
    while try_call(&svc, 0).await.is_ok() {
        n += 1;
        assert!(n < 1_000);
    }
    assert!(f64::from(n) <= cap, "{n} admitted at once, capacity {cap}");
}

/// Multi-thread FIFO: the bucket is drained, one call of 500 tokens waits
/// (50 ms at 10,000 tokens/s); four OS threads then fire calls of 0 tokens
/// (which fit at once on a drained, not owing, bucket) as fast as they can.
/// None may start before the waiter.
#[test]
fn threads_of_zero_token_calls_do_not_overtake_a_waiter() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    for round in 0..5 {
        let pace = Pace::builder()
            .requests_per_minute(100_000_000)
            .tokens_per_minute(600_000)
            .build()
            .unwrap();
        let log = new_log();
        let svc = service(&pace, log.clone());
        let waiter_done = Arc::new(AtomicBool::new(false));
        let newcomers = Arc::new(AtomicUsize::new(0));
        rt.block_on(async {
            svc.clone()
                .oneshot(Req {
                    id: 0,
                    tokens: 600_000,
                    ..Req::default()
                })
                .await
                .unwrap();
            let t_wait = Instant::now();
            let waiter = {
                let svc = svc.clone();
                let done = waiter_done.clone();
                tokio::spawn(async move {
                    svc.oneshot(Req {
                        id: 1,
                        tokens: 500,
                        ..Req::default()
                    })
                    .await
                    .unwrap();
                    done.store(true, Ordering::SeqCst);
                })
            };
            while pace.snapshot().waiting == 0 {
                tokio::task::yield_now().await;
            }
            let mut hammers = Vec::new();
            for _ in 0..4 {
                let svc = svc.clone();
                let done = waiter_done.clone();
                let newcomers = newcomers.clone();
                hammers.push(tokio::spawn(async move {
                    let mut k = 0;
                    while !done.load(Ordering::SeqCst) && k < 200_000 {
                        svc.clone()
                            .oneshot(Req {
                                id: 2,
                                tokens: 0,
                                ..Req::default()
                            })
                            .await
                            .unwrap();
                        newcomers.fetch_add(1, Ordering::Relaxed);
                        k += 1;
                    }
                }));
            }
            waiter.await.unwrap();
            for h in hammers {
                h.await.unwrap();
            }
            assert!(
                t_wait.elapsed() >= Duration::from_millis(49),
                "{:?}",
                t_wait.elapsed()
            );
        });
        let log = log.lock().unwrap().clone();
        let ids: Vec<usize> = log.iter().map(|l| l.0).collect();
        let w = ids.iter().position(|i| *i == 1).unwrap();
        eprintln!(
            "round {round}: {} newcomers, waiter started {w}th",
            newcomers.load(Ordering::Relaxed)
        );
        assert_eq!(
            w,
            1,
            "round {round}: {} calls of 0 tokens started before the waiter",
            w - 1
        );
    }
}

/// A keyed pacer: the shared limits are a pacer of their own (one rolling
/// cell: it has the lock-free word), reserved on by every key's calls under
/// its lock. Four threads hammer three keys (30,000 TPM each) against a
/// shared 50,000 TPM while a fifth snapshots and peeks at the shared pacer
/// and at the keys. Total tokens ≤ 50,000 + refill; each key ≤ 30,000 + refill.
#[test]
fn keyed_pacer_with_shared_limits_under_threads() {
    use semaforo::pace::KeyedPace;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    for round in 0..2u64 {
        let t_build = Instant::now();
        let models = KeyedPace::builder(Pace::builder().tokens_per_minute(30_000))
            .shared(Pace::builder().tokens_per_minute(50_000))
            .build()
            .unwrap();
        let admitted = Arc::new(Mutex::new(Vec::<(Instant, Instant, usize, u64)>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        rt.block_on(async {
            let svc = ServiceBuilder::new()
                .layer(
                    models
                        .layer()
                        .key(|(k, _): &(usize, u64)| Some(format!("m{k}")))
                        .weigh(|(_, t): &(usize, u64)| Cost::tokens(*t)),
                )
                .service(tower::service_fn(|r: (usize, u64)| async move {
                    Ok::<_, std::io::Error>(r)
                }));
            let mut tasks = Vec::new();
            for t in 0..8u64 {
                let svc = svc.clone();
                let admitted = admitted.clone();
                let models = models.clone();
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng(round * 101 + t + 1);
                    for i in 0..3_000 {
                        let key = rng.below(3) as usize;
                        let tokens = [0, 1, 9, 250, 4_000, 20_000][rng.below(6) as usize];
                        let before = Instant::now();
                        // max_wait: refuse rather than wait (a key without
                        // max_wait would wait; use a timeout of zero instead).
                        let r = tokio::time::timeout(
                            Duration::ZERO,
                            svc.clone().oneshot((key, tokens)),
                        )
                        .await;
                        let after = Instant::now();
                        if let Ok(Ok(_)) = r {
                            admitted.lock().unwrap().push((before, after, key, tokens));
                        }
                        if i % 32 == 0 {
                            tokio::task::yield_now().await;
                        }
                        if i % 500 == 0 {
                            let _ = models.start_for(Some("m1"), &Cost::tokens(10));
                        }
                    }
                }));
            }
            let chaos = {
                let models = models.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let shared = models.shared().unwrap();
                        let s = shared.snapshot();
                        assert!(s.dims[0].available <= s.dims[0].capacity + 1e-6);
                        let _ = shared.start_for(&Cost::tokens(5));
                        let _ = models.get(Some("m2")).snapshot();
                        std::thread::yield_now();
                    }
                })
            };
            for t in tasks {
                t.await.unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            chaos.join().unwrap();
        });
        let elapsed = t_build.elapsed().as_secs_f64();
        let calls = admitted.lock().unwrap().clone();
        let total: u64 = calls.iter().map(|c| c.3).sum();
        eprintln!(
            "keyed round {round}: {} admitted, {total} tokens in {elapsed:.3}s",
            calls.len()
        );
        assert!(
            total as f64 <= 50_000.0 + 50_000.0 / 60.0 * elapsed + 1e-3,
            "{total}"
        );
        let all: Vec<_> = calls.iter().map(|c| (c.0, c.1, c.3)).collect();
        check_windows(&all, 50_000.0, 50_000.0 / 60.0, 1e-3).unwrap();
        for k in 0..3 {
            let one: Vec<_> = calls
                .iter()
                .filter(|c| c.2 == k)
                .map(|c| (c.0, c.1, c.3))
                .collect();
            check_windows(&one, 30_000.0, 500.0, 1e-3).unwrap();
        }
    }
}
