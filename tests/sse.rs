//! Streamed LLM answers: SSE is parsed by the spec, once, in one place
//! (`semaforo::llm::SseParser`), and the streaming preset reads errors and usage
//! from real events only.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use proptest::prelude::*;
use semaforo::llm::{LlmStack, SseParser, Tier};
use semaforo::BoxError;
use tower::{Service, ServiceBuilder, ServiceExt};

/// An event as a test writes it.
#[derive(Debug, Clone, PartialEq)]
struct Ev {
    event: Option<String>,
    data: Vec<String>,
}

fn text() -> impl Strategy<Value = String> {
    // Printable ASCII (no line ends), with the words that fooled the old scanner.
    prop_oneof![
        "[ -~]{0,12}",
        Just("event: error".to_owned()),
        Just(" lead".to_owned()),
        Just("a:b".to_owned()),
    ]
}

fn event() -> impl Strategy<Value = Ev> {
    (
        proptest::option::of(prop_oneof![
            Just("error"),
            Just("message_delta"),
            Just("ping")
        ]),
        proptest::collection::vec(text(), 1..4),
    )
        .prop_map(|(event, data)| Ev {
            event: event.map(str::to_owned),
            data,
        })
}

/// The stream's bytes: optional BOM, comments between events, one line end.
fn render(events: &[Ev], eol: &str, bom: bool, comments: bool) -> Vec<u8> {
    let mut out = String::new();
    if bom {
        out.push('\u{feff}');
    }
    for e in events {
        if comments {
            out.push_str(": keep-alive");
            out.push_str(eol);
        }
        if let Some(name) = &e.event {
            out.push_str("event: ");
            out.push_str(name);
            out.push_str(eol);
        }
        for d in &e.data {
            out.push_str("data: ");
            out.push_str(d);
            out.push_str(eol);
        }
        out.push_str(eol);
    }
    out.into_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the frame split points, line ends, comments and BOM, the
    /// events parsed are the events written (multi-line data joined by LF).
    #[test]
    fn events_survive_any_framing(
        events in proptest::collection::vec(event(), 0..8),
        eol in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        bom in any::<bool>(),
        comments in any::<bool>(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let bytes = render(&events, eol, bom, comments);
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        at.push(0);
        at.push(bytes.len());
        at.sort_unstable();
        let mut parser = SseParser::new();
        let mut seen = Vec::new();
        for w in at.windows(2) {
            parser.feed(&bytes[w[0]..w[1]], |e| {
                seen.push((
                    String::from_utf8(e.event.to_vec()).unwrap(),
                    String::from_utf8(e.data.to_vec()).unwrap(),
                ))
            });
        }
        let expected: Vec<(String, String)> = events
            .iter()
            .map(|e| (e.event.clone().unwrap_or_else(|| "message".into()), e.data.join("\n")))
            .collect();
        prop_assert_eq!(seen, expected);
        prop_assert_eq!(parser.scanned(), bytes.len() as u64);
    }
}

/// A client answering 200 with these SSE frames.
fn client(
    frames: &'static [&'static [u8]],
) -> impl Service<
    http::Request<Bytes>,
    Response = http::Response<UnsyncBoxBody<Bytes, BoxError>>,
    Error = BoxError,
    Future = impl Send,
> + Clone
       + Send {
    tower::service_fn(move |_req: http::Request<Bytes>| async move {
        let chunks = futures::stream::iter(
            frames
                .iter()
                .map(|f| Ok::<_, BoxError>(http_body::Frame::data(Bytes::from_static(f)))),
        );
        Ok::<_, BoxError>(http::Response::new(
            http_body_util::StreamBody::new(chunks).boxed_unsync(),
        ))
    })
}

fn stack() -> LlmStack {
    LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .build()
    .unwrap()
}

fn request() -> http::Request<Bytes> {
    http::Request::post("/v1/chat/completions")
        .body(Bytes::from_static(
            br#"{"model":"m","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"hola"}]}"#,
        ))
        .unwrap()
}

/// One streamed call through `stack`'s streaming preset to a client answering
/// `frames`; the error its body ended with, if any.
async fn stream_through(stack: &LlmStack, frames: &'static [&'static [u8]]) -> Option<BoxError> {
    let svc = ServiceBuilder::new()
        .layer(stack.stream_layer())
        .service(client(frames));
    let res = svc.oneshot(request()).await.unwrap();
    drain(res.into_body()).await
}

