//! An in-process Docker token server (the `auth: token` realm of
//! distribution), plain HTTP on its own loopback address.
//!
//! GET `/token?service=..&scope=repository:NAME:pull,push` (several `scope`
//! parameters allowed) with optional Basic auth, and the OAuth2 POST form
//! (`grant_type=password`). The configured user gets pull+push, anonymous
//! callers pull only (nothing on repositories under a private prefix), a wrong
//! password gets 401. Tokens are ES256 JWTs with the signing certificate in
//! `x5c`; that certificate is distribution's `rootcertbundle`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use super::certs::SigningCert;

/// What the token server grants.
#[derive(Clone, Debug)]
pub struct TokenPolicy {
    /// `(user, password)` allowed pull+push.
    pub user: Option<(String, String)>,
    /// Repositories starting with one of these are denied to anonymous callers.
    pub private_prefixes: Vec<String>,
    /// `expires_in` of issued tokens, seconds.
    pub expires_in: u64,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        TokenPolicy {
            user: Some(("pusher".into(), "s3cret-pw".into())),
            private_prefixes: Vec::new(),
            expires_in: 300,
        }
    }
}

/// One request the token server answered (or refused).
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub method: String,
    /// `None` for anonymous callers.
    pub user: Option<String>,
    pub service: String,
    pub scopes: Vec<String>,
    pub status: u16,
    pub user_agent: String,
}

struct Shared {
    policy: TokenPolicy,
    issuer: String,
    key: EcdsaKeyPair,
    x5c: String,
    rng: ring::rand::SystemRandom,
    served: AtomicUsize,
    log: Mutex<Vec<TokenRequest>>,
    jti: AtomicUsize,
}

/// A running token server; stopped on Drop.
pub struct TokenServer {
    pub addr: SocketAddr,
    /// `http://IP:PORT/token`, the realm to configure.
    pub realm: String,
    pub issuer: String,
    /// PEM of the signing certificate (distribution's `rootcertbundle`).
    pub rootcertbundle: PathBuf,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TokenServer {
    /// Starts on `ip` (ephemeral port); writes the signing cert under `dir`.
    pub fn start(ip: IpAddr, dir: &Path, policy: TokenPolicy) -> TokenServer {
        let issuer = "regmirror-test-token-issuer".to_string();
        let signing = SigningCert::new(&dir.join("token-signing.pem"), "test token signer");
        let rng = ring::rand::SystemRandom::new();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &signing.pkcs8, &rng).expect("load signing key");
        let shared = Arc::new(Shared {
            policy,
            issuer: issuer.clone(),
            key,
            x5c: STANDARD.encode(&signing.cert_der),
            rng,
            served: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            jti: AtomicUsize::new(0),
        });
        let listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0)).expect("bind token server");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("token-server-{addr}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(serve(listener, task_shared, stop_rx));
            })
            .expect("spawn token server thread");
        TokenServer {
            addr,
            realm: format!("http://{addr}/token"),
            issuer,
            rootcertbundle: signing.pem_path,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Number of token requests served so far (any status).
    pub fn served(&self) -> usize {
        self.shared.served.load(Ordering::SeqCst)
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared.log.lock().expect("token log").clone()
    }

    /// Requests answered after index `mark` (a previous `served()` value).
    pub fn requests_since(&self, mark: usize) -> Vec<TokenRequest> {
        self.requests().into_iter().skip(mark).collect()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(listener: std::net::TcpListener, shared: Arc<Shared>, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(req, &shared).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
    conns.abort_all();
}

async fn handle(req: Request<hyper::body::Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let user_agent = header(&req, "user-agent");
    let basic = header(&req, "authorization");
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let mut params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    if method == "POST" {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        params.extend(form_urlencoded::parse(&body).into_owned());
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let service = get("service").unwrap_or_default();
    let scopes: Vec<String> = params
        .iter()
        .filter(|(n, _)| n == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();

    // Credentials: Basic header (GET) or the OAuth2 password grant (POST).
    let creds = parse_basic(&basic).or_else(|| match (get("username"), get("password")) {
        (Some(u), Some(p)) if get("grant_type").as_deref() == Some("password") => Some((u, p)),
        _ => None,
    });
    let (status, body, user) = if path != "/token" {
        (StatusCode::NOT_FOUND, "not found".to_string(), None)
    } else {
        match creds {
            Some((u, p)) => {
                let ok = shared.policy.user.as_ref().is_some_and(|(cu, cp)| *cu == u && *cp == p);
                if ok {
                    (StatusCode::OK, issue(shared, &service, &scopes, Some(&u)), Some(u))
                } else {
                    (
                        StatusCode::UNAUTHORIZED,
                        r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#.to_string(),
                        Some(u),
                    )
                }
            }
            None => (StatusCode::OK, issue(shared, &service, &scopes, None), None),
        }
    };
    shared.log.lock().expect("token log").push(TokenRequest {
        method,
        user,
        service,
        scopes,
        status: status.as_u16(),
        user_agent,
    });
    shared.served.fetch_add(1, Ordering::SeqCst);
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

fn header<B>(req: &Request<B>, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn parse_basic(value: &str) -> Option<(String, String)> {
    let b64 = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let raw = String::from_utf8(STANDARD.decode(b64.trim()).ok()?).ok()?;
    let (u, p) = raw.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// Builds and signs the token JSON for the granted subset of `scopes`.
fn issue(shared: &Shared, service: &str, scopes: &[String], user: Option<&str>) -> String {
    let mut access: Vec<serde_json::Value> = Vec::new();
    for scope in scopes {
        // repository:NAME:ACTIONS — NAME may contain ':' only with a port, never here.
        let mut parts = scope.splitn(3, ':');
        let (Some(typ), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if typ != "repository" {
            continue;
        }
        let private = shared
            .policy
            .private_prefixes
            .iter()
            .any(|p| name.starts_with(p.as_str()));
        let granted: Vec<&str> = actions
            .split(',')
            .filter(|a| match (user.is_some(), *a) {
                (true, "pull" | "push") => true,
                (false, "pull") => !private,
                _ => false,
            })
            .collect();
        access.push(serde_json::json!({"type": typ, "name": name, "actions": granted}));
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
    let jti = shared.jti.fetch_add(1, Ordering::SeqCst);
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [shared.x5c]});
    let claims = serde_json::json!({
        "iss": shared.issuer,
        "sub": user.unwrap_or(""),
        "aud": service,
        "exp": now + shared.policy.expires_in,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("tok-{now}-{jti}"),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = shared
        .key
        .sign(&shared.rng, signing_input.as_bytes())
        .expect("sign JWT");
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
    let issued_at = rfc3339(now);
    serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": shared.policy.expires_in,
        "issued_at": issued_at,
    })
    .to_string()
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Counts requests per user name (`""` for anonymous), for quick assertions.
pub fn by_user(reqs: &[TokenRequest]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in reqs {
        *m.entry(r.user.clone().unwrap_or_default()).or_insert(0) += 1;
    }
    m
}
