//! Which LLM requests are the same, for the cache and coalescing
//! ([`LlmKey`]).

use crate::share::RequestKey;
use bytes::Bytes;
use serde_json::Value;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::sync::Arc;

/// The key of LLM requests for [`cache`](crate::cache) and
/// [`coalesce`](crate::coalesce): a canonical form of the JSON body, the
/// path and (by default) the caller's credential.
///
/// - **Canonical body**: object fields in sorted order, no whitespace,
///   numbers in one form (`0`, `0.0` and `0e0` are one number), so the same
///   request written another way is one key; any other difference (a
///   message, `temperature`, `max_tokens`, `tools`, `stream`) is another
///   key. Top-level fields that do not change the answer are left out:
///   `user` and `metadata` by default ([`ignore`](Self::ignore) adds more,
///   [`keep`](Self::keep) puts one back).
/// - **Deterministic requests only**: a request shares only when its
///   `temperature` is `0` (Gemini's `generationConfig.temperature` too); an absent `temperature` is the provider's
///   default (OpenAI: 1.0), so it does not — unless
///   [`nondeterministic`](Self::nondeterministic) says sharing a sampled
///   answer is fine (the classroom case: 50 identical prompts, one answer).
/// - **Per credential**: the `authorization`, `x-api-key`, `api-key` and
///   `x-goog-api-key` headers and the URL's query (Gemini's `?key=`) are
///   part of the key (as 128-bit SipHashes, not in clear), so no answer is shared across API keys unless
///   [`across_credentials`](Self::across_credentials) says so.
/// - A body that is not a JSON object, a number whose digits were lost in
///   parsing (an integer beyond `i64`/`u64`, or one written as a float —
///   `9007199254740993.0` — past 2^53; integers within `i64`/`u64` are kept
///   exactly), nesting deeper than 128, or a request
///   with `cache-control: no-store` has no key (it is neither cached nor
///   coalesced).
///
/// Keys compare by their bytes, never by a hash alone. Cost: one JSON parse
/// of the request (measured in `benches/coalesce.rs` for 2 KB and 8 KB
/// bodies); the key is left in the request's extensions, so the preset's
/// cache and coalescing layer compute it once.
///
/// ```
/// use bytes::Bytes;
/// use semaforo::llm::LlmKey;
/// use semaforo::share::RequestKey;
///
/// let req = |body: &'static str| {
///     http::Request::post("/v1/chat/completions")
///         .header("authorization", "Bearer sk-1")
///         .body(Bytes::from_static(body.as_bytes()))
///         .unwrap()
/// };
/// let key = LlmKey::new();
/// let a = key.key(&req(r#"{"model":"gpt-4o","temperature":0,"messages":[{"role":"user","content":"hola"}]}"#));
/// let b = key.key(&req(r#"{ "messages": [ {"content":"hola", "role":"user"} ], "temperature": 0.0, "model": "gpt-4o" }"#));
/// assert!(a.is_some());
/// assert_eq!(a, b);
/// // No temperature: sampled, not shared unless asked.
/// assert!(key.key(&req(r#"{"model":"gpt-4o","messages":[]}"#)).is_none());
/// assert!(LlmKey::new().nondeterministic(true).key(&req(r#"{"model":"gpt-4o","messages":[]}"#)).is_some());
/// ```
#[derive(Debug, Clone)]
pub struct LlmKey {
    ignore: Arc<[Box<str>]>,
    nondeterministic: bool,
    across_credentials: bool,
}

impl Default for LlmKey {
    fn default() -> Self {
        Self::new()
    }
}

/// The headers that carry a provider credential.
const CREDENTIAL_HEADERS: [&str; 4] = ["authorization", "x-api-key", "api-key", "x-goog-api-key"];

/// Nesting deeper than this has no key (the request goes on its own).
const MAX_DEPTH: usize = 128;

impl LlmKey {
    /// Sharing deterministic requests (`temperature: 0`) of one credential;
    /// `user` and `metadata` left out.
    pub fn new() -> Self {
        LlmKey {
            ignore: Arc::from(vec!["user".into(), "metadata".into()]),
            nondeterministic: false,
            across_credentials: false,
        }
    }

    /// Leaves the top-level field `name` out of the key.
    pub fn ignore(mut self, name: &str) -> Self {
        if !self.ignore.iter().any(|f| &**f == name) {
            let mut v = self.ignore.to_vec();
            v.push(name.into());
            self.ignore = Arc::from(v);
        }
        self
    }

    /// Puts the top-level field `name` back in the key (e.g. `user`, when
    /// answers must not be shared across end users).
    pub fn keep(mut self, name: &str) -> Self {
        let v: Vec<Box<str>> = self
            .ignore
            .iter()
            .filter(|f| &***f != name)
            .cloned()
            .collect();
        self.ignore = Arc::from(v);
        self
    }

    /// Whether requests without `temperature: 0` share answers (default
    /// `false`).
    pub fn nondeterministic(mut self, yes: bool) -> Self {
        self.nondeterministic = yes;
        self
    }

    /// Whether callers with different credentials share answers (default
    /// `false`).
    pub fn across_credentials(mut self, yes: bool) -> Self {
        self.across_credentials = yes;
        self
    }

