//! The README's configuration reference and the config schema agree: no key
//! undocumented, no documented key that does not exist.

use std::collections::BTreeSet;

const README: &str = include_str!("../README.md");
const CONFIG_RS: &str = include_str!("../src/config.rs");

/// `section.key` for every field of the TOML schema's tables, read from the
/// `*Config` structs in src/config.rs.
fn schema_keys() -> BTreeSet<String> {
    let sections = [
        ("ServerConfig", "server"),
        ("CaConfig", "ca"),
        ("CacheConfig", "cache"),
        ("ResolverConfig", "resolver"),
        ("AccessConfig", "access"),
        ("UpstreamConfig", "upstream"),
        ("LimitsConfig", "limits"),
        ("LocalConfig", "local"),
        ("ConnectConfig", "connect"),
        ("WarmConfig", "warm"),
        ("WebhookConfig", "webhook"),
        ("ClusterConfig", "cluster"),
    ];
    let mut keys = BTreeSet::new();
    for (name, section) in sections {
        let start = CONFIG_RS
            .find(&format!("pub struct {name} {{"))
            .unwrap_or_else(|| panic!("src/config.rs has no struct {name}"));
        let body = &CONFIG_RS[start..];
        let body = &body[..body.find("\n}").expect("struct end")];
        // A `#[serde(rename = "x")]` line names the key of the field after it.
        let mut renamed: Option<String> = None;
        for line in body.lines().skip(1) {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("#[serde(rename = \"") {
                renamed = rest.split('"').next().map(str::to_string);
            } else if let Some(rest) = line.strip_prefix("pub ") {
                let field = rest.split(':').next().unwrap_or("").trim();
                let key = renamed.take().unwrap_or_else(|| field.to_string());
                keys.insert(format!("{section}.{key}"));
            }
        }
    }
    assert!(keys.len() > 20, "read too few keys from src/config.rs: {keys:?}");
    keys
}

/// `section.key` for every key the README's configuration reference
/// documents: `section.key` rows, `[[upstream]] name` and the bare upstream
/// keys after it, and the bare keys of the `[limits]` table.
fn documented_keys() -> BTreeSet<String> {
    let start = README.find("\n## Configuration").expect("a Configuration section");
    let end = README[start..]
        .find("### Security notes")
        .map_or(README.len(), |e| start + e);
    let mut keys = BTreeSet::new();
    let mut bare_section = None;
    for line in README[start..end].lines() {
        if line.starts_with("### `[limits]`") {
            bare_section = Some("limits");
        }
        let Some(first) = line.strip_prefix("| `") else {
            continue;
        };
        let cell = first.split(" |").next().unwrap_or("");
        if cell.starts_with("regmirror ") {
            continue; // the cache commands' table
        }
        for token in cell
            .split('`')
            .step_by(2)
            .map(str::trim)
            .filter(|t| !t.is_empty() && *t != ",")
        {
            let token = token.trim_matches(|c| c == ',' || c == ' ');
            if let Some(field) = token.strip_prefix("[[upstream]] ") {
                bare_section = Some("upstream");
                keys.insert(format!("upstream.{field}"));
            } else if let Some(field) = token.strip_prefix("[[local]] ") {
                bare_section = Some("local");
                keys.insert(format!("local.{field}"));
            } else if let Some(field) = token.strip_prefix("[[warm]] ") {
                bare_section = Some("warm");
                keys.insert(format!("warm.{field}"));
            } else if let Some(field) = token.strip_prefix("[[webhook]] ") {
                bare_section = Some("webhook");
                keys.insert(format!("webhook.{field}"));
            } else if token.contains('.') {
                keys.insert(token.to_string());
                if !token.starts_with("upstream.") {
                    bare_section = bare_section.filter(|s| *s == "limits");
                }
            } else if let Some(section) = bare_section {
                keys.insert(format!("{section}.{token}"));
            } else {
                panic!("README row names {token:?} without a section");
            }
        }
    }
    keys
}

#[test]
fn every_config_key_is_documented_and_every_documented_key_exists() {
    let schema = schema_keys();
    let documented = documented_keys();
    let undocumented: Vec<_> = schema.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&schema).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "README's configuration reference and src/config.rs disagree:\n  undocumented keys: {undocumented:?}\n  documented keys that do not exist: {unknown:?}"
    );
}
