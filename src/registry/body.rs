//! Response bodies: a boxed stream of byte chunks, so a blob is never held
//! whole in memory.
//!
//! Every streamed body draws on one process-wide memory budget: a chunk is
//! read only after its bytes are reserved, and the reservation travels with
//! the chunk until hyper drops it (written to the socket, or the connection
//! gone). However many connections and HTTP/2 streams ask at once, the bytes
//! read from the store and not yet sent stay inside the budget; the rest wait.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// What a stream reserves before asking for its next chunk: the most the
/// cache reads at once. A chunk that comes back smaller gives the rest back
/// at once.
const CHUNK_RESERVE: usize = 256 * 1024;

/// The shared budget; one per process, replaced by [`set_memory_budget`].
static BUDGET: Mutex<Option<MemoryBudget>> = Mutex::new(None);

#[derive(Clone)]
struct MemoryBudget {
    permits: Arc<Semaphore>,
    total: usize,
}

impl MemoryBudget {
    fn new(bytes: usize) -> Self {
        let total = bytes.clamp(1, Semaphore::MAX_PERMITS);
        MemoryBudget {
            permits: Arc::new(Semaphore::new(total)),
            total,
        }
    }
}

/// Sets the bytes all response bodies together may hold in flight
/// (`limits.memory_budget`). Bodies created afterwards use the new budget;
/// those already streaming finish on the old one.
pub fn set_memory_budget(bytes: u64) {
    let budget = MemoryBudget::new(usize::try_from(bytes).unwrap_or(usize::MAX));
    *BUDGET.lock().unwrap_or_else(PoisonError::into_inner) = Some(budget);
}

fn current_budget() -> MemoryBudget {
    BUDGET
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        // Until `set_memory_budget` is called (unit tests, tools): the default.
        .get_or_insert_with(|| {
            let bytes = crate::config::Limits::default().memory_budget;
            MemoryBudget::new(usize::try_from(bytes).unwrap_or(usize::MAX))
        })
        .clone()
}

/// Bytes of the budget currently free (for tests and metrics).
pub fn memory_budget_available() -> usize {
    current_budget().permits.available_permits()
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body from a stream of chunks; an `Err` item aborts the response, which
/// the client sees as a broken transfer, never as a complete one. The stream
/// is polled only with budget reserved (see the module docs).
pub fn stream<S>(s: S) -> Body
where
    S: futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
{
    use futures_util::TryStreamExt;
    http_body_util::StreamBody::new(budgeted(s, current_budget()).map_ok(hyper::body::Frame::data)).boxed_unsync()
}

/// Reserves budget, then polls `s` for a chunk and ties the reservation to
/// that chunk's lifetime.
fn budgeted<S>(
    s: S,
    budget: MemoryBudget,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static
where
    S: futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
{
    use futures_util::StreamExt;
    // Never ask for more than exists, or a tiny budget would wait forever.
    let reserve = CHUNK_RESERVE.min(budget.total);
    futures_util::stream::unfold(Box::pin(s), move |mut s| {
        let permits = budget.permits.clone();
        async move {
            // The semaphore is never closed; if it were, stop the body.
            let reserved = permits.acquire_many_owned(reserve as u32).await.ok()?;
            let item = s.next().await?;
            Some((item.map(|chunk| charge(chunk, reserved)), s))
        }
    })
}

/// Shrinks `reserved` to the chunk's size (or grows it, if the budget has
/// room: a larger chunk is already in memory, so waiting for room would only
/// hold it longer) and makes the chunk own it.
fn charge(chunk: Bytes, mut reserved: OwnedSemaphorePermit) -> Bytes {
    let len = chunk.len();
    if len == 0 {
        return chunk;
    }
    let held = reserved.num_permits();
    if len < held {
        drop(reserved.split(held - len));
    } else if len > held {
        if let Ok(more) = reserved
            .semaphore()
            .clone()
            .try_acquire_many_owned(u32::try_from(len - held).unwrap_or(u32::MAX))
        {
            reserved.merge(more);
        }
    }
    Bytes::from_owner(Charged {
        chunk,
        _reserved: reserved,
    })
}

/// A chunk and its share of the budget, released together when hyper drops
/// the last reference to the bytes.
struct Charged {
    chunk: Bytes,
    _reserved: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn chunks(sizes: &[usize]) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let items: Vec<_> = sizes.iter().map(|n| Ok(Bytes::from(vec![7u8; *n]))).collect();
        futures_util::stream::iter(items)
    }

    #[tokio::test]
    async fn chunks_hold_their_size_until_dropped() {
        let budget = MemoryBudget::new(1 << 20);
        let mut s = Box::pin(budgeted(chunks(&[1000, CHUNK_RESERVE]), budget.clone()));
        let a = s.next().await.unwrap().unwrap();
        assert_eq!(budget.permits.available_permits(), (1 << 20) - 1000);
        let b = s.next().await.unwrap().unwrap();
        assert_eq!(budget.permits.available_permits(), (1 << 20) - 1000 - CHUNK_RESERVE);
        // Slices keep the chunk (and its reservation) alive.
        let slice = b.slice(10..20);
        drop((a, b));
        assert_eq!(budget.permits.available_permits(), (1 << 20) - CHUNK_RESERVE);
        drop(slice);
        assert!(s.next().await.is_none());
        assert_eq!(budget.permits.available_permits(), 1 << 20);
    }

    #[tokio::test]
    async fn a_stream_waits_for_room_and_goes_on_when_chunks_are_sent() {
        let budget = MemoryBudget::new(CHUNK_RESERVE);
        let mut s1 = Box::pin(budgeted(chunks(&[CHUNK_RESERVE]), budget.clone()));
        let mut s2 = Box::pin(budgeted(chunks(&[10]), budget.clone()));
        let held = s1.next().await.unwrap().unwrap();
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), s2.next()).await;
        assert!(waiting.is_err(), "the second stream read past the budget");
        drop(held);
        assert_eq!(s2.next().await.unwrap().unwrap().len(), 10);
    }

    #[tokio::test]
    async fn a_tiny_budget_still_serves_large_chunks() {
        let budget = MemoryBudget::new(1000);
        let mut s = Box::pin(budgeted(chunks(&[5000, 5000]), budget.clone()));
        let mut n = 0;
        // Each chunk is dropped (sent) before the next is asked for.
        while let Some(chunk) = s.next().await {
            assert_eq!(chunk.unwrap().len(), 5000);
            n += 1;
        }
        assert_eq!(n, 2);
        assert_eq!(budget.permits.available_permits(), 1000);
    }
}
