//! Where a download's bytes come from, as the cache sees it: a body and what
//! its sender said of it, opened again from an offset to resume. The cache
//! fetches through this and never calls upstream itself.

use std::future::Future;
use std::pin::Pin;

use super::blob_store::ByteStream;
use std::sync::Arc;

/// An upstream body as the cache sees it: bytes and what upstream said of them.
pub struct Source {
    pub media_type: Option<String>,
    /// The length upstream announced, checked against what arrives.
    pub length: Option<u64>,
    /// The most bytes accepted however they are sent (manifests are small).
    pub max_len: Option<u64>,
    /// Provenance: fetched without any client's credential, so it may be
    /// served to anyone; recorded when the content is committed.
    pub public: bool,
    /// Where `body` begins in the content: 0, or the offset a resumed
    /// download asked for when upstream honoured the range.
    pub start: u64,
    /// The sender stores this content where every replica reads it (the
    /// digest's owner writing the shared bucket): kept in this replica's
    /// local cache only, not written to the bucket a second time.
    pub stored_by_sender: bool,
    pub body: ByteStream,
}

/// Opens the content from the given byte offset on (0: all of it). A source
/// may begin at 0 whatever was asked (an upstream that ignores ranges).
pub type OpenFuture = Pin<Box<dyn Future<Output = Result<Source, SourceError>> + Send>>;

/// Why a source could not be opened: the sender's own error, kept whole
/// (the registry turns an upstream's into the client's answer) without the
/// cache knowing what sent it. Cloneable, as every waiter of a failed
/// download gets it.
#[derive(Clone, Debug)]
pub struct SourceError(Arc<dyn std::error::Error + Send + Sync>);

impl SourceError {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        SourceError(Arc::new(e))
    }

    /// The sender's error, when it is an `E`.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.0.downcast_ref::<E>()
    }
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
