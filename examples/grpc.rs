//! A tonic server behind the server-side stack (shutdown → per-API-key
//! quota → bulkhead → timeout, refusals answered `RESOURCE_EXHAUSTED` with a
//! pushback), and a tonic client behind retry + breaker that honours the
//! pushback.
//!
//! ```text
//! cargo run --example grpc                  # 200 calls at once, the server takes 20 at a time
//! cargo run --example grpc -- --calls 500 --capacity 50
//! ```
//!
//! The service is tonic's pre-generated `grpc.health.v1.Health` (no
//! protoc): its `Check` takes `--work-ms` to answer.

use clap::Parser;
use semaforo::backoff::{Backoff, Jitter};
use semaforo::breaker::Breaker;
use semaforo::bulkhead::Bulkhead;
use semaforo::grpc::{GrpcClassifier, GrpcRequests, GrpcTimeout, RefusalLayer, StatusWatchLayer};
use semaforo::quota::{HeaderKey, Quota, Rate};
use semaforo::retry::{HttpRequests, Retry};
use semaforo::shutdown::Shutdown;
use semaforo::timeout::Timeout;
use semaforo::BoxError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Server};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::ServiceBuilder;

/// gRPC behind semaforo, both sides.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Calls the client sends at once.
    #[arg(long, default_value_t = 200)]
    calls: usize,
    /// Calls the server handles at once (the bulkhead; no line).
    #[arg(long, default_value_t = 20)]
    capacity: u32,
    /// How long the handler works on a call.
    #[arg(long, default_value_t = 50)]
    work_ms: u64,
    /// Calls each API key may make per minute.
    #[arg(long, default_value_t = 10_000)]
    per_key_per_minute: u32,
}

/// The handler: answers SERVING after `work`, counting the calls it saw.
struct Slow {
    work: Duration,
    handled: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Health for Slow {
    async fn check(
        &self,
        _req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        self.handled.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.work).await;
        Ok(tonic::Response::new(HealthCheckResponse { status: 1 }))
    }

    type WatchStream = futures::stream::Empty<Result<HealthCheckResponse, tonic::Status>>;

    async fn watch(
        &self,
        _req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("watch"))
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();

    // The server: shutdown → quota per `x-api-key` metadata → bulkhead (no
    // line) → timeout (the caller's grpc-timeout if sooner), refusals as
    // statuses with a pushback.
    let shutdown = Shutdown::new();
    let quota = Quota::builder()
        .name("health")
        .plan("default", Rate::per_minute(args.per_key_per_minute))
        .build::<String>()?;
    let plan = quota.plan_id("default").ok_or("no default plan")?;
    shutdown.watch(quota.clone());
    let bulkhead = Bulkhead::builder(args.capacity)
        .name("health")
        .max_queue(0)
        .expected_service_time(Duration::from_millis(args.work_ms))
        .build()?;
    let timeout = Timeout::builder()
        .name("health")
        .total(Duration::from_secs(10))
        .build()?;
    let handled = Arc::new(AtomicUsize::new(0));
    let service = HealthServer::new(Slow {
        work: Duration::from_millis(args.work_ms),
        handled: handled.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = {
        let stack = ServiceBuilder::new()
            .layer(RefusalLayer::new())
            .layer(shutdown.layer())
            .layer(quota.layer(HeaderKey::new(
                http::HeaderName::from_static("x-api-key"),
                plan,
            )))
            .layer(bulkhead.layer().release_on_body_end())
            .layer(timeout.layer().per_request(GrpcTimeout));
        let mut ready = shutdown.readiness();
        tokio::spawn(
            Server::builder()
                .layer(stack)
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move {
                        let _ = ready.wait_for(|r| !r).await;
                    },
                ),
        )
    };

    // The client: retry (Check is idempotent: listed) honouring the
    // pushback, breaker, statuses in trailers watched to the end.
    let retry = Retry::builder()
        .max_attempts(8)
        .backoff(
            Backoff::exponential(Duration::from_millis(20))
                .jitter(Jitter::Full)
                .build()?,
        )
        .no_budget()
        .build()?;
    let breaker = Breaker::builder()
        .name("health")
        .consecutive_failures(5)
        .build()?;
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let client = HealthClient::new(
        ServiceBuilder::new()
            .layer(RefusalLayer::new())
            .layer(
                GrpcRequests::new()
                    .method("/grpc.health.v1.Health/Check")
                    .layer(),
            )
            .layer(
                retry
                    .layer()
                    .classify(GrpcClassifier)
                    .requests(HttpRequests::default().allow_non_idempotent()),
            )
            .layer(
                breaker
                    .layer()
                    .classify(GrpcClassifier)
                    .record_on_body_end(),
            )
            .layer(StatusWatchLayer::new())
            .service(channel),
    );

    let t0 = Instant::now();
    let calls: Vec<_> = (0..args.calls)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut req = tonic::Request::new(HealthCheckRequest::default());
                req.set_timeout(Duration::from_secs(5));
                req.metadata_mut().insert(
                    "x-api-key",
                    tonic::metadata::MetadataValue::from_static("classroom-7"),
                );
                client.check(req).await
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for c in calls {
        match c.await? {
            Ok(_) => ok += 1,
            Err(status) => {
                failed += 1;
                eprintln!("{:?}: {}", status.code(), status.message());
            }
        }
    }
    let snap = bulkhead.snapshot();
    println!(
        "{} calls at once, the server takes {} at a time ({} ms each):",
        args.calls, args.capacity, args.work_ms
    );
    println!(
        "  the bulkhead refused {} with RESOURCE_EXHAUSTED + pushback; the handler saw {}",
        snap.rejected_queue_full,
        handled.load(Ordering::Relaxed)
    );
    println!(
        "  the client retried {} times after the pushback: {ok} answered, {failed} failed, in {:.2} s",
        retry.retries(),
        t0.elapsed().as_secs_f64()
    );
    // Graceful: stop admitting, let the calls in flight end, then stop serving.
    let report = shutdown.drain(Duration::from_secs(5)).await;
    server.await??;
    println!("  drained: {report:?}");
    if failed > 0 {
        return Err(format!("{failed} calls failed").into());
    }
    Ok(())
}
