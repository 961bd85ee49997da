//! regmirror served inside the test process, for the tests that pair it
//! with the in-process fake upstream (`fake_upstream`): started from a
//! config text, ready once `/healthz` answers, stopped when dropped.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running `regmirror::serve`, listening on `http://<ip>:5000`.
pub struct Served {
    pub base: String,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<(), regmirror::StartError>>,
}

impl Served {
    /// Serves `toml` (whose plain listener is `<ip>:5000`) and waits until it
    /// answers `GET /healthz` with 200; panics naming `ip` if it never does.
    pub async fn start(ip: &str, toml: &str, what: &str) -> Served {
        let settings = regmirror::config::Settings::from_toml(toml, what).expect("test config is valid");
        let (tx, rx) = oneshot::channel();
        let mut task = tokio::spawn(regmirror::serve(settings, async move {
            let _ = rx.await;
        }));
        let base = format!("http://{ip}:5000");
        let _ = rustls::crypto::ring::default_provider().install_default();
        let c = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        for _ in 0..500 {
            if task.is_finished() {
                let r = (&mut task).await;
                panic!("regmirror on {ip} stopped during start-up: {r:?}");
            }
            if let Ok(r) = c.get(format!("{base}/healthz")).send().await {
                if r.status() == 200 {
                    return Served {
                        base,
                        stop: Some(tx),
                        task,
                    };
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("regmirror on {ip} did not answer GET /healthz with 200 within 10 s");
    }

    /// Asks for a graceful shutdown (open connections may finish).
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop();
        self.task.abort();
    }
}

/// A plain HTTP client for regmirror and the fake upstream. Its timeout is a
/// safety net so a hang fails the test instead of stalling it; no assertion
/// depends on it.
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}

/// A response header as text, when present and readable.
pub fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}
