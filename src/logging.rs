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
//!
//! A runtime worker also holds its request lines back until it goes idle,
//! its batch reaches 8 KiB or the second turns, and hands them to the log
//! thread together: one line at a time, the log thread was woken per
//! request (a futex wake and a context switch each, 6% of the HTTP/2
//! manifest rate's CPU). Any other line from the same thread hands the held
//! ones on first, so a thread's lines stay in order.
//!
//! Lines reach the log thread through an `Inbox`: a buffer behind a
//! mutex. The log thread takes everything that arrived while it wrote the
//! last batch in one go, and is woken only when it found nothing and went
//! to sleep. (`tracing-appender`'s channel, used before, spun and yielded
//! the CPU four times per line while waiting for the next one: at a steady
//! trickle of requests, a warm tag HEAD's, that was half the log thread's
//! system calls, on cores the upstream and the clients were waiting for.)

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::SystemTime;

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
    inbox: Arc<Inbox>,
    format: Format,
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

/// Lines on their way to the log thread.
struct Inbox {
    state: Mutex<InboxState>,
    /// The log thread waits here, with `waiting` set, for lines.
    arrived: Condvar,
    /// Writers wait here while the inbox is full.
    room: Condvar,
}

#[derive(Default)]
struct InboxState {
    lines: Vec<u8>,
    /// The log thread sleeps on `arrived`: the next line must wake it.
    waiting: bool,
    /// The log thread has stopped: lines go to stderr directly.
    closed: bool,
}

/// Bytes the inbox holds before writers wait for the log thread: logging
/// slows down under a backlog rather than dropping lines or growing
/// without bound.
const INBOX_LIMIT: usize = 8 << 20;

fn lock(state: &Mutex<InboxState>) -> MutexGuard<'_, InboxState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inbox {
    fn new() -> Self {
        Inbox {
            state: Mutex::new(InboxState::default()),
            arrived: Condvar::new(),
            room: Condvar::new(),
        }
    }

    fn put(&self, bytes: &[u8]) {
        let mut s = lock(&self.state);
        while s.lines.len() >= INBOX_LIMIT && !s.closed {
            s = self.room.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        if s.closed {
            drop(s);
            // A failed write to stderr has nowhere to be reported.
            let _ = std::io::stderr().lock().write_all(bytes);
            return;
        }
        s.lines.extend_from_slice(bytes);
        if s.waiting {
            s.waiting = false;
            drop(s);
            self.arrived.notify_one();
        }
    }

    /// Lets the log thread finish with what it holds and sends later lines
    /// straight to stderr; wakes every waiter.
    fn close(&self) {
        lock(&self.state).closed = true;
        self.arrived.notify_one();
        self.room.notify_all();
    }

    /// The log thread: writes what arrived, in arrival order, until closed
    /// and empty.
    fn write_out(&self, out: &mut impl std::io::Write) {
        let mut batch = Vec::new();
        loop {
            {
                let mut s = lock(&self.state);
                while s.lines.is_empty() && !s.closed {
                    s.waiting = true;
                    s = self.arrived.wait(s).unwrap_or_else(PoisonError::into_inner);
                }
                if s.lines.is_empty() {
                    return;
                }
                std::mem::swap(&mut s.lines, &mut batch);
            }
            self.room.notify_all();
            let _ = out.write_all(&batch);
            let _ = out.flush();
            batch.clear();
            if batch.capacity() > 1 << 20 {
                // A backlog's buffer is not kept for the trickle after it.
                batch = Vec::new();
            }
        }
    }
}

