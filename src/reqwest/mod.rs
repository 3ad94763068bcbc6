//! Any semaforo stack as a [`reqwest_middleware::Middleware`] (feature `reqwest`).
//!
//! [`SemaforoMiddleware`] runs a tower stack — one of our layers, several in a
//! `ServiceBuilder`, or the [LLM preset](crate::llm) — around every request of
//! a [`reqwest_middleware::ClientWithMiddleware`]. The stack sees each request
//! as an `http::Request<Bytes>` and calls the rest of the middleware chain
//! (and finally reqwest) through the service at its bottom, [`Upstream`]: the
//! stack decides when, how often and whether the request goes out, reqwest
//! sends it.
//!
//! Two bottoms, for the two kinds of stacks:
//!
//! | constructor | the stack gets | for |
//! |---|---|---|
//! | [`SemaforoMiddleware::new`] | `http::Response<reqwest::Body>`, streamed | any layer, [`LlmStack::stream_layer`](crate::llm::LlmStack::stream_layer): the bulkhead permit and the breaker's verdict are held until the body's last chunk |
//! | [`SemaforoMiddleware::whole`] | `http::Response<Bytes>`, read whole | [`LlmStack::layer`](crate::llm::LlmStack::layer), the cache: the classifier reads the error body, the caller still gets it |
//!
//! What survives the round trip: the method, URL, headers, version, reqwest's
//! own request extensions (its per-request timeout) and the middleware
//! extensions (`RequestBuilder::with_extension`, which the stack's layers
//! also see, e.g. a [`QueueTicket`](crate::bulkhead::QueueTicket)); on the
//! way back `Response::url()`, the status, headers, extensions and the body.
//!
//! **A retry layer of your own: give it `.requests(HttpRequests::default())`**
//! ([`HttpRequests`](crate::retry::HttpRequests), the LLM preset's policy):
//! it retries idempotent methods only (a `POST` with an `Idempotency-Key`, or
//! `.allow_non_idempotent()`), and never a request carrying [`NoRetry`].
//! The layer's default policy copies any request, whatever its method. A
//! request body that is a stream (`Body::wrap_stream`) cannot be sent twice:
//! the request carries [`NoRetry`]; a policy that ignores it gets, for the
//! second attempt, an error of class `Permanent(DoNotRetry)` saying so
//! instead of the first attempt's answer. The stack's layers see an empty
//! `Bytes` body in the stream's place (the LLM preset then estimates no
//! prompt tokens for it).
//!
//! "Streamed" below is about the *response* body.
//!
//! Errors come back as [`reqwest_middleware::Error`]: reqwest's own as
//! `Error::Reqwest`, a refusal by a layer as `Error::Middleware` around the
//! [`Rejected`] itself (`err.downcast_ref::<Rejected>()` on the `anyhow`
//! error, or [`rejected`]), anything else as `Error::Middleware` with the
//! original as its source.
//!
//! Why our own bridge: reqwest-middleware's `Next` borrows the client for
//! one call, and tower services own what they call. The stack is built once
//! and calls a `'static` [`Upstream`] that hands each attempt back, through
//! a channel in the request's extensions, to the middleware call that holds
//! `Next`; attempts run concurrently (hedging) and are all dropped with the
//! call.
//!
//! ```no_run
//! use reqwest_middleware::ClientBuilder;
//! use semaforo::llm::{LlmStack, Tier};
//! use semaforo::reqwest::SemaforoMiddleware;
//!
//! # async fn run() -> Result<(), semaforo::BoxError> {
//! let stack = LlmStack::openai(Tier { requests_per_minute: 500, tokens_per_minute: 30_000 }).build()?;
//! let client = ClientBuilder::new(reqwest::Client::new())
//!     .with(SemaforoMiddleware::whole(stack.layer()))
//!     .build();
//! let res = client
//!     .post("https://api.openai.com/v1/chat/completions")
//!     .bearer_auth(std::env::var("OPENAI_API_KEY")?)
//!     .header("content-type", "application/json")
//!     .body(r#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[{"role":"user","content":"hola"}]}"#)
//!     .send()
//!     .await?;
//! println!("{}", res.text().await?);
//! # Ok(()) }
//! ```

use crate::error::{BoxError, Rejected};
use crate::retry::NoRetry;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use futures_util::FutureExt as _;
use http::Extensions;
use reqwest_middleware::{Middleware, Next};
use std::fmt;
use std::future::{poll_fn, Future};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::{mpsc, oneshot};
use tower_layer::Layer;
use tower_service::Service;

