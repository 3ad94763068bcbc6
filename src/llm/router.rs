//! The LLM router preset: one logical model over several deployments, each
//! an [`LlmStack`] of its own (see [`LlmStack::router`]).

use super::{Estimate, LlmStack, LlmStackBuilder, ModelField};
use crate::classify::{Classified, LlmClassifier, LlmHeadClassifier, Permanent};
use crate::error::{BoxError, ConfigError};
use crate::observe::{Event, ListenerSlot};
use crate::retry::Retry;
use crate::route::{Deployment, FirstChunkLayer, Hedge, Router};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};
use tower_service::Service;

/// The router of whole answers the preset builds
/// ([`LlmStack::router`]): a [`Router`] over [`LlmDeploymentService`]s,
/// weighing each call as its first deployment's stack does, keyed by the
/// request's `model`, classified by [`LlmClassifier`] (a context-length
/// error in the body is a `Permanent` reason a fallback can act on).
pub type LlmRouter = Router<LlmDeploymentService<Bytes>, Estimate, LlmClassifier, ModelField>;

/// The router of streamed answers the preset builds
/// ([`LlmStack::stream_router`]): each deployment holds its answer until the
/// first chunk ([`FirstChunkLayer`]), so a stream failing before any byte
/// reached the caller fails over; classified by its head
/// ([`LlmHeadClassifier`]).
pub type LlmStreamRouter =
    Router<LlmDeploymentService<LlmRouterBody>, Estimate, LlmHeadClassifier, ModelField>;

type Boxed<B> = BoxCloneSyncService<http::Request<Bytes>, http::Response<B>, BoxError>;
type Rewrite = Arc<dyn Fn(&mut http::Request<Bytes>) + Send + Sync>;

/// One deployment's whole stack (request rewrite → its [`LlmStack`]
/// without retry → its client), boxed so that deployments with different
/// clients share one type. Cheap to clone.
pub struct LlmDeploymentService<B> {
    inner: Rewritten<Boxed<B>>,
}

impl<B> Clone for LlmDeploymentService<B> {
    fn clone(&self) -> Self {
        LlmDeploymentService {
            inner: self.inner.clone(),
        }
    }
}

impl<B> fmt::Debug for LlmDeploymentService<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmDeploymentService")
            .finish_non_exhaustive()
    }
}

/// The response future of [`LlmDeploymentService`] (boxed).
pub type LlmDeploymentFuture<B> =
    Pin<Box<dyn Future<Output = Result<http::Response<B>, BoxError>> + Send>>;

impl<B> Service<http::Request<Bytes>> for LlmDeploymentService<B> {
    type Response = http::Response<B>;
    type Error = BoxError;
    type Future = LlmDeploymentFuture<B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Bytes>) -> Self::Future {
        self.inner.call(req)
    }
}

/// The body of a streamed answer through an [`LlmStreamRouter`]: the
/// deployment's stream (its permit, breaker verdict and pacer
/// reconciliation held to the end; a [`StreamFailed`](super::StreamFailed)
/// error when the stream reports a failure), boxed.
pub struct LlmRouterBody {
    inner: UnsyncBoxBody<Bytes, BoxError>,
}

impl fmt::Debug for LlmRouterBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmRouterBody").finish_non_exhaustive()
    }
}

impl Body for LlmRouterBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Makes a deployment's service from its built stack.
type Make<B> = Box<dyn FnOnce(&LlmStack) -> Boxed<B> + Send>;

/// One deployment of an LLM router: a name, its [`LlmStack`] (its
/// provider's profile, tier, breaker, pacer — built by the router, with its
/// retry replaced by a single attempt: the router owns the attempt loop)
/// and its client. The client carries what is the deployment's own: its
/// base URL, its key and auth header (`Authorization: Bearer` or Azure's
/// `api-key`), Azure's `api-version`; [`map_request`](Self::map_request)
/// rewrites a request for it, [`model`](Self::model) renames the model.
/// Requests carry the API's path (`/v1/chat/completions`): a client that
/// joins a base URL spelled as the SDKs spell it (`https://api.openai.com/v1`)
/// must not repeat the `/v1`.
///
/// The router asks each deployment's pacer, breaker and bulkhead when a
/// call could start (a deployment whose permits are all taken is later by
/// its line's wait), and weighs a call as the first deployment's stack
/// does: give the deployments of one provider one estimator
/// ([`LlmStackBuilder::estimator`]) so that they weigh alike.
pub struct LlmDeployment<B = Bytes> {
    name: Arc<str>,
    stack: LlmStackBuilder,
    make: Make<B>,
    group: Option<Arc<str>>,
    weight: u32,
    preference: u32,
    model: Option<Arc<str>>,
    rewrite: Option<Rewrite>,
}