/// Stops the log thread once every line it was given is out. Keep it
/// until the process ends.
pub struct LogGuard {
    inbox: Arc<Inbox>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.inbox.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer `tracing`'s formatter writes each event into.
struct InboxWriter(Arc<Inbox>);

impl std::io::Write for InboxWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.put(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends every log line to stderr through the log thread. The guard
/// writes out what is queued when dropped: keep it until the process ends.
/// Never lossy: under a backlog of 8 MiB, logging waits rather than
/// dropping lines.
pub fn init(format: Format) -> LogGuard {
    let inbox = Arc::new(Inbox::new());
    let thread = std::thread::Builder::new()
        .name("regmirror-log".into())
        .spawn({
            let inbox = inbox.clone();
            move || inbox.write_out(&mut std::io::stderr())
        })
        .ok();
    if thread.is_none() {
        // No thread, no batching: every line straight to stderr.
        inbox.close();
    }
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            // An empty RUST_LOG (`RUST_LOG= regmirror serve`) means the default, not silence.
            std::env::var("RUST_LOG")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
                .unwrap_or_else(|| "regmirror=info".into()),
        )
        .with_writer(InOrder(inbox.clone()));
    match format {
        Format::Json => logs.json().flatten_event(true).with_current_span(true).init(),
        // Colour codes only for a person at a terminal, not in journald or log files.
        Format::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let _ = OUTPUT.set(Output {
        inbox: inbox.clone(),
        format,
    });
    LogGuard { inbox, thread }
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
    HELD.with_borrow_mut(|held| {
        let new_second = match out.format {
            Format::Text => {
                let new_second = write_timestamp(held, SystemTime::now());
                held.push_str("  INFO ");
                held.push_str(REQUEST_TARGET);
                held.push_str(": request");
                write_text_fields(held, fields);
                held.push('\n');
                new_second
            }
            Format::Json => json_line(held, SystemTime::now(), fields),
        };
        if !HOLDS_LINES.get() || new_second || held.len() >= HAND_ON_AT {
            hand_on(&out.inbox, held);
        }
    });
}

thread_local! {
    /// Request lines formatted on this thread, not yet with the log thread.
    static HELD: RefCell<String> = const { RefCell::new(String::new()) };
    /// Whether this thread may hold lines: set by [`flush_thread`], which
    /// only a runtime worker calls, when it goes idle. Other threads (and a
    /// worker before its first idle moment) hand each line on at once.
    static HOLDS_LINES: Cell<bool> = const { Cell::new(false) };
}

/// A batch of held lines this large is handed on without waiting.
const HAND_ON_AT: usize = 8 * 1024;

fn hand_on(inbox: &Inbox, held: &mut String) {
    if !held.is_empty() {
        inbox.put(held.as_bytes());
        held.clear();
    }
}

/// Hands on this thread's held lines, unless this thread is in the middle
/// of formatting one (a park or a `tracing` line cannot interrupt it).
fn hand_on_held(inbox: &Inbox) {
    HELD.with(|held| {
        if let Ok(mut held) = held.try_borrow_mut() {
            hand_on(inbox, &mut held);
        }
    });
}

/// Hands this thread's held request lines to the log thread. For the
/// runtime to call when a worker thread goes idle (`on_thread_park`) and
/// when it stops (`on_thread_stop`).
pub fn flush_thread() {
    HOLDS_LINES.set(true);
    if let Some(out) = OUTPUT.get() {
        hand_on_held(&out.inbox);
    }
}

/// The writer `tracing`'s formatter gets: hands the thread's held request
/// lines on before the line it is about to write.
struct InOrder(Arc<Inbox>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for InOrder {
    type Writer = InboxWriter;

    fn make_writer(&'a self) -> InboxWriter {
        hand_on_held(&self.0);
        InboxWriter(self.0.clone())
    }
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

/// Appends one JSON request line to `s`; true if the second turned since
/// this thread's last timestamp.
fn json_line(s: &mut String, at: SystemTime, fields: &[(&str, Value<'_>)]) -> bool {
    s.push_str("{\"timestamp\":\"");
    let new_second = write_timestamp(s, at);
    s.push_str("\",\"level\":\"INFO\",\"message\":\"request\"");
    for (k, v) in fields {
        if matches!(v, Value::None) {
            continue;
        }
        s.push(',');
        json_str(s, k);
        s.push(':');
        match v {
            Value::Str(t) | Value::Word(t) => json_str(s, t),
            Value::Num(n) => push_u64(s, *n),
            Value::None => {}
        }
    }
    s.push_str(",\"target\":\"");
    s.push_str(REQUEST_TARGET);
    s.push_str("\"}\n");
    new_second
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
/// Returns whether that happened: the second turned for this thread.
fn write_timestamp(s: &mut String, at: SystemTime) -> bool {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let d = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let new_second = SECOND.with_borrow_mut(|(cached, text)| {
        let new_second = *cached != secs;
        if new_second {
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
        new_second
    });
    let micros = d.subsec_micros();
    let mut div = 100_000;
    while div > 0 {
        s.push(char::from(b'0' + (micros / div % 10) as u8));
        div /= 10;
    }
    s.push('Z');
    new_second
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
    fn the_inbox_writes_every_line_in_order_and_waits_when_full() {
        let inbox = Arc::new(Inbox::new());
        // Writers that outrun the log thread fill the inbox and then wait
        // for it: more than INBOX_LIMIT goes through, none of it lost.
        let line = vec![b'x'; 4095];
        let lines = 3 * INBOX_LIMIT / 4096;
        let writers: Vec<_> = (0..2u8)
            .map(|w| {
                let (inbox, line) = (inbox.clone(), line.clone());
                std::thread::spawn(move || {
                    for i in 0..lines {
                        let mut l = line.clone();
                        l[0] = b'a' + w;
                        l[1..9].copy_from_slice(&(i as u64).to_be_bytes());
                        l.push(b'\n');
                        inbox.put(&l);
                    }
                })
            })
            .collect();
        let reader = {
            let inbox = inbox.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                inbox.write_out(&mut out);
                out
            })
        };
        for w in writers {
            w.join().unwrap();
        }
        inbox.close();
        let out = reader.join().unwrap();
        let mut next = [0u64; 2];
        let mut count = 0;
        for l in out.chunks(4096) {
            assert_eq!(l.len(), 4096, "a line was cut");
            let w = usize::from(l[0] - b'a');
            let i = u64::from_be_bytes(l[1..9].try_into().unwrap());
            assert_eq!(i, next[w], "writer {w}'s lines out of order");
            next[w] += 1;
            count += 1;
        }
        assert_eq!(count, 2 * lines);
        // Closed: a late line goes straight out, not into a buffer nobody reads.
        inbox.put(b"");
        assert!(lock(&inbox.state).lines.is_empty());
    }

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
        let mut line = String::new();
        json_line(
            &mut line,
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
