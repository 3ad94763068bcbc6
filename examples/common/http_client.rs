//! A minimal OpenAI-compatible HTTP client as a tower service (reqwest
//! underneath), counting the statuses it saw. Shared by the `llm_client`
//! example and the tests.
#![allow(dead_code)]

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt as _;
use semaforo::bulkhead::QueueTicket;
use semaforo::BoxError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

/// Statuses the HTTP client saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub ok: AtomicU64,
    pub throttled: AtomicU64,
    pub other: AtomicU64,
}

/// A minimal OpenAI-compatible HTTP client as a tower service (reqwest underneath).
#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    base: Arc<str>,
    key: Option<Arc<str>>,
    pub seen: Arc<Seen>,
}

impl HttpClient {
    pub fn new(base: &str, key: Option<Arc<str>>) -> Self {
        HttpClient {
            client: reqwest::Client::new(),
            base: Arc::from(base.trim_end_matches('/')),
            key,
            seen: Arc::new(Seen::default()),
        }
    }
}

impl Service<http::Request<Bytes>> for HttpClient {
    type Response = http::Response<Bytes>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<http::Response<Bytes>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Bytes>) -> Self::Future {
        let url = endpoint(&self.base, req.uri().path());
        let mut builder = self
            .client
            .post(url)
            .header("content-type", "application/json");
        if let Some(k) = &self.key {
            builder = builder.bearer_auth(k);
        }
        let builder = builder.body(req.into_body());
        let seen = self.seen.clone();
        Box::pin(async move {
            let res = builder.send().await?;
            let status = res.status().as_u16();
            match status {
                200..=299 => &seen.ok,
                429 => &seen.throttled,
                _ => &seen.other,
            }
            .fetch_add(1, Ordering::Relaxed);
            let mut out = http::Response::builder().status(status);
            for (k, v) in res.headers() {
                out = out.header(k.as_str(), v.as_bytes());
            }
            Ok(out.body(res.bytes().await?)?)
        })
    }
}

/// `base` + `path`, accepting the base URL as OpenAI's SDKs spell it: with
/// `https://api.openai.com/v1` and `/v1/chat/completions`, the `/v1` is not
/// repeated.
pub fn endpoint(base: &str, path: &str) -> String {
    let base = base.trim_end_matches('/');
    let (_, last) = base.rsplit_once('/').unwrap_or(("", base));
    let doubled = !last.is_empty()
        && !last.contains(':')
        && path
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(last))
            .is_some_and(|rest| rest.starts_with('/'));
    if doubled {
        format!("{base}{}", &path[1 + last.len()..])
    } else {
        format!("{base}{path}")
    }
}

/// A seed-000 request: a lesson plan of `tokens` tokens (prompt + `max_tokens`),
/// carrying `ticket` (if any) for its place in line.
pub fn chat_request(
    model: &str,
    tokens: u64,
    teacher: usize,
    ticket: Option<QueueTicket>,
) -> http::Request<Bytes> {
    let prompt = format!("Plan de clase {teacher}: el ciclo del agua, 4º grado.");
    let max_tokens = tokens.saturating_sub(prompt.len() as u64 / 4).max(1);
    let body = serde_json::json!({
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    });
    let mut req = http::Request::post("/v1/chat/completions")
        .body(Bytes::from(body.to_string()))
        .expect("a valid request");
    if let Some(t) = ticket {
        req.extensions_mut().insert(t);
    }
    req
}

/// The same client for streamed answers: the body arrives chunk by chunk
/// (any `http_body::Body<Data = Bytes>` works; boxed here to name its type).
#[derive(Clone)]
pub struct StreamingClient(pub HttpClient);

impl Service<http::Request<Bytes>> for StreamingClient {
    type Response = http::Response<UnsyncBoxBody<Bytes, reqwest::Error>>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Bytes>) -> Self::Future {
        use futures::StreamExt;
        let c = &self.0;
        let url = endpoint(&c.base, req.uri().path());
        let mut builder = c
            .client
            .post(url)
            .header("content-type", "application/json");
        if let Some(k) = &c.key {
            builder = builder.bearer_auth(k);
        }
        let builder = builder.body(req.into_body());
        Box::pin(async move {
            let res = builder.send().await?;
            let mut out = http::Response::builder().status(res.status().as_u16());
            for (k, v) in res.headers() {
                out = out.header(k.as_str(), v.as_bytes());
            }
            let frames = res
                .bytes_stream()
                .map(|chunk| chunk.map(http_body::Frame::data));
            let body = http_body_util::StreamBody::new(frames).boxed_unsync();
            Ok(out.body(body)?)
        })
    }
}
