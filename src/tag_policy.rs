//! When a tag may be answered from the store without asking upstream.
//!
//! By default every tag request asks upstream (a HEAD, 304 when nothing
//! moved): a tag is a mutable name and only upstream knows where it points
//! now. A fleet pulling one tag thousands of times an hour pays a round trip
//! for each, and release tags like `1.27.3` never move; so an upstream (or a
//! set of its repositories) may say how long a confirmed answer holds
//! (`tag_check_interval`) and which tags never move once seen
//! (`immutable_tags`, less `immutable_tags_exclude`). The decision here is
//! pure: who may be served a recorded answer is the access rules' call, and
//! a client can always force a check (see [`forces_check`]).

use std::time::Duration;

use http::HeaderMap;
use regex::Regex;

use crate::auth::access::RepoPattern;

/// How one upstream's tags are checked: its own rules, and rules for some
/// of its repositories (the first that matches wins).
#[derive(Debug, Clone, Default)]
pub struct TagPolicy {
    pub upstream: TagRules,
    pub by_repository: Vec<RepositoryRules>,
}

/// Rules for the repositories matching any of `repositories`.
#[derive(Debug, Clone)]
pub struct RepositoryRules {
    pub repositories: Vec<RepoPattern>,
    pub rules: TagRules,
}

/// How tags of one repository are checked.
#[derive(Debug, Clone, Default)]
pub struct TagRules {
    /// How long a confirmed answer is served without asking again; zero:
    /// asked on every request.
    pub check_interval: Duration,
    /// Tags that never move once seen (searched, not anchored: write `^…$`).
    pub immutable: Vec<Regex>,
    /// Tags matching `immutable` that are asked about all the same.
    pub immutable_exclude: Vec<Regex>,
}

/// Why a recorded answer was served without asking upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unasked {
    /// Confirmed within `tag_check_interval`.
    Recent,
    /// The tag matches `immutable_tags`.
    Immutable,
}

impl Unasked {
    pub fn as_str(self) -> &'static str {
        match self {
            Unasked::Recent => "interval",
            Unasked::Immutable => "immutable",
        }
    }
}

impl TagPolicy {
    /// The rules for `repo` (upstream's repository name).
    pub fn rules(&self, repo: &str) -> &TagRules {
        self.by_repository
            .iter()
            .find(|r| r.repositories.iter().any(|p| p.matches(repo)))
            .map_or(&self.upstream, |r| &r.rules)
    }
}

impl TagRules {
    /// True when every request asks upstream (the default): nothing
    /// recorded need be read to decide.
    pub fn always_asks(&self) -> bool {
        self.check_interval.is_zero() && self.immutable.is_empty()
    }

    pub fn is_immutable(&self, tag: &str) -> bool {
        self.immutable.iter().any(|r| r.is_match(tag)) && !self.immutable_exclude.iter().any(|r| r.is_match(tag))
    }

    /// Whether an answer upstream gave for `tag` at `seen_ms` (ms since the
    /// Unix epoch) may still be served at `now_ms` without asking, and why.
    pub fn unasked(&self, tag: &str, seen_ms: u64, now_ms: u64) -> Option<Unasked> {
        if self.is_immutable(tag) {
            return Some(Unasked::Immutable);
        }
        // A record from the future (a clock stepped back) is not trusted
        // for longer than the interval either.
        let age = Duration::from_millis(now_ms.checked_sub(seen_ms)?);
        (age < self.check_interval).then_some(Unasked::Recent)
    }
}

/// True when the client asked for a fresh answer: `Cache-Control:
/// no-cache` (or `max-age=0`), or `Pragma: no-cache` from an HTTP/1.0
/// habit. The tag is then asked upstream whatever the rules say.
pub fn forces_check(headers: &HeaderMap) -> bool {
    let directives = |name: http::header::HeaderName| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|d| d.trim().to_ascii_lowercase())
            .collect::<Vec<_>>()
    };
    directives(http::header::CACHE_CONTROL)
        .iter()
        .any(|d| d == "no-cache" || d == "max-age=0" || d.starts_with("no-cache="))
        || directives(http::header::PRAGMA).iter().any(|d| d == "no-cache")
}

/// Compiles one of the configured tag patterns, with the error naming it.
pub fn compile(pattern: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(pattern)
        // Tags are at most 128 characters; a pattern is small too.
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("{pattern:?} is not a regular expression: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(interval_s: u64, immutable: &[&str], exclude: &[&str]) -> TagRules {
        TagRules {
            check_interval: Duration::from_secs(interval_s),
            immutable: immutable.iter().map(|p| compile(p).unwrap()).collect(),
            immutable_exclude: exclude.iter().map(|p| compile(p).unwrap()).collect(),
        }
    }

    #[test]
    fn an_answer_holds_for_the_interval_and_no_longer() {
        let r = rules(60, &[], &[]);
        assert_eq!(r.unasked("latest", 1_000, 1_000 + 59_999), Some(Unasked::Recent));
        assert_eq!(r.unasked("latest", 1_000, 1_000 + 60_000), None);
        assert_eq!(r.unasked("latest", 5_000, 1_000), None, "a record from the future");
        assert!(rules(0, &[], &[]).always_asks());
        assert_eq!(rules(0, &[], &[]).unasked("latest", 1_000, 1_000), None);
        assert!(!r.always_asks());
    }

    #[test]
    fn release_tags_are_immutable_unless_excluded() {
        let r = rules(0, &[r"^v?\d+(\.\d+){1,2}(-[0-9A-Za-z.]+)?$"], &["latest", r"^0\."]);
        assert!(!r.always_asks());
        for tag in ["1.27.3", "v1.2", "2.0.1-rc.1"] {
            assert_eq!(r.unasked(tag, 0, u64::MAX), Some(Unasked::Immutable), "{tag}");
        }
        for tag in ["latest", "1", "0.9", "0.9.1", "nightly", "1.2.3.4"] {
            assert_eq!(r.unasked(tag, 1_000, 1_000), None, "{tag}");
        }
    }

    #[test]
    fn the_first_matching_repository_rules_win_and_others_get_the_upstreams() {
        let policy = TagPolicy {
            upstream: rules(30, &[], &[]),
            by_repository: vec![
                RepositoryRules {
                    repositories: vec![RepoPattern::parse("library/*").unwrap()],
                    rules: rules(300, &[], &[]),
                },
                RepositoryRules {
                    repositories: vec![RepoPattern::parse("library/alpine").unwrap()],
                    rules: rules(0, &[], &[]),
                },
            ],
        };
        assert_eq!(policy.rules("library/alpine").check_interval, Duration::from_secs(300));
        assert_eq!(policy.rules("org/app").check_interval, Duration::from_secs(30));
    }

    #[test]
    fn clients_force_a_check_with_cache_control_or_pragma() {
        let with = |name: &'static str, v: &str| {
            let mut h = HeaderMap::new();
            h.insert(name, v.parse().unwrap());
            forces_check(&h)
        };
        assert!(with("cache-control", "no-cache"));
        assert!(with("cache-control", "max-age=0"));
        assert!(with("cache-control", "private, No-Cache"));
        assert!(with("pragma", "no-cache"));
        assert!(!with("cache-control", "max-age=60"));
        assert!(!with("cache-control", "no-store-ish"));
        assert!(!forces_check(&HeaderMap::new()));
    }

    #[test]
    fn bad_patterns_are_named() {
        let e = compile("^v(").unwrap_err();
        assert!(e.contains("\"^v(\"") && e.contains("not a regular expression"), "{e}");
    }
}
