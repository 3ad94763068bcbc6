//! OpenAI's own tokenizers for OpenAI models' prompts (feature `tiktoken`).
//!
//! The ecosystem's tokenizer crate (`tiktoken-rs`: OpenAI's `tiktoken`
//! BPE ranks and rules) counts exactly what OpenAI bills for text; we only
//! pick the encoding per model and add the chat format's fixed tokens.

use super::prompt::{CharsPerToken, Prompt, TokenEstimator};
use std::fmt;
use std::sync::Arc;

/// A [`TokenEstimator`] counting OpenAI models' prompts with OpenAI's own
/// tokenizer: `o200k_base` for `gpt-4o`, `gpt-4.1`, `gpt-5`, `o1`, `o3`,
/// `o4` and their snapshots, `cl100k_base` for `gpt-4` and `gpt-3.5`
/// (OpenAI's `tiktoken` model table); every string of the prompt is
/// encoded, plus 3 tokens per message and 3 to prime the answer (OpenAI
/// cookbook, "How to count tokens with tiktoken"). Other models (and bodies
/// that are not JSON, and requests without a model: an Azure deployment
/// named only in its URL) are estimated by `fallback` (default:
/// [`CharsPerToken`]), which learns from their answers (the models counted
/// exactly teach it nothing).
///
/// The encodings load once per process (a few milliseconds, on the first
/// prompt of an OpenAI model); encoding costs about a microsecond per 100
/// characters, on the request path.
///
/// ```
/// use bytes::Bytes;
/// use semaforo::llm::{Prompt, Tiktoken, TokenEstimator};
///
/// let est = Tiktoken::new();
/// let p = Prompt::read(Bytes::from_static(
///     br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello world"}]}"#,
/// ));
/// // "hello world": 2 tokens; one message: 3; priming: 3.
/// assert_eq!(est.text_tokens(&p), 8);
/// ```
#[derive(Clone)]
pub struct Tiktoken {
    fallback: Arc<dyn TokenEstimator>,
}

impl fmt::Debug for Tiktoken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tiktoken")
            .field("fallback", &self.fallback)
            .finish()
    }
}

impl Default for Tiktoken {
    fn default() -> Self {
        Tiktoken::new()
    }
}

/// Tokens of the chat format: per message, and to prime the answer.
const PER_MESSAGE: u64 = 3;
const PRIMING: u64 = 3;

impl Tiktoken {
    /// OpenAI models by their tokenizer, the others by [`CharsPerToken`].
    pub fn new() -> Self {
        Tiktoken {
            fallback: Arc::new(CharsPerToken::new()),
        }
    }

    /// Estimates the models without a known tokenizer with `fallback`.
    pub fn fallback(mut self, fallback: impl TokenEstimator) -> Self {
        self.fallback = Arc::new(fallback);
        self
    }

    fn encoding(model: &str) -> Option<&'static tiktoken_rs::CoreBPE> {
        const O200K: &[&str] = &[
            "gpt-4o",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-5",
            "o1",
            "o3",
            "o4",
            "chatgpt-4o",
        ];
        const CL100K: &[&str] = &[
            "gpt-4",
            "gpt-3.5",
            "text-embedding-3",
            "text-embedding-ada-002",
        ];
        let starts = |names: &[&str]| names.iter().any(|n| model.starts_with(n));
        if starts(O200K) {
            Some(tiktoken_rs::o200k_base_singleton())
        } else if starts(CL100K) {
            Some(tiktoken_rs::cl100k_base_singleton())
        } else {
            None
        }
    }
}

impl TokenEstimator for Tiktoken {
    fn text_tokens(&self, prompt: &Prompt) -> u64 {
        let Some(bpe) = prompt.model().and_then(Tiktoken::encoding) else {
            return self.fallback.text_tokens(prompt);
        };
        let mut tokens = 0u64;
        let mut count = |s: &str| {
            tokens = tokens.saturating_add(bpe.encode_ordinary(s).len() as u64);
        };
        match super::cost::prompt_strings(prompt.body(), &mut count) {
            Some(messages) => tokens
                .saturating_add(messages.saturating_mul(PER_MESSAGE))
                .saturating_add(PRIMING),
            None => self.fallback.text_tokens(prompt),
        }
    }

    fn learn(&self, prompt: &Prompt, text_tokens: u64) {
        // Models counted exactly need nothing learned.
        if prompt.model().and_then(Tiktoken::encoding).is_none() {
            self.fallback.learn(prompt, text_tokens);
        }
    }
}
