//! Who may pull, push and delete in the local namespaces (`[[local]]`).
//!
//! A caller is anonymous, a user who sent Basic credentials (checked with
//! bcrypt against the namespace's htpasswd, off the async threads, the
//! answer remembered briefly), or the bearer of a token regmirror signed
//! (see `signed_token`), which carries the actions it was granted. What a
//! user may do comes from `writers`, `readers` and `delete`; a token never
//! grants more than that, however it was asked for.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use http::{header, HeaderMap, StatusCode};
use secrecy::SecretString;

use super::htpasswd::Htpasswd;
use super::scope::Scope;
use super::signed_token::{Grant, TokenSigner};
use super::ANONYMOUS_TOKEN_PREFIX;
use crate::config::LocalNamespace;
use crate::reference::{Digest, RepoName};
use crate::registry::errors::{OciCode, RegistryError};

/// How long a bcrypt check's answer is reused for the same credentials.
const VERIFIED_FOR: Duration = Duration::from_secs(60);
const VERIFIED_ENTRIES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    fn parse(s: &str) -> Vec<Action> {
        match s {
            "pull" => vec![Action::Pull],
            "push" => vec![Action::Push],
            "delete" => vec![Action::Delete],
            "*" => vec![Action::Pull, Action::Push, Action::Delete],
            _ => Vec::new(),
        }
    }
}

/// Who is asking, decided from the request's `Authorization`.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `None`: anonymous.
    pub user: Option<String>,
    /// A token's grants; `None` when the user logged in with Basic on the
    /// request itself (everything the user may do).
    grants: Option<Vec<Grant>>,
}

impl Caller {
    pub fn anonymous() -> Caller {
        Caller {
            user: None,
            grants: None,
        }
    }

    pub fn name(&self) -> &str {
        self.user.as_deref().unwrap_or("anonymous")
    }
}

pub struct LocalAuth {
    namespaces: Vec<LocalNamespace>,
    signer: TokenSigner,
    /// Digest of (namespace, user, password) → (matched, when checked).
    verified: Mutex<lru::LruCache<String, (bool, Instant)>>,
}

impl std::fmt::Debug for LocalAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalAuth")
            .field("namespaces", &self.namespaces.len())
            .finish()
    }
}

/// Basic credentials from an `Authorization` value.
fn basic(value: &str) -> Option<(String, SecretString)> {
    let encoded = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let raw = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), SecretString::from(password.to_string())))
}

