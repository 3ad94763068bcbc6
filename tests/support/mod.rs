//! Test helpers shared by the integration tests.
#![allow(dead_code)]

use semaforo::bulkhead::{Bulkhead, QueueTicket};
use semaforo::BoxError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A request to the instrumented upstream.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: usize,
    pub work: Duration,
    pub priority: i32,
    pub tenant: u32,
    pub ticket: QueueTicket,
}

impl Job {
    pub fn new(id: usize, work: Duration) -> Self {
        Job {
            id,
            work,
            priority: 0,
            tenant: 0,
            ticket: QueueTicket::new(),
        }
    }
}

/// What the upstream saw: concurrency (global and per tenant) and start order.
#[derive(Debug, Default)]
pub struct Record {
    pub in_flight: usize,
    pub max_in_flight: usize,
    pub per_tenant: HashMap<u32, usize>,
    pub max_per_tenant: usize,
    /// (job id, priority, tenant, start instant) in start order.
    pub starts: Vec<(usize, i32, u32, Instant)>,
    pub finished: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Upstream {
    pub record: Arc<Mutex<Record>>,
}

struct Leave(Arc<Mutex<Record>>, u32);
impl Drop for Leave {
    fn drop(&mut self) {
        let mut r = self.0.lock().unwrap();
        r.in_flight -= 1;
        *r.per_tenant.get_mut(&self.1).unwrap() -= 1;
    }
}

impl Upstream {
    /// A tower service that "works" for `job.work` and records everything.
    pub fn service(
        &self,
    ) -> impl tower::Service<
        Job,
        Response = usize,
        Error = std::io::Error,
        Future = impl std::future::Future<Output = Result<usize, std::io::Error>> + Send,
    > + Clone
           + Send {
        let record = self.record.clone();
        tower::service_fn(move |job: Job| {
            let record = record.clone();
            async move {
                {
                    let mut r = record.lock().unwrap();
                    r.in_flight += 1;
                    r.max_in_flight = r.max_in_flight.max(r.in_flight);
                    let t = r.per_tenant.entry(job.tenant).or_default();
                    *t += 1;
                    let t = *t;
                    r.max_per_tenant = r.max_per_tenant.max(t);
                    r.starts
                        .push((job.id, job.priority, job.tenant, Instant::now()));
                }
                let _leave = Leave(record.clone(), job.tenant);
                tokio::time::sleep(job.work).await;
                record.lock().unwrap().finished += 1;
                Ok(job.id)
            }
        })
    }

    pub fn max_in_flight(&self) -> usize {
        self.record.lock().unwrap().max_in_flight
    }

    pub fn start_order(&self) -> Vec<usize> {
        self.record
            .lock()
            .unwrap()
            .starts
            .iter()
            .map(|s| s.0)
            .collect()
    }
}

/// `up` behind `bulkhead`, reading each job's priority and tenant.
pub fn prioritised_and_partitioned(
    bulkhead: &Bulkhead,
    up: &Upstream,
) -> impl tower::Service<
    Job,
    Response = usize,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<usize, BoxError>> + Send + 'static,
> + Clone {
    tower::ServiceBuilder::new()
        .layer(
            bulkhead
                .layer()
                .priority(|j: &Job| j.priority)
                .partition(|j: &Job| j.tenant),
        )
        .service(up.service())
}
pub mod provider;

/// `pace` over a service that answers at once; each `u64` request costs that
/// many tokens.
pub fn by_tokens(
    pace: &semaforo::pace::Pace,
) -> impl tower::Service<
    u64,
    Response = u64,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<u64, BoxError>> + Send,
> + Clone {
    tower::ServiceBuilder::new()
        .layer(
            pace.layer()
                .weigh(|n: &u64| semaforo::pace::Cost::tokens(*n)),
        )
        .service(tower::service_fn(|n: u64| async move {
            Ok::<_, std::io::Error>(n)
        }))
}

/// A tiny deterministic PRNG (xorshift64*), seeded by its value.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
