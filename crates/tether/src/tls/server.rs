//! The server side: certificate, key and optional client CA from files, reloadable.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;

use super::{certified_key, provider, root_store, TlsError};

/// Where a TLS listener's files are: `--tls-cert`, `--tls-key`, `--client-ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, RSA or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates for mutual TLS: when set, every client must present a certificate
    /// issued by one of them.
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// Certificate and key, no client certificates.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        ServerTlsFiles {
            cert: cert.into(),
            key: key.into(),
            client_ca: None,
        }
    }

    /// Requires client certificates issued by the CAs in `path`.
    pub fn client_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.client_ca = Some(path.into());
        self
    }
}

/// Hands every handshake the current certificate; [`TlsServer::reload`] swaps it.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// A TLS listener's configuration, reloadable from its files (on SIGHUP): established
/// streams keep the session they have; handshakes after the reload use the new certificate
/// (and the new client CA).
#[derive(Debug)]
pub struct TlsServer {
    files: ServerTlsFiles,
    resolver: Arc<Resolver>,
    config: RwLock<Arc<ServerConfig>>,
}

fn build(files: &ServerTlsFiles, resolver: Arc<Resolver>) -> Result<ServerConfig, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config { source })?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let roots = Arc::new(root_store(ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|source| TlsError::ClientVerifier {
                    path: ca.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(builder.with_cert_resolver(resolver))
}

impl TlsServer {
    /// Loads the files; errors name the file and what is wrong (unreadable, no certificate,
    /// no key, key does not match the certificate, bad CA).
    pub fn from_files(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let ck = certified_key(&files.cert, &files.key)?;
        let resolver = Arc::new(Resolver {
            current: RwLock::new(Arc::new(ck)),
        });
        let config = build(&files, resolver.clone())?;
        Ok(TlsServer {
            files,
            resolver,
            config: RwLock::new(Arc::new(config)),
        })
    }

    /// Reads the files again. On success new handshakes use the new certificate, key and
    /// client CA; on error nothing changes (the old certificate stays in use) and the error
    /// says which file is wrong. Established connections are never touched.
    pub fn reload(&self) -> Result<(), TlsError> {
        let ck = certified_key(&self.files.cert, &self.files.key)?;
        let config = build(&self.files, self.resolver.clone())?;
        *self
            .resolver
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(ck);
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }

    /// The current configuration.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// An acceptor with the current configuration. Take one per accepted connection (cheap)
    /// so that a reloaded client CA applies; a reloaded certificate applies to acceptors
    /// taken before the reload too.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config())
    }

    /// Runs the TLS handshake on an accepted stream.
    pub async fn accept<IO>(&self, io: IO) -> io::Result<tokio_rustls::server::TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        self.acceptor().accept(io).await
    }

    /// The files it loads from.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    /// Whether clients must present a certificate.
    pub fn is_mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The leaf certificate new handshakes present (DER).
    pub fn current_certificate(&self) -> Option<rustls_pki_types::CertificateDer<'static>> {
        self.resolver
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .cert
            .first()
            .cloned()
    }
}
