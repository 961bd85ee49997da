//! Delivering one webhook's events: one task per `[[webhook]]`, POSTing
//! each event as a CloudEvents 1.0 structured-mode JSON body, in order.
//!
//! An event leaves its queue only once the receiver answered 2xx; until
//! then the same event is retried after a back-off (1 s, doubling to
//! 60 s), so events arrive in the order they happened and a receiver that
//! was down gets everything its queue still holds once it is back.
//! Nothing here is awaited by serving.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Hook, Stamped, StartError};
use crate::metrics::{WebhookDeliveryLabels, METRICS};
use crate::upstream::error::error_chain;

/// The wait after a first failed attempt; doubled while failures go on.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between attempts, so a receiver that is back gets its
/// events within a minute.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// One attempt's bound: a receiver that accepts the connection and never
/// answers must not hold the queue forever.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The header carrying `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "x-regmirror-signature";
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// The HTTP client of every webhook: the system roots (a webhook is
/// usually a public https service), no redirects (a POST that is
/// redirected is a misconfigured URL, better seen as failures).
pub(super) fn client() -> Result<reqwest::Client, StartError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    // reqwest is built without a default crypto provider: name ring, as
    // the upstream clients do.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(5))
        .timeout(ATTEMPT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("regmirror/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| StartError(e.to_string()))
}

pub(super) fn spawn(hook: Arc<Hook>, client: reqwest::Client, source: Arc<str>, instance: Arc<str>) {
    tokio::spawn(run(hook, client, source, instance));
}

async fn run(hook: Arc<Hook>, client: reqwest::Client, source: Arc<str>, instance: Arc<str>) {
    let mut backoff = FIRST_BACKOFF;
    let mut failing = false;
    loop {
        let Some(event) = hook.head() else {
            hook.queued().await;
            continue;
        };
        let body = body(&event, &source, &instance);
        let mut req = client
            .post(hook.config.url.clone())
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body.clone());
        if let Some(secret) = &hook.config.secret {
            req = req.header(SIGNATURE_HEADER, signature(&secret.0, body.as_bytes()));
        }
        let outcome = match req.send().await {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(format!("answered {}", resp.status())),
            Err(e) => Err(error_chain(&e)),
        };
        let result = if outcome.is_ok() { "ok" } else { "failed" };
        METRICS
            .webhook_deliveries
            .get_or_create(&WebhookDeliveryLabels {
                webhook: hook.label.clone(),
                result,
            })
            .inc();
        match outcome {
            Ok(()) => {
                hook.delivered(event.seq);
                if failing {
                    tracing::info!(webhook = %hook.label, queued = hook.len(), "webhook delivers again");
                }
                failing = false;
                backoff = FIRST_BACKOFF;
            }
            Err(why) => {
                // Once per outage, not once per attempt.
                if !failing {
                    tracing::warn!(webhook = %hook.label, error = %why, "webhook delivery failed; retrying with back-off");
                } else {
                    tracing::debug!(webhook = %hook.label, error = %why, ?backoff, "webhook delivery failed again");
                }
                failing = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// `sha256=<hex>`: HMAC-SHA256 of exactly the bytes sent, keyed with the
/// secret file's content.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length: `new_from_slice` cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The CloudEvents 1.0 structured-mode envelope of `e`.
pub fn body(e: &Stamped, source: &str, instance: &str) -> String {
    let ev = &e.event;
    serde_json::json!({
        "specversion": "1.0",
        "id": format!("{instance}-{}", e.seq),
        "source": source,
        "type": format!("io.regmirror.{}", ev.kind.as_str()),
        "time": rfc3339(e.time),
        "datacontenttype": "application/json",
        "data": {
            "repository": ev.repository,
            "reference": ev.reference,
            "digest": ev.digest,
            "mediaType": ev.media_type,
            "size": ev.size,
            "client": ev.client,
            "upstream": ev.upstream,
            "url": ev.url,
            "error": ev.error,
        },
    })
    .to_string()
}

/// RFC 3339 in UTC with milliseconds (`2026-11-30T09:12:19.318Z`).
fn rfc3339(at: SystemTime) -> String {
    let t = time::OffsetDateTime::from(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::super::{Event, Kind};
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn body_is_a_structured_cloudevent() {
        let mut event = Event::new(Kind::UpstreamDown);
        event.upstream = Some("docker.io".into());
        event.url = Some("https://registry-1.docker.io/".into());
        let s = Stamped {
            seq: 7,
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_790_000_000_123),
            event,
        };
        let v: serde_json::Value = serde_json::from_str(&body(&s, "regmirror://regmirror.local", "abc")).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "abc-7");
        assert_eq!(v["source"], "regmirror://regmirror.local");
        assert_eq!(v["type"], "io.regmirror.upstream_down");
        assert_eq!(v["time"], "2026-09-21T14:13:20.123Z");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["data"]["upstream"], "docker.io");
        assert!(v["data"]["digest"].is_null() && v["data"].get("mediaType").is_some());
    }
}
