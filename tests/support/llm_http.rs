//! Small `http` helpers of the LLM attack tests: answers and chat requests.
#![allow(dead_code)]

use bytes::Bytes;

pub type Res = http::Response<Bytes>;

/// A 200 with `body`.
pub fn ok(body: &str) -> Res {
    http::Response::new(Bytes::from(body.to_owned()))
}

/// An answer of `code` with `headers` and `body`.
pub fn status(code: u16, headers: &[(&str, &str)], body: &str) -> Res {
    let mut b = http::Response::builder().status(code);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Bytes::from(body.to_owned())).expect("a response")
}

/// A success's body reporting 10 tokens (7 in, 3 out).
pub const USAGE_10: &str = r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#;

/// A chat-completions request with `body`.
pub fn req(body: impl Into<Bytes>) -> http::Request<Bytes> {
    http::Request::post("/v1/chat/completions")
        .body(body.into())
        .expect("a request")
}

/// A chat request for `model` with `max_tokens` and one user message.
pub fn chat(model: &str, max_tokens: u64, content: &str) -> http::Request<Bytes> {
    req(serde_json::json!({
        "model": model, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}],
    })
    .to_string())
}
