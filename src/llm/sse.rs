//! Server-sent events, parsed once, by the spec.
//!
//! [`SseParser`] follows the WHATWG HTML "Server-sent events" parsing rules
//! (§9.2.6, "Interpreting an event stream"): a leading UTF-8 BOM is dropped;
//! lines end at CRLF, LF or CR (also when the CR and the LF arrive in different
//! chunks); a line starting with `:` is a comment; a field is the text before
//! the first `:` of a line, its value what follows (one leading space removed);
//! `data` lines accumulate (joined by LF); a blank line dispatches the event;
//! an event not ended by a blank line when the stream ends is discarded.
//!
//! It is incremental and linear: every byte is examined once, a line is
//! copied at most once (only when it is split across chunks), and a line or an
//! event longer than the parser's cap is dropped (its bytes skipped, counted
//! in [`SseParser::dropped`]) instead of growing a buffer without limit.
//!
//! [`SseScan`] is the [`Tap`] of the streaming preset that reads the events
//! (on the one body wrapper, [`Tapped`], put there by [`SseWatch`]): it turns an
//! error event into an error of the body (after handing over the event's
//! bytes) and reports the last `usage` it saw.
//!
//! Why our own parser and not an SSE crate (`eventsource-stream`,
//! `sse-stream`): those consume the byte stream and yield owned events; the
//! preset must hand every byte to the caller unchanged and only look at the
//! events on the way, with no copy of a line that arrives whole and a cap on
//! what a hostile stream can make it buffer. That is a few hundred lines, tested
//! against the spec's examples and by proptest (`tests/sse.rs`).

use super::cost::Payload;
use super::prompt::Asked;
pub use crate::classify::StreamFailed;
use crate::classify::{BodyFailure, LlmClassifier};
use crate::error::BoxError;
use crate::guard::{Flow, StreamEnd, Tap, Tapped};
use crate::pace::UsageCell;
use bytes::Bytes;
use pin_project::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// The longest line (and event) an [`SseParser`] keeps by default: 1 MiB.
pub const DEFAULT_MAX_LINE: usize = 1 << 20;

/// One dispatched event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field (`"message"` when the event had none).
    pub event: &'a [u8],
    /// The `data:` lines, joined by `\n` (empty when `truncated`).
    pub data: &'a [u8],
    /// A line of the event was longer than the parser's cap: its data was
    /// dropped.
    pub truncated: bool,
}

/// An incremental SSE parser, by the WHATWG rules: a leading BOM dropped,
/// CRLF / LF / CR line ends (also split across chunks), `:` comments, `data`
/// lines joined by LF, a blank line dispatching, an unfinished event at the
/// end discarded; linear in the bytes fed, with lines and events capped.
///
/// ```
/// use semaforo::llm::SseParser;
///
/// let mut p = SseParser::new();
/// let mut seen = Vec::new();
/// for chunk in [&b"\xEF\xBB\xBFdata: hel"[..], b"lo\r", b"\n\r\n: comment\nevent: error\ndata: {}\n\n"] {
///     p.feed(chunk, |e| seen.push((e.event.to_vec(), e.data.to_vec())));
/// }
/// assert_eq!(seen, vec![
///     (b"message".to_vec(), b"hello".to_vec()),
///     (b"error".to_vec(), b"{}".to_vec()),
/// ]);
/// ```
#[derive(Debug, Clone)]
pub struct SseParser {
    /// A line split across chunks.
    line: Vec<u8>,
    /// The data of the event being read (each line followed by `\n`).
    data: Vec<u8>,
    event: Vec<u8>,
    /// The previous chunk ended in CR: a LF starting this one is its pair.
    after_cr: bool,
    /// The current line (or event) went over the cap: skip it.
    skipping_line: bool,
    skipping_event: bool,
    /// How much of a BOM has been seen at the start (3 when decided).
    bom: u8,
    max_line: usize,
    scanned: u64,
    dropped: u64,
}

