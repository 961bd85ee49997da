//! Token scopes (`repository:library/alpine:pull`), typed, and rewritten
//! between the names clients use and the names upstream knows.

use std::fmt;

use crate::reference::RepoName;
use crate::route::{route, Endpoint, RouteTable};
use crate::upstream::UpstreamId;

/// One scope of a token request. Only repository scopes name anything
/// regmirror rewrites; others (`registry:catalog:*`) pass through as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Repository {
        /// `repository` or `repository(plugin)`.
        class: String,
        name: String,
        actions: Vec<String>,
    },
    Other(String),
}

impl Scope {
    /// Parses one scope; `None` for text that is not a scope at all.
    pub fn parse(s: &str) -> Option<Scope> {
        let s = s.trim();
        if s.is_empty() || s.len() > 1024 {
            return None;
        }
        let (class, rest) = s.split_once(':')?;
        if class == "repository" || (class.starts_with("repository(") && class.ends_with(')')) {
            let (name, actions) = rest.rsplit_once(':')?;
            if name.is_empty() {
                return None;
            }
            let actions = actions
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect();
            return Some(Scope::Repository {
                class: class.to_string(),
                name: name.to_string(),
                actions,
            });
        }
        Some(Scope::Other(s.to_string()))
    }

    /// The repository scope `repository:<name>:pull`.
    pub fn pull(name: &str) -> Scope {
        Scope::Repository {
            class: "repository".into(),
            name: name.to_string(),
            actions: vec!["pull".into()],
        }
    }

    /// This scope in upstream's names, when it belongs to `upstream` as
    /// routed from the client's `host` (and containerd's `ns`): prefixes
    /// dropped, `library/` added for one-component Docker Hub names. Scopes
    /// for another upstream, or naming nothing valid, give `None`.
    pub fn to_upstream(
        &self,
        table: &RouteTable,
        host: Option<&str>,
        ns: Option<&str>,
        upstream: UpstreamId,
    ) -> Option<Scope> {
        match self {
            Scope::Other(_) => Some(self.clone()),
            Scope::Repository { class, name, actions } => {
                let (id, repo) = route_name(table, host, ns, name)?;
                (id == upstream).then(|| Scope::Repository {
                    class: class.clone(),
                    name: repo.as_str().to_string(),
                    actions: actions.clone(),
                })
            }
        }
    }

    /// The inverse of [`to_upstream`](Self::to_upstream) for a client that
    /// addresses the upstream through `prefix` (its namespace, in prefix
    /// mode) or directly (`None`).
    pub fn to_client(&self, prefix: Option<&str>) -> Scope {
        match (self, prefix) {
            (Scope::Repository { class, name, actions }, Some(p)) => Scope::Repository {
                class: class.clone(),
                name: format!("{p}/{name}"),
                actions: actions.clone(),
            },
            _ => self.clone(),
        }
    }

    pub fn repository(&self) -> Option<&str> {
        match self {
            Scope::Repository { name, .. } => Some(name),
            Scope::Other(_) => None,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Repository { class, name, actions } => write!(f, "{class}:{name}:{}", actions.join(",")),
            Scope::Other(s) => f.write_str(s),
        }
    }
}

/// Routes a repository name as the client wrote it, the way a request for
/// it would be routed: the upstream it belongs to and its upstream name.
pub fn route_name(
    table: &RouteTable,
    host: Option<&str>,
    ns: Option<&str>,
    name: &str,
) -> Option<(UpstreamId, RepoName)> {
    let query = ns.map(|n| {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("ns", n)
            .finish()
    });
    match route(table, host, &format!("/v2/{name}/tags/list"), query.as_deref()) {
        Ok(Endpoint::Repo(r)) => Some((r.upstream, r.repo)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn table() -> RouteTable {
        RouteTable::from_settings(&Settings::load(None).unwrap())
    }

    fn hub() -> UpstreamId {
        UpstreamId::from_config_index(0)
    }

    #[test]
    fn scopes_parse_and_print_back() {
        for s in [
            "repository:library/alpine:pull",
            "repository:a/b/c:pull,push",
            "repository(plugin):x/y:pull",
            "registry:catalog:*",
        ] {
            assert_eq!(Scope::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(Scope::parse("repository::pull"), None);
        assert_eq!(Scope::parse("nonsense"), None);
    }

    #[test]
    fn client_names_become_upstream_names() {
        let t = table();
        let up = |s: &str, host: Option<&str>| {
            Scope::parse(s)
                .unwrap()
                .to_upstream(&t, host, None, hub())
                .map(|s| s.to_string())
        };
        assert_eq!(
            up("repository:dockerhub/library/x:pull", Some("regmirror.local")).as_deref(),
            Some("repository:library/x:pull")
        );
        assert_eq!(
            up("repository:dockerhub/x:pull", Some("regmirror.local")).as_deref(),
            Some("repository:dockerhub/x:pull"),
            "two components are a Docker Hub name, as requests are routed"
        );
        assert_eq!(
            up("repository:alpine:pull", Some("registry-1.docker.io")).as_deref(),
            Some("repository:library/alpine:pull"),
            "one-component Docker Hub names get library/"
        );
        assert_eq!(
            up("repository:org/app:pull", Some("registry-1.docker.io")).as_deref(),
            Some("repository:org/app:pull"),
            "transparent names are unchanged"
        );
        assert_eq!(
            up("repository:quay/org/app:pull", Some("regmirror.local")),
            None,
            "a scope for another upstream is not sent to this one"
        );
        let ghcr = Scope::parse("repository:org/app:pull").unwrap().to_upstream(
            &t,
            None,
            Some("ghcr.io"),
            UpstreamId::from_config_index(1),
        );
        assert_eq!(ghcr.map(|s| s.to_string()).as_deref(), Some("repository:org/app:pull"));
    }
}