/// The future of one attempt's answer.
type Answering<B> = Pin<Box<dyn Future<Output = Result<http::Response<B>, BoxError>> + Send>>;
type Reply = oneshot::Sender<reqwest_middleware::Result<reqwest::Response>>;
type Outbound = (reqwest::Request, Reply);

/// The way back from the stack's bottom to the middleware call holding
/// `Next` (a request extension; internal).
#[derive(Clone)]
struct Tunnel(mpsc::UnboundedSender<Outbound>);

/// A streamed request body, sent by the first attempt only.
#[derive(Clone)]
struct StreamedBody(Arc<Mutex<Option<reqwest::Body>>>);

/// The stack of a [`SemaforoMiddleware::new`] gets streamed answers.
#[derive(Debug, Clone, Copy)]
pub enum Streamed {}

/// The stack of a [`SemaforoMiddleware::whole`] gets whole answers.
#[derive(Debug, Clone, Copy)]
pub enum Whole {}

/// What the bottom of a stack answers with: [`Streamed`] or [`Whole`]
/// (sealed).
pub trait Answer: crate::sealed::Sealed + Send + Sync + 'static {
    /// The body the stack's bottom answers with.
    type Body: Send + 'static;
    #[doc(hidden)]
    fn read(res: reqwest::Response) -> Answering<Self::Body>;
}

impl crate::sealed::Sealed for Streamed {}
impl crate::sealed::Sealed for Whole {}

fn with_url(res: &reqwest::Response) -> Extensions {
    use reqwest::ResponseBuilderExt as _;
    http::response::Builder::new()
        .url(res.url().clone())
        .extensions_ref()
        .cloned()
        .unwrap_or_default()
}

impl Answer for Streamed {
    type Body = reqwest::Body;
    fn read(
        res: reqwest::Response,
    ) -> Pin<Box<dyn Future<Output = Result<http::Response<reqwest::Body>, BoxError>> + Send>> {
        let url = with_url(&res);
        let mut res = http::Response::<reqwest::Body>::from(res);
        res.extensions_mut().extend(url);
        Box::pin(std::future::ready(Ok(res)))
    }
}

impl Answer for Whole {
    type Body = Bytes;
    fn read(res: reqwest::Response) -> Answering<Bytes> {
        let url = with_url(&res);
        let res = http::Response::<reqwest::Body>::from(res);
        Box::pin(crate::error::AnswerOnce::new("reqwest", async move {
            let (mut parts, body) = res.into_parts();
            let bytes = http_body_util::BodyExt::collect(body).await?.to_bytes();
            parts.extensions.extend(url);
            Ok(http::Response::from_parts(parts, bytes))
        }))
    }
}

/// The service at the bottom of a [`SemaforoMiddleware`]'s stack: it sends
/// each request it is called with through the rest of the middleware chain
/// and reqwest, and answers with reqwest's response ([`Streamed`]: the body
/// as it arrives; [`Whole`]: read whole first).
///
/// # Errors
/// reqwest's own error (`reqwest::Error`) or a later middleware's (its
/// `anyhow` error, boxed so that the original — a [`Rejected`], a
/// `tonic::Status` — is what the classifiers and [`Rejected::find`] see);
/// an [`UpstreamError`] for a request that did not come through a
/// [`SemaforoMiddleware`]; a second attempt of a request whose body was a
/// stream fails with a [`ClassError`](crate::classify::ClassError) of class
/// `Permanent(DoNotRetry)` (a retry policy that honours
/// [`NoRetry`], such as [`HttpRequests`](crate::retry::HttpRequests), never
/// makes one).
pub struct Upstream<A = Streamed>(PhantomData<fn() -> A>);

impl<A> Clone for Upstream<A> {
    fn clone(&self) -> Self {
        Upstream(PhantomData)
    }
}

impl<A> fmt::Debug for Upstream<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Upstream")
    }
}

/// The error of an [`Upstream`] called outside its middleware, or asked to
/// send a streamed body twice.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The request did not come through a [`SemaforoMiddleware`].
    #[error("semaforo::reqwest::Upstream was called outside a SemaforoMiddleware")]
    NoMiddleware,
    /// The middleware call ended before the attempt's answer.
    #[error("the middleware call ended before the request was answered")]
    Ended,
}

