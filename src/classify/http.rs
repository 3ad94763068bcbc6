//! Classification of `http::Response` by status and headers (feature `http`).

use super::headers::{retry_after_from_headers, throttle_wait_from_headers};
use super::{classify_error, AsErrorRef, Class, Classify, Permanent};
use std::time::{Duration, SystemTime};

/// The class of an HTTP status, with the `retry_after` the headers gave.
///
/// 1xx–3xx → `Success`; 429 → `Throttled`; 503 and 529 → `Overloaded`;
/// 408, 500, 502, 504 and other 5xx → `Transient`; other 4xx → `Permanent`, with
/// the reason the status names (400 and 422 `InvalidRequest`, 401
/// `Authentication`, 403 `PermissionDenied`, 404 `NotFound`, 413
/// `RequestTooLarge`, the rest `Other`).
///
/// ```
/// use semaforo::classify::{status_class, Class, Permanent};
/// assert_eq!(status_class(429, None), Class::Throttled { retry_after: None });
/// assert_eq!(status_class(529, None), Class::Overloaded { retry_after: None });
/// assert_eq!(status_class(404, None), Class::Permanent { reason: Permanent::NotFound });
/// ```
pub fn status_class(status: u16, retry_after: Option<Duration>) -> Class {
    match status {
        100..=399 => Class::Success,
        429 => Class::Throttled { retry_after },
        503 | 529 => Class::Overloaded { retry_after },
        408 => Class::Transient,
        400 | 422 => Class::permanent(Permanent::InvalidRequest),
        401 => Class::permanent(Permanent::Authentication),
        403 => Class::permanent(Permanent::PermissionDenied),
        404 => Class::permanent(Permanent::NotFound),
        413 => Class::permanent(Permanent::RequestTooLarge),
        400..=499 => Class::permanent(Permanent::Other),
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
            Ok(res) => Classified::read::<Self, _>(res)
                .unwrap_or_else(|| self.classify_parts(res.status(), res.headers())),
            Err(e) => classify_error(e.as_error_ref()),
        }
    }

    fn classify_and_carry(&self, result: Result<&mut http::Response<B>, &Err>) -> Class {
        match result {
            Ok(res) => Classified::carry::<Self, _>(res, false, |res| {
                self.classify_parts(res.status(), res.headers())
            }),
            Err(e) => classify_error(e.as_error_ref()),
        }
    }
}

/// The class the innermost classifying layer gave a failed `http::Response`,
/// carried outward in its extensions so no layer classifies it again (see
/// [`Classify`](super::Classify#classified-once)).
///
/// Recorded by the shipped HTTP classifiers for every class but `Success`
/// ([`LlmClassifier`](super::LlmClassifier) records a `Success` too when the
/// response already carries extensions: it scans the body to know it), and
/// read back only by a classifier of the
/// same type and for the same status. An outer layer with a different
/// classifier classifies on its own (and records its class in place of the
/// inner one); a layer in between that rewrites the status makes the record
/// stale (it is ignored), and one that rewrites a body under the same status
/// should remove it
/// (`res.extensions_mut().remove::<Classified>()`). Read it in your own code
/// with [`Classified::of`].
///
/// ```
/// use semaforo::classify::{Class, Classified, Classify, HttpClassifier};
///
/// let mut res = http::Response::builder().status(503).body(()).unwrap();
/// let class = HttpClassifier.classify_and_carry(Ok::<_, &std::io::Error>(&mut res));
/// assert_eq!(class, Class::Overloaded { retry_after: None });
/// assert_eq!(Classified::of(&res), Some(class));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    class: Class,
    by: std::any::TypeId,
    /// The status it was given for: a layer in between that rewrites the
    /// status (a fallback answering 200) makes the record stale.
    status: http::StatusCode,
}

impl Classified {
    /// The class recorded on `res`, by whichever classifier recorded it
    /// (`None` when the status changed since).
    pub fn of<B>(res: &http::Response<B>) -> Option<Class> {
        res.extensions()
            .get::<Classified>()
            .filter(|c| c.status == res.status())
            .map(|c| c.class)
    }

    /// The class recorded on `res` by a classifier of type `C`.
    #[inline]
    pub(crate) fn read<C: 'static, B>(res: &http::Response<B>) -> Option<Class> {
        res.extensions()
            .get::<Classified>()
            .filter(|c| c.by == std::any::TypeId::of::<C>() && c.status == res.status())
            .map(|c| c.class)
    }

    /// Records `class` as `C`'s for `res` (in place of any record).
    #[cfg_attr(not(feature = "llm"), allow(dead_code))]
    pub(crate) fn record<C: 'static, B>(res: &mut http::Response<B>, class: Class) {
        let status = res.status();
        res.extensions_mut().insert(Classified {
            class,
            by: std::any::TypeId::of::<C>(),
            status,
        });
    }

    /// The class recorded by `C`, or `classify(res)` recorded for the layers
    /// outside when it is a failure — or a success too, with
    /// `record_success` (a classifier whose success costs more than a status
    /// check: [`LlmClassifier`](super::LlmClassifier) scans the body) when
    /// the response already carries extensions (no map is allocated for it).
    #[inline]
    pub(crate) fn carry<C: 'static, B>(
        res: &mut http::Response<B>,
        record_success: bool,
        classify: impl FnOnce(&http::Response<B>) -> Class,
    ) -> Class {
        if let Some(class) = Self::read::<C, B>(res) {
            return class;
        }
        let class = classify(res);
        if !class.is_success() || (record_success && !res.extensions().is_empty()) {
            let status = res.status();
            res.extensions_mut().insert(Classified {
                class,
                by: std::any::TypeId::of::<C>(),
                status,
            });
        }
        class
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
        for (s, reason) in [
            (400, Permanent::InvalidRequest),
            (401, Permanent::Authentication),
            (403, Permanent::PermissionDenied),
            (404, Permanent::NotFound),
            (413, Permanent::RequestTooLarge),
            (422, Permanent::InvalidRequest),
            (418, Permanent::Other),
        ] {
            assert_eq!(c(s), Class::permanent(reason), "{s}");
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