impl Default for SseParser {
    fn default() -> Self {
        SseParser::new()
    }
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl SseParser {
    /// A parser keeping lines and events up to [`DEFAULT_MAX_LINE`] bytes.
    pub fn new() -> Self {
        SseParser::with_max_line(DEFAULT_MAX_LINE)
    }

    /// A parser keeping lines and events up to `max` bytes (at least 1).
    pub fn with_max_line(max: usize) -> Self {
        SseParser {
            line: Vec::new(),
            data: Vec::new(),
            event: Vec::new(),
            after_cr: false,
            skipping_line: false,
            skipping_event: false,
            bom: 0,
            max_line: max.max(1),
            scanned: 0,
            dropped: 0,
        }
    }

    /// Bytes examined so far (never more than the bytes fed).
    pub fn scanned(&self) -> u64 {
        self.scanned
    }

    /// Lines or events dropped because they were longer than the cap.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Feeds the next chunk; `on_event` is called for every event it completes.
    pub fn feed(&mut self, mut chunk: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        self.scanned = self.scanned.saturating_add(chunk.len() as u64);
        // A BOM at the very start of the stream, possibly split across chunks.
        while self.bom < 3 {
            let Some((&b, rest)) = chunk.split_first() else {
                return;
            };
            if b == BOM[self.bom as usize] {
                self.bom += 1;
                chunk = rest;
            } else {
                // Not a BOM: what was taken for its start is line content.
                let taken = self.bom as usize;
                self.bom = 3;
                if taken > 0 {
                    self.push_partial(&BOM[..taken]);
                }
            }
        }
        if self.after_cr && !chunk.is_empty() {
            // (An empty chunk between the CR and its LF changes nothing.)
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while !chunk.is_empty() {
            match chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.push_partial(chunk);
                    return;
                }
                Some(at) => {
                    let (line, rest) = chunk.split_at(at);
                    let ending = rest[0];
                    let mut rest = &rest[1..];
                    if ending == b'\r' {
                        match rest.first() {
                            Some(b'\n') => rest = &rest[1..],
                            Some(_) => {}
                            None => self.after_cr = true,
                        }
                    }
                    if self.line.is_empty() && !self.skipping_line {
                        self.line_done(line, &mut on_event);
                    } else {
                        self.push_partial(line);
                        let whole = std::mem::take(&mut self.line);
                        let skipping = std::mem::replace(&mut self.skipping_line, false);
                        if !skipping {
                            self.line_done(&whole, &mut on_event);
                        }
                        // Keep the allocation for the next split line.
                        self.line = whole;
                        self.line.clear();
                    }
                    chunk = rest;
                }
            }
        }
    }

    /// Part of a line whose end has not arrived.
    fn push_partial(&mut self, part: &[u8]) {
        if self.skipping_line {
            return;
        }
        if self.line.len().saturating_add(part.len()) > self.max_line {
            self.line.clear();
            self.skipping_line = true;
            // The event the line belongs to is incomplete: drop it whole.
            self.skipping_event = true;
            self.dropped += 1;
            return;
        }
        self.line.extend_from_slice(part);
    }

