//! Provider profiles: the limits of one account, shaped the way its provider
//! counts them.

use super::Tier;
use crate::pace::Limit;
use std::time::Duration;

/// How one provider account counts, for the pacer: its limits (each a
/// [`Limit`]: unit, window, burst) and the output a request that sets no
/// `max_tokens` reserves. [`LlmStack::with_profile`](super::LlmStack::with_profile)
/// builds the preset from one.
///
/// | profile | limits | source |
/// |---|---|---|
/// | [`openai`](Self::openai) | RPM; TPM (every token, cached input included), bursts of a whole minute | OpenAI "Rate limits" guide |
/// | [`azure_openai`](Self::azure_openai) | TPM and RPM = 6 per 1,000 TPM, each a bucket of 1/6 of the minute's limit refilling at the per-minute rate | Azure OpenAI "Quota management": "RPM … 6 RPM per 1,000 TPM"; quota "evaluated over small periods of time (1 or 10 seconds)" |
/// | [`anthropic`](Self::anthropic) | RPM, ITPM (input not read from the cache), OTPM; token buckets refilled continuously up to the limit | Anthropic "Rate limits": "cache read tokens no longer count towards ITPM" (current models), "OTPM … estimated based on `max_tokens`" |
/// | [`gemini`](Self::gemini) | RPM; TPM of input tokens; RPD, reset at midnight Pacific time | Gemini API "Rate limits": "Tokens per minute (input)", "RPD quotas reset at midnight Pacific time" |
///
/// Token limits plan with 5 % [headroom](Limit::headroom) on their burst (a
/// provider counts a request when it arrives, later than we reserved it, and
/// the first requests of a burst arrive latest); the long-run rate stays the
/// provider's, and one call may still cost the whole burst.
///
/// ```
/// use semaforo::llm::{LlmStack, Profile};
/// use semaforo::pace::Limit;
///
/// // Anthropic: 50 RPM, 30,000 input and 8,000 output tokens per minute,
/// // and an org-wide 60,000 tokens a minute shared with other services.
/// let profile = Profile::anthropic(50, 30_000, 8_000).limit(Limit::tokens_per_minute(60_000));
/// let stack = LlmStack::with_profile(profile).name("claude").build()?;
/// assert_eq!(stack.pace().overflow().snapshot().dims.len(), 4);
/// # Ok::<(), semaforo::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    provider: &'static str,
    limits: Vec<Limit>,
    max_output: u64,
}

/// Headroom kept on token bursts, in percent ([`Limit::headroom`]).
const TOKEN_HEADROOM: u8 = 5;

impl Profile {
    /// An OpenAI account on `tier`: requests and tokens per minute (output
    /// reserved at `max_tokens`, as OpenAI estimates a request), bursts of a
    /// whole minute. A request without `max_tokens` reserves 16,384 output
    /// tokens (the largest output of `gpt-4o` and `gpt-4o-mini`, OpenAI's
    /// model pages, 2026-11); set your model's with [`max_output`](Self::max_output).
    pub fn openai(tier: Tier) -> Profile {
        Profile {
            provider: "openai",
            limits: vec![
                Limit::requests_per_minute(tier.requests_per_minute),
                Limit::tokens_per_minute(tier.tokens_per_minute).headroom(TOKEN_HEADROOM),
            ],
            max_output: 16_384,
        }
    }

    /// An Azure OpenAI deployment with `tokens_per_minute` of quota: its
    /// requests per minute are 6 per 1,000 TPM (at least 1), and Azure
    /// evaluates both over 10 s windows, so each is paced as a bucket of a
    /// sixth of the per-minute limit refilling at the per-minute rate — a
    /// burst that fits the minute but not those 10 s would earn 429s.
    pub fn azure_openai(tokens_per_minute: u64) -> Profile {
        let rpm = (tokens_per_minute / 1_000).saturating_mul(6).max(1);
        Profile {
            provider: "azure-openai",
            limits: vec![
                Limit::requests_per_minute(rpm).burst((rpm / 6).max(1)),
                Limit::tokens_per_minute(tokens_per_minute)
                    .burst((tokens_per_minute / 6).max(1))
                    .headroom(TOKEN_HEADROOM),
            ],
            max_output: 16_384,
        }
    }