impl<B> fmt::Debug for LlmDeployment<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmDeployment")
            .field("name", &self.name)
            .field("group", &self.group)
            .field("weight", &self.weight)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl LlmDeployment<Bytes> {
    /// A deployment answering whole bodies: `client` behind `stack` (named
    /// `name`, as are its parts in events and health).
    pub fn new<S>(name: impl Into<Arc<str>>, stack: LlmStackBuilder, client: S) -> Self
    where
        S: Service<http::Request<Bytes>, Response = http::Response<Bytes>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        LlmDeployment::with(
            name.into(),
            stack,
            Box::new(move |stack: &LlmStack| BoxCloneSyncService::new(stack.layer().layer(client))),
        )
    }
}

impl LlmDeployment<LlmRouterBody> {
    /// A deployment answering streams (SSE): `client` behind `stack`'s
    /// stream layer, held until the first chunk ([`FirstChunkLayer`]).
    pub fn streaming<S, B>(name: impl Into<Arc<str>>, stack: LlmStackBuilder, client: S) -> Self
    where
        S: Service<http::Request<Bytes>, Response = http::Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        LlmDeployment::with(
            name.into(),
            stack,
            Box::new(move |stack: &LlmStack| {
                let held = FirstChunkLayer::new().layer(stack.stream_layer().layer(client));
                BoxCloneSyncService::new(held.map_response(|mut res| {
                    // An error answer arrives whole: classified by its body
                    // too (a context-length error falls back), for the
                    // router's head classifier to read.
                    if !res.status().is_success() {
                        if let Some(body) = res.body().whole() {
                            let class = LlmClassifier::new().classify_parts(
                                res.status().as_u16(),
                                res.headers(),
                                &body,
                            );
                            Classified::record::<LlmHeadClassifier, _>(&mut res, class);
                        }
                    }
                    res.map(|body| LlmRouterBody {
                        inner: body.boxed_unsync(),
                    })
                }))
            }),
        )
    }
}

impl<B> LlmDeployment<B> {
    fn with(name: Arc<str>, stack: LlmStackBuilder, make: Make<B>) -> Self {
        LlmDeployment {
            name,
            stack,
            make,
            group: None,
            weight: 1,
            preference: 0,
            model: None,
            rewrite: None,
        }
    }

