//! Access decisions that need no network: which client addresses may use
//! the proxy, which repositories may be pulled through it, and what
//! regmirror remembers of checks it made upstream (a client's token
//! accepted for a repository; a repository readable anonymously).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries kept at most in each memory of checks; expired ones go first.
const MAX_ENTRIES: usize = 16_384;

/// A repository pattern from `repositories = [...]`: `*` matches within
/// one path component, `**` across components (`myorg/**`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoPattern(String);

impl RepoPattern {
    pub fn parse(p: &str) -> Result<RepoPattern, String> {
        let valid = !p.is_empty()
            && p.len() <= 255
            && p.split('/').all(|c| {
                !c.is_empty()
                    && c.chars()
                        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-*".contains(ch))
            });
        if !valid {
            return Err(format!(
                "{p:?} is not a repository pattern (lowercase name components, `*` within one, `**` across)"
            ));
        }
        Ok(RepoPattern(p.to_string()))
    }

    /// Whether `repo` (an upstream repository name) matches.
    pub fn matches(&self, repo: &str) -> bool {
        glob(self.0.as_bytes(), repo.as_bytes())
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match p {
        [] => s.is_empty(),
        [b'*', b'*', rest @ ..] => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        [b'*', rest @ ..] => (0..=s.len())
            .take_while(|&i| i == 0 || s[i - 1] != b'/')
            .any(|i| glob(rest, &s[i..])),
        [c, rest @ ..] => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

/// `[access] allow`: the client networks that may connect at all.
#[derive(Debug, Clone, Default)]
pub struct ClientFilter {
    allow: Vec<ipnet::IpNet>,
}

impl ClientFilter {
    pub fn new(allow: Vec<ipnet::IpNet>) -> Self {
        ClientFilter { allow }
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// A bounded memory of facts that hold until a deadline.
pub struct Remembered<K> {
    entries: Mutex<HashMap<K, Instant>>,
}

impl<K: std::hash::Hash + Eq> Default for Remembered<K> {
    fn default() -> Self {
        Remembered {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: std::hash::Hash + Eq> Remembered<K> {
    pub fn holds(&self, k: &K) -> bool {
        let now = Instant::now();
        self.lock().get(k).is_some_and(|until| *until > now)
    }

    pub fn remember(&self, k: K, for_: Duration) {
        let now = Instant::now();
        let mut m = self.lock();
        if m.len() >= MAX_ENTRIES {
            m.retain(|_, until| *until > now);
            if m.len() >= MAX_ENTRIES {
                m.clear();
            }
        }
        m.insert(k, now + for_);
    }

    /// Every key that still holds, for listings.
    pub fn current(&self) -> Vec<K>
    where
        K: Clone,
    {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Instant>> {
        match self.entries.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_within_and_across_components() {
        let p = |s: &str| RepoPattern::parse(s).unwrap();
        assert!(p("library/*").matches("library/alpine"));
        assert!(!p("library/*").matches("library/a/b"));
        assert!(!p("library/*").matches("other/alpine"));
        assert!(p("myorg/**").matches("myorg/a/b/c"));
        assert!(p("myorg/**").matches("myorg/a"));
        assert!(!p("myorg/**").matches("myorgx/a"));
        assert!(p("org/app-*").matches("org/app-1"));
        assert!(p("exact/name").matches("exact/name"));
        assert!(!p("exact/name").matches("exact/name2"));
        assert!(RepoPattern::parse("Bad/Name").is_err());
        assert!(RepoPattern::parse("a//b").is_err());
    }

    #[test]
    fn client_filter_checks_cidrs_and_allows_all_when_empty() {
        let f = ClientFilter::new(vec!["10.0.0.0/8".parse().unwrap(), "127.0.0.1/32".parse().unwrap()]);
        assert!(f.allows("10.1.2.3".parse().unwrap()));
        assert!(f.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!f.allows("192.168.1.1".parse().unwrap()));
        assert!(ClientFilter::default().allows("192.168.1.1".parse().unwrap()));
    }

    #[test]
    fn remembered_facts_expire() {
        let r: Remembered<u32> = Remembered::default();
        r.remember(1, Duration::from_secs(60));
        r.remember(2, Duration::ZERO);
        assert!(r.holds(&1));
        assert!(!r.holds(&2));
        assert_eq!(r.current(), vec![1]);
    }
}
