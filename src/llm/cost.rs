//! What an LLM call costs: the estimate read from the request before it is
//! sent, and the real count read from the answer (`usage`).
//!
//! Both read only the fields they need with a typed deserialization borrowed
//! from the body (serde): nothing else of the document is built in memory, the
//! body is scanned once, and every number is added with saturating arithmetic
//! (a `max_tokens` of `u64::MAX` is a cost of `u64::MAX`, which no budget
//! admits — never a wrapped tiny cost).

use crate::classify::skip_others;
use crate::pace::Cost;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::fmt;

/// Tokens an image, audio or file part of a message counts for in the
/// estimate: 765, what OpenAI bills a 1024×1024 image at high detail
/// (85 + 4 tiles × 170; "Calculating costs" in OpenAI's vision guide).
pub const NON_TEXT_PART_TOKENS: u64 = 765;

/// Output tokens reserved when a request sets no `max_tokens` (nor
/// `max_completion_tokens` / `max_output_tokens`).
pub const DEFAULT_MAX_OUTPUT: u64 = 1_000;

/// Estimated cost of an OpenAI-style (or Anthropic / Gemini) request, split
/// as providers count it: input tokens, the prompt's characters ÷ 4; output
/// tokens, what it may produce (`max_tokens`, `max_completion_tokens` or
/// `max_output_tokens`, whichever is largest; [`DEFAULT_MAX_OUTPUT`] when none
/// is set) times `n` choices.
///
/// The prompt is every string in `messages` (plain `content` and the `text` of
/// content parts alike), `system`, `tools`, `functions`, `input`, `prompt`,
/// `contents` and `systemInstruction`, except the values of `role` and `type`;
/// each image, audio or file part counts [`NON_TEXT_PART_TOKENS`]. A body that
/// is not such JSON costs its length ÷ 4 plus [`DEFAULT_MAX_OUTPUT`].
///
/// Characters ÷ 4 is OpenAI's rule of thumb for English ("What are tokens",
/// OpenAI help center); other models and languages differ by 20–40 %, and the
/// pacer reconciles every estimate with the `usage` the answer reports.
///
/// ```
/// use semaforo::llm::estimate_cost;
/// use semaforo::pace::Cost;
///
/// let plain = br#"{"max_tokens":100,"messages":[{"role":"user","content":"abcdefgh"}]}"#;
/// let parts = br#"{"max_tokens":100,"messages":[{"role":"user","content":[{"type":"text","text":"abcdefgh"}]}]}"#;
/// assert_eq!(estimate_cost(plain), Cost::split(2, 100));
/// assert_eq!(estimate_cost(parts), Cost::split(2, 100));
/// ```
pub fn estimate_cost(body: &[u8]) -> Cost {
    estimate_cost_with(body, DEFAULT_MAX_OUTPUT)
}

/// [`estimate_cost`] with `unset_max_output` output tokens reserved for a
/// request that sets no maximum (a [`Profile`](super::Profile) gives its
/// model's largest output here).
///
/// ```
/// use semaforo::llm::estimate_cost_with;
/// use semaforo::pace::Cost;
///
/// let body = br#"{"messages":[{"role":"user","content":"abcdefgh"}]}"#;
/// assert_eq!(estimate_cost_with(body, 16_384), Cost::split(2, 16_384));
/// ```
pub fn estimate_cost_with(body: &[u8], unset_max_output: u64) -> Cost {
    estimate_capped(body, unset_max_output, u64::MAX)
}

/// [`estimate_cost_with`], the output of a request that sets no maximum
/// (all its `n` choices together) at most `unset_cap`.
pub(crate) fn estimate_capped(body: &[u8], unset_max_output: u64, unset_cap: u64) -> Cost {
    match read_request(body) {
        Some(r) => {
            let prompt = r.prompt.chars / 4;
            let parts = r.prompt.non_text.saturating_mul(NON_TEXT_PART_TOKENS);
            let choices = r.n.unwrap_or(1).max(1);
            let output = match r.max_output {
                Some(max) => max.saturating_mul(choices),
                None => unset_max_output.saturating_mul(choices).min(unset_cap),
            };
            Cost::split(prompt.saturating_add(parts), output)
        }
        None => Cost::split(body.len() as u64 / 4, unset_max_output.min(unset_cap)),
    }
}

