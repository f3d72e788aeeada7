//! The access-log line: one per request, at its end, on stderr with the rest
//! of the logs.
//!
//! It is an event of target `relaygate::access` at INFO, so `RUST_LOG`
//! filters it like any other (`RUST_LOG=info,relaygate::access=off` turns it
//! off), and it looks like the lines around it: the same JSON object shape
//! under `--log-format json`, the same `key=value` line otherwise (without
//! colours). It is written here rather than through `tracing::info!` because
//! the fmt subscriber formats every field through `Debug` and `fmt::Write`:
//! that was 15 % of the instructions per request (docs/performance.md).
//! This writer builds the line in a reused buffer and writes it with one
//! `write` call, as the subscriber does.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, SystemTime};

use crate::telemetry::logging::{self, LogFormat};

/// What one access-log line says.
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    pub key: &'a str,
    pub model: &'a str,
    pub upstream: &'a str,
    pub status: u16,
    pub outcome: &'a str,
    pub error: &'a str,
    pub stream: bool,
    pub attempts: u32,
    pub latency: Duration,
    pub ttft: Option<Duration>,
    /// Prompt and completion tokens, when known.
    pub tokens: Option<(u64, u64)>,
    pub usage_estimated: bool,
}

/// Writes the line if the access log is enabled.
pub fn write(line: &AccessLine<'_>) {
    if !tracing::enabled!(target: "relaygate::access", tracing::Level::INFO) {
        return;
    }
    let Some(format) = logging::format() else {
        // A subscriber that `logging::init` did not install (an embedding
        // program's): give it an ordinary event.
        line.as_event();
        return;
    };
    thread_local! {
        static BUF: RefCell<String> = RefCell::new(String::with_capacity(512));
    }
    BUF.with_borrow_mut(|buf| {
        buf.clear();
        match format {
            LogFormat::Json => line.json(buf, SystemTime::now()),
            LogFormat::Pretty => line.text(buf, SystemTime::now()),
        }
        // Like the fmt subscriber: one write per line, errors ignored.
        let _ = std::io::stderr().lock().write_all(buf.as_bytes());
    });
}

