//! Where log lines go, and the one line per request written without
//! `tracing`'s formatter.
//!
//! Every line is written by a thread of its own, in batches: a write
//! syscall per request from the request's own thread cost a tenth of the
//! warm manifest rate. The request line is then formatted here, straight
//! into one buffer: `tracing`'s formatter (a visitor and a `Debug` call per
//! field, a timestamp formatter, colour codes) was another tenth (issue 16's
//! profile). The line reads as `tracing`'s own would, in both formats, and
//! obeys the same `RUST_LOG` filter.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::SystemTime;

use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    /// One JSON object per line, fields as top-level keys.
    Json,
}

/// The request log's `target`, as `RUST_LOG` directives name it.
pub const REQUEST_TARGET: &str = "regmirror::request";

struct Output {
    writer: NonBlocking,
    format: Format,
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

/// Sends every log line to stderr through the log thread. The guard
/// flushes what is queued when dropped: keep it until the process ends.
/// Never lossy: under a backlog of 128k lines, logging waits rather than
/// dropping lines.
pub fn init(format: Format) -> WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("regmirror-log")
        .finish(std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr()));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            // An empty RUST_LOG (`RUST_LOG= regmirror serve`) means the default, not silence.
            std::env::var("RUST_LOG")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
                .unwrap_or_else(|| "regmirror=info".into()),
        )
        .with_writer(writer.clone());
    match format {
        Format::Json => logs.json().flatten_event(true).with_current_span(true).init(),
        // Colour codes only for a person at a terminal, not in journald or log files.
        Format::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let _ = OUTPUT.set(Output { writer, format });
    guard
}