/// The parts of a JSON request the estimate reads; `None` when `body` is
/// not a JSON object.
pub(super) fn read_request(body: &[u8]) -> Option<RequestShape> {
    serde_json::from_slice::<RequestShape>(body).ok()
}

/// The total tokens an answer reports: OpenAI's `usage.total_tokens` (or
/// `prompt_tokens + completion_tokens`), Anthropic's `usage.input_tokens +
/// output_tokens`, Gemini's `usageMetadata.totalTokenCount`. `None` when the
/// body is not JSON or reports no usage.
///
/// ```
/// use semaforo::llm::usage_tokens;
/// assert_eq!(usage_tokens(br#"{"choices":[],"usage":{"total_tokens":42}}"#), Some(42));
/// assert_eq!(usage_tokens(br#"{"usage":{"input_tokens":40,"output_tokens":2}}"#), Some(42));
/// assert_eq!(usage_tokens(b"not json"), None);
/// ```
pub fn usage_tokens(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Payload<'_>>(body).ok()?.total()
}

/// The cost an answer reports, split as providers count it (see [`Cost`]):
///
/// | provider | input (not cached) | cached input | output |
/// |---|---|---|---|
/// | OpenAI Chat Completions | `prompt_tokens` − `prompt_tokens_details.cached_tokens` | `cached_tokens` | `completion_tokens` |
/// | OpenAI Responses | `input_tokens` − `input_tokens_details.cached_tokens` | `cached_tokens` | `output_tokens` |
/// | Anthropic | `input_tokens` + `cache_creation_input_tokens` | `cache_read_input_tokens` | `output_tokens` |
/// | Gemini | `promptTokenCount` + `toolUsePromptTokenCount` − `cachedContentTokenCount` | `cachedContentTokenCount` | `candidatesTokenCount` + `thoughtsTokenCount` |
///
/// A reported total the parts do not explain counts as output; a total
/// alone counts as input ([`Cost::tokens`]). `None` when the body is not JSON
/// or reports no usage. Sources: OpenAI's "Prompt caching" guide, Anthropic's
/// "Prompt caching" (the three input fields), Gemini's `UsageMetadata`.
///
/// ```
/// use semaforo::llm::usage_cost;
/// use semaforo::pace::Cost;
///
/// let openai = br#"{"usage":{"prompt_tokens":1200,"completion_tokens":300,"total_tokens":1500,"prompt_tokens_details":{"cached_tokens":1000}}}"#;
/// assert_eq!(usage_cost(openai), Some(Cost::split(200, 300).with_cached_input(1_000)));
/// let anthropic = br#"{"usage":{"input_tokens":50,"cache_creation_input_tokens":150,"cache_read_input_tokens":1000,"output_tokens":300}}"#;
/// assert_eq!(usage_cost(anthropic), Some(Cost::split(200, 300).with_cached_input(1_000)));
/// ```
pub fn usage_cost(body: &[u8]) -> Option<Cost> {
    serde_json::from_slice::<Payload<'_>>(body).ok()?.cost()
}

/// [`usage_cost`], and whether the answer reported its input count (a
/// total alone does not say how much of it was the prompt).
pub(crate) fn usage_reported(body: &[u8]) -> Option<(Cost, bool)> {
    let p = serde_json::from_slice::<Payload<'_>>(body).ok()?;
    Some((p.cost()?, p.input.is_some()))
}

