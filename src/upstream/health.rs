//! The health of one upstream URL, learnt from the requests sent to it.
//!
//! A URL that fails (connect error, timeout, a body that stalled; or a
//! 5xx, 408 or 429 while another URL can take its requests) is skipped for
//! a back-off period that doubles while it keeps failing, so a mirror that
//! is down costs one failed request per period instead of one per client
//! request. When the period is over, one request at a time probes it; an
//! answer puts it back in use. A `Retry-After` the URL sent is a hard
//! bound on its back-off. Failures that are not a reason to skip the URL
//! (an error answer from the last URL standing, a body that broke once)
//! are only noted, for the operator.
//!
//! Owns no I/O: callers report outcomes and ask whether to use the URL.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// The first back-off after a failure; doubled while failures go on.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// The longest a failing URL is left alone before it is probed again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A `Retry-After` longer than this is read as this: a URL is never shunned
/// for hours on one header.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// One URL's state as an operator (status page, metrics) sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlState {
    /// The URL as configured.
    pub url: String,
    /// `false` while the URL is skipped (backing off) after failures.
    pub healthy: bool,
    /// When the URL will be probed again (while not healthy).
    pub backing_off_until: Option<SystemTime>,
    /// Failures in a row since its last success.
    pub consecutive_failures: u32,
    /// The last failure: what went wrong and when.
    pub last_error: Option<(String, SystemTime)>,
    /// When it last answered (any answer that is not a failure).
    pub last_success: Option<SystemTime>,
}

/// Whether a request may use the URL now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Healthy: use it.
    Use,
    /// Its back-off is over and this caller is the one probe.
    Probe,
    /// Skip it until this instant.
    Skip { until: Instant },
}

#[derive(Debug, Default)]
struct State {
    failures: u32,
    /// Skipped (except for one probe at a time) until then.
    backoff_until: Option<Instant>,
    /// Nothing at all is sent before then (Retry-After).
    not_before: Option<Instant>,
    probing: bool,
    last_error: Option<(String, SystemTime)>,
    last_success: Option<SystemTime>,
}

/// One URL's health. Shared by the URL's client and the responses it
/// hands out, so a body that breaks later is charged to the right URL.
#[derive(Debug)]
pub struct Health {
    /// The upstream's configured name, for the events this URL's changes send.
    upstream: String,
    url: String,
    state: Mutex<State>,
}

