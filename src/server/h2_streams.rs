//! The HTTP/2 streams of one connection, run inside that connection's own
//! task instead of one tokio task each.
//!
//! hyper hands every accepted stream to an executor. With a task per stream,
//! a warm manifest GET over HTTP/2 paid for a spawn, a wake of a task on the
//! other worker, the h2 crate's shared stream lock taken from two threads,
//! and a socket write per response: the connection task was woken once per
//! finished stream. Polled here, a stream that can answer at once (a hot
//! manifest) finishes in the same poll that accepted it, and the responses
//! of every stream that finished together leave in one write.
//!
//! What a client can hold is unchanged: hyper still caps the streams of a
//! connection (`limits.h2_max_streams`), and the streams end with their
//! connection, as they did when hyper reset them on close.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};

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

/// The running streams of one connection.
pub struct Streams {
    executor: StreamExecutor,
    running: FuturesUnordered<StreamTask>,
    /// Swapped with the executor's queue, so taking new streams does not
    /// allocate once the connection has warmed up.
    spare: Vec<StreamTask>,
}

impl Streams {
    pub fn new(executor: StreamExecutor) -> Self {
        Streams {
            executor,
            running: FuturesUnordered::new(),
            spare: Vec::new(),
        }
    }

    /// Takes the streams accepted since the last call and polls every stream
    /// that is new or was woken. Returns whether the connection has frames to
    /// send or streams to accept because of it: a stream was taken or ended.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        {
            let mut accepted = self.executor.accepted.lock().unwrap_or_else(PoisonError::into_inner);
            std::mem::swap(&mut *accepted, &mut self.spare);
        }
        let mut progressed = !self.spare.is_empty();
        for task in self.spare.drain(..) {
            self.running.push(task);
        }
        // `FuturesUnordered` yields after one pass over its members, so a
        // stream that keeps waking itself cannot hold the loop here.
        while let Poll::Ready(Some(())) = self.running.poll_next_unpin(cx) {
            progressed = true;
        }
        progressed
    }
}

/// Drives a connection and its streams together: after the streams ran, the
/// connection is polled again to send what they produced and to accept what
/// arrived meanwhile, up to a bound so other connections get their turn.
/// Then what they all wrote leaves through `batch`, when there is one.
pub fn poll_connection<C: Future + ?Sized>(
    connection: Pin<&mut C>,
    streams: &mut Streams,
    batch: Option<&dyn BatchFlush>,
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
        if !streams.poll(cx) {
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
        let _ = batch.flush(cx);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn streams_queued_by_the_executor_run_in_the_polling_task() {
        let executor = StreamExecutor::default();
        let mut streams = Streams::new(executor.clone());
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let done = done.clone();
            executor.execute(async move {
                tokio::task::yield_now().await;
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(done.load(Ordering::SeqCst), 0, "queued, not started");
        std::future::poll_fn(|cx| {
            streams.poll(cx);
            if streams.running.is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        assert_eq!(done.load(Ordering::SeqCst), 3);
    }
}
