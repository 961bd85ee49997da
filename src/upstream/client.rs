//! One upstream registry's HTTP client.
//!
//! TLS trusts the system roots plus the upstream's `ca_file`; names resolve
//! through [`super::resolve`]; `HTTPS_PROXY`/`NO_PROXY` are honoured;
//! redirects (to CDNs) are followed here under [`super::redirect`]'s rules;
//! bodies are never decompressed (the digest covers the raw bytes).
//! Timeouts are per phase: connect, response headers, and the idle gap
//! between body chunks, never a total that caps a large layer.
//!
//! An upstream has one or more URLs (mirrors of the same registry), tried in
//! the configured order. Each URL has its own [`Health`], its own
//! authentication scheme and its own token cache. A request that fails on
//! one URL (connect error, timeout, 5xx, 408, 429) goes on to the next; when
//! every URL failed, reads are retried `retries` times after `retry_delay`
//! (doubled each time, with jitter), never sooner than a URL's
//! `Retry-After` and never past one overall deadline: a `Retry-After`
//! beyond the planned wait ends the request with the URL's answer at once
//! (a tag is then served stale). Any other answer (a 404, a 401) is an
//! answer, returned at once. When every URL is known down, a request fails
//! at once with [`Error::Unavailable`] instead of waiting out a timeout per
//! URL.
//!
//! Each request says whose credential it carries: none, regmirror's own
//! (configured), or the client's own `Authorization`, which is sent as it
//! is and never cached or used for anyone else.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::error::{error_chain, Error, Phase, TokenError};
use super::health::{parse_retry_after, Admission, Health, UrlState};
use super::redirect::{self, RedirectPolicy};
use super::resolve::UpstreamResolver;
use super::response::Response;
use super::token::{parse_challenge, Challenge, TokenCache, TokenScope};
use crate::config::{Credentials, Upstream};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const HEADERS_TIMEOUT: Duration = Duration::from_secs(30);
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest one request may take to get an answer, over every URL and
/// retry together: clients (docker, containerd) give up on a registry not
/// much later than this, and should rather get our error than their own.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// Token answers are small JSON documents; more is not relayed.
const MAX_TOKEN_ANSWER: usize = 64 * 1024;

/// The header regmirror adds to its own upstream requests; seeing its own
/// value come back means an upstream name resolved to regmirror itself.
pub const VIA_HEADER: &str = "x-regmirror-via";

/// What upstream said about authentication on its `/v2/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthScheme {
    /// Not asked yet (or upstream could not be reached when asked).
    Unknown,
    /// Upstream serves without any challenge.
    Open,
    Challenges(Challenge),
}

pub struct UpstreamClient {
    pub name: String,
    http: reqwest::Client,
    credentials: Option<Credentials>,
    /// The upstream's URLs in the order they are tried.
    endpoints: Vec<Endpoint>,
    retries: u32,
    retry_delay: Duration,
    via: HeaderValue,
}

/// One URL of an upstream, with everything learnt about it: a mirror may
/// authenticate differently from the registry it mirrors, so nothing here
/// is shared between URLs.
struct Endpoint {
    base: url::Url,
    /// For redirect targets: no credentials, and a resolver that refuses
    /// private addresses other than this URL's own host.
    redirects: reqwest::Client,
    policy: RedirectPolicy,
    tokens: TokenCache,
    /// The URL's challenge, so later requests carry a token up front
    /// instead of paying a 401 round trip each. Learnt only from answers of
    /// the URL itself, never from a redirect target.
    auth: Mutex<AuthScheme>,
    /// When asking the URL how it authenticates last failed: not asked
    /// again for a while, so a down URL does not slow every request.
    discovery_failed: Mutex<Option<Instant>>,
    health: Arc<Health>,
}

impl Endpoint {
    fn auth_scheme(&self) -> AuthScheme {
        self.auth.lock().map(|a| a.clone()).unwrap_or(AuthScheme::Unknown)
    }

    fn learn(&self, scheme: AuthScheme) {
        if let Ok(mut a) = self.auth.lock() {
            *a = scheme;
        }
    }

    /// Not backing off right now (asked without claiming a probe).
    fn looks_up(&self) -> bool {
        !self.health.backing_off(Instant::now())
    }
}

/// Frees a URL's probe slot if the request probing it is dropped before
/// it reported an outcome (a client that left mid-request).
struct ProbeGuard<'a>(Option<&'a Health>);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.0 {
            h.release_probe();
        }
    }
}

