//! Leaf certificates issued on demand, one per SNI name, kept in memory.
//!
//! Only configured hostnames get a certificate: an unknown SNI gets none and
//! the handshake fails, so regmirror never impersonates a site it does not
//! mirror. Leaves are short-lived and re-issued before they expire.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::CertificateAuthority;

/// How long an issued leaf is valid; clients never see one older than this.
const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A cached leaf is replaced when less than this remains.
const RENEW_BEFORE: Duration = Duration::from_secs(3600);

pub struct LeafIssuer {
    ca: CertificateAuthority,
    allowed: Vec<String>,
    /// Used when the client sends no SNI (it connected by IP address).
    default_name: String,
    cache: Mutex<LruCache<String, (Arc<CertifiedKey>, Instant)>>,
}

impl std::fmt::Debug for LeafIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafIssuer").field("allowed", &self.allowed).finish()
    }
}

impl LeafIssuer {
    pub fn new(ca: CertificateAuthority, allowed: Vec<String>, default_name: String) -> Self {
        let cap = NonZeroUsize::new(256).unwrap_or(NonZeroUsize::MIN);
        LeafIssuer {
            ca,
            allowed,
            default_name,
            cache: Mutex::new(LruCache::new(cap)),
        }
    }

    pub fn is_allowed(&self, name: &str) -> bool {
        self.allowed.iter().any(|a| a == name)
    }

    /// The certificate for `name`, from the cache or freshly issued.
    pub fn leaf_for(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.to_ascii_lowercase();
        if !self.is_allowed(&name) {
            tracing::warn!(sni = %name, "TLS handshake refused: no upstream is configured for this hostname");
            return None;
        }
        if let Ok(mut cache) = self.cache.lock() {
            if let Some((key, expires)) = cache.get(&name) {
                if expires.saturating_duration_since(Instant::now()) > RENEW_BEFORE {
                    return Some(key.clone());
                }
            }
        }
        match self.issue(&name) {
            Ok(key) => {
                let key = Arc::new(key);
                if let Ok(mut cache) = self.cache.lock() {
                    cache.put(name, (key.clone(), Instant::now() + LEAF_LIFETIME));
                }
                Some(key)
            }
            Err(e) => {
                tracing::error!(sni = %name, error = %e, "issuing a leaf certificate failed");
                None
            }
        }
    }

    fn issue(&self, name: &str) -> Result<CertifiedKey, String> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = vec![SanType::DnsName(
            name.try_into().map_err(|e: rcgen::Error| e.to_string())?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::seconds(LEAF_LIFETIME.as_secs() as i64);
        let cert = params
            .signed_by(&key, &self.ca.signer, &self.ca.key)
            .map_err(|e| e.to_string())?;
        let chain = vec![
            CertificateDer::from(cert.der().to_vec()),
            CertificateDer::from(self.ca.cert_der.clone()),
        ];
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| e.to_string())?;
        Ok(CertifiedKey::new(chain, signing))
    }
}

impl ResolvesServerCert for LeafIssuer {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().unwrap_or(&self.default_name).to_string();
        self.leaf_for(&name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_only_for_configured_names_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["quay.io".to_string(), "regmirror.local".to_string()];
        let ca = CertificateAuthority::load_or_create(dir.path(), &names).unwrap();
        let issuer = LeafIssuer::new(ca, names, "regmirror.local".into());
        let a = issuer.leaf_for("QUAY.io").expect("configured name gets a leaf");
        let b = issuer.leaf_for("quay.io").unwrap();
        assert!(Arc::ptr_eq(&a, &b), "second handshake reuses the cached leaf");
        assert_eq!(a.cert.len(), 2, "chain carries the root");
        assert!(issuer.leaf_for("example.com").is_none());
        assert!(issuer.leaf_for("evil.quay.io").is_none());
    }
}
