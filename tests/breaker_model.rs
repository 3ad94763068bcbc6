//! Model-based test: random outcomes, durations and clock advances go through the
//! breaker and through a plain reference state machine written here; states,
//! admissions and retry-after hints must match at every step.

use proptest::prelude::*;
use semaforo::breaker::{Breaker, BreakerState};
use semaforo::classify::{Class, Permanent};
use semaforo::{BoxError, Rejected};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

#[derive(Debug, Clone)]
enum Op {
    Call {
        class: Class,
        ms: u64,
    },
    Advance {
        ms: u64,
    },
    /// Start a call, let half of it run, drop it.
    Abandon {
        ms: u64,
    },
}

#[derive(Debug, Clone, Copy)]
enum Win {
    Count(u32),
    Time { bucket_ms: u64, buckets: u32 },
}

#[derive(Debug, Clone)]
struct Cfg {
    consecutive: Option<u32>,
    failure_rate: Option<f64>,
    slow: Option<(u64, f64)>,
    window: Win,
    min_calls: u64,
    open_ms: u64,
    growth: Option<(f64, u64)>,
    probes: u32,
}

fn class() -> impl Strategy<Value = Class> {
    prop_oneof![
        3 => Just(Class::Success),
        1 => Just(Class::Throttled { retry_after: None }),
        2 => Just(Class::Overloaded { retry_after: None }),
        2 => Just(Class::Transient),
        1 => Just(Class::permanent(Permanent::Other)),
    ]
}

/// Rates from a small set, so "exactly at the threshold" happens often.
fn rate() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.25),
        Just(1.0 / 3.0),
        Just(0.5),
        Just(2.0 / 3.0),
        Just(0.75),
        Just(1.0)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (class(), 0u64..4_000).prop_map(|(class, ms)| Op::Call { class, ms }),
        2 => (1u64..30_000).prop_map(|ms| Op::Advance { ms }),
        1 => (2u64..4_000).prop_map(|ms| Op::Abandon { ms }),
    ]
}

fn cfg() -> impl Strategy<Value = Cfg> {
    let win = prop_oneof![
        (1u32..8).prop_map(Win::Count),
        (1u64..5, 1u32..5).prop_map(|(s, buckets)| Win::Time {
            bucket_ms: s * 1000,
            buckets
        }),
    ];
    (
        prop::option::of(1u32..5),
        prop::option::of(rate()),
        prop::option::of((1u64..4, rate())),
        win,
        1u64..5,
        1u64..20,
        prop::option::of(Just((2.0, 3u64))),
        1u32..3,
    )
        .prop_filter("a policy", |c| {
            c.0.is_some() || c.1.is_some() || c.2.is_some()
        })
        .prop_map(
            |(consecutive, failure_rate, slow, window, min_calls, open_s, growth, probes)| Cfg {
                consecutive,
                failure_rate,
                slow: slow.map(|(s, r)| (s * 1000, r)),
                window,
                min_calls,
                open_ms: open_s * 1000,
                growth: growth.map(|(f, cap_x)| (f, open_s * 1000 * cap_x)),
                probes,
            },
        )
}

/// The reference state machine, in milliseconds since the breaker was built.
struct Model {
    cfg: Cfg,
    state: BreakerState,
    consecutive: u32,
    records: VecDeque<(u64, bool, bool)>,
    open_until: u64,
    reopens: u32,
    probes_in_flight: u32,
    probe_successes: u32,
}

enum Admission {
    Pass { probe: bool },
    Reject { retry_after_ms: Option<u64> },
}

impl Model {
    fn new(cfg: Cfg) -> Self {
        Model {
            cfg,
            state: BreakerState::Closed,
            consecutive: 0,
            records: VecDeque::new(),
            open_until: 0,
            reopens: 0,
            probes_in_flight: 0,
            probe_successes: 0,
        }
    }

    fn admit(&mut self, now: u64) -> Admission {
        match self.state {
            BreakerState::Closed => return Admission::Pass { probe: false },
            BreakerState::Open if now < self.open_until => {
                return Admission::Reject {
                    retry_after_ms: Some(self.open_until - now),
                }
            }
            BreakerState::Open => {
                self.state = BreakerState::HalfOpen;
                self.probes_in_flight = 0;
                self.probe_successes = 0;
            }
            BreakerState::HalfOpen => {}
            // (`BreakerState` may grow: the model knows these three.)
            _ => {}
        }
        if self.probes_in_flight + self.probe_successes < self.cfg.probes {
            self.probes_in_flight += 1;
            Admission::Pass { probe: true }
        } else {
            Admission::Reject {
                retry_after_ms: None,
            }
        }
    }

    fn open(&mut self, now: u64) {
        let mut d = self.cfg.open_ms as f64;
        if let Some((f, cap)) = self.cfg.growth {
            d = (d * f.powi(self.reopens as i32)).min(cap as f64);
        }
        self.open_until = now + d as u64;
        self.state = BreakerState::Open;
        self.consecutive = 0;
        self.records.clear();
    }

    fn counts(&self, now: u64) -> (u64, u64, u64) {
        let recs: Vec<_> = match self.cfg.window {
            Win::Count(n) => self.records.iter().rev().take(n as usize).collect(),
            Win::Time { bucket_ms, buckets } => {
                let b = now / bucket_ms;
                self.records
                    .iter()
                    .filter(|(t, _, _)| t / bucket_ms + u64::from(buckets) > b)
                    .collect()
            }
        };
        let total = recs.len() as u64;
        let f = recs.iter().filter(|r| r.1).count() as u64;
        let s = recs.iter().filter(|r| r.2).count() as u64;
        (total, f, s)
    }

