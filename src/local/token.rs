//! `/token` for local namespaces: Basic credentials (or the OAuth2
//! `password` grant containerd posts) exchanged for regmirror's own signed
//! token, scoped to what the user may do. The decisions are
//! `auth::local`'s; this is the HTTP around them.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use secrecy::SecretString;

use crate::auth::local::LocalAuth;
use crate::auth::signed_token::TOKEN_LIFETIME;
use crate::auth::token::TokenRequest;
use crate::registry::body::{full, Body};
use crate::registry::errors::RegistryError;
use crate::registry::App;

/// Whether a token request is for the local namespaces: a scope names one
/// of their repositories, or (a login, no repository scope) it names
/// regmirror's own service.
pub fn is_local(app: &App, req: &TokenRequest) -> bool {
    let Some(auth) = &app.auth.local else {
        return false;
    };
    let mut repos = req.scopes.iter().filter_map(|s| s.repository()).peekable();
    if repos.peek().is_none() {
        return req.service.as_deref() == Some(app.settings.server_name.as_str());
    }
    repos.any(|name| auth.namespace_of(name).is_some())
}

fn credentials(headers: &HeaderMap, req: &TokenRequest) -> Option<(String, SecretString)> {
    use base64::Engine;
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let encoded = v.strip_prefix("Basic ").or_else(|| v.strip_prefix("basic "))?;
        let raw = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (u, p) = text.split_once(':')?;
        return Some((u.to_string(), SecretString::from(p.to_string())));
    }
    let param = |k: &str| req.params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    match (param("username"), param("password")) {
        (Some(u), Some(p)) => Some((u, SecretString::from(p))),
        _ => None,
    }
}

/// Checks the login against every namespace the request touches (or, for
/// a bare login, every namespace that lists the user): the user is who
/// they say only if the password matches each file asked about.
async fn logged_in(auth: &LocalAuth, req: &TokenRequest, user: &str, password: &SecretString) -> bool {
    let mut namespaces: Vec<usize> = req
        .scopes
        .iter()
        .filter_map(|s| s.repository())
        .filter_map(|n| auth.namespace_of(n))
        .collect();
    namespaces.dedup();
    if namespaces.is_empty() {
        namespaces = (0..auth.namespaces().len())
            .filter(|&i| auth.namespaces()[i].users.has_user(user))
            .collect();
        if namespaces.is_empty() {
            return false;
        }
    }
    for ns in namespaces {
        if !auth.check_password(ns, user, password).await {
            return false;
        }
    }
    true
}

pub async fn serve(app: &App, req: &TokenRequest, headers: &HeaderMap) -> Result<Response<Body>, RegistryError> {
    let auth = app
        .auth
        .local
        .as_ref()
        .ok_or_else(|| RegistryError::internal("no local namespace is configured"))?;
    let user = match credentials(headers, req) {
        Some((user, password)) => {
            if !logged_in(auth, req, &user, &password).await {
                tracing::info!(user = %user, "local login refused: wrong user name or password");
                crate::metrics::METRICS.local_refused.inc();
                return Err(RegistryError::unauthorized("invalid user name or password"));
            }
            Some(user)
        }
        None => None,
    };
    let token = auth
        .grant(user.as_deref(), &req.scopes)
        .ok_or_else(|| RegistryError::internal("could not sign a token"))?;
    tracing::info!(
        user = user.as_deref().unwrap_or("anonymous"),
        scopes = req.scopes.len(),
        "local token issued"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let issued_at = crate::auth::token::rfc3339(now);
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": TOKEN_LIFETIME.as_secs(),
        "issued_at": issued_at,
    })
    .to_string();
    let body = Bytes::from(body);
    let mut resp = Response::new(full(body.clone()));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    Ok(resp)
}
