#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]

pub mod backoff;
pub mod breaker;
pub mod bulkhead;
pub mod classify;
mod error;
pub mod eta;
pub mod guard;
pub mod health;
#[cfg(feature = "llm")]
pub mod llm;
pub mod observe;
pub mod pace;
pub mod quota;
#[cfg(feature = "redis")]
pub mod redis;
pub mod retry;
pub mod shutdown;
mod striped;
mod time;
pub mod timeout;

pub use crate::error::{BoxError, ConfigError, RateLimitPolicy, RejectKind, Rejected};
