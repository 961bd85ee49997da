//! The status page at `/` on the plain listener: one server-rendered HTML
//! page for an operator (on a phone too) — what each upstream's cache
//! holds, what it saved since start, the recent pulls, and how upstream
//! has been answering.
//!
//! It only reads: the cache's listing, the metrics, the recent pulls and
//! the upstream health. No JavaScript; every string that came from a
//! client or an upstream (repository, tag, reference, error text) is
//! HTML-escaped before it is written.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cache::listing::CachedTag;
use crate::config::format_size as human;
use crate::metrics::{ServedLabels, UpstreamLabel, METRICS};
use crate::registry::outcome::RecentPull;
use crate::upstream::observed::UpstreamHealth;
use crate::upstream::UrlState;

/// Everything one rendering shows, gathered by the caller.
pub struct StatusData {
    /// Configured upstream names, in config order.
    pub upstreams: Vec<String>,
    pub cached: Vec<CachedTag>,
    pub recent: Vec<RecentPull>,
    pub health: std::collections::BTreeMap<String, UpstreamHealth>,
    /// Each upstream's URLs (`urls`) and their health, in config order.
    pub urls: Vec<(String, Vec<UrlState>)>,
    /// Repositories of the local namespaces (pushed, not cached).
    pub local: Vec<LocalRepo>,
    /// The `[[warm]]` schedules, in config order.
    pub warm: Vec<crate::warm::runs::RunState>,
    pub now: SystemTime,
}

