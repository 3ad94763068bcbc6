//! How one answer reaches several callers: the callers of a coalesced call
//! ([`coalesce`](crate::coalesce)) and the hits of a cache
//! ([`cache`](crate::cache), feature `cache`).
//!
//! Two traits, one for each question either layer asks:
//! - [`RequestKey`]: which requests are "the same" — a function of the
//!   request, or `None` for one that must not share (bypass). Closures
//!   `Fn(&Req) -> Option<K>` are keys; the LLM preset's key is
//!   [`LlmKey`](crate::llm::LlmKey) (a canonical form of the JSON body and
//!   the caller's credential). A semantic cache plugs in here too: a key
//!   that maps a prompt to the id of its nearest cached neighbour (an
//!   embedding lookup) makes near-identical prompts one key.
//! - [`Share`]: how an answer is kept and handed out again. [`Cloned`] for
//!   answers that are `Clone`; [`WholeResponse`] (feature `http`) for
//!   `http::Response<Bytes>`, which is not `Clone` (its extensions are not):
//!   the status, headers and body are kept, and each caller gets a new
//!   response with a [`Served`] extension saying where it came from;
//!   [`FanOut`] (feature `http`) for a streamed `http::Response<B>`: one
//!   upstream body read once, its chunks handed to every caller (late
//!   joiners replayed from a bounded buffer).

#[cfg(feature = "http")]
mod fanout;
#[cfg(feature = "http")]
pub use fanout::{FanOut, FanOutBody, KeptStream};

use std::error::Error as StdError;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

/// Which requests are the same, for coalescing and caching.
///
/// `None` means "do not share this one" (it is called on its own, and not
/// cached). Keys are compared with `Eq`: two requests share an answer only
/// when their keys are equal, never on a hash alone.
pub trait RequestKey<Req>: Clone + Send + Sync + 'static {
    /// The key.
    type Key: Hash + Eq + Clone + Send + Sync + 'static;

    /// The key of `req`, or `None` to bypass.
    fn key(&self, req: &Req) -> Option<Self::Key>;

    /// Called with the key once it is known, before the request goes on:
    /// a key that is costly to compute can leave it in the request for the
    /// next layer (the LLM key puts itself in the request's extensions, so
    /// a cache and a coalescing layer compute it once).
    fn remember(&self, _req: &mut Req, _key: &Self::Key) {}

    /// The key as bytes, for a store shared by a fleet (default `None`:
    /// such a store is not used). Two keys with the same bytes must be
    /// equal.
    fn key_bytes<'k>(&self, _key: &'k Self::Key) -> Option<std::borrow::Cow<'k, [u8]>> {
        None
    }

    /// The key's size in bytes, counted in a cache's size bound (default 0).
    fn key_size(&self, _key: &Self::Key) -> usize {
        0
    }
}

impl<Req, K, F> RequestKey<Req> for F
where
    F: Fn(&Req) -> Option<K> + Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Key = K;

    fn key(&self, req: &Req) -> Option<K> {
        self(req)
    }
}

/// Where an answer handed out by [`Share::give`] came from (an
/// `http::Response` extension with [`WholeResponse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Served {
    /// From a cache; `age` since it was stored, `stale` when past its TTL
    /// (kept for errors).
    Cache {
        /// Since it was stored.
        age: Duration,
        /// Past its TTL.
        stale: bool,
    },
    /// The answer of an identical call that was in flight.
    Coalesced,
}

