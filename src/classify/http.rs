//! Classification of `http::Response` by status and headers (feature `http`).

use super::headers::{retry_after_from_headers, throttle_wait_from_headers};
use super::{classify_error, AsErrorRef, Class, Classify};
use std::time::{Duration, SystemTime};

/// The class of an HTTP status, with the `retry_after` the headers gave.
///
/// 1xx–3xx → `Success`; 429 → `Throttled`; 503 and 529 → `Overloaded`;
/// 408, 500, 502, 504 and other 5xx → `Transient`; other 4xx → `Permanent`.
///
/// ```
/// use semaforo::classify::{status_class, Class};
/// assert_eq!(status_class(429, None), Class::Throttled { retry_after: None });
/// assert_eq!(status_class(529, None), Class::Overloaded { retry_after: None });
/// assert_eq!(status_class(404, None), Class::Permanent);
/// ```
pub fn status_class(status: u16, retry_after: Option<Duration>) -> Class {
    match status {
        100..=399 => Class::Success,
        429 => Class::Throttled { retry_after },
        503 | 529 => Class::Overloaded { retry_after },
        408 => Class::Transient,
        400..=499 => Class::Permanent,
        _ => Class::Transient,
    }
}

/// Classifies `http::Response<B>` by status and `Retry-After`/`retry-after-ms`
/// headers; errors by [`classify_error`].
///
/// ```
/// use semaforo::classify::{Class, Classify, HttpClassifier};
/// use std::time::Duration;
///
/// let res = http::Response::builder()
///     .status(429)
///     .header("retry-after", "7")
///     .body(())
///     .unwrap();
/// assert_eq!(
///     HttpClassifier.classify(Ok::<_, &std::io::Error>(&res)),
///     Class::Throttled { retry_after: Some(Duration::from_secs(7)) }
/// );
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpClassifier;

impl HttpClassifier {
    /// Classifies a status and its headers.
    pub fn classify_parts(&self, status: http::StatusCode, headers: &http::HeaderMap) -> Class {
        let code = status.as_u16();
        let retry_after = if code == 429 {
            throttle_wait_from_headers(headers, SystemTime::now())
        } else if matches!(code, 503 | 529) {
            retry_after_from_headers(headers, SystemTime::now())
        } else {
            None
        };
        status_class(code, retry_after)
    }
}

impl<B, Err: AsErrorRef> Classify<http::Response<B>, Err> for HttpClassifier {
    fn classify(&self, result: Result<&http::Response<B>, &Err>) -> Class {
        match result {
            Ok(res) => self.classify_parts(res.status(), res.headers()),
            Err(e) => classify_error(e.as_error_ref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(status: u16, headers: &[(&str, &str)]) -> http::Response<()> {
        let mut b = http::Response::builder().status(status);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn statuses() {
        let c = |s: u16| HttpClassifier.classify(Ok::<_, &std::io::Error>(&res(s, &[])));
        assert_eq!(c(200), Class::Success);
        assert_eq!(c(204), Class::Success);
        assert_eq!(c(429), Class::Throttled { retry_after: None });
        assert_eq!(c(503), Class::Overloaded { retry_after: None });
        assert_eq!(c(529), Class::Overloaded { retry_after: None });
        for s in [500, 502, 504, 408] {
            assert_eq!(c(s), Class::Transient, "{s}");
        }
        for s in [400, 401, 403, 404, 422] {
            assert_eq!(c(s), Class::Permanent, "{s}");
        }
    }

    #[test]
    fn retry_after_read_for_429_and_503() {
        let r = res(503, &[("retry-after", "120")]);
        assert_eq!(
            HttpClassifier.classify(Ok::<_, &std::io::Error>(&r)),
            Class::Overloaded {
                retry_after: Some(Duration::from_secs(120))
            }
        );
        let r = res(429, &[("retry-after-ms", "250"), ("retry-after", "1")]);
        assert_eq!(
            HttpClassifier.classify(Ok::<_, &std::io::Error>(&r)),
            Class::Throttled {
                retry_after: Some(Duration::from_millis(250))
            }
        );
    }

    #[test]
    fn errors_go_through_classify_error() {
        let e = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            HttpClassifier.classify(Err::<&http::Response<()>, _>(&e)),
            Class::Infrastructure
        );
    }
}
