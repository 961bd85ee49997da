//! Events for `[[webhook]]` receivers: pulls, pushes, misses, evictions,
//! and upstream URLs going down and coming back.
//!
//! The places where these things happen call [`emit`], which must never
//! slow or fail them: it only appends to each interested webhook's bounded
//! queue (a `std` mutex held for a push, never across I/O) and wakes that
//! webhook's delivery task. A queue that is full loses its oldest event,
//! counted in `regmirror_webhook_dropped_total`, so a receiver that is
//! down costs bounded memory and the newest news survives.
//!
//! The sink is process-wide, like [`crate::metrics::METRICS`], so that emit
//! points deep in the cache or the upstream clients need no new parameters;
//! before [`start`] (and in the CLI process, which never starts it) `emit`
//! does nothing.

pub mod delivery;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::SystemTime;

use tokio::sync::Notify;

use crate::config::Webhook;
use crate::metrics::{WebhookLabel, METRICS};

/// What happened. The names are what `events = [...]` lists and what the
/// CloudEvents `type` ends with (`io.regmirror.pull`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Pull,
    Push,
    Miss,
    Evict,
    UpstreamDown,
    UpstreamUp,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Pull,
        Kind::Push,
        Kind::Miss,
        Kind::Evict,
        Kind::UpstreamDown,
        Kind::UpstreamUp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pull => "pull",
            Kind::Push => "push",
            Kind::Miss => "miss",
            Kind::Evict => "evict",
            Kind::UpstreamDown => "upstream_down",
            Kind::UpstreamUp => "upstream_up",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// One event's facts; what a kind does not know stays `None` (sent as
/// JSON `null`, so every event has the same keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: Kind,
    pub repository: Option<String>,
    /// The tag or digest the client asked for.
    pub reference: Option<String>,
    pub digest: Option<String>,
    pub media_type: Option<String>,
    pub size: Option<u64>,
    /// The client's IP address, when a client caused the event.
    pub client: Option<String>,
    /// The upstream's configured name.
    pub upstream: Option<String>,
    /// The upstream URL that went down or came back.
    pub url: Option<String>,
    /// Why an upstream URL went down.
    pub error: Option<String>,
}

impl Event {
    pub fn new(kind: Kind) -> Event {
        Event {
            kind,
            repository: None,
            reference: None,
            digest: None,
            media_type: None,
            size: None,
            client: current_client().map(|c| c.to_string()),
            upstream: None,
            url: None,
            error: None,
        }
    }
}

/// An event as queued: numbered, so a delivery task can tell whether the
/// event it just delivered is still the head of its queue (or was dropped
/// meanwhile), and timed when it happened rather than when delivered.
#[derive(Debug)]
pub struct Stamped {
    pub seq: u64,
    pub time: SystemTime,
    pub event: Event,
}

/// One webhook's queue, shared by `emit` and its delivery task.
pub struct Hook {
    pub config: Webhook,
    /// The label of its metrics: the URL without credentials or query.
    pub label: String,
    queue: Mutex<VecDeque<Arc<Stamped>>>,
    wake: Notify,
}

impl Hook {
    pub fn new(config: Webhook) -> Hook {
        let mut label = config.url.clone();
        let _ = label.set_username("");
        let _ = label.set_password(None);
        label.set_query(None);
        label.set_fragment(None);
        Hook {
            queue: Mutex::new(VecDeque::with_capacity(config.queue.min(1024))),
            config,
            label: label.to_string(),
            wake: Notify::new(),
        }
    }

