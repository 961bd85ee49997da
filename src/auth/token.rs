//! What regmirror's `/token` endpoint (`registry/token.rs`, where the realm
//! of its challenges points) decides:
//!
//! - With credentials (Basic on a GET; the OAuth2 `password` or
//!   `refresh_token` grant on a POST, as docker and containerd send them)
//!   the request is relayed to the realm the upstream itself named, with
//!   upstream's own `service` and every scope rewritten from client names
//!   to upstream names. Upstream's answer goes back as it is (its errors as
//!   its errors), so a wrong password fails `docker login`.
//! - Without credentials regmirror answers itself with an anonymous token
//!   and asks nobody, so a warm public pull costs upstream one tag HEAD and
//!   works while upstream's auth server is down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method};

use super::scope::{route_name, Scope};
use super::{ANONYMOUS_TOKEN_LIFETIME, ANONYMOUS_TOKEN_PREFIX};
use crate::reference::Digest;
use crate::route::RouteTable;
use crate::upstream::{TokenRelay, UpstreamId};

/// Token request bodies are small forms; more is refused.
pub const MAX_TOKEN_REQUEST: usize = 16 * 1024;

/// A token request as a client sent it, parsed.
#[derive(Debug, Default, PartialEq)]
pub struct TokenRequest {
    pub scopes: Vec<Scope>,
    /// Other parameters, passed on as they are (`account`, `client_id`,
    /// `offline_token`; on a POST also the grant and its secrets).
    pub params: Vec<(String, String)>,
    /// Whether the client presented credentials at all.
    pub has_credentials: bool,
    pub ns: Option<String>,
    /// The `service` the client names (regmirror's own name for local
    /// namespaces; upstream's is put in its place when relaying).
    pub service: Option<String>,
}

impl TokenRequest {
    /// Parses the query of a GET (with its `Authorization`) or the form of
    /// a POST. `scope` may repeat and hold several space-separated scopes.
    pub fn parse(method: &Method, query: Option<&str>, authorization: bool, form: &[u8]) -> TokenRequest {
        let mut out = TokenRequest::default();
        let take = |pairs: form_urlencoded::Parse<'_>, out: &mut TokenRequest| {
            for (k, v) in pairs {
                match &*k {
                    "scope" => out.scopes.extend(v.split(' ').filter_map(Scope::parse)),
                    "service" => out.service = Some(v.into_owned()),
                    "ns" => out.ns = Some(v.into_owned()),
                    _ => out.params.push((k.into_owned(), v.into_owned())),
                }
            }
        };
        take(form_urlencoded::parse(query.unwrap_or("").as_bytes()), &mut out);
        if *method == Method::POST {
            take(form_urlencoded::parse(form), &mut out);
            out.has_credentials = out
                .params
                .iter()
                .any(|(k, v)| (k == "password" || k == "refresh_token") && !v.is_empty());
        } else {
            out.has_credentials = authorization;
        }
        out
    }
}

/// How a token request with credentials is sent to upstream's realm: the
/// client's scopes in upstream's names, upstream's own `service`, every
/// other parameter as the client sent it.
pub struct RelayPlan {
    pub relay: TokenRelay,
    /// (upstream name, client name) of each repository scope renamed, to
    /// put the client's names back in upstream's answer.
    pub renamed: Vec<(String, String)>,
    pub scopes: usize,
}

/// Decides the relay of `req` (for upstream `id`, whose realm names
/// `service`), carrying the client's `authorization` on a GET.
pub fn relay_plan(
    routes: &RouteTable,
    host: Option<&str>,
    id: UpstreamId,
    req: &TokenRequest,
    method: &Method,
    service: Option<&str>,
    authorization: Option<HeaderValue>,
) -> RelayPlan {
    let ns = req.ns.as_deref();
    let mut renamed: Vec<(String, String)> = Vec::new();
    let scopes: Vec<String> = req
        .scopes
        .iter()
        .filter_map(|s| {
            let up = s.to_upstream(routes, host, ns, id)?;
            if let (Some(c), Some(u)) = (s.repository(), up.repository()) {
                renamed.push((u.to_string(), c.to_string()));
            }
            Some(up.to_string())
        })
        .collect();
    let relay = if *method == Method::POST {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.extend_pairs(req.params.iter());
        if let Some(s) = service {
            form.append_pair("service", s);
        }
        if !scopes.is_empty() {
            form.append_pair("scope", &scopes.join(" "));
        }
        TokenRelay {
            method: Method::POST,
            query: Vec::new(),
            form: Some(form.finish()),
            authorization: None,
        }
    } else {
        let mut q: Vec<(String, String)> = Vec::new();
        if let Some(s) = service {
            q.push(("service".into(), s.to_string()));
        }
        q.extend(scopes.iter().map(|s| ("scope".to_string(), s.clone())));
        q.extend(req.params.iter().cloned());
        TokenRelay {
            method: Method::GET,
            query: q,
            form: None,
            authorization,
        }
    };
    RelayPlan {
        relay,
        renamed,
        scopes: scopes.len(),
    }
}