/// A value in a request line.
pub enum Value<'a> {
    /// Client- or upstream-supplied text: quoted (and escaped) in both formats.
    Str(&'a str),
    /// A word regmirror chose (a method, a kind): bare in text.
    Word(&'a str),
    Num(u64),
    /// Absent: left out, as `tracing` leaves out a `None`.
    None,
}

/// Writes one `info` line with message `request` and these fields, unless
/// the log filter turns request lines off. Without [`init`] (the library
/// used on its own) the line goes through `tracing`.
pub fn request_line(fields: &[(&str, Value<'_>)]) {
    if !tracing::enabled!(target: REQUEST_TARGET, tracing::Level::INFO) {
        return;
    }
    let Some(out) = OUTPUT.get() else {
        let mut text = String::new();
        write_text_fields(&mut text, fields);
        tracing::info!(target: REQUEST_TARGET, "request{text}");
        return;
    };
    let line = match out.format {
        Format::Text => {
            let mut s = String::with_capacity(320);
            write_timestamp(&mut s, SystemTime::now());
            s.push_str("  INFO ");
            s.push_str(REQUEST_TARGET);
            s.push_str(": request");
            write_text_fields(&mut s, fields);
            s.push('\n');
            s
        }
        Format::Json => json_line(SystemTime::now(), fields),
    };
    // A failed write to stderr has nowhere to be reported.
    let _ = out.writer.clone().write_all(line.as_bytes());
}

fn write_text_fields(s: &mut String, fields: &[(&str, Value<'_>)]) {
    for (k, v) in fields {
        if matches!(v, Value::None) {
            continue;
        }
        s.push(' ');
        s.push_str(k);
        s.push('=');
        match v {
            // Quoted as `Debug` quotes, without its escaping machinery for
            // the usual text that needs none.
            Value::Str(t) if t.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\') => {
                s.push('"');
                s.push_str(t);
                s.push('"');
            }
            Value::Str(t) => {
                let _ = write!(s, "{t:?}");
            }
            Value::Word(t) => s.push_str(t),
            Value::Num(n) => push_u64(s, *n),
            Value::None => {}
        }
    }
}

/// Decimal digits of `n`, without the formatting machinery.
fn push_u64(s: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        s.push(char::from(d));
    }
}

fn json_line(at: SystemTime, fields: &[(&str, Value<'_>)]) -> String {
    let mut s = String::with_capacity(400);
    s.push_str("{\"timestamp\":\"");
    write_timestamp(&mut s, at);
    s.push_str("\",\"level\":\"INFO\",\"message\":\"request\"");
    for (k, v) in fields {
        if matches!(v, Value::None) {
            continue;
        }
        s.push(',');
        json_str(&mut s, k);
        s.push(':');
        match v {
            Value::Str(t) | Value::Word(t) => json_str(&mut s, t),
            Value::Num(n) => push_u64(&mut s, *n),
            Value::None => {}
        }
    }
    s.push_str(",\"target\":\"");
    s.push_str(REQUEST_TARGET);
    s.push_str("\"}\n");
    s
}

/// A JSON string literal.
fn json_str(s: &mut String, t: &str) {
    s.push('"');
    for c in t.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

/// RFC 3339 in UTC with microseconds, as `tracing`'s formatter writes it.
/// The part up to the second is formatted once a second per thread.
fn write_timestamp(s: &mut String, at: SystemTime) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let d = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != secs {
            let (y, m, day) = civil_from_days((secs / 86_400) as i64);
            let t = secs % 86_400;
            text.clear();
            let _ = write!(
                text,
                "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.",
                t / 3600,
                t / 60 % 60,
                t % 60
            );
            *cached = secs;
        }
        s.push_str(text);
    });
    let micros = d.subsec_micros();
    let mut div = 100_000;
    while div > 0 {
        s.push(char::from(b'0' + (micros / div % 10) as u8));
        div /= 10;
    }
    s.push('Z');
}

/// The proleptic Gregorian date of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_match_the_calendar() {
        let mut s = String::new();
        // 2024-02-29T23:59:59.000001Z, a leap day.
        write_timestamp(&mut s, SystemTime::UNIX_EPOCH + Duration::new(1_709_251_199, 1_000));
        assert_eq!(s, "2024-02-29T23:59:59.000001Z");
        s.clear();
        write_timestamp(&mut s, SystemTime::UNIX_EPOCH);
        assert_eq!(s, "1970-01-01T00:00:00.000000Z");
        s.clear();
        write_timestamp(&mut s, SystemTime::UNIX_EPOCH + Duration::from_secs(4_102_444_800));
        assert_eq!(s, "2100-01-01T00:00:00.000000Z");
        // The same second again, from the per-thread cache.
        s.clear();
        write_timestamp(
            &mut s,
            SystemTime::UNIX_EPOCH + Duration::new(4_102_444_800, 987_654_321),
        );
        assert_eq!(s, "2100-01-01T00:00:00.987654Z");
    }

    #[test]
    fn a_json_line_is_json_with_every_field_top_level() {
        let line = json_line(
            SystemTime::UNIX_EPOCH,
            &[
                ("method", Value::Word("GET")),
                ("path", Value::Str("/v2/a\"b\\c\n\u{1}/manifests/1")),
                ("status", Value::Num(200)),
                ("bytes", Value::None),
            ],
        );
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(v["message"], "request");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(v["path"], "/v2/a\"b\\c\n\u{1}/manifests/1");
        assert_eq!(v["status"], 200);
        assert!(v.get("bytes").is_none(), "{line}");
        assert_eq!(v["target"], REQUEST_TARGET);
    }

    #[test]
    fn text_fields_quote_what_clients_sent() {
        let mut s = String::new();
        write_text_fields(
            &mut s,
            &[
                ("method", Value::Word("GET")),
                ("repo", Value::Str("a b\"\n")),
                ("bytes", Value::None),
                ("status", Value::Num(404)),
            ],
        );
        assert_eq!(s, " method=GET repo=\"a b\\\"\\n\" status=404");
        let mut n = String::new();
        for v in [0, 7, 10, 1084, u64::MAX] {
            n.clear();
            push_u64(&mut n, v);
            assert_eq!(n, v.to_string());
        }
    }
}