impl<A: Answer> Service<http::Request<Bytes>> for Upstream<A> {
    type Response = http::Response<A::Body>;
    type Error = BoxError;
    type Future = Answering<A::Body>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Bytes>) -> Self::Future {
        Box::pin(crate::error::AnswerOnce::new("reqwest", async move {
            let (mut parts, bytes) = req.into_parts();
            let tunnel = parts
                .extensions
                .remove::<Tunnel>()
                .ok_or(UpstreamError::NoMiddleware)?;
            let body = match parts.extensions.remove::<StreamedBody>() {
                Some(StreamedBody(slot)) => slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take()
                    .ok_or_else(body_already_sent)?,
                None => reqwest::Body::from(bytes),
            };
            let req = reqwest::Request::try_from(http::Request::from_parts(parts, body))?;
            let (tx, rx) = oneshot::channel();
            tunnel.0.send((req, tx)).map_err(|_| UpstreamError::Ended)?;
            let res = match rx.await.map_err(|_| UpstreamError::Ended)? {
                Ok(res) => res,
                // Unwrapped, so the classifiers see the original: both
                // variants are `#[error(transparent)]`, whose `source()`
                // skips what they wrap.
                Err(reqwest_middleware::Error::Reqwest(e)) => {
                    return Err(BoxError::from(e));
                }
                Err(reqwest_middleware::Error::Middleware(e)) => {
                    return Err(e.reallocate_into_boxed_dyn_error_without_backtrace());
                }
            };
            A::read(res).await
        }))
    }
}

/// A [`reqwest_middleware::Middleware`] that runs a semaforo stack around
/// each request (see the [module docs](self)).
///
/// The stack is built once, with [`Upstream`] at its bottom; its state (the
/// bulkhead's line, the breaker, the pacer) is shared by every request of
/// every clone of the client.
pub struct SemaforoMiddleware<S, A = Streamed> {
    stack: S,
    answer: PhantomData<fn() -> A>,
}

impl<S: Clone, A> Clone for SemaforoMiddleware<S, A> {
    fn clone(&self) -> Self {
        SemaforoMiddleware {
            stack: self.stack.clone(),
            answer: PhantomData,
        }
    }
}

impl<S, A> fmt::Debug for SemaforoMiddleware<S, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SemaforoMiddleware").finish_non_exhaustive()
    }
}

impl<S> SemaforoMiddleware<S, Streamed> {
    /// The stack `layer` builds around an [`Upstream`] that answers with
    /// reqwest's streamed body (`http::Response<reqwest::Body>`).
    pub fn new<L>(layer: L) -> Self
    where
        L: Layer<Upstream<Streamed>, Service = S>,
    {
        SemaforoMiddleware {
            stack: layer.layer(Upstream(PhantomData)),
            answer: PhantomData,
        }
    }
}

impl<S> SemaforoMiddleware<S, Whole> {
    /// The stack `layer` builds around an [`Upstream`] that reads the whole
    /// answer first (`http::Response<Bytes>`): for the LLM preset's
    /// [`layer`](crate::llm::LlmStack::layer) and the cache.
    pub fn whole<L>(layer: L) -> Self
    where
        L: Layer<Upstream<Whole>, Service = S>,
    {
        SemaforoMiddleware {
            stack: layer.layer(Upstream(PhantomData)),
            answer: PhantomData,
        }
    }
}

impl<S, A> SemaforoMiddleware<S, A> {
    /// The stack.
    pub fn get_ref(&self) -> &S {
        &self.stack
    }
}

/// The [`Rejected`] inside a middleware error, when a layer refused the
/// call.
///
/// ```
/// use semaforo::{RejectKind, Rejected};
/// let err = reqwest_middleware::Error::Middleware(anyhow::Error::new(
///     Rejected::new("bulkhead", RejectKind::QueueFull),
/// ));
/// assert_eq!(semaforo::reqwest::rejected(&err).map(|r| r.kind()), Some(RejectKind::QueueFull));
/// ```
pub fn rejected(err: &reqwest_middleware::Error) -> Option<&Rejected> {
    match err {
        reqwest_middleware::Error::Middleware(e) => e.chain().find_map(|c| c.downcast_ref()),
        reqwest_middleware::Error::Reqwest(_) => None,
    }
}

/// A stack error that is not reqwest's nor a refusal, as the source of an
/// `anyhow` error.
#[derive(Debug)]
struct StackError(BoxError);

impl fmt::Display for StackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for StackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

fn into_middleware_error(err: BoxError) -> reqwest_middleware::Error {
    let err = match err.downcast::<reqwest_middleware::Error>() {
        Ok(e) => return *e,
        Err(e) => e,
    };
    let err = match err.downcast::<reqwest::Error>() {
        Ok(e) => return reqwest_middleware::Error::Reqwest(*e),
        Err(e) => e,
    };
    match err.downcast::<Rejected>() {
        Ok(r) => reqwest_middleware::Error::Middleware(anyhow::Error::new(*r)),
        Err(e) => reqwest_middleware::Error::Middleware(anyhow::Error::new(StackError(e))),
    }
}