/// How long a failed discovery is not retried.
const DISCOVERY_BACKOFF: Duration = Duration::from_secs(10);
/// The longest a discovery may take before the scheme is left unknown.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Whose credential an upstream request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// Nothing but anonymous tokens: what anyone could fetch.
    Anonymous,
    /// The upstream's configured `username`/`password_file`.
    Configured,
    /// The client's own `Authorization` header, sent as it is.
    Client(HeaderValue),
}

/// Where a 206's body starts, from its `Content-Range` (`bytes N-M/T`).
pub fn content_range_start(v: &str) -> Option<u64> {
    v.strip_prefix("bytes ")?.split('-').next()?.trim().parse().ok()
}

/// A request for upstream, already in upstream's names.
#[derive(Clone)]
pub struct UpstreamRequest {
    pub method: Method,
    /// Path below the upstream URL, e.g. `/v2/library/alpine/manifests/3`.
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// Token scope, e.g. `repository:library/alpine:pull`.
    pub scope: String,
    pub credential: Credential,
}

/// A token request to relay to upstream's realm, already in upstream's
/// names (scopes rewritten, upstream's own service).
pub struct TokenRelay {
    pub method: Method,
    /// Query parameters (GET) to send.
    pub query: Vec<(String, String)>,
    /// The form body (POST), `application/x-www-form-urlencoded`.
    pub form: Option<String>,
    pub authorization: Option<HeaderValue>,
}

/// The realm's answer, passed back to the client unchanged.
pub struct TokenAnswer {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("upstream {upstream}: ca_file {path}: {message}")]
    CaFile {
        upstream: String,
        path: String,
        message: String,
    },
    #[error("upstream {upstream}: {message}")]
    Build { upstream: String, message: String },
}

