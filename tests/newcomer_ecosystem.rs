//! A newcomer's tour of the ecosystem adapters (axum, closures, reqwest, gRPC).

use std::time::Duration;

use axum::{body::Body, error_handling::HandleErrorLayer, routing::post, Router};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use semaforo::bulkhead::Bulkhead;
use semaforo::quota::{HeaderKey, Quota, Rate};
use tower::{ServiceBuilder, ServiceExt};

async fn body_json(res: axum::response::Response) -> serde_json::Value {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("not JSON: {:?}", bytes))
}

fn work_req(key: &str) -> Request<Body> {
    Request::post("/work")
        .header("x-api-key", key)
        .body(Body::empty())
        .unwrap()
}

// Task 1: an axum handler behind quota + bulkhead; refusals via semaforo::axum.
#[tokio::test(start_paused = true)]
async fn axum_bulkhead_and_quota() -> Result<(), semaforo::BoxError> {
    let bulkhead = Bulkhead::builder(1).max_queue(1).name("backend").build()?;
    let quota = Quota::builder()
        .name("api")
        .plan("free", Rate::per_hour(3))
        .build()?;
    let free = quota.plan_id("free").unwrap();
    let app: Router = Router::new().route(
        "/work",
        post(|| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            "done"
        })
        .route_layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(semaforo::axum::handle_error))
                .layer(quota.layer(HeaderKey::new(
                    http::HeaderName::from_static("x-api-key"),
                    free,
                )))
                .layer(bulkhead.layer()),
        ),
    );

    // One runs, one waits in line, the third finds the line full.
    let a = tokio::spawn(app.clone().oneshot(work_req("ana")));
    let b = tokio::spawn(app.clone().oneshot(work_req("ana")));
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(bulkhead.snapshot().in_flight, 1);
    let full = app.clone().oneshot(work_req("luis")).await?;
    println!("queue full: {:?} {:?}", full.status(), full.headers());
    assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
    let json = body_json(full).await;
    println!("queue full body: {json}");
    assert_eq!(json["error"]["kind"], "queue_full");
    assert_eq!(json["error"]["layer"], "bulkhead");
    assert_eq!(json["error"]["name"], "backend");

    // Quota: ana used 2 of 3; a third passes the quota (but waits the line?), a 4th is 429.
    assert_eq!(a.await??.status(), StatusCode::OK);
    assert_eq!(b.await??.status(), StatusCode::OK);
    let c = app.clone().oneshot(work_req("ana")).await?;
    assert_eq!(c.status(), StatusCode::OK);
    let over = app.clone().oneshot(work_req("ana")).await?;
    println!("quota: {:?} {:?}", over.status(), over.headers());
    assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(over.headers().contains_key("retry-after"));
    assert!(over.headers().contains_key("ratelimit-policy"));
    let json = body_json(over).await;
    println!("quota body: {json}");
    assert_eq!(json["error"]["kind"], "quota_exceeded");
    Ok(())
}

// ---------------------------------------------------------------- Task 2
use semaforo::breaker::{Breaker, BreakerState};
use semaforo::retry::Retry;
use semaforo::{RejectKind, Rejected};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

#[derive(Debug)]
enum DbError {
    ConnectionLost,
    NotFound,
}
impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}
impl std::error::Error for DbError {}

/// A flaky DB call: fails `fail_first` times, then answers.
async fn load_user(id: u32, calls: Arc<AtomicU32>, fail_first: u32) -> Result<String, DbError> {
    let n = calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(5)).await;
    if id == 0 {
        return Err(DbError::NotFound);
    }
    if n < fail_first {
        Err(DbError::ConnectionLost)
    } else {
        Ok(format!("user {id}"))
    }
}

