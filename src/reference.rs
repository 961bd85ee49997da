//! Validated OCI names: repository names, tags and digests.
//!
//! Everything that reaches the store or an upstream URL passes through these
//! constructors first, so a value of these types can never contain `..`, `/`
//! in the wrong place, or anything else that could escape the cache directory.

use std::fmt;

/// Longest repository name the distribution spec allows (bytes).
const MAX_REPO_LEN: usize = 255;

/// A repository name that matches the OCI grammar
/// (`[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > MAX_REPO_LEN {
            return Err(format!("repository name must be 1..={MAX_REPO_LEN} characters"));
        }
        for component in s.split('/') {
            if !valid_component(component) {
                return Err(format!("invalid repository name component {component:?}"));
            }
        }
        Ok(RepoName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Docker Hub stores official images under `library/`; a one-component
    /// name means `library/<name>` there.
    pub fn with_library_prefix(&self) -> RepoName {
        if self.0.contains('/') {
            self.clone()
        } else {
            RepoName(format!("library/{}", self.0))
        }
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One path component of a repository name: alphanumerics joined by single
/// `.`, one or two `_`, or any number of `-`.
pub fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// A tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Result<Self, String> {
        let b = s.as_bytes();
        let first_ok = b.first().is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_');
        let rest_ok = b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !first_ok || !rest_ok || b.len() > 128 {
            return Err(format!("invalid tag {s:?}"));
        }
        Ok(Tag(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A sha256 content digest. Only sha256 is accepted: it is what every
/// registry serves and what the store is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Self, String> {
        let Some(hex) = s.strip_prefix("sha256:") else {
            if s.contains(':') {
                return Err(format!("unsupported digest algorithm in {s:?}"));
            }
            return Err(format!("invalid digest {s:?}"));
        };
        if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
            return Err(format!("invalid sha256 digest {s:?}"));
        }
        Ok(Digest { hex: hex.to_string() })
    }

    /// The digest of bytes already computed by a sha256 hasher.
    pub fn from_sha256(bytes: &[u8]) -> Self {
        Digest {
            hex: hex::encode(bytes),
        }
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The digest of a whole in-memory buffer (manifests, tests).
    pub fn of(data: &[u8]) -> Self {
        use sha2::{Digest as _, Sha256};
        Self::from_sha256(&Sha256::digest(data))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// What follows `/manifests/`: a mutable tag or an immutable digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.contains(':') {
            Digest::parse(s).map(Reference::Digest)
        } else {
            Tag::parse(s).map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names_follow_the_oci_grammar() {
        for ok in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-app",
            "my--app",
            "a.b",
            "a__b",
            "x1/y_2",
        ] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "Alpine", "../etc", "a//b", "/a", "a/", "a..b", "a___b", "-a", "a-", "a/.", "a b", "a%2fb",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad}");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn library_prefix_only_for_single_component_names() {
        assert_eq!(
            RepoName::parse("nginx").unwrap().with_library_prefix().as_str(),
            "library/nginx"
        );
        assert_eq!(
            RepoName::parse("org/app").unwrap().with_library_prefix().as_str(),
            "org/app"
        );
    }

    #[test]
    fn digests_must_be_sha256_hex() {
        let good = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(Digest::parse(&good).unwrap().to_string(), good);
        assert!(Digest::parse(&format!("sha256:{}", "AB".repeat(32))).is_err());
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse(&format!("sha512:{}", "ab".repeat(64))).is_err());
        assert!(Digest::parse(&format!("sha256:../{}", "a".repeat(61))).is_err());
    }

    #[test]
    fn tags_and_references() {
        assert!(matches!(Reference::parse("1.2-alpine"), Ok(Reference::Tag(_))));
        assert!(matches!(
            Reference::parse(&format!("sha256:{}", "0".repeat(64))),
            Ok(Reference::Digest(_))
        ));
        assert!(Reference::parse(".hidden").is_err());
        assert!(Reference::parse("a/b").is_err());
        assert!(Reference::parse(&"t".repeat(129)).is_err());
    }
}
