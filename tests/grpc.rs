//! `semaforo::grpc` with tonic's generated health client and server, wired
//! in memory (the client's channel is the server's service: no sockets, no
//! HTTP/2), so every scenario runs on paused time.

use proptest::prelude::*;
use semaforo::breaker::{Breaker, BreakerState};
use semaforo::bulkhead::Bulkhead;
use semaforo::classify::{Class, Classify};
use semaforo::grpc::{
    code_class, parse_timeout, refusal_status, status_class, GrpcClassifier, GrpcRequests,
    GrpcTimeout, Idempotent, Pushback, RefusalLayer, StatusWatchLayer,
};
use semaforo::retry::{HttpRequests, Retry};
use semaforo::shutdown::Shutdown;
use semaforo::timeout::Timeout;
use semaforo::{BoxError, RejectKind, Rejected};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::{Code, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::ServiceBuilder;

const CHECK: &str = "/grpc.health.v1.Health/Check";

type Watch = Pin<Box<dyn futures::Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

type Messages = tokio::sync::mpsc::UnboundedReceiver<Result<HealthCheckResponse, Status>>;

/// A health server answering `check` from a script (then OK), after `work`;
/// counting the calls that reached it and when. `watch` streams what the
/// test sends on `streams`.
#[derive(Clone, Default)]
struct Scripted {
    script: Arc<Mutex<VecDeque<Status>>>,
    work: Duration,
    calls: Arc<AtomicUsize>,
    at: Arc<Mutex<Vec<Instant>>>,
    streams: Arc<Mutex<VecDeque<Messages>>>,
}

impl Scripted {
    fn answering(script: Vec<Status>) -> Self {
        Scripted {
            script: Arc::new(Mutex::new(script.into())),
            ..Scripted::default()
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl Health for Scripted {
    async fn check(
        &self,
        _req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.at.lock().unwrap().push(Instant::now());
        tokio::time::sleep(self.work).await;
        match self.script.lock().unwrap().pop_front() {
            Some(status) => Err(status),
            None => Ok(tonic::Response::new(HealthCheckResponse { status: 1 })),
        }
    }

    type WatchStream = Watch;

    async fn watch(
        &self,
        _req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Watch>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let rx = self
            .streams
            .lock()
            .unwrap()
            .pop_front()
            .expect("a stream to serve");
        let s =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        Ok(tonic::Response::new(Box::pin(s)))
    }
}

fn req() -> tonic::Request<HealthCheckRequest> {
    tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    })
}

fn pushed_back(ms: u64) -> Status {
    let mut s = Status::resource_exhausted("slow down");
    s.metadata_mut()
        .insert("grpc-retry-pushback-ms", ms.to_string().parse().unwrap());
    s
}

fn retry(attempts: u32) -> Retry {
    Retry::builder()
        .max_attempts(attempts)
        .backoff(
            semaforo::backoff::Backoff::exponential(Duration::from_millis(100))
                .jitter(semaforo::backoff::Jitter::None)
                .build()
                .unwrap(),
        )
        .no_budget()
        .build()
        .unwrap()
}

/// The client stack of the module docs around the in-memory server:
/// refusals → which requests retry → retry → breaker → status watch.
macro_rules! client {
    ($server:expr, $retry:expr, $breaker:expr, $requests:expr) => {
        HealthClient::new(
            ServiceBuilder::new()
                .layer(RefusalLayer::new())
                .layer($requests.layer())
                .layer(
                    $retry
                        .layer()
                        .classify(GrpcClassifier)
                        .requests(HttpRequests::default().allow_non_idempotent()),
                )
                .layer(
                    $breaker
                        .layer()
                        .classify(GrpcClassifier)
                        .record_on_body_end(),
                )
                .layer(StatusWatchLayer::new())
                .service(HealthServer::new($server.clone())),
        )
    };
}

/// `RESOURCE_EXHAUSTED` with a pushback of 1,500 ms: the client retries
/// 1.5 s later (the pushback, not the 100 ms backoff) and gets the answer.
#[tokio::test(start_paused = true)]
async fn resource_exhausted_with_pushback_1500_ms_is_retried_after_1_5_s() {
    let server = Scripted::answering(vec![pushed_back(1_500)]);
    let breaker = Breaker::builder().build().unwrap();
    let mut client = client!(server, retry(3), breaker, GrpcRequests::new().method(CHECK));
    let t0 = Instant::now();
    let res = client.check(req()).await.unwrap();
    assert_eq!(res.into_inner().status, 1);
    let at = server.at.lock().unwrap().clone();
    assert_eq!(at.len(), 2);
    assert_eq!(at[1] - at[0], Duration::from_millis(1_500));
    assert_eq!(t0.elapsed(), Duration::from_millis(1_500));
    assert_eq!(
        breaker.state(),
        BreakerState::Closed,
        "a pushback is not a failure"
    );
}

/// `UNAVAILABLE` five times opens a five-failure breaker; the sixth call is
/// refused on the client, as `UNAVAILABLE` with the breaker's pushback,
/// without reaching the server.
#[tokio::test(start_paused = true)]
async fn unavailable_five_times_opens_the_breaker() {
    let server = Scripted::answering((0..5).map(|_| Status::unavailable("down")).collect());
    let breaker = Breaker::builder()
        .consecutive_failures(5)
        .open_for(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut client = client!(server, retry(1), breaker, GrpcRequests::new().method(CHECK));
    for i in 0..5 {
        let err = client.check(req()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "call {i}");
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    let err = client.check(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("circuit open"), "{}", err.message());
    assert_eq!(
        err.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "30000"
    );
    assert_eq!(server.calls(), 5, "the sixth never reached the server");
}

/// `INVALID_ARGUMENT` is returned at once, never retried, and does not
/// count against the breaker.
#[tokio::test(start_paused = true)]
async fn invalid_argument_is_not_retried() {
    let server = Scripted::answering(vec![Status::invalid_argument("bad service name")]);
    let breaker = Breaker::builder().consecutive_failures(1).build().unwrap();
    let mut client = client!(server, retry(4), breaker, GrpcRequests::new().method(CHECK));
    let err = client.check(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(server.calls(), 1);
    assert_eq!(breaker.state(), BreakerState::Closed);
}

/// A method that is not listed is sent once; the same request flagged
/// `Idempotent` is retried.
#[tokio::test(start_paused = true)]
async fn only_listed_or_flagged_methods_are_retried() {
    let server = Scripted::answering(vec![
        Status::unavailable("a"),
        Status::unavailable("b"),
        Status::unavailable("c"),
    ]);
    let breaker = Breaker::builder()
        .consecutive_failures(100)
        .build()
        .unwrap();
    let mut client = client!(server, retry(3), breaker, GrpcRequests::new());
    let err = client.check(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(server.calls(), 1, "not listed: sent once");
    let mut flagged = req();
    flagged.extensions_mut().insert(Idempotent);
    let res = client.check(flagged).await.unwrap();
    assert_eq!(res.into_inner().status, 1);
    assert_eq!(
        server.calls(),
        4,
        "flagged: 2 more failures, then the answer"
    );
}

/// The server behind shutdown → bulkhead (100, no line) → timeout refuses
/// the excess of 1,000 concurrent calls with `RESOURCE_EXHAUSTED` and a
/// pushback, without calling the handler: 100 handled, 900 refused.
#[tokio::test(start_paused = true)]
async fn a_server_under_1000_concurrent_calls_refuses_the_excess_without_calling_the_handler() {
    let handler = Scripted {
        work: Duration::from_secs(1),
        ..Scripted::default()
    };
    let shutdown = Shutdown::new();
    let bulkhead = Bulkhead::builder(100)
        .max_queue(0)
        .name("grpc")
        .expected_service_time(Duration::from_secs(1))
        .build()
        .unwrap();
    let timeout = Timeout::builder()
        .total(Duration::from_secs(30))
        .build()
        .unwrap();
    let server = ServiceBuilder::new()
        .layer(RefusalLayer::new())
        .layer(shutdown.layer())
        .layer(bulkhead.layer().release_on_body_end())
        .layer(timeout.layer().per_request(GrpcTimeout))
        .service(HealthServer::new(handler.clone()));
    let tasks: Vec<_> = (0..1_000)
        .map(|_| {
            let mut client = HealthClient::new(server.clone());
            tokio::spawn(async move { client.check(req()).await })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                let ms: u64 = s
                    .metadata()
                    .get("grpc-retry-pushback-ms")
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(ms > 0, "a pushback");
                refused += 1;
            }
        }
    }
    assert_eq!((ok, refused), (100, 900));
    assert_eq!(
        handler.calls(),
        100,
        "the handler saw only the admitted calls"
    );
    assert_eq!(bulkhead.snapshot().rejected_queue_full, 900);
}

/// `grpc-timeout` is honoured on the server: a handler that would take a
/// minute is cut at the client's 1.5 s with `DEADLINE_EXCEEDED`.
#[tokio::test(start_paused = true)]
async fn the_callers_grpc_timeout_cuts_the_handler() {
    let handler = Scripted {
        work: Duration::from_secs(60),
        ..Scripted::default()
    };
    let timeout = Timeout::builder()
        .total(Duration::from_secs(30))
        .build()
        .unwrap();
    let server = ServiceBuilder::new()
        .layer(RefusalLayer::new())
        .layer(timeout.layer().per_request(GrpcTimeout))
        .service(HealthServer::new(handler.clone()));
    let mut client = HealthClient::new(server);
    let mut r = req();
    r.set_timeout(Duration::from_millis(1_500));
    let t0 = Instant::now();
    let err = client.check(r).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(
        err.message().contains("request deadline"),
        "{}",
        err.message()
    );
    assert_eq!(t0.elapsed(), Duration::from_millis(1_500));
    // Without the header: the server's own 30 s.
    let t0 = Instant::now();
    let err = client.check(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert_eq!(t0.elapsed(), Duration::from_secs(30));
}

/// A server-streaming call holds its bulkhead permit until its last message:
/// meanwhile a unary call is refused (one permit, no line); once the stream
/// ends, it is served.
#[tokio::test(start_paused = true)]
async fn a_streaming_call_holds_its_permit_to_the_end() {
    let handler = Scripted::default();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    handler.streams.lock().unwrap().push_back(rx);
    let bulkhead = Bulkhead::builder(1).max_queue(0).build().unwrap();
    let server = ServiceBuilder::new()
        .layer(RefusalLayer::new())
        .layer(bulkhead.layer().release_on_body_end())
        .service(HealthServer::new(handler.clone()));
    let mut client = HealthClient::new(server);
    let mut stream = client.watch(req()).await.unwrap().into_inner();
    for i in 0..3 {
        tx.send(Ok(HealthCheckResponse { status: i })).unwrap();
        assert_eq!(stream.message().await.unwrap().unwrap().status, i);
        let err = client.check(req()).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "message {i}");
        assert_eq!(bulkhead.snapshot().in_flight, 1);
    }
    drop(tx);
    assert!(
        stream.message().await.unwrap().is_none(),
        "the stream ended OK"
    );
    assert_eq!(bulkhead.snapshot().in_flight, 0);
    assert_eq!(client.check(req()).await.unwrap().into_inner().status, 1);
}

/// A status in the trailers, after messages, is judged when the body ends:
/// a stream that ends `UNAVAILABLE` opens a one-failure breaker that
/// records at the body's end; one that ends OK does not.
#[tokio::test(start_paused = true)]
async fn a_status_in_the_trailers_counts_at_the_end_of_the_stream() {
    let handler = Scripted::default();
    let (ok_tx, ok_rx) = tokio::sync::mpsc::unbounded_channel();
    let (bad_tx, bad_rx) = tokio::sync::mpsc::unbounded_channel();
    handler.streams.lock().unwrap().extend([ok_rx, bad_rx]);
    let breaker = Breaker::builder().consecutive_failures(1).build().unwrap();
    let mut client = client!(handler, retry(1), breaker, GrpcRequests::new());

    let mut s = client.watch(req()).await.unwrap().into_inner();
    ok_tx.send(Ok(HealthCheckResponse { status: 1 })).unwrap();
    drop(ok_tx);
    assert!(s.message().await.unwrap().is_some());
    assert!(s.message().await.unwrap().is_none());
    drop(s);
    assert_eq!(breaker.state(), BreakerState::Closed);

    let mut s = client.watch(req()).await.unwrap().into_inner();
    bad_tx.send(Ok(HealthCheckResponse { status: 1 })).unwrap();
    assert!(s.message().await.unwrap().is_some());
    assert_eq!(breaker.state(), BreakerState::Closed, "still streaming");
    bad_tx
        .send(Err(Status::unavailable("lost the backend")))
        .unwrap();
    let err = s.message().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    drop(s);
    assert_eq!(breaker.state(), BreakerState::Open, "judged at the end");
}

/// tonic's `Status` errors are classified anywhere: `breaker.call` around a
/// generated client's call (the closure API) reads their codes.
#[tokio::test(start_paused = true)]
async fn the_closure_api_reads_tonic_statuses() {
    let server = Scripted::answering(vec![
        Status::invalid_argument("x"),
        Status::unavailable("y"),
    ]);
    let breaker = Breaker::builder().consecutive_failures(1).build().unwrap();
    let client = HealthClient::new(HealthServer::new(server.clone()));
    let call = || {
        let mut c = client.clone();
        async move { c.check(req()).await }
    };
    assert!(breaker.call(call).await.is_err());
    assert_eq!(
        breaker.state(),
        BreakerState::Closed,
        "INVALID_ARGUMENT is not a failure"
    );
    assert!(breaker.call(call).await.is_err());
    assert_eq!(breaker.state(), BreakerState::Open, "UNAVAILABLE is");
}

/// Dropping a retryable call while its body is being read drops the body
/// (and the ready service it held); nothing is called.
#[tokio::test(start_paused = true)]
async fn dropping_a_call_while_its_body_is_read_drops_everything() {
    use http_body_util::BodyExt as _;
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = {
        let calls = calls.clone();
        tower::service_fn(move |_req: http::Request<semaforo::grpc::ReplayBody>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                Ok::<_, BoxError>(http::Response::new(
                    http_body_util::Empty::<bytes::Bytes>::new(),
                ))
            }
        })
    };
    let mut svc = GrpcRequests::new()
        .method(CHECK)
        .layer()
        .layer_service(inner);
    let (tx, rx) =
        tokio::sync::mpsc::unbounded_channel::<Result<http_body::Frame<bytes::Bytes>, BoxError>>();
    let body =
        http_body_util::StreamBody::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .boxed_unsync();
    let req = http::Request::post(CHECK).body(body).unwrap();
    let mut fut = Box::pin(tower::Service::call(&mut svc, req));
    tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(
        b"part",
    ))))
    .unwrap();
    assert!(
        futures::poll!(fut.as_mut()).is_pending(),
        "reading the body"
    );
    drop(fut);
    assert!(tx.is_closed(), "the body was dropped");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

trait LayerService<S> {
    type Service;
    fn layer_service(&self, s: S) -> Self::Service;
}
impl<L: tower::Layer<S>, S> LayerService<S> for L {
    type Service = L::Service;
    fn layer_service(&self, s: S) -> L::Service {
        self.layer(s)
    }
}

/// The bodies a retry sends: any body up to the bound is sent again byte
/// for byte; a larger one is sent once, whole and in order, with `NoRetry`.
async fn sent_bodies(chunks: Vec<Vec<u8>>, max: usize) -> (Vec<Vec<u8>>, bool) {
    use http_body_util::BodyExt as _;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let retried = Arc::new(Mutex::new(false));
    let inner = {
        let (seen, retried) = (seen.clone(), retried.clone());
        tower::service_fn(move |req: http::Request<semaforo::grpc::ReplayBody>| {
            let (seen, retried) = (seen.clone(), retried.clone());
            async move {
                *retried.lock().unwrap() = HttpRequests::default()
                    .allow_non_idempotent()
                    .retryable_of(&req);
                let bytes = req.into_body().collect().await?.to_bytes();
                seen.lock().unwrap().push(bytes.to_vec());
                Ok::<_, BoxError>(Status::unavailable("again").into_http::<tonic::body::Body>())
            }
        })
    };
    let retry = retry(3);
    let svc = ServiceBuilder::new()
        .layer(GrpcRequests::new().method(CHECK).max_buffer(max).layer())
        .layer(
            retry
                .layer()
                .classify(GrpcClassifier)
                .requests(HttpRequests::default().allow_non_idempotent()),
        )
        .service(inner);
    let frames: Vec<Result<http_body::Frame<bytes::Bytes>, BoxError>> = chunks
        .into_iter()
        .map(|c| Ok(http_body::Frame::data(bytes::Bytes::from(c))))
        .collect();
    let body = http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed_unsync();
    let req = http::Request::post(CHECK).body(body).unwrap();
    let _ = tower::ServiceExt::oneshot(svc, req).await.unwrap();
    let out = seen.lock().unwrap().clone();
    let r = *retried.lock().unwrap();
    (out, r)
}

trait Retryable<B> {
    fn retryable_of(&self, req: &http::Request<B>) -> bool;
}
impl<B: Clone> Retryable<B> for HttpRequests {
    fn retryable_of(&self, req: &http::Request<B>) -> bool {
        semaforo::retry::RequestPolicy::retryable(self, req)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A refusal's status classifies back to the refusal's meaning: the
    /// same wait (rounded up to the ms), retryable unless it can never fit.
    #[test]
    fn a_refusal_status_reads_back_as_its_class(kind in 0usize..9, wait_us in proptest::option::of(0u64..10_000_000_000)) {
        let kinds = [
            RejectKind::QueueFull, RejectKind::QueueTimeout, RejectKind::QuotaExceeded,
            RejectKind::BudgetExceeded, RejectKind::CircuitOpen, RejectKind::RetryBudgetExhausted,
            RejectKind::ShuttingDown, RejectKind::Timeout, RejectKind::BackendUnavailable,
        ];
        let mut r = Rejected::new("x", kinds[kind]);
        if let Some(us) = wait_us {
            r = r.with_retry_after(Duration::from_micros(us));
        }
        let status = refusal_status(&r);
        let class = status_class(&status);
        let never_fits = r.http_status() == 413;
        prop_assert_eq!(class.is_retryable(), !never_fits, "{:?} {:?}", kinds[kind], class);
        if let (Some(us), false) = (wait_us, never_fits) {
            if kinds[kind] != RejectKind::Timeout {
                prop_assert_eq!(class.retry_after(), Some(Duration::from_millis(us.div_ceil(1_000))));
            }
        }
        // Through the wire form (a trailers-only response) too.
        let res = status.into_http::<tonic::body::Body>();
        prop_assert_eq!(GrpcClassifier.classify(Ok::<_, &BoxError>(&res)), class);
    }

    /// `grpc-timeout` parsing never panics, and reads every valid value.
    #[test]
    fn grpc_timeout_parses_any_input(bytes in proptest::collection::vec(any::<u8>(), 0..12), n in 0u64..100_000_000, unit in 0usize..6) {
        let _ = parse_timeout(&bytes);
        let units = [b'H', b'M', b'S', b'm', b'u', b'n'];
        let mut v = n.to_string().into_bytes();
        v.push(units[unit]);
        let d = parse_timeout(&v).unwrap();
        let expected = match units[unit] {
            b'H' => Duration::from_secs(n * 3_600),
            b'M' => Duration::from_secs(n * 60),
            b'S' => Duration::from_secs(n),
            b'm' => Duration::from_millis(n),
            b'u' => Duration::from_micros(n),
            _ => Duration::from_nanos(n),
        };
        prop_assert_eq!(d, expected);
    }

    /// A retryable body is sent again identically; above the bound it is
    /// sent once, identically, and marked not retryable.
    #[test]
    fn bodies_are_replayed_byte_for_byte_or_sent_once(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
        max in 1usize..256,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        let whole: Vec<u8> = chunks.concat();
        let (sent, retryable) = rt.block_on(sent_bodies(chunks, max));
        if whole.len() <= max {
            prop_assert!(retryable);
            prop_assert_eq!(sent.len(), 3);
        } else {
            prop_assert!(!retryable);
            prop_assert_eq!(sent.len(), 1);
        }
        for s in sent {
            prop_assert_eq!(&s, &whole);
        }
    }
}

#[test]
fn the_code_table() {
    let after = Some(Pushback::After(Duration::from_secs(2)));
    assert_eq!(code_class(Code::Ok, None), Class::Success);
    assert_eq!(
        code_class(Code::Unavailable, after),
        Class::Overloaded {
            retry_after: Some(Duration::from_secs(2))
        }
    );
    for c in [
        Code::DeadlineExceeded,
        Code::Aborted,
        Code::Internal,
        Code::Unknown,
    ] {
        assert_eq!(code_class(c, None), Class::Transient, "{c:?}");
    }
    for c in [
        Code::InvalidArgument,
        Code::OutOfRange,
        Code::FailedPrecondition,
        Code::Unauthenticated,
        Code::PermissionDenied,
        Code::NotFound,
        Code::Cancelled,
        Code::AlreadyExists,
        Code::Unimplemented,
        Code::DataLoss,
    ] {
        assert!(!code_class(c, None).is_retryable(), "{c:?}");
        assert!(!code_class(c, None).is_upstream_failure(), "{c:?}");
    }
    assert!(!code_class(Code::Unavailable, Some(Pushback::DoNotRetry)).is_retryable());
    // HTTP statuses of a proxy in front of a gRPC server.
    let res = |s: u16| http::Response::builder().status(s).body(()).unwrap();
    assert_eq!(
        GrpcClassifier.classify(Ok::<_, &BoxError>(&res(503))),
        Class::Overloaded { retry_after: None }
    );
    assert!(!GrpcClassifier
        .classify(Ok::<_, &BoxError>(&res(401)))
        .is_retryable());
    assert_eq!(
        GrpcClassifier.classify(Ok::<_, &BoxError>(&res(200))),
        Class::Success
    );
}

/// A retry tells the server what is left of the caller's `grpc-timeout`
/// (counted from the call's start), not the original total: 10 s, then
/// 9.9 s after the 100 ms backoff, then 9.7 s after the 200 ms one.
#[tokio::test(start_paused = true)]
async fn each_retry_sends_the_grpc_timeout_left() {
    use tower::ServiceExt;
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(
            retry(3)
                .layer()
                .classify(GrpcClassifier)
                .requests(HttpRequests::default().allow_non_idempotent()),
        )
        .service(tower::service_fn(move |req: http::Request<()>| {
            let mut log = log.lock().unwrap();
            log.push(
                req.headers()
                    .get("grpc-timeout")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default(),
            );
            let unavailable = log.len() < 3;
            async move {
                let mut res = http::Response::new(());
                if unavailable {
                    *res.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                }
                Ok::<_, BoxError>(res)
            }
        }));
    let req = http::Request::post(CHECK)
        .header("grpc-timeout", "10S")
        .body(())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), http::StatusCode::OK);
    assert_eq!(*seen.lock().unwrap(), ["10S", "9900000u", "9700000u"]);
    // Spent: a retry is told 0.
    assert_eq!(semaforo::grpc::format_timeout(Duration::ZERO), "0n");
    assert_eq!(
        semaforo::grpc::format_timeout(Duration::MAX),
        "99999999H",
        "the longest the header can say"
    );
}
