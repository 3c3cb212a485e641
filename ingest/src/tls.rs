//! STARTTLS server configuration: PEM certificate chain and key, from
//! files or S3 objects, reloaded on SIGHUP and every `tls.reload_interval`
//! so certificates can be renewed without a restart.

use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::{anyhow, Context};
use relay_core::config::TlsConfig;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The current acceptor, swapped on reload.
#[derive(Clone)]
pub(crate) struct Tls {
    current: Arc<RwLock<tokio_rustls::TlsAcceptor>>,
    files: TlsConfig,
}

/// The bytes of a certificate or key: a file, or an `s3://bucket/key`
/// object (the AWS shape keeps them out of the image).
async fn read_source(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    if name.starts_with("s3://") {
        let conf = relay_core::store::aws::sdk_config().await;
        relay_core::store::aws::fetch_s3_uri(&conf, &name)
            .await
            .map_err(|e| anyhow!("cannot read TLS {what} {name}: {e}"))
    } else {
        std::fs::read(path).map_err(|e| anyhow!("cannot read TLS {what} {name}: {e}"))
    }
}

async fn load(files: &TlsConfig) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let cert_pem = read_source(&files.cert, "certificate").await?;
    let certs = parse_certs(&cert_pem, &files.cert)?;
    let key_pem = read_source(&files.key, "key").await?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| anyhow!("cannot read TLS key {}: {e}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "TLS certificate {} does not match key {}",
                files.cert.display(),
                files.key.display()
            )
        })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn parse_certs(pem: &[u8], path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("cannot parse TLS certificate {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("no certificate found in {}", path.display()));
    }
    Ok(certs)
}

impl Tls {
    pub(crate) async fn new(files: &TlsConfig) -> anyhow::Result<Self> {
        Ok(Tls {
            current: Arc::new(RwLock::new(load(files).await?)),
            files: files.clone(),
        })
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        // A poisoned lock only means a reload panicked; the old value is fine.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the certificate and key; on error the old ones stay in use.
    pub(crate) async fn reload(&self) {
        match load(&self.files).await {
            Ok(acceptor) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = acceptor;
                tracing::info!(event = "tls_reloaded", cert = %self.files.cert.display());
            }
            Err(e) => tracing::error!(event = "tls_reload_failed", error = %format!("{e:#}")),
        }
    }
}