    /// The key of a request's parts, or `None`.
    pub fn of(
        &self,
        path: &str,
        query: Option<&str>,
        headers: &http::HeaderMap,
        body: &Bytes,
    ) -> Option<LlmRequestKey> {
        if crate::cache::http_cache_control_headers(headers) == crate::cache::CacheControl::Bypass {
            return None;
        }
        let v: Value = serde_json::from_slice(body).ok()?;
        let obj = v.as_object()?;
        if !self.nondeterministic {
            // OpenAI / Anthropic at the top; Gemini in `generationConfig`.
            let t = obj
                .get("temperature")
                .or_else(|| obj.get("generationConfig")?.get("temperature"))?
                .as_f64()?;
            if t != 0.0 {
                return None;
            }
        }
        let mut out = Vec::with_capacity(body.len() + 64);
        out.extend_from_slice(path.as_bytes());
        out.push(0);
        // The query (Gemini's `?key=`, Azure's `api-version`), hashed: a
        // credential there keeps answers apart and is not kept in clear.
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            let (a, b) = crate::share::sip128(q.as_bytes());
            out.extend_from_slice(&a.to_le_bytes());
            out.extend_from_slice(&b.to_le_bytes());
        }
        out.push(0);
        if !self.across_credentials {
            for name in CREDENTIAL_HEADERS {
                for v in headers.get_all(name) {
                    let (a, b) = crate::share::sip128(v.as_bytes());
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(&a.to_le_bytes());
                    out.extend_from_slice(&b.to_le_bytes());
                }
            }
        }
        out.push(0);
        let mut fields: Vec<(&String, &Value)> = obj
            .iter()
            .filter(|(k, _)| !self.ignore.iter().any(|f| **f == ***k))
            .collect();
        fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
        out.push(b'{');
        for (i, (k, v)) in fields.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(k, &mut out);
            out.push(b':');
            write_canonical(v, &mut out, 1)?;
        }
        out.push(b'}');
        let mut h = std::collections::hash_map::DefaultHasher::new();
        out.hash(&mut h);
        Some(LlmRequestKey {
            hash: h.finish(),
            bytes: Arc::from(out),
        })
    }
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    // serde_json's escaping: one form for one string.
    if let Ok(v) = serde_json::to_vec(s) {
        out.extend_from_slice(&v);
    }
}

fn write_canonical(v: &Value, out: &mut Vec<u8>, depth: usize) -> Option<()> {
    if depth > MAX_DEPTH {
        return None;
    }
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => {
            // One form per number: integers as integers (also when written
            // `1.0` or `1e0`), others as the shortest float. A whole number
            // beyond an integer's range or 2^53 lost digits in parsing:
            // such a request has no key (two different ones could look
            // alike).
            match (n.as_i64(), n.as_u64(), n.as_f64()) {
                // Written straight into the key (no `String` a number:
                // writing to a `Vec` cannot fail).
                (Some(i), _, _) => {
                    let _ = write!(out, "{i}");
                }
                (_, Some(u), _) => {
                    let _ = write!(out, "{u}");
                }
                (_, _, Some(f)) if f.fract() == 0.0 => {
                    if f.abs() >= 9_007_199_254_740_992.0 {
                        return None;
                    }
                    let _ = write!(out, "{}", f as i64);
                }
                (_, _, Some(f)) => {
                    let _ = write!(out, "{f:?}");
                }
                _ => return None,
            }
        }
        Value::String(s) => write_str(s, out),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(x, out, depth + 1)?;
            }
            out.push(b']');
        }
        Value::Object(o) => {
            let mut fields: Vec<(&String, &Value)> = o.iter().collect();
            fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, x)) in fields.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(k, out);
                out.push(b':');
                write_canonical(x, out, depth + 1)?;
            }
            out.push(b'}');
        }
    }
    Some(())
}

/// The key [`LlmKey`] gives a request: its canonical bytes (compared
/// whole) and their hash (what maps use).
#[derive(Clone)]
pub struct LlmRequestKey {
    hash: u64,
    bytes: Arc<[u8]>,
}

impl LlmRequestKey {
    /// The canonical form's size in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never: a key holds at least its separators.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl std::fmt::Debug for LlmRequestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LlmRequestKey({:016x}, {} bytes)",
            self.hash,
            self.bytes.len()
        )
    }
}

impl PartialEq for LlmRequestKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.bytes == other.bytes
    }
}

impl Eq for LlmRequestKey {}

impl Hash for LlmRequestKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl RequestKey<http::Request<Bytes>> for LlmKey {
    type Key = LlmRequestKey;

    fn key(&self, req: &http::Request<Bytes>) -> Option<LlmRequestKey> {
        if let Some(k) = req.extensions().get::<LlmRequestKey>() {
            return Some(k.clone());
        }
        self.of(
            req.uri().path(),
            req.uri().query(),
            req.headers(),
            req.body(),
        )
    }

    fn remember(&self, req: &mut http::Request<Bytes>, key: &LlmRequestKey) {
        req.extensions_mut().insert(key.clone());
    }

    fn key_bytes<'k>(&self, key: &'k LlmRequestKey) -> Option<std::borrow::Cow<'k, [u8]>> {
        Some(std::borrow::Cow::Borrowed(&key.bytes))
    }

    fn key_size(&self, key: &LlmRequestKey) -> usize {
        key.bytes.len() + std::mem::size_of::<LlmRequestKey>() + 16
    }
}