/// One JSON answer or SSE `data:` payload: its usage, and whether it is an
/// error (a top-level `error` that is not `null`). A field of an unexpected
/// type is skipped, never a reason to miss the rest.
#[derive(Debug, Default)]
pub(crate) struct Payload<'a> {
    /// A total (`total_tokens`, `totalTokenCount`, or prompt + completion).
    pub(crate) usage: Option<u64>,
    /// Input tokens not read from a cache (Anthropic's arrive in
    /// `message_start`).
    pub(crate) input: Option<u64>,
    /// Input tokens read from a cache.
    pub(crate) cached: Option<u64>,
    /// Output tokens (Anthropic's last `message_delta` has the final count).
    pub(crate) output: Option<u64>,
    pub(crate) error: bool,
    pub(crate) _body: std::marker::PhantomData<&'a ()>,
}

impl<'de> Deserialize<'de> for Payload<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Payload<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Payload<'de>, A::Error> {
                let mut p = Payload::default();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    match &*key.0 {
                        "usage" | "usageMetadata" => {
                            if let Lenient(Some(u)) = map.next_value::<Lenient<Usage>>()? {
                                p.take(&u);
                            }
                        }
                        // Anthropic's `message_start` nests the input's usage.
                        "message" => {
                            if let Lenient(Some(m)) = map.next_value::<Lenient<Message>>()? {
                                if let Some(u) = m.usage {
                                    p.take(&u);
                                }
                            }
                        }
                        // OpenAI's Responses API streams its usage and its
                        // failure inside `response` (`response.completed`,
                        // `response.failed`).
                        "response" => {
                            if let Lenient(Some(r)) = map.next_value::<Lenient<ResponseObject>>()? {
                                if let Some(Lenient(Some(u))) = r.usage {
                                    p.take(&u);
                                }
                                p.error |= r.error.is_some();
                            }
                        }
                        "error" => p.error |= !map.next_value::<IsNull>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(p)
            }
        }
        d.deserialize_map(V)
    }
}

impl Payload<'_> {
    fn take(&mut self, u: &Usage) {
        let n = |c: Option<Count>| c.map(|c| c.0);
        self.usage = n(u.total_tokens).or(n(u.total_token_count)).or(self.usage);
        if let (Some(p), Some(c)) = (n(u.prompt_tokens), n(u.completion_tokens)) {
            self.usage = self.usage.or(Some(p.saturating_add(c)));
        }
        // Cached input inside the prompt count (OpenAI, Gemini) or beside it (Anthropic).
        let inside = n(u.cached_tokens).or(n(u.cached_content_token_count));
        let anthropic =
            u.cache_read_input_tokens.is_some() || u.cache_creation_input_tokens.is_some();
        // Gemini's tool-use prompt is input the parts do not list.
        let prompt = n(u.prompt_tokens)
            .or(n(u.prompt_token_count))
            .map(|p| p.saturating_add(n(u.tool_use_prompt_token_count).unwrap_or(0)));
        if let Some(p) = prompt {
            let cached = inside.unwrap_or(0).min(p);
            self.input = Some(p - cached);
            self.cached = Some(cached);
        } else if let Some(i) = n(u.input_tokens).or(anthropic.then_some(0)) {
            if anthropic {
                self.input = Some(i.saturating_add(n(u.cache_creation_input_tokens).unwrap_or(0)));
                self.cached = Some(n(u.cache_read_input_tokens).unwrap_or(0));
            } else {
                let cached = inside.unwrap_or(0).min(i);
                self.input = Some(i - cached);
                self.cached = Some(cached);
            }
        }
        let gemini_out = match (n(u.candidates_token_count), n(u.thoughts_token_count)) {
            (None, None) => None,
            (c, t) => Some(c.unwrap_or(0).saturating_add(t.unwrap_or(0))),
        };
        self.output = n(u.completion_tokens)
            .or(n(u.output_tokens))
            .or(gemini_out)
            .or(self.output);
    }

    /// The cost reported: the parts, with what a reported total has beyond
    /// them as output; a total alone as unsplit tokens.
    pub(crate) fn cost(&self) -> Option<Cost> {
        if self.input.is_none() && self.output.is_none() {
            return self.usage.map(Cost::tokens);
        }
        let (input, cached) = (self.input.unwrap_or(0), self.cached.unwrap_or(0));
        let mut output = self.output.unwrap_or(0);
        let parts = input.saturating_add(cached).saturating_add(output);
        if let Some(total) = self.usage {
            output = output.saturating_add(total.saturating_sub(parts));
        }
        Some(Cost::split(input, output).with_cached_input(cached))
    }

    /// Keeps what a later payload of the same stream reports (the last value
    /// of each part wins).
    pub(crate) fn absorb(&mut self, later: &Payload<'_>) {
        self.usage = later.usage.or(self.usage);
        self.input = later.input.or(self.input);
        self.cached = later.cached.or(self.cached);
        self.output = later.output.or(self.output);
    }

    /// The total: the one reported, else the sum of the parts.
    pub(crate) fn total(&self) -> Option<u64> {
        self.usage.or_else(|| self.cost().map(|c| c.total_tokens()))
    }
}