    /// Its model group (default `"default"`): see
    /// [`LlmRouterBuilder::fallback`].
    pub fn group(mut self, group: impl Into<Arc<str>>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Its share among deployments that could start a call at the same
    /// time (default 1).
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Its rank among deployments that could start a call at the same time
    /// (default 0, lower first): see
    /// [`Deployment::preference`](crate::route::Deployment::preference) —
    /// the cheaper account first, the other only when it starts sooner.
    pub fn preference(mut self, rank: u32) -> Self {
        self.preference = rank;
        self
    }

    /// The model this deployment serves: the value of the request body's
    /// top-level `model` is replaced by it (each of them, if the body names
    /// it more than once), every other byte left as it was
    /// (a body that is not a JSON object, or without a top-level `model`
    /// such as Gemini's, is sent as it is) before its stack paces it — an
    /// Azure deployment's name, a dated snapshot, another provider's name
    /// for the same model.
    pub fn model(mut self, model: impl Into<Arc<str>>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Rewrites each request before this deployment's stack (after
    /// [`model`](Self::model)): a header, the path. Rewrites add up.
    pub fn map_request(
        mut self,
        f: impl Fn(&mut http::Request<Bytes>) + Send + Sync + 'static,
    ) -> Self {
        self.rewrite = Some(match self.rewrite.take() {
            None => Arc::new(f),
            Some(before) => Arc::new(move |req: &mut http::Request<Bytes>| {
                before(req);
                f(req);
            }),
        });
        self
    }
}

/// Replaces the value of the top-level `model` of a JSON object body, byte
/// for byte in place: every other byte stays as it was (key order, number
/// spellings, whitespace). A body that is not a JSON object, or has no
/// top-level `model`, is left as it is.
fn rename_model(req: &mut http::Request<Bytes>, model: &str) {
    let Some(spans) = model_spans(req.body()) else {
        return;
    };
    let Ok(value) = serde_json::to_vec(model) else {
        return;
    };
    let body = req.body();
    let mut out = Vec::with_capacity(body.len().saturating_add(value.len()));
    let mut from = 0;
    for span in spans {
        out.extend_from_slice(&body[from..span.start]);
        out.extend_from_slice(&value);
        from = span.end;
    }
    out.extend_from_slice(&body[from..]);
    if req.headers().contains_key(http::header::CONTENT_LENGTH) {
        req.headers_mut().insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(out.len()),
        );
    }
    *req.body_mut() = Bytes::from(out);
}

/// Where the values of the top-level `model` key are, in a body that is
/// one JSON object (every one, in order, if given more than once: JSON
/// parsers differ on which one wins, so each is replaced); `None` when the
/// body is not that or has none. Each key and value is read by serde_json
/// (a string with its escapes, any value skipped without being built).
fn model_spans(body: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    use serde::de::IgnoredAny;
    use std::borrow::Cow;
    let ws = |mut i: usize| {
        while body
            .get(i)
            .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        {
            i += 1;
        }
        i
    };
    // One JSON value starting at `i`: where it ends.
    fn value_end<'de, T: serde::Deserialize<'de>>(body: &'de [u8], i: usize) -> Option<(T, usize)> {
        let mut de = serde_json::Deserializer::from_slice(body.get(i..)?).into_iter::<T>();
        let v = de.next()?.ok()?;
        Some((v, i + de.byte_offset()))
    }
    let mut i = ws(0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i = ws(i + 1);
    if body.get(i) == Some(&b'}') {
        return None;
    }
    let mut found = Vec::new();
    loop {
        let (key, end) = value_end::<Cow<'_, str>>(body, i)?;
        i = ws(end);
        if body.get(i) != Some(&b':') {
            return None;
        }
        let start = ws(i + 1);
        let (_, end) = value_end::<IgnoredAny>(body, start)?;
        if key == "model" {
            found.push(start..end);
        }
        i = ws(end);
        match body.get(i) {
            Some(b',') => i = ws(i + 1),
            // The whole body is one object: nothing after it.
            Some(b'}') if ws(i + 1) == body.len() => return (!found.is_empty()).then_some(found),
            _ => return None,
        }
    }
}

/// The rewrite in front of a deployment's stack.
#[derive(Clone)]
struct Rewritten<S> {
    inner: S,
    model: Option<Arc<str>>,
    rewrite: Option<Rewrite>,
}

impl<S> Service<http::Request<Bytes>> for Rewritten<S>
where
    S: Service<http::Request<Bytes>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Bytes>) -> S::Future {
        if let Some(m) = &self.model {
            rename_model(&mut req, m);
        }
        if let Some(f) = &self.rewrite {
            f(&mut req);
        }
        self.inner.call(req)
    }
}

/// Builder of an LLM router ([`LlmStack::router`],
/// [`LlmStack::stream_router`]); [`build`](Self::build) builds every
/// deployment's stack and validates the whole.
#[must_use = "call .build() to get a router"]
pub struct LlmRouterBuilder<B = Bytes> {
    name: Option<Arc<str>>,
    deployments: Vec<LlmDeployment<B>>,
    group: Option<Arc<str>>,
    fallbacks: Vec<(Permanent, Arc<str>)>,
    max_attempts: Option<u32>,
    deadline: Option<Duration>,
    hedge: Option<(Hedge, f64)>,
    backoff: Option<Option<crate::backoff::Backoff>>,
    budget: Option<Arc<crate::retry::RetryBudget>>,
    shutdown: Option<crate::shutdown::Shutdown>,
    listener: ListenerSlot,
}

impl<B> fmt::Debug for LlmRouterBuilder<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmRouterBuilder")
            .field("name", &self.name)
            .field("deployments", &self.deployments)
            .finish_non_exhaustive()
    }
}

