//! An in-process fake upstream registry for fault-injection tests.
//!
//! A hyper 1 (HTTP/1.1) server on a loopback address that serves a set of
//! resources by exact path, counts every request per (method, path), and can
//! be told at runtime to misbehave on a given path: corrupt or cut bodies,
//! error statuses, redirects, or a body that stalls half-way until the test
//! opens a gate, or break successive downloads of a path at given offsets.
//! It honours `Range: bytes=N-` (unless told to ignore ranges) and counts
//! the body bytes it sends. It can also demand a Bearer token, issued by its own
//! `/token` endpoint, the way Docker Hub does.
//!
//! Dropping a [`FakeUpstream`] stops its accept loop and every connection it
//! has open.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type FakeBody = BoxBody<Bytes, BoxError>;

/// `sha256:<hex>` of `data`.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Deterministic, seed-specific filler bytes (distinct seeds give distinct digests).
pub fn bytes_for(seed: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut block = Sha256::digest(seed.as_bytes());
    while out.len() < len {
        out.extend_from_slice(&block);
        block = Sha256::digest(block);
    }
    out.truncate(len);
    out
}

/// How the fake answers requests for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Serve the resource as stored.
    Normal,
    /// Same length, different bytes.
    Corrupt,
    /// `Content-Length` announces the full size, half the bytes are sent,
    /// then the connection is closed.
    Truncate,
    /// No `Content-Length` (chunked); half the bytes, then the connection is
    /// cut without the terminating chunk.
    DropMidBody,
    /// No `Content-Length` (chunked); half the bytes, then a clean end.
    ShortChunked,
    /// Answer with this status and an OCI error body (GET and HEAD).
    Status(u16),
    /// 429 with `Retry-After: <secs>` (GET and HEAD).
    TooMany { retry_after: u64 },
    /// 307 to this absolute URL (GET and HEAD).
    Redirect(String),
    /// HEAD answers 404, GET serves: a chained cache that has not fetched
    /// the blob yet.
    HeadNotFound,
}

/// What is stored under one path.
#[derive(Debug, Clone)]
pub struct Resource {
    pub body: Bytes,
    pub content_type: String,
    /// Sent as `Docker-Content-Digest` when set.
    pub digest: Option<String>,
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub status: u16,
}

#[derive(Default)]
struct Inner {
    resources: HashMap<String, Resource>,
    faults: HashMap<String, Fault>,
    seen: Vec<Seen>,
    /// Paths whose bodies stop half-way until the gate opens.
    gated: HashSet<String>,
    /// When set, `/v2/...` needs `Authorization: Bearer <token>` for the
    /// repository the token was issued for.
    require_bearer: bool,
    /// token → scopes it grants
    tokens: HashMap<String, Vec<String>>,
    /// Repositories under these prefixes: only `user` gets tokens for them.
    private_prefixes: Vec<String>,
    /// (user, password) the token endpoint accepts with Basic auth or the
    /// OAuth2 password grant; a wrong password gets 401.
    user: Option<(String, String)>,
    /// The token endpoint answers every request with 401.
    refuse_tokens: bool,
    /// The user each token request came from (`None`: anonymous), in order.
    token_users: Vec<Option<String>>,
    /// Paths answered only after this long (whatever the answer).
    delays: HashMap<String, std::time::Duration>,
    /// scopes asked of `/token`, in order
    token_requests: Vec<String>,
    /// Headers added to every answer (e.g. Docker Hub's `ratelimit-remaining`).
    extra_headers: Vec<(String, String)>,
    /// Per path: the offsets at which successive GETs cut the connection,
    /// one per GET, first to last.
    cuts: HashMap<String, std::collections::VecDeque<u64>>,
    /// Answer every GET with the whole body, whatever its Range says.
    ignore_range: bool,
    /// Per path: the body bytes sent by GETs.
    body_bytes: HashMap<String, u64>,
    /// Per path: the Range headers GETs carried, in order (`None`: none).
    ranges: HashMap<String, Vec<Option<String>>>,
}

