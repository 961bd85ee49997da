//! A throwaway test CA and the leaf certificates it signs (rcgen), written as
//! PEM files for distribution, the token server and clients.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A root CA kept in memory, with its certificate written to `<dir>/ca.pem`.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    pub pem: String,
    pub pem_path: PathBuf,
}

/// A leaf certificate and key written to disk.
pub struct LeafFiles {
    pub cert_pem: String,
    pub key_pem: String,
    /// leaf followed by the CA, the form Go servers want.
    pub chain_path: PathBuf,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl TestCa {
    /// Creates a CA named `cn` and writes `<dir>/ca.pem`.
    pub fn new(dir: &Path, cn: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name = dn(cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign CA");
        let pem = cert.pem();
        let pem_path = dir.join("ca.pem");
        std::fs::write(&pem_path, &pem).expect("write ca.pem");
        TestCa {
            cert,
            key,
            pem,
            pem_path,
        }
    }

    /// Issues a serverAuth leaf for `dns` names and `ips`, writing
    /// `<dir>/<stem>.pem`, `<stem>.key` and `<stem>-chain.pem`.
    pub fn issue(&self, dir: &Path, stem: &str, dns: &[&str], ips: &[IpAddr]) -> LeafFiles {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.distinguished_name = dn(dns.first().copied().unwrap_or("leaf"));
        params.subject_alt_names = dns
            .iter()
            .map(|d| SanType::DnsName((*d).try_into().expect("DNS SAN")))
            .chain(ips.iter().map(|ip| SanType::IpAddress(*ip)))
            .collect();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign leaf");
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        let cert_path = dir.join(format!("{stem}.pem"));
        let key_path = dir.join(format!("{stem}.key"));
        let chain_path = dir.join(format!("{stem}-chain.pem"));
        std::fs::write(&cert_path, &cert_pem).expect("write leaf");
        std::fs::write(&key_path, &key_pem).expect("write key");
        std::fs::write(&chain_path, format!("{cert_pem}{}", self.pem)).expect("write chain");
        LeafFiles {
            cert_pem,
            key_pem,
            chain_path,
            cert_path,
            key_path,
        }
    }
}

/// A self-signed signing certificate for JWTs: the key as PKCS#8 DER (for
/// ring), the certificate DER (for the `x5c` header) and its PEM written to
/// `path` (distribution's `rootcertbundle`). No EKU, so Go's default
/// verification accepts it.
pub struct SigningCert {
    pub pkcs8: Vec<u8>,
    pub cert_der: Vec<u8>,
    pub pem_path: PathBuf,
}

impl SigningCert {
    pub fn new(path: &Path, cn: &str) -> SigningCert {
        let key = KeyPair::generate().expect("signing key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = dn(cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).expect("self-sign");
        std::fs::write(path, cert.pem()).expect("write rootcertbundle");
        SigningCert {
            pkcs8: key.serialize_der(),
            cert_der: cert.der().to_vec(),
            pem_path: path.to_path_buf(),
        }
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}