    fn record(&mut self, now: u64, probe: bool, class: Class, ms: u64) {
        let failed = class.is_upstream_failure();
        let slow = self.cfg.slow.is_some_and(|(t, _)| ms >= t);
        if probe {
            if self.state != BreakerState::HalfOpen {
                return;
            }
            self.probes_in_flight -= 1;
            if failed || slow {
                self.reopens += 1;
                self.open(now);
            } else {
                self.probe_successes += 1;
                if self.probe_successes >= self.cfg.probes {
                    self.reopens = 0;
                    self.state = BreakerState::Closed;
                    self.consecutive = 0;
                    self.records.clear();
                }
            }
            return;
        }
        if self.state != BreakerState::Closed {
            return;
        }
        let mut trip = false;
        if let Some(n) = self.cfg.consecutive {
            if failed {
                self.consecutive += 1;
                trip = self.consecutive >= n;
            } else {
                self.consecutive = 0;
            }
        }
        if self.cfg.failure_rate.is_some() || self.cfg.slow.is_some() {
            self.records.push_back((now, failed, slow));
            if !trip && (failed || slow) {
                let (total, f, s) = self.counts(now);
                if total >= self.cfg.min_calls {
                    let fr = if total == 0 {
                        0.0
                    } else {
                        f as f64 / total as f64
                    };
                    let sr = if total == 0 {
                        0.0
                    } else {
                        s as f64 / total as f64
                    };
                    trip = self.cfg.failure_rate.is_some_and(|r| fr >= r)
                        || self.cfg.slow.is_some_and(|(_, r)| sr >= r);
                }
            }
        }
        if trip {
            self.reopens = 0;
            self.open(now);
        }
    }
}

fn build(cfg: &Cfg) -> Breaker {
    try_build(cfg).unwrap()
}

fn try_build(cfg: &Cfg) -> Result<Breaker, semaforo::ConfigError> {
    let mut b = Breaker::builder()
        .no_consecutive_failures()
        .min_calls(cfg.min_calls)
        .open_for(Duration::from_millis(cfg.open_ms))
        .half_open_probes(cfg.probes);
    if let Some(n) = cfg.consecutive {
        b = b.consecutive_failures(n);
    }
    if let Some(r) = cfg.failure_rate {
        b = b.failure_rate(r);
    }
    if let Some((t, r)) = cfg.slow {
        b = b.slow_calls(Duration::from_millis(t), r);
    }
    b = match cfg.window {
        Win::Count(n) => b.window_calls(n),
        Win::Time { bucket_ms, buckets } => b.window_time(
            Duration::from_millis(bucket_ms * u64::from(buckets)),
            buckets,
        ),
    };
    if let Some((f, cap)) = cfg.growth {
        b = b.open_growth(f, Duration::from_millis(cap));
    }
    b.build()
}

fn run(cfg: Cfg, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    if let Win::Count(n) = cfg.window {
        if cfg.min_calls > u64::from(n) {
            // Such a breaker could never trip on a rate: `build` refuses it.
            let e = try_build(&cfg).map(|_| ()).unwrap_err();
            prop_assert_eq!(e.field, "min_calls");
            return Ok(());
        }
    }
    rt.block_on(async move {
        let t0 = Instant::now();
        let breaker = build(&cfg);
        let mut model = Model::new(cfg);
        let mut svc = ServiceBuilder::new()
            .layer(
                breaker
                    .layer()
                    .classify(|r: Result<&Class, &std::io::Error>| {
                        r.map_or(Class::Transient, |c| *c)
                    }),
            )
            .service(tower::service_fn(|(class, ms): (Class, u64)| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, std::io::Error>(class)
            }));
        let now = || Instant::now().duration_since(t0).as_millis() as u64;
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Advance { ms } => tokio::time::advance(Duration::from_millis(ms)).await,
                Op::Call { class, ms } => {
                    let expected = model.admit(now());
                    let fut = svc.ready().await.unwrap().call((class, ms));
                    let res: Result<Class, BoxError> = fut.await;
                    match (expected, res) {
                        (Admission::Pass { probe }, Ok(_)) => model.record(now(), probe, class, ms),
                        (Admission::Reject { retry_after_ms }, Err(e)) => {
                            let r = Rejected::from_box(&e).expect("a rejection");
                            prop_assert_eq!(
                                r.retry_after(),
                                retry_after_ms.map(Duration::from_millis),
                                "op {}",
                                i
                            );
                        }
                        (Admission::Pass { .. }, Err(e)) => {
                            return Err(TestCaseError::fail(format!(
                                "op {i}: model admits, breaker refused: {e}"
                            )))
                        }
                        (Admission::Reject { .. }, Ok(_)) => {
                            return Err(TestCaseError::fail(format!(
                                "op {i}: model refuses, breaker admitted"
                            )))
                        }
                    }
                }
                Op::Abandon { ms } => {
                    let expected = model.admit(now());
                    let mut fut = Box::pin(svc.ready().await.unwrap().call((Class::Transient, ms)));
                    let _ = tokio::time::timeout(Duration::from_millis(ms / 2), fut.as_mut()).await;
                    drop(fut);
                    if let Admission::Pass { probe: true } = expected {
                        model.probes_in_flight -= 1;
                    }
                }
            }
            prop_assert_eq!(breaker.state(), model.state, "after op {}", i);
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn breaker_follows_the_reference_state_machine(cfg in cfg(), ops in prop::collection::vec(op(), 1..80)) {
        run(cfg, ops)?;
    }
}