    fn line_done(&mut self, line: &[u8], on_event: &mut impl FnMut(SseEvent<'_>)) {
        if line.len() > self.max_line {
            self.skipping_event = true;
            self.dropped += 1;
            return;
        }
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.skipping_event {
                    return;
                }
                // The joined data is what is kept: its lines plus the LFs between.
                if self.data.len().saturating_add(value.len()) > self.max_line {
                    self.data.clear();
                    self.skipping_event = true;
                    self.dropped += 1;
                    return;
                }
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            // `id`, `retry` and unknown fields: nothing the layers need.
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(SseEvent<'_>)) {
        let skipped = std::mem::replace(&mut self.skipping_event, false);
        let event = if self.event.is_empty() {
            &b"message"[..]
        } else {
            &self.event[..]
        };
        if skipped {
            // Over the cap: its data is gone, but that it happened (and its
            // type: an `error` still is one) is told.
            on_event(SseEvent {
                event,
                data: b"",
                truncated: true,
            });
        } else if !self.data.is_empty() {
            let data = &self.data[..self.data.len() - 1];
            on_event(SseEvent {
                event,
                data,
                truncated: false,
            });
        }
        self.data.clear();
        self.event.clear();
    }
}

/// How much of an error event's data [`StreamFailed`] keeps.
const KEPT_ERROR_DATA: usize = 4 * 1024;

/// What the watch found in one event.
fn inspect(ev: SseEvent<'_>, usage: &mut Payload<'static>) -> Option<StreamFailed> {
    let data = ev.data.trim_ascii_start();
    let payload = if data.first() == Some(&b'{') {
        serde_json::from_slice::<Payload<'_>>(data).ok()
    } else {
        None
    };
    if let Some(p) = &payload {
        usage.absorb(p);
    }
    // `error` (OpenAI, Anthropic), `response.failed` (OpenAI's Responses API).
    let failed =
        ev.event == b"error" || ev.event == b"response.failed" || payload.is_some_and(|p| p.error);
    if ev.truncated && !failed {
        return None;
    }
    failed.then(|| {
        let kept = &ev.data[..ev.data.len().min(KEPT_ERROR_DATA)];
        StreamFailed {
            class: LlmClassifier::new().classify_error_body(ev.data),
            data: String::from_utf8_lossy(kept).into_owned(),
        }
    })
}

/// The [`Tap`] of [`SseWatch`] (`Tapped<B, SseScan>`): the body's frames pass
/// unchanged, read by one [`SseParser`]; an error event ends the body with a
/// [`StreamFailed`] error after the frame that carried it; the last `usage`
/// seen goes to the response's [`UsageCell`] (for the pacer's reconciliation).
pub struct SseScan {
    parser: SseParser,
    usage: UsageCell,
    /// Where the failure found is left for the breaker.
    failure: BodyFailure,
    /// The usage reported so far: OpenAI's and Gemini's totals, Anthropic's
    /// input (`message_start`) and output (the last `message_delta`).
    seen: Payload<'static>,
    failed: Option<StreamFailed>,
    /// The preset's prompt, to teach its estimator the billed input.
    asked: Option<Asked>,
}

impl std::fmt::Debug for SseScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseScan")
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<E: Into<BoxError>> Tap<http_body::Frame<Bytes>, E> for SseScan {
    type Error = BoxError;

    fn item(&mut self, frame: &http_body::Frame<Bytes>) -> Flow {
        let Some(data) = frame.data_ref() else {
            return Flow::Continue;
        };
        let mut failed = None;
        let seen = &mut self.seen;
        self.parser.feed(data, |ev| {
            if failed.is_none() {
                failed = inspect(ev, seen);
            }
        });
        if let Some(c) = self.seen.cost() {
            // Priced at the model's price, for spend limits.
            self.usage
                .set(self.asked.as_ref().map_or(c, |a| a.priced(c)));
        }
        match failed {
            Some(f) => {
                self.failure.set(f.class);
                self.failed = Some(f);
                Flow::End
            }
            None => Flow::Continue,
        }
    }

    #[inline]
    fn error(&mut self, error: E) -> BoxError {
        error.into()
    }

    fn then(&mut self) -> Option<Result<http_body::Frame<Bytes>, BoxError>> {
        self.failed.take().map(|f| Err(f.into()))
    }

    /// A stream that ended whole (no failure) has its final usage: the
    /// prompt's billed input teaches the estimator.
    fn end(self, end: StreamEnd) {
        if end != StreamEnd::Completed || self.failed.is_some() {
            return;
        }
        // A total alone does not say how much of it was the prompt.
        if let (Some(asked), Some(cost), Some(_)) = (&self.asked, self.seen.cost(), self.seen.input)
        {
            asked.learn(&cost);
        }
    }
}

/// A tower layer adapter that taps every response body with an [`SseScan`]
/// and puts a [`BodyFailure`] and its [`UsageCell`] in the response's extensions.
#[derive(Debug, Clone)]
pub struct SseWatch<S> {
    inner: S,
}

impl<S> SseWatch<S> {
    /// Watches the bodies of `inner`'s answers.
    pub fn new(inner: S) -> Self {
        SseWatch { inner }
    }
}

impl<S, Req, B> tower_service::Service<Req> for SseWatch<S>
where
    S: tower_service::Service<Req, Response = http::Response<B>>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<Tapped<B, SseScan>>;
    type Error = S::Error;
    type Future = WatchFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        WatchFuture {
            fut: self.inner.call(req),
        }
    }
}

/// The future of [`SseWatch`].
#[pin_project]
#[derive(Debug)]
pub struct WatchFuture<F> {
    #[pin]
    fut: F,
}

