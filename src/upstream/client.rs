//! One upstream registry's HTTP client.
//!
//! TLS trusts the system roots plus the upstream's `ca_file`; names resolve
//! through [`super::resolve`]; `HTTPS_PROXY`/`NO_PROXY` are honoured;
//! redirects (to CDNs) are followed here under [`super::redirect`]'s rules;
//! bodies are never decompressed (the digest covers the raw bytes).
//! Timeouts are per phase: connect, response headers, and the idle gap
//! between body chunks, never a total that caps a large layer.
//!
//! Each request says whose credential it carries: none, regmirror's own
//! (configured), or the client's own `Authorization`, which is sent as it
//! is and never cached or used for anyone else.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::error::{error_chain, Error, Phase, TokenError};
use super::redirect::{self, RedirectPolicy};
use super::resolve::UpstreamResolver;
use super::response::Response;
use super::token::{parse_challenge, Challenge, TokenCache, TokenScope};
use crate::config::{Credentials, Upstream};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const HEADERS_TIMEOUT: Duration = Duration::from_secs(30);
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
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
    base: url::Url,
    http: reqwest::Client,
    /// For redirect targets: no credentials, and a resolver that refuses
    /// private addresses other than the upstream's own.
    redirects: reqwest::Client,
    policy: RedirectPolicy,
    credentials: Option<Credentials>,
    tokens: TokenCache,
    /// Upstream's challenge, so later requests carry a token up front
    /// instead of paying a 401 round trip each. Learnt only from answers of
    /// the configured host itself, never from a redirect target.
    auth: Mutex<AuthScheme>,
    /// When asking upstream how it authenticates last failed: not asked
    /// again for a while, so a down upstream does not slow every request.
    discovery_failed: Mutex<Option<std::time::Instant>>,
    via: HeaderValue,
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

