//! Outside trial of the keyed quota in wait mode (`max_wait`) with a global
//! limit beside the per-key plans: rate bound, conservation, FIFO per key,
//! max_wait, cancellation, close, extreme configurations. Public API only,
//! written from the docs on 88f10dd. It found a wrongful refusal at arrival
//! under dropped waiters and global races (fixed by 79a33a9, the test below
//! says how) and that waits overstay `max_wait` by tokio's millisecond timer
//! (now documented in the crate docs; the two tests check that bound).

use futures::FutureExt;
use semaforo::quota::{PlanId, Quota, QuotaBuilder, Rate};
use semaforo::{BoxError, RejectKind, Rejected};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{service_fn, Service, ServiceExt};

// ---------------------------------------------------------------- harness

#[derive(Clone, Debug)]
struct Req {
    key: u32,
    plan: PlanId,
    cost: u32,
    id: u64,
}

/// (id, key, cost, admitted at) in the order the inner service was called.
type Log = Arc<Mutex<Vec<(u64, u32, u32, Instant)>>>;
type Svc = BoxCloneService<Req, u64, BoxError>;

fn service(q: &Quota<u32>, log: Log) -> Svc {
    let inner = service_fn(move |r: Req| {
        log.lock()
            .unwrap()
            .push((r.id, r.key, r.cost, Instant::now()));
        async move { Ok::<u64, BoxError>(r.id) }
    });
    let layer = q.layer(|r: &Req| (r.key, r.plan)).cost(|r: &Req| r.cost);
    BoxCloneService::new(tower::Layer::layer(&layer, inner))
}

struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn ns(d: Duration) -> u128 {
    d.as_nanos()
}

fn unit_ns(r: Rate) -> u128 {
    r.per.as_nanos().div_ceil(u128::from(r.count))
}

/// Checks `count·W/per + burst` over every window between admissions
/// (`(at, cost)` sorted by time). Returns a description of the first
/// violation.
fn rate_violation(adm: &[(Instant, u32)], r: Rate) -> Option<String> {
    let mut a: Vec<(Instant, u32)> = adm.iter().copied().filter(|x| x.1 > 0).collect();
    a.sort_by_key(|x| x.0);
    for i in 0..a.len() {
        let mut sum: u128 = 0;
        for j in i..a.len() {
            sum += u128::from(a[j].1);
            let w = ns(a[j].0 - a[i].0);
            // sum ≤ count·W/per + burst  ⇔  sum·per ≤ count·W + burst·per
            let lhs = sum * ns(r.per);
            let rhs = u128::from(r.count) * w + u128::from(r.burst) * ns(r.per);
            if lhs > rhs {
                return Some(format!(
                    "{sum} units in a window of {:?} (bound {:.3}) from admission {i} to {j}",
                    a[j].0 - a[i].0,
                    rhs as f64 / ns(r.per) as f64
                ));
            }
        }
    }
    None
}

/// A GCRA model of one cell: units free at `now` after `adm` (admissions
/// `(at, cost)` in order).
fn model_tat(adm: &[(Instant, u32)], r: Rate, origin: Instant) -> u128 {
    let u = unit_ns(r);
    let mut tat: u128 = 0;
    for &(at, c) in adm {
        if c == 0 {
            continue;
        }
        let t = ns(at - origin);
        tat = tat.max(t) + u128::from(c) * u;
    }
    tat
}

fn model_free(tat: u128, r: Rate, now: u128) -> u64 {
    let u = unit_ns(r);
    let start = tat.max(now);
    // max k: start + k·u − now ≤ burst·u
    let room = u128::from(r.burst) * u - (start - now).min(u128::from(r.burst) * u);
    (room / u) as u64
}

#[derive(Debug, Clone)]
enum Outcome {
    Admitted(Instant),
    Refused {
        kind: RejectKind,
        retry_after: Option<Duration>,
        at: Instant,
    },
    Cancelled(Instant),
}

#[derive(Debug, Clone)]
struct Planned {
    at: Duration,
    key: u32,
    cost: u32,
    /// Drop the future this long after the call (Some(0): before first poll).
    drop_after: Option<Duration>,
}

#[derive(Debug, Clone)]
struct Done {
    id: u64,
    key: u32,
    cost: u32,
    arrival: Instant,
    out: Outcome,
}

fn classify(e: &BoxError) -> (RejectKind, Option<Duration>) {
    let r = Rejected::from_box(e).unwrap_or_else(|| panic!("not a Rejected: {e}"));
    (r.kind(), r.retry_after())
}

/// Runs `calls` (sorted by `at`) against `svc` on paused time; every call
/// made in arrival order by the driver, awaited in its own task.
async fn run(svc: &Svc, plan_of: impl Fn(u32) -> PlanId, calls: &[Planned]) -> Vec<Done> {
    let start = Instant::now();
    let done: Arc<Mutex<Vec<Done>>> = Arc::default();
    let mut handles = Vec::new();
    for (i, c) in calls.iter().enumerate() {
        tokio::time::sleep_until(start + c.at).await;
        let mut s = svc.clone();
        s.ready().await.unwrap();
        let req = Req {
            key: c.key,
            plan: plan_of(c.key),
            cost: c.cost,
            id: i as u64,
        };
        let arrival = Instant::now();
        let fut = s.call(req);
        let done = done.clone();
        let (key, cost, drop_after) = (c.key, c.cost, c.drop_after);
        if drop_after == Some(Duration::ZERO) {
            drop(fut);
            done.lock().unwrap().push(Done {
                id: i as u64,
                key,
                cost,
                arrival,
                out: Outcome::Cancelled(arrival),
            });
            continue;
        }
        handles.push(tokio::spawn(async move {
            let r = match drop_after {
                Some(d) => tokio::time::timeout(d, fut).await.ok(),
                None => Some(fut.await),
            };
            let now = Instant::now();
            let out = match r {
                None => Outcome::Cancelled(now),
                Some(Ok(_)) => Outcome::Admitted(now),
                Some(Err(e)) => {
                    let (kind, retry_after) = classify(&e);
                    Outcome::Refused {
                        kind,
                        retry_after,
                        at: now,
                    }
                }
            };
            done.lock().unwrap().push(Done {
                id: i as u64,
                key,
                cost,
                arrival,
                out,
            });
        }));
    }
    // Nothing may hang: a day of paused time is plenty for every case here.
    tokio::time::timeout(Duration::from_secs(86_400), async {
        for h in handles {
            h.await.unwrap();
        }
    })
    .await
    .expect("a waiter hung");
    let mut v = done.lock().unwrap().clone();
    v.sort_by_key(|d| d.id);
    v
}

/// A call dropped before its first poll whose inner service was called
/// (admitted at `call`) is an admission at its arrival.
fn settle_unpolled(done: &mut [Done], log: &[(u64, u32, u32, Instant)]) -> u64 {
    let mut unknown = 0;
    for d in done.iter_mut() {
        if let Outcome::Cancelled(at) = d.out {
            if at == d.arrival {
                if let Some(x) = log.iter().find(|x| x.0 == d.id) {
                    d.out = Outcome::Admitted(x.3);
                } else {
                    unknown += 1;
                }
            }
        }
    }
    unknown
}

