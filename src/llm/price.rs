//! What a call costs in money: a price per model, and the table the preset
//! prices each call with (its reservation and its real usage), for spend
//! limits ([`Limit::spend_per_day`](crate::pace::Limit::spend_per_day)).

use crate::hashing::HashMap;
use crate::pace::Cost;

/// A model's price, in micro-dollars per million tokens (1,000,000 µ$ =
/// $1.00): input not read from the cache, input read from the cache, output.
/// Anthropic's cache writes (`cache_creation_input_tokens`) count as input
/// (Anthropic bills them 1.25× the input price: a prompt written to the
/// cache costs up to a quarter more than priced here).
///
/// The spend of a call ([`of`](Self::of)) is `input × input price + cached
/// × cached price + output × output price`, divided by a million, **rounded
/// up to the next whole micro-dollar** (never under-charged), computed in
/// 128-bit integers (saturating) and saturated at `u64::MAX` micro-dollars (no overflow).
///
/// ```
/// use semaforo::llm::Price;
/// use semaforo::pace::Cost;
///
/// // gpt-4o-mini: $0.15 input, $0.075 cached input, $0.60 output per 1M tokens.
/// let price = Price::per_million_tokens(0.15, 0.075, 0.60);
/// // 1,000 input (800 of them from the cache) and 500 output tokens:
/// // 200 × 0.15 + 800 × 0.075 + 500 × 0.60 = 390 µ$ ($0.00039).
/// let cost = Cost::split(200, 500).with_cached_input(800);
/// assert_eq!(price.of(&cost), 390);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Price {
    /// Micro-dollars per million input tokens not read from the cache.
    pub input: u64,
    /// Micro-dollars per million input tokens read from the cache.
    pub cached_input: u64,
    /// Micro-dollars per million output tokens.
    pub output: u64,
}

impl Price {
    /// From dollars per million tokens, as providers publish them (each
    /// rounded to the nearest micro-dollar; negative or not finite: 0).
    pub fn per_million_tokens(input: f64, cached_input: f64, output: f64) -> Price {
        let micros = |dollars: f64| {
            if dollars.is_finite() && dollars > 0.0 {
                // `as` saturates at u64::MAX.
                (dollars * 1e6).round() as u64
            } else {
                0
            }
        };
        Price {
            input: micros(input),
            cached_input: micros(cached_input),
            output: micros(output),
        }
    }

    /// The spend of `cost`, in micro-dollars (rounded up, saturating).
    pub fn of(&self, cost: &Cost) -> u64 {
        // Each product of two u64 fits a u128; their sum may not.
        let sum = (u128::from(cost.input_tokens) * u128::from(self.input))
            .saturating_add(u128::from(cost.cached_input_tokens) * u128::from(self.cached_input))
            .saturating_add(u128::from(cost.output_tokens) * u128::from(self.output));
        u64::try_from(sum.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }
}

/// The prices of models, by name: the model of a request is looked up
/// exactly, then as a dated snapshot of a listed model (`gpt-4o-2024-08-06`
/// is priced as `gpt-4o`: see [`get`](Self::get)); a model not found is
/// priced by the fallback, if one is set, else costs nothing (spend limits
/// do not see it: set a fallback to count every model).
///
/// [`PriceTable::defaults`] lists a few common models; set the prices you
/// pay with [`price`](Self::price).
///
/// ```
/// use semaforo::llm::{Price, PriceTable};
///
/// let table = PriceTable::defaults().price("my-finetune", Price::per_million_tokens(3.0, 1.5, 12.0));
/// assert_eq!(table.get("gpt-4o-mini-2024-07-18"), table.get("gpt-4o-mini"));
/// assert!(table.get("my-finetune").is_some());
/// assert_eq!(table.get("unknown"), None);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceTable {
    prices: HashMap<String, Price>,
    fallback: Option<Price>,
}

/// When [`PriceTable::defaults`] was taken from the providers' pricing pages.
pub const DEFAULT_PRICES_DATE: &str = "2026-11-30";

impl PriceTable {
    /// An empty table.
    pub fn new() -> Self {
        PriceTable::default()
    }

    /// Standard (not batch, not priority) prices in dollars per million
    /// tokens — input, cached input, output — as the providers' pricing pages
    /// gave them on [`DEFAULT_PRICES_DATE`] (OpenAI "API pricing", Anthropic
    /// "Pricing" with cache reads at 0.1× input, Google "Gemini Developer API
    /// pricing" for prompts up to 200k tokens). Prices change: set yours.
    ///
    /// | model | input | cached input | output |
    /// |---|---|---|---|
    /// | `gpt-4o` | 2.50 | 1.25 | 10.00 |
    /// | `gpt-4o-2024-05-13` | 5.00 | 5.00 | 15.00 |
    /// | `gpt-4o-mini` | 0.15 | 0.075 | 0.60 |
    /// | `gpt-4.1` | 2.00 | 0.50 | 8.00 |
    /// | `gpt-4.1-mini` | 0.40 | 0.10 | 1.60 |
    /// | `claude-sonnet-4-5` | 3.00 | 0.30 | 15.00 |
    /// | `claude-haiku-4-5` | 1.00 | 0.10 | 5.00 |
    /// | `gemini-2.5-pro` | 1.25 | 0.125 | 10.00 |
    /// | `gemini-2.5-flash` | 0.30 | 0.03 | 2.50 |
    pub fn defaults() -> Self {
        let p = Price::per_million_tokens;
        PriceTable::new()
            .price("gpt-4o", p(2.50, 1.25, 10.00))
            // The first snapshot kept its own price (and no cache discount).
            .price("gpt-4o-2024-05-13", p(5.00, 5.00, 15.00))
            .price("gpt-4o-mini", p(0.15, 0.075, 0.60))
            .price("gpt-4.1", p(2.00, 0.50, 8.00))
            .price("gpt-4.1-mini", p(0.40, 0.10, 1.60))
            .price("claude-sonnet-4-5", p(3.00, 0.30, 15.00))
            .price("claude-haiku-4-5", p(1.00, 0.10, 5.00))
            .price("gemini-2.5-pro", p(1.25, 0.125, 10.00))
            .price("gemini-2.5-flash", p(0.30, 0.03, 2.50))
    }