impl UpstreamClient {
    pub fn new(cfg: &Upstream, resolver: Arc<UpstreamResolver>, via: &str) -> Result<Self, ClientBuildError> {
        let build_err = |message: String| ClientBuildError::Build {
            upstream: cfg.name.clone(),
            message,
        };
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = &cfg.ca_file {
            let ca_err = |message: String| ClientBuildError::CaFile {
                upstream: cfg.name.clone(),
                path: path.display().to_string(),
                message,
            };
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| ca_err(e.to_string()))?;
            let mut n = 0;
            for cert in certs {
                roots
                    .add(cert.map_err(|e| ca_err(e.to_string()))?)
                    .map_err(|e| ca_err(e.to_string()))?;
                n += 1;
            }
            if n == 0 {
                return Err(ca_err("no certificates in file".into()));
            }
        }
        if roots.is_empty() {
            return Err(build_err(
                "no trusted root certificates (install ca-certificates or set ca_file)".into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| build_err(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // HTTP/1.1 only, one connection per concurrent request (pooled):
        // over HTTP/2 every download shares one connection's flow-control
        // window and one core's decryption, and the CNCF registry's HTTP/2
        // server sent a 200 MiB blob at 0.55x its HTTP/1.1 rate and answered
        // a tag HEAD 0.25 ms later (issue 16's measurements).
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let builder = || {
            reqwest::Client::builder()
                .use_preconfigured_tls(tls.clone())
                .http1_only()
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(BODY_IDLE_TIMEOUT)
                // Redirects are followed by `send`, under `redirect`'s rules.
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("regmirror/", env!("CARGO_PKG_VERSION")))
                .pool_idle_timeout(Duration::from_secs(90))
        };
        let http = builder()
            .dns_resolver(resolver.clone())
            .build()
            .map_err(|e| build_err(e.to_string()))?;
        let mut endpoints = Vec::new();
        for url in &cfg.urls {
            let policy = RedirectPolicy::new(url, &cfg.private_redirect_hosts);
            let redirects = builder()
                .dns_resolver(Arc::new(redirect::GuardedResolver::new(
                    resolver.clone(),
                    policy.clone(),
                )))
                .build()
                .map_err(|e| build_err(e.to_string()))?;
            endpoints.push(Endpoint {
                base: url.clone(),
                redirects,
                policy,
                tokens: TokenCache::default(),
                auth: Mutex::new(AuthScheme::Unknown),
                discovery_failed: Mutex::new(None),
                health: Arc::new(Health::new(&cfg.name, url.as_str())),
            });
        }
        if endpoints.is_empty() {
            return Err(build_err("no URL configured".into()));
        }
        Ok(UpstreamClient {
            name: cfg.name.clone(),
            http,
            credentials: cfg.credentials.clone(),
            endpoints,
            retries: cfg.retries,
            retry_delay: cfg.retry_delay,
            via: HeaderValue::from_str(via).map_err(|e| build_err(e.to_string()))?,
        })
    }

    /// Each URL's health, in configured order: what the status page and
    /// metrics show an operator deciding whether a mirror is the problem.
    pub fn url_states(&self) -> Vec<UrlState> {
        self.endpoints.iter().map(|e| e.health.snapshot()).collect()
    }

    /// What upstream said of authentication, as far as known: the scheme
    /// of the first URL in use that has said, since that is where requests
    /// go (and where a client's relayed token comes from).
    pub fn auth_scheme(&self) -> AuthScheme {
        self.scheme_endpoint().map_or(AuthScheme::Unknown, |e| e.auth_scheme())
    }

    fn scheme_endpoint(&self) -> Option<&Endpoint> {
        let known = |e: &&Endpoint| e.auth_scheme() != AuthScheme::Unknown;
        self.endpoints
            .iter()
            .filter(known)
            .find(|e| e.looks_up())
            .or_else(|| self.endpoints.iter().find(known))
    }

    /// Upstream's authentication scheme, asking the `/v2/` of its URLs in
    /// order (skipping those known down) until one says. Unreachable URLs
    /// leave it unknown.
    pub async fn discover_auth(&self) -> AuthScheme {
        for ep in self.endpoints.iter().filter(|e| e.looks_up()) {
            let scheme = self.discover_on(ep).await;
            if scheme != AuthScheme::Unknown {
                return scheme;
            }
        }
        self.auth_scheme()
    }

    async fn discover_on(&self, ep: &Endpoint) -> AuthScheme {
        let known = ep.auth_scheme();
        if known != AuthScheme::Unknown {
            return known;
        }
        let recently_failed = ep
            .discovery_failed
            .lock()
            .ok()
            .and_then(|f| *f)
            .is_some_and(|at| at.elapsed() < DISCOVERY_BACKOFF);
        if recently_failed {
            return AuthScheme::Unknown;
        }
        let probe = UpstreamRequest {
            method: Method::GET,
            path: "/v2/".into(),
            query: None,
            headers: HeaderMap::new(),
            scope: String::new(),
            credential: Credential::Anonymous,
        };
        let url = ep.base.as_str();
        let answer = match tokio::time::timeout(DISCOVERY_TIMEOUT, self.send_once(ep, &probe, None)).await {
            Ok(a) => a,
            Err(_) => Err(Error::Timeout {
                upstream: self.name.clone(),
                phase: Phase::Headers,
                after: DISCOVERY_TIMEOUT,
            }),
        };
        let scheme = match answer {
            Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                ep.health.success();
                match resp.header(header::WWW_AUTHENTICATE).and_then(parse_challenge) {
                    Some(c) => AuthScheme::Challenges(c),
                    None => AuthScheme::Unknown,
                }
            }
            // Any other answer but a failure of upstream itself: it does not
            // ask for credentials.
            Ok(resp) if !fails_url_status(resp.status()) => {
                ep.health.success();
                AuthScheme::Open
            }
            Ok(resp) => {
                let retry_after = resp.header(header::RETRY_AFTER).and_then(parse_retry_after);
                tracing::debug!(upstream = %self.name, url, status = %resp.status(), "upstream /v2/ failed");
                ep.health
                    .failure(&format!("GET /v2/ answered {}", resp.status()), retry_after);
                AuthScheme::Unknown
            }
            Err(e) => {
                tracing::debug!(upstream = %self.name, url, error = %e, "could not ask upstream how it authenticates");
                if fails_url(&e) {
                    ep.health.failure(&e.to_string(), None);
                }
                AuthScheme::Unknown
            }
        };
        if scheme == AuthScheme::Unknown {
            if let Ok(mut f) = ep.discovery_failed.lock() {
                *f = Some(Instant::now());
            }
        } else {
            ep.learn(scheme.clone());
        }
        scheme
    }

    /// Relays a client's token request to the realm this upstream named,
    /// and hands back its answer as it is.
    pub async fn relay_token(&self, relay: TokenRelay) -> Result<TokenAnswer, Error> {
        let AuthScheme::Challenges(Challenge::Bearer { realm, .. }) = self.discover_auth().await else {
            return Err(Error::Protocol {
                upstream: self.name.clone(),
                message: "upstream named no token realm".into(),
            });
        };
        let token_err = |source| Error::Token {
            upstream: self.name.clone(),
            source,
        };
        let mut url = url::Url::parse(&realm).map_err(|_| token_err(TokenError::BadRealm { realm: realm.clone() }))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(token_err(TokenError::BadRealm { realm }));
        }
        if !relay.query.is_empty() {
            url.query_pairs_mut().extend_pairs(relay.query.iter());
        }
        let mut req = self.http.request(relay.method, url).timeout(HEADERS_TIMEOUT);
        if let Some(a) = relay.authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        if let Some(form) = relay.form {
            req = req
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(form);
        }
        let transport = |e: reqwest::Error| {
            token_err(TokenError::Transport {
                realm: realm.clone(),
                message: error_chain(&e),
            })
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
        let body = Response::new(&self.name, resp, BODY_IDLE_TIMEOUT, None)
            .bytes(MAX_TOKEN_ANSWER, "token answer")
            .await?;
        Ok(TokenAnswer {
            status,
            content_type,
            body,
        })
    }

    /// Sends `req` to the upstream's URLs in order, with retries (see the
    /// module doc), doing the token dance when a URL asks for it (with
    /// regmirror's credential), or with the client's own credential as it
    /// is. Returns the first answer that is not a failure of the URL,
    /// whatever its status; a 5xx, 408 or 429 that outlasted every retry,
    /// and transport and token failures, are errors.
    pub async fn send(&self, req: &UpstreamRequest) -> Result<Response, Error> {
        self.send_with(req, false).await
    }

    /// Sends `req` and expects a 200: anything else is an [`Error`].
    pub async fn get_ok(&self, req: &UpstreamRequest) -> Result<Response, Error> {
        self.send(req).await?.ok().await
    }

    /// GETs the rest of a body from byte `offset` on (`Range: bytes=N-`),
    /// to resume a download that broke off; the answer and the offset its
    /// body starts at: `offset` when the URL honoured the range, 0 when it
    /// sent the whole body again. Goes to the next URL when the one that
    /// broke is backing off, and back to it when no other is left.
    pub async fn get_from(&self, req: &UpstreamRequest, offset: u64) -> Result<(Response, u64), Error> {
        if offset == 0 {
            return Ok((self.get_ok(req).await?, 0));
        }
        let mut ranged = req.clone();
        let range = HeaderValue::from_str(&format!("bytes={offset}-")).map_err(|e| Error::Protocol {
            upstream: self.name.clone(),
            message: format!("range from {offset}: {e}"),
        })?;
        ranged.headers.insert(header::RANGE, range);
        let resp = self.send_with(&ranged, true).await?;
        match resp.status() {
            StatusCode::OK => Ok((resp, 0)),
            StatusCode::PARTIAL_CONTENT => {
                let start = resp.header(header::CONTENT_RANGE).and_then(content_range_start);
                if start == Some(offset) {
                    Ok((resp, offset))
                } else {
                    Err(Error::Protocol {
                        upstream: self.name.clone(),
                        message: format!(
                            "asked for bytes from {offset}, got Content-Range {:?}",
                            resp.header(header::CONTENT_RANGE).unwrap_or("(none)")
                        ),
                    })
                }
            }
            _ => Err(resp.into_error().await),
        }
    }

    /// The failover and retry loop. `resuming`: the rest of a download that
    /// broke, which may go back to a URL in back-off when no other is left
    /// (the URL did answer; only its body broke).
    async fn send_with(&self, req: &UpstreamRequest, resuming: bool) -> Result<Response, Error> {
        let start = Instant::now();
        let deadline = start + REQUEST_DEADLINE;
        let idempotent = matches!(req.method, Method::GET | Method::HEAD);
        let passes = if idempotent { self.retries + 1 } else { 1 };
        let mut tried = vec![false; self.endpoints.len()];
        // Each URL's Retry-After, as this request heard it.
        let mut not_before: Vec<Option<Instant>> = vec![None; self.endpoints.len()];
        let mut last_err: Option<Error> = None;
        for pass in 0..passes {
            if pass > 0 {
                let Some(wait) = self.retry_wait(pass, &tried, &not_before, deadline) else {
                    break;
                };
                tracing::debug!(upstream = %self.name, pass, ?wait, "retrying upstream request");
                tokio::time::sleep(wait).await;
            }
            let mut sent_this_pass = false;
            for (i, ep) in self.endpoints.iter().enumerate() {
                let now = Instant::now();
                let mut guard = ProbeGuard(None);
                let admitted = match ep.health.admit(now) {
                    Admission::Use => true,
                    Admission::Probe => {
                        guard.0 = Some(&ep.health);
                        true
                    }
                    // A URL this request already tried may be tried again on
                    // a retry pass; a broken download may go back to a URL
                    // when no other took it. Never before its Retry-After.
                    Admission::Skip { .. } => {
                        let again = (pass > 0 && tried[i]) || (resuming && !sent_this_pass && last_err.is_none());
                        again && ep.health.retry_allowed(now).is_ok() && not_before[i].is_none_or(|t| t <= now)
                    }
                };
                if !admitted || now >= deadline {
                    continue;
                }
                // A resumed download tries the backing-off URL only after
                // every other one.
                if resuming && pass == 0 && !ep.looks_up() && self.other_up(i) {
                    continue;
                }
                tried[i] = true;
                sent_this_pass = true;
                let outcome = match tokio::time::timeout(deadline - now, self.send_to(ep, req)).await {
                    Ok(r) => r,
                    Err(_) => Err(Error::Timeout {
                        upstream: self.name.clone(),
                        phase: Phase::Headers,
                        after: REQUEST_DEADLINE,
                    }),
                };
                match outcome {
                    Ok(resp) if fails_url_status(resp.status()) => {
                        let retry_after = resp.header(header::RETRY_AFTER).and_then(parse_retry_after);
                        not_before[i] = retry_after.map(|r| Instant::now() + r);
                        let err = resp.into_error().await;
                        // An error answer is a reason to skip the URL only
                        // when another can take its requests: the last URL
                        // standing is still asked (its answers may differ
                        // by path, and a 404 must still reach clients).
                        if self.other_up(i) {
                            self.failed(ep, &err, retry_after);
                        } else {
                            ep.health.note(&err.to_string());
                        }
                        last_err = Some(err);
                    }
                    Ok(resp) => {
                        ep.health.success();
                        return Ok(resp);
                    }
                    Err(e) if fails_url(&e) => {
                        // Unreachable or stalled: skip it. A token realm
                        // failing: as an error answer.
                        if matches!(e, Error::Connect { .. } | Error::Timeout { .. }) || self.other_up(i) {
                            self.failed(ep, &e, None);
                        } else {
                            ep.health.note(&e.to_string());
                        }
                        // Only a request that never left may go elsewhere
                        // when it is not safe to send twice.
                        let never_sent = matches!(e, Error::Connect { .. });
                        last_err = Some(e);
                        if !idempotent && !never_sent {
                            break;
                        }
                    }
                    Err(e) => {
                        drop(guard);
                        return Err(e);
                    }
                }
                drop(guard);
            }
            if pass == 0 && !sent_this_pass {
                return Err(self.unavailable());
            }
            if !idempotent {
                break;
            }
        }
        Err(last_err.unwrap_or_else(|| self.unavailable()))
    }

    fn other_up(&self, except: usize) -> bool {
        self.endpoints
            .iter()
            .enumerate()
            .any(|(j, e)| j != except && e.looks_up())
    }

    fn failed(&self, ep: &Endpoint, e: &Error, retry_after: Option<Duration>) {
        tracing::warn!(upstream = %self.name, url = %ep.base, error = %e, "upstream URL failed");
        ep.health.failure(&e.to_string(), retry_after);
    }

    /// Every URL is backing off: say so at once, with when to come back.
    fn unavailable(&self) -> Error {
        let now = std::time::SystemTime::now();
        let states = self.url_states();
        let soonest = states
            .iter()
            .filter_map(|s| s.backing_off_until)
            .min()
            .and_then(|t| t.duration_since(now).ok())
            .unwrap_or_default();
        let last_error = states
            .iter()
            .filter_map(|s| s.last_error.as_ref().map(|(e, at)| (at, format!("{}: {e}", s.url))))
            .max_by_key(|(at, _)| **at)
            .map_or_else(|| "none recorded".to_string(), |(_, e)| e);
        Error::Unavailable {
            upstream: self.name.clone(),
            retry_after: Duration::from_secs(soonest.as_secs() + 1),
            last_error,
        }
    }

    /// How long to wait before retry pass `pass`: `retry_delay` doubled per
    /// pass with jitter. `None` (give up now, with the last answer) when
    /// that would pass the deadline, or when every URL tried asked, with
    /// `Retry-After`, for more time than that: never retried sooner, and
    /// the client hears it at once instead of waiting.
    fn retry_wait(
        &self,
        pass: u32,
        tried: &[bool],
        not_before: &[Option<Instant>],
        deadline: Instant,
    ) -> Option<Duration> {
        let now = Instant::now();
        let base = self.retry_delay.saturating_mul(1 << (pass - 1).min(10));
        let wait = base / 2 + base.mul_f64(jitter() / 2.0);
        let retry_at = now + wait;
        let any_ready = self.endpoints.iter().enumerate().any(|(i, e)| {
            tried[i] && e.health.retry_allowed(retry_at).is_ok() && not_before[i].is_none_or(|t| t <= retry_at)
        });
        (any_ready && retry_at < deadline).then_some(wait)
    }

    /// Sends `req` to one URL, with the token dance.
    async fn send_to(&self, ep: &Endpoint, req: &UpstreamRequest) -> Result<Response, Error> {
        if let Credential::Client(h) = &req.credential {
            let resp = self.send_once(ep, req, Some(h)).await?;
            if resp.status() == StatusCode::UNAUTHORIZED {
                if let Some(c) = resp.header(header::WWW_AUTHENTICATE).and_then(parse_challenge) {
                    ep.learn(AuthScheme::Challenges(c));
                }
            }
            return Ok(resp);
        }
        let creds = match req.credential {
            Credential::Configured => self.credentials.as_ref(),
            _ => None,
        };
        let known = match ep.auth_scheme() {
            AuthScheme::Challenges(c) => Some(c),
            _ => None,
        };
        let auth = match &known {
            Some(c) => self.authorization(ep, c, &req.scope, creds, false).await?,
            None => None,
        };
        let resp = self.send_once(ep, req, auth.as_ref()).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let Some(challenge) = resp.header(header::WWW_AUTHENTICATE).and_then(parse_challenge) else {
            return Ok(resp);
        };
        let retry_same = known.as_ref() == Some(&challenge) && auth.is_none();
        ep.learn(AuthScheme::Challenges(challenge.clone()));
        if retry_same && matches!(challenge, Challenge::Basic) {
            return Ok(resp);
        }
        // A token we sent was refused (expired, revoked): fetch a fresh one once.
        let refresh = auth.is_some();
        match self.authorization(ep, &challenge, &req.scope, creds, refresh).await? {
            Some(a) => self.send_once(ep, req, Some(&a)).await,
            None => Ok(resp),
        }
    }

    async fn authorization(
        &self,
        ep: &Endpoint,
        c: &Challenge,
        scope: &str,
        creds: Option<&Credentials>,
        refresh: bool,
    ) -> Result<Option<HeaderValue>, Error> {
        match c {
            Challenge::Basic => Ok(creds.and_then(|c| {
                use base64::Engine;
                let raw = format!("{}:{}", c.username, c.password);
                HeaderValue::from_str(&format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                ))
                .ok()
            })),
            Challenge::Bearer { realm, service, .. } => {
                let t = ep
                    .tokens
                    .token(
                        &self.http,
                        &TokenScope {
                            realm,
                            service: service.as_deref(),
                            scope,
                        },
                        creds,
                        refresh,
                    )
                    .await
                    .map_err(|source| Error::Token {
                        upstream: self.name.clone(),
                        source,
                    })?;
                Ok(HeaderValue::from_str(&format!("Bearer {t}")).ok())
            }
        }
    }

