//! A test certificate authority: certificates for primaries, policy
//! servers and the like, signed by a CA the server under test is told to
//! trust (`[delivery] tls_ca_file`), or self-signed.

use std::path::PathBuf;

/// A CA in a temporary directory, with the certificates it issued.
pub struct Pki {
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
    dir: tempfile::TempDir,
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "backupmx test CA");
        let ca = params.self_signed(&ca_key).expect("CA");
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
        Pki {
            ca_params: params,
            ca_key,
            dir,
        }
    }

    /// The CA certificate (PEM), for `tls_ca_file`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate and key (PEM) for `names` (DNS names or IP
    /// addresses), signed by the CA or self-signed.
    pub fn issue(&self, names: &[&str], signed: bool) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).expect("params");
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = if signed {
            params.signed_by(&key, &issuer).expect("sign")
        } else {
            params.self_signed(&key).expect("self-sign")
        };
        (cert.pem(), key.serialize_pem())
    }

    /// A `[tls]` section for backupmx with a certificate for `names`,
    /// written as `file.pem`/`file.key`.
    pub fn tls_section(&self, file: &str, names: &[&str], signed: bool) -> String {
        let (cert, key) = self.issue(names, signed);
        let cert_path = self.dir.path().join(format!("{file}.pem"));
        let key_path = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert_path, cert).expect("write cert");
        std::fs::write(&key_path, key).expect("write key");
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert_path.display(),
            key_path.display()
        )
    }
}