/// How an answer is kept and handed to more than one caller.
pub trait Share<R>: Clone + Send + Sync + 'static {
    /// What is kept (cloned for each caller: keep it cheap, e.g. an `Arc`).
    type Kept: Clone + Send + Sync + 'static;
    /// What each caller gets.
    type Output;

    /// The answer of the call that ran: what its own caller gets, and what
    /// is kept for the others.
    fn keep(&self, res: R) -> (Self::Output, Self::Kept);

    /// The answer of a call nobody else waited for (nothing is kept).
    fn pass(&self, res: R) -> Self::Output;

    /// Whether [`give`](Self::give) reads its `served` argument (default
    /// `true`). A share that ignores it ([`Cloned`]) spares a cache hit the
    /// arithmetic of the answer's age.
    const READS_SERVED: bool = true;

    /// An answer for another caller.
    fn give(&self, kept: &Self::Kept, served: Served) -> Self::Output;

    /// Whether a cache may keep `res` at all (default `true`);
    /// [`WholeResponse`] keeps only 2xx answers that do not say
    /// `Cache-Control: no-store` or `private` (RFC 9111 §5.2.2.5, §5.2.2.7:
    /// this cache is shared by every caller of the service).
    fn storable(&self, _res: &R) -> bool {
        true
    }

    /// `kept` as bytes, for a store shared by a fleet (default `None`: not
    /// stored there).
    fn encode(&self, _kept: &Self::Kept) -> Option<Vec<u8>> {
        None
    }

    /// What [`encode`](Self::encode) wrote, back (`None` when it cannot be
    /// read: treated as a miss).
    fn decode(&self, _bytes: &[u8]) -> Option<Self::Kept> {
        None
    }

    /// Whether a caller may still join after the answer arrived (a stream
    /// being read): then the coalescing layer keeps the answer joinable
    /// until [`on_settled`](Self::on_settled) fires (default `false`).
    fn late_joiners(&self) -> bool {
        false
    }

    /// Whether a caller arriving now can still get the whole answer from
    /// `kept` (default `false`).
    fn joinable(&self, _kept: &Self::Kept) -> bool {
        false
    }

    /// `callers` callers were waiting when the answer arrived: each will
    /// get it with [`give_reserved`](Self::give_reserved), however much of
    /// it the caller whose call ran reads first (a stream keeps its head
    /// for them). Default: nothing to do (an answer kept whole).
    fn reserve(&self, _kept: &Self::Kept, _callers: usize) {}

    /// An answer for a caller that was waiting when it arrived (counted
    /// in [`reserve`](Self::reserve)). Default: [`give`](Self::give).
    fn give_reserved(&self, kept: &Self::Kept, served: Served) -> Self::Output {
        self.give(kept, served)
    }

    /// Calls `f` once `kept` can no longer be joined (at once by default,
    /// or if it already cannot).
    fn on_settled(&self, _kept: &Self::Kept, f: Box<dyn FnOnce() + Send>) {
        f();
    }

    /// Whether `res` is already a copy handed out by a layer below (a
    /// coalesced or cached answer): a cache does not store it again
    /// (default: never known).
    fn served(&self, _res: &R) -> Option<Served> {
        None
    }

    /// The kept answer's size in bytes, for a cache's size bound (default
    /// 0).
    fn size(&self, _kept: &Self::Kept) -> usize {
        0
    }
}

/// Shares answers that are `Clone` by cloning them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cloned;

impl<R: Clone + Send + Sync + 'static> Share<R> for Cloned {
    type Kept = R;
    type Output = R;
    const READS_SERVED: bool = false;

    fn keep(&self, res: R) -> (R, R) {
        (res.clone(), res)
    }

    fn pass(&self, res: R) -> R {
        res
    }

    fn give(&self, kept: &R, _served: Served) -> R {
        kept.clone()
    }
}

/// Shares `http::Response<Bytes>`: status, version, headers and body are
/// kept (one `Arc`; the body's `Bytes` is not copied); each other caller
/// gets a new response carrying a [`Served`] extension, and a cache hit an
/// `age` header (seconds, RFC 9111). The original response's extensions
/// stay with the caller whose call ran.
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, Default)]
pub struct WholeResponse;

/// A kept `http::Response<Bytes>`.
#[cfg(feature = "http")]
#[derive(Debug)]
pub struct KeptResponse {
    status: http::StatusCode,
    version: http::Version,
    headers: http::HeaderMap,
    body: bytes::Bytes,
}

#[cfg(feature = "http")]
impl KeptResponse {
    /// Its status.
    pub fn status(&self) -> http::StatusCode {
        self.status
    }

    /// Its body.
    pub fn body(&self) -> &bytes::Bytes {
        &self.body
    }
}

#[cfg(feature = "http")]
impl Share<http::Response<bytes::Bytes>> for WholeResponse {
    type Kept = Arc<KeptResponse>;
    type Output = http::Response<bytes::Bytes>;

    fn keep(
        &self,
        res: http::Response<bytes::Bytes>,
    ) -> (http::Response<bytes::Bytes>, Arc<KeptResponse>) {
        let kept = Arc::new(KeptResponse {
            status: res.status(),
            version: res.version(),
            headers: res.headers().clone(),
            body: res.body().clone(),
        });
        (res, kept)
    }

    fn pass(&self, res: http::Response<bytes::Bytes>) -> http::Response<bytes::Bytes> {
        res
    }

