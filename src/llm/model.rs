//! The `model` field of an LLM request: the key of a per-model pacer.

use super::cost::Key;
use crate::pace::PaceKey;
use bytes::Bytes;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use std::borrow::Cow;

/// Reads the `model` field of an OpenAI- or Anthropic-style JSON request body
/// (borrowed from the body unless it holds escapes; the rest of the body is
/// skipped, not built), as the key of a
/// [`KeyedPace`](crate::pace::KeyedPace): one pacer per model. A body that
/// is not JSON, or has no string `model`, has no key (the overflow pacer).
///
/// ```
/// use bytes::Bytes;
/// use semaforo::llm::ModelField;
/// use semaforo::pace::{Cost, KeyedPace, Pace};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), semaforo::BoxError> {
/// let models = KeyedPace::builder(Pace::builder().tokens_per_minute(30_000))
///     .shared(Pace::builder().tokens_per_minute(100_000))
///     .build()?;
/// let llm = ServiceBuilder::new()
///     .layer(models.layer().key(ModelField).weigh(|_: &http::Request<Bytes>| Cost::tokens(1_000)))
///     .service(service_fn(|_req: http::Request<Bytes>| async {
///         Ok::<_, std::io::Error>(http::Response::new(Bytes::new()))
///     }));
/// let req = http::Request::post("/v1/chat/completions")
///     .body(Bytes::from_static(br#"{"model":"gpt-4o-mini","messages":[]}"#))?;
/// llm.oneshot(req).await?;
/// assert_eq!(models.keys(), ["gpt-4o-mini"]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ModelField;

/// Only `model`; every other field is skipped. (serde's own `Cow<str>`
/// always copies: [`Key`] borrows.)
struct Model<'a>(Option<Key<'a>>);

impl<'de> Deserialize<'de> for Model<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Model<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Model<'de>, A::Error> {
                let mut model = None;
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    if key.0 == "model" {
                        model = Some(map.next_value::<Key<'de>>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Model(model))
            }
        }
        d.deserialize_map(V)
    }
}

impl ModelField {
    /// The `model` of `body`, if it has one.
    pub fn read(body: &[u8]) -> Option<Cow<'_, str>> {
        Some(serde_json::from_slice::<Model<'_>>(body).ok()?.0?.0)
    }
}

impl PaceKey<http::Request<Bytes>> for ModelField {
    #[inline]
    fn key<'a>(&self, req: &'a http::Request<Bytes>) -> Option<Cow<'a, str>> {
        ModelField::read(req.body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_owned_or_none() {
        let read = |b: &'static [u8]| ModelField::read(b);
        assert!(matches!(
            read(br#"{"messages":[],"model":"gpt-4o"}"#),
            Some(Cow::Borrowed("gpt-4o"))
        ));
        assert_eq!(read(br#"{"model":"a\u00e9"}"#).as_deref(), Some("aé"));
        assert_eq!(read(br#"{"model":42}"#), None);
        assert_eq!(read(br#"{"messages":[]}"#), None);
        assert_eq!(read(b"not json"), None);
        assert_eq!(read(br#"[{"model":"x"}]"#), None);
    }
}