/// Which upstream a token request is for: containerd's `ns`, the
/// intercepted host, the first repository scope, or the default upstream.
pub fn upstream_for(routes: &RouteTable, host: Option<&str>, req: &TokenRequest) -> UpstreamId {
    if let Some(id) = req.ns.as_deref().and_then(|n| routes.upstream_for_ns(n)) {
        return id;
    }
    if let Some(id) = host.and_then(|h| routes.upstream_for_host(h)) {
        return id;
    }
    req.scopes
        .iter()
        .filter_map(Scope::repository)
        .find_map(|name| route_name(routes, host, req.ns.as_deref(), name))
        .map(|(id, _)| id)
        .unwrap_or_else(|| routes.default_upstream())
}

/// A `scope` upstream echoes in its answer, put back in the client's names.
pub fn echo_in_client_names(body: Bytes, renamed: &[(String, String)]) -> Bytes {
    if renamed.is_empty() {
        return body;
    }
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return body;
    };
    let Some(echo) = v.get("scope").and_then(|s| s.as_str()) else {
        return body;
    };
    let back: Vec<String> = echo
        .split(' ')
        .map(|s| match Scope::parse(s) {
            Some(Scope::Repository { class, name, actions }) => {
                let name = renamed
                    .iter()
                    .find(|(u, _)| *u == name)
                    .map(|(_, c)| c.clone())
                    .unwrap_or(name);
                Scope::Repository { class, name, actions }.to_string()
            }
            _ => s.to_string(),
        })
        .collect();
    v["scope"] = serde_json::Value::String(back.join(" "));
    serde_json::to_vec(&v).map(Bytes::from).unwrap_or(body)
}

static ISSUED: AtomicU64 = AtomicU64::new(0);

/// The body of regmirror's own token for a client without credentials:
/// a random token that stands for nobody (see `ANONYMOUS_TOKEN_PREFIX`).
pub fn anonymous_token_body() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let n = ISSUED.fetch_add(1, Ordering::Relaxed);
    let seed = format!("{}-{}-{n}", now.as_nanos(), std::process::id());
    let token = format!("{ANONYMOUS_TOKEN_PREFIX}{}", &Digest::of(seed.as_bytes()).hex()[..32]);
    serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": ANONYMOUS_TOKEN_LIFETIME.as_secs(),
        "issued_at": rfc3339(now.as_secs()),
    })
    .to_string()
}

pub(crate) fn rfc3339(secs: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_and_post_token_requests_parse_as_clients_send_them() {
        let r = TokenRequest::parse(
            &Method::GET,
            Some("service=x&scope=repository:a/b:pull&scope=repository:c:pull%20repository:d:pull&account=me&offline_token=true&client_id=docker"),
            true,
            b"",
        );
        assert_eq!(r.scopes.len(), 3);
        assert!(r.has_credentials);
        assert!(r.params.contains(&("account".into(), "me".into())));
        assert!(
            !r.params.iter().any(|(k, _)| k == "service"),
            "service is replaced by upstream's"
        );
        let r = TokenRequest::parse(
            &Method::POST,
            Some("ns=ghcr.io"),
            false,
            b"grant_type=refresh_token&refresh_token=rt&service=x&scope=repository%3Aa%3Apull&client_id=containerd-client",
        );
        assert_eq!(r.ns.as_deref(), Some("ghcr.io"));
        assert!(r.has_credentials, "a refresh token is a credential");
        assert_eq!(r.scopes, vec![Scope::pull("a")]);
        let anon = TokenRequest::parse(&Method::GET, Some("scope=repository:a:pull"), false, b"");
        assert!(!anon.has_credentials);
    }

    #[test]
    fn echoed_scopes_go_back_in_client_names() {
        let body = Bytes::from_static(br#"{"token":"t","scope":"repository:library/x:pull"}"#);
        let out = echo_in_client_names(body, &[("library/x".into(), "dockerhub/x".into())]);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["scope"], "repository:dockerhub/x:pull");
        assert_eq!(v["token"], "t");
    }

    #[test]
    fn issued_at_is_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
