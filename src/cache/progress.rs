//! How far a download has got: written by the download's leader
//! ([`super::fetch`]), read by every response following it
//! ([`super::served`]).

use super::error::FetchError;

/// The state of one download, sent to its followers on a watch channel.
#[derive(Clone, Debug)]
pub(crate) enum Progress {
    Opening,
    Growing {
        written: u64,
    },
    Done {
        size: u64,
    },
    Failed(FetchError),
    /// The store had no room: each waiter streams from upstream itself.
    Uncached,
}
