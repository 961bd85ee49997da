//! HTTP/2 clients that abuse the protocol (issue 27): a client that opens
//! streams and resets them at once ("rapid reset", CVE-2023-44487) is told
//! to go away (GOAWAY with ENHANCE_YOUR_CALM) and cut off, while a normal
//! client beside it is served.
//!
//! Frames are written by hand (no client library would send them), h2c on
//! the plain listener. Client source addresses are 127.253.x.y, which no
//! other test uses.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::alloc_ip;
use common::regmirror::{Config, Regmirror, UpstreamEntry, DOCKER_HOSTS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GOAWAY: u8 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A GET of `path` as an HPACK block: indexed `:method GET` and `:scheme
/// http`, literal `:authority` and `:path` without indexing.
fn get_block(authority: &str, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86];
    for (index, value) in [(0x01u8, authority), (0x04, path)] {
        assert!(value.len() < 127, "header value too long for this encoder");
        block.push(index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// The preface, empty SETTINGS, then `streams` GETs each reset (CANCEL)
/// straight after its HEADERS.
fn rapid_reset(authority: &str, path: &str, streams: u32) -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    let block = get_block(authority, path);
    for i in 0..streams {
        let id = 2 * i + 1;
        frame(&mut out, 0x1, 0x5, id, &block); // HEADERS, END_STREAM | END_HEADERS
        frame(&mut out, 0x3, 0, id, &0x8u32.to_be_bytes()); // RST_STREAM CANCEL
    }
    out
}

/// Reads frames until the server closes (or `within` passes); returns the
/// error code of the last GOAWAY seen and whether the connection closed.
async fn goaway_and_close(s: &mut TcpStream, within: Duration) -> (Option<u32>, bool) {
    let mut buf = Vec::new();
    let mut goaway = None;
    let closed = tokio::time::timeout(within, async {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                if buf[3] == GOAWAY && len >= 8 {
                    let p = &buf[9..9 + len];
                    goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
                }
                buf.drain(..9 + len);
            }
        }
    })
    .await
    .is_ok();
    (goaway, closed)
}

/// A HEADERS frame without END_HEADERS, then `frames` CONTINUATION frames
/// of 16 KiB that never end the header block (the 2024 "CONTINUATION
/// flood"): a server that buffers them until END_HEADERS holds it all.
fn continuation_flood(authority: &str, path: &str, frames: u32) -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    frame(&mut out, 0x1, 0x1, 1, &get_block(authority, path)); // HEADERS, END_STREAM only
                                                               // Literal header fields without indexing, new names: x-N: 16 KiB / field.
    let mut field = vec![0x00, 0x03, b'x', b'-', b'a', 0x7f];
    let value_len = 16 * 1024 - 16;
    let mut n = value_len - 127;
    while n >= 128 {
        field.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    field.push(n as u8);
    field.resize(field.len() + value_len, b'v');
    for _ in 0..frames {
        frame(&mut out, 0x9, 0, 1, &field); // CONTINUATION without END_HEADERS
    }
    out
}

/// Sends `bytes` from `from` to `to`, then reads until regmirror closes;
/// returns the last GOAWAY's error code and whether it closed.
async fn abuse(from: IpAddr, to: SocketAddr, bytes: &[u8]) -> (Option<u32>, bool) {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::new(from, 0)).expect("bind");
    let mut s = sock.connect(to).await.expect("connect");
    // A failed write is the server having cut us off already.
    let _ = s.write_all(bytes).await;
    goaway_and_close(&mut s, Duration::from_secs(20)).await
}

/// A plain HTTP/2 GET of /v2/ from `from`.
async fn normal_get(from: IpAddr, to: SocketAddr) -> Result<u16, reqwest::Error> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .local_address(from)
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client");
    Ok(client.get(format!("http://{to}/v2/")).send().await?.status().as_u16())
}

/// regmirror with one upstream where nothing listens (127.0.0.9): /v2/
/// needs none.
fn start() -> Regmirror {
    common::init_crypto();
    let cfg = Config::new(alloc_ip()).with_upstream(UpstreamEntry::new(
        "docker.io",
        DOCKER_HOSTS,
        "http://127.0.0.9",
        "dockerhub",
    ));
    Regmirror::start(cfg)
}

fn src(d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 253, 0, d))
}

/// 1,000 streams opened and reset at once on one connection: regmirror
/// answers GOAWAY(ENHANCE_YOUR_CALM) and closes it, and a normal client
/// from another address is served beside it.
#[test]
fn rapid_reset_gets_goaway_and_others_are_served() {
    let rt = common::runtime();
    let rm = start();
    let http = rm.config.http;
    let ((goaway, closed), served) = rt.block_on(async {
        let cut = abuse(src(1), http, &rapid_reset(&http.to_string(), "/v2/", 1000)).await;
        (cut, normal_get(src(2), http).await)
    });
    eprintln!("[h2_abuse] rapid reset: GOAWAY {goaway:?}, closed {closed}; a normal client: {served:?}");
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "GOAWAY error code for a rapid-reset client"
    );
    assert!(closed, "regmirror kept the rapid-reset connection open");
    assert_eq!(served.ok(), Some(200), "a normal HTTP/2 client beside it");
}

/// A header block continued for 4 MiB without an end: regmirror cuts the
/// connection off with a GOAWAY, and a normal client is served beside it.
#[test]
fn a_header_block_that_never_ends_is_cut_off() {
    let rt = common::runtime();
    let rm = start();
    let http = rm.config.http;
    let ((goaway, closed), served) = rt.block_on(async {
        let cut = abuse(src(3), http, &continuation_flood(&http.to_string(), "/v2/", 256)).await;
        (cut, normal_get(src(4), http).await)
    });
    eprintln!("[h2_abuse] CONTINUATION flood: GOAWAY {goaway:?}, closed {closed}; a normal client: {served:?}");
    assert!(goaway.is_some(), "no GOAWAY for an endless header block");
    assert!(closed, "regmirror kept the CONTINUATION-flood connection open");
    assert_eq!(served.ok(), Some(200), "a normal HTTP/2 client beside it");
}
