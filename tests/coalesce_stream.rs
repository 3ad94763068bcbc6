//! Coalescing a streamed answer: one upstream body read once, its chunks
//! fanned out to every caller.

use bytes::Bytes;
use futures::StreamExt;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, StreamBody};
use semaforo::coalesce::CoalesceLayer;
use semaforo::share::{FanOut, FanOutBody, Served};
use semaforo::BoxError;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

type Chunks = Pin<Box<dyn futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send>>;

/// A streamed answer of `n` chunks, one every 100 ms (`chunk 0 `, …),
/// failing after `fail_after` chunks if given.
fn upstream(
    calls: &Arc<AtomicUsize>,
    n: usize,
    fail_after: Option<usize>,
) -> impl Service<
    String,
    Response = http::Response<StreamBody<Chunks>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send {
    let calls = calls.clone();
    tower::service_fn(move |_topic: String| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let chunks: Chunks = Box::pin(futures::stream::unfold(0usize, move |i| async move {
                if i == n {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                if fail_after == Some(i) {
                    return Some((Err(std::io::Error::other("upstream reset")), n));
                }
                Some((Ok(Frame::data(Bytes::from(format!("chunk {i} ")))), i + 1))
            }));
            Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(200)
                    .header("content-type", "text/event-stream")
                    .body(StreamBody::new(chunks))
                    .unwrap(),
            )
        }
    })
}

#[allow(clippy::ptr_arg)] // a key of `String` requests reads `&String`
fn by_topic(t: &String) -> Option<String> {
    Some(t.clone())
}

/// Reads a body as hyper does: frames until `is_end_stream` (or the end).
async fn read_all(mut body: FanOutBody) -> Result<Vec<u8>, BoxError> {
    let mut out = Vec::new();
    while !body.is_end_stream() {
        match body.frame().await {
            Some(f) => {
                if let Ok(d) = f?.into_data() {
                    out.extend_from_slice(&d);
                }
            }
            None => break,
        }
    }
    Ok(out)
}

fn whole(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| format!("chunk {i} "))
        .collect::<String>()
        .into_bytes()
}

/// 10 callers at once: one upstream call, 10 byte-identical streams that
/// end at 1 s (the stream's own length); a caller joining after 3 chunks
/// gets all 10.
#[tokio::test(start_paused = true)]
async fn ten_callers_one_stream_and_a_late_joiner_gets_it_all() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = CoalesceLayer::new(by_topic).share(FanOut::default());
    let svc = layer.layer(upstream(&calls, 10, None));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let res = svc.oneshot("x".to_string()).await.unwrap();
            let served = res.extensions().get::<Served>().copied();
            (
                served,
                read_all(res.into_body()).await.unwrap(),
                t0.elapsed(),
            )
        }));
    }
    tokio::time::sleep(Duration::from_millis(350)).await;
    let late = {
        let svc = svc.clone();
        tokio::spawn(async move {
            let res = svc.oneshot("x".to_string()).await.unwrap();
            read_all(res.into_body()).await.unwrap()
        })
    };
    let mut coalesced = 0;
    for t in tasks {
        let (served, bytes, at) = t.await.unwrap();
        assert_eq!(bytes, whole(10));
        assert_eq!(at, Duration::from_secs(1));
        coalesced += usize::from(served == Some(Served::Coalesced));
    }
    assert_eq!(coalesced, 9, "one caller's call ran");
    assert_eq!(
        late.await.unwrap(),
        whole(10),
        "the late joiner got all chunks"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The stream ended: nothing left to join; the next call is a new one.
    assert_eq!(layer.in_flight(), 0);
    let res = svc.clone().oneshot("x".to_string()).await.unwrap();
    assert_eq!(read_all(res.into_body()).await.unwrap(), whole(10));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// The caller whose call ran drops its body after 2 chunks: the others
/// read on to the end.
#[tokio::test(start_paused = true)]
async fn the_leader_dropping_its_body_does_not_cut_the_others() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = CoalesceLayer::new(by_topic)
        .share(FanOut::default())
        .layer(upstream(&calls, 10, None));
    let leader = svc.clone().oneshot("x".to_string());
    let followers: Vec<_> = (0..3)
        .map(|_| svc.clone().oneshot("x".to_string()))
        .collect();
    let (leader, followers) = tokio::join!(leader, futures::future::join_all(followers));
    let mut body = leader.unwrap().into_body();
    for _ in 0..2 {
        body.frame().await.unwrap().unwrap();
    }
    drop(body);
    for f in followers {
        assert_eq!(read_all(f.unwrap().into_body()).await.unwrap(), whole(10));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// One caller stops reading: the others are not held back; once the
/// chunks it has not read pass the buffer (3 chunks' worth), it is cut —
/// its body ends with an error — and a caller arriving after that calls
/// on its own.
#[tokio::test(start_paused = true)]
async fn a_stalled_reader_is_cut_not_waited_for() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = CoalesceLayer::new(by_topic).share(FanOut::new(3 * 8));
    let svc = layer.layer(upstream(&calls, 10, None));
    let (a, b) = tokio::join!(
        svc.clone().oneshot("x".to_string()),
        svc.clone().oneshot("x".to_string())
    );
    let t0 = Instant::now();
    let mut stalled = b.unwrap().into_body();
    // The stalled one reads one chunk, then nothing.
    stalled.frame().await.unwrap().unwrap();
    let fast = read_all(a.unwrap().into_body()).await.unwrap();
    assert_eq!(fast, whole(10));
    assert_eq!(
        t0.elapsed(),
        Duration::from_secs(1),
        "the fast reader was not held back"
    );
    let e = loop {
        match stalled.frame().await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("the stalled reader should have been cut"),
        }
    };
    assert!(e.to_string().contains("fell too far behind"), "{e}");
    // A new caller: the stream could no longer be joined, so a call of its own.
    let res = svc.clone().oneshot("x".to_string()).await.unwrap();
    assert_eq!(read_all(res.into_body()).await.unwrap(), whole(10));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(layer.in_flight(), 0);
}