/// One pushed repository as the page lists it.
#[derive(Debug, Clone)]
pub struct LocalRepo {
    pub repository: String,
    pub tags: usize,
    /// Bytes of everything it holds.
    pub size: u64,
    pub last_push: Option<SystemTime>,
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `42 s ago`, `3 min ago`, `5 h ago`, `2 d ago`; `-` for never.
fn ago(now: SystemTime, then: Option<SystemTime>) -> String {
    let Some(then) = then else {
        return "-".into();
    };
    let s = now.duration_since(then).map_or(0, |d| d.as_secs());
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        7200..=172_799 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// `in 42 s`, `in 3 min`, …; `now` once due; `-` for never.
fn until(now: SystemTime, then: Option<SystemTime>) -> String {
    let Some(then) = then else {
        return "-".into();
    };
    let s = then.duration_since(now).map_or(0, |d| d.as_secs());
    match s {
        0 => "now".into(),
        1..=119 => format!("in {s} s"),
        120..=7199 => format!("in {} min", s / 60),
        7200..=172_799 => format!("in {} h", s / 3600),
        _ => format!("in {} d", s / 86_400),
    }
}

/// A "last error" cell: what went wrong and how long ago, or `none`.
fn last_error(now: SystemTime, e: &Option<(String, SystemTime)>) -> String {
    match e {
        Some((text, at)) => format!(
            "<span class=\"bad\">{}</span> <span class=\"muted\">({})</span>",
            escape(text),
            ago(now, Some(*at))
        ),
        None => "<span class=\"ok\">none</span>".into(),
    }
}

fn from_ms(ms: u64) -> Option<SystemTime> {
    (ms > 0).then(|| UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// Hits, misses and joins counted for `upstream` since start.
fn lookups(upstream: &str) -> (u64, u64, u64) {
    let l = UpstreamLabel::of(upstream);
    (
        METRICS.cache_hits.get_or_create(&l).get(),
        METRICS.cache_misses.get_or_create(&l).get(),
        METRICS.cache_joins.get_or_create(&l).get(),
    )
}

fn served_from(upstream: &str, source: &'static str) -> u64 {
    METRICS
        .served_bytes
        .get_or_create(&ServedLabels {
            upstream: upstream.to_string(),
            source,
        })
        .get()
}

fn ratio(hits: u64, all: u64) -> String {
    if all == 0 {
        "-".into()
    } else {
        format!("{:.0} %", 100.0 * hits as f64 / all as f64)
    }
}

const STYLE: &str = "\
body{font:15px/1.4 system-ui,sans-serif;margin:0 auto;padding:12px;max-width:960px;color:#222;background:#fafafa}\
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1.2em 0 .4em;border-bottom:1px solid #ddd}\
h3{font-size:1em;margin:1em 0 .3em}\
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;background:#fff}\
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eee;vertical-align:top}\
td.n,th.n{text-align:right;white-space:nowrap}code{font-size:.85em;word-break:break-all}\
.cards{display:flex;flex-wrap:wrap;gap:8px}.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 12px;flex:1 1 140px}\
.card b{display:block;font-size:1.3em}.bad{color:#b00020}.ok{color:#1b5e20}.muted{color:#777}\
@media (max-width:600px){body{font-size:14px;padding:8px}th,td{padding:3px 4px}.hide-s{display:none}}";

/// The whole page.
pub fn render(d: &StatusData) -> String {
    let mut h = String::with_capacity(8192);
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>regmirror status</title><style>{STYLE}</style></head><body><h1>regmirror</h1>"
    );

    // Totals since start.
    let (mut hits, mut all, mut saved, mut fetched) = (0, 0, 0, 0);
    for u in &d.upstreams {
        let (h_, m, j) = lookups(u);
        hits += h_;
        all += h_ + m + j;
        saved += served_from(u, "cache");
        fetched += METRICS
            .upstream_fetched_bytes
            .get_or_create(&UpstreamLabel::of(u))
            .get();
    }
    let _ = write!(
        h,
        "<div class=\"cards\">\
<div class=\"card\">hit ratio<b id=\"hit-ratio\">{}</b></div>\
<div class=\"card\">bytes saved<b id=\"bytes-saved\">{}</b></div>\
<div class=\"card\">fetched upstream<b>{}</b></div>\
<div class=\"card\">cached images<b>{}</b></div></div>\
<p class=\"muted\">Counts since regmirror started; the cache below is everything stored.</p>",
        ratio(hits, all),
        human(saved),
        human(fetched),
        d.cached.len()
    );

    // Upstream health.
    h.push_str(
        "<h2>Upstreams</h2><div class=\"scroll\"><table><tr><th>upstream</th><th class=\"n\">hit ratio</th>\
<th class=\"n hide-s\">saved</th><th>last success</th><th>last error</th><th class=\"n\">pulls left</th></tr>",
    );
    for u in &d.upstreams {
        let (h_, m, j) = lookups(u);
        let health = d.health.get(u).cloned().unwrap_or_default();
        let error = last_error(d.now, &health.last_error);
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n hide-s\">{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td></tr>",
            escape(u),
            ratio(h_, h_ + m + j),
            human(served_from(u, "cache")),
            ago(d.now, health.last_success),
            error,
            health.ratelimit_remaining.map_or("-".into(), |n| n.to_string())
        );
    }
    h.push_str("</table></div>");

    // Each upstream URL: in use or skipped after failures.
    h.push_str(
        "<h2>Upstream URLs</h2><div class=\"scroll\"><table id=\"urls\"><tr><th>upstream</th><th>url</th>\
<th>state</th><th>last success</th><th>last error</th></tr>",
    );
    for (u, states) in &d.urls {
        for st in states {
            let state = match st.backing_off_until {
                Some(until) if !st.healthy => format!(
                    "<span class=\"bad\">backing off</span> <span class=\"muted\">({} failures; retried in {} s)</span>",
                    st.consecutive_failures,
                    until.duration_since(d.now).map_or(0, |t| t.as_secs())
                ),
                _ if !st.healthy => "<span class=\"bad\">backing off</span>".into(),
                _ => "<span class=\"ok\">in use</span>".into(),
            };
            let error = last_error(d.now, &st.last_error);
            let _ = write!(
                h,
                "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(u),
                escape(&st.url),
                state,
                ago(d.now, st.last_success),
                error
            );
        }
    }
    h.push_str("</table></div>");

    // Recent pulls.
    h.push_str("<h2>Recent pulls</h2>");
    if d.recent.is_empty() {
        h.push_str("<p class=\"muted\">No manifest pulled since start.</p>");
    } else {
        h.push_str(
            "<div class=\"scroll\"><table id=\"recent\"><tr><th>when</th><th>image</th><th>reference</th><th>cache</th></tr>",
        );
        for p in &d.recent {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}/{}</td><td><code>{}</code></td><td>{}</td></tr>",
                ago(d.now, Some(p.at)),
                escape(&p.upstream),
                escape(&p.repo),
                escape(&p.reference),
                escape(p.outcome)
            );
        }
        h.push_str("</table></div>");
    }

    // Pushed repositories, apart from the cache.
    if !d.local.is_empty() {
        h.push_str(
            "<h2>Local repositories</h2><div class=\"scroll\"><table id=\"local\"><tr><th>repository</th>\
<th class=\"n\">tags</th><th class=\"n\">size</th><th>last push</th></tr>",
        );
        for r in &d.local {
            let _ = write!(
                h,
                "<tr><td class=\"repo\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
                escape(&r.repository),
                r.tags,
                human(r.size),
                ago(d.now, r.last_push)
            );
        }
        h.push_str("</table></div>");
    }

    if !d.warm.is_empty() {
        warm_section(&mut h, d);
    }

    // The cache, per upstream.
    h.push_str("<h2>Cached images</h2>");
    for u in &d.upstreams {
        let rows: Vec<&CachedTag> = d.cached.iter().filter(|c| &c.upstream == u).collect();
        let _ = write!(h, "<h3>{}</h3>", escape(u));
        if rows.is_empty() {
            h.push_str("<p class=\"muted\">Nothing cached.</p>");
            continue;
        }
        h.push_str(
            "<div class=\"scroll\"><table class=\"cached\"><tr><th>repository</th><th>tag</th><th class=\"n\">size</th>\
<th>last use</th><th class=\"hide-s\">digest</th></tr>",
        );
        for c in rows {
            let _ = write!(
                h,
                "<tr><td class=\"repo\">{}</td><td class=\"tag\">{}</td><td class=\"n\">{}</td><td>{}</td>\
<td class=\"hide-s\"><code>{}</code></td></tr>",
                escape(&c.repository),
                escape(&c.tag),
                human(c.size),
                ago(d.now, from_ms(c.last_used_ms)),
                escape(&c.digest)
            );
        }
        h.push_str("</table></div>");
    }
    h.push_str("<p class=\"muted\">Metrics: <a href=\"/metrics\">/metrics</a> · root CA: <a href=\"/ca.crt\">/ca.crt</a></p></body></html>\n");
    h
}

