//! An htpasswd file of a local namespace: who may log in, as bcrypt hashes.
//!
//! Only bcrypt is accepted. The older schemes htpasswd can write (MD5
//! `$apr1$`, `{SHA}`, crypt, plain text) are refused when the file is read,
//! naming the user and the command that re-creates the entry, instead of
//! failing at a login with a message nobody can act on. Hashes never leave
//! this module and never appear in `Debug` output.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};

#[derive(Debug, thiserror::Error)]
pub enum HtpasswdError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} line {line}: not a \"user:hash\" entry")]
    Malformed { path: String, line: usize },
    #[error(
        "{path} line {line}: user {user:?} has a {scheme} hash; regmirror accepts only bcrypt: \
         re-create the entry with `htpasswd -B {path} {user}`"
    )]
    NotBcrypt {
        path: String,
        line: usize,
        user: String,
        scheme: &'static str,
    },
    #[error("{path} line {line}: user {user:?} is listed twice")]
    Duplicate { path: String, line: usize, user: String },
    #[error("{path} holds no users")]
    Empty { path: String },
}

/// The users of one htpasswd file and their bcrypt hashes.
#[derive(Clone)]
pub struct Htpasswd {
    hashes: Arc<BTreeMap<String, String>>,
}

impl std::fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Htpasswd")
            .field("users", &self.hashes.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A bcrypt hash of nothing anyone types, checked for unknown users so
/// that a login takes as long whether or not the user exists.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| bcrypt::hash("regmirror-decoy", bcrypt::DEFAULT_COST).unwrap_or_default())
}

impl Htpasswd {
    pub fn load(path: &Path) -> Result<Self, HtpasswdError> {
        let text = std::fs::read_to_string(path).map_err(|source| HtpasswdError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses the text of a file called `path` (for messages).
    pub fn parse(text: &str, path: &str) -> Result<Self, HtpasswdError> {
        let mut hashes = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let entry = raw.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = entry.split_once(':') else {
                return Err(HtpasswdError::Malformed {
                    path: path.into(),
                    line,
                });
            };
            if user.is_empty() || hash.is_empty() {
                return Err(HtpasswdError::Malformed {
                    path: path.into(),
                    line,
                });
            }
            if let Some(scheme) = not_bcrypt(hash) {
                return Err(HtpasswdError::NotBcrypt {
                    path: path.into(),
                    line,
                    user: user.into(),
                    scheme,
                });
            }
            if hashes.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(HtpasswdError::Duplicate {
                    path: path.into(),
                    line,
                    user: user.into(),
                });
            }
        }
        if hashes.is_empty() {
            return Err(HtpasswdError::Empty { path: path.into() });
        }
        Ok(Htpasswd {
            hashes: Arc::new(hashes),
        })
    }

    pub fn has_user(&self, user: &str) -> bool {
        self.hashes.contains_key(user)
    }

    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.hashes.keys().map(String::as_str)
    }

    /// Checks a password. bcrypt is slow by design (tens of milliseconds):
    /// call this off the async threads.
    pub fn verify_blocking(&self, user: &str, password: &SecretString) -> bool {
        match self.hashes.get(user) {
            Some(hash) => bcrypt::verify(password.expose_secret(), hash).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(password.expose_secret(), decoy_hash());
                false
            }
        }
    }
}

/// The scheme of a hash that is not bcrypt, for the message.
fn not_bcrypt(hash: &str) -> Option<&'static str> {
    if ["$2y$", "$2a$", "$2b$", "$2x$"].iter().any(|p| hash.starts_with(p)) {
        return None;
    }
    Some(if hash.starts_with("$apr1$") || hash.starts_with("$1$") {
        "MD5"
    } else if hash.starts_with("{SHA}") {
        "SHA1"
    } else if hash.starts_with("$5$") || hash.starts_with("$6$") {
        "SHA-crypt"
    } else if hash.len() == 13 {
        "crypt"
    } else {
        "plain-text or unknown"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcrypt_entries_verify_and_others_are_refused_with_the_fix() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let file = Htpasswd::parse(&format!("# team\nalice:{hash}\n\n"), "htpasswd").unwrap();
        assert!(file.has_user("alice"));
        assert!(file.verify_blocking("alice", &SecretString::from("s3cret")));
        assert!(!file.verify_blocking("alice", &SecretString::from("wrong")));
        assert!(!file.verify_blocking("bob", &SecretString::from("s3cret")));
        assert!(!format!("{file:?}").contains("$2"), "no hash in Debug output");

        for (entry, scheme) in [
            ("bob:$apr1$abc$defghijklmnopqrstuvw", "MD5"),
            ("bob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA1"),
            ("bob:abJnggxhB/yWI", "crypt"),
        ] {
            let e = Htpasswd::parse(&format!("alice:{hash}\n{entry}\n"), "/etc/regmirror/htpasswd")
                .unwrap_err()
                .to_string();
            assert!(e.contains("\"bob\"") && e.contains(scheme), "{e}");
            assert!(e.contains("htpasswd -B /etc/regmirror/htpasswd bob"), "{e}");
            assert!(e.contains("line 2"), "{e}");
        }
        assert!(matches!(
            Htpasswd::parse("nocolon\n", "f"),
            Err(HtpasswdError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            Htpasswd::parse("# nobody\n", "f"),
            Err(HtpasswdError::Empty { .. })
        ));
        assert!(matches!(
            Htpasswd::parse(&format!("a:{hash}\na:{hash}\n"), "f"),
            Err(HtpasswdError::Duplicate { line: 2, .. })
        ));
    }
}