    /// One request to one URL, then any redirects it answers with,
    /// followed under the redirect rules (rule 8) without credentials.
    async fn send_once(
        &self,
        ep: &Endpoint,
        req: &UpstreamRequest,
        auth: Option<&HeaderValue>,
    ) -> Result<Response, Error> {
        let mut url = ep.base.clone();
        url.set_path(&req.path);
        url.set_query(req.query.as_deref());
        let mut builder = self
            .http
            .request(req.method.clone(), url.clone())
            .headers(req.headers.clone())
            .header(VIA_HEADER, self.via.clone());
        if let Some(a) = auth.filter(|a| !a.is_empty()) {
            builder = builder.header(header::AUTHORIZATION, a.clone());
        }
        tracing::debug!(upstream = %self.name, method = %req.method, %url, "upstream request");
        let mut resp = self.exchange(builder).await?;
        let mut hops = 0;
        while resp.status().is_redirection() && resp.status() != StatusCode::NOT_MODIFIED {
            let follow = matches!(req.method, Method::GET | Method::HEAD);
            let Some(location) = resp.headers().get(header::LOCATION).and_then(|l| l.to_str().ok()) else {
                break;
            };
            if !follow {
                break;
            }
            hops += 1;
            let target = resp
                .url()
                .join(location)
                .map_err(|e| self.redirect_refused(location, &e.to_string()))?;
            if hops > redirect::MAX_HOPS {
                return Err(self.redirect_refused(target.as_str(), "too many redirects"));
            }
            ep.policy
                .check(&target)
                .map_err(|why| self.redirect_refused(target.as_str(), &why))?;
            tracing::debug!(upstream = %self.name, to = %redirect::redacted(&target), "following redirect");
            let builder = ep
                .redirects
                .request(req.method.clone(), target.clone())
                .headers(req.headers.clone())
                .header(VIA_HEADER, self.via.clone());
            resp = self.exchange(builder).await?;
            if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
                // Never a realm to send credentials to: an upstream error.
                return Err(self.redirect_refused(
                    target.as_str(),
                    &format!("the redirect target answered {}", resp.status()),
                ));
            }
        }
        Ok(Response::new(
            &self.name,
            resp,
            BODY_IDLE_TIMEOUT,
            Some(ep.health.clone()),
        ))
    }

    fn redirect_refused(&self, target: &str, why: &str) -> Error {
        let target = url::Url::parse(target)
            .map(|u| redirect::redacted(&u))
            .unwrap_or_else(|_| "an unparsable location".into());
        Error::Protocol {
            upstream: self.name.clone(),
            message: format!("redirect to {target} not followed: {why}"),
        }
    }

    async fn exchange(&self, builder: reqwest::RequestBuilder) -> Result<reqwest::Response, Error> {
        let timeout = |phase| Error::Timeout {
            upstream: self.name.clone(),
            phase,
            after: match phase {
                Phase::Connect => CONNECT_TIMEOUT,
                Phase::Headers => HEADERS_TIMEOUT,
                Phase::Body => BODY_IDLE_TIMEOUT,
            },
        };
        let result = match tokio::time::timeout(HEADERS_TIMEOUT, builder.send()).await {
            Err(_) => Err(timeout(Phase::Headers)),
            Ok(Err(e)) if e.is_timeout() && e.is_connect() => Err(timeout(Phase::Connect)),
            Ok(Err(e)) if e.is_timeout() => Err(timeout(Phase::Headers)),
            Ok(Err(e)) if e.is_connect() => Err(Error::Connect {
                upstream: self.name.clone(),
                message: error_chain(&e),
            }),
            Ok(Err(e)) => Err(Error::Reset {
                upstream: self.name.clone(),
                message: error_chain(&e),
            }),
            Ok(Ok(resp)) => Ok(resp),
        };
        super::observed::record(&self.name, &result);
        result
    }
}

/// A failure that says the URL could not serve us (down, slow, overloaded,
/// rate-limiting), so another URL or a later retry may do better. Answers
/// about the content (404, 401, a refused redirect) are not.
fn fails_url(e: &Error) -> bool {
    match e {
        Error::Connect { .. } | Error::Reset { .. } | Error::Timeout { .. } | Error::Unavailable { .. } => true,
        Error::Status { status, .. } => fails_url_status(*status),
        Error::Token { .. } => e.is_transient(),
        Error::Protocol { .. } | Error::TooLarge { .. } | Error::Loop { .. } => false,
    }
}

/// 5xx, 408 and 429: the URL failed; any other status is an answer. 508 is
/// our own loop answer coming back (rule 15): a configuration error, not
/// a URL to retry or skip.
fn fails_url_status(status: StatusCode) -> bool {
    (status.is_server_error() && status != StatusCode::LOOP_DETECTED)
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// A number in [0, 1) that differs between calls, to spread retries of
/// many requests so they do not hit a recovering upstream all at once.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}
