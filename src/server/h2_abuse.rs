//! HTTP/2 abuse: each kind closes the abuser's connection, is counted in
//! `regmirror_h2_abuse_total{kind}` and logged once per connection.
//!
//! The h2 crate already answers most kinds with GOAWAY(ENHANCE_YOUR_CALM)
//! and names which in the GOAWAY's debug data: rapid reset
//! (CVE-2023-44487), CONTINUATION flood (CVE-2024-27316) and a header list
//! far over `max_header_list_size` (an HPACK bomb). A client whose flow
//! control window stays shut (CVE-2019-9517) is closed by the connection's
//! own "client read nothing" deadline. What h2 only slows down is a flood
//! of PINGs (CVE-2019-9512) or SETTINGS (CVE-2019-9515): it answers each
//! one, so a client that reads its answers keeps a core busy for as long
//! as it likes. [`FrameWatch`] reads the frame headers going into hyper
//! and ends a connection whose client sends either faster than any real
//! client does.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::{H2AbuseLabel, METRICS};

/// What an HTTP/2 client did to be cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Abuse {
    RapidReset = 1,
    ContinuationFlood,
    HeaderListTooLarge,
    PingFlood,
    SettingsFlood,
    ZeroWindow,
    /// Streams refused faster than h2 lets a client provoke them.
    RefusedStreams,
}

impl Abuse {
    pub fn as_str(self) -> &'static str {
        match self {
            Abuse::RapidReset => "rapid_reset",
            Abuse::ContinuationFlood => "continuation_flood",
            Abuse::HeaderListTooLarge => "header_list_too_large",
            Abuse::PingFlood => "ping_flood",
            Abuse::SettingsFlood => "settings_flood",
            Abuse::ZeroWindow => "zero_window",
            Abuse::RefusedStreams => "refused_streams",
        }
    }

    /// The CVE a kind reproduces, for the log line.
    fn cve(self) -> &'static str {
        match self {
            Abuse::RapidReset => "CVE-2023-44487",
            Abuse::ContinuationFlood => "CVE-2024-27316",
            Abuse::HeaderListTooLarge => "CVE-2016-6581",
            Abuse::PingFlood => "CVE-2019-9512",
            Abuse::SettingsFlood => "CVE-2019-9515",
            Abuse::ZeroWindow => "CVE-2019-9517",
            Abuse::RefusedStreams => "CVE-2019-9514",
        }
    }

    fn from_u8(v: u8) -> Option<Abuse> {
        [
            Abuse::RapidReset,
            Abuse::ContinuationFlood,
            Abuse::HeaderListTooLarge,
            Abuse::PingFlood,
            Abuse::SettingsFlood,
            Abuse::ZeroWindow,
            Abuse::RefusedStreams,
        ]
        .into_iter()
        .find(|a| *a as u8 == v)
    }
}

/// What [`FrameWatch`] saw of a connection: the abuse it cut the
/// connection off for, and enough of the frames to tell which abuse h2 cut
/// it off for (h2's GOAWAY debug data does not reach its error).
#[derive(Debug, Default)]
pub struct AbuseMark {
    kind: AtomicU8,
    resets: AtomicU32,
    headers: AtomicU32,
    /// CONTINUATION frames since the last HEADERS.
    continuations: AtomicU32,
}

/// RST_STREAMs that make an ENHANCE_YOUR_CALM a rapid reset (h2 allows 20
/// reset before they are taken up).
const RAPID_RESETS: u32 = 20;
/// HEADERS frames that make it a flood of refused streams (h2 allows 1,024
/// local resets).
const REFUSED_FLOOD: u32 = 1000;

impl AbuseMark {
    pub fn set(&self, a: Abuse) {
        let _ = self
            .kind
            .compare_exchange(0, a as u8, Ordering::AcqRel, Ordering::Acquire);
    }