struct Shared {
    addr: SocketAddr,
    inner: Mutex<Inner>,
    gate: watch::Sender<bool>,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        // The accept loop owns the listener and the JoinSet of connections:
        // aborting it drops both, which aborts every connection task.
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl FakeUpstream {
    /// Starts a fake on `bind` (e.g. `"127.0.3.201:0"`).
    pub async fn start(bind: &str) -> FakeUpstream {
        let listener = TcpListener::bind(bind)
            .await
            .unwrap_or_else(|e| panic!("fake upstream cannot bind {bind}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        let (gate, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            addr,
            inner: Mutex::new(Inner::default()),
            gate,
        });
        let s = shared.clone();
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stop_rx => {
                        drop(listener);
                        conns.shutdown().await;
                        return;
                    }
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let s = s.clone();
                        conns.spawn(async move {
                            let svc = service_fn(move |req| {
                                let s = s.clone();
                                async move { Ok::<_, Infallible>(answer(&s, req).await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        FakeUpstream {
            addr,
            shared,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// Stops the fake and returns once its listener is closed and every
    /// connection it had is gone: from here on it is unreachable.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn put(&self, path: &str, res: Resource) {
        self.inner().resources.insert(path.to_string(), res);
    }

    /// Stores a blob of `repo` (upstream name, e.g. `library/x`); returns
    /// (digest, path).
    pub fn add_blob(&self, repo: &str, data: &[u8]) -> (String, String) {
        let d = digest_of(data);
        let path = format!("/v2/{repo}/blobs/{d}");
        self.put(
            &path,
            Resource {
                body: Bytes::copy_from_slice(data),
                content_type: "application/octet-stream".into(),
                digest: Some(d.clone()),
            },
        );
        (d, path)
    }

    /// Stores a manifest under its digest and, when given, a tag; returns the digest.
    pub fn add_manifest(&self, repo: &str, tag: Option<&str>, media_type: &str, body: &[u8]) -> String {
        let d = digest_of(body);
        let res = Resource {
            body: Bytes::copy_from_slice(body),
            content_type: media_type.into(),
            digest: Some(d.clone()),
        };
        self.put(&format!("/v2/{repo}/manifests/{d}"), res.clone());
        if let Some(t) = tag {
            self.put(&format!("/v2/{repo}/manifests/{t}"), res);
        }
        d
    }

    pub fn set_fault(&self, path: &str, fault: Fault) {
        self.inner().faults.insert(path.to_string(), fault);
    }

    /// Adds `name: value` to every answer from now on (replacing an
    /// earlier value of that header).
    pub fn always_header(&self, name: &str, value: &str) {
        let mut inner = self.inner();
        inner.extra_headers.retain(|(n, _)| n != name);
        inner.extra_headers.push((name.to_string(), value.to_string()));
    }

    pub fn clear_fault(&self, path: &str) {
        self.inner().faults.remove(path);
    }

    /// Bodies of `path` stop half-way until [`open_gate`](Self::open_gate).
    pub fn gate(&self, path: &str) {
        self.inner().gated.insert(path.to_string());
    }

    pub fn open_gate(&self) {
        self.shared.gate.send_replace(true);
    }

    /// Answers for `path` (a 404 included) come only after `by`.
    pub fn delay(&self, path: &str, by: std::time::Duration) {
        self.inner().delays.insert(path.to_string(), by);
    }

    /// Repositories under `prefix` are readable only with `user`'s tokens.
    pub fn private_prefix(&self, prefix: &str) {
        self.inner().private_prefixes.push(prefix.to_string());
    }

    /// The user and password the token endpoint accepts.
    pub fn set_user(&self, user: &str, password: &str) {
        self.inner().user = Some((user.to_string(), password.to_string()));
    }

    /// The token endpoint refuses everyone (401).
    pub fn refuse_tokens(&self, on: bool) {
        self.inner().refuse_tokens = on;
    }

    /// The user of each token request (`None`: anonymous), in order.
    pub fn token_users(&self) -> Vec<Option<String>> {
        self.inner().token_users.clone()
    }

    pub fn require_bearer(&self, on: bool) {
        self.inner().require_bearer = on;
    }

    /// Successive GETs of `path` cut the connection once they have sent the
    /// body up to each of `offsets` (absolute positions in the content), one
    /// offset per GET; later GETs are served whole.
    pub fn cut_at(&self, path: &str, offsets: &[u64]) {
        self.inner()
            .cuts
            .insert(path.to_string(), offsets.iter().copied().collect());
    }

    /// Ignore `Range` headers: every GET gets a 200 with the whole body.
    pub fn ignore_range(&self, on: bool) {
        self.inner().ignore_range = on;
    }

    /// Body bytes GETs of `path` were sent (cut bodies count what was sent).
    pub fn body_bytes(&self, path: &str) -> u64 {
        self.inner().body_bytes.get(path).copied().unwrap_or(0)
    }

    /// The `Range` of each GET of `path`, in order.
    pub fn ranges(&self, path: &str) -> Vec<Option<String>> {
        self.inner().ranges.get(path).cloned().unwrap_or_default()
    }

    /// Requests seen for (method, path), whatever their outcome.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.inner()
            .seen
            .iter()
            .filter(|s| s.method.as_str() == method && s.path == path)
            .count()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.inner().seen.clone()
    }

    /// Scopes asked of the token endpoint, one entry per token request.
    pub fn token_requests(&self) -> Vec<String> {
        self.inner().token_requests.clone()
    }
}

fn full(data: impl Into<Bytes>) -> FakeBody {
    Full::new(data.into()).map_err(|never| match never {}).boxed()
}

fn json_error(status: u16, code: &str) -> Response<FakeBody> {
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"fake upstream says {status}","detail":null}}]}}"#);
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(status).expect("status");
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `/v2/<repo>/(manifests|blobs|tags)/...` → `<repo>`.
fn repo_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    ["/manifests/", "/blobs/", "/tags/"]
        .iter()
        .filter_map(|k| rest.rfind(k).map(|i| &rest[..i]))
        .next()
}

async fn answer(s: &Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<FakeBody> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let delay = s
        .inner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .delays
        .get(&path)
        .copied();
    if let Some(by) = delay {
        tokio::time::sleep(by).await;
    }
    // A token POST carries its parameters in a form body: read them like a query.
    let query = if method == Method::POST && path == "/token" {
        let form = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let form = String::from_utf8_lossy(&form).into_owned();
        Some(match query {
            Some(q) => format!("{q}&{form}"),
            None => form,
        })
    } else {
        query
    };
    let mut resp = respond(
        s,
        &method,
        &path,
        query.as_deref(),
        authorization.as_deref(),
        range.as_deref(),
    );
    let mut inner = s.inner.lock().unwrap_or_else(|p| p.into_inner());
    for (name, value) in &inner.extra_headers {
        if let (Ok(n), Ok(v)) = (
            http::header::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            resp.headers_mut().insert(n, v);
        }
    }
    inner.seen.push(Seen {
        method,
        path,
        query,
        authorization,
        status: resp.status().as_u16(),
    });
    resp
}

fn respond(
    s: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: Option<&str>,
    auth: Option<&str>,
    range: Option<&str>,
) -> Response<FakeBody> {
    let mut inner = s.inner.lock().unwrap_or_else(|p| p.into_inner());

    if path == "/token" {
        let mut scopes = Vec::new();
        let (mut user, mut password, mut refresh) = (None, None, None);
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "scope" => scopes.extend(v.split(' ').filter(|s| !s.is_empty()).map(str::to_string)),
                "username" => user = Some(v.into_owned()),
                "password" => password = Some(v.into_owned()),
                "refresh_token" => refresh = Some(v.into_owned()),
                _ => {}
            }
        }
        if let Some((u, p)) = auth.and_then(|a| a.strip_prefix("Basic ")).and_then(parse_basic) {
            (user, password) = (Some(u), Some(p));
        }
        if refresh.as_deref() == Some("good-refresh-token") {
            user = inner.user.as_ref().map(|u| u.0.clone());
            password = inner.user.as_ref().map(|u| u.1.clone());
        }
        inner.token_requests.push(scopes.join(" "));
        inner.token_users.push(user.clone());
        let authenticated = match (&user, &inner.user) {
            (None, _) => false,
            (Some(u), Some((want_u, want_p))) if u == want_u && password.as_ref() == Some(want_p) => true,
            _ => return json_error(401, "UNAUTHORIZED"),
        };
        if inner.refuse_tokens {
            return json_error(401, "UNAUTHORIZED");
        }
        let granted: Vec<String> = scopes
            .iter()
            .filter(|sc| {
                let repo = sc.split(':').nth(1).unwrap_or("");
                authenticated || !inner.private_prefixes.iter().any(|p| repo.starts_with(p.as_str()))
            })
            .cloned()
            .collect();
        let token = format!("tok-{}", inner.token_requests.len());
        inner.tokens.insert(token.clone(), granted);
        let mut r = Response::new(full(format!(r#"{{"token":"{token}","expires_in":300}}"#)));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return r;
    }

    if path == "/v2/" && !inner.require_bearer {
        let mut r = Response::new(full("{}"));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return r;
    }

    if inner.require_bearer && path.starts_with("/v2/") {
        let repo = repo_of(path).unwrap_or("");
        let want = format!("repository:{repo}:pull");
        let ok = auth
            .and_then(|a| a.strip_prefix("Bearer "))
            .and_then(|t| inner.tokens.get(t))
            .is_some_and(|granted| granted.contains(&want));
        if !ok {
            let mut r = json_error(401, "UNAUTHORIZED");
            let challenge = format!(
                r#"Bearer realm="http://{}/token",service="fake-registry",scope="{want}""#,
                s.addr
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_str(&challenge).expect("challenge"),
            );
            return r;
        }
    }

    let fault = inner.faults.get(path).cloned().unwrap_or(Fault::Normal);
    match &fault {
        Fault::Status(code) => {
            let code_name = if *code == 404 { "MANIFEST_UNKNOWN" } else { "UNKNOWN" };
            return json_error(*code, code_name);
        }
        Fault::TooMany { retry_after } => {
            let mut r = json_error(429, "TOOMANYREQUESTS");
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            return r;
        }
        Fault::HeadNotFound if *method == Method::HEAD => return json_error(404, "BLOB_UNKNOWN"),
        Fault::Redirect(to) => {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            r.headers_mut()
                .insert(header::LOCATION, HeaderValue::from_str(to).expect("location"));
            return r;
        }
        _ => {}
    }

    let Some(res) = inner.resources.get(path).cloned() else {
        let code = if path.contains("/blobs/") {
            "BLOB_UNKNOWN"
        } else {
            "MANIFEST_UNKNOWN"
        };
        return json_error(404, code);
    };
    let gated = inner.gated.contains(path);
    if *method == Method::GET {
        inner
            .ranges
            .entry(path.to_string())
            .or_default()
            .push(range.map(str::to_string));
    }
    // `bytes=N-` only, the form a resuming client sends.
    let from = range
        .filter(|_| !inner.ignore_range && *method == Method::GET && fault == Fault::Normal)
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n < res.body.len());
    let cut = if *method == Method::GET && fault == Fault::Normal {
        inner.cuts.get_mut(path).and_then(|c| c.pop_front())
    } else {
        None
    };
    if *method == Method::GET && fault == Fault::Normal {
        let start = from.unwrap_or(0);
        let end = cut.map_or(res.body.len(), |c| (c as usize).clamp(start, res.body.len()));
        *inner.body_bytes.entry(path.to_string()).or_default() += (end - start) as u64;
    }
    drop(inner);

    let mut headers = http::HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&res.content_type).expect("content type"),
    );
    if let Some(d) = &res.digest {
        headers.insert("docker-content-digest", HeaderValue::from_str(d).expect("digest"));
    }
    let len = res.body.len();
    if *method == Method::HEAD {
        let mut r = Response::new(full(Bytes::new()));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        *r.headers_mut() = headers;
        return r;
    }

