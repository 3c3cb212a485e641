//! DANE for SMTP (RFC 7672): a next hop with DNSSEC-validated TLSA
//! records must do TLS, and its certificate is authenticated by those
//! records instead of the Web PKI. DANE-EE (3): the server's own
//! certificate or key matches, whatever its names and dates. DANE-TA (2):
//! a certificate in the chain the server sends matches, and the chain
//! from it to the server's certificate is valid for the next hop's name.
//! PKIX usages (0, 1) are unusable for SMTP (§3.1.3): with only those,
//! TLS is still mandatory but not authenticated.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::dns::TlsaRecord;

/// Verifies a server's certificate against its TLSA records.
#[derive(Debug)]
pub struct DaneVerifier {
    records: Vec<TlsaRecord>,
    provider: Arc<CryptoProvider>,
}

/// Why no TLSA record authenticated the certificate.
#[derive(Debug)]
struct NoMatch(&'static str);

impl std::fmt::Display for NoMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for NoMatch {}

fn mismatch(why: &'static str) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(NoMatch(why)),
    )))
}

/// Whether `record` matches certificate `cert` (DER).
pub fn matches(record: &TlsaRecord, cert: &[u8]) -> bool {
    let Some(data) = crate::dane::selected(cert, record.selector) else {
        return false;
    };
    match record.matching {
        0 => data == record.data.as_slice(),
        1 => ring::digest::digest(&ring::digest::SHA256, data).as_ref() == record.data.as_slice(),
        2 => ring::digest::digest(&ring::digest::SHA512, data).as_ref() == record.data.as_slice(),
        _ => false,
    }
}

/// Usable for SMTP: DANE-TA or DANE-EE, with known selector and matching.
fn usable(r: &TlsaRecord) -> bool {
    matches!(r.usage, 2 | 3) && r.selector <= 1 && r.matching <= 2
}

impl DaneVerifier {
    /// A verifier for a host with these (validated) TLSA records.
    pub fn new(records: Vec<TlsaRecord>) -> DaneVerifier {
        DaneVerifier {
            records,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    /// A client configuration that authenticates with these records.
    pub fn client_config(records: Vec<TlsaRecord>) -> Arc<rustls::ClientConfig> {
        let verifier = Arc::new(DaneVerifier::new(records));
        super::transport::with_verifier(verifier.provider.clone(), verifier)
    }

    fn trust_anchor_path(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> bool {
        let anchors: Vec<&CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| {
                self.records
                    .iter()
                    .any(|r| r.usage == 2 && usable(r) && matches(r, c))
            })
            .collect();
        let Ok(ee) = webpki::EndEntityCert::try_from(end_entity) else {
            return false;
        };
        anchors.into_iter().any(|anchor| {
            let Ok(ta) = webpki::anchor_from_trusted_cert(anchor) else {
                return false;
            };
            let chain_ok = ee
                .verify_for_usage(
                    self.provider.signature_verification_algorithms.all,
                    &[ta],
                    intermediates,
                    now,
                    webpki::KeyUsage::server_auth(),
                    None,
                    None,
                )
                .is_ok();
            chain_ok && ee.verify_is_valid_for_subject_name(server_name).is_ok()
        })
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.records.iter().any(usable) {
            // TLS is mandatory, authentication impossible (RFC 7672 §3.1.3).
            return Ok(ServerCertVerified::assertion());
        }
        let ee_match = self
            .records
            .iter()
            .any(|r| r.usage == 3 && usable(r) && matches(r, end_entity));
        if ee_match || self.trust_anchor_path(end_entity, intermediates, server_name, now) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(mismatch("no TLSA record matches the certificate (DANE)"))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
