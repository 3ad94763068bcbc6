//! What a request asks for, read once ([`Prompt`]), and how many tokens its
//! text is ([`TokenEstimator`], the default [`CharsPerToken`] learning each
//! model's ratio from the `usage` its answers report).

use super::cost::{read_request, NON_TEXT_PART_TOKENS};
use crate::hashing::HashMap;
use crate::pace::Cost;
use bytes::Bytes;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// The parts of an LLM request the preset reads, parsed once per call (not
/// per attempt) from its JSON body: the model, the prompt's characters and
/// non-text parts, the largest output asked for, the number of choices.
///
/// The prompt is every string in `messages` (plain `content` and the `text`
/// of content parts alike), `system`, `tools`, `functions`, `input`,
/// `prompt`, `contents` and `systemInstruction`, except the values of `role`
/// and `type`; images, audio and files are counted apart. A body that is not
/// such JSON is all text (its characters), its `model` still read where
/// the body has one.
///
/// ```
/// use bytes::Bytes;
/// use semaforo::llm::Prompt;
///
/// let p = Prompt::read(Bytes::from(
///     r#"{"model":"claude-sonnet-4","max_tokens":500,"messages":[{"role":"user","content":"¿Qué hora es?"}]}"#,
/// ));
/// assert_eq!(p.model(), Some("claude-sonnet-4"));
/// assert_eq!(p.chars(), 13);
/// assert_eq!(p.max_output(), Some(500));
/// assert_eq!(p.choices(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// Empty once the request is gone (in [`TokenEstimator::learn`]).
    body: Bytes,
    facts: Arc<Facts>,
}

/// What [`Prompt::read`] found; shared by clones (the body is not kept
/// where only these are needed).
#[derive(Debug, PartialEq, Eq)]
struct Facts {
    model: Option<Box<str>>,
    chars: u64,
    non_text_parts: u64,
    max_output: Option<u64>,
    choices: u64,
}

/// The model of a Gemini-style path: what follows `/models/`, up to `:`.
fn model_in_path(path: &str) -> Option<&str> {
    let (_, rest) = path.split_once("/models/")?;
    let model = rest.split([':', '/']).next()?;
    (!model.is_empty()).then_some(model)
}

/// Model names longer than this (bytes) have no pacer or ratio of their
/// own: memory stays bounded by the count of models times this.
pub(crate) const MAX_MODEL_LEN: usize = 256;

impl Prompt {
    /// Reads `body` (one pass; nothing but these fields is built). A field
    /// of an unexpected type (`"max_tokens": true`) is skipped, not a
    /// reason to miss the rest.
    pub fn read(body: Bytes) -> Prompt {
        let facts = match read_request(&body) {
            Some(r) => Facts {
                model: r.model,
                chars: r.prompt.chars,
                non_text_parts: r.prompt.non_text,
                max_output: r.max_output,
                choices: r.n.unwrap_or(1).max(1),
            },
            // Not JSON to us (or JSON serde cannot read whole: a number out
            // of range, a lone surrogate): all text, the model still found
            // by a pass that skips what it cannot read.
            None => Facts {
                model: super::ModelField::read(&body).map(|m| m.into()),
                chars: match std::str::from_utf8(&body) {
                    Ok(text) => text.chars().count() as u64,
                    Err(_) => body.len() as u64,
                },
                non_text_parts: 0,
                max_output: None,
                choices: 1,
            },
        };
        Prompt {
            body,
            facts: Arc::new(facts),
        }
    }

    /// [`read`](Self::read) the request's body; a body without a `model`
    /// takes it from the path as Gemini's API puts it there
    /// (`/v1beta/models/gemini-2.5-pro:generateContent`).
    pub fn read_request(req: &http::Request<Bytes>) -> Prompt {
        let mut p = Prompt::read(req.body().clone());
        if p.model().is_none() {
            if let Some(model) = model_in_path(req.uri().path()) {
                if let Some(f) = Arc::get_mut(&mut p.facts) {
                    f.model = Some(model.into());
                }
            }
        }
        p
    }

    /// The same prompt without its body (what learning needs).
    pub(crate) fn without_body(&self) -> Prompt {
        Prompt {
            body: Bytes::new(),
            facts: self.facts.clone(),
        }
    }

    /// The request body (for an estimator with a real tokenizer); empty in
    /// [`TokenEstimator::learn`] (the request is gone by then).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The `model` field, if the body has a string one.
    pub fn model(&self) -> Option<&str> {
        self.facts.model.as_deref()
    }