/// The `[[warm]]` schedules: last run, its result, next run.
fn warm_section(h: &mut String, d: &StatusData) {
    h.push_str(
        "<h2>Scheduled warming</h2><div class=\"scroll\"><table id=\"warm\"><tr><th>images</th>\
<th>every</th><th>last run</th><th>result</th><th>next run</th></tr>",
    );
    for w in &d.warm {
        let images: Vec<String> = w.images.iter().map(|i| format!("<code>{}</code>", escape(i))).collect();
        let result = match (&w.running_since, &w.last) {
            (Some(_), _) => "<span class=\"muted\">running</span>".to_string(),
            (None, None) => "-".to_string(),
            (None, Some(last)) => match &last.result {
                Ok(r) => format!(
                    "<span class=\"ok\">ok</span>: {} blobs, {} in {:.1} s",
                    r.blobs,
                    human(r.bytes),
                    last.took.as_secs_f64()
                ),
                Err(e) => format!("<span class=\"bad\">failed</span>: {}", escape(e)),
            },
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{} s</td><td>{}</td><td>{result}</td><td>{}</td></tr>",
            images.join("<br>"),
            w.every.as_secs(),
            ago(d.now, w.last.as_ref().map(|l| l.finished)),
            if w.running_since.is_some() {
                "-".to_string()
            } else {
                until(d.now, w.next)
            }
        );
    }
    h.push_str("</table></div>");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> StatusData {
        StatusData {
            upstreams: vec!["status-test.io".into()],
            cached: vec![CachedTag {
                upstream: "status-test.io".into(),
                repository: "org/<script>alert(1)</script>".into(),
                tag: "v1\"&'".into(),
                digest: "sha256:abc".into(),
                media_type: "x".into(),
                size: 3 << 20,
                last_used_ms: 1,
            }],
            recent: vec![RecentPull {
                at: SystemTime::now(),
                upstream: "status-test.io".into(),
                repo: "a<b".into(),
                reference: "1".into(),
                outcome: "hit",
            }],
            health: Default::default(),
            urls: Vec::new(),
            local: vec![LocalRepo {
                repository: "private/<b>app".into(),
                tags: 2,
                size: 5 << 20,
                last_push: Some(SystemTime::now()),
            }],
            warm: vec![crate::warm::runs::RunState {
                images: vec!["docker.io/library/<i>alpine:3".into()],
                every: std::time::Duration::from_secs(3600),
                running_since: None,
                last: Some(crate::warm::runs::LastRun {
                    finished: SystemTime::now(),
                    took: std::time::Duration::from_millis(1500),
                    result: Err("upstream <down>".into()),
                }),
                next: Some(SystemTime::now() + std::time::Duration::from_secs(600)),
            }],
            now: SystemTime::now(),
        }
    }

    #[test]
    fn strings_from_repositories_and_tags_are_escaped() {
        let page = render(&data());
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("org/&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("v1&quot;&amp;&#39;"));
        assert!(page.contains("status-test.io/a&lt;b"));
        assert!(page.contains("3.0 MiB"));
        assert!(
            page.contains("private/&lt;b&gt;app") && page.contains("5.0 MiB"),
            "local repositories listed"
        );
        assert!(
            page.contains("library/&lt;i&gt;alpine:3")
                && page.contains("failed</span>: upstream &lt;down&gt;")
                && page.contains("in 9 min")
                && page.contains("3600 s"),
            "warm schedules listed with their last result and next run"
        );
    }

    #[test]
    fn the_page_fits_a_phone() {
        let page = render(&data());
        assert!(page.contains("name=\"viewport\""));
        assert!(!page.contains("<script"));
    }

    #[test]
    fn ages_read_naturally() {
        let now = UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let at = |s: u64| Some(now - std::time::Duration::from_secs(s));
        assert_eq!(ago(now, None), "-");
        assert_eq!(ago(now, at(5)), "5 s ago");
        assert_eq!(ago(now, at(600)), "10 min ago");
        assert_eq!(ago(now, at(3 * 3600)), "3 h ago");
        assert_eq!(ago(now, at(3 * 86_400)), "3 d ago");
        // A clock that went backwards is "0 s ago", not a panic.
        assert_eq!(ago(now, Some(now + std::time::Duration::from_secs(9))), "0 s ago");
    }
}