impl LlmStack {
    /// An LLM router of whole answers: one logical model over several
    /// deployments ([`LlmDeployment::new`]), each call sent to the one that
    /// could start it soonest, failed over by class, fallen back by
    /// `Permanent` reason (see [`Router`]).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use semaforo::classify::Permanent;
    /// use semaforo::llm::{LlmDeployment, LlmStack, Tier};
    /// use tower::{service_fn, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), semaforo::BoxError> {
    /// let answer = |text: &'static str| {
    ///     service_fn(move |_req: http::Request<Bytes>| async move {
    ///         let body = format!(r#"{{"choices":[{{"message":{{"content":"{text}"}}}}],"usage":{{"total_tokens":12}}}}"#);
    ///         Ok::<_, std::io::Error>(http::Response::new(Bytes::from(body)))
    ///     })
    /// };
    /// let tier = Tier { requests_per_minute: 500, tokens_per_minute: 30_000 };
    /// let router = LlmStack::router()
    ///     .deployment(LlmDeployment::new("primary", LlmStack::openai(tier), answer("from primary")))
    ///     .deployment(LlmDeployment::new("secondary", LlmStack::openai(tier), answer("from secondary")))
    ///     .deployment(
    ///         LlmDeployment::new("long", LlmStack::openai(tier), answer("from long"))
    ///             .group("long-context")
    ///             .model("gpt-4.1"),
    ///     )
    ///     .fallback(Permanent::ContextLengthExceeded, "long-context")
    ///     .build()?;
    /// let req = http::Request::post("/v1/chat/completions")
    ///     .body(Bytes::from_static(br#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[]}"#))?;
    /// let res = router.oneshot(req).await?;
    /// assert_eq!(res.status(), 200);
    /// # Ok(()) }
    /// ```
    pub fn router() -> LlmRouterBuilder<Bytes> {
        LlmRouterBuilder::new()
    }

    /// An LLM router of streamed answers: deployments made with
    /// [`LlmDeployment::streaming`]; a stream fails over until its first
    /// chunk, never after.
    pub fn stream_router() -> LlmRouterBuilder<LlmRouterBody> {
        LlmRouterBuilder::new()
    }
}

impl<B> LlmRouterBuilder<B> {
    fn new() -> Self {
        LlmRouterBuilder {
            name: None,
            deployments: Vec::new(),
            group: None,
            fallbacks: Vec::new(),
            max_attempts: None,
            deadline: None,
            hedge: None,
            backoff: None,
            budget: None,
            shutdown: None,
            listener: ListenerSlot::default(),
        }
    }

    /// Names the router (events, errors).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Adds a deployment.
    pub fn deployment(mut self, d: LlmDeployment<B>) -> Self {
        self.deployments.push(d);
        self
    }