/// The upstream fails after 4 chunks: every caller gets the 4 chunks, then
/// the same error.
#[tokio::test(start_paused = true)]
async fn a_failing_stream_fails_every_reader_alike() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = CoalesceLayer::new(by_topic)
        .share(FanOut::default())
        .layer(upstream(&calls, 10, Some(4)));
    let answers =
        futures::future::join_all((0..5).map(|_| svc.clone().oneshot("x".to_string()))).await;
    for a in answers {
        let mut body = a.unwrap().into_body();
        let mut got = Vec::new();
        let err = loop {
            match body.frame().await {
                Some(Ok(f)) => got.extend_from_slice(&f.into_data().unwrap()),
                Some(Err(e)) => break e,
                None => panic!("the error should reach every reader"),
            }
        };
        assert_eq!(got, whole(4));
        assert_eq!(err.to_string(), "upstream reset");
        assert!(body.frame().await.is_none(), "after the error, the end");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Every body dropped before the end: the upstream body is dropped (what
/// it holds goes back) and the key can be called again.
#[tokio::test(start_paused = true)]
async fn every_reader_gone_drops_the_upstream() {
    struct Held(Arc<AtomicUsize>);
    impl Drop for Held {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicUsize::new(0));
    let d = dropped.clone();
    let svc = CoalesceLayer::new(by_topic)
        .share(FanOut::default())
        .layer(tower::service_fn(move |_t: String| {
            let held = Held(d.clone());
            async move {
                let chunks = futures::stream::unfold(held, |held| async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Some((
                        Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"x"))),
                        held,
                    ))
                })
                .boxed();
                Ok::<_, std::io::Error>(http::Response::new(StreamBody::new(chunks)))
            }
        }));
    let layer_in_flight = || dropped.load(Ordering::SeqCst);
    let (a, b) = tokio::join!(
        svc.clone().oneshot("x".to_string()),
        svc.clone().oneshot("x".to_string())
    );
    let (mut a, b) = (a.unwrap().into_body(), b.unwrap().into_body());
    a.frame().await.unwrap().unwrap();
    assert_eq!(layer_in_flight(), 0);
    drop(b);
    drop(a);
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the upstream body was dropped"
    );
}

/// Around the LLM preset's stream layer: 10 identical streamed requests
/// (temperature 0) are one call through the bulkhead, the pacer and the
/// provider; every caller gets the same SSE bytes.
#[tokio::test(start_paused = true)]
async fn identical_llm_streams_are_one_call_through_the_preset() {
    use semaforo::llm::{LlmKey, LlmStack, Tier};
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .build()
    .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let client = tower::service_fn(move |_req: http::Request<Bytes>| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            let events = [
                "data: {\"choices\":[{\"delta\":{\"content\":\"El agua \"}}]}\n\n",
                "data: {\"choices\":[{\"delta\":{\"content\":\"se evapora.\"}}]}\n\n",
                "data: {\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":4,\"total_tokens\":14}}\n\n",
                "data: [DONE]\n\n",
            ];
            let chunks: Chunks = Box::pin(futures::stream::iter(events).then(|e| async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(Frame::data(Bytes::from_static(e.as_bytes())))
            }));
            Ok::<_, std::io::Error>(http::Response::new(StreamBody::new(chunks)))
        }
    });
    let svc = CoalesceLayer::new(LlmKey::new())
        .share(FanOut::default())
        .layer(stack.stream_layer().layer(client));
    let req = || {
        http::Request::post("/v1/chat/completions")
            .header("authorization", "Bearer sk-1")
            .body(Bytes::from_static(
                br#"{"model":"gpt-4o-mini","stream":true,"temperature":0,"max_tokens":100,"messages":[{"role":"user","content":"el ciclo del agua"}]}"#,
            ))
            .unwrap()
    };
    let bodies: Vec<_> = futures::future::join_all((0..10).map(|_| svc.clone().oneshot(req())))
        .await
        .into_iter()
        .map(|r| r.unwrap().into_body())
        .collect();
    assert_eq!(
        stack.bulkhead().snapshot().in_flight,
        1,
        "one permit, held by the stream"
    );
    let texts = futures::future::join_all(bodies.into_iter().map(read_all)).await;
    let first = texts[0].as_ref().unwrap().clone();
    assert!(first.ends_with(b"data: [DONE]\n\n"));
    assert!(texts.iter().all(|t| t.as_ref().unwrap() == &first));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        stack.bulkhead().snapshot().in_flight,
        0,
        "released at the stream's end"
    );
}