impl AccessLine<'_> {
    fn as_event(&self) {
        tracing::info!(
            target: "relaygate::access",
            request_id = self.request_id,
            key = self.key,
            model = self.model,
            upstream = self.upstream,
            status = self.status,
            outcome = self.outcome,
            error = self.error,
            stream = self.stream,
            attempts = self.attempts,
            latency_ms = millis(self.latency),
            ttft_ms = self.ttft.map(millis),
            prompt_tokens = self.tokens.map(|t| t.0),
            completion_tokens = self.tokens.map(|t| t.1),
            usage_estimated = self.usage_estimated,
            "request"
        );
    }

    /// The shape of the fmt subscriber's JSON with `flatten_event(true)`.
    fn json(&self, buf: &mut String, now: SystemTime) {
        buf.push_str(r#"{"timestamp":""#);
        push_timestamp(buf, now);
        buf.push_str(r#"","level":"INFO","message":"request","request_id":"#);
        json_str(buf, self.request_id);
        for (name, value) in [
            (r#","key":"#, self.key),
            (r#","model":"#, self.model),
            (r#","upstream":"#, self.upstream),
        ] {
            buf.push_str(name);
            json_str(buf, value);
        }
        buf.push_str(r#","status":"#);
        push_int(buf, self.status);
        buf.push_str(r#","outcome":"#);
        json_str(buf, self.outcome);
        buf.push_str(r#","error":"#);
        json_str(buf, self.error);
        buf.push_str(if self.stream {
            r#","stream":true"#
        } else {
            r#","stream":false"#
        });
        buf.push_str(r#","attempts":"#);
        push_int(buf, self.attempts);
        buf.push_str(r#","latency_ms":"#);
        push_millis(buf, self.latency);
        if let Some(ttft) = self.ttft {
            buf.push_str(r#","ttft_ms":"#);
            push_millis(buf, ttft);
        }
        if let Some((prompt, completion)) = self.tokens {
            buf.push_str(r#","prompt_tokens":"#);
            push_int(buf, prompt);
            buf.push_str(r#","completion_tokens":"#);
            push_int(buf, completion);
        }
        buf.push_str(if self.usage_estimated {
            r#","usage_estimated":true"#
        } else {
            r#","usage_estimated":false"#
        });
        buf.push_str(",\"target\":\"relaygate::access\"}\n");
    }

    /// The shape of the fmt subscriber's compact line: strings quoted as
    /// `Debug` quotes them, numbers and booleans bare.
    fn text(&self, buf: &mut String, now: SystemTime) {
        push_timestamp(buf, now);
        buf.push_str("  INFO relaygate::access: request request_id=");
        debug_str(buf, self.request_id);
        // `key` and `model` were `Display` fields: bare.
        buf.push_str(" key=");
        buf.push_str(self.key);
        buf.push_str(" model=");
        buf.push_str(self.model);
        buf.push_str(" upstream=");
        debug_str(buf, self.upstream);
        buf.push_str(" status=");
        push_int(buf, self.status);
        buf.push_str(" outcome=");
        debug_str(buf, self.outcome);
        buf.push_str(" error=");
        debug_str(buf, self.error);
        buf.push_str(if self.stream { " stream=true" } else { " stream=false" });
        buf.push_str(" attempts=");
        push_int(buf, self.attempts);
        buf.push_str(" latency_ms=");
        push_millis(buf, self.latency);
        if let Some(ttft) = self.ttft {
            buf.push_str(" ttft_ms=");
            push_millis(buf, ttft);
        }
        if let Some((prompt, completion)) = self.tokens {
            buf.push_str(" prompt_tokens=");
            push_int(buf, prompt);
            buf.push_str(" completion_tokens=");
            push_int(buf, completion);
        }
        buf.push_str(if self.usage_estimated {
            " usage_estimated=true\n"
        } else {
            " usage_estimated=false\n"
        });
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Milliseconds with microsecond precision, from integers: `12.345`.
fn push_millis(buf: &mut String, d: Duration) {
    let micros = d.as_micros();
    push_int(buf, micros / 1000);
    let frac = (micros % 1000) as u16;
    buf.push('.');
    for digit in [frac / 100, frac / 10 % 10, frac % 10] {
        buf.push(char::from(b'0' + digit as u8));
    }
}

fn push_int(buf: &mut String, n: impl itoa::Integer) {
    buf.push_str(itoa::Buffer::new().format(n));
}

/// RFC 3339 UTC with microseconds, as the fmt subscriber writes it. The date
/// and time to the second are formatted once per second per thread.
fn push_timestamp(buf: &mut String, now: SystemTime) {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since_epoch = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    SECOND.with_borrow_mut(|(cached, prefix)| {
        if *cached != secs {
            *cached = secs;
            prefix.clear();
            // "2026-11-28T21:12:10Z" without its "Z".
            let whole =
                humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)).to_string();
            prefix.push_str(whole.trim_end_matches('Z'));
        }
        buf.push_str(prefix);
    });
    let mut digits = itoa::Buffer::new();
    let micros = digits.format(since_epoch.subsec_micros());
    buf.push('.');
    for _ in micros.len()..6 {
        buf.push('0');
    }
    buf.push_str(micros);
    buf.push('Z');
}

/// `s` in double quotes: as is when it needs no escaping (always, for the
/// names and codes relaygate writes), else through `escape`.
fn quoted(buf: &mut String, s: &str, escape: impl FnOnce(&mut String, &str)) {
    if s.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\') {
        buf.push('"');
        buf.push_str(s);
        buf.push('"');
    } else {
        escape(buf, s);
    }
}

fn json_str(buf: &mut String, s: &str) {
    quoted(buf, s, |buf, s| buf.push_str(&serde_json::Value::from(s).to_string()));
}

fn debug_str(buf: &mut String, s: &str) {
    quoted(buf, s, |buf, s| {
        let _ = write!(buf, "{s:?}");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(request_id: &'static str) -> AccessLine<'static> {
        AccessLine {
            request_id,
            key: "app-a",
            model: "deepseek-chat",
            upstream: "fast-a",
            status: 200,
            outcome: "success",
            error: "-",
            stream: true,
            attempts: 2,
            latency: Duration::from_micros(12_345),
            ttft: Some(Duration::from_micros(987)),
            tokens: Some((15, 5)),
            usage_estimated: false,
        }
    }

    #[test]
    fn json_is_the_subscribers_shape_and_valid() {
        let mut buf = String::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        line("req_1").json(&mut buf, now);
        assert_eq!(
            buf,
            concat!(
                r#"{"timestamp":"2023-11-14T22:13:20.123456Z","level":"INFO","message":"request","#,
                r#""request_id":"req_1","key":"app-a","model":"deepseek-chat","upstream":"fast-a","#,
                r#""status":200,"outcome":"success","error":"-","stream":true,"attempts":2,"#,
                r#""latency_ms":12.345,"ttft_ms":0.987,"prompt_tokens":15,"completion_tokens":5,"#,
                r#""usage_estimated":false,"target":"relaygate::access"}"#,
                "\n"
            )
        );
        // Odd characters are escaped, and the line stays one JSON object.
        buf.clear();
        line("a\"b\\c\nd\u{7f}é").json(&mut buf, now);
        assert_eq!(buf.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&buf).unwrap();
        assert_eq!(v["request_id"], "a\"b\\c\nd\u{7f}é");
        assert_eq!(v["latency_ms"], 12.345);
    }

    #[test]
    fn timestamps_are_zero_padded_and_follow_the_clock() {
        let at = |micros: u64| {
            let mut buf = String::new();
            push_timestamp(&mut buf, SystemTime::UNIX_EPOCH + Duration::from_micros(micros));
            buf
        };
        assert_eq!(at(1_700_000_000_000_042), "2023-11-14T22:13:20.000042Z");
        assert_eq!(at(1_700_000_000_999_999), "2023-11-14T22:13:20.999999Z");
        // The cached second moves on with the clock, and back.
        assert_eq!(at(1_700_000_001_000_000), "2023-11-14T22:13:21.000000Z");
        assert_eq!(at(1_600_000_000_500_000), "2020-09-13T12:26:40.500000Z");
    }

    #[test]
    fn text_is_the_compact_shape() {
        let mut buf = String::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let mut l = line("req_1");
        l.ttft = None;
        l.tokens = None;
        l.text(&mut buf, now);
        assert_eq!(
            buf,
            "2023-11-14T22:13:20.123456Z  INFO relaygate::access: request request_id=\"req_1\" key=app-a \
             model=deepseek-chat upstream=\"fast-a\" status=200 outcome=\"success\" error=\"-\" stream=true \
             attempts=2 latency_ms=12.345 usage_estimated=false\n"
        );
        buf.clear();
        line("x\"y").text(&mut buf, now);
        assert!(buf.contains(r#"request_id="x\"y""#), "{buf}");
    }
}