    /// Sets the price of `model` (replacing one set before).
    pub fn price(mut self, model: impl Into<String>, price: Price) -> Self {
        self.prices.insert(model.into(), price);
        self
    }

    /// Prices models not in the table (default: none, they cost nothing).
    pub fn fallback(mut self, price: Price) -> Self {
        self.fallback = Some(price);
        self
    }

    /// The price of `model`: exact, else as a dated snapshot of a listed
    /// model (the name followed by `-YYYY-MM-DD` or `-YYYYMMDD`:
    /// `gpt-4o-2024-08-06`, `claude-3-5-sonnet-20241022`; a version such as
    /// `claude-opus-4-5` is another model), else the fallback. Gemini's
    /// `models/` prefix is ignored.
    pub fn get(&self, model: &str) -> Option<Price> {
        let model = model.strip_prefix("models/").unwrap_or(model);
        if let Some(p) = self.prices.get(model) {
            return Some(*p);
        }
        let snapshot = self
            .prices
            .iter()
            .filter(|(name, _)| {
                !name.is_empty()
                    && model
                        .strip_prefix(name.as_str())
                        .and_then(|rest| rest.strip_prefix('-'))
                        .is_some_and(is_date)
            })
            .max_by_key(|(name, _)| name.len())
            .map(|(_, p)| *p);
        snapshot.or(self.fallback)
    }

    /// The price of a request's model (`None`: no model), or the fallback.
    pub(crate) fn for_model(&self, model: Option<&str>) -> Option<Price> {
        match model {
            Some(m) => self.get(m),
            None => self.fallback,
        }
    }
}

/// `YYYY-MM-DD` or `YYYYMMDD`, a day of the calendar (`2024-13-45` and
/// `99999999` are not: such a suffix names another model).
fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    // Byte positions of the digits of the year, month and day.
    let at: [usize; 8] = match b.len() {
        8 => [0, 1, 2, 3, 4, 5, 6, 7],
        10 if b[4] == b'-' && b[7] == b'-' => [0, 1, 2, 3, 5, 6, 8, 9],
        _ => return false,
    };
    let mut n = [0u8; 8];
    for (digit, &i) in n.iter_mut().zip(&at) {
        match b[i] {
            c @ b'0'..=b'9' => *digit = c - b'0',
            _ => return false,
        }
    }
    let year = n[..4].iter().fold(0i16, |y, &d| y * 10 + i16::from(d));
    let month = (n[4] * 10 + n[5]) as i8;
    let day = (n[6] * 10 + n[7]) as i8;
    jiff::civil::Date::new(year, month, day).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_suffix_is_a_day_of_the_calendar() {
        for yes in ["2024-08-06", "20241022", "2024-02-29", "0001-01-01"] {
            assert!(is_date(yes), "{yes}");
        }
        for no in [
            "2024-13-45",
            "99999999",
            "2023-02-29",
            "20240230",
            "2024-1-061",
            "2024_08_06",
            "2024-08-0é",
            "202é0806",
            "",
            "2024-08-06x",
        ] {
            assert!(!is_date(no), "{no}");
        }
        let t = PriceTable::defaults();
        assert_eq!(t.get("gpt-4o-2024-08-06"), t.get("gpt-4o"));
        assert!(t.get("gpt-4o").is_some());
        assert_ne!(t.get("gpt-4o-2024-13-45"), t.get("gpt-4o"));
    }

    #[test]
    fn spend_rounds_up_and_saturates() {
        let p = Price::per_million_tokens(0.15, 0.0, 0.0);
        assert_eq!(p.of(&Cost::split(1, 0)), 1, "0.15 µ$ rounds up to 1");
        assert_eq!(p.of(&Cost::split(0, 0)), 0);
        let huge = Price {
            input: u64::MAX,
            cached_input: u64::MAX,
            output: u64::MAX,
        };
        let all = Cost::split(u64::MAX, u64::MAX).with_cached_input(u64::MAX);
        assert_eq!(huge.of(&all), u64::MAX);
        assert_eq!(
            Price::per_million_tokens(f64::NAN, -1.0, f64::INFINITY),
            Price::default()
        );
    }

    #[test]
    fn snapshots_take_the_longest_listed_name() {
        let t = PriceTable::defaults();
        assert_eq!(t.get("gpt-4o-2024-08-06"), t.get("gpt-4o"));
        assert_eq!(t.get("gpt-4o-mini-2024-07-18"), t.get("gpt-4o-mini"));
        assert_eq!(t.get("gpt-4o-audio-preview"), None);
        assert_ne!(t.get("gpt-4o-2024-05-13"), t.get("gpt-4o"));
        assert_eq!(t.get("models/gemini-2.5-pro"), t.get("gemini-2.5-pro"));
        let opus = PriceTable::new().price("claude-opus-4", Price::default());
        assert_eq!(opus.get("claude-opus-4-5"), None, "a version, not a date");
        assert!(opus.get("claude-opus-4-20250514").is_some());
        let f = Price::per_million_tokens(1.0, 1.0, 1.0);
        assert_eq!(t.clone().fallback(f).get("x"), Some(f));
        assert_eq!(t.for_model(None), None);
    }
}
