//! The content cache: a store of verified, content-addressed bytes (`store`)
//! and the single-flight fetch that fills it (`fetch`).
//!
//! The cache never sees a URL: callers hand it a digest and a function that
//! opens a byte stream, and it calls that function at most once per cold
//! digest however many clients ask at the same time.

pub mod fetch;
pub mod store;

pub use fetch::{Cache, Served, Source};
pub use store::{BlobInfo, LocalStore, Store, TagRecord};