    /// An Anthropic account: `rpm` requests, `itpm` input tokens (not read
    /// from the prompt cache) and `otpm` output tokens per minute. Anthropic
    /// requires `max_tokens` on every request; one without it reserves 8,192
    /// (capped by the preset: see [`max_output`](Self::max_output)). A
    /// request whose `max_tokens` is above the OTPM can never be paid (as
    /// Anthropic counts it): it is refused at once, `BudgetExceeded` without
    /// `retry_after` (HTTP 413, `Permanent(RequestTooLarge)`).
    pub fn anthropic(rpm: u64, itpm: u64, otpm: u64) -> Profile {
        Profile {
            provider: "anthropic",
            limits: vec![
                Limit::requests_per_minute(rpm),
                Limit::input_tokens_per_minute(itpm).headroom(TOKEN_HEADROOM),
                Limit::output_tokens_per_minute(otpm).headroom(TOKEN_HEADROOM),
            ],
            max_output: 8_192,
        }
    }

    /// A Gemini API model of a project: `rpm` requests and `tpm` input tokens
    /// (cached or not) per minute, and `rpd` requests per day, reset at
    /// midnight Pacific time (Gemini API "Rate limits": "Tokens per minute
    /// (input)", "Requests per day (RPD) quotas reset at midnight Pacific
    /// time"; limits are per project and per model). The Gemini API sends no
    /// rate-limit headers: the pacer learns from its 429s (`RetryInfo`) only.
    /// A request without `maxOutputTokens` reserves 65,536 output tokens
    /// (Gemini 2.5's largest output), for spend limits: the TPM counts input.
    pub fn gemini(rpm: u64, tpm: u64, rpd: u64) -> Profile {
        Profile {
            provider: "gemini",
            limits: vec![
                Limit::requests_per_minute(rpm),
                Limit::new(
                    crate::pace::Unit::PromptTokens,
                    tpm,
                    Duration::from_secs(60),
                )
                .headroom(TOKEN_HEADROOM),
                Limit::requests_per_day(rpd).resets_daily("America/Los_Angeles"),
            ],
            max_output: 65_536,
        }
    }

    /// Adds a limit every call must also fit (e.g. an org-wide TPM, or a
    /// daily cap).
    pub fn limit(mut self, limit: Limit) -> Profile {
        self.limits.push(limit);
        self
    }

    /// The output tokens a request without `max_tokens` reserves (your
    /// model's largest output). The preset caps it, for all of a request's `n`
    /// choices together, at half the smallest planned burst (headroom taken
    /// off: [`DimSnapshot::capacity`](crate::pace::DimSnapshot::capacity)) of
    /// the pacer's limits that count output, so a prompt of up to the other
    /// half still fits: 3,800 on an 8,000 OTPM Anthropic account.
    pub fn max_output(mut self, tokens: u64) -> Profile {
        self.max_output = tokens;
        self
    }

    /// `"openai"`, `"azure-openai"`, `"anthropic"` or `"gemini"`: the
    /// preset's default name.
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    /// The limits, in order.
    pub fn limits(&self) -> &[Limit] {
        &self.limits
    }

    /// The output reserved for a request without `max_tokens`.
    pub fn unset_max_output(&self) -> u64 {
        self.max_output
    }
}

/// `limits` with time running `scale` times faster (a mock provider whose
/// minute lasts 6 s: 10): `scale` times the rate over the same window when
/// that is a whole count, so a limit keeps its name (per minute, per day);
/// else the same count over a window `scale` times shorter. Bursts and
/// headroom are counts: unchanged.
pub(super) fn scale_limits(limits: &[Limit], scale: f64) -> Vec<Limit> {
    limits
        .iter()
        .map(|l| {
            let mut scaled = l.clone();
            // A calendar window follows the wall clock: not scaled.
            if l.resets.is_some() {
                return scaled;
            }
            let exact = l.rate() as f64 * scale;
            if exact >= 1.0 && exact.fract() == 0.0 && exact < u64::MAX as f64 {
                scaled.n = exact as u64;
            } else {
                // A rate that is not a whole count: the same count over a
                // window `scale` times shorter (exact).
                let per = crate::time::secs_f64(l.per().as_secs_f64() / scale);
                scaled.per = per.max(Duration::from_nanos(1));
            }
            // The burst is a count of units: time running faster does not
            // change it.
            scaled.burst = Some(l.capacity());
            scaled.max_wait = l
                .max_wait
                .map(|d| crate::time::secs_f64(d.as_secs_f64() / scale));
            scaled
        })
        .collect()
}