    fn wants(&self, kind: Kind) -> bool {
        self.config.events.contains(&kind)
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Stamped>>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `e`, dropping the oldest events beyond the bound.
    pub fn push(&self, e: Arc<Stamped>) {
        let dropped = {
            let mut q = self.queue();
            let mut dropped = 0u64;
            while q.len() >= self.config.queue {
                q.pop_front();
                dropped += 1;
            }
            q.push_back(e);
            dropped
        };
        if dropped > 0 {
            METRICS
                .webhook_dropped
                .get_or_create(&WebhookLabel {
                    webhook: self.label.clone(),
                })
                .inc_by(dropped);
        }
        self.wake.notify_one();
    }

    /// The oldest event not yet delivered; it stays queued until
    /// [`Hook::delivered`], so a full queue may still drop it.
    pub fn head(&self) -> Option<Arc<Stamped>> {
        self.queue().front().cloned()
    }

    /// Removes event `seq` from the head, unless it was dropped meanwhile.
    pub fn delivered(&self, seq: u64) {
        let mut q = self.queue();
        if q.front().is_some_and(|e| e.seq == seq) {
            q.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.queue().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until an event may have been queued since the last wait.
    pub async fn queued(&self) {
        self.wake.notified().await;
    }
}

struct Sink {
    hooks: Vec<Arc<Hook>>,
}

static SINK: OnceLock<Sink> = OnceLock::new();
static SEQ: AtomicU64 = AtomicU64::new(0);

/// Hands `event` to every webhook that wants its kind. Never blocks and
/// never fails: a cheap no-op when no webhook is configured.
pub fn emit(event: Event) {
    let Some(sink) = SINK.get() else {
        return;
    };
    if !sink.hooks.iter().any(|h| h.wants(event.kind)) {
        return;
    }
    let kind = event.kind;
    let stamped = Arc::new(Stamped {
        seq: SEQ.fetch_add(1, Ordering::Relaxed),
        time: SystemTime::now(),
        event,
    });
    for hook in sink.hooks.iter().filter(|h| h.wants(kind)) {
        hook.push(stamped.clone());
    }
}

/// Whether any webhook wants `kind`: lets an emit point skip building an
/// event (strings to clone) nobody will receive.
pub fn wanted(kind: Kind) -> bool {
    SINK.get().is_some_and(|s| s.hooks.iter().any(|h| h.wants(kind)))
}

/// Why the webhooks could not be started.
#[derive(Debug, thiserror::Error)]
#[error("webhook: {0}")]
pub struct StartError(pub String);

/// Installs the sink and starts one delivery task per webhook. `source`
/// names this server in every event (`regmirror://<server.name>`); `instance`
/// makes event ids unique across restarts. Called once, in `serve`.
pub fn start(webhooks: &[Webhook], server_name: &str, instance: &str) -> Result<(), StartError> {
    if webhooks.is_empty() {
        return Ok(());
    }
    let client = delivery::client()?;
    let hooks: Vec<Arc<Hook>> = webhooks.iter().cloned().map(|w| Arc::new(Hook::new(w))).collect();
    if SINK.set(Sink { hooks: hooks.clone() }).is_err() {
        return Err(StartError("started twice".into()));
    }
    let source = Arc::<str>::from(format!("regmirror://{server_name}"));
    let instance = Arc::<str>::from(instance);
    for hook in hooks {
        delivery::spawn(hook, client.clone(), source.clone(), instance.clone());
    }
    Ok(())
}

tokio::task_local! {
    /// The address of the client whose request is being handled, for the
    /// events it causes: set around each request by the listeners, so the
    /// handlers between need not carry it.
    static CLIENT: Option<IpAddr>;
}

/// Runs `f` (a request's handling) with `client` as the events' client.
pub async fn with_client<F: std::future::Future>(client: Option<IpAddr>, f: F) -> F::Output {
    CLIENT.scope(client, f).await
}

/// The client of the request being handled, if any.
pub fn current_client() -> Option<IpAddr> {
    CLIENT.try_with(|c| *c).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(queue: usize) -> Hook {
        Hook::new(Webhook {
            url: url::Url::parse("https://user:pw@hooks.example/in?token=x").unwrap(),
            events: Kind::ALL.to_vec(),
            secret: None,
            queue,
        })
    }

    fn stamped(seq: u64) -> Arc<Stamped> {
        Arc::new(Stamped {
            seq,
            time: SystemTime::now(),
            event: Event::new(Kind::Pull),
        })
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("Pull"), None);
        assert_eq!(Kind::parse(""), None);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_them() {
        let h = hook(3);
        assert_eq!(
            h.label, "https://hooks.example/in",
            "no credentials in the metric label"
        );
        let label = WebhookLabel {
            webhook: h.label.clone(),
        };
        let before = METRICS.webhook_dropped.get_or_create(&label).get();
        for seq in 0..5 {
            h.push(stamped(seq));
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.head().map(|e| e.seq), Some(2), "the two oldest went");
        assert_eq!(METRICS.webhook_dropped.get_or_create(&label).get() - before, 2);
    }

    #[test]
    fn delivered_removes_only_the_event_still_at_the_head() {
        let h = hook(2);
        h.push(stamped(10));
        h.push(stamped(11));
        let head = h.head().unwrap();
        // While it was being delivered the queue overflowed and dropped it.
        h.push(stamped(12));
        h.delivered(head.seq);
        assert_eq!(h.len(), 2, "the newer events stay queued");
        assert_eq!(h.head().map(|e| e.seq), Some(11));
        h.delivered(11);
        assert_eq!(h.head().map(|e| e.seq), Some(12));
    }

    #[test]
    fn emit_without_a_sink_does_nothing() {
        // The unit tests never start the sink, as the CLI never does.
        emit(Event::new(Kind::Evict));
        assert!(!wanted(Kind::Evict));
    }

    #[tokio::test]
    async fn the_client_is_known_only_inside_its_request() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let seen = with_client(Some(ip), async { Event::new(Kind::Pull).client }).await;
        assert_eq!(seen.as_deref(), Some("192.0.2.7"));
        assert_eq!(Event::new(Kind::Pull).client, None);
    }
}
