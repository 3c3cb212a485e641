//! STARTTLS server configuration: PEM certificate chain and key, reloaded
//! on SIGHUP so certificates can be renewed without a restart.

use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::{anyhow, Context};
use relay_core::config::TlsConfig;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The current acceptor, swapped on reload.
#[derive(Clone)]
pub struct Tls {
    current: Arc<RwLock<tokio_rustls::TlsAcceptor>>,
    files: TlsConfig,
}

fn load(files: &TlsConfig) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = load_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
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

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow!("cannot read TLS certificate {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("cannot parse TLS certificate {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("no certificate found in {}", path.display()));
    }
    Ok(certs)
}

impl Tls {
    pub fn new(files: &TlsConfig) -> anyhow::Result<Self> {
        Ok(Tls {
            current: Arc::new(RwLock::new(load(files)?)),
            files: files.clone(),
        })
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        // A poisoned lock only means a reload panicked; the old value is fine.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the files; on error the old certificate stays in use.
    pub fn reload(&self) {
        match load(&self.files) {
            Ok(acceptor) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = acceptor;
                tracing::info!(event = "tls_reloaded", cert = %self.files.cert.display());
            }
            Err(e) => tracing::error!(event = "tls_reload_failed", error = %e),
        }
    }
}
