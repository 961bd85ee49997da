//! TLS for the intercepting listener: the root CA regmirror generates once
//! (`ca`) and the per-hostname leaf certificates it issues from it (`issuer`).

pub mod ca;
pub mod issuer;

pub use ca::CertificateAuthority;
pub use issuer::LeafIssuer;
