//! Talking to upstream registries: the HTTP client (`client`), its answers
//! (`response`) and failures (`error`), Bearer token auth (`token`), name
//! resolution that ignores /etc/hosts (`resolve`), the table of
//! configured upstreams (`table`), each URL's health and back-off
//! (`health`), and what was last seen of each upstream (`observed`).
//!
//! Knows nothing of the cache or of our own clients' HTTP: it sends
//! requests and hands back responses or [`Error`]s.

pub mod client;
pub mod error;
pub mod health;
pub mod observed;
pub mod redirect;
pub mod resolve;
pub mod response;
pub mod table;
pub mod token;

pub use client::{AuthScheme, Credential, TokenAnswer, TokenRelay, UpstreamClient, UpstreamRequest};
pub use error::Error;
pub use health::UrlState;
pub use response::Response;
pub use table::{Upstream, UpstreamId, UpstreamTable};