/// Fires cost-1 calls of `key` at this instant, each polled once; counts
/// those admitted at once (stops at the first that is not).
fn probe(svc: &Svc, key: u32, plan: PlanId, max: u64) -> u64 {
    let mut n = 0;
    for i in 0..max {
        let mut s = svc.clone();
        let fut = s.call(Req {
            key,
            plan,
            cost: 1,
            id: 1_000_000 + i,
        });
        match fut.now_or_never() {
            Some(Ok(_)) => n += 1,
            _ => break,
        }
    }
    n
}

fn quota(b: QuotaBuilder) -> Quota<u32> {
    b.build::<u32>().expect("valid config")
}

// ----------------------------------------------------------- smoke tests

#[tokio::test(start_paused = true)]
async fn smoke_wait_mode_with_global_admits_in_order_at_exact_instants() {
    // Plan 10/s burst 1 (100 ms a unit), global 5/s burst 1 (200 ms): the
    // global limit is the slower one; 4 calls at t=0 go at 0, 200, 400, 600 ms.
    let q = quota(
        Quota::builder()
            .plan("p", Rate::per_second(10).burst(1))
            .global(Rate::per_second(5).burst(1))
            .max_wait(Duration::from_secs(1)),
    );
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let calls: Vec<Planned> = (0..4)
        .map(|_| Planned {
            at: Duration::ZERO,
            key: 7,
            cost: 1,
            drop_after: None,
        })
        .collect();
    let t0 = Instant::now();
    let done = run(&svc, |_| PlanId::FIRST, &calls).await;
    let times: Vec<u128> = done
        .iter()
        .map(|d| match d.out {
            Outcome::Admitted(t) => (t - t0).as_millis(),
            ref o => panic!("{o:?}"),
        })
        .collect();
    assert_eq!(times, vec![0, 200, 400, 600]);
    let ids: Vec<u64> = log.lock().unwrap().iter().map(|x| x.0).collect();
    assert_eq!(ids, vec![0, 1, 2, 3]);
}

// ------------------------------------------------- random paused scenarios

#[derive(Debug, Clone, Copy)]
struct Config {
    plans: [Rate; 2],
    global: Rate,
    max_wait: Duration,
}

fn random_config(rng: &mut Rng) -> Config {
    // Units that are whole nanoseconds, so the model is exact.
    let rates = [
        Rate::per_second(10),
        Rate::per_second(4),
        Rate::new(3, Duration::from_millis(600)),
        Rate::per_second(1),
        Rate::per_second(20),
    ];
    let pick = |rng: &mut Rng| {
        let r = rates[rng.below(rates.len() as u64) as usize];
        r.burst(1 + rng.below(4) as u32)
    };
    let waits = [
        Duration::from_millis(1),
        Duration::from_millis(50),
        Duration::from_millis(300),
        Duration::from_secs(1),
        Duration::from_secs(5),
    ];
    Config {
        plans: [pick(rng), pick(rng)],
        global: pick(rng),
        max_wait: waits[rng.below(waits.len() as u64) as usize],
    }
}

fn plan_ids(q: &Quota<u32>) -> [PlanId; 2] {
    [q.plan_id("a").unwrap(), q.plan_id("b").unwrap()]
}

/// Every promise checked on one run; returns the failures.
fn check_run(
    cfg: &Config,
    keys: u32,
    done: &[Done],
    log: &[(u64, u32, u32, Instant)],
    closed: bool,
) -> Vec<String> {
    let mut f = Vec::new();
    let plan_of = |k: u32| cfg.plans[(k % 2) as usize];
    let by_id = |id: u64| done.iter().find(|d| d.id == id).unwrap();
    for d in done {
        let never = d.cost > plan_of(d.key).burst || d.cost > cfg.global.burst;
        match d.out {
            Outcome::Admitted(t) => {
                if t - d.arrival > cfg.max_wait {
                    f.push(format!(
                        "call {} admitted after waiting {:?} > max_wait {:?}",
                        d.id,
                        t - d.arrival,
                        cfg.max_wait
                    ));
                }
                if never && d.cost > 0 {
                    f.push(format!(
                        "call {} of cost {} above a burst was admitted",
                        d.id, d.cost
                    ));
                }
            }
            Outcome::Refused {
                kind,
                retry_after,
                at,
            } => {
                if closed && kind == RejectKind::ShuttingDown {
                    continue;
                }
                if kind != RejectKind::QuotaExceeded {
                    f.push(format!("call {} refused {kind:?}", d.id));
                }
                if at - d.arrival > cfg.max_wait {
                    f.push(format!(
                        "call {} refused only after {:?} > max_wait",
                        d.id,
                        at - d.arrival
                    ));
                }
                if never {
                    if retry_after.is_some() || at != d.arrival {
                        f.push(format!("call {} of cost {} above a burst: retry_after {retry_after:?}, refused after {:?}", d.id, d.cost, at - d.arrival));
                    }
                } else if d.cost == 0 {
                    f.push(format!("free call {} refused", d.id));
                } else if retry_after.is_none_or(|r| r.is_zero()) {
                    f.push(format!(
                        "call {} (cost {}) refused without a retry_after: {retry_after:?}",
                        d.id, d.cost
                    ));
                }
            }
            Outcome::Cancelled(_) => {}
        }
    }
    // Log and outcomes agree.
    let admitted: Vec<&Done> = done
        .iter()
        .filter(|d| matches!(d.out, Outcome::Admitted(_)))
        .collect();
    if admitted.len() != log.len() {
        f.push(format!(
            "{} admitted outcomes, {} inner calls",
            admitted.len(),
            log.len()
        ));
    }
    // FIFO per key among costed calls.
    for (pos_j, &(j, key, cost_j, tj)) in log.iter().enumerate() {
        if cost_j == 0 {
            continue;
        }
        for i in 0..j {
            let di = by_id(i);
            if di.key != key
                || di.cost == 0
                || di.cost > plan_of(key).burst
                || di.cost > cfg.global.burst
            {
                continue;
            }
            if di.arrival > by_id(j).arrival {
                continue;
            }
            match di.out {
                Outcome::Admitted(_) => {
                    let pos_i = log.iter().position(|x| x.0 == i).unwrap();
                    if pos_i > pos_j {
                        f.push(format!(
                            "key {key}: call {j} admitted at {:?} before earlier call {i}",
                            tj
                        ));
                    }
                }
                Outcome::Refused {
                    at, retry_after, ..
                } => {
                    if at > tj {
                        f.push(format!("key {key}: call {j} admitted at {tj:?} while earlier call {i} still waited (refused at {at:?}, retry_after {retry_after:?})"));
                    } else if at == tj && at != di.arrival && cost_j >= di.cost {
                        f.push(format!("key {key}: call {i} refused at its deadline while call {j} behind it (cost {cost_j} >= {}) was admitted at that instant", di.cost));
                    }
                }
                Outcome::Cancelled(at) => {
                    if at > tj {
                        f.push(format!("key {key}: call {j} admitted before earlier call {i} left (cancelled at {at:?})"));
                    }
                }
            }
        }
    }
    // Rate bound per key and global.
    for k in 0..keys {
        let adm: Vec<(Instant, u32)> = log
            .iter()
            .filter(|x| x.1 == k)
            .map(|x| (x.3, x.2))
            .collect();
        if let Some(v) = rate_violation(&adm, plan_of(k)) {
            f.push(format!("key {k} over its plan {:?}: {v}", plan_of(k)));
        }
    }
    let all: Vec<(Instant, u32)> = log.iter().map(|x| (x.3, x.2)).collect();
    if let Some(v) = rate_violation(&all, cfg.global) {
        f.push(format!("global {:?} exceeded: {v}", cfg.global));
    }
    f
}

