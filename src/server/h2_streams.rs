//! The HTTP/2 streams of one connection start inside that connection's own
//! task; only those that must wait get a tokio task of their own.
//!
//! hyper hands every accepted stream to an executor. With a task per stream,
//! a warm manifest GET over HTTP/2 paid for a spawn, a wake of a task on the
//! other worker, the h2 crate's shared stream lock taken from two threads,
//! and a socket write per response: the connection task was woken once per
//! finished stream. Polled here first, a stream that can answer at once (a
//! hot manifest) finishes in the same poll that accepted it, and the
//! responses of every stream that finished together leave in one write. A
//! stream that has to wait (a blob read from disk, an upstream fetch) moves
//! to a task of its own, as before, so long transfers still run in parallel.
//!
//! What a client can hold is unchanged: hyper still caps the streams of a
//! connection (`limits.h2_max_streams`).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use super::write_batch::BatchFlush;

type StreamTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor hyper is given: it only queues, so that [`Streams::poll`]
/// can run what hyper accepted in the connection's task.
#[derive(Clone, Default)]
pub struct StreamExecutor {
    accepted: Arc<Mutex<Vec<StreamTask>>>,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.accepted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::pin(fut));
    }
}

/// The streams of one connection not yet started.
pub struct Streams {
    executor: StreamExecutor,
    /// Swapped with the executor's queue, so taking new streams does not
    /// allocate once the connection has warmed up.
    spare: Vec<StreamTask>,
}

impl Streams {
    pub fn new(executor: StreamExecutor) -> Self {
        Streams {
            executor,
            spare: Vec::new(),
        }
    }

    /// Polls each stream accepted since the last call once, here; a stream
    /// that is not done gets a task of its own. Returns whether any stream
    /// was taken: the connection then has frames to send.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        {
            let mut accepted = self.executor.accepted.lock().unwrap_or_else(PoisonError::into_inner);
            std::mem::swap(&mut *accepted, &mut self.spare);
        }
        let took = !self.spare.is_empty();
        for mut task in self.spare.drain(..) {
            if task.as_mut().poll(cx).is_pending() {
                tokio::spawn(task);
            }
        }
        took
    }
}

/// Drives a connection and its streams together: after the streams ran, the
/// connection is polled again to send what they produced and to accept what
/// arrived meanwhile, up to a bound so other connections get their turn.
/// Then what they all wrote leaves through `batch`, when there is one;
/// `quiet` says whether no response is under way any more.
pub fn poll_connection<C: Future + ?Sized>(
    connection: Pin<&mut C>,
    mut streams: Option<&mut Streams>,
    batch: Option<&dyn BatchFlush>,
    quiet: impl Fn() -> bool,
    cx: &mut Context<'_>,
) -> Poll<C::Output> {
    const ROUNDS: usize = 8;
    let mut connection = connection;
    let mut outcome = Poll::Pending;
    let mut rounds = 0;
    loop {
        if let Poll::Ready(done) = connection.as_mut().poll(cx) {
            outcome = Poll::Ready(done);
            break;
        }
        if !streams.as_deref_mut().is_some_and(|s| s.poll(cx)) {
            break;
        }
        rounds += 1;
        if rounds == ROUNDS {
            cx.waker().wake_by_ref();
            break;
        }
    }
    if let Some(batch) = batch {
        // Pending only while the socket is full: the task is woken when it
        // drains, and the rest goes then.
        let _ = batch.flush(cx, quiet());
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_ready_stream_finishes_in_the_polling_task_and_a_waiting_one_in_its_own() {
        let executor = StreamExecutor::default();
        let mut streams = Streams::new(executor.clone());
        let done = Arc::new(AtomicUsize::new(0));
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        {
            let done = done.clone();
            executor.execute(async move {
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        {
            let done = done.clone();
            executor.execute(async move {
                let _ = wait.await;
                done.fetch_add(10, Ordering::SeqCst);
            });
        }
        assert_eq!(done.load(Ordering::SeqCst), 0, "queued, not started");
        let took = std::future::poll_fn(|cx| Poll::Ready(streams.poll(cx))).await;
        assert!(took);
        assert_eq!(done.load(Ordering::SeqCst), 1, "the ready stream finished inline");
        release.send(()).unwrap();
        for _ in 0..100 {
            if done.load(Ordering::SeqCst) == 11 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(
            done.load(Ordering::SeqCst),
            11,
            "the waiting stream finished in its own task"
        );
        let took = std::future::poll_fn(|cx| Poll::Ready(streams.poll(cx))).await;
        assert!(!took);
    }
}
