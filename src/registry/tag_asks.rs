//! Concurrent anonymous requests for one tag share one upstream question.
//!
//! A Deployment rolled out to hundreds of nodes asks for the same new tag
//! in the same second: without this, each request sends its own HEAD
//! upstream (hundreds of round trips, and of Docker Hub's rate limit, for
//! one answer). The first request asks; the others, arriving while it is
//! asking, wait for its answer: an answer upstream gave after they arrived
//! is as fresh as one they would have asked for. Only anonymous requests
//! share (their answers are public, the same for every one of them); a
//! client's own token is asked upstream as before, since what it may read
//! is upstream's call. When the first request fails or cannot share its
//! answer, each waiting request asks for itself.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use tokio::sync::watch;

use crate::cache::TagRecord;
use crate::reference::Digest;

/// What upstream said a tag names now.
#[derive(Debug, Clone)]
pub struct TagAnswer {
    pub digest: Digest,
    pub record: TagRecord,
}

/// (upstream, repository, tag, Accept): requests that would ask upstream
/// the same question.
pub type AskKey = (String, String, String, String);

/// `None` while asking; then the answer, or `None` inside when there is
/// none to share.
type Slot = Option<Option<TagAnswer>>;

/// The questions being asked now.
#[derive(Default)]
pub struct TagAsks {
    /// Each question with its number, so that an asker forgets only its own.
    asking: Mutex<HashMap<AskKey, (u64, watch::Receiver<Slot>)>>,
    next: std::sync::atomic::AtomicU64,
}

/// A request's place: asking upstream, or waiting for the one that is.
pub enum Turn<'a> {
    Ask(Asking<'a>),
    Wait(watch::Receiver<Slot>),
}

/// The request that asks; its answer goes to every waiter. Dropped without
/// [`Asking::answer`] (an error, a cancelled request), the waiters ask
/// for themselves.
pub struct Asking<'a> {
    asks: &'a TagAsks,
    key: AskKey,
    id: u64,
    tx: watch::Sender<Slot>,
}

impl TagAsks {
    pub fn turn(&self, key: AskKey) -> Turn<'_> {
        let mut asking = self.asking.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, rx)) = asking.get(&key) {
            return Turn::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        asking.insert(key.clone(), (id, rx));
        Turn::Ask(Asking {
            asks: self,
            key,
            id,
            tx,
        })
    }

    /// The answer the asking request shares; `None`: ask for yourself.
    pub async fn wait(mut rx: watch::Receiver<Slot>) -> Option<TagAnswer> {
        let slot = rx.wait_for(Option::is_some).await.ok()?;
        slot.clone().flatten()
    }

    #[cfg(test)]
    fn asking(&self) -> usize {
        self.asking.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl Asking<'_> {
    /// Hands `answer` to every request waiting (`None`: nothing to share).
    pub fn answer(self, answer: Option<TagAnswer>) {
        // Removed first: a request arriving from now on asks anew.
        self.forget();
        self.tx.send_replace(Some(answer));
    }

    fn forget(&self) {
        let mut asking = self.asks.asking.lock().unwrap_or_else(PoisonError::into_inner);
        // Only this question's entry: a later one for the same key may
        // have taken the place already.
        if asking.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            asking.remove(&self.key);
        }
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.forget();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tag: &str) -> AskKey {
        ("docker.io".into(), "library/alpine".into(), tag.into(), "*/*".into())
    }

    fn answer() -> TagAnswer {
        TagAnswer {
            digest: Digest::of(b"manifest"),
            record: TagRecord {
                digest: Digest::of(b"manifest").to_string(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                size: 8,
                public: true,
                seen_ms: 1,
            },
        }
    }

    #[tokio::test]
    async fn waiters_get_the_askers_answer_and_later_requests_ask_anew() {
        let asks = TagAsks::default();
        let Turn::Ask(first) = asks.turn(key("3")) else {
            panic!("the first request asks")
        };
        let waiters: Vec<_> = (0..3)
            .map(|_| match asks.turn(key("3")) {
                Turn::Wait(rx) => tokio::spawn(TagAsks::wait(rx)),
                Turn::Ask(_) => panic!("a second request while the first asks waits"),
            })
            .collect();
        assert!(
            matches!(asks.turn(key("other")), Turn::Ask(_)),
            "another tag asks for itself"
        );
        first.answer(Some(answer()));
        for w in waiters {
            assert_eq!(w.await.unwrap().map(|a| a.digest), Some(answer().digest));
        }
        assert!(
            matches!(asks.turn(key("3")), Turn::Ask(_)),
            "answered: the next request asks again"
        );
    }

    #[tokio::test]
    async fn when_the_asker_fails_or_goes_away_the_waiters_ask_for_themselves() {
        let asks = TagAsks::default();
        let Turn::Ask(first) = asks.turn(key("3")) else {
            panic!()
        };
        let Turn::Wait(rx) = asks.turn(key("3")) else { panic!() };
        drop(first);
        assert!(TagAsks::wait(rx).await.is_none());
        assert_eq!(asks.asking(), 0);

        let Turn::Ask(first) = asks.turn(key("3")) else {
            panic!()
        };
        let Turn::Wait(rx) = asks.turn(key("3")) else { panic!() };
        first.answer(None);
        assert!(TagAsks::wait(rx).await.is_none());
        assert_eq!(asks.asking(), 0);
    }
}