fn random_calls(rng: &mut Rng, cfg: &Config, keys: u32, n: usize, drops: bool) -> Vec<Planned> {
    let mut calls: Vec<Planned> = (0..n)
        .map(|_| {
            let key = rng.below(u64::from(keys)) as u32;
            let b = cfg.plans[(key % 2) as usize].burst;
            let cost = match rng.below(20) {
                0 => 0,
                1 => b + 1,
                2 => u32::MAX,
                _ => 1 + rng.below(u64::from(b)) as u32,
            };
            let drop_after = if drops && rng.below(6) == 0 {
                Some(match rng.below(3) {
                    0 => Duration::ZERO,
                    _ => Duration::from_millis(1 + rng.below(700)),
                })
            } else {
                None
            };
            Planned {
                at: Duration::from_millis(rng.below(300) * 10),
                key,
                cost,
                drop_after,
            }
        })
        .collect();
    calls.sort_by_key(|c| c.at);
    calls
}

async fn one_random_case(seed: u64, drops: bool) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let cfg = random_config(&mut rng);
    let keys = 1 + rng.below(4) as u32;
    let q = quota(
        Quota::builder()
            .plan("a", cfg.plans[0])
            .plan("b", cfg.plans[1])
            .global(cfg.global)
            .max_wait(cfg.max_wait),
    );
    let ids = plan_ids(&q);
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let origin = Instant::now();
    let n = 10 + rng.below(50) as usize;
    let calls = random_calls(&mut rng, &cfg, keys, n, drops);
    let mut done = run(&svc, |k| ids[(k % 2) as usize], &calls).await;
    let log_v = log.lock().unwrap().clone();
    let unknown = settle_unpolled(&mut done, &log_v);
    let mut f = check_run(&cfg, keys, &done, &log_v, false);
    // Snapshot counts.
    let snap = q.snapshot();
    let n_adm = done
        .iter()
        .filter(|d| matches!(d.out, Outcome::Admitted(_)))
        .count() as u64;
    let n_ref = done
        .iter()
        .filter(|d| matches!(d.out, Outcome::Refused { .. }))
        .count() as u64;
    // A call dropped before its first poll may have been refused at `call`.
    if snap.admitted != n_adm
        || snap.waiting != 0
        || snap.rejected < n_ref
        || snap.rejected > n_ref + unknown
    {
        f.push(format!(
            "snapshot {snap:?}: expected admitted {n_adm}, rejected {n_ref}..={}, waiting 0",
            n_ref + unknown
        ));
    }
    // Conservation at a frozen instant: what each key and the global cell
    // have left is exactly what the admissions leave.
    let now = ns(Instant::now() - origin);
    let mut all: Vec<(Instant, u32)> = log_v.iter().map(|x| (x.3, x.2)).collect();
    for k in 0..keys {
        let plan = cfg.plans[(k % 2) as usize];
        let adm: Vec<(Instant, u32)> = log_v
            .iter()
            .filter(|x| x.1 == k)
            .map(|x| (x.3, x.2))
            .collect();
        let key_free = model_free(model_tat(&adm, plan, origin), plan, now);
        let glob_free = model_free(model_tat(&all, cfg.global, origin), cfg.global, now);
        let expect = key_free.min(glob_free);
        let got = probe(&svc, k, ids[(k % 2) as usize], key_free + 2);
        if got != expect {
            f.push(format!("key {k}: {got} units admitted at a frozen instant, model says {expect} (key {key_free}, global {glob_free})"));
        }
        for _ in 0..got {
            all.push((Instant::now(), 1));
        }
    }
    if !f.is_empty() {
        f.insert(0, format!("seed {seed}: {cfg:?}, {keys} keys, {n} calls"));
    }
    f
}

