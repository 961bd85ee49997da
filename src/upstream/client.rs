//! One upstream registry's HTTP client.
//!
//! TLS trusts the system roots plus the upstream's `ca_file`; names resolve
//! through [`super::resolve`]; `HTTPS_PROXY`/`NO_PROXY` are honoured;
//! redirects (to CDNs) are followed here, with `Authorization` dropped when
//! the host changes; bodies are never decompressed (the digest covers the
//! raw bytes). Timeouts are per phase: connect, response headers, and the
//! idle gap between body chunks, never a total that caps a large layer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::error::{error_chain, Error, Phase};
use super::resolve::UpstreamResolver;
use super::response::Response;
use super::token::{parse_challenge, Challenge, TokenCache, TokenScope};
use crate::config::{Credentials, Upstream};
use crate::metrics::METRICS;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const HEADERS_TIMEOUT: Duration = Duration::from_secs(30);
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The header regmirror adds to its own upstream requests; seeing its own
/// value come back means an upstream name resolved to regmirror itself.
pub const VIA_HEADER: &str = "x-regmirror-via";

pub struct UpstreamClient {
    pub name: String,
    base: url::Url,
    http: reqwest::Client,
    credentials: Option<Credentials>,
    tokens: TokenCache,
    /// Upstream's last challenge, so later requests carry a token up front
    /// instead of paying a 401 round trip each.
    challenge: Mutex<Option<Challenge>>,
    via: HeaderValue,
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
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .dns_resolver(resolver)
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(BODY_IDLE_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(10))
            .user_agent(concat!("regmirror/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| build_err(e.to_string()))?;
        Ok(UpstreamClient {
            name: cfg.name.clone(),
            base: cfg.url.clone(),
            http,
            credentials: cfg.credentials.clone(),
            tokens: TokenCache::default(),
            challenge: Mutex::new(None),
            via: HeaderValue::from_str(via).map_err(|e| build_err(e.to_string()))?,
        })
    }

    /// Sends `req`, doing the token dance when upstream asks for it. Returns
    /// upstream's response whatever its status; only transport and token
    /// failures are errors.
    pub async fn send(&self, req: &UpstreamRequest) -> Result<Response, Error> {
        let known = self.challenge.lock().ok().and_then(|c| c.clone());
        let auth = match &known {
            Some(c) => self.authorization(c, &req.scope, false).await?,
            None => None,
        };
        let resp = self.send_once(req, auth.as_deref()).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let Some(challenge) = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge)
        else {
            return Ok(resp);
        };
        let retry_same = known.as_ref() == Some(&challenge) && auth.is_none();
        if let Ok(mut c) = self.challenge.lock() {
            *c = Some(challenge.clone());
        }
        if retry_same && matches!(challenge, Challenge::Basic) {
            return Ok(resp);
        }
        // A token we sent was refused (expired, revoked): fetch a fresh one once.
        let refresh = auth.is_some();
        match self.authorization(&challenge, &req.scope, refresh).await? {
            Some(a) => self.send_once(req, Some(&a)).await,
            None => Ok(resp),
        }
    }

    /// Sends `req` and expects a 200: anything else is an [`Error`].
    pub async fn get_ok(&self, req: &UpstreamRequest) -> Result<Response, Error> {
        self.send(req).await?.ok().await
    }

    async fn authorization(&self, c: &Challenge, scope: &str, refresh: bool) -> Result<Option<String>, Error> {
        match c {
            Challenge::Basic => Ok(self.credentials.as_ref().map(|c| {
                use base64::Engine;
                let raw = format!("{}:{}", c.username, c.password);
                format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
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
                        self.credentials.as_ref(),
                        refresh,
                    )
                    .await
                    .map_err(|source| Error::Token {
                        upstream: self.name.clone(),
                        source,
                    })?;
                Ok(Some(format!("Bearer {t}")))
            }
        }
    }

    async fn send_once(&self, req: &UpstreamRequest, auth: Option<&str>) -> Result<Response, Error> {
        let mut url = self.base.clone();
        url.set_path(&req.path);
        url.set_query(req.query.as_deref());
        let mut builder = self
            .http
            .request(req.method.clone(), url.clone())
            .headers(req.headers.clone());
        builder = builder.header(VIA_HEADER, self.via.clone());
        if let Some(a) = auth {
            builder = builder.header(header::AUTHORIZATION, a);
        }
        METRICS.upstream_requests.inc();
        tracing::debug!(upstream = %self.name, method = %req.method, %url, "upstream request");
        let timeout = |phase| Error::Timeout {
            upstream: self.name.clone(),
            phase,
            after: match phase {
                Phase::Connect => CONNECT_TIMEOUT,
                Phase::Headers => HEADERS_TIMEOUT,
                Phase::Body => BODY_IDLE_TIMEOUT,
            },
        };
        match tokio::time::timeout(HEADERS_TIMEOUT, builder.send()).await {
            Err(_) => Err(timeout(Phase::Headers)),
            Ok(Err(e)) if e.is_timeout() && e.is_connect() => Err(timeout(Phase::Connect)),
            Ok(Err(e)) if e.is_timeout() => Err(timeout(Phase::Headers)),
            Ok(Err(e)) => Err(Error::Connect {
                upstream: self.name.clone(),
                message: error_chain(&e),
            }),
            Ok(Ok(resp)) => Ok(Response::new(&self.name, resp, BODY_IDLE_TIMEOUT)),
        }
    }
}
