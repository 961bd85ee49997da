//! Response bodies: a boxed stream of byte chunks, so a blob is never held
//! whole in memory.

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body from a stream of chunks; an `Err` item aborts the response, which
/// the client sees as a broken transfer, never as a complete one.
pub fn stream<S>(s: S) -> Body
where
    S: futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
{
    use futures_util::TryStreamExt;
    http_body_util::StreamBody::new(s.map_ok(hyper::body::Frame::data)).boxed_unsync()
}
