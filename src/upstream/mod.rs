//! Talking to upstream registries: the HTTP client (`client`), Bearer token
//! auth (`token`) and name resolution that ignores /etc/hosts (`resolve`).
//!
//! Knows nothing of the cache; it sends requests and hands back responses.

pub mod client;
pub mod resolve;
pub mod token;

pub use client::{UpstreamClient, UpstreamRequest};
