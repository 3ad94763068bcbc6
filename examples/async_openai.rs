//! The semaforo layers around async-openai's client
//! (`cargo run --example async_openai --features semaforo-examples/async-openai`:
//! async-openai is large, so the other examples do not compile it).
//!
//! async-openai retries 429s and 5xx itself, with its own exponential backoff and
//! no budget; stacked under our retry, every failure would be retried twice over.
//! So its retries are switched off (`max_elapsed_time = 0`) and ours decide.
//!
//! What wrapping a high-level client costs: async-openai returns an `ApiError`
//! (type, code, message) but not the HTTP status or headers — so there is no
//! `Retry-After` / `x-ratelimit-*` for the pacer to learn from. The classifier
//! reads the error's type and code (`rate_limit_exceeded` → Throttled, with the
//! wait from "Please try again in 6s"; `insufficient_quota` → Permanent), and the
//! pacer reconciles with the response's `usage`. When you need the headers, use
//! the HTTP-level preset (`semaforo::llm::LlmStack`), as `llm_client` does.
//!
//! Runs 20 requests of 2,000 tokens against the in-process mock (30,000 TPM,
//! time ×10); `--base-url` / `OPENAI_API_KEY` for a real server.

#[path = "common/mock_provider.rs"]
mod mock_provider;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::{
    ChatCompletionRequestUserMessage, CreateChatCompletionRequest, CreateChatCompletionResponse,
};
use async_openai::Client;
use clap::Parser;
use mock_provider::{MockConfig, MockProvider, Stats};
use semaforo::backoff::{Backoff, Jitter};
use semaforo::breaker::Breaker;
use semaforo::bulkhead::Bulkhead;
use semaforo::classify::{classify_error, Class, LlmClassifier, Permanent};
use semaforo::pace::{Cost, Limit, Observed, Pace};
use semaforo::retry::Retry;
use semaforo::timeout::Timeout;
use semaforo::BoxError;
use std::time::{Duration, Instant};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

/// semaforo around async-openai.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// An OpenAI-compatible API base (e.g. https://api.openai.com/v1); without it
    /// an in-process mock is started. The key comes from OPENAI_API_KEY.
    #[arg(long)]
    base_url: Option<String>,
    /// Requests sent at once.
    #[arg(long, default_value_t = 20)]
    requests: usize,
    /// The tier's tokens per minute.
    #[arg(long, default_value_t = 30_000)]
    tpm: u64,
    /// How many times faster than real time the mock runs.
    #[arg(long, default_value_t = 10.0, value_parser = mock_provider::time_scale)]
    time_scale: f64,
}

/// async-openai's result, classified from the error's type and code.
fn classify(r: Result<&CreateChatCompletionResponse, &OpenAIError>) -> Class {
    match r {
        Ok(_) => Class::Success,
        Err(OpenAIError::ApiError(e)) => {
            let body = serde_json::json!({"error": {"message": e.message, "type": e.r#type, "code": e.code}});
            LlmClassifier::new().classify_error_body(body.to_string().as_bytes())
        }
        Err(OpenAIError::Reqwest(e)) => classify_error(e),
        Err(OpenAIError::StreamError(_)) => Class::Transient,
        Err(_) => Class::permanent(Permanent::InvalidRequest), // bad arguments, undecodable answers: retrying cannot help
    }
}

fn weigh(req: &CreateChatCompletionRequest) -> Cost {
    let prompt = serde_json::to_string(&req.messages).map_or(0, |s| s.len() as u64 / 4);
    let max = req.max_completion_tokens.unwrap_or(1_000);
    Cost::tokens(prompt + u64::from(max))
}

fn observe(res: &CreateChatCompletionResponse) -> Observed {
    Observed {
        usage: res
            .usage
            .as_ref()
            .map(|u| Cost::tokens(u64::from(u.total_tokens))),
        info: None,
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let scale = if args.base_url.is_some() {
        1.0
    } else {
        args.time_scale
    };
    let mock = match &args.base_url {
        Some(_) => None,
        None => Some(
            MockProvider::start(MockConfig {
                tokens_per_minute: args.tpm,
                time_scale: scale,
                ..MockConfig::default()
            })
            .await?,
        ),
    };
    let api_base = match (&args.base_url, &mock) {
        (Some(b), _) => b.clone(),
        (None, Some(m)) => format!("{}/v1", m.base_url()),
        (None, None) => unreachable!("a mock is started without --base-url"),
    };
    let key = std::env::var("OPENAI_API_KEY").unwrap_or_else(|_| "mock".into());
    // async-openai's own retries off: ours (with a budget) decide.
    let no_retries = backoff::ExponentialBackoff {
        max_elapsed_time: Some(Duration::ZERO),
        ..Default::default()
    };
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(api_base)
            .with_api_key(key),
    )
    .with_backoff(no_retries);
    let openai = service_fn(move |req: CreateChatCompletionRequest| {
        let client = client.clone();
        async move { client.chat().create(req).await }
    });

    let t = |secs: f64| Duration::from_secs_f64(secs / scale);
    let llm = ServiceBuilder::new()
        .layer(Bulkhead::builder(5).max_queue(1_000).build()?.layer())
        .layer(
            Retry::builder()
                .max_attempts(4)
                .backoff(
                    Backoff::exponential(t(1.0))
                        .cap(t(30.0))
                        .jitter(Jitter::Full)
                        .build()?,
                )
                .build()?
                .layer()
                .classify(classify_boxed),
        )
        .layer(
            Breaker::builder()
                .open_for(t(30.0))
                .build()?
                .layer()
                .classify(classify_boxed),
        )
        .layer(
            Pace::builder()
                .limit(Limit::tokens_per_minute((args.tpm as f64 * scale) as u64).burst(args.tpm))
                .build()?
                .layer()
                .weigh(weigh)
                .observe(observe)
                .classify(classify_boxed),
        )
        .layer(Timeout::builder().attempt(t(120.0)).build()?.layer())
        .service(openai);

    let t0 = Instant::now();
    let tasks: Vec<_> = (0..args.requests)
        .map(|i| {
            let mut llm = llm.clone();
            let req = CreateChatCompletionRequest {
                model: "gpt-4o-mini".into(),
                max_completion_tokens: Some(1_990),
                messages: vec![ChatCompletionRequestUserMessage::from(
                    format!("Plan de clase {i}: el ciclo del agua.").as_str(),
                )
                .into()],
                ..Default::default()
            };
            tokio::spawn(async move { llm.ready().await?.call(req).await })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for task in tasks {
        match task.await? {
            Ok(_) => ok += 1,
            Err(e) => {
                failed += 1;
                eprintln!("failed: {e}");
            }
        }
    }
    println!(
        "{ok}/{} succeeded, {failed} failed, in {:.1} s (simulated){}",
        args.requests,
        t0.elapsed().as_secs_f64() * scale,
        mock.as_ref()
            .map(|m| format!("; provider 429s: {}", Stats::get(&m.stats.throttled)))
            .unwrap_or_default()
    );
    if ok < args.requests {
        std::process::exit(1);
    }
    Ok(())
}

/// The same rules for the layers above the pacer, whose errors are boxed.
fn classify_boxed(r: Result<&CreateChatCompletionResponse, &BoxError>) -> Class {
    match r {
        Ok(_) => Class::Success,
        Err(e) => match e.downcast_ref::<OpenAIError>() {
            Some(api) => classify(Err(api)),
            None => classify_error(e.as_ref()),
        },
    }
}
