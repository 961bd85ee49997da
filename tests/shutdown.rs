//! Graceful shutdown as an operator sees it: after the signal no new
//! connection is accepted, and a download already streaming to a client
//! finishes intact.

use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PROXY: &str = "127.0.5.1";
const UPSTREAM: &str = "127.0.5.2";

/// An upstream that sends one blob slowly, in 8 pieces, to any GET.
async fn slow_upstream(blob: Vec<u8>) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(format!("{UPSTREAM}:8080")).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let blob = blob.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                    blob.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                for piece in blob.chunks(blob.len() / 8 + 1) {
                    let _ = s.write_all(piece).await;
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            });
        }
    })
}

#[tokio::test]
async fn shutdown_lets_a_streaming_download_finish_and_refuses_new_connections() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let blob: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&blob)));
    let upstream = slow_upstream(blob.clone()).await;

    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
http = "{PROXY}:5000"
name = "regmirror.test"
[ca]
dir = "{d}/certs"
[cache]
dir = "{d}/data"
max_size = "1GiB"
[[upstream]]
name = "quay.io"
hosts = ["quay.io"]
url = "http://{UPSTREAM}:8080"
namespace = "quay"
"#,
        d = dir.path().display()
    );
    let settings = regmirror::config::Settings::from_toml(&text, "test").unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(regmirror::serve(settings, async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    for _ in 0..100 {
        if client.get(format!("http://{PROXY}:5000/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut resp = client
        .get(format!("http://{PROXY}:5000/v2/quay/org/app/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = resp.chunk().await.unwrap().unwrap().to_vec();

    // Signal shutdown while the body is still streaming.
    stop.send(()).unwrap();
    // The listener closes promptly; poll rather than guess how promptly.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(format!("{PROXY}:5000")).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "new connections must be refused after the shutdown signal");

    while let Some(chunk) = resp.chunk().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got.len(), blob.len());
    assert_eq!(format!("sha256:{}", hex::encode(Sha256::digest(&got))), digest);

    let result = tokio::time::timeout(Duration::from_secs(20), server).await;
    assert!(
        matches!(result, Ok(Ok(Ok(())))),
        "serve returns once open connections are done"
    );
    upstream.abort();
}