    /// Characters (Unicode scalar values) of the prompt's text; of the
    /// whole body when it is not JSON (its bytes when not UTF-8 either).
    pub fn chars(&self) -> u64 {
        self.facts.chars
    }

    /// Image, audio and file parts; each is estimated at
    /// [`NON_TEXT_PART_TOKENS`].
    pub fn non_text_parts(&self) -> u64 {
        self.facts.non_text_parts
    }

    /// The largest of `max_tokens`, `max_completion_tokens` and
    /// `max_output_tokens`, if any is set.
    pub fn max_output(&self) -> Option<u64> {
        self.facts.max_output
    }

    /// `n`, the number of choices asked for (at least 1).
    pub fn choices(&self) -> u64 {
        self.facts.choices
    }

    /// The estimated cost: input, `estimator`'s tokens for the text plus
    /// [`NON_TEXT_PART_TOKENS`] per non-text part; output, `max_output` ×
    /// choices, or `unset_max_output` × choices capped at `unset_cap` when
    /// the request sets no maximum. Saturating.
    pub(crate) fn cost(
        &self,
        estimator: &dyn TokenEstimator,
        unset_max_output: u64,
        unset_cap: u64,
    ) -> Cost {
        let parts = self.non_text_parts().saturating_mul(NON_TEXT_PART_TOKENS);
        let choices = self.choices();
        let output = match self.max_output() {
            Some(max) => max.saturating_mul(choices),
            None => unset_max_output.saturating_mul(choices).min(unset_cap),
        };
        Cost::split(estimator.text_tokens(self).saturating_add(parts), output)
    }

    /// Tells `estimator` what the provider billed for this prompt (all its
    /// input tokens, cached or not). Only prompts of text alone teach: the
    /// fixed estimate of an image (its real count depends on its size and
    /// detail) would be learned as text.
    pub(crate) fn learn(&self, estimator: &dyn TokenEstimator, billed_input: u64) {
        if self.non_text_parts() == 0 && billed_input > 0 {
            estimator.learn(self, billed_input);
        }
    }
}

/// How many tokens the text of a prompt is, before it is sent: the input
/// part of the reservation, which decides who waits.
///
/// The preset calls [`text_tokens`](Self::text_tokens) once per attempt
/// and [`learn`](Self::learn) with what the provider billed after each
/// answer that reports its `usage` (a whole answer, or a stream that ended
/// whole), so an estimator can converge on a model without its tokenizer.
/// Both are called on the request path: keep them short and never block.
pub trait TokenEstimator: Send + Sync + fmt::Debug + 'static {
    /// Tokens of the prompt's text (non-text parts are added by the caller).
    fn text_tokens(&self, prompt: &Prompt) -> u64;

    /// The provider billed `text_tokens` for `prompt` (its input, cached
    /// included; never 0), a prompt of text alone whose answer reported its
    /// input count (a total alone teaches nothing). Its
    /// [`body`](Prompt::body) is empty here. Does nothing by default.
    fn learn(&self, prompt: &Prompt, text_tokens: u64) {
        let _ = (prompt, text_tokens);
    }
}

/// An estimator shared with the caller (to read what it learned):
/// `LlmStackBuilder::estimator(Arc::clone(&mine))`.
impl<T: TokenEstimator + ?Sized> TokenEstimator for Arc<T> {
    fn text_tokens(&self, prompt: &Prompt) -> u64 {
        (**self).text_tokens(prompt)
    }

    fn learn(&self, prompt: &Prompt, text_tokens: u64) {
        (**self).learn(prompt, text_tokens);
    }
}