    /// The group calls start in (default: the first deployment's).
    pub fn group(mut self, group: impl Into<Arc<str>>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// See [`RouterBuilder::fallback`](crate::route::RouterBuilder::fallback).
    pub fn fallback(mut self, reason: Permanent, group: impl Into<Arc<str>>) -> Self {
        self.fallbacks.push((reason, group.into()));
        self
    }

    /// See [`RouterBuilder::max_attempts`](crate::route::RouterBuilder::max_attempts).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// See [`RouterBuilder::deadline`](crate::route::RouterBuilder::deadline).
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// See [`RouterBuilder::backoff`](crate::route::RouterBuilder::backoff).
    pub fn backoff(mut self, backoff: Option<crate::backoff::Backoff>) -> Self {
        self.backoff = Some(backoff);
        self
    }

    /// One [`Shutdown`](crate::shutdown::Shutdown) for every deployment's
    /// stack (each gets its own otherwise): one trigger drains them all, and
    /// `Health::new(&shutdown)` with
    /// [`Router::register_health`](crate::route::Router::register_health)
    /// reports them.
    ///
    /// Its counts are of the deployments' calls, which a router call makes
    /// one per deployment it reaches: a call hedged to two deployments is two
    /// calls in flight (and two in the drain report), and a call made after
    /// the trigger is refused once per deployment it tries (two `rejected`
    /// with two deployments). A router call waiting in the router's own
    /// backoff holds no deployment, so the drain does not wait for it; it is
    /// answered `ShuttingDown` when it tries again — nothing reaches a
    /// provider after the trigger.
    pub fn shutdown(mut self, shutdown: crate::shutdown::Shutdown) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    /// See [`RouterBuilder::retry_budget`](crate::route::RouterBuilder::retry_budget).
    pub fn retry_budget(mut self, budget: Arc<crate::retry::RetryBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// See [`RouterBuilder::hedge`](crate::route::RouterBuilder::hedge).
    pub fn hedge(mut self, when: Hedge, max_share: f64) -> Self {
        self.hedge = Some((when, max_share));
        self
    }

    /// The router's events (see
    /// [`RouterBuilder::on_event`](crate::route::RouterBuilder::on_event));
    /// a deployment's own parts tell theirs to its stack's listener.
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.listener.set(f);
        self
    }

    /// Builds every deployment's stack and the router over them.
    fn router<C>(
        self,
        classify: C,
    ) -> Result<Router<LlmDeploymentService<B>, Estimate, C, ModelField>, ConfigError> {
        let mut builder = Router::builder();
        let mut estimate = None;
        for d in self.deployments {
            let name = d.name.clone();
            let single = Retry::builder()
                .name(name.clone())
                .max_attempts(1)
                .build()?;
            let mut stack = d.stack.name(&*name).retry(single);
            if let Some(s) = &self.shutdown {
                stack = stack.shutdown(s.clone());
            }
            let stack = stack.build().map_err(|e| {
                ConfigError::new(
                    "llm router",
                    "deployment",
                    format!("deployment '{name}': {e}"),
                )
            })?;
            let service = LlmDeploymentService {
                inner: Rewritten {
                    inner: (d.make)(&stack),
                    model: d.model.clone(),
                    rewrite: d.rewrite,
                },
            };
            let mut deployment = Deployment::new(name, service)
                .pace(stack.pace().clone())
                .breaker(stack.breaker().clone())
                .bulkhead(stack.bulkhead().clone())
                .weight(d.weight)
                .preference(d.preference);
            if let Some(g) = d.group {
                deployment = deployment.group(g);
            }
            if let Some(m) = d.model {
                deployment = deployment.key(m);
            }
            estimate.get_or_insert_with(|| stack.estimate());
            builder = builder.deployment(deployment);
        }
        let Some(estimate) = estimate else {
            return Err(ConfigError::new(
                "llm router",
                "deployments",
                "add at least one",
            ));
        };
        let mut builder = builder.weigh(estimate).key(ModelField).classify(classify);
        if let Some(n) = self.name {
            builder = builder.name(n);
        }
        if let Some(g) = self.group {
            builder = builder.group(g);
        }
        for (reason, group) in self.fallbacks {
            builder = builder.fallback(reason, group);
        }
        if let Some(n) = self.max_attempts {
            builder = builder.max_attempts(n);
        }
        if let Some(d) = self.deadline {
            builder = builder.deadline(d);
        }
        if let Some((when, share)) = self.hedge {
            builder = builder.hedge(when, share);
        }
        if let Some(b) = self.backoff {
            builder = builder.backoff(b);
        }
        if let Some(b) = self.budget {
            builder = builder.retry_budget(b);
        }
        if let Some(l) = self.listener.0 {
            builder = builder.on_event(move |e: &Event<'_>| l(e));
        }
        builder.build()
    }
}

impl LlmRouterBuilder<Bytes> {
    /// Builds each deployment's stack (its retry replaced by one attempt)
    /// and the router.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the deployment whose stack is invalid, or
    /// the router's own (see
    /// [`RouterBuilder::build`](crate::route::RouterBuilder::build)).
    pub fn build(self) -> Result<LlmRouter, ConfigError> {
        self.router(LlmClassifier::new())
    }
}

impl LlmRouterBuilder<LlmRouterBody> {
    /// Builds each deployment's stack (its retry replaced by one attempt)
    /// and the router.
    ///
    /// # Errors
    ///
    /// As [`LlmRouterBuilder::<Bytes>::build`](LlmRouterBuilder::build).
    pub fn build(self) -> Result<LlmStreamRouter, ConfigError> {
        self.router(LlmHeadClassifier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renamed(body: &str) -> String {
        let mut req = http::Request::new(Bytes::from(body.to_owned()));
        rename_model(&mut req, "gpt-4.1");
        String::from_utf8(req.body().to_vec()).unwrap_or_default()
    }

    #[test]
    fn only_the_model_value_changes() {
        assert_eq!(
            renamed(
                r#"{"z":1,"seed":123456789012345678901234567890,"model" : "gpt-4o","t":1e400}"#
            ),
            r#"{"z":1,"seed":123456789012345678901234567890,"model" : "gpt-4.1","t":1e400}"#
        );
        assert_eq!(
            renamed(r#" { "messages":[{"model":"inner"}], "model":"a\"b" } "#),
            r#" { "messages":[{"model":"inner"}], "model":"gpt-4.1" } "#
        );
        // Escaped key, null and numbers are values like any other.
        assert_eq!(
            renamed(r#"{"mo\u0064el":null}"#),
            r#"{"mo\u0064el":"gpt-4.1"}"#
        );
        for left in [
            "",
            "[]",
            "not json",
            r#"{"contents":[]}"#,
            r#"{"model""#,
            "{",
            "{}",
        ] {
            assert_eq!(renamed(left), left);
        }
    }
}
