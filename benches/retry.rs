//! Retry on the success path (the call that does not fail) next to
//! `tower::retry::Retry` with an equivalent policy, in the same run.

mod common;
use common::{bare, once, AttemptsConfig, SharedAttempts};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use semaforo::retry::Retry;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tower::retry::budget::{Budget as _, TpsBudget};
use tower::ServiceBuilder;

/// tower's equivalent: up to 3 attempts, exponential backoff on errors.
#[derive(Clone)]
struct Attempts {
    left: u32,
    delay: Duration,
}

impl<Req: Clone, Res, E> tower::retry::Policy<Req, Res, E> for Attempts {
    type Future = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        match result {
            Ok(_) => None,
            Err(_) if self.left > 1 => {
                self.left -= 1;
                let d = self.delay;
                self.delay *= 2;
                Some(Box::pin(tokio::time::sleep(d)))
            }
            Err(_) => None,
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// tower's equivalent of our default (a retry budget): the same attempts,
/// with tower's own `TpsBudget` — deposited on every call, withdrawn per retry.
#[derive(Clone)]
struct Budgeted {
    attempts: Attempts,
    budget: Arc<TpsBudget>,
}

impl<Req: Clone, Res, E> tower::retry::Policy<Req, Res, E> for Budgeted {
    type Future = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn retry(&mut self, req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                self.budget.deposit();
                None
            }
            Err(_) if self.budget.withdraw() => self.attempts.retry(req, result),
            Err(_) => None,
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

fn success_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("retry/success_path");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    let mut s = bare();
    g.bench_function("bare service", |b| b.iter(|| once(&mut s, black_box(1))));

    let policy = Attempts {
        left: 3,
        delay: Duration::from_millis(500),
    };
    let mut s = ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(policy))
        .service(bare());
    g.bench_function("tower Retry (3 attempts)", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });

    let policy = SharedAttempts {
        config: Arc::new(AttemptsConfig {
            first_delay: Duration::from_millis(500),
            retries: std::sync::atomic::AtomicU64::new(0),
        }),
        left: 3,
    };
    let mut s = ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(policy))
        .service(bare());
    g.bench_function(
        "tower Retry (3 attempts, shared config and retry count)",
        |b| b.iter(|| once(&mut s, black_box(1))),
    );

    let policy = Budgeted {
        attempts: Attempts {
            left: 3,
            delay: Duration::from_millis(500),
        },
        budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 1, 0.2)),
    };
    let mut s = ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(policy))
        .service(bare());
    g.bench_function("tower Retry (3 attempts, TpsBudget)", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });

    let mut s = ServiceBuilder::new()
        .layer(
            tower_resilience::retry::RetryLayer::<u64, u64, Infallible>::builder()
                .max_attempts(3)
                .exponential_backoff(Duration::from_millis(500))
                .build(),
        )
        .service(bare());
    g.bench_function("tower-resilience Retry (3 attempts)", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });

    let retry = Retry::builder()
        .max_attempts(3)
        .no_budget()
        .build()
        .unwrap();
    let mut s = ServiceBuilder::new().layer(retry.layer()).service(bare());
    g.bench_function("semaforo Retry (3 attempts, no budget)", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });

    let retry = Retry::builder().max_attempts(3).build().unwrap();
    let mut s = ServiceBuilder::new().layer(retry.layer()).service(bare());
    g.bench_function("semaforo Retry (3 attempts, budget)", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });
    g.finish();
}

/// Two threads calling clones of one service on the success path: what the
/// clones share (our configuration and spare service, tower's policy `Arc`)
/// is all that passes between the cores.
fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("retry/contended_2_threads");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let policy = SharedAttempts {
        config: Arc::new(AttemptsConfig {
            first_delay: Duration::from_millis(500),
            retries: std::sync::atomic::AtomicU64::new(0),
        }),
        left: 3,
    };
    let s = ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(policy))
        .service(bare());
    common::on_two_threads(
        &mut g,
        "tower Retry (3 attempts, shared config and retry count)",
        s,
    );
    let budgeted = Budgeted {
        attempts: Attempts {
            left: 3,
            delay: Duration::from_millis(500),
        },
        budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 1, 0.2)),
    };
    let s = ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(budgeted))
        .service(bare());
    common::on_two_threads(&mut g, "tower Retry (3 attempts, TpsBudget)", s);
    let retry = Retry::builder()
        .max_attempts(3)
        .no_budget()
        .build()
        .unwrap();
    let s = ServiceBuilder::new().layer(retry.layer()).service(bare());
    common::on_two_threads(&mut g, "semaforo Retry (3 attempts, no budget)", s);
    let retry = Retry::builder().max_attempts(3).build().unwrap();
    let s = ServiceBuilder::new().layer(retry.layer()).service(bare());
    common::on_two_threads(&mut g, "semaforo Retry (3 attempts, budget)", s);
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = success_path, contended
}
criterion_main!(benches);