    fn give(&self, kept: &Arc<KeptResponse>, served: Served) -> http::Response<bytes::Bytes> {
        let mut res = http::Response::new(kept.body.clone());
        *res.status_mut() = kept.status;
        *res.version_mut() = kept.version;
        *res.headers_mut() = kept.headers.clone();
        if let Served::Cache { age, .. } = served {
            res.headers_mut()
                .insert(http::header::AGE, http::HeaderValue::from(age.as_secs()));
        }
        res.extensions_mut().insert(served);
        res
    }

    fn served(&self, res: &http::Response<bytes::Bytes>) -> Option<Served> {
        res.extensions().get::<Served>().copied()
    }

    fn storable(&self, res: &http::Response<bytes::Bytes>) -> bool {
        res.status().is_success()
            && !crate::classify::headers::cache_control_directives(res.headers())
                .any(|d| d == "no-store" || d == "private" || d.starts_with("private="))
    }

    fn encode(&self, kept: &Arc<KeptResponse>) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(kept.body.len() + 256);
        out.extend_from_slice(&kept.status.as_u16().to_le_bytes());
        out.push(version_code(kept.version));
        out.extend_from_slice(&u32::try_from(kept.headers.len()).ok()?.to_le_bytes());
        for (name, value) in &kept.headers {
            for part in [name.as_str().as_bytes(), value.as_bytes()] {
                out.extend_from_slice(&u32::try_from(part.len()).ok()?.to_le_bytes());
                out.extend_from_slice(part);
            }
        }
        out.extend_from_slice(&kept.body);
        Some(out)
    }

    fn decode(&self, bytes: &[u8]) -> Option<Arc<KeptResponse>> {
        let mut r = Reader(bytes);
        let status =
            http::StatusCode::from_u16(u16::from_le_bytes(r.take(2)?.try_into().ok()?)).ok()?;
        let version = version_of(r.take(1)?[0])?;
        let count = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
        let mut headers = http::HeaderMap::new();
        for _ in 0..count {
            let n = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
            let name = http::HeaderName::from_bytes(r.take(n)?).ok()?;
            let n = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
            let value = http::HeaderValue::from_bytes(r.take(n)?).ok()?;
            headers.append(name, value);
        }
        Some(Arc::new(KeptResponse {
            status,
            version,
            headers,
            body: bytes::Bytes::copy_from_slice(r.0),
        }))
    }

    fn size(&self, kept: &Arc<KeptResponse>) -> usize {
        let headers: usize = kept
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        kept.body.len() + headers + std::mem::size_of::<KeptResponse>()
    }
}

/// An error handed to more than one caller (the call they shared failed):
/// it displays as the original, and the original is its
/// [`source`](StdError::source), so [`Rejected::find`](crate::Rejected::find)
/// and the classifiers see through it.
#[derive(Clone)]
pub struct SharedError(Arc<dyn StdError + Send + Sync>);

impl SharedError {
    pub(crate) fn new(e: crate::BoxError) -> Self {
        SharedError(Arc::from(e))
    }

    /// The original error.
    pub fn original(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.0
    }
}

impl fmt::Debug for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl StdError for SharedError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

/// Reads length-prefixed parts of an encoded answer.
#[cfg(feature = "http")]
struct Reader<'a>(&'a [u8]);

#[cfg(feature = "http")]
impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
}

#[cfg(feature = "http")]
fn version_code(v: http::Version) -> u8 {
    match v {
        http::Version::HTTP_09 => 0,
        http::Version::HTTP_10 => 1,
        http::Version::HTTP_2 => 3,
        http::Version::HTTP_3 => 4,
        _ => 2,
    }
}

#[cfg(feature = "http")]
fn version_of(c: u8) -> Option<http::Version> {
    Some(match c {
        0 => http::Version::HTTP_09,
        1 => http::Version::HTTP_10,
        2 => http::Version::HTTP_11,
        3 => http::Version::HTTP_2,
        4 => http::Version::HTTP_3,
        _ => return None,
    })
}

/// Two SipHash-1-3 hashes of `bytes` with different fixed keys: 128 bits,
/// the same in every process (names of shared entries, hashed credentials).
#[cfg(any(feature = "llm", all(feature = "redis", feature = "cache")))]
pub(crate) fn sip128(bytes: &[u8]) -> (u64, u64) {
    use std::hash::Hasher;
    let mut a = std::collections::hash_map::DefaultHasher::new();
    a.write_u8(0);
    a.write(bytes);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    b.write_u8(1);
    b.write(bytes);
    (a.finish(), b.finish())
}