#[tokio::test(start_paused = true)]
async fn closures_retry_and_breaker() -> Result<(), semaforo::BoxError> {
    let retry = Retry::builder().max_attempts(3).build()?;
    let calls = Arc::new(AtomicU32::new(0));
    let user = retry.call(|| load_user(7, calls.clone(), 2)).await?;
    assert_eq!(user, "user 7");
    assert_eq!(calls.load(Ordering::SeqCst), 3, "two failures retried");

    // An error the caller knows is permanent: still retried by default?
    let calls = Arc::new(AtomicU32::new(0));
    let err = retry
        .call(|| load_user(0, calls.clone(), 0))
        .await
        .unwrap_err();
    println!(
        "not found after {} calls: {err}",
        calls.load(Ordering::SeqCst)
    );
    assert!(
        err.downcast_ref::<DbError>().is_some(),
        "original error comes back: {err:?}"
    );

    // Breaker: 3 failures in a row open it.
    let breaker = Breaker::builder()
        .name("db")
        .consecutive_failures(3)
        .build()?;
    let calls = Arc::new(AtomicU32::new(0));
    for _ in 0..3 {
        let e = breaker
            .call(|| load_user(7, calls.clone(), 100))
            .await
            .unwrap_err();
        assert!(matches!(
            e.downcast_ref::<DbError>(),
            Some(DbError::ConnectionLost)
        ));
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    let e = breaker
        .call(|| load_user(7, calls.clone(), 0))
        .await
        .unwrap_err();
    let r = Rejected::from_box(&e).expect("a refusal");
    assert_eq!(r.kind(), RejectKind::CircuitOpen);
    println!("open: {r} retry_after={:?}", r.retry_after());
    assert_eq!(calls.load(Ordering::SeqCst), 3, "not called while open");

    // A whole stack via closure::run: retry around breaker around the call.
    let breaker = Breaker::builder()
        .name("db2")
        .consecutive_failures(5)
        .build()?;
    let stack = ServiceBuilder::new()
        .layer(retry.layer())
        .layer(breaker.layer());
    let calls = Arc::new(AtomicU32::new(0));
    let user = semaforo::closure::run(&stack, || load_user(9, calls.clone(), 2)).await?;
    assert_eq!(user, "user 9");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(breaker.snapshot().consecutive_failures, 0);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn closure_with_own_classifier() -> Result<(), semaforo::BoxError> {
    use semaforo::classify::{classify_error, Class, Permanent};
    let retry = Retry::builder().max_attempts(3).build()?;
    let layer = retry
        .layer()
        .classify(|r: Result<&String, &semaforo::BoxError>| match r {
            Ok(_) => Class::Success,
            Err(e) if matches!(e.downcast_ref::<DbError>(), Some(DbError::NotFound)) => {
                Class::permanent(Permanent::NotFound)
            }
            Err(e) => classify_error(e.as_ref()),
        });
    let calls = Arc::new(AtomicU32::new(0));
    let err = semaforo::closure::run(&layer, || load_user(0, calls.clone(), 0))
        .await
        .unwrap_err();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "NotFound not retried: {err}"
    );
    Ok(())
}

// ---------------------------------------------------------------- Task 3
use semaforo::backoff::{Backoff, Jitter};
use semaforo::classify::HttpClassifier;
use semaforo::reqwest::SemaforoMiddleware;

/// A local server: `/flaky` answers 503 twice then 200; `/slow` takes 500 ms.
async fn start_server() -> (std::net::SocketAddr, Arc<AtomicU32>) {
    let hits = Arc::new(AtomicU32::new(0));
    let h = hits.clone();
    let app = Router::new()
        .route(
            "/flaky",
            axum::routing::any(move || {
                let n = h.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 2 {
                        (StatusCode::SERVICE_UNAVAILABLE, "busy")
                    } else {
                        (StatusCode::OK, "fine")
                    }
                }
            }),
        )
        .route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                "slow"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, hits)
}