impl LocalAuth {
    pub fn new(namespaces: Vec<LocalNamespace>, signer: TokenSigner) -> LocalAuth {
        LocalAuth {
            namespaces,
            signer,
            verified: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(VERIFIED_ENTRIES).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    pub fn namespace(&self, ns: usize) -> Option<&LocalNamespace> {
        self.namespaces.get(ns)
    }

    pub fn namespaces(&self) -> &[LocalNamespace] {
        &self.namespaces
    }

    /// The namespace a repository name belongs to.
    pub fn namespace_of(&self, repo: &str) -> Option<usize> {
        let first = repo.split('/').next()?;
        repo.contains('/')
            .then(|| self.namespaces.iter().position(|n| n.namespace == first))
            .flatten()
    }

    /// Checks a password against namespace `ns`'s file, remembering the
    /// answer for a minute so a push's many requests cost one bcrypt.
    pub async fn check_password(&self, ns: usize, user: &str, password: &SecretString) -> bool {
        use secrecy::ExposeSecret;
        let Some(n) = self.namespaces.get(ns) else {
            return false;
        };
        let key = {
            let mut seed = Vec::new();
            seed.extend_from_slice(n.namespace.as_bytes());
            seed.push(0);
            seed.extend_from_slice(user.as_bytes());
            seed.push(0);
            seed.extend_from_slice(password.expose_secret().as_bytes());
            Digest::of(&seed).hex().to_string()
        };
        if let Some((ok, at)) = lock(&self.verified).get(&key) {
            if at.elapsed() < VERIFIED_FOR {
                return *ok;
            }
        }
        let users: Htpasswd = n.users.clone();
        let (user2, password2) = (user.to_string(), password.clone());
        let ok = tokio::task::spawn_blocking(move || users.verify_blocking(&user2, &password2))
            .await
            .unwrap_or(false);
        lock(&self.verified).put(key, (ok, Instant::now()));
        ok
    }

    /// Who is asking in namespace `ns`. Wrong credentials are refused
    /// here (401); missing ones make an anonymous caller.
    pub async fn caller(&self, ns: usize, headers: &HeaderMap) -> Result<Caller, RegistryError> {
        let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return Ok(Caller::anonymous());
        };
        if let Some((user, password)) = basic(value) {
            if self.check_password(ns, &user, &password).await {
                return Ok(Caller {
                    user: Some(user),
                    grants: None,
                });
            }
            tracing::info!(user = %user, "local login refused: wrong user name or password");
            return Err(RegistryError::unauthorized("invalid user name or password"));
        }
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .unwrap_or("")
            .trim();
        if token.starts_with(ANONYMOUS_TOKEN_PREFIX) {
            return Ok(Caller::anonymous());
        }
        match self.signer.verify(token) {
            Some(claims) => Ok(Caller {
                user: (!claims.sub.is_empty()).then_some(claims.sub),
                grants: Some(claims.access),
            }),
            None => Err(RegistryError::unauthorized(
                "the token is not valid here, or has expired",
            )),
        }
    }

    /// Whether the request's Basic credentials match in some namespace
    /// that lists the user (a login's check, before any scope).
    pub async fn caller_any(&self, headers: &HeaderMap) -> bool {
        let Some((user, password)) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(basic)
        else {
            return false;
        };
        for ns in 0..self.namespaces.len() {
            if self.namespaces[ns].users.has_user(&user) && self.check_password(ns, &user, &password).await {
                return true;
            }
        }
        false
    }

    /// What namespace `ns`'s configuration lets `user` do.
    pub fn rights(&self, ns: usize, user: Option<&str>) -> Vec<Action> {
        let Some(n) = self.namespaces.get(ns) else {
            return Vec::new();
        };
        let listed = |list: &Option<Vec<String>>, u: &str| list.as_ref().is_none_or(|l| l.iter().any(|x| x == u));
        let mut out = Vec::new();
        match user {
            Some(u) if n.users.has_user(u) => {
                let writer = listed(&n.writers, u);
                let reader = listed(&n.readers, u) || writer || n.anonymous_pull;
                if reader {
                    out.push(Action::Pull);
                }
                if writer {
                    out.push(Action::Push);
                    if n.delete {
                        out.push(Action::Delete);
                    }
                }
            }
            _ if n.anonymous_pull => out.push(Action::Pull),
            _ => {}
        }
        out
    }

    /// Whether `caller` may do `action` on `repo` (in namespace `ns`).
    pub fn permits(&self, ns: usize, caller: &Caller, repo: &RepoName, action: Action) -> bool {
        let open = self.namespaces.get(ns).is_some_and(|n| n.anonymous_pull);
        if caller.user.is_none() && action == Action::Pull && open {
            // Anonymous pulls of an open namespace need no token at all.
            return true;
        }
        if !self.rights(ns, caller.user.as_deref()).contains(&action) {
            return false;
        }
        match &caller.grants {
            None => true,
            Some(grants) => grants.iter().any(|g| {
                g.kind == "repository" && g.name == repo.as_str() && g.actions.iter().any(|a| a == action.as_str())
            }),
        }
    }

    /// `Ok` when permitted; otherwise 401 for a caller who has not logged
    /// in (the seam adds the challenge), 403 `DENIED` for one who has.
    pub fn authorize(&self, ns: usize, caller: &Caller, repo: &RepoName, action: Action) -> Result<(), RegistryError> {
        if self.permits(ns, caller, repo, action) {
            return Ok(());
        }
        let may = self.rights(ns, caller.user.as_deref()).contains(&action);
        match (&caller.user, &caller.grants) {
            // A token that lacks the action, for a user who has it: a new
            // token with that scope fixes it.
            (_, Some(_)) if may => Err(RegistryError::unauthorized(format!(
                "the token does not grant {} on {repo}",
                action.as_str()
            ))),
            (None, _) => Err(RegistryError::unauthorized("authentication required")),
            (Some(u), _) => {
                tracing::info!(user = %u, repo = %repo, action = action.as_str(), "local request denied");
                Err(RegistryError::new(
                    StatusCode::FORBIDDEN,
                    OciCode::Denied,
                    format!("user {u:?} may not {} {repo}", action.as_str()),
                ))
            }
        }
    }

    /// A token for a login (`user` checked already, or anonymous) granting
    /// what it asked for in `scopes`, cut to what the user may do.
    pub fn grant(&self, user: Option<&str>, scopes: &[Scope]) -> Option<String> {
        let mut access: Vec<Grant> = Vec::new();
        for s in scopes {
            let Some(name) = s.repository() else { continue };
            let Some(ns) = self.namespace_of(name) else { continue };
            let Ok(repo) = RepoName::parse(name) else { continue };
            let Scope::Repository { actions, .. } = s else { continue };
            let rights = self.rights(ns, user);
            let mut granted: Vec<String> = Vec::new();
            for a in actions.iter().flat_map(|a| Action::parse(a)) {
                if rights.contains(&a) && !granted.iter().any(|g| g == a.as_str()) {
                    granted.push(a.as_str().to_string());
                }
            }
            if !granted.is_empty() {
                access.push(Grant {
                    kind: "repository".into(),
                    name: repo.as_str().to_string(),
                    actions: granted,
                });
            }
        }
        self.signer.issue(user.unwrap_or(""), access)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace(writers: Option<&[&str]>, readers: Option<&[&str]>, anonymous_pull: bool) -> LocalNamespace {
        let h = bcrypt::hash("pw", 4).unwrap();
        LocalNamespace {
            namespace: "private".into(),
            htpasswd_path: "htpasswd".into(),
            users: Htpasswd::parse(&format!("admin:{h}\nci:{h}\n"), "htpasswd").unwrap(),
            writers: writers.map(|w| w.iter().map(|s| s.to_string()).collect()),
            readers: readers.map(|w| w.iter().map(|s| s.to_string()).collect()),
            anonymous_pull,
            delete: true,
            quota: None,
            upload_timeout: Duration::from_secs(60),
            max_uploads_per_user: 4,
        }
    }

    #[tokio::test]
    async fn rights_follow_writers_readers_and_tokens_never_grant_more() {
        let auth = LocalAuth::new(
            vec![namespace(Some(&["admin"]), Some(&["ci"]), false)],
            TokenSigner::from_key(&[1; 32]),
        );
        assert_eq!(
            auth.rights(0, Some("admin")),
            vec![Action::Pull, Action::Push, Action::Delete]
        );
        assert_eq!(auth.rights(0, Some("ci")), vec![Action::Pull]);
        assert!(auth.rights(0, None).is_empty());
        assert!(auth.rights(0, Some("mallory")).is_empty());

        let repo = RepoName::parse("private/app").unwrap();
        let token = auth
            .grant(Some("ci"), &[Scope::parse("repository:private/app:pull,push").unwrap()])
            .unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        let ci = auth.caller(0, &h).await.unwrap();
        assert!(auth.permits(0, &ci, &repo, Action::Pull));
        let e = auth.authorize(0, &ci, &repo, Action::Push).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN, "a reader pushing is denied");
        assert!(!auth.permits(0, &ci, &RepoName::parse("private/other").unwrap(), Action::Pull));

        let basic = base64::engine::general_purpose::STANDARD.encode("admin:wrong");
        h.insert(header::AUTHORIZATION, format!("Basic {basic}").parse().unwrap());
        assert_eq!(auth.caller(0, &h).await.unwrap_err().status, StatusCode::UNAUTHORIZED);
        let basic = base64::engine::general_purpose::STANDARD.encode("admin:pw");
        h.insert(header::AUTHORIZATION, format!("Basic {basic}").parse().unwrap());
        let admin = auth.caller(0, &h).await.unwrap();
        assert!(auth.permits(0, &admin, &repo, Action::Push));

        let e = auth
            .authorize(0, &Caller::anonymous(), &repo, Action::Pull)
            .unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        let open = LocalAuth::new(vec![namespace(None, None, true)], TokenSigner::from_key(&[1; 32]));
        assert!(open.permits(0, &Caller::anonymous(), &repo, Action::Pull));
        assert!(!open.permits(0, &Caller::anonymous(), &repo, Action::Push));
    }
}
