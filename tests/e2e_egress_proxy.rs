//! Egress through a corporate proxy: regmirror honours `HTTPS_PROXY` for its
//! upstream traffic and `NO_PROXY` to bypass it, as every other tool on the
//! host does.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use common::clients::Sandbox;
use common::images::{self, Format};
use common::regmirror::{Config, Regmirror};
use common::{alloc_ip, UpstreamEnv, UpstreamEnvOpts, UPSTREAM_HOST};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A minimal HTTP CONNECT proxy that records the targets it tunnelled to.
/// It resolves names from its own table, like a proxy with its own DNS.
struct ConnectProxy {
    addr: SocketAddr,
    targets: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConnectProxy {
    fn start(ip: IpAddr, names: HashMap<String, IpAddr>) -> ConnectProxy {
        let targets = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let seen = targets.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
                ready_tx.send(listener.local_addr().unwrap()).unwrap();
                let serve = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let seen = seen.clone();
                        let names = names.clone();
                        tokio::spawn(async move {
                            let mut reader = BufReader::new(stream);
                            let mut line = String::new();
                            if reader.read_line(&mut line).await.is_err() {
                                return;
                            }
                            loop {
                                let mut h = String::new();
                                if reader.read_line(&mut h).await.unwrap_or(0) == 0 || h == "\r\n" {
                                    break;
                                }
                            }
                            let mut client = reader.into_inner();
                            let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
                            seen.lock().unwrap().push(target.clone());
                            let (host, port) = target.rsplit_once(':').unwrap_or((&target, "443"));
                            let ip = names.get(host).copied();
                            let Some(ip) = ip else {
                                let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                                return;
                            };
                            let port: u16 = port.parse().unwrap_or(443);
                            let Ok(mut up) = tokio::net::TcpStream::connect((ip, port)).await else {
                                let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                                return;
                            };
                            let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await;
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = rx => {}
                }
            });
        });
        let addr = ready_rx.recv().unwrap();
        ConnectProxy {
            addr,
            targets,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pull_through(env_vars: Vec<(String, String)>, env: &UpstreamEnv, image: &str, digest: &str) {
    let mut cfg = Config::new(alloc_ip()).with_standard_upstreams(UPSTREAM_HOST, env.upstream.ip, &env.ca_file);
    cfg.env = env_vars;
    let rm = Regmirror::start(cfg);
    let client = Sandbox::new(rm.ip(), &rm.config.client_hostnames(), &rm.ca_pem);
    let (out, got) = client.skopeo_copy(image, None);
    out.assert_ok();
    assert_eq!(
        got.as_deref(),
        Some(digest),
        "pulled digest; regmirror log:\n{}",
        rm.log()
    );
}

#[test]
fn upstream_traffic_goes_through_https_proxy_unless_no_proxy_says_otherwise() {
    let env = UpstreamEnv::start(UpstreamEnvOpts::default());
    let image = images::build_image(Format::Docker, "amd64", &[100 * 1024, 200 * 1024]);
    env.pusher.push_image("library/proxied", "1", &image);
    let names = HashMap::from([(UPSTREAM_HOST.to_string(), env.upstream.ip)]);
    let proxy = ConnectProxy::start(alloc_ip(), names);
    let proxy_url = format!("http://{}", proxy.addr);

    pull_through(
        vec![("HTTPS_PROXY".into(), proxy_url.clone())],
        &env,
        "docker.io/library/proxied:1",
        &image.manifest_digest,
    );
    let tunnelled = proxy.targets();
    assert!(
        tunnelled.iter().any(|t| t == &format!("{UPSTREAM_HOST}:443")),
        "regmirror did not tunnel to the upstream through HTTPS_PROXY: {tunnelled:?}"
    );

    let before = proxy.targets().len();
    pull_through(
        vec![
            ("HTTPS_PROXY".into(), proxy_url),
            ("NO_PROXY".into(), UPSTREAM_HOST.into()),
        ],
        &env,
        "docker.io/library/proxied:1",
        &image.manifest_digest,
    );
    assert_eq!(
        proxy.targets().len(),
        before,
        "NO_PROXY={UPSTREAM_HOST} must bypass the proxy"
    );
}