impl Health {
    pub fn new(upstream: &str, url: &str) -> Self {
        Health {
            upstream: upstream.to_string(),
            url: url.to_string(),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether to send a request to this URL now. A caller told `Probe`
    /// must report the outcome (success or failure), which frees the probe.
    pub fn admit(&self, now: Instant) -> Admission {
        let mut s = self.state();
        if let Some(nb) = s.not_before.filter(|nb| *nb > now) {
            return Admission::Skip { until: nb };
        }
        match s.backoff_until {
            None => Admission::Use,
            Some(until) if until > now => Admission::Skip { until },
            Some(_) if s.probing => Admission::Skip {
                until: now + FIRST_BACKOFF,
            },
            Some(_) => {
                s.probing = true;
                Admission::Probe
            }
        }
    }

    /// Whether a request that already tried this URL may try it again now:
    /// only its `Retry-After` holds it back, not the back-off the request
    /// itself caused.
    pub fn retry_allowed(&self, now: Instant) -> Result<(), Instant> {
        match self.state().not_before {
            Some(nb) if nb > now => Err(nb),
            _ => Ok(()),
        }
    }

    /// A failure worth telling the operator about but no reason to stop
    /// using the URL.
    pub fn note(&self, why: &str) {
        let mut s = self.state();
        s.failures = s.failures.saturating_add(1);
        s.last_error = Some((why.to_string(), SystemTime::now()));
    }

    /// Whether the URL is being skipped now (back-off or Retry-After not
    /// over), without claiming a probe.
    pub fn backing_off(&self, now: Instant) -> bool {
        let s = self.state();
        s.backoff_until.is_some_and(|u| u > now) || s.not_before.is_some_and(|u| u > now)
    }

    /// Gives up a probe without an outcome (the request was dropped), so
    /// the next request may probe instead.
    pub fn release_probe(&self) {
        self.state().probing = false;
    }

    /// The URL answered.
    pub fn success(&self) {
        let mut s = self.state();
        let was_down = s.backoff_until.is_some();
        s.failures = 0;
        s.backoff_until = None;
        s.probing = false;
        s.last_success = Some(SystemTime::now());
        drop(s);
        if was_down {
            self.emit(crate::events::Kind::UpstreamUp, None);
        }
    }

    /// An `upstream_down` or `upstream_up` event: sent on the change of
    /// state only, not per request, so an outage is two events.
    fn emit(&self, kind: crate::events::Kind, why: Option<&str>) {
        if !crate::events::wanted(kind) {
            return;
        }
        let mut event = crate::events::Event::new(kind);
        // The request that noticed it is not what the event is about.
        event.client = None;
        event.upstream = Some(self.upstream.clone());
        event.url = Some(self.url.clone());
        event.error = why.map(str::to_string);
        crate::events::emit(event);
    }

    /// The URL failed: back off for longer the more it keeps failing, and
    /// never less than the `retry_after` it asked for.
    pub fn failure(&self, why: &str, retry_after: Option<Duration>) {
        let now = Instant::now();
        let mut s = self.state();
        let was_up = s.backoff_until.is_none();
        s.failures = s.failures.saturating_add(1);
        let exp = s.failures.saturating_sub(1).min(16);
        let backoff = FIRST_BACKOFF.saturating_mul(1u32 << exp).min(MAX_BACKOFF);
        let retry_after = retry_after.map(|r| r.min(MAX_RETRY_AFTER));
        let until = now + backoff.max(retry_after.unwrap_or_default());
        s.backoff_until = Some(until);
        if let Some(r) = retry_after {
            s.not_before = Some(now + r);
        }
        s.probing = false;
        s.last_error = Some((why.to_string(), SystemTime::now()));
        tracing::debug!(url = %self.url, failures = s.failures, ?backoff, error = why, "upstream URL failed");
        drop(s);
        if was_up {
            self.emit(crate::events::Kind::UpstreamDown, Some(why));
        }
    }

    pub fn snapshot(&self) -> UrlState {
        let s = self.state();
        let now = Instant::now();
        let wall = SystemTime::now();
        let until = s
            .backoff_until
            .into_iter()
            .chain(s.not_before)
            .filter(|u| *u > now)
            .max();
        UrlState {
            url: self.url.clone(),
            healthy: until.is_none(),
            backing_off_until: until.map(|u| wall + (u - now)),
            consecutive_failures: s.failures,
            last_error: s.last_error.clone(),
            last_success: s.last_success,
        }
    }
}

/// Parses `Retry-After` (delta-seconds or an HTTP date) into a wait from now.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate(v)?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only date form
/// registries send.
fn httpdate(v: &str) -> Option<SystemTime> {
    let (_weekday, rest) = v.split_once(", ")?;
    let mut parts = rest.split(' ');
    let day: u8 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => time::Month::January,
        "Feb" => time::Month::February,
        "Mar" => time::Month::March,
        "Apr" => time::Month::April,
        "May" => time::Month::May,
        "Jun" => time::Month::June,
        "Jul" => time::Month::July,
        "Aug" => time::Month::August,
        "Sep" => time::Month::September,
        "Oct" => time::Month::October,
        "Nov" => time::Month::November,
        "Dec" => time::Month::December,
        _ => return None,
    };
    let year: i32 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|n| n.parse::<u8>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if parts.next()? != "GMT" || parts.next().is_some() {
        return None;
    }
    let date = time::Date::from_calendar_date(year, month, day).ok()?;
    let t = time::Time::from_hms(h, m, s).ok()?;
    let secs = u64::try_from(time::PrimitiveDateTime::new(date, t).assume_utc().unix_timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_url_is_skipped_for_longer_each_time_and_probed_once() {
        let h = Health::new("u", "http://a");
        let t0 = Instant::now();
        assert_eq!(h.admit(t0), Admission::Use);
        h.failure("refused", None);
        assert!(matches!(h.admit(Instant::now()), Admission::Skip { .. }));
        let later = Instant::now() + FIRST_BACKOFF + Duration::from_millis(1);
        assert_eq!(h.admit(later), Admission::Probe);
        assert!(matches!(h.admit(later), Admission::Skip { .. }), "one probe at a time");
        h.failure("refused again", None);
        let s = h.snapshot();
        assert!(!s.healthy && s.consecutive_failures == 2);
        let until = s.backing_off_until.unwrap();
        let wait = until.duration_since(SystemTime::now()).unwrap();
        assert!(wait > FIRST_BACKOFF, "the second back-off is longer: {wait:?}");
        assert_eq!(s.last_error.unwrap().0, "refused again");
        h.success();
        assert_eq!(h.admit(Instant::now()), Admission::Use);
        let s = h.snapshot();
        assert!(s.healthy && s.last_success.is_some() && s.consecutive_failures == 0);
        h.note("body broke off");
        let s = h.snapshot();
        assert!(s.healthy, "a noted failure does not take the URL out of use");
        assert_eq!(
            (s.consecutive_failures, s.last_error.unwrap().0.as_str()),
            (1, "body broke off")
        );
        assert_eq!(h.admit(Instant::now()), Admission::Use);
    }

    #[test]
    fn retry_after_is_a_hard_bound_even_for_the_request_that_saw_it() {
        let h = Health::new("u", "http://a");
        h.failure("429", Some(Duration::from_secs(30)));
        assert!(h.retry_allowed(Instant::now()).is_err());
        assert!(h.retry_allowed(Instant::now() + Duration::from_secs(31)).is_ok());
        let h = Health::new("u", "http://b");
        h.failure("refused", None);
        assert!(
            h.retry_allowed(Instant::now()).is_ok(),
            "back-off alone does not stop a retry"
        );
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after(" 60 "), Some(Duration::from_secs(60)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-5"), None);
    }
}
