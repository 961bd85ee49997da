//! The Docker/OCI token flow against upstream registries.
//!
//! On a `401` with `WWW-Authenticate: Bearer realm=…,service=…,scope=…`
//! regmirror asks the realm for a token (GET, then the OAuth2 POST form when
//! the GET is refused and credentials are configured), anonymously or with
//! the upstream's configured credentials. Tokens are cached per (realm,
//! service, scope, credential) until shortly before they expire, so one
//! credential's token is never sent on another's behalf, and concurrent
//! requests for the same key make one token request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::config::Credentials;
use crate::registry::errors::RegistryError;

/// Used when the token response does not say how long the token lives.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses a `WWW-Authenticate` value (one challenge; quoted or bare params).
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    Some(Challenge::Bearer {
        realm: get("realm")?,
        service: get("service"),
        scope: get("scope"),
    })
}

fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next() != Some('=') {
            return out;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            val.push(n)
                        }
                    }
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            val = std::iter::from_fn(|| chars.next_if(|c| *c != ','))
                .collect::<String>()
                .trim()
                .to_string();
        }
        out.push((key.trim().to_string(), val));
    }
}

/// Which token: the realm and service of upstream's challenge, and the scope.
#[derive(Debug, Clone, Copy)]
pub struct TokenScope<'a> {
    pub realm: &'a str,
    pub service: Option<&'a str>,
    pub scope: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    realm: String,
    service: String,
    scope: String,
    credential: String,
}

#[derive(Clone)]
struct CachedToken {
    token: String,
    valid_until: Instant,
}

type Slot = Arc<tokio::sync::Mutex<Option<CachedToken>>>;

#[derive(Default)]
pub struct TokenCache {
    slots: Mutex<HashMap<TokenKey, Slot>>,
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl TokenCache {
    fn slot(&self, key: &TokenKey) -> Slot {
        let mut slots = match self.slots.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        slots.entry(key.clone()).or_default().clone()
    }

    /// A valid token for `scope`, from the cache or the realm. `refresh`
    /// drops a cached token first (upstream just rejected it).
    pub async fn token(
        &self,
        http: &reqwest::Client,
        upstream: &str,
        want: &TokenScope<'_>,
        creds: Option<&Credentials>,
        refresh: bool,
    ) -> Result<String, RegistryError> {
        let TokenScope { realm, service, scope } = *want;
        let key = TokenKey {
            realm: realm.to_string(),
            service: service.unwrap_or("").to_string(),
            scope: scope.to_string(),
            credential: creds.map(|c| c.username.clone()).unwrap_or_default(),
        };
        let slot = self.slot(&key);
        let mut guard = slot.lock().await;
        if refresh {
            *guard = None;
        }
        if let Some(t) = guard.as_ref() {
            if t.valid_until > Instant::now() {
                return Ok(t.token.clone());
            }
        }
        let (token, lifetime) = fetch(http, upstream, realm, service, scope, creds).await?;
        // Renew a little before upstream's expiry.
        let margin = (lifetime / 10).max(Duration::from_secs(5)).min(lifetime / 2);
        *guard = Some(CachedToken {
            token: token.clone(),
            valid_until: Instant::now() + lifetime - margin,
        });
        Ok(token)
    }
}

async fn fetch(
    http: &reqwest::Client,
    upstream: &str,
    realm: &str,
    service: Option<&str>,
    scope: &str,
    creds: Option<&Credentials>,
) -> Result<(String, Duration), RegistryError> {
    let url = url::Url::parse(realm)
        .map_err(|e| RegistryError::upstream_unavailable(upstream, format!("bad token realm {realm:?}: {e}")))?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(RegistryError::upstream_unavailable(
            upstream,
            format!("token realm {realm:?} is not http(s)"),
        ));
    }
    let mut get_url = url.clone();
    {
        let mut q = get_url.query_pairs_mut();
        if let Some(s) = service {
            q.append_pair("service", s);
        }
        q.append_pair("scope", scope);
    }
    let mut req = http.get(get_url);
    if let Some(c) = creds {
        req = req.basic_auth(&c.username, Some(&c.password));
    }
    crate::metrics::METRICS.upstream_requests.inc();
    let resp = req
        .send()
        .await
        .map_err(|e| RegistryError::upstream_unavailable(upstream, format!("token request to {realm}: {e}")))?;
    let post_with = match creds {
        Some(c) if !resp.status().is_success() && resp.status() != StatusCode::UNAUTHORIZED => Some(c),
        _ => None,
    };
    let resp = if let Some(c) = post_with {
        // OAuth2 password grant, for registries that only take POST.
        let form = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "password")
                .append_pair("client_id", "regmirror")
                .append_pair("username", &c.username)
                .append_pair("password", &c.password)
                .append_pair("scope", scope);
            if let Some(s) = service {
                form.append_pair("service", s);
            }
            form.finish()
        };
        crate::metrics::METRICS.upstream_requests.inc();
        http.post(url)
            .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(|e| RegistryError::upstream_unavailable(upstream, format!("token request to {realm}: {e}")))?
    } else {
        resp
    };
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .map_err(|e| RegistryError::upstream_unavailable(upstream, format!("token response: {e}")))?;
    if !status.is_success() {
        let mut e = RegistryError::from_upstream(upstream, status, &body, None);
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            e = RegistryError::new(
                StatusCode::FORBIDDEN,
                "DENIED",
                format!("upstream {upstream} refused a token for {scope}: {}", e.message),
            );
        }
        return Err(e);
    }
    let parsed: TokenResponse = serde_json::from_slice(&body)
        .map_err(|e| RegistryError::upstream_unavailable(upstream, format!("token response is not JSON: {e}")))?;
    let token = parsed
        .token
        .or(parsed.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| RegistryError::upstream_unavailable(upstream, "token response carries no token"))?;
    let lifetime = parsed
        .expires_in
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LIFETIME);
    Ok((token, lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_style_challenges() {
        let c = parse_challenge(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#).unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            }
        );
        let c = parse_challenge(
            r#"Bearer realm="https://ghcr.io/token", service="ghcr.io",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        match c {
            Challenge::Bearer { scope, service, .. } => {
                assert_eq!(scope.as_deref(), Some("repository:a/b:pull,push"));
                assert_eq!(service.as_deref(), Some("ghcr.io"));
            }
            _ => panic!(),
        }
        assert_eq!(parse_challenge(r#"Basic realm="x""#), Some(Challenge::Basic));
        assert_eq!(
            parse_challenge("Bearer service=x"),
            None,
            "a Bearer challenge needs a realm"
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }
}