#[tokio::test(start_paused = true)]
async fn random_paused_runs_hold_rate_fifo_max_wait_and_conservation() {
    let mut fails = Vec::new();
    for seed in 1..=300 {
        let f = one_random_case(seed, false).await;
        if !f.is_empty() {
            fails.push(f.join("\n  "));
        }
    }
    assert!(
        fails.is_empty(),
        "{} of 300 cases failed:\n{}",
        fails.len(),
        fails.iter().take(6).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[tokio::test(start_paused = true)]
async fn random_paused_runs_with_cancellations_hold_every_promise() {
    let mut fails = Vec::new();
    for seed in 1_001..=1_300 {
        let f = one_random_case(seed, true).await;
        if !f.is_empty() {
            fails.push(f.join("\n  "));
        }
    }
    assert!(
        fails.is_empty(),
        "{} of 300 cases failed:\n{}",
        fails.len(),
        fails.iter().take(6).cloned().collect::<Vec<_>>().join("\n")
    );
}

// ------------------------------------------------ deterministic, paused

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

type Fut = Pin<Box<dyn Future<Output = Result<u64, BoxError>> + Send>>;

fn call(svc: &Svc, key: u32, plan: PlanId, cost: u32, id: u64) -> Fut {
    let mut s = svc.clone();
    Box::pin(s.call(Req {
        key,
        plan,
        cost,
        id,
    }))
}

fn poll_once(f: &mut Fut) -> Poll<Result<u64, BoxError>> {
    let w = futures::task::noop_waker();
    let mut cx = Context::from_waker(&w);
    f.as_mut().poll(&mut cx)
}

fn is_pending(p: &Poll<Result<u64, BoxError>>) -> bool {
    matches!(p, Poll::Pending)
}

fn refusal(p: Poll<Result<u64, BoxError>>) -> (RejectKind, Option<Duration>) {
    match p {
        Poll::Ready(Err(e)) => classify(&e),
        Poll::Ready(Ok(id)) => panic!("admitted {id}, expected a refusal"),
        Poll::Pending => panic!("pending, expected a refusal"),
    }
}

fn ms(d: u64) -> Duration {
    Duration::from_millis(d)
}

/// Awaits a future to its end, returning (ok?, elapsed since `t0`).
async fn finish(f: Fut, t0: Instant) -> (Result<u64, (RejectKind, Option<Duration>)>, Duration) {
    let r = tokio::time::timeout(Duration::from_secs(86_400), f)
        .await
        .expect("hung");
    (r.map_err(|e| classify(&e)), Instant::now() - t0)
}

#[tokio::test(start_paused = true)]
async fn a_newcomer_does_not_overtake_a_front_waiting_for_its_key_with_a_unit_free() {
    // Plan 1/s burst 3; global loose. A takes all 3 at t=0. B (cost 2) at
    // 0.5 s waits for 2 units (t=2 s). C (cost 1) at 1 s finds 1 unit free
    // but B is ahead: it must wait, B at 2 s, C at 3 s.
    let q = quota(
        Quota::builder()
            .plan("p", Rate::per_second(1).burst(3))
            .global(Rate::per_second(100))
            .max_wait(Duration::from_secs(10)),
    );
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    let mut a = call(&svc, 1, p, 3, 0);
    assert!(matches!(poll_once(&mut a), Poll::Ready(Ok(0))));
    tokio::time::advance(ms(500)).await;
    let b = call(&svc, 1, p, 2, 1);
    let hb = tokio::spawn(finish(b, t0));
    tokio::time::advance(ms(500)).await;
    let mut c = call(&svc, 1, p, 1, 2);
    assert!(
        is_pending(&poll_once(&mut c)),
        "C overtook B with a unit free"
    );
    let hc = tokio::spawn(finish(c, t0));
    let (rb, tb) = hb.await.unwrap();
    let (rc, tc) = hc.await.unwrap();
    assert_eq!((rb.unwrap(), tb), (1, ms(2_000)));
    assert_eq!((rc.unwrap(), tc), (2, ms(3_000)));
}

#[tokio::test(start_paused = true)]
async fn at_the_instant_the_global_unit_frees_a_newcomer_of_the_same_key_waits_behind_the_front() {
    // Global 1/s burst 1, plan loose. Key 2 takes the global unit at 0; key
    // 1's A waits for it (due at 1 s). At exactly 1 s, before A's task runs,
    // newcomer B of key 1 arrives: its key has room, the global unit is
    // free — but A is ahead. B must not take it.
    let q = quota(
        Quota::builder()
            .plan("p", Rate::per_second(100))
            .global(Rate::per_second(1).burst(1))
            .max_wait(Duration::from_secs(10)),
    );
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    let mut x = call(&svc, 2, p, 1, 0);
    assert!(matches!(poll_once(&mut x), Poll::Ready(Ok(0))));
    let mut a = call(&svc, 1, p, 1, 1);
    assert!(is_pending(&poll_once(&mut a)));
    tokio::time::advance(ms(1_000)).await;
    let mut b = call(&svc, 1, p, 1, 2);
    let pb = poll_once(&mut b);
    assert!(
        is_pending(&pb),
        "newcomer B took the unit its key's front A waited for: {pb:?}"
    );
    let pa = poll_once(&mut a);
    assert!(matches!(pa, Poll::Ready(Ok(1))), "A at its turn: {pa:?}");
    let hb = tokio::spawn(finish(b, t0));
    let (rb, tb) = hb.await.unwrap();
    assert_eq!((rb.unwrap(), tb), (2, ms(2_000)));
    assert_eq!(q.snapshot().waiting, 0);
}

#[tokio::test(start_paused = true)]
async fn another_key_may_take_the_global_unit_and_the_front_then_waits_without_being_charged_again()
{
    // Global 1/s burst 2, plan 1 per 10 s burst 3. Key 2 takes both global
    // units at 0; key 1's A waits (due 1 s). At 1 s key 3 takes the unit
    // first (keys compete at the instant each checks); A waits to 2 s. Key
    // 1 must be charged once: at 4 s (global full again) it has
    // 3 − (12 s − 4 s)/10 s = 2 units free (1 if charged twice).
    let q = quota(
        Quota::builder()
            .plan("p", Rate::new(1, Duration::from_secs(10)).burst(3))
            .global(Rate::per_second(1).burst(2))
            .max_wait(Duration::from_secs(10)),
    );
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    let mut x = call(&svc, 2, p, 2, 0);
    assert!(matches!(poll_once(&mut x), Poll::Ready(Ok(0))));
    let mut a = call(&svc, 1, p, 1, 1);
    assert!(is_pending(&poll_once(&mut a)));
    tokio::time::advance(ms(1_000)).await;
    let mut y = call(&svc, 3, p, 1, 2);
    assert!(
        matches!(poll_once(&mut y), Poll::Ready(Ok(2))),
        "key 3 competes at the instant it checks"
    );
    assert!(is_pending(&poll_once(&mut a)));
    let (ra, ta) = finish(a, t0).await;
    assert_eq!((ra.unwrap(), ta), (1, ms(2_000)));
    tokio::time::advance(ms(2_000)).await;
    assert_eq!(Instant::now() - t0, ms(4_000));
    assert_eq!(
        probe(&svc, 1, p, 4),
        2,
        "key 1 charged more than its one admission"
    );
}

// ---------------------------------------------------------------- max_wait

#[tokio::test(start_paused = true)]
async fn arrival_estimate_counts_the_global_limit_and_max_wait_is_inclusive() {
    // Plan 10/s, global 1/s burst 1, max_wait 3 s: 5 calls at 0 → 0, 1, 2,
    // 3 s (a wait of exactly max_wait is allowed); the 5th would wait 4 s:
    // refused at once with retry_after 4 s.
    let q = quota(
        Quota::builder()
            .plan("p", Rate::per_second(10))
            .global(Rate::per_second(1).burst(1))
            .max_wait(ms(3_000)),
    );
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    let mut hs = Vec::new();
    for i in 0..4 {
        hs.push(tokio::spawn(finish(call(&svc, 1, p, 1, i), t0)));
    }
    tokio::task::yield_now().await;
    let mut fifth = call(&svc, 1, p, 1, 4);
    let r = refusal(poll_once(&mut fifth));
    assert_eq!(r, (RejectKind::QuotaExceeded, Some(ms(4_000))));
    let mut got = Vec::new();
    for h in hs {
        let (r, t) = h.await.unwrap();
        got.push((r.unwrap(), t.as_millis()));
    }
    assert_eq!(got, vec![(0, 0), (1, 1_000), (2, 2_000), (3, 3_000)]);
}

#[tokio::test(start_paused = true)]
async fn a_front_that_another_key_outraces_is_refused_by_its_deadline_with_the_rest_of_its_wait() {
    // Global 1/s burst 1; plan loose; max_wait 1.5 s. Key 2 takes the
    // global unit at 0; key 1's A waits (due 1 s). At 1 s key 3 takes the
    // unit first: A's next chance is 2 s, past its deadline (1.5 s). A must
    // be answered no later than 1.5 s, QuotaExceeded, and its retry_after
    // must point at 2 s (when the unit comes back), from when it is refused.
    let q = quota(
        Quota::builder()
            .plan("p", Rate::per_second(100))
            .global(Rate::per_second(1).burst(1))
            .max_wait(ms(1_500)),
    );
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    let mut x = call(&svc, 2, p, 1, 0);
    assert!(matches!(poll_once(&mut x), Poll::Ready(Ok(0))));
    let mut a = call(&svc, 1, p, 1, 1);
    assert!(is_pending(&poll_once(&mut a)));
    // B behind A: its estimate 2 s > 1.5 s → refused at once with 2 s.
    let mut b = call(&svc, 1, p, 1, 2);
    assert_eq!(
        refusal(poll_once(&mut b)),
        (RejectKind::QuotaExceeded, Some(ms(2_000)))
    );
    tokio::time::advance(ms(1_000)).await;
    let mut y = call(&svc, 3, p, 1, 3);
    assert!(matches!(poll_once(&mut y), Poll::Ready(Ok(3))));
    let (ra, ta) = finish(a, t0).await;
    let (kind, ra_after) = ra.expect_err("A cannot be admitted within its max_wait");
    assert_eq!(kind, RejectKind::QuotaExceeded);
    assert!(ta <= ms(1_500), "A answered after {ta:?} > max_wait");
    assert_eq!(
        ta + ra_after.unwrap(),
        ms(2_000),
        "refused at {ta:?} with retry_after {ra_after:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn max_wait_of_duration_max_waits_without_overflow() {
    let q = quota(
        Quota::builder()
            .plan("p", Rate::per_hour(1).burst(1))
            .global(Rate::per_second(1))
            .max_wait(Duration::MAX),
    );
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    let hs: Vec<_> = (0..3)
        .map(|i| tokio::spawn(finish(call(&svc, 1, p, 1, i), t0)))
        .collect();
    let mut got = Vec::new();
    for h in hs {
        let (r, t) = h.await.expect("a waiter panicked");
        got.push((r.unwrap(), t.as_secs()));
    }
    assert_eq!(got, vec![(0, 0), (1, 3_600), (2, 7_200)]);
}

#[test]
fn max_wait_zero_is_a_config_error_naming_max_wait() {
    let e = Quota::builder()
        .plan("p", Rate::per_second(1))
        .global(Rate::per_second(1))
        .max_wait(Duration::ZERO)
        .build::<u32>()
        .unwrap_err();
    assert_eq!((e.component, e.field), ("quota", "max_wait"));
}

// ------------------------------------------------------------ cancellation

fn line_quota(global: Option<Rate>) -> (Quota<u32>, Svc, Log) {
    let mut b = Quota::builder()
        .plan("p", Rate::per_second(1).burst(1))
        .max_wait(ms(10_000));
    if let Some(g) = global {
        b = b.global(g);
    }
    let q = quota(b);
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    (q, svc, log)
}

#[tokio::test(start_paused = true)]
async fn dropping_a_waiter_before_its_first_poll_gives_its_turn_to_the_next() {
    let (q, svc, _log) = line_quota(Some(Rate::per_second(100)));
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    let mut x = call(&svc, 1, p, 1, 0);
    assert!(matches!(poll_once(&mut x), Poll::Ready(Ok(0))));
    let ha = tokio::spawn(finish(call(&svc, 1, p, 1, 1), t0)); // due 1 s
    let b = call(&svc, 1, p, 1, 2); // due 2 s, dropped unpolled
    let hc = tokio::spawn(finish(call(&svc, 1, p, 1, 3), t0)); // was due 3 s
    tokio::task::yield_now().await;
    drop(b);
    assert_eq!(q.snapshot().waiting, 2, "A and C wait, B left");
    let (ra, ta) = ha.await.unwrap();
    let (rc, tc) = hc.await.unwrap();
    assert_eq!((ra.unwrap(), ta), (1, ms(1_000)));
    assert_eq!(
        (rc.unwrap(), tc),
        (3, ms(2_000)),
        "C did not move up into B's turn"
    );
    // Conservation: 3 admitted at 0, 1, 2 s; at 3 s exactly one unit free.
    tokio::time::advance(ms(1_000)).await;
    assert_eq!(probe(&svc, 1, p, 3), 1);
    let s = q.snapshot();
    assert_eq!((s.admitted, s.rejected, s.waiting), (4, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn dropping_the_front_while_it_waits_moves_the_next_up_to_its_instant() {
    let (q, svc, _log) = line_quota(Some(Rate::per_second(100)));
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    let mut x = call(&svc, 1, p, 1, 0);
    assert!(matches!(poll_once(&mut x), Poll::Ready(Ok(0))));
    let mut a = call(&svc, 1, p, 1, 1);
    assert!(is_pending(&poll_once(&mut a)));
    let hb = tokio::spawn(finish(call(&svc, 1, p, 1, 2), t0));
    tokio::time::advance(ms(500)).await;
    drop(a);
    let (rb, tb) = hb.await.unwrap();
    assert_eq!((rb.unwrap(), tb), (2, ms(1_000)));
    assert_eq!(q.snapshot().admitted, 2);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_front_right_when_its_turn_comes_does_not_lose_the_turn_or_charge_the_key() {
    let (q, svc, _log) = line_quota(Some(Rate::per_second(100)));
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    let mut x = call(&svc, 1, p, 1, 0);
    assert!(matches!(poll_once(&mut x), Poll::Ready(Ok(0))));
    let mut a = call(&svc, 1, p, 1, 1);
    assert!(is_pending(&poll_once(&mut a)));
    let hb = tokio::spawn(finish(call(&svc, 1, p, 1, 2), t0));
    tokio::task::yield_now().await;
    // Exactly A's instant; A's task never runs again.
    tokio::time::advance(ms(1_000)).await;
    drop(a);
    let (rb, tb) = hb.await.unwrap();
    assert_eq!(
        (rb.unwrap(), tb),
        (2, ms(1_000)),
        "B lost the turn A left at its instant"
    );
    // Two admissions (0 s, 1 s): at 2 s one unit again.
    tokio::time::advance(ms(1_000)).await;
    assert_eq!(probe(&svc, 1, p, 3), 1);
    let s = q.snapshot();
    assert_eq!((s.admitted, s.waiting), (3, 0));
}

#[tokio::test(start_paused = true)]
async fn dropping_a_front_at_the_instant_the_global_unit_frees_hands_it_on() {
    // Global 1/s burst 1, plan loose. Key 9 takes the unit at 0. Key 1's A
    // and key 2's W wait for it (key 1 also has B behind A). At 1 s A is
    // dropped unpolled: exactly one of B, W goes at 1 s, the other at 2 s.
    let q = quota(
        Quota::builder()
            .plan("p", Rate::per_second(100))
            .global(Rate::per_second(1).burst(1))
            .max_wait(ms(10_000)),
    );
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    let mut x = call(&svc, 9, p, 1, 0);
    assert!(matches!(poll_once(&mut x), Poll::Ready(Ok(0))));
    let mut a = call(&svc, 1, p, 1, 1);
    assert!(is_pending(&poll_once(&mut a)));
    let hb = tokio::spawn(finish(call(&svc, 1, p, 1, 2), t0));
    let hw = tokio::spawn(finish(call(&svc, 2, p, 1, 3), t0));
    tokio::task::yield_now().await;
    tokio::time::advance(ms(1_000)).await;
    drop(a);
    let (rb, tb) = hb.await.unwrap();
    let (rw, tw) = hw.await.unwrap();
    rb.unwrap();
    rw.unwrap();
    let mut ts = [tb.as_millis(), tw.as_millis()];
    ts.sort();
    assert_eq!(ts, [1_000, 2_000]);
}

// ------------------------------------------------------------------ close

#[tokio::test(start_paused = true)]
async fn close_answers_every_waiter_at_once_and_refuses_waits_after() {
    let q = quota(
        Quota::builder()
            .plan("p", Rate::per_second(1).burst(1))
            .global(Rate::per_second(2).burst(2))
            .max_wait(ms(60_000)),
    );
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    let mut hs = Vec::new();
    for k in 0..3u32 {
        for i in 0..4u64 {
            hs.push(tokio::spawn(finish(
                call(&svc, k, p, 1, u64::from(k) * 10 + i),
                t0,
            )));
        }
    }
    // One waiter dropped unpolled, one dropped after it waited a while.
    let unpolled = call(&svc, 0, p, 1, 99);
    let mut dropped = call(&svc, 1, p, 1, 98);
    assert!(is_pending(&poll_once(&mut dropped)));
    tokio::time::advance(ms(1_200)).await;
    drop(unpolled);
    drop(dropped);
    let waiting = q.snapshot().waiting;
    let released = q.close();
    assert_eq!(
        released, waiting,
        "close released {released}, snapshot said {waiting} waiting"
    );
    let mut ok = 0;
    let mut shut = 0;
    for h in hs {
        let (r, t) = h.await.unwrap();
        match r {
            Ok(_) => {
                ok += 1;
                assert!(t <= ms(1_200));
            }
            Err((RejectKind::ShuttingDown, _)) => {
                shut += 1;
                assert_eq!(t, ms(1_200), "a waiter answered late");
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(ok + shut, 12);
    assert_eq!(shut, released);
    // After close: over the quota → ShuttingDown at once; within → passes.
    let mut over = call(&svc, 0, p, 1, 200);
    assert_eq!(refusal(poll_once(&mut over)).0, RejectKind::ShuttingDown);
    tokio::time::advance(ms(1_000)).await; // the global limit refills
    let mut fresh = call(&svc, 50, p, 1, 201);
    assert!(matches!(poll_once(&mut fresh), Poll::Ready(Ok(201))));
    let s = q.snapshot();
    assert_eq!((s.admitted, s.rejected, s.waiting), (ok + 1, shut + 1, 0));
}

// ---------------------------------------------------------------- extremes

#[tokio::test(start_paused = true)]
async fn extreme_costs_free_whole_burst_above_burst_and_u32_max() {
    // Plan 1/s burst 3, global 1/s burst 2 (tighter than the plan's burst).
    let q = quota(
        Quota::builder()
            .plan("p", Rate::per_second(1).burst(3))
            .global(Rate::per_second(1).burst(2))
            .max_wait(ms(10_000)),
    );
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    // Above the plan's burst, above the global burst, u32::MAX: refused at
    // once without retry_after, charging nothing.
    for (i, c) in [4u32, 3, u32::MAX].into_iter().enumerate() {
        let mut f = call(&svc, 1, p, c, i as u64);
        assert_eq!(
            refusal(poll_once(&mut f)),
            (RejectKind::QuotaExceeded, None),
            "cost {c}"
        );
    }
    // cost = global burst (2) admitted at once; a line forms behind.
    let mut a = call(&svc, 1, p, 2, 10);
    assert!(matches!(poll_once(&mut a), Poll::Ready(Ok(10))));
    let hb = tokio::spawn(finish(call(&svc, 1, p, 2, 11), t0)); // 2 units: global at 2 s
    tokio::task::yield_now().await;
    // A free call behind the line, with nothing left anywhere: at once.
    let mut free = call(&svc, 1, p, 0, 12);
    assert!(matches!(poll_once(&mut free), Poll::Ready(Ok(12))));
    // Above the burst behind a line: refused at once, no retry_after.
    let mut big = call(&svc, 1, p, 3, 13);
    assert_eq!(
        refusal(poll_once(&mut big)),
        (RejectKind::QuotaExceeded, None)
    );
    let (rb, tb) = hb.await.unwrap();
    assert_eq!((rb.unwrap(), tb), (11, ms(2_000)));
    // Conservation at 3 s: key had 3, took 2 at 0 and 2 at 2 s → tat 4 s;
    // free at 3 s = 3 − 1 = 2. Global: tat 4 s, burst 2 → 1 free.
    tokio::time::advance(ms(1_000)).await;
    assert_eq!(probe(&svc, 1, p, 4), 1);
    tokio::time::advance(ms(1_000)).await; // 4 s: key tat 5 s → 2 free; global tat 5 s → 1
    assert_eq!(probe(&svc, 1, p, 4), 1);
    // Refused: 4, 3, u32::MAX and the 3 behind the line (the probes' last
    // calls waited and were dropped, not refused).
    let s = q.snapshot();
    assert_eq!((s.admitted, s.rejected, s.waiting), (5, 4, 0));
}

#[tokio::test(start_paused = true)]
async fn a_u32_max_rate_and_cost() {
    // u32::MAX an hour (838.19 ns a unit, kept as 839 ns), burst u32::MAX.
    let r = Rate::new(u32::MAX, Duration::from_secs(3_600));
    let q = quota(Quota::builder().plan("p", r).global(r).max_wait(ms(1)));
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    let mut a = call(&svc, 1, p, u32::MAX, 0);
    assert!(matches!(poll_once(&mut a), Poll::Ready(Ok(0))));
    let (rb, tb) = finish(call(&svc, 1, p, 1, 1), t0).await;
    // Due at 839 ns; tokio's timers wake on whole milliseconds: 1 ms
    // (= max_wait, allowed).
    assert_eq!((rb.unwrap(), tb), (1, ms(1)));
    // At 1 ms: tat = 839 ns·(2³² − 1) + 839 ns; a whole burst fits when
    // tat ≤ now, i.e. after 839 ns·2³² − 1 ms: refused with that exact wait.
    let mut c = call(&svc, 1, p, u32::MAX, 2);
    let (k, ra) = refusal(poll_once(&mut c));
    assert_eq!(k, RejectKind::QuotaExceeded);
    assert_eq!(
        ra,
        Some(Duration::from_nanos(839 * (1u64 << 32) - 1_000_000))
    );
}

#[tokio::test(start_paused = true)]
async fn global_looser_than_every_plan_leaves_each_key_at_its_plan() {
    let q = quota(
        Quota::builder()
            .plan("p", Rate::per_second(2).burst(1))
            .global(Rate::per_second(1_000))
            .max_wait(ms(2_000)),
    );
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    let mut hs = Vec::new();
    for k in 0..5u32 {
        for i in 0..6u64 {
            hs.push((
                k,
                i,
                tokio::spawn(finish(call(&svc, k, p, 1, u64::from(k) * 10 + i), t0)),
            ));
        }
    }
    for (_k, i, h) in hs {
        let (r, t) = h.await.unwrap();
        if i <= 4 {
            assert_eq!((r.unwrap() % 10, t), (i, ms(500 * i)));
        } else {
            // 2.5 s > 2 s: refused at once with 2.5 s.
            assert_eq!(
                (r.unwrap_err(), t),
                ((RejectKind::QuotaExceeded, Some(ms(2_500))), ms(0))
            );
        }
    }
}

/// 1,000 keys (10,000 in the trial as written: 106 s in a debug build —
/// every front sleeping on the global limit wakes at each of its units and
/// checks again, so the work grows with the square of the keys waiting; a
/// known cost of per-key lines, see the closing note).
#[tokio::test(start_paused = true)]
async fn a_thousand_keys_against_a_tight_global_limit() {
    // Global 1000/s burst 10; every key 1 call at 0; plan loose; max_wait
    // 20 s. All must be answered; every admission within max_wait; the
    // global bound over every window; nothing left waiting.
    let g = Rate::per_second(1_000).burst(10);
    let q = quota(
        Quota::builder()
            .plan("p", Rate::per_second(5))
            .global(g)
            .max_wait(ms(20_000)),
    );
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    let hs: Vec<_> = (0..1_000u32)
        .map(|k| tokio::spawn(finish(call(&svc, k, p, 1, u64::from(k)), t0)))
        .collect();
    let mut admitted = 0u64;
    let mut worst = Duration::ZERO;
    for h in hs {
        let (r, t) = h.await.unwrap();
        match r {
            Ok(_) => {
                admitted += 1;
                worst = worst.max(t);
            }
            Err((k, ra)) => panic!("refused {k:?} {ra:?} at {t:?}"),
        }
    }
    assert_eq!(admitted, 1_000);
    // 10 at once, then one every ms: the last at 0.99 s.
    assert_eq!(worst, ms(990));
    let adm: Vec<(Instant, u32)> = log.lock().unwrap().iter().map(|x| (x.3, x.2)).collect();
    // Every window between admissions.
    assert_eq!(rate_violation(&adm, g), None);
    let s = q.snapshot();
    assert_eq!((s.admitted, s.waiting), (1_000, 0));
    // Idle keys (cell full again) may be swept; the 200 admitted in the
    // last 200 ms (one unit of 5/s) are not full yet.
    assert!((200..=1_000).contains(&s.keys), "keys {}", s.keys);
    // A swept key is indistinguishable from a new one: key 0 (admitted at
    // 0) has its whole burst of 5 (global allowing: 10 at 0.99 s + 10 ms).
    tokio::time::advance(ms(10)).await;
    assert_eq!(probe(&svc, 0, p, 8), 5);
}

#[tokio::test(start_paused = true)]
async fn a_plan_change_joins_the_same_keys_line_and_charges_only_the_new_plan() {
    // Key 1 on plan a (1/s burst 1): X at 0, B waits (1 s). C, key 1 on
    // plan b (100/s burst 5), at 0.1 s: the line is per key, so C waits
    // behind B, then goes at once on plan b's own cell.
    let q = quota(
        Quota::builder()
            .plan("a", Rate::per_second(1).burst(1))
            .plan("b", Rate::per_second(100).burst(5))
            .global(Rate::per_second(1_000))
            .max_wait(ms(5_000)),
    );
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let (pa, pb) = (q.plan_id("a").unwrap(), q.plan_id("b").unwrap());
    let t0 = Instant::now();
    let mut x = call(&svc, 1, pa, 1, 0);
    assert!(matches!(poll_once(&mut x), Poll::Ready(Ok(0))));
    let hb = tokio::spawn(finish(call(&svc, 1, pa, 1, 1), t0));
    tokio::time::advance(ms(100)).await;
    let mut c = call(&svc, 1, pb, 1, 2);
    assert!(
        is_pending(&poll_once(&mut c)),
        "plan b's call overtook key 1's waiter"
    );
    let (rb, tb) = hb.await.unwrap();
    assert_eq!((rb.unwrap(), tb), (1, ms(1_000)));
    let (rc, tc) = finish(c, t0).await;
    assert_eq!((rc.unwrap(), tc), (2, ms(1_000)));
    // Plan a: nothing free at 1 s; plan b: 4 of 5.
    assert_eq!(probe(&svc, 1, pa, 3), 0);
    assert_eq!(probe(&svc, 1, pb, 8), 4);
}

// Found by this trial on 88f10dd: a 500 µs max_wait admitted a call after
// 1 ms (tokio's timers fire on whole milliseconds). Now documented (crate
// docs, QuotaBuilder::max_wait): a call is woken on tokio's timer, a
// millisecond or so after it is due (up to 2 ms on a paused clock) —
// admitted, never refused for it.
#[tokio::test(start_paused = true)]
async fn a_sub_millisecond_max_wait_overstays_by_at_most_the_timer_tick() {
    // max_wait 500 µs; the next unit is due in 100 µs (10,000/s): accepted
    // to wait, woken at the timer's 1 ms.
    let r = Rate::per_second(10_000).burst(1);
    let q = quota(
        Quota::builder()
            .plan("p", r)
            .global(Rate::per_second(100_000))
            .max_wait(Duration::from_micros(500)),
    );
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let p = PlanId::FIRST;
    let t0 = Instant::now();
    let mut a = call(&svc, 1, p, 1, 0);
    assert!(matches!(poll_once(&mut a), Poll::Ready(Ok(0))));
    let (rb, tb) = finish(call(&svc, 1, p, 1, 1), t0).await;
    assert_eq!(rb.unwrap(), 1, "admitted");
    assert!(
        (Duration::from_micros(100)..=Duration::from_micros(2_500)).contains(&tb),
        "admitted {tb:?} after it came: not before its due 100 µs, within max_wait + 2 ms"
    );
}

// The same at an ordinary millisecond max_wait: a call arriving between
// ticks (0.3 ms), due 9.9 ms later (max_wait 10 ms), is admitted 11 ms after
// it came: the paused clock jumps 11 whole milliseconds from 0.3 ms to the
// timer's tick 11 (10.2 ms rounded up) — within max_wait + 2 ms.
#[tokio::test(start_paused = true)]
async fn a_ten_millisecond_max_wait_overstays_by_at_most_the_timer_tick() {
    let q = quota(
        Quota::builder()
            .plan("p", Rate::new(1, Duration::from_micros(10_200)).burst(1))
            .global(Rate::per_second(100_000))
            .max_wait(ms(10)),
    );
    let log: Log = Arc::default();
    let svc = service(&q, log.clone());
    let p = PlanId::FIRST;
    let mut a = call(&svc, 1, p, 1, 0);
    assert!(matches!(poll_once(&mut a), Poll::Ready(Ok(0))));
    tokio::time::advance(Duration::from_micros(300)).await;
    let t1 = Instant::now();
    let (rb, tb) = finish(call(&svc, 1, p, 1, 1), t1).await;
    assert_eq!(rb.unwrap(), 1, "admitted");
    assert!(
        (Duration::from_micros(9_900)..=ms(12)).contains(&tb),
        "admitted {tb:?} after it came: not before its due 9.9 ms, within max_wait + 2 ms"
    );
}

// ------------------------------------------------- multi-thread races

fn mt_runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

async fn probe_async(svc: &Svc, key: u32, plan: PlanId, max: u64, gap: Duration) -> u64 {
    let mut n = 0;
    for i in 0..max {
        tokio::time::sleep(gap).await; // let the global limit refill
        let fut = call(svc, key, plan, 1, 5_000_000 + i);
        match fut.now_or_never() {
            Some(Ok(_)) => n += 1,
            _ => break,
        }
    }
    n
}

/// Keys with a burst that does not refill during the run (1 unit per 90 s)
/// race for a global limit of burst 1 on 8 workers. Each key sends exactly
/// its burst: every call must be admitted (none refused for its key), and
/// afterwards each key has exactly 0 left — a key charged twice for a call
/// that lost the global race would refuse its last calls.
fn race_round(seed: u64, cancel: bool) -> Vec<String> {
    const KEYS: u32 = 16;
    const N: u32 = 40;
    let rt = mt_runtime(8);
    rt.block_on(async move {
        tokio::time::timeout(Duration::from_secs(60), async move {
            let plan = Rate::new(N, Duration::from_secs(90 * u64::from(N))).burst(N);
            let q = quota(
                Quota::builder()
                    .plan("p", plan)
                    .global(Rate::per_second(4_000).burst(1))
                    .max_wait(Duration::from_secs(50)),
            );
            let log: Log = Arc::default();
            let svc = service(&q, log.clone());
            let p = PlanId::FIRST;
            let mut rng = Rng::new(seed);
            let mut hs = Vec::new();
            for k in 0..KEYS {
                for i in 0..N {
                    let svc = svc.clone();
                    let spins = rng.below(4);
                    let drop_after = if cancel && rng.below(5) == 0 {
                        Some(Duration::from_micros(rng.below(3_000)))
                    } else {
                        None
                    };
                    hs.push(tokio::spawn(async move {
                        for _ in 0..spins {
                            tokio::task::yield_now().await;
                        }
                        let f = call(&svc, k, p, 1, u64::from(k * 1_000 + i));
                        match drop_after {
                            Some(d) => match tokio::time::timeout(d, f).await {
                                Ok(r) => Some(r.map_err(|e| classify(&e))),
                                Err(_) => None,
                            },
                            None => Some(f.await.map_err(|e| classify(&e))),
                        }
                    }));
                }
            }
            let mut refused = vec![0u32; KEYS as usize];
            let mut dropped = vec![0u32; KEYS as usize];
            let mut kinds = Vec::new();
            for (n, h) in hs.into_iter().enumerate() {
                let k = n / N as usize;
                match h.await.unwrap() {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        refused[k] += 1;
                        kinds.push(e);
                    }
                    None => dropped[k] += 1,
                }
            }
            let log_v = log.lock().unwrap().clone();
            let mut f = Vec::new();
            for k in 0..KEYS {
                let adm = log_v.iter().filter(|x| x.1 == k).count() as u64;
                let left = probe_async(&svc, k, p, u64::from(N) + 2, ms(2)).await;
                let (r, d) = (refused[k as usize], dropped[k as usize]);
                if cancel {
                    // A dropped call that had paid its key may keep its units
                    // spent; nothing else may be lost or gained.
                    if adm + left > u64::from(N) || adm + left + u64::from(d) < u64::from(N) || r > 0 {
                        f.push(format!("seed {seed} key {k}: admitted {adm} + left {left} with {d} dropped, {r} refused (N {N})"));
                    }
                } else if adm != u64::from(N) || left != 0 || r > 0 {
                    f.push(format!("seed {seed} key {k}: admitted {adm}, left {left}, refused {r} of its burst {N}"));
                }
            }
            if !kinds.is_empty() {
                f.push(format!("seed {seed}: refusals {:?}", &kinds[..kinds.len().min(4)]));
            }
            let s = q.snapshot();
            if s.waiting != 0 {
                f.push(format!("seed {seed}: {} still waiting", s.waiting));
            }
            f
        })
        .await
        .unwrap_or_else(|_| vec![format!("seed {seed}: hung (60 s watchdog)")])
    })
}

#[test]
fn multi_thread_global_races_never_charge_a_key_twice() {
    let mut fails = Vec::new();
    for seed in 1..=12 {
        fails.extend(race_round(seed, false));
    }
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

// Found by this trial on 88f10dd, fixed by 79a33a9 (before it, 2 runs in 4
// failed; 0 in 5 after): with waiters dropped
// during global-limit races, a key's call is refused at arrival with a
// retry_after of ~90 s (one unit of its plan) although every call of that
// key fits its burst (seen: seed 108 key 0 — 33 admitted + 7 still free at
// the end + 6 dropped + 1 refused = 40 = burst; seed 105 key 0 — 31 + 9, 8
// dropped, 1 refused with 89.999236167 s). QuotaBuilder::max_wait
// (src/quota/mod.rs:421-431) refuses at arrival only a call whose wait
// would be longer than max_wait (50 s here); its real wait was the global
// limit's (under a millisecond). The arrival estimate counted one unit of
// the key more than the key had spent or had ahead in line: a call ahead
// whose key had paid before it lost the global race was counted for its
// key again.
#[test]
fn multi_thread_global_races_with_cancellations_lose_and_hang_nothing() {
    let mut fails = Vec::new();
    for seed in 101..=112 {
        fails.extend(race_round(seed, true));
    }
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

#[test]
fn multi_thread_close_during_races_answers_every_waiter() {
    for seed in 1..=10u64 {
        let rt = mt_runtime(4);
        rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(30), async move {
                let q = quota(
                    Quota::builder()
                        .plan("p", Rate::per_second(200).burst(2))
                        .global(Rate::per_second(1_000).burst(1))
                        .max_wait(Duration::from_secs(20)),
                );
                let log: Log = Arc::default();
                let svc = service(&q, log.clone());
                let mut rng = Rng::new(seed);
                let mut hs = Vec::new();
                for i in 0..400u64 {
                    let svc = svc.clone();
                    let k = rng.below(6) as u32;
                    let delay = Duration::from_micros(rng.below(30_000));
                    hs.push(tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        call(&svc, k, PlanId::FIRST, 1, i)
                            .await
                            .map_err(|e| classify(&e).0)
                    }));
                }
                tokio::time::sleep(Duration::from_micros(5_000 + rng.below(20_000))).await;
                let released = q.close();
                let mut shut = 0u64;
                let mut ok = 0u64;
                for h in hs {
                    match h.await.unwrap() {
                        Ok(_) => ok += 1,
                        Err(RejectKind::ShuttingDown) => shut += 1,
                        Err(k) => panic!("seed {seed}: refused {k:?}"),
                    }
                }
                assert!(
                    shut >= released,
                    "seed {seed}: {released} released, {shut} ShuttingDown"
                );
                let s = q.snapshot();
                assert_eq!(
                    (s.admitted, s.rejected, s.waiting),
                    (ok, shut, 0),
                    "seed {seed}"
                );
            })
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: hung after close"));
        });
    }
}
