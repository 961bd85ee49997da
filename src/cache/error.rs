//! Why the cache could not serve or fill an entry. Says what failed, not
//! how a client should see it: `registry::errors` decides that.

use std::io;
use std::sync::Arc;

use super::source::SourceError;
use crate::reference::Digest;

/// Cloneable, so one failed download reaches every waiter with its cause.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The source of the bytes (upstream) failed before or while opening.
    #[error("{0}")]
    Source(SourceError),
    #[error("cache store: could not {op} {digest}: {source}")]
    Store {
        digest: Digest,
        op: &'static str,
        source: Arc<io::Error>,
    },
    #[error("download of {digest} broke after {after} bytes: {message}")]
    Broken {
        digest: Digest,
        after: u64,
        message: String,
    },
    #[error("upstream sent {got} of the announced {expected} bytes of {digest}")]
    Short { digest: Digest, got: u64, expected: u64 },
    #[error("upstream sent more than the {limit} bytes allowed for {digest}")]
    Long { digest: Digest, limit: u64 },
    #[error("upstream content does not match {expected} (got {got}); not stored")]
    DigestMismatch { expected: Digest, got: Digest },
    #[error("download of {digest} was abandoned before it finished")]
    Abandoned { digest: Digest },
}

impl From<SourceError> for FetchError {
    fn from(e: SourceError) -> Self {
        FetchError::Source(e)
    }
}

impl FetchError {
    pub(crate) fn store(digest: &Digest, op: &'static str, e: io::Error) -> Self {
        tracing::error!(%digest, op, error = %e, "cache store failure");
        FetchError::Store {
            digest: digest.clone(),
            op,
            source: Arc::new(e),
        }
    }

    /// True when the bytes upstream sent were wrong (short, long, corrupt):
    /// counted, because a registry that does this needs looking at.
    pub fn is_bad_content(&self) -> bool {
        matches!(
            self,
            FetchError::Broken { .. }
                | FetchError::Short { .. }
                | FetchError::Long { .. }
                | FetchError::DigestMismatch { .. }
        )
    }
}