/// Turns the stack's answer body into reqwest's.
fn into_reqwest_body<B>(body: B) -> reqwest::Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let hint = body.size_hint();
    let ended = body.is_end_stream();
    reqwest::Body::wrap(SyncBody {
        inner: sync_wrapper::SyncWrapper::new(Box::pin(body)),
        hint,
        ended,
    })
}

/// A body made `Sync` (reqwest's `Body::wrap` asks for it; a body is only
/// ever polled through `Pin<&mut>`, so `SyncWrapper` costs nothing). Its
/// size hint and end, which need shared access, are read after each frame.
struct SyncBody<B> {
    inner: sync_wrapper::SyncWrapper<B>,
    hint: http_body::SizeHint,
    ended: bool,
}

impl<B> http_body::Body for SyncBody<Pin<Box<B>>>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let body = this.inner.get_mut();
        let out = body
            .as_mut()
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map_err(Into::into)));
        if out.is_ready() {
            this.hint = body.size_hint();
            this.ended = body.is_end_stream() || matches!(out, Poll::Ready(None));
        }
        out
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.hint
    }
}

/// A second attempt of a request whose body was a stream: not retryable.
fn body_already_sent() -> BoxError {
    crate::classify::ClassError::new(
        crate::classify::Class::permanent(crate::classify::Permanent::DoNotRetry),
        "the request body is a stream and was already sent: it cannot be sent again \
         (give the retry `.requests(HttpRequests::default())`, which honours `NoRetry`)",
    )
    .into()
}

/// The middleware's side of one call: runs the stack and, meanwhile, every
/// attempt the stack's bottom hands back, each with a copy of the middleware
/// extensions (merged back as each ends).
async fn run_call<S, B>(
    mut stack: S,
    req: reqwest::Request,
    extensions: &mut Extensions,
    next: Next<'_>,
    into_body: fn(B) -> reqwest::Body,
) -> reqwest_middleware::Result<reqwest::Response>
where
    S: Service<http::Request<Bytes>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
{
    let http_req: http::Request<reqwest::Body> = req.try_into()?;
    let (mut parts, body) = http_req.into_parts();
    let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
    let bytes = match body.as_bytes() {
        Some(b) => Bytes::copy_from_slice(b),
        None => {
            // A stream: sent by the first attempt, never retried.
            parts.extensions.insert(NoRetry);
            parts
                .extensions
                .insert(StreamedBody(Arc::new(Mutex::new(Some(body)))));
            Bytes::new()
        }
    };
    // The layers see the middleware extensions too (a queue ticket, a key).
    let mut seen = extensions.clone();
    seen.extend(std::mem::take(&mut parts.extensions));
    parts.extensions = seen;
    parts.extensions.insert(Tunnel(tx));
    let req = http::Request::from_parts(parts, bytes);

    if let Err(e) = poll_fn(|cx| stack.poll_ready(cx)).await {
        return Err(into_middleware_error(e.into()));
    }
    let call = stack.call(req);
    tokio::pin!(call);
    let mut attempts = FuturesUnordered::new();
    loop {
        tokio::select! {
            res = &mut call => {
                // Attempts that ended with the call still have their
                // extensions to give back (the last one always does).
                while let Some(Some(ext)) = attempts.next().now_or_never() {
                    extensions.extend(ext);
                }
                return match res {
                    Ok(res) => Ok(reqwest::Response::from(res.map(into_body))),
                    Err(e) => Err(into_middleware_error(e.into())),
                };
            }
            Some((req, reply)) = rx.recv() => {
                let next = next.clone();
                let mut ext = extensions.clone();
                attempts.push(async move {
                    let res = next.run(req, &mut ext).await;
                    // The stack may have given up on this attempt (a hedge lost).
                    let _ = reply.send(res);
                    ext
                });
            }
            Some(ext) = attempts.next(), if !attempts.is_empty() => {
                extensions.extend(ext);
            }
        }
    }
}

#[async_trait::async_trait]
impl<S> Middleware for SemaforoMiddleware<S, Whole>
where
    S: Service<http::Request<Bytes>, Response = http::Response<Bytes>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        run_call(
            self.stack.clone(),
            req,
            extensions,
            next,
            reqwest::Body::from,
        )
        .await
    }
}

#[async_trait::async_trait]
impl<S, B> Middleware for SemaforoMiddleware<S, Streamed>
where
    S: Service<http::Request<Bytes>, Response = http::Response<B>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        run_call(
            self.stack.clone(),
            req,
            extensions,
            next,
            into_reqwest_body::<B>,
        )
        .await
    }
}