/// The Responses API's `response` object: its `usage` and `error`.
#[derive(Deserialize, Default)]
struct ResponseObject {
    #[serde(default)]
    usage: Option<Lenient<Usage>>,
    /// Present and not `null` when the response failed.
    #[serde(default)]
    error: Option<IgnoredAny>,
}

/// Anthropic's `message` object (of `message_start`): its `usage`.
#[derive(Deserialize, Default)]
struct Message {
    #[serde(default)]
    usage: Option<Usage>,
}

/// A value read if it has the expected shape, skipped (as `None`) if not.
struct Lenient<T>(Option<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Only objects are tried: anything else is skipped.
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Lenient<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(|t| Lenient(Some(t)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Lenient<T>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Lenient(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Lenient<T>, E> {
                Ok(Lenient(None))
            }
            skip_others!(Lenient(None));
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// An object key, borrowed from the body unless it holds escapes (serde's own
/// `Cow<str>` always copies).
pub(super) struct Key<'de>(pub(super) Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// `true` for a JSON `null`, the value skipped.
struct IsNull(bool);

impl<'de> Deserialize<'de> for IsNull {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(IsNull(Option::<IgnoredAny>::deserialize(d)?.is_none()))
    }
}

/// A `usage` object; fields of an unexpected type are skipped, a repeated
/// one counts as its last value.
#[derive(Default)]
struct Usage {
    total_tokens: Option<Count>,
    prompt_tokens: Option<Count>,
    completion_tokens: Option<Count>,
    input_tokens: Option<Count>,
    output_tokens: Option<Count>,
    total_token_count: Option<Count>,
    /// `prompt_tokens_details.cached_tokens` / `input_tokens_details.cached_tokens`.
    cached_tokens: Option<Count>,
    cache_read_input_tokens: Option<Count>,
    cache_creation_input_tokens: Option<Count>,
    prompt_token_count: Option<Count>,
    cached_content_token_count: Option<Count>,
    candidates_token_count: Option<Count>,
    thoughts_token_count: Option<Count>,
    tool_use_prompt_token_count: Option<Count>,
}

impl<'de> Deserialize<'de> for Usage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Usage;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a usage object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Usage, A::Error> {
                let mut u = Usage::default();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    let slot = match &*key.0 {
                        "total_tokens" => &mut u.total_tokens,
                        "prompt_tokens" => &mut u.prompt_tokens,
                        "completion_tokens" => &mut u.completion_tokens,
                        "input_tokens" => &mut u.input_tokens,
                        "output_tokens" => &mut u.output_tokens,
                        "totalTokenCount" => &mut u.total_token_count,
                        "cache_read_input_tokens" => &mut u.cache_read_input_tokens,
                        "cache_creation_input_tokens" => &mut u.cache_creation_input_tokens,
                        "promptTokenCount" => &mut u.prompt_token_count,
                        "cachedContentTokenCount" => &mut u.cached_content_token_count,
                        "candidatesTokenCount" => &mut u.candidates_token_count,
                        "thoughtsTokenCount" => &mut u.thoughts_token_count,
                        "toolUsePromptTokenCount" => &mut u.tool_use_prompt_token_count,
                        "prompt_tokens_details" | "input_tokens_details" => {
                            if let Lenient(Some(d)) = map.next_value::<Lenient<Details>>()? {
                                if let Some(c) = d.cached_tokens.0 {
                                    u.cached_tokens = Some(c);
                                }
                            }
                            continue;
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    if let Loose(Some(c)) = map.next_value::<Loose>()? {
                        *slot = Some(c);
                    }
                }
                Ok(u)
            }
        }
        d.deserialize_map(V)
    }
}

/// OpenAI's `prompt_tokens_details` / `input_tokens_details`.
#[derive(Deserialize, Default)]
struct Details {
    #[serde(default)]
    cached_tokens: Loose,
}

/// A [`Count`] if the value is one, else nothing (the value skipped).
#[derive(Default)]
struct Loose(Option<Count>);

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Loose;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Loose, E> {
                Ok(Loose(Some(Count(v))))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Loose, E> {
                Ok(Loose(Some(Count(u64::try_from(v).unwrap_or(0)))))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Loose, E> {
                Ok(Loose(Some(Count(v.max(0.0).ceil() as u64))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Loose, E> {
                Ok(Loose(count_of_str(v)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Loose, E> {
                Ok(Loose(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Loose, E> {
                Ok(Loose(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Loose(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Loose(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A number written as a string (`"100000"`, `" 2000.0 "`, `"1e3"`): what
/// it says, as a [`Count`] reads a number — floats rounded up, saturated
/// (`"99999999999999999999"` and `"inf"` are `u64::MAX`, never "unset");
/// `None` when it is not a number (`"NaN"` included).
fn count_of_str(v: &str) -> Option<Count> {
    let v = v.trim();
    if let Ok(n) = v.parse::<u64>() {
        return Some(Count(n));
    }
    // "NaN" is not a number; "inf" is as large as any (saturated).
    let f = v.parse::<f64>().ok().filter(|f| !f.is_nan())?;
    Some(Count(f.max(0.0).ceil() as u64))
}

/// A non-negative count: integers as they are, negatives as 0, floats rounded
/// up and saturated, `null` as absent (through `Option`).
#[derive(Debug, Clone, Copy)]
struct Count(u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(v).unwrap_or(0)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                // `as` saturates (and NaN is 0).
                Ok(Count(v.max(0.0).ceil() as u64))
            }
            // A number written as a string ("100000"): what it says.
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Count, E> {
                count_of_str(v).ok_or_else(|| E::custom("not a number"))
            }
        }
        d.deserialize_any(V)
    }
}

/// The parts of a request the estimate reads.
#[derive(Default)]
pub(super) struct RequestShape {
    pub(super) model: Option<Box<str>>,
    pub(super) prompt: Text,
    pub(super) max_output: Option<u64>,
    pub(super) n: Option<u64>,
}

impl<'de> Deserialize<'de> for RequestShape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RequestShape;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RequestShape, A::Error> {
                let mut r = RequestShape::default();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    match &*key.0 {
                        "messages" | "system" | "tools" | "functions" | "input" | "prompt"
                        | "contents" | "systemInstruction" | "system_instruction" => {
                            r.prompt.add(map.next_value::<Text>()?);
                        }
                        // A value of an unexpected type (`"max_tokens": true`)
                        // is skipped, not a reason to miss the model.
                        "max_tokens" | "max_completion_tokens" | "max_output_tokens" => {
                            if let Loose(Some(c)) = map.next_value::<Loose>()? {
                                r.max_output = Some(r.max_output.map_or(c.0, |m| m.max(c.0)));
                            }
                        }
                        "n" => r.n = map.next_value::<Loose>()?.0.map(|c| c.0),
                        "model" => {
                            r.model = map.next_value::<ModelName>()?.0;
                        }
                        // Gemini's output limit and choices.
                        "generationConfig" | "generation_config" => {
                            let g = map.next_value::<GenerationConfig>()?;
                            if let Some(c) = g.max_output {
                                r.max_output = Some(r.max_output.map_or(c, |m| m.max(c)));
                            }
                            if g.candidates.is_some() {
                                r.n = g.candidates;
                            }
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(r)
            }
        }
        d.deserialize_map(V)
    }
}

/// Gemini's `generationConfig`: `maxOutputTokens` and `candidateCount`;
/// any other value skipped.
#[derive(Default)]
struct GenerationConfig {
    max_output: Option<u64>,
    candidates: Option<u64>,
}

impl<'de> Deserialize<'de> for GenerationConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = GenerationConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<GenerationConfig, A::Error> {
                let mut g = GenerationConfig::default();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    match &*key.0 {
                        "maxOutputTokens" | "max_output_tokens" => {
                            g.max_output = map.next_value::<Loose>()?.0.map(|c| c.0);
                        }
                        "candidateCount" | "candidate_count" => {
                            g.candidates = map.next_value::<Loose>()?.0.map(|c| c.0);
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(g)
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<GenerationConfig, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(GenerationConfig::default())
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<GenerationConfig, E> {
                Ok(GenerationConfig::default())
            }
            skip_others!(GenerationConfig::default());
        }
        d.deserialize_any(V)
    }
}

/// A string `model`, kept; any other value skipped.
struct ModelName(Option<Box<str>>);

impl<'de> Deserialize<'de> for ModelName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ModelName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ModelName, E> {
                Ok(ModelName(Some(v.into())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ModelName, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ModelName(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ModelName, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(ModelName(None))
            }
            skip_others!(ModelName(None));
        }
        d.deserialize_any(V)
    }
}

/// The text in a JSON value: characters of every string (not of the values
/// of `role` and `type`), and the count of non-text parts (values skipped).
#[derive(Default)]
pub(super) struct Text {
    pub(super) chars: u64,
    pub(super) non_text: u64,
}

/// Keys whose value is an image, audio clip or file, not text.
const NON_TEXT_KEYS: &[&str] = &[
    "image_url",
    "input_image",
    "image",
    "input_audio",
    "audio",
    "file",
    "file_data",
    "fileData",
    "inline_data",
    "inlineData",
    "source",
    "document",
];

impl Text {
    fn add(&mut self, other: Text) {
        self.chars = self.chars.saturating_add(other.chars);
        self.non_text = self.non_text.saturating_add(other.non_text);
    }

    fn count(s: &str) -> Text {
        Text {
            chars: s.chars().count() as u64,
            non_text: 0,
        }
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text::count(v))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
                let mut t = Text::default();
                while let Some(x) = seq.next_element::<Text>()? {
                    t.add(x);
                }
                Ok(t)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
                let mut t = Text::default();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    if key.0 == "role" || key.0 == "type" {
                        map.next_value::<IgnoredAny>()?;
                    } else if NON_TEXT_KEYS.contains(&&*key.0) {
                        map.next_value::<IgnoredAny>()?;
                        t.non_text = t.non_text.saturating_add(1);
                    } else {
                        t.add(map.next_value::<Text>()?);
                    }
                }
                Ok(t)
            }
        }
        d.deserialize_any(V)
    }
}

/// Calls `f` with every string of the prompt of a JSON request (what
/// [`estimate_cost`] counts the characters of), in order; the number of
/// `messages` (or Gemini `contents`), `None` when the body is not such JSON.
#[cfg(feature = "tiktoken")]
pub(crate) fn prompt_strings(body: &[u8], f: &mut dyn FnMut(&str)) -> Option<u64> {
    use serde::de::DeserializeSeed;
    struct Top<'f>(&'f mut dyn FnMut(&str));
    impl<'de> DeserializeSeed<'de> for Top<'_> {
        type Value = u64;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
            struct V<'f>(&'f mut dyn FnMut(&str));
            impl<'de> Visitor<'de> for V<'_> {
                type Value = u64;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
                    let mut messages = 0;
                    while let Some(key) = map.next_key::<Key<'de>>()? {
                        match &*key.0 {
                            "messages" | "contents" => {
                                messages += map.next_value_seed(Strings {
                                    f: &mut *self.0,
                                    count_items: true,
                                })?;
                            }
                            "system" | "tools" | "functions" | "input" | "prompt"
                            | "systemInstruction" | "system_instruction" => {
                                map.next_value_seed(Strings {
                                    f: &mut *self.0,
                                    count_items: false,
                                })?;
                            }
                            _ => {
                                map.next_value::<IgnoredAny>()?;
                            }
                        }
                    }
                    Ok(messages)
                }
            }
            d.deserialize_map(V(self.0))
        }
    }
    /// The strings of a value (as `Text` counts them); with `count_items`,
    /// how many items an array has.
    struct Strings<'f> {
        f: &'f mut dyn FnMut(&str),
        count_items: bool,
    }
    impl<'de> DeserializeSeed<'de> for Strings<'_> {
        type Value = u64;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Strings<'_> {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            (self.f)(v);
            Ok(0)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
            let mut items = 0;
            while seq
                .next_element_seed(Strings {
                    f: &mut *self.f,
                    count_items: false,
                })?
                .is_some()
            {
                items += 1;
            }
            Ok(if self.count_items { items } else { 0 })
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
            while let Some(key) = map.next_key::<Key<'de>>()? {
                if key.0 == "role" || key.0 == "type" || NON_TEXT_KEYS.contains(&&*key.0) {
                    map.next_value::<IgnoredAny>()?;
                } else {
                    map.next_value_seed(Strings {
                        f: &mut *self.f,
                        count_items: false,
                    })?;
                }
            }
            Ok(0)
        }
        skip_others!(0);
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let messages = Top(f).deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_count_like_plain_content() {
        let text = "a".repeat(40_000);
        let plain = format!(
            r#"{{"model":"m","max_tokens":100,"messages":[{{"role":"user","content":"{text}"}}]}}"#
        );
        let parts = format!(
            r#"{{"model":"m","max_tokens":100,"messages":[{{"role":"user","content":[{{"type":"text","text":"{text}"}}]}}]}}"#
        );
        assert_eq!(estimate_cost(plain.as_bytes()), Cost::split(10_000, 100));
        assert_eq!(estimate_cost(parts.as_bytes()), Cost::split(10_000, 100));
    }

    #[test]
    fn overflowing_numbers_saturate() {
        let body = br#"{"max_tokens":18446744073709551615,"n":3,"messages":[{"role":"user","content":"abcdefgh"}]}"#;
        assert_eq!(estimate_cost(body), Cost::split(2, u64::MAX));
        assert_eq!(estimate_cost(body).total_tokens(), u64::MAX);
        let body = br#"{"max_tokens":1e300,"messages":[]}"#;
        assert_eq!(estimate_cost(body), Cost::split(0, u64::MAX));
        let body = br#"{"max_tokens":-5,"messages":[]}"#;
        assert_eq!(estimate_cost(body), Cost::split(0, 0));
        assert_eq!(
            usage_tokens(
                br#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":9}}"#
            ),
            Some(u64::MAX)
        );
    }

    #[test]
    fn non_text_parts_have_a_fixed_estimate() {
        let b64 = "A".repeat(100_000);
        let body = format!(
            r#"{{"max_tokens":10,"messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{b64}"}}}},{{"type":"text","text":"abcd"}}]}}]}}"#
        );
        assert_eq!(
            estimate_cost(body.as_bytes()),
            Cost::split(1 + NON_TEXT_PART_TOKENS, 10)
        );
    }

    #[test]
    fn system_and_tools_count() {
        let body = br#"{"max_tokens":0,"system":"abcd","tools":[{"type":"function","function":{"name":"abcd","description":"abcdefgh"}}],"messages":[]}"#;
        assert_eq!(estimate_cost(body), Cost::split(4, 0));
    }

    #[test]
    fn anthropic_stream_usage_is_joined_across_events() {
        let start: Payload<'_> = serde_json::from_slice(
            br#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":50,"cache_creation_input_tokens":150,"cache_read_input_tokens":1000,"output_tokens":1}}}"#,
        )
        .unwrap();
        let delta: Payload<'_> = serde_json::from_slice(
            br#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":300}}"#,
        )
        .unwrap();
        let mut seen = Payload::default();
        seen.absorb(&start);
        assert_eq!(
            seen.cost(),
            Some(Cost::split(200, 1).with_cached_input(1_000))
        );
        seen.absorb(&delta);
        assert_eq!(
            seen.cost(),
            Some(Cost::split(200, 300).with_cached_input(1_000))
        );
        assert_eq!(seen.total(), Some(1_500));
    }

    #[test]
    fn usage_is_split_as_each_provider_reports_it() {
        let cost = |b: &[u8]| usage_cost(b).unwrap();
        // OpenAI Responses, streamed: the usage is inside `response`.
        assert_eq!(
            cost(br#"{"type":"response.completed","response":{"id":"r","error":null,"usage":{"input_tokens":1200,"input_tokens_details":{"cached_tokens":1000},"output_tokens":300,"total_tokens":1500}}}"#),
            Cost::split(200, 300).with_cached_input(1_000)
        );
        let failed: Payload<'_> = serde_json::from_slice(
            br#"{"type":"response.failed","response":{"status":"failed","error":{"code":"server_error","message":"boom"}}}"#,
        )
        .unwrap();
        assert!(failed.error);
        let created: Payload<'_> =
            serde_json::from_slice(br#"{"type":"response.created","response":{"status":"in_progress","error":null,"usage":null}}"#)
                .unwrap();
        assert!(!created.error);
        // OpenAI Responses: cached inside input_tokens.
        assert_eq!(
            cost(br#"{"usage":{"input_tokens":1200,"input_tokens_details":{"cached_tokens":1000},"output_tokens":300,"total_tokens":1500}}"#),
            Cost::split(200, 300).with_cached_input(1_000)
        );
        // Anthropic without caching fields: all input is uncached.
        assert_eq!(
            cost(br#"{"usage":{"input_tokens":40,"output_tokens":2}}"#),
            Cost::split(40, 2)
        );
        // Gemini: thoughts are output; a total beyond the parts too.
        assert_eq!(
            cost(br#"{"usageMetadata":{"promptTokenCount":100,"cachedContentTokenCount":60,"candidatesTokenCount":20,"thoughtsTokenCount":5,"totalTokenCount":130}}"#),
            Cost::split(40, 30).with_cached_input(60)
        );
        // A total alone: unsplit.
        assert_eq!(cost(br#"{"usage":{"total_tokens":42}}"#), Cost::tokens(42));
        // Cached above the prompt (a broken server) cannot make input negative.
        assert_eq!(
            cost(br#"{"usage":{"prompt_tokens":10,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":99}}}"#),
            Cost::split(0, 1).with_cached_input(10)
        );
        // Odd shapes are skipped, not fatal.
        assert_eq!(
            cost(br#"{"usage":{"prompt_tokens":10,"completion_tokens":1,"prompt_tokens_details":"x"}}"#),
            Cost::split(10, 1)
        );
        assert_eq!(usage_cost(br#"{"usage":{}}"#), None);
    }

    #[test]
    fn payload_error_and_usage() {
        let p: Payload<'_> =
            serde_json::from_slice(br#"{"error":{"type":"server_error"}}"#).unwrap();
        assert!(p.error);
        let p: Payload<'_> = serde_json::from_slice(br#"{"error":null,"usage":null}"#).unwrap();
        assert!(!p.error);
        assert_eq!(p.usage, None);
        assert_eq!(
            usage_tokens(br#"{"usageMetadata":{"totalTokenCount":7}}"#),
            Some(7)
        );
    }
}
