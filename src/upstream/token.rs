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

use super::error::{error_chain, OciBody, TokenError};
use crate::config::Credentials;

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

/// Token slots kept at most; past this, expired and unused ones go first.
const MAX_SLOTS: usize = 4096;

/// Drops slots whose token has expired and that nobody is fetching into;
/// if every slot is live, drops the unused ones anyway (they are fetched
/// again when needed), so the map never grows past its bound.
fn prune(slots: &mut HashMap<TokenKey, Slot>) {
    let now = Instant::now();
    slots.retain(|_, slot| match slot.try_lock() {
        Ok(t) => t.as_ref().is_some_and(|t| t.valid_until > now),
        Err(_) => true, // a fetch is under way
    });
    if slots.len() >= MAX_SLOTS {
        slots.retain(|_, slot| slot.try_lock().is_err());
    }
}

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
        if slots.len() >= MAX_SLOTS && !slots.contains_key(key) {
            prune(&mut slots);
        }
        slots.entry(key.clone()).or_default().clone()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// A valid token for `scope`, from the cache or the realm. `refresh`
    /// drops a cached token first (upstream just rejected it).
    pub async fn token(
        &self,
        http: &reqwest::Client,
        want: &TokenScope<'_>,
        creds: Option<&Credentials>,
        refresh: bool,
    ) -> Result<String, TokenError> {
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
        let (token, lifetime) = fetch(http, realm, service, scope, creds).await?;
        // Renew a little before upstream's expiry.
        let margin = (lifetime / 10).max(Duration::from_secs(5)).min(lifetime / 2);
        *guard = Some(CachedToken {
            token: token.clone(),
            valid_until: Instant::now() + lifetime - margin,
        });
        Ok(token)
    }
}

/// Token responses are small JSON documents; more is not read.
const MAX_TOKEN_BODY: usize = 64 * 1024;
/// A realm that does not answer within this is treated as down.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

async fn fetch(
    http: &reqwest::Client,
    realm: &str,
    service: Option<&str>,
    scope: &str,
    creds: Option<&Credentials>,
) -> Result<(String, Duration), TokenError> {
    let bad_realm = || TokenError::BadRealm {
        realm: realm.to_string(),
    };
    let url = url::Url::parse(realm).map_err(|_| bad_realm())?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(bad_realm());
    }
    let transport = |e: &dyn std::error::Error| TokenError::Transport {
        realm: realm.to_string(),
        message: error_chain(e),
    };
    let mut get_url = url.clone();
    {
        let mut q = get_url.query_pairs_mut();
        if let Some(s) = service {
            q.append_pair("service", s);
        }
        q.append_pair("scope", scope);
    }
    let mut req = http.get(get_url).timeout(TOKEN_TIMEOUT);
    if let Some(c) = creds {
        req = req.basic_auth(&c.username, Some(&c.password));
    }
    crate::metrics::METRICS.upstream_token_requests.inc();
    let resp = req.send().await.map_err(|e| transport(&e))?;
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
        crate::metrics::METRICS.upstream_token_requests.inc();
        http.post(url)
            .timeout(TOKEN_TIMEOUT)
            .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(|e| transport(&e))?
    } else {
        resp
    };
    let status = resp.status();
    let body = read_bounded(resp).await.map_err(|message| TokenError::Malformed {
        realm: realm.to_string(),
        message,
    })?;
    if !status.is_success() {
        return Err(TokenError::Refused {
            scope: scope.to_string(),
            status,
            body: OciBody::parse(&body),
        });
    }
    let malformed = |message: String| TokenError::Malformed {
        realm: realm.to_string(),
        message,
    };
    let parsed: TokenResponse =
        serde_json::from_slice(&body).map_err(|e| malformed(format!("not a token document: {e}")))?;
    let token = parsed
        .token
        .or(parsed.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| malformed("no token in it".into()))?;
    let lifetime = parsed
        .expires_in
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LIFETIME);
    Ok((token, lifetime))
}

/// Reads a token response body, refusing more than [`MAX_TOKEN_BODY`].
async fn read_bounded(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        if out.len() + chunk.len() > MAX_TOKEN_BODY {
            return Err(format!("body larger than {MAX_TOKEN_BODY} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_cache_is_bounded_and_drops_expired_tokens_first() {
        let cache = TokenCache::default();
        let key = |i: usize| TokenKey {
            realm: "r".into(),
            service: "s".into(),
            scope: format!("repository:x{i}:pull"),
            credential: String::new(),
        };
        let live = cache.slot(&key(0));
        *live.try_lock().unwrap() = Some(CachedToken {
            token: "t".into(),
            valid_until: Instant::now() + Duration::from_secs(60),
        });
        for i in 1..MAX_SLOTS * 2 {
            cache.slot(&key(i));
        }
        assert!(cache.len() <= MAX_SLOTS, "{} slots", cache.len());
        let again = cache.slot(&key(0));
        assert!(Arc::ptr_eq(&live, &again), "a live token survives pruning");
    }

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