/// The default [`TokenEstimator`]: characters ÷ a per-model ratio, learned
/// from the answers' `usage`.
///
/// Every model starts at 4.0 characters per token (OpenAI's rule of thumb
/// for English, "What are tokens", OpenAI help center). Each answer
/// reporting its prompt tokens gives a sample `chars / billed tokens`,
/// bounded to [0.5, 16] (a broken count cannot drag it further), and the
/// ratio moves a fifth of the way to it (an exponentially weighted moving
/// average, α = 0.2): from 4.0 to a model's real 3.2, within 1 % after 20
/// answers; a change of ratio is followed at the same pace. Prompts without
/// text or with images, audio or files, answers without `usage`, with a
/// total alone or with 0 prompt tokens teach nothing.
/// The estimate is `ceil(chars / ratio)`.
///
/// Up to `max_models` models (default 1,024) learn a ratio of their own
/// (each starting at 4.0); requests without a model, models past the
/// bound, and names longer than 256 bytes share one more. Reads take
/// a shared lock and an atomic load; a learned sample is one atomic update.
///
/// ```
/// use bytes::Bytes;
/// use semaforo::llm::{CharsPerToken, Prompt, TokenEstimator};
///
/// let est = CharsPerToken::new();
/// let p = Prompt::read(Bytes::from(format!(
///     r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
///     "a".repeat(3_200)
/// )));
/// assert_eq!(est.text_tokens(&p), 800); // 3,200 chars ÷ 4.0
/// for _ in 0..30 {
///     est.learn(&p, 1_000); // the provider billed 3.2 chars a token
/// }
/// assert!((est.ratio(Some("m")) - 3.2).abs() < 0.01);
/// assert!(est.text_tokens(&p).abs_diff(1_000) <= 5);
/// ```
pub struct CharsPerToken {
    start: f64,
    max_models: usize,
    models: RwLock<HashMap<Box<str>, Arc<AtomicU64>>>,
    /// Requests without a model, and models past `max_models`.
    other: AtomicU64,
}

/// Bounds of a learned characters-per-token ratio.
const MIN_RATIO: f64 = 0.5;
const MAX_RATIO: f64 = 16.0;
/// Weight of a new sample.
const ALPHA: f64 = 0.2;

impl fmt::Debug for CharsPerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        let mut m = f.debug_map();
        for (k, v) in models.iter() {
            m.entry(k, &f64::from_bits(v.load(Ordering::Relaxed)));
        }
        m.finish()
    }
}

impl Default for CharsPerToken {
    fn default() -> Self {
        CharsPerToken::new()
    }
}

impl CharsPerToken {
    /// Every model starting at 4.0 characters per token.
    pub fn new() -> Self {
        CharsPerToken {
            start: 4.0,
            max_models: 1_024,
            models: RwLock::new(HashMap::default()),
            other: AtomicU64::new(4.0f64.to_bits()),
        }
    }

    /// Starts every model at `ratio` characters per token instead (bounded
    /// to [0.5, 16]; not finite: 4.0).
    pub fn starting_at(mut self, ratio: f64) -> Self {
        self.start = if ratio.is_finite() {
            ratio.clamp(MIN_RATIO, MAX_RATIO)
        } else {
            4.0
        };
        self.other = AtomicU64::new(self.start.to_bits());
        self
    }

    /// How many models learn a ratio of their own (default 1,024).
    pub fn max_models(mut self, n: usize) -> Self {
        self.max_models = n;
        self
    }

    /// The ratio `model` is estimated with now (characters per token): its
    /// own once it learned; the starting ratio for a model not seen yet
    /// while there is room for it; the shared one otherwise.
    pub fn ratio(&self, model: Option<&str>) -> f64 {
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        let cell = match model.filter(|m| m.len() <= MAX_MODEL_LEN) {
            Some(m) => match models.get(m) {
                Some(c) => c,
                None if models.len() < self.max_models => return self.start,
                None => &self.other,
            },
            None => &self.other,
        };
        f64::from_bits(cell.load(Ordering::Relaxed))
    }

    fn update(cell: &AtomicU64, sample: f64) {
        // Relaxed is enough: each update is one read-modify-write of one
        // cell; a lost race only weighs one of two samples less.
        let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            let old = f64::from_bits(bits);
            Some((old + ALPHA * (sample - old)).to_bits())
        });
    }
}

impl TokenEstimator for CharsPerToken {
    fn text_tokens(&self, prompt: &Prompt) -> u64 {
        let ratio = self.ratio(prompt.model());
        // chars ≤ 2^64 and ratio ≥ 0.5: the quotient fits an f64; `as`
        // saturates at u64::MAX.
        (prompt.chars() as f64 / ratio).ceil() as u64
    }