    if fault == Fault::Normal && (from.is_some() || cut.is_some()) {
        let start = from.unwrap_or(0);
        let end = cut.map_or(len, |c| (c as usize).clamp(start, len));
        let end_kind = if end < len { End::Cut } else { End::Clean };
        let mut r = Response::new(staged(s, gated, res.body.slice(start..end), end_kind));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len - start));
        if start > 0 {
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {start}-{}/{len}", len - 1)).expect("content range"),
            );
        }
        *r.headers_mut() = headers;
        return r;
    }
    let half = len / 2;
    let (body, announce_length) = match fault {
        Fault::Corrupt => {
            let mut bad = res.body.to_vec();
            for b in bad.iter_mut() {
                *b ^= 0x5a;
            }
            (staged(s, gated, Bytes::from(bad), End::Clean), true)
        }
        Fault::Truncate => (staged(s, gated, res.body.slice(..half), End::Clean), true),
        Fault::DropMidBody => (staged(s, gated, res.body.slice(..half), End::Cut), false),
        Fault::ShortChunked => (staged(s, gated, res.body.slice(..half), End::Clean), false),
        _ => (staged(s, gated, res.body.clone(), End::Clean), true),
    };
    if announce_length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    let mut r = Response::new(body);
    *r.headers_mut() = headers;
    r
}

