//! The challenges clients see, on the host they addressed.
//!
//! Where upstream challenges, so does regmirror, the way upstream would:
//! same scheme, upstream's own `service`, the scope in the client's names.
//! The realm is always regmirror's `/token` on the host the client used
//! (clients behind the mirror often cannot reach `auth.docker.io`), with
//! containerd's `ns` kept in it so that token requests route like the
//! registry requests they belong to.

use http::HeaderValue;

use super::scope::Scope;
use crate::upstream::token::Challenge;
use crate::upstream::AuthScheme;

/// How the client reached regmirror: what its realm must point back at.
#[derive(Debug, Clone)]
pub struct Origin {
    pub tls: bool,
    /// The Host the client sent, port included (`regmirror.local:5000`).
    pub host: String,
    /// containerd's `?ns=`, when the request carried one.
    pub ns: Option<String>,
}

impl Origin {
    pub fn realm(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        match &self.ns {
            Some(ns) => {
                let q = form_urlencoded::Serializer::new(String::new())
                    .append_pair("ns", ns)
                    .finish();
                format!("{scheme}://{}/token?{q}", self.host)
            }
            None => format!("{scheme}://{}/token", self.host),
        }
    }
}

/// The `WWW-Authenticate` value for a client of an upstream that
/// authenticates the way `scheme` says; `None` for an open upstream. An
/// upstream whose scheme is not known yet (unreachable so far) is assumed
/// to challenge: a client then gets regmirror's own anonymous token.
pub fn for_client(scheme: &AuthScheme, upstream: &str, origin: &Origin, scope: Option<&Scope>) -> Option<HeaderValue> {
    let service = match scheme {
        AuthScheme::Open => return None,
        AuthScheme::Challenges(Challenge::Basic) => {
            return Some(HeaderValue::from_static("Basic realm=\"regmirror\""));
        }
        AuthScheme::Challenges(Challenge::Bearer { service, .. }) => service.clone().unwrap_or_else(|| upstream.into()),
        AuthScheme::Unknown => upstream.to_string(),
    };
    let mut v = format!(
        "Bearer realm=\"{}\",service=\"{}\"",
        quote(&origin.realm()),
        quote(&service)
    );
    if let Some(s) = scope {
        v.push_str(&format!(",scope=\"{}\"", quote(&s.to_string())));
    }
    HeaderValue::from_str(&v).ok()
}

/// The challenge of a local namespace: regmirror's own `/token` on the
/// host the client used, for regmirror's own `service` (its name).
pub fn for_local(origin: &Origin, service: &str, scope: &Scope) -> Option<HeaderValue> {
    let v = format!(
        "Bearer realm=\"{}\",service=\"{}\",scope=\"{}\"",
        quote(&origin.realm()),
        quote(service),
        quote(&scope.to_string())
    );
    HeaderValue::from_str(&v).ok()
}

fn quote(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .flat_map(|c| match c {
            '"' | '\\' => vec!['\\', c],
            c => vec![c],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::token::parse_challenge;

    fn bearer(service: &str) -> AuthScheme {
        AuthScheme::Challenges(Challenge::Bearer {
            realm: "https://auth.docker.io/token".into(),
            service: Some(service.into()),
            scope: None,
        })
    }

    #[test]
    fn the_realm_is_on_the_host_the_client_used() {
        let origin = Origin {
            tls: true,
            host: "registry-1.docker.io".into(),
            ns: None,
        };
        let v = for_client(
            &bearer("registry.docker.io"),
            "docker.io",
            &origin,
            Some(&Scope::pull("library/alpine")),
        )
        .unwrap();
        assert_eq!(
            v,
            r#"Bearer realm="https://registry-1.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
        );
        let mirror = Origin {
            tls: false,
            host: "10.0.0.5:5000".into(),
            ns: Some("docker.io".into()),
        };
        let v = for_client(&bearer("registry.docker.io"), "docker.io", &mirror, None).unwrap();
        let parsed = parse_challenge(v.to_str().unwrap()).unwrap();
        assert_eq!(
            parsed,
            Challenge::Bearer {
                realm: "http://10.0.0.5:5000/token?ns=docker.io".into(),
                service: Some("registry.docker.io".into()),
                scope: None
            }
        );
        assert!(
            for_client(&AuthScheme::Open, "x", &origin, None).is_none(),
            "open upstreams get no challenge"
        );
    }
}