impl<F, B, E> Future for WatchFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<http::Response<Tapped<B, SseScan>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut res = ready!(self.project().fut.poll(cx))?;
        let usage = UsageCell::new();
        let failure = BodyFailure::new();
        res.extensions_mut().insert(usage.clone());
        res.extensions_mut().insert(failure.clone());
        let asked = res.extensions().get::<Asked>().cloned();
        Poll::Ready(Ok(res.map(|inner| {
            Tapped::body(
                inner,
                SseScan {
                    parser: SseParser::new(),
                    usage,
                    failure,
                    seen: Payload::default(),
                    failed: None,
                    asked,
                },
            )
        })))
    }
}

crate::inner_access!([S] SseWatch<S>);

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<(String, String)> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, |e| {
                out.push((
                    String::from_utf8_lossy(e.event).into_owned(),
                    String::from_utf8_lossy(e.data).into_owned(),
                ))
            });
        }
        out
    }

    #[test]
    fn spec_examples() {
        // The spec's own examples (WHATWG HTML §9.2.6).
        assert_eq!(
            events(&[b"data: YHOO\ndata: +2\ndata: 10\n\n"]),
            vec![("message".into(), "YHOO\n+2\n10".into())]
        );
        assert_eq!(
            events(&[b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n"]),
            vec![
                ("message".into(), "first event".into()),
                ("message".into(), "second event".into()),
            ],
            "the third event has no blank line: discarded"
        );
        assert_eq!(
            events(&[b"data\n\ndata\ndata\n\ndata:"]),
            vec![
                ("message".into(), "".into()),
                ("message".into(), "\n".into())
            ]
        );
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        assert_eq!(
            events(&[b"data: a\r", b"", b"\n\r", b"\ndata: b\r\r"]),
            vec![
                ("message".into(), "a".into()),
                ("message".into(), "b".into())
            ]
        );
    }

    #[test]
    fn an_event_with_a_line_over_the_cap_is_dropped_whole_and_one_at_the_cap_kept() {
        let mut p = SseParser::with_max_line(32);
        let mut seen = Vec::new();
        let long = format!("data: {}\n", "x".repeat(100));
        for chunk in [
            "event: error\ndata: {\"a\":\n",
            long.as_str(),
            "data: 1}\n\n",
        ] {
            p.feed(chunk.as_bytes(), |e| {
                seen.push((e.event.to_vec(), e.data.to_vec(), e.truncated))
            });
        }
        assert_eq!(seen, vec![(b"error".to_vec(), Vec::new(), true)]);
        // 16 bytes of joined data with a cap of 16: kept.
        let mut p = SseParser::with_max_line(16);
        let mut seen = Vec::new();
        p.feed(b"data:aaaaaaa\ndata:bbbbbbbb\n\n", |e| {
            seen.push(e.data.to_vec())
        });
        assert_eq!(seen, vec![b"aaaaaaa\nbbbbbbbb".to_vec()]);
        assert_eq!(p.dropped(), 0);
    }

    #[test]
    fn responses_api_failures_are_failures() {
        let mut usage = Payload::default();
        let ev = SseEvent {
            event: b"response.failed",
            data: br#"{"type":"response.failed","response":{"status":"failed","error":{"code":"server_error","message":"boom"}}}"#,
            truncated: false,
        };
        assert!(inspect(ev, &mut usage).is_some());
        let ev = SseEvent {
            event: b"response.output_text.delta",
            data: br#"{"type":"response.output_text.delta","delta":"error"}"#,
            truncated: false,
        };
        assert!(inspect(ev, &mut usage).is_none());
    }

    #[test]
    fn long_lines_are_dropped_not_kept() {
        let mut p = SseParser::with_max_line(16);
        let mut seen = Vec::new();
        let long = vec![b'x'; 1000];
        p.feed(b"data: ", |_| ());
        for _ in 0..1000 {
            p.feed(&long, |_| ());
        }
        p.feed(b"\n\ndata: ok\n\n", |e| {
            seen.push((e.truncated, e.data.to_vec()))
        });
        assert_eq!(seen, vec![(true, Vec::new()), (false, b"ok".to_vec())]);
        assert_eq!(p.dropped(), 1);
        assert!(p.line.capacity() <= 16 * 2);
    }
}