    fn learn(&self, prompt: &Prompt, text_tokens: u64) {
        // Images and files are not text: their tokens would be learned as
        // characters'.
        if prompt.chars() == 0 || text_tokens == 0 || prompt.non_text_parts() > 0 {
            return;
        }
        let sample = (prompt.chars() as f64 / text_tokens as f64).clamp(MIN_RATIO, MAX_RATIO);
        let Some(model) = prompt.model().filter(|m| m.len() <= MAX_MODEL_LEN) else {
            return CharsPerToken::update(&self.other, sample);
        };
        {
            let models = self.models.read().unwrap_or_else(|e| e.into_inner());
            if let Some(cell) = models.get(model) {
                return CharsPerToken::update(cell, sample);
            }
            if models.len() >= self.max_models {
                return CharsPerToken::update(&self.other, sample);
            }
        }
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        if models.len() >= self.max_models && !models.contains_key(model) {
            return CharsPerToken::update(&self.other, sample);
        }
        let start = self.start.to_bits();
        let cell = models
            .entry(model.into())
            .or_insert_with(|| Arc::new(AtomicU64::new(start)));
        CharsPerToken::update(cell, sample);
    }
}

/// What the preset keeps about one call, in the request's extensions (and
/// copied to the response's, where the answer's `usage` is read): the prompt,
/// read once, and the estimator to teach.
#[derive(Clone, Debug)]
pub(crate) struct Asked {
    pub(crate) prompt: Prompt,
    pub(crate) estimator: Arc<dyn TokenEstimator>,
    /// The price of the prompt's model, if known.
    pub(crate) price: Option<super::Price>,
}

impl Asked {
    /// `cost` with its spend at the model's price (0 without a price).
    pub(crate) fn priced(&self, cost: Cost) -> Cost {
        let spend = self.price.map_or(0, |p| p.of(&cost));
        cost.with_spend(spend)
    }

    /// Teaches the estimator what the provider billed for the prompt
    /// (`real` from an answer that reported its input count).
    pub(crate) fn learn(&self, real: &Cost) {
        let billed = real.input_tokens.saturating_add(real.cached_input_tokens);
        self.prompt.learn(&*self.estimator, billed);
    }

    /// The same without the request body (kept with the response).
    pub(crate) fn light(&self) -> Asked {
        Asked {
            prompt: self.prompt.without_body(),
            estimator: self.estimator.clone(),
            price: self.price,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(model: &str, chars: usize) -> Prompt {
        Prompt::read(Bytes::from(format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"{}"}}]}}"#,
            "é".repeat(chars)
        )))
    }

    #[test]
    fn gemini_native_requests_name_their_model_in_the_path() {
        let req = http::Request::post("/v1beta/models/gemini-2.5-pro:generateContent")
            .body(Bytes::from_static(
                br#"{"contents":[{"role":"user","parts":[{"text":"hola"}]}],"generationConfig":{"maxOutputTokens":100,"candidateCount":2}}"#,
            ))
            .unwrap();
        let p = Prompt::read_request(&req);
        assert_eq!(p.model(), Some("gemini-2.5-pro"));
        assert_eq!((p.max_output(), p.choices(), p.chars()), (Some(100), 2, 4));
        assert_eq!(model_in_path("/v1/chat/completions"), None);
        assert_eq!(model_in_path("/v1beta/models/:x"), None);
    }

    #[test]
    fn not_json_is_all_text() {
        let p = Prompt::read(Bytes::from_static(b"hello world"));
        assert_eq!((p.model(), p.chars(), p.choices()), (None, 11, 1));
    }

    #[test]
    fn zero_and_absurd_samples_do_not_poison() {
        let est = CharsPerToken::new();
        let p = prompt("m", 1_000);
        est.learn(&prompt("m", 0), 50);
        est.learn(&p, 0);
        assert_eq!(est.ratio(Some("m")), 4.0);
        // One absurd count moves the ratio a fifth of the way to the bound.
        est.learn(&p, u64::MAX);
        assert!((est.ratio(Some("m")) - (4.0 + 0.2 * (0.5 - 4.0))).abs() < 1e-9);
        for _ in 0..200 {
            est.learn(&p, 1);
        }
        assert!(est.ratio(Some("m")) <= 16.0);
        assert_eq!(est.ratio(Some("other")), 4.0);
    }

    #[test]
    fn models_past_the_bound_share_one_ratio() {
        let est = CharsPerToken::new().max_models(1);
        est.learn(&prompt("a", 3_000), 1_000);
        est.learn(&prompt("b", 2_000), 1_000);
        assert!(est.ratio(Some("a")) < 4.0);
        assert!(est.ratio(Some("b")) > 2.0 && est.ratio(Some("b")) < 4.0);
        assert_eq!(est.ratio(Some("b")), est.ratio(None));
    }
}