    pub fn get(&self) -> Option<Abuse> {
        Abuse::from_u8(self.kind.load(Ordering::Acquire))
    }

    /// The abuse a connection that ended with `e` was cut off for: the
    /// watcher's own, or, when h2 sent GOAWAY(ENHANCE_YOUR_CALM), the kind
    /// the frames before it show.
    pub fn classify(&self, e: &dyn std::error::Error) -> Option<Abuse> {
        if let Some(a) = self.get() {
            return Some(a);
        }
        if !format!("{e:?}").contains("ENHANCE_YOUR_CALM") {
            return None;
        }
        let seen = |c: &AtomicU32| c.load(Ordering::Relaxed);
        Some(if seen(&self.resets) >= RAPID_RESETS {
            Abuse::RapidReset
        } else if seen(&self.continuations) >= 2 {
            Abuse::ContinuationFlood
        } else if seen(&self.headers) >= REFUSED_FLOOD {
            Abuse::RefusedStreams
        } else {
            Abuse::HeaderListTooLarge
        })
    }

    fn frame(&self, kind: u8) {
        let bump = |c: &AtomicU32| c.fetch_add(1, Ordering::Relaxed);
        match kind {
            FRAME_HEADERS => {
                bump(&self.headers);
                self.continuations.store(0, Ordering::Relaxed);
            }
            FRAME_CONTINUATION => {
                bump(&self.continuations);
            }
            FRAME_RST_STREAM => {
                bump(&self.resets);
            }
            _ => {}
        }
    }
}

/// Counts and logs the abuse a connection was closed for.
pub fn report(peer: Option<std::net::SocketAddr>, abuse: Abuse) {
    METRICS
        .h2_abuse
        .get_or_create(&H2AbuseLabel { kind: abuse.as_str() })
        .inc();
    tracing::warn!(
        peer = ?peer,
        kind = abuse.as_str(),
        "closing HTTP/2 connection: {} ({})",
        abuse.as_str().replace('_', " "),
        abuse.cve()
    );
}

/// Non-ACK PINGs a connection may send at once, and per second after.
/// Real clients ping to keep a connection alive (every few seconds at
/// most) or to measure bandwidth (one outstanding at a time).
const PING_BURST: f64 = 100.0;
const PINGS_PER_SECOND: f64 = 10.0;
/// Non-ACK SETTINGS: one at start, rarely any later.
const SETTINGS_BURST: f64 = 20.0;
const SETTINGS_PER_SECOND: f64 = 2.0;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PING: u8 = 0x6;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_ACK: u8 = 0x1;

/// A token bucket: `burst` at once, `rate` per second sustained.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    burst: f64,
    rate: f64,
    at: Instant,
}

