//! regmirror's own bearer tokens for local namespaces: short-lived, signed
//! (HMAC-SHA256 JWTs, `jsonwebtoken`), naming the user and exactly the
//! repository actions granted, so a request carries its authorisation and
//! no bcrypt check runs per request.
//!
//! The key is 32 random bytes kept beside the CA key (0600), so tokens
//! survive a restart. It signs nothing else and is never served.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The key file under `ca.dir`.
pub const KEY_FILE: &str = "token.key";
/// How long a token lives: clients ask again when it runs out.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(300);
const ISSUER: &str = "regmirror";

/// One repository and the actions granted on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The user; empty for an anonymous caller.
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    #[serde(default)]
    pub access: Vec<Grant>,
}

pub struct TokenSigner {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(<key redacted>)")
    }
}

impl TokenSigner {
    /// The key in `dir`, made on first use.
    pub fn load_or_create(dir: &Path) -> std::io::Result<TokenSigner> {
        let path = dir.join(KEY_FILE);
        let key = match std::fs::read(&path) {
            Ok(k) if k.len() >= 32 => k,
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is shorter than 32 bytes: remove it and a new key is made",
                    path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = vec![0u8; 32];
                std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
                std::fs::create_dir_all(dir)?;
                write_private(&path, &key)?;
                key
            }
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        Ok(Self::from_key(&key))
    }

    pub fn from_key(key: &[u8]) -> TokenSigner {
        TokenSigner {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
        }
    }

    /// A token for `user` granting `access`, and its lifetime.
    pub fn issue(&self, user: &str, access: Vec<Grant>) -> Option<String> {
        let iat = now_secs();
        let claims = Claims {
            iss: ISSUER.into(),
            sub: user.into(),
            exp: iat + TOKEN_LIFETIME.as_secs(),
            iat,
            access,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).ok()
    }

    /// The claims of a token this signer issued and that has not expired.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let mut v = Validation::new(Algorithm::HS256);
        v.set_issuer(&[ISSUER]);
        v.leeway = 5;
        v.validate_aud = false;
        v.set_required_spec_claims(&["exp", "iss", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)
            .ok()
            .map(|d| d.claims)
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_with_their_key_and_carry_their_grants() {
        let dir = tempfile::tempdir().unwrap();
        let signer = TokenSigner::load_or_create(dir.path()).unwrap();
        let grant = Grant {
            kind: "repository".into(),
            name: "private/app".into(),
            actions: vec!["pull".into()],
        };
        let token = signer.issue("alice", vec![grant.clone()]).unwrap();
        let claims = signer.verify(&token).unwrap();
        assert_eq!((claims.sub.as_str(), claims.access), ("alice", vec![grant]));
        let again = TokenSigner::load_or_create(dir.path()).unwrap();
        assert!(again.verify(&token).is_some(), "the key survives a restart");
        let other = TokenSigner::from_key(&[7u8; 32]);
        assert!(other.verify(&token).is_none(), "another key's token");
        let mut forged = token.clone();
        forged.push('x');
        assert!(signer.verify(&forged).is_none());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
