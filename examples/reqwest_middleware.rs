//! The LLM preset inside a reqwest-middleware client: the code you already
//! have (`client.post(url).json(..).send()`) gains the bulkhead, the
//! RPM + TPM pacer, classified retries and the breaker, with one `.with(..)`.
//!
//! ```text
//! cargo run --example reqwest_middleware                                  # 30 calls to the in-process mock (time ×10)
//! cargo run --example reqwest_middleware -- --base-url https://api.openai.com/v1 --calls 3   # OPENAI_API_KEY
//! ```

#[path = "common/mock_provider.rs"]
mod mock_provider;

use clap::Parser;
use mock_provider::{MockConfig, MockProvider};
use reqwest_middleware::ClientBuilder;
use semaforo::llm::{LlmStack, Tier};
use semaforo::reqwest::SemaforoMiddleware;
use semaforo::BoxError;
use std::time::Instant;

/// An OpenAI call through reqwest-middleware with the LLM preset.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// An OpenAI-compatible server (`https://api.openai.com/v1`); without
    /// it, an in-process mock. The key comes from OPENAI_API_KEY.
    #[arg(long)]
    base_url: Option<String>,
    /// The model to ask.
    #[arg(long, default_value = "gpt-4o-mini")]
    model: String,
    /// Calls sent at once.
    #[arg(long, default_value_t = 30)]
    calls: usize,
    /// The mock's time compression.
    #[arg(long, default_value_t = 10.0, value_parser = mock_provider::time_scale)]
    time_scale: f64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let tier = Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    };
    // Without a server of yours: the mock, enforcing the same tier.
    let (_mock, base, scale) = match &args.base_url {
        Some(url) => (None, url.trim_end_matches('/').to_string(), 1.0),
        None => {
            let mock = MockProvider::start(MockConfig {
                time_scale: args.time_scale,
                ..MockConfig::default()
            })
            .await?;
            let base = format!("{}/v1", mock.base_url().trim_end_matches('/'));
            (Some(mock), base, args.time_scale)
        }
    };
    let stack = LlmStack::openai(tier).time_scale(scale).build()?;
    // The one line that matters: the preset as a middleware.
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(SemaforoMiddleware::whole(stack.layer()))
        .build();
    let key = std::env::var("OPENAI_API_KEY").unwrap_or_default();

    let t0 = Instant::now();
    let calls: Vec<_> = (1..=args.calls)
        .map(|i| {
            let body = serde_json::json!({
                "model": args.model,
                "max_tokens": 1_500,
                "messages": [{"role": "user", "content": format!("Plan de clase {i}: el ciclo del agua.")}],
            });
            let req = client
                .post(format!("{base}/chat/completions"))
                .bearer_auth(&key)
                .json(&body);
            tokio::spawn(async move {
                let res = req.send().await?;
                let status = res.status();
                let answer: serde_json::Value = res.json().await?;
                Ok::<_, reqwest_middleware::Error>((status, answer))
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for c in calls {
        match c.await? {
            Ok((status, answer)) if status.is_success() => {
                ok += 1;
                if ok == 1 {
                    let text = answer["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap_or("");
                    println!(
                        "first answer: {}…",
                        text.chars().take(60).collect::<String>()
                    );
                }
            }
            Ok((status, answer)) => {
                failed += 1;
                eprintln!("{status}: {answer}");
            }
            Err(e) => {
                failed += 1;
                match semaforo::reqwest::rejected(&e) {
                    Some(r) => eprintln!("refused by semaforo: {r}"),
                    None => eprintln!("failed: {e}"),
                }
            }
        }
    }
    println!(
        "{ok} answered, {failed} failed, in {:.1} s ({:.0} s simulated); {} retries",
        t0.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64() * scale,
        stack.retry().retries()
    );
    if failed > 0 {
        return Err(format!("{failed} calls failed").into());
    }
    Ok(())
}
