//! The root CA that clients trust once.
//!
//! It is created on first start and reused afterwards. Its X.509
//! nameConstraints permit only the configured registry hostnames (and the
//! proxy's own name) and exclude every IP address, so a leaked key cannot be
//! used to impersonate any other site. The key file is 0600 and never served.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CidrSubnet, DistinguishedName, DnType, GeneralSubtree, IsCa,
    KeyPair, KeyUsagePurpose, NameConstraints, PKCS_ECDSA_P256_SHA256,
};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("generating the CA: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The loaded root CA: what clients trust (`cert_pem`) and what signs leaves.
pub struct CertificateAuthority {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    /// The CA re-encoded by rcgen so it can sign; same subject and key as `cert_der`.
    pub(crate) signer: Certificate,
    pub(crate) key: KeyPair,
    pub permitted: Vec<String>,
}

impl CertificateAuthority {
    pub fn cert_path(dir: &Path) -> PathBuf {
        dir.join("ca.pem")
    }

    fn key_path(dir: &Path) -> PathBuf {
        dir.join("ca.key")
    }

    /// Loads the CA from `dir`, creating it when absent. An existing CA whose
    /// constraints do not cover every name in `names` is an error: issuing a
    /// leaf the clients would reject is worse than refusing to start.
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<Self, CaError> {
        let cert_path = Self::cert_path(dir);
        let key_path = Self::key_path(dir);
        if cert_path.exists() || key_path.exists() {
            return Self::load(dir, names);
        }
        fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(names);
        let cert = params.self_signed(&key)?;
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(path = %cert_path.display(), "created root CA; clients must trust this file");
        Self::load(dir, names)
    }

    fn load(dir: &Path, names: &[String]) -> Result<Self, CaError> {
        let cert_path = Self::cert_path(dir);
        let key_path = Self::key_path(dir);
        let read = |p: &Path| {
            fs::read_to_string(p).map_err(|source| CaError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let mode = fs::metadata(&key_path)
            .map_err(|source| CaError::Io {
                path: key_path.clone(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(CaError::Invalid {
                path: key_path,
                message: format!(
                    "mode {:o} lets others read the CA key; run chmod 600 on it",
                    mode & 0o777
                ),
            });
        }
        let bad = |path: &Path, message: String| CaError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(&key_path, format!("not a private key: {e}")))?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(|e| bad(&cert_path, format!("not a CA certificate: {e}")))?;
        let permitted: Vec<String> = params
            .name_constraints
            .as_ref()
            .map(|nc| {
                nc.permitted_subtrees
                    .iter()
                    .filter_map(|s| match s {
                        GeneralSubtree::DnsName(n) => Some(n.to_ascii_lowercase()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(missing) = names.iter().find(|n| !permitted_by(&permitted, n)) {
            return Err(bad(
                &cert_path,
                format!(
                    "this CA is not permitted to sign for {missing:?} (it permits {permitted:?}); \
                     move {} away to generate a new CA, then re-install it on clients",
                    dir.display()
                ),
            ));
        }
        let cert_der = pem_to_der(&cert_pem).ok_or_else(|| bad(&cert_path, "no certificate in file".into()))?;
        let signer = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem,
            cert_der,
            signer,
            key,
            permitted,
        })
    }
}

fn permitted_by(permitted: &[String], name: &str) -> bool {
    permitted.iter().any(|p| name == p || name.ends_with(&format!(".{p}")))
}

fn ca_params(names: &[String]) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "regmirror root CA");
    dn.push(DnType::OrganizationName, "regmirror");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: names.iter().map(|n| GeneralSubtree::DnsName(n.clone())).collect(),
        excluded_subtrees: vec![
            GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
        ],
    });
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    params
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}

pub(crate) fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec![
            "ghcr.io".into(),
            "registry-1.docker.io".into(),
            "regmirror.local".into(),
        ]
    }

    #[test]
    fn created_once_with_private_key_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), &names()).unwrap();
        let mode = fs::metadata(dir.path().join("ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = CertificateAuthority::load_or_create(dir.path(), &names()).unwrap();
        assert_eq!(ca.cert_pem, again.cert_pem);
        assert_eq!(again.permitted.len(), 3);
    }

    #[test]
    fn ca_is_name_constrained_to_the_configured_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), &names()).unwrap();
        let params = CertificateParams::from_ca_cert_pem(&ca.cert_pem).unwrap();
        let nc = params.name_constraints.unwrap();
        let mut permitted: Vec<_> = nc
            .permitted_subtrees
            .iter()
            .map(|s| match s {
                GeneralSubtree::DnsName(n) => n.clone(),
                other => panic!("unexpected permitted subtree {other:?}"),
            })
            .collect();
        permitted.sort();
        assert_eq!(permitted, names());
        assert_eq!(
            nc.excluded_subtrees.len(),
            2,
            "all IPv4 and IPv6 addresses are excluded"
        );
        assert!(matches!(params.is_ca, IsCa::Ca(_)));
    }

    #[test]
    fn existing_ca_that_does_not_cover_a_new_host_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path(), &names()).unwrap();
        let mut more = names();
        more.push("quay.io".into());
        let err = CertificateAuthority::load_or_create(dir.path(), &more)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("quay.io"), "{err}");
    }

    #[test]
    fn world_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path(), &names()).unwrap();
        fs::set_permissions(dir.path().join("ca.key"), fs::Permissions::from_mode(0o644)).unwrap();
        let err = CertificateAuthority::load_or_create(dir.path(), &names())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
