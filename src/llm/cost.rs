//! What an LLM call costs: the estimate read from the request before it is
//! sent, and the real count read from the answer (`usage`).
//!
//! Both read only the fields they need with a typed deserialization borrowed
//! from the body (serde): nothing else of the document is built in memory, the
//! body is scanned once, and every number is added with saturating arithmetic
//! (a `max_tokens` of `u64::MAX` is a cost of `u64::MAX`, which no budget
//! admits — never a wrapped tiny cost).

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

/// Estimated cost of an OpenAI-style (or Anthropic / Gemini) request, in
/// tokens: the prompt's characters ÷ 4, plus the output it may produce
/// (`max_tokens`, `max_completion_tokens` or `max_output_tokens`, whichever is
/// largest; [`DEFAULT_MAX_OUTPUT`] when none is set), times `n` choices.
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
/// assert_eq!(estimate_cost(plain), Cost::tokens(102));
/// assert_eq!(estimate_cost(parts), Cost::tokens(102));
/// ```
pub fn estimate_cost(body: &[u8]) -> Cost {
    match serde_json::from_slice::<RequestShape>(body) {
        Ok(r) => {
            let prompt = r.prompt.chars / 4;
            let parts = r.prompt.non_text.saturating_mul(NON_TEXT_PART_TOKENS);
            let output = r
                .max_output
                .unwrap_or(DEFAULT_MAX_OUTPUT)
                .saturating_mul(r.n.unwrap_or(1).max(1));
            Cost::tokens(prompt.saturating_add(parts).saturating_add(output))
        }
        Err(_) => Cost::tokens((body.len() as u64 / 4).saturating_add(DEFAULT_MAX_OUTPUT)),
    }
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
    serde_json::from_slice::<Payload<'_>>(body).ok()?.usage
}

/// One JSON answer or SSE `data:` payload: its usage, and whether it is an
/// error (a top-level `error` that is not `null`).
#[derive(Debug, Default)]
pub(crate) struct Payload<'a> {
    pub(crate) usage: Option<u64>,
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
                            if let Some(u) = map.next_value::<Option<Usage>>()? {
                                p.usage = u.total().or(p.usage);
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

/// An object key, borrowed from the body unless it holds escapes (serde's own
/// `Cow<str>` always copies).
struct Key<'de>(Cow<'de, str>);

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

#[derive(Deserialize, Default)]
struct Usage {
    #[serde(default)]
    total_tokens: Option<Count>,
    #[serde(default)]
    prompt_tokens: Option<Count>,
    #[serde(default)]
    completion_tokens: Option<Count>,
    #[serde(default)]
    input_tokens: Option<Count>,
    #[serde(default)]
    output_tokens: Option<Count>,
    #[serde(default, rename = "totalTokenCount")]
    total_token_count: Option<Count>,
}

impl Usage {
    fn total(&self) -> Option<u64> {
        let sum = |a: Option<Count>, b: Option<Count>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.map_or(0, |c| c.0).saturating_add(b.map_or(0, |c| c.0))),
        };
        self.total_tokens
            .or(self.total_token_count)
            .map(|c| c.0)
            .or_else(|| sum(self.prompt_tokens, self.completion_tokens))
            .or_else(|| sum(self.input_tokens, self.output_tokens))
    }
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
        }
        d.deserialize_any(V)
    }
}

/// The parts of a request the estimate reads.
#[derive(Default)]
struct RequestShape {
    prompt: Text,
    max_output: Option<u64>,
    n: Option<u64>,
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
                        "max_tokens" | "max_completion_tokens" | "max_output_tokens" => {
                            if let Some(c) = map.next_value::<Option<Count>>()? {
                                r.max_output = Some(r.max_output.map_or(c.0, |m| m.max(c.0)));
                            }
                        }
                        "n" => r.n = map.next_value::<Option<Count>>()?.map(|c| c.0),
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

/// The text in a JSON value: characters of every string (not of the values
/// of `role` and `type`), and the count of non-text parts (values skipped).
#[derive(Default)]
struct Text {
    chars: u64,
    non_text: u64,
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
        assert_eq!(estimate_cost(plain.as_bytes()), Cost::tokens(10_100));
        assert_eq!(estimate_cost(parts.as_bytes()), Cost::tokens(10_100));
    }

    #[test]
    fn overflowing_numbers_saturate() {
        let body = br#"{"max_tokens":18446744073709551615,"n":3,"messages":[{"role":"user","content":"abcdefgh"}]}"#;
        assert_eq!(estimate_cost(body), Cost::tokens(u64::MAX));
        let body = br#"{"max_tokens":1e300,"messages":[]}"#;
        assert_eq!(estimate_cost(body), Cost::tokens(u64::MAX));
        let body = br#"{"max_tokens":-5,"messages":[]}"#;
        assert_eq!(estimate_cost(body), Cost::tokens(0));
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
            Cost::tokens(10 + 1 + NON_TEXT_PART_TOKENS)
        );
    }

    #[test]
    fn system_and_tools_count() {
        let body = br#"{"max_tokens":0,"system":"abcd","tools":[{"type":"function","function":{"name":"abcd","description":"abcdefgh"}}],"messages":[]}"#;
        assert_eq!(estimate_cost(body), Cost::tokens(4));
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
