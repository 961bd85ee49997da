//! The TLS listener as a client meets it: certificates for configured names
//! only, chained to a root that carries nameConstraints, HTTP/1.1 and HTTP/2.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Running {
    ip: &'static str,
    _dir: tempfile::TempDir,
    ca_pem: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), regmirror::StartError>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.abort();
    }
}

async fn start(ip: &'static str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
https = "{ip}:443"
http = "{ip}:5000"
name = "regmirror.test"
[ca]
dir = "{d}/certs"
[cache]
dir = "{d}/data"
max_size = "1GiB"
[[upstream]]
name = "ghcr.io"
hosts = ["ghcr.io"]
url = "https://127.0.0.9"
namespace = "ghcr"
[[upstream]]
name = "quay.io"
hosts = ["quay.io"]
url = "https://127.0.0.9"
namespace = "quay"
"#,
        d = dir.path().display()
    );
    let settings = regmirror::config::Settings::from_toml(&text, "test").unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut task = tokio::spawn(regmirror::serve(settings, async move {
        let _ = rx.await;
    }));
    let mut ready = false;
    for _ in 0..200 {
        if task.is_finished() {
            let r = (&mut task).await;
            panic!("regmirror on {ip} stopped during start-up: {r:?}");
        }
        if TcpStream::connect(format!("{ip}:443")).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ready,
        "regmirror's TLS listener on {ip}:443 did not accept connections within 10 s"
    );
    let ca_pem = dir.path().join("certs/ca.pem");
    Running {
        ip,
        _dir: dir,
        ca_pem,
        stop: Some(tx),
        task,
    }
}

fn client_config(ca_pem: &std::path::Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

async fn handshake(
    r: &Running,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(format!("{}:443", r.ip)).await?;
    let connector = tokio_rustls::TlsConnector::from(client_config(&r.ca_pem, alpn));
    connector
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
}

#[tokio::test]
async fn tls_listener_serves_configured_names_and_refuses_others() {
    let r = start("127.0.4.1").await;

    // A configured upstream name: the chain verifies against the generated root.
    let mut tls = handshake(&r, "ghcr.io", &[b"http/1.1"])
        .await
        .expect("handshake for ghcr.io");
    tls.write_all(b"GET /v2/ HTTP/1.1\r\nHost: ghcr.io\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    tls.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("docker-distribution-api-version: registry/2.0"),
        "{resp}"
    );

    // The proxy's own name works too (explicit mode over TLS), and HTTP/2 is offered.
    let tls = handshake(&r, "regmirror.test", &[b"h2", b"http/1.1"])
        .await
        .expect("handshake for server.name");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // Anything else is refused during the handshake.
    let refused = handshake(&r, "example.com", &[b"http/1.1"]).await;
    assert!(refused.is_err(), "unknown SNI must fail the handshake");
    let err = handshake(&r, "evil.ghcr.io", &[b"http/1.1"]).await.err();
    assert!(err.is_some(), "a subdomain of a configured name is not configured");
}

#[tokio::test]
async fn stalled_handshake_does_not_block_other_clients() {
    let r = start("127.0.4.2").await;
    // Open a TCP connection and say nothing.
    let _stalled = TcpStream::connect(format!("{}:443", r.ip)).await.unwrap();
    let tls = tokio::time::timeout(Duration::from_secs(5), handshake(&r, "ghcr.io", &[b"http/1.1"])).await;
    assert!(
        matches!(tls, Ok(Ok(_))),
        "a silent client must not hold up the accept loop"
    );
}

async fn get_with_host(r: &Running, sni: &str, host: &str) -> String {
    let mut tls = handshake(r, sni, &[b"http/1.1"]).await.expect("handshake");
    let req = format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    tls.read_to_string(&mut resp).await.unwrap();
    resp
}

#[tokio::test]
async fn a_connection_made_for_one_upstream_cannot_ask_another() {
    let r = start("127.0.4.3").await;
    let resp = get_with_host(&r, "ghcr.io", "quay.io").await;
    assert!(resp.starts_with("HTTP/1.1 421"), "SNI ghcr.io, Host quay.io: {resp}");
    assert!(resp.contains("\"errors\""), "an OCI error body: {resp}");
    let resp = get_with_host(&r, "regmirror.test", "ghcr.io").await;
    assert!(
        resp.starts_with("HTTP/1.1 421"),
        "SNI of the proxy, Host of an upstream: {resp}"
    );
    let resp = get_with_host(&r, "quay.io", "quay.io:443").await;
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "the same name with a port is fine: {resp}"
    );
}