/// Reads a body to its end; the error it ended with, if any.
async fn drain<B>(body: B) -> Option<BoxError>
where
    B: http_body::Body + Unpin,
    B::Error: Into<BoxError>,
{
    let mut body = body;
    loop {
        match body.frame().await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Some(e.into()),
            None => return None,
        }
    }
}

/// vLLM and SGLang report a failure after the 200 as a plain `data:` payload
/// with an `error` object (no `event:` line): a failure the breaker counts.
#[tokio::test(start_paused = true)]
async fn a_data_error_payload_is_a_failure() {
    static FRAMES: &[&[u8]] = &[
        b"data: {\"choices\":[{\"delta\":{\"content\":\"hola\"}}]}\n\n",
        b"data: {\"error\":{\"type\":\"server_error\",\"message\":\"engine died\"}}\n\n",
    ];
    let stack = stack();
    let err = stream_through(&stack, FRAMES)
        .await
        .expect("the stream failed");
    assert!(err.to_string().contains("engine died"), "{err}");
    let failed = err
        .downcast_ref::<semaforo::llm::StreamFailed>()
        .expect("a StreamFailed");
    assert_eq!(failed.class, semaforo::classify::Class::Transient);
    assert_eq!(stack.breaker().snapshot().consecutive_failures, 1);
}

/// Words that look like an SSE field inside a `data:` payload are content, even
/// split across frames: the answer is untouched and counts as a success.
#[tokio::test(start_paused = true)]
async fn event_error_inside_the_text_is_untouched() {
    static FRAMES: &[&[u8]] = &[
        b"data: {\"choices\":[{\"delta\":{\"content\":\"write event: error\\n\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"to the log, then eve",
        b"nt: err",
        b"or again\"}}]}\n\ndata: {\"usage\":{\"total_tokens\":12}}\n\ndata: [DONE]\n\n",
    ];
    let stack = stack();
    let mut svc = ServiceBuilder::new()
        .layer(stack.stream_layer())
        .service(client(FRAMES));
    let res = svc.ready().await.unwrap().call(request()).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let whole: Vec<u8> = FRAMES.concat();
    assert_eq!(&body[..], &whole[..], "untouched");
    let snap = stack.breaker().snapshot();
    assert_eq!(snap.consecutive_failures, 0);
    assert_eq!(snap.state, semaforo::breaker::BreakerState::Closed);
}

/// An `event: error` split across frames (the field name in one, its data in
/// the next) is still seen.
#[tokio::test(start_paused = true)]
async fn an_error_event_split_across_frames_is_seen() {
    static FRAMES: &[&[u8]] = &[
        b"data: {\"choices\":[]}\n\neve",
        b"nt: error\r\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}",
        b"\r\n\r\n",
    ];
    let stack = stack();
    let err = stream_through(&stack, FRAMES)
        .await
        .expect("the stream failed");
    let failed = err
        .downcast_ref::<semaforo::llm::StreamFailed>()
        .expect("a StreamFailed");
    assert_eq!(
        failed.class,
        semaforo::classify::Class::Overloaded { retry_after: None }
    );
    assert_eq!(stack.breaker().snapshot().consecutive_failures, 1);
}

/// Anthropic reports a stream's input tokens in `message_start` (nested in
/// `message`) and its output tokens in the last `message_delta`: the pacer
/// is charged both, not the output alone.
#[tokio::test(start_paused = true)]
async fn anthropic_stream_usage_counts_input_and_output() {
    static FRAMES: &[&[u8]] = &[
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":10000,\"output_tokens\":1}}}\n\n",
        b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hola\"}}\n\n",
        b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ];
    let pace = semaforo::pace::Pace::builder()
        .tokens_per_day(1_000_000)
        .build()
        .unwrap();
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .pace(pace.clone())
    .build()
    .unwrap();
    assert!(stream_through(&stack, FRAMES).await.is_none());
    let dim = pace.snapshot().dims[0];
    let charged = dim.capacity - dim.available;
    assert!(
        (charged - 10_015.0).abs() < 1.0,
        "charged {charged} tokens for 10,000 in + 15 out"
    );
}