#[derive(Clone, Copy)]
enum End {
    Clean,
    /// Error the body stream: hyper aborts the connection.
    Cut,
}

/// A streamed body: the first half of `data`, then (when gated) a wait for
/// the gate, then the rest, then a clean end or a cut connection.
fn staged(s: &Arc<Shared>, gated: bool, data: Bytes, end: End) -> FakeBody {
    let half = data.len() / 2;
    let mut parts: Vec<Bytes> = Vec::new();
    if half > 0 {
        parts.push(data.slice(..half));
    }
    if data.len() > half {
        parts.push(data.slice(half..));
    }
    let gate = s.gate.subscribe();
    struct St {
        parts: std::vec::IntoIter<Bytes>,
        sent: usize,
        gate: watch::Receiver<bool>,
        gated: bool,
        end: End,
        done: bool,
    }
    let st = St {
        parts: parts.into_iter(),
        sent: 0,
        gate,
        gated,
        end,
        done: false,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        if st.sent == 1 && st.gated {
            let _ = st.gate.wait_for(|open| *open).await;
        }
        match st.parts.next() {
            Some(p) => {
                st.sent += 1;
                Some((Ok::<_, BoxError>(Frame::data(p)), st))
            }
            None => {
                st.done = true;
                match st.end {
                    End::Clean => None,
                    End::Cut => Some((
                        Err::<Frame<Bytes>, BoxError>("fake upstream cuts the connection".into()),
                        st,
                    )),
                }
            }
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

fn parse_basic(b64: &str) -> Option<(String, String)> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}