#[tokio::test]
async fn reqwest_middleware_retries_and_refuses() -> Result<(), semaforo::BoxError> {
    let (addr, hits) = start_server().await;
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(
            Backoff::exponential(Duration::from_millis(10))
                .jitter(Jitter::None)
                .build()?,
        )
        .build()?;
    let bulkhead = Bulkhead::builder(1).name("client").build()?;
    let stack = ServiceBuilder::new()
        .layer(bulkhead.layer().release_on_body_end())
        .layer(retry.layer().classify(HttpClassifier));
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SemaforoMiddleware::new(stack))
        .build();

    let res = client.get(format!("http://{addr}/flaky")).send().await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await?, "fine");
    assert_eq!(hits.load(Ordering::SeqCst), 3, "retried twice");
    assert_eq!(retry.retries(), 2);

    // The bulkhead (1 at a time, no line) refuses a second concurrent call.
    let slow = tokio::spawn({
        let client = client.clone();
        async move {
            Ok::<_, semaforo::BoxError>(
                client
                    .get(format!("http://{addr}/slow"))
                    .send()
                    .await?
                    .text()
                    .await?,
            )
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = client
        .get(format!("http://{addr}/slow"))
        .send()
        .await
        .unwrap_err();
    println!("refused: {err:?}");
    assert!(matches!(err, reqwest_middleware::Error::Middleware(_)));
    let r = semaforo::reqwest::rejected(&err).expect("a Rejected");
    assert_eq!(r.kind(), RejectKind::QueueFull);
    assert_eq!(slow.await??, "slow");
    Ok(())
}

/// The natural stack (`retry.layer().classify(HttpClassifier)`, no `.requests(..)`):
/// what happens to a POST, and to a streamed request body?
#[tokio::test]
async fn reqwest_default_request_policy() -> Result<(), semaforo::BoxError> {
    let (addr, hits) = start_server().await;
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(
            Backoff::exponential(Duration::from_millis(10))
                .jitter(Jitter::None)
                .build()?,
        )
        .build()?;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SemaforoMiddleware::new(
            retry.layer().classify(HttpClassifier),
        ))
        .build();
    // POST without an Idempotency-Key.
    let res = client
        .post(format!("http://{addr}/flaky"))
        .body("x")
        .send()
        .await?;
    println!(
        "POST: {} after {} hits",
        res.status(),
        hits.load(Ordering::SeqCst)
    );
    // FINDING: the default request policy (CloneRequests) retries a POST
    // without an Idempotency-Key: 3 hits.
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    // A streamed body, which the docs say is never retried.
    hits.store(0, Ordering::SeqCst);
    let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(bytes::Bytes::from_static(
        b"chunk",
    ))]);
    let res = client
        .post(format!("http://{addr}/flaky"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    match &res {
        Ok(r) => println!(
            "streamed POST: {} after {} hits",
            r.status(),
            hits.load(Ordering::SeqCst)
        ),
        Err(e) => println!(
            "streamed POST error after {} hits: {e:?}",
            hits.load(Ordering::SeqCst)
        ),
    }
    // FINDING: NoRetry is ignored by the default policy; the server's 503 is
    // replaced by an "already sent" error.
    assert!(res.is_err());
    Ok(())
}

#[tokio::test]
async fn reqwest_http_request_policy() -> Result<(), semaforo::BoxError> {
    use semaforo::retry::HttpRequests;
    let (addr, hits) = start_server().await;
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(
            Backoff::exponential(Duration::from_millis(10))
                .jitter(Jitter::None)
                .build()?,
        )
        .build()?;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SemaforoMiddleware::new(
            retry
                .layer()
                .classify(HttpClassifier)
                .requests(HttpRequests::default()),
        ))
        .build();
    let res = client
        .post(format!("http://{addr}/flaky"))
        .body("x")
        .send()
        .await?;
    println!(
        "POST with HttpRequests: {} after {} hits",
        res.status(),
        hits.load(Ordering::SeqCst)
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    hits.store(0, Ordering::SeqCst);
    let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(bytes::Bytes::from_static(
        b"chunk",
    ))]);
    let res = client
        .put(format!("http://{addr}/flaky"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await?;
    println!(
        "streamed PUT with HttpRequests: {} after {} hits",
        res.status(),
        hits.load(Ordering::SeqCst)
    );
    assert_eq!(res.status(), 503);
    Ok(())
}

// ---------------------------------------------------------------- Task 4
use semaforo::grpc::{GrpcClassifier, GrpcRequests, GrpcTimeout, RefusalLayer, StatusWatchLayer};
use semaforo::retry::HttpRequests;
use semaforo::timeout::Timeout;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{
    health_check_response::ServingStatus, HealthCheckRequest, HealthCheckResponse,
};

/// A health service that fails `UNAVAILABLE` `fail_first` times, and takes `delay` per call.
struct Flaky {
    calls: Arc<AtomicU32>,
    fail_first: u32,
    delay: Duration,
}

#[tonic::async_trait]
impl Health for Flaky {
    async fn check(
        &self,
        _req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        if n < self.fail_first {
            return Err(tonic::Status::unavailable("warming up"));
        }
        Ok(tonic::Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }
    type WatchStream = tokio_stream::Empty<Result<HealthCheckResponse, tonic::Status>>;
    async fn watch(
        &self,
        _req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("no watch"))
    }
}

#[tokio::test(start_paused = true)]
async fn grpc_in_memory() -> Result<(), semaforo::BoxError> {
    let calls = Arc::new(AtomicU32::new(0));
    let bulkhead = Bulkhead::builder(1).name("grpc").build()?;
    let timeout = Timeout::builder().total(Duration::from_secs(30)).build()?;
    let server = ServiceBuilder::new()
        .layer(RefusalLayer::new())
        .layer(bulkhead.layer().release_on_body_end())
        .layer(timeout.layer().per_request(GrpcTimeout))
        .service(HealthServer::new(Flaky {
            calls: calls.clone(),
            fail_first: 2,
            delay: Duration::from_millis(100),
        }));

    let retry = Retry::builder().max_attempts(4).build()?;
    let breaker = Breaker::builder()
        .name("health")
        .consecutive_failures(5)
        .build()?;
    let client_stack = ServiceBuilder::new()
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
        .layer(StatusWatchLayer::new());
    let mut client = HealthClient::new(client_stack.service(server));

    // Retried through two UNAVAILABLEs.
    let res = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    assert_eq!(res.into_inner().status, ServingStatus::Serving as i32);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(retry.retries(), 2);

    // Two at once against a bulkhead of 1 with no line: one is refused with
    // RESOURCE_EXHAUSTED + pushback, and the client's retry honours it.
    let (mut c1, mut c2) = (client.clone(), client.clone());
    let (a, b) = tokio::join!(
        c1.check(HealthCheckRequest::default()),
        c2.check(HealthCheckRequest::default()),
    );
    println!(
        "concurrent: {:?} / {:?}; retries {}",
        a.as_ref().map(|r| r.get_ref().status),
        b.as_ref().map(|r| r.get_ref().status),
        retry.retries()
    );
    assert!(a.is_ok() && b.is_ok());
    println!("bulkhead: {:?}", bulkhead.snapshot());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn grpc_refusal_and_deadline_seen_by_plain_client() -> Result<(), semaforo::BoxError> {
    let calls = Arc::new(AtomicU32::new(0));
    let bulkhead = Bulkhead::builder(1).name("grpc").build()?;
    let timeout = Timeout::builder().total(Duration::from_secs(30)).build()?;
    let server = ServiceBuilder::new()
        .layer(RefusalLayer::new())
        .layer(bulkhead.layer().release_on_body_end())
        .layer(timeout.layer().per_request(GrpcTimeout))
        .service(HealthServer::new(Flaky {
            calls: calls.clone(),
            fail_first: 0,
            delay: Duration::from_millis(100),
        }));
    let client = HealthClient::new(server);
    let (mut c1, mut c2) = (client.clone(), client.clone());
    let (a, b) = tokio::join!(
        c1.check(HealthCheckRequest::default()),
        c2.check(HealthCheckRequest::default())
    );
    let refused = a.err().or(b.err()).expect("one refused");
    println!(
        "refused: code={:?} msg={:?} md={:?}",
        refused.code(),
        refused.message(),
        refused.metadata()
    );
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(refused.metadata().get("grpc-retry-pushback-ms").is_some());

    // The caller's deadline (grpc-timeout) cuts the handler.
    let mut c3 = client.clone();
    let mut req = tonic::Request::new(HealthCheckRequest::default());
    req.set_timeout(Duration::from_millis(50));
    let t0 = tokio::time::Instant::now();
    let err = c3.check(req).await.unwrap_err();
    println!(
        "deadline: code={:?} msg={:?} after {:?}",
        err.code(),
        err.message(),
        t0.elapsed()
    );
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
    Ok(())
}

// Task 1, continued: health endpoints and a shutdown in front.
#[tokio::test(start_paused = true)]
async fn axum_health_and_shutdown() -> Result<(), semaforo::BoxError> {
    use axum::routing::get;
    use semaforo::health::Health;
    use semaforo::shutdown::Shutdown;
    let shutdown = Shutdown::new();
    let bulkhead = Bulkhead::builder(1).name("backend").build()?;
    let quota = Quota::builder()
        .name("api")
        .plan("free", Rate::per_hour(3))
        .build()?;
    let free = quota.plan_id("free").unwrap();
    let breaker = Breaker::builder().name("db").build()?;
    let health = Health::new(&shutdown)
        .bulkhead("backend", &bulkhead)
        .quota("api", &quota)
        .breaker("db", &breaker);
    let app: Router = Router::new()
        .route(
            "/work",
            post(|| async { "done" }).route_layer(
                ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(semaforo::axum::handle_error))
                    .layer(shutdown.layer())
                    .layer(quota.layer(HeaderKey::new(
                        http::HeaderName::from_static("x-api-key"),
                        free,
                    )))
                    .layer(bulkhead.layer()),
            ),
        )
        .route(
            "/healthz",
            get(semaforo::axum::health).with_state(health.clone()),
        )
        .route("/readyz", get(semaforo::axum::ready).with_state(health));
    let get_req = |p: &str| Request::get(p).body(Body::empty()).unwrap();

    let res = app.clone().oneshot(get_req("/healthz")).await?;
    assert_eq!(res.status(), 200);
    println!("healthz: {}", body_json(res).await);
    assert_eq!(app.clone().oneshot(get_req("/readyz")).await?.status(), 200);
    breaker.force_open();
    let res = app.clone().oneshot(get_req("/healthz")).await?;
    println!(
        "healthz with breaker forced open: {} {}",
        res.status(),
        body_json(res).await
    );

    shutdown.trigger();
    let res = app.clone().oneshot(get_req("/readyz")).await?;
    assert_eq!(res.status(), 503);
    let res = app.clone().oneshot(work_req("ana")).await?;
    println!(
        "work after shutdown: {:?} {:?}",
        res.status(),
        res.headers()
    );
    assert_eq!(res.status(), 503);
    println!("body: {}", body_json(res).await);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn health_breaker_open_detail() -> Result<(), semaforo::BoxError> {
    use semaforo::health::Health;
    use semaforo::shutdown::Shutdown;
    let shutdown = Shutdown::new();
    let breaker = Breaker::builder()
        .name("db")
        .consecutive_failures(1)
        .build()?;
    let health = Health::new(&shutdown).breaker("db", &breaker);
    breaker.force_open();
    let forced = serde_json::to_value(health.report())?;
    println!(
        "forced open: state={:?} {}",
        breaker.state(),
        forced["components"][0]
    );
    breaker.reset();
    let calls = Arc::new(AtomicU32::new(0));
    let _ = breaker.call(|| load_user(7, calls.clone(), 10)).await;
    let tripped = serde_json::to_value(health.report())?;
    println!(
        "tripped: state={:?} {}",
        breaker.state(),
        tripped["components"][0]
    );
    println!(
        "in_flight as_u64: {:?}",
        tripped["components"][0]["details"]["consecutive_failures"].as_u64()
    );
    Ok(())
}

struct Db {
    calls: AtomicU32,
}
impl Db {
    async fn get(&self, id: u32) -> Result<String, DbError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < 1 {
            Err(DbError::ConnectionLost)
        } else {
            Ok(format!("user {id}"))
        }
    }
}

#[tokio::test(start_paused = true)]
async fn closure_borrowing_a_non_clone_db() -> Result<(), semaforo::BoxError> {
    let retry = Retry::builder().max_attempts(3).build()?;
    let db = Db {
        calls: AtomicU32::new(0),
    };
    let user = retry.call(|| db.get(7)).await?;
    assert_eq!(user, "user 7");
    let breaker = Breaker::builder().build()?;
    let user = breaker.call(|| db.get(8)).await?;
    assert_eq!(user, "user 8");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn closure_full_stack_with_timeout() -> Result<(), semaforo::BoxError> {
    let retry = Retry::builder().max_attempts(3).build()?;
    let breaker = Breaker::builder().build()?;
    let bulkhead = Bulkhead::builder(2).build()?;
    let timeout = Timeout::builder().total(Duration::from_secs(1)).build()?;
    let stack = ServiceBuilder::new()
        .layer(bulkhead.layer())
        .layer(retry.layer())
        .layer(breaker.layer())
        .layer(timeout.layer());
    let db = Db {
        calls: AtomicU32::new(0),
    };
    let user = semaforo::closure::run(&stack, || db.get(7)).await?;
    assert_eq!(user, "user 7");
    // A hung call is cut by the timeout, retried, then given up.
    let err = semaforo::closure::run(&stack, || async {
        std::future::pending::<Result<(), DbError>>().await
    })
    .await
    .unwrap_err();
    println!(
        "hung: {err}; {:?}",
        Rejected::from_box(&err).map(|r| r.kind())
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn closure_async_closure_syntax() -> Result<(), semaforo::BoxError> {
    let retry = Retry::builder().max_attempts(3).build()?;
    let calls = Arc::new(AtomicU32::new(0));
    let user = retry
        .call(async || load_user(7, calls.clone(), 2).await)
        .await?;
    assert_eq!(user, "user 7");
    Ok(())
}