impl Bucket {
    fn new(burst: f64, rate: f64) -> Bucket {
        Bucket {
            tokens: burst,
            burst,
            rate,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

#[derive(Debug)]
enum Phase {
    /// Matching the client preface; so many bytes of it seen.
    Preface(usize),
    /// Inside the frame stream: so many bytes of a frame header gathered,
    /// or a payload still to pass.
    Frames,
    /// Not HTTP/2 (an HTTP/1.1 client on the plain listener): pass through.
    Off,
}

/// What [`FrameWatch`] reads of the frames a client sends.
#[derive(Debug)]
struct Frames {
    phase: Phase,
    head: [u8; 9],
    head_len: usize,
    /// Payload bytes of the current frame not yet seen.
    skip: usize,
    pings: Bucket,
    settings: Bucket,
}

impl Frames {
    fn new() -> Frames {
        Frames {
            phase: Phase::Preface(0),
            head: [0; 9],
            head_len: 0,
            skip: 0,
            pings: Bucket::new(PING_BURST, PINGS_PER_SECOND),
            settings: Bucket::new(SETTINGS_BURST, SETTINGS_PER_SECOND),
        }
    }

    /// Walks the frame headers in `data` (what the client just sent).
    fn feed(&mut self, mut data: &[u8], mark: &AbuseMark) -> Result<(), Abuse> {
        while !data.is_empty() {
            match self.phase {
                Phase::Off => return Ok(()),
                Phase::Preface(seen) => {
                    let take = (PREFACE.len() - seen).min(data.len());
                    if data[..take] != PREFACE[seen..seen + take] {
                        self.phase = Phase::Off;
                        return Ok(());
                    }
                    data = &data[take..];
                    self.phase = if seen + take == PREFACE.len() {
                        Phase::Frames
                    } else {
                        Phase::Preface(seen + take)
                    };
                }
                Phase::Frames => {
                    if self.skip > 0 {
                        let take = self.skip.min(data.len());
                        self.skip -= take;
                        data = &data[take..];
                        continue;
                    }
                    let take = (9 - self.head_len).min(data.len());
                    self.head[self.head_len..self.head_len + take].copy_from_slice(&data[..take]);
                    self.head_len += take;
                    data = &data[take..];
                    if self.head_len == 9 {
                        self.head_len = 0;
                        let h = self.head;
                        self.skip = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                        mark.frame(h[3]);
                        self.frame(h[3], h[4])?;
                    }
                }
            }
        }
        Ok(())
    }

    fn frame(&mut self, kind: u8, flags: u8) -> Result<(), Abuse> {
        let acked = flags & FLAG_ACK != 0;
        match kind {
            FRAME_PING if !acked && !self.pings.take() => Err(Abuse::PingFlood),
            FRAME_SETTINGS if !acked && !self.settings.take() => Err(Abuse::SettingsFlood),
            _ => Ok(()),
        }
    }
}

/// The client side of an HTTP/2 (or maybe-h2c) connection as hyper reads
/// it, ending the connection (a read error) once the client floods PINGs
/// or SETTINGS. Writes pass straight through.
pub struct FrameWatch<I> {
    inner: I,
    frames: Frames,
    signals: std::sync::Arc<super::Signals>,
    tripped: bool,
}

impl<I> FrameWatch<I> {
    pub(super) fn new(inner: I, signals: std::sync::Arc<super::Signals>) -> FrameWatch<I> {
        FrameWatch {
            inner,
            frames: Frames::new(),
            signals,
            tripped: false,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FrameWatch<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.tripped {
            return Poll::Ready(Err(std::io::Error::other("HTTP/2 abuse: connection closed")));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Err(abuse) = this.frames.feed(&buf.filled()[before..], &this.signals.abuse) {
            this.tripped = true;
            this.signals.abuse.set(abuse);
            return Poll::Ready(Err(std::io::Error::other(format!("HTTP/2 abuse: {}", abuse.as_str()))));
        }
        polled
    }
}

super::writes_pass_through!(impl[I: AsyncWrite + Unpin] for FrameWatch<I>);

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags, 0, 0, 0, 0]);
        out.extend_from_slice(payload);
        out
    }

    fn stream(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        for f in frames {
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn a_ping_flood_trips_and_keepalive_pings_do_not() {
        let mut f = Frames::new();
        let ping = frame(FRAME_PING, 0, &[0; 8]);
        let data = stream(&vec![ping.clone(); 50]);
        assert_eq!(
            f.feed(&data, &AbuseMark::default()),
            Ok(()),
            "50 pings at once: a burst a client may send"
        );
        // PING ACKs (answers to regmirror's own pings) never count.
        let acks = vec![frame(FRAME_PING, FLAG_ACK, &[0; 8]); 1000].concat();
        assert_eq!(f.feed(&acks, &AbuseMark::default()), Ok(()));
        let flood = vec![ping; 100].concat();
        assert_eq!(f.feed(&flood, &AbuseMark::default()), Err(Abuse::PingFlood));
    }

    #[test]
    fn a_settings_flood_trips() {
        let mut f = Frames::new();
        let settings = frame(FRAME_SETTINGS, 0, &[0, 4, 0, 0, 0xff, 0xff]);
        assert_eq!(
            f.feed(&stream(&vec![settings.clone(); 10]), &AbuseMark::default()),
            Ok(())
        );
        assert_eq!(
            f.feed(&vec![settings; 20].concat(), &AbuseMark::default()),
            Err(Abuse::SettingsFlood)
        );
    }

    #[test]
    fn frames_split_across_reads_are_followed() {
        let mut f = Frames::new();
        // A large DATA frame whose payload holds bytes that look like PINGs:
        // they are payload, not frames.
        let fake_pings = vec![frame(FRAME_PING, 0, &[0; 8]); 500].concat();
        let mut data = stream(&[frame(0x0, 0, &fake_pings)]);
        data.extend(vec![frame(FRAME_PING, 0, &[0; 8]); 150].concat());
        let mut result = Ok(());
        for chunk in data.chunks(7) {
            result = f.feed(chunk, &AbuseMark::default());
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(Abuse::PingFlood), "the 150 real PINGs after the DATA frame");
        let mut g = Frames::new();
        let mut quiet = stream(&[frame(0x0, 0, &fake_pings)]);
        quiet.extend(vec![frame(FRAME_PING, 0, &[0; 8]); 20].concat());
        for chunk in quiet.chunks(5) {
            assert_eq!(g.feed(chunk, &AbuseMark::default()), Ok(()));
        }
    }

    #[test]
    fn http1_on_the_plain_listener_is_not_parsed() {
        let mut f = Frames::new();
        let mut h1 = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        h1.extend(vec![frame(FRAME_PING, 0, &[0; 8]); 500].concat());
        assert_eq!(f.feed(&h1, &AbuseMark::default()), Ok(()));
    }

    #[test]
    fn an_enhance_your_calm_is_named_by_the_frames_before_it() {
        /// An error whose Debug is `.0` and Display says nothing, as
        /// hyper's h2 errors.
        struct E(&'static str);
        impl std::fmt::Debug for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("http2 error")
            }
        }
        impl std::error::Error for E {}
        let calm = E("GoAway(b\"\", ENHANCE_YOUR_CALM, Library)");
        let frames = |kinds: &[(u8, usize)]| {
            let m = AbuseMark::default();
            for (kind, n) in kinds {
                for _ in 0..*n {
                    m.frame(*kind);
                }
            }
            m
        };
        let rapid = frames(&[(FRAME_HEADERS, 1000), (FRAME_RST_STREAM, 1000)]);
        assert_eq!(rapid.classify(&calm), Some(Abuse::RapidReset));
        let cont = frames(&[(FRAME_HEADERS, 1), (FRAME_CONTINUATION, 30)]);
        assert_eq!(cont.classify(&calm), Some(Abuse::ContinuationFlood));
        let bomb = frames(&[(FRAME_HEADERS, 1)]);
        assert_eq!(bomb.classify(&calm), Some(Abuse::HeaderListTooLarge));
        let refused = frames(&[(FRAME_HEADERS, 1100)]);
        assert_eq!(refused.classify(&calm), Some(Abuse::RefusedStreams));
        assert_eq!(rapid.classify(&E("GoAway(b\"\", PROTOCOL_ERROR, Library)")), None);
        // The watcher's own verdict stands whatever the error says.
        let m = frames(&[(FRAME_RST_STREAM, 100)]);
        m.set(Abuse::PingFlood);
        assert_eq!(m.classify(&E("broken pipe")), Some(Abuse::PingFlood));
    }

    #[test]
    fn the_first_mark_stands() {
        let m = AbuseMark::default();
        assert_eq!(m.get(), None);
        m.set(Abuse::PingFlood);
        m.set(Abuse::ZeroWindow);
        assert_eq!(m.get(), Some(Abuse::PingFlood));
    }
}