/// A request for upstream, already in upstream's names.
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
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let policy = RedirectPolicy::new(&cfg.url, &cfg.private_redirect_hosts);
        let builder = || {
            reqwest::Client::builder()
                .use_preconfigured_tls(tls.clone())
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
        let redirects = builder()
            .dns_resolver(Arc::new(redirect::GuardedResolver::new(resolver, policy.clone())))
            .build()
            .map_err(|e| build_err(e.to_string()))?;
        Ok(UpstreamClient {
            name: cfg.name.clone(),
            base: cfg.url.clone(),
            http,
            redirects,
            policy,
            credentials: cfg.credentials.clone(),
            tokens: TokenCache::default(),
            auth: Mutex::new(AuthScheme::Unknown),
            discovery_failed: Mutex::new(None),
            via: HeaderValue::from_str(via).map_err(|e| build_err(e.to_string()))?,
        })
    }

    /// What upstream said of authentication, as far as known.
    pub fn auth_scheme(&self) -> AuthScheme {
        self.auth.lock().map(|a| a.clone()).unwrap_or(AuthScheme::Unknown)
    }

    fn learn(&self, scheme: AuthScheme) {
        if let Ok(mut a) = self.auth.lock() {
            *a = scheme;
        }
    }

    /// Upstream's authentication scheme, asking its `/v2/` once when not
    /// known yet. An unreachable upstream leaves it unknown.
    pub async fn discover_auth(&self) -> AuthScheme {
        let known = self.auth_scheme();
        if known != AuthScheme::Unknown {
            return known;
        }
        let recently_failed = self
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
        let Ok(answer) = tokio::time::timeout(DISCOVERY_TIMEOUT, self.send_once(&probe, None)).await else {
            tracing::debug!(upstream = %self.name, "upstream did not say how it authenticates in time");
            self.discovery_failed_now();
            return AuthScheme::Unknown;
        };
        let scheme = match answer {
            Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                match resp.header(header::WWW_AUTHENTICATE).and_then(parse_challenge) {
                    Some(c) => AuthScheme::Challenges(c),
                    None => AuthScheme::Unknown,
                }
            }
            // Any other answer but a failure of upstream itself: it does not
            // ask for credentials.
            Ok(resp) if !resp.status().is_server_error() => AuthScheme::Open,
            Ok(resp) => {
                tracing::debug!(upstream = %self.name, status = %resp.status(), "upstream /v2/ failed");
                AuthScheme::Unknown
            }
            Err(e) => {
                tracing::debug!(upstream = %self.name, error = %e, "could not ask upstream how it authenticates");
                AuthScheme::Unknown
            }
        };
        if scheme == AuthScheme::Unknown {
            self.discovery_failed_now();
        } else {
            self.learn(scheme.clone());
        }
        scheme
    }

    fn discovery_failed_now(&self) {
        if let Ok(mut f) = self.discovery_failed.lock() {
            *f = Some(std::time::Instant::now());
        }
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
        let body = Response::new(&self.name, resp, BODY_IDLE_TIMEOUT)
            .bytes(MAX_TOKEN_ANSWER, "token answer")
            .await?;
        Ok(TokenAnswer {
            status,
            content_type,
            body,
        })
    }

    /// Sends `req`, doing the token dance when upstream asks for it (with
    /// regmirror's credential), or with the client's own credential as it
    /// is. Returns upstream's response whatever its status; only transport
    /// and token failures are errors.
    pub async fn send(&self, req: &UpstreamRequest) -> Result<Response, Error> {
        if let Credential::Client(h) = &req.credential {
            let resp = self.send_once(req, Some(h)).await?;
            self.learn_from(&resp);
            return Ok(resp);
        }
        let creds = match req.credential {
            Credential::Configured => self.credentials.as_ref(),
            _ => None,
        };
        let known = match self.auth_scheme() {
            AuthScheme::Challenges(c) => Some(c),
            _ => None,
        };
        let auth = match &known {
            Some(c) => self.authorization(c, &req.scope, creds, false).await?,
            None => None,
        };
        let resp = self.send_once(req, auth.as_ref()).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let Some(challenge) = resp.header(header::WWW_AUTHENTICATE).and_then(parse_challenge) else {
            return Ok(resp);
        };
        let retry_same = known.as_ref() == Some(&challenge) && auth.is_none();
        self.learn(AuthScheme::Challenges(challenge.clone()));
        if retry_same && matches!(challenge, Challenge::Basic) {
            return Ok(resp);
        }
        // A token we sent was refused (expired, revoked): fetch a fresh one once.
        let refresh = auth.is_some();
        match self.authorization(&challenge, &req.scope, creds, refresh).await? {
            Some(a) => self.send_once(req, Some(&a)).await,
            None => Ok(resp),
        }
    }

    /// Keeps upstream's challenge from an answer to a client's own request.
    fn learn_from(&self, resp: &Response) {
        if resp.status() == StatusCode::UNAUTHORIZED {
            if let Some(c) = resp.header(header::WWW_AUTHENTICATE).and_then(parse_challenge) {
                self.learn(AuthScheme::Challenges(c));
            }
        }
    }

    /// Sends `req` and expects a 200: anything else is an [`Error`].
    pub async fn get_ok(&self, req: &UpstreamRequest) -> Result<Response, Error> {
        self.send(req).await?.ok().await
    }

    async fn authorization(
        &self,
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
                let t = self
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

    /// One request to the configured host, then any redirects it answers
    /// with, followed under the redirect rules (rule 8) without credentials.
    async fn send_once(&self, req: &UpstreamRequest, auth: Option<&HeaderValue>) -> Result<Response, Error> {
        let mut url = self.base.clone();
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
            self.policy
                .check(&target)
                .map_err(|why| self.redirect_refused(target.as_str(), &why))?;
            tracing::debug!(upstream = %self.name, to = %redirect::redacted(&target), "following redirect");
            let builder = self
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
        Ok(Response::new(&self.name, resp, BODY_IDLE_TIMEOUT))
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
            Ok(Err(e)) => Err(Error::Connect {
                upstream: self.name.clone(),
                message: error_chain(&e),
            }),
            Ok(Ok(resp)) => Ok(resp),
        };
        super::observed::record(&self.name, &result);
        result
    }
}