/// A payload with an `error` is a failure even when another field has an
/// unexpected type, and data that starts with a space is still read.
#[tokio::test(start_paused = true)]
async fn an_error_payload_with_odd_fields_is_still_an_error() {
    static FRAMES: &[&[u8]] = &[
        b"data: {\"choices\":[]}\n\n",
        b"data:  {\"error\":{\"type\":\"server_error\",\"message\":\"gone\"},\"usage\":\"n/a\"}\n\n",
    ];
    let stack = stack();
    let err = stream_through(&stack, FRAMES)
        .await
        .expect("the stream failed");
    assert!(err.to_string().contains("gone"), "{err}");
    assert_eq!(stack.breaker().snapshot().consecutive_failures, 1);
}

/// An `event: error` whose data is over the parser's cap is still a failure.
#[tokio::test(start_paused = true)]
async fn an_error_event_over_the_cap_is_still_a_failure() {
    let huge: &'static [u8] = Box::leak(
        format!("event: error\ndata: {}\n\n", "x".repeat(2 << 20))
            .into_bytes()
            .into_boxed_slice(),
    );
    let frames: &'static [&'static [u8]] =
        Box::leak(vec![&b"data: {}\n\n"[..], huge].into_boxed_slice());
    let stack = stack();
    assert!(
        stream_through(&stack, frames).await.is_some(),
        "the failure was seen"
    );
    assert_eq!(stack.breaker().snapshot().consecutive_failures, 1);
}

/// A stack whose breaker opens after 3 consecutive failures.
fn touchy() -> LlmStack {
    LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .breaker(
        semaforo::breaker::Breaker::builder()
            .consecutive_failures(3)
            .build()
            .unwrap(),
    )
    .build()
    .unwrap()
}

/// A failure found mid-stream counts by its class: a content-policy error is
/// the request's fault (`Permanent`) and never trips the breaker; a server
/// error does.
#[tokio::test(start_paused = true)]
async fn a_mid_stream_failure_counts_by_its_class() {
    use semaforo::breaker::BreakerState;
    static POLICY: &[&[u8]] = &[
        b"data: {\"choices\":[{\"delta\":{\"content\":\"ho\"}}]}\n\n",
        b"event: error\ndata: {\"error\":{\"type\":\"invalid_request_error\",\"code\":\"content_filter\",\"message\":\"blocked by the content policy\"}}\n\n",
    ];
    static SERVER: &[&[u8]] = &[
        b"data: {\"choices\":[{\"delta\":{\"content\":\"ho\"}}]}\n\n",
        b"event: error\ndata: {\"error\":{\"type\":\"server_error\",\"message\":\"boom\"}}\n\n",
    ];
    let stack = touchy();
    for _ in 0..5 {
        assert!(stream_through(&stack, POLICY).await.is_some());
    }
    assert_eq!(stack.breaker().state(), BreakerState::Closed);
    for _ in 0..3 {
        assert!(stream_through(&stack, SERVER).await.is_some());
    }
    assert_eq!(stack.breaker().state(), BreakerState::Open);
}

/// A reader that stops at the frame carrying the error event (SDKs raise,
/// then close) still has the failure counted.
#[tokio::test(start_paused = true)]
async fn a_failure_counts_when_the_reader_lets_go_at_the_error_event() {
    use semaforo::breaker::BreakerState;
    static SERVER: &[&[u8]] = &[
        b"data: {\"choices\":[{\"delta\":{\"content\":\"ho\"}}]}\n\n",
        b"event: error\ndata: {\"error\":{\"type\":\"server_error\",\"message\":\"boom\"}}\n\n",
        b"data: [DONE]\n\n",
    ];
    let stack = touchy();
    for _ in 0..3 {
        let svc = ServiceBuilder::new()
            .layer(stack.stream_layer())
            .service(client(SERVER));
        let mut body = svc.oneshot(request()).await.unwrap().into_body();
        loop {
            let frame = body.frame().await.unwrap().unwrap();
            if frame
                .data_ref()
                .is_some_and(|d| d.starts_with(b"event: error"))
            {
                break;
            }
        }
        drop(body);
    }
    assert_eq!(stack.breaker().state(), BreakerState::Open);
}
