//! The manifest media types regmirror names when it asks for a manifest
//! without a client's own Accept to pass on.

/// Every manifest type a registry serves, index types first: sent where the
/// client names none (no Accept, or only `*/*`), by upstream checks, and by
/// warm runs, so upstream never refuses a modern manifest or converts it.
pub const ALL_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";
