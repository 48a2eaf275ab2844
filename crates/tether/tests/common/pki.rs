//! Certificates made in the test with rcgen: a CA that issues server and client
//! certificates, written to a temporary directory as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A fresh directory for one test's files, removed (with the keys written there) when it
/// drops.
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("tether-it-{tag}-"))
        .tempdir()
        .expect("create test dir")
}

/// A CA that can issue server and client certificates.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, as PEM files.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: Vec<u8>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ca {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    /// The CA certificate as a PEM file in `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.cert.pem()).unwrap();
        p
    }

    fn issue(
        &self,
        dir: &Path,
        name: &str,
        cn: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let c = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let keyf = dir.join(format!("{name}.key"));
        std::fs::write(&cert, c.pem()).unwrap();
        std::fs::write(&keyf, key.serialize_pem()).unwrap();
        Issued {
            cert,
            key: keyf,
            der: c.der().to_vec(),
        }
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server(&self, dir: &Path, name: &str, cn: &str) -> Issued {
        self.issue(
            dir,
            name,
            cn,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose subject CN is `cn`.
    pub fn client(&self, dir: &Path, name: &str, cn: &str) -> Issued {
        self.issue(dir, name, cn, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}
