//! TLS for tether listeners and clients: rustls through tokio-rustls, with the **ring**
//! crypto provider (no C/cmake build for aws-lc-rs).
//!
//! ```text
//!  server:  TcpListener ─accept─▶ TlsServer::acceptor().accept(tcp) ─▶ server::TlsStream ─▶ Transport
//!                                   │ cert + key (+ client CA)        │ peer_principal() (mTLS)
//!                                   └ reload() on SIGHUP: new handshakes get the new files,
//!                                     established streams keep theirs
//!  client:  TcpStream::connect ─▶ TlsClient::connect(host, tcp) ─▶ client::TlsStream ─▶ Transport
//!                                   roots: platform store, or --ca FILE only; --server-name;
//!                                   --cert/--key for mutual TLS
//! ```
//!
//! Liveness through TLS: the [`Transport`] methods look at the TCP
//! socket under the TLS session (`abort_on_close` sets `SO_LINGER 0`; `has_unacked` reads
//! `TCP_INFO`; `poll_unread` says yes when rustls holds decrypted or undecrypted bytes, or the
//! kernel holds bytes not yet read), so a paused reader still knows its peer is alive.
//!
//! Mutual-TLS identity ([`peer_principal`], [`principal_from_certificate`]): the principal's
//! name is the client certificate's subject **CN** when it has a non-empty one; otherwise the
//! **first DNS or URI SAN**, in certificate order; a certificate with neither names no
//! principal (refused). Its issuer is the certificate's issuer DN (RFC 4514 string), its only
//! allowed id is its name, and it expires with the certificate (`notAfter`). This is EMQX's
//! `peer_cert_as_clientid = cn`, with a SAN fallback for certificates that carry no CN.
//!
//! What it deliberately does not do: ALPN, session resumption tickets beyond rustls's
//! defaults, OCSP, CRLs.

mod client;
mod server;

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::auth::{AllowedIds, Principal, Scheme};
use crate::Transport;

pub use client::{ClientTlsOptions, TlsClient};
pub use server::{ServerTlsFiles, TlsServer};
pub use tokio_rustls::{
    client::TlsStream as ClientTlsStream, server::TlsStream as ServerTlsStream,
};

/// Why TLS could not be set up. Messages name the file and what is wrong with it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file is not valid PEM.
    #[error("{}: not valid PEM", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{}: no certificate in file", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key.
    #[error("{}: no private key in file (PKCS#8, RSA or SEC1 PEM expected)", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The private key's type is not supported.
    #[error("{}: unsupported private key", path.display())]
    UnsupportedKey {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The private key is not the certificate's.
    #[error("{}: key does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A CA file holds a certificate that cannot be a trust anchor.
    #[error("{}: bad CA certificate", path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built from the CA file.
    #[error("{}: cannot verify client certificates with this CA", path.display())]
    ClientVerifier {
        /// The CA file.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// `--cert` without `--key` or the other way round.
    #[error("a client certificate needs both --cert and --key")]
    IncompleteClientCert,
    /// Not a DNS name or IP address.
    #[error("invalid server name {name:?}")]
    ServerName {
        /// The name given.
        name: String,
    },
    /// The platform's certificate store gave no usable root.
    #[error("no usable root certificates in the platform store ({why}); give --ca FILE")]
    NoPlatformRoots {
        /// What the loader reported.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("tls configuration")]
    Config {
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
}

/// The crypto provider every tether TLS config uses (ring), whatever the process default is.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

/// Reads every certificate of a PEM file (a chain: leaf first), at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey { path: path.into() },
        source => TlsError::Pem {
            path: path.into(),
            source,
        },
    })
}

/// A certificate chain with its key, checked to belong together.
pub(crate) fn certified_key(
    cert_path: &Path,
    key_path: &Path,
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let certs = load_certs(cert_path)?;
    let key = load_key(key_path)?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::UnsupportedKey {
            path: key_path.into(),
            source,
        })?;
    let ck = rustls::sign::CertifiedKey::new(certs, signing);
    match ck.keys_match() {
        Ok(()) => Ok(ck),
        // The key type cannot tell its public key: rustls will find out at handshake time.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(_) => Err(TlsError::KeyMismatch {
            cert: cert_path.into(),
            key: key_path.into(),
        }),
    }
}

/// A root store from a CA file (every certificate in it is a trust anchor).
pub(crate) fn root_store(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|source| TlsError::BadCa {
            path: path.into(),
            source,
        })?;
    }
    Ok(roots)
}

// --- Transport through TLS ------------------------------------------------------------------

/// Whether rustls holds received bytes the application has not read: decrypted plaintext,
/// or TLS records read from the socket but not yet processed. A processing error counts as
/// "yes": the next read reports it.
fn rustls_holds_bytes<D>(conn: &mut rustls::ConnectionCommon<D>) -> bool {
    match conn.process_new_packets() {
        Ok(state) => state.plaintext_bytes_to_read() > 0,
        Err(_) => true,
    }
}

impl<IO: Transport> Transport for tokio_rustls::server::TlsStream<IO> {
    fn abort_on_close(&self) {
        self.get_ref().0.abort_on_close()
    }
    fn has_unacked(&self) -> Option<bool> {
        self.get_ref().0.has_unacked()
    }
    fn poll_unread(&mut self, cx: &mut Context<'_>) -> Option<bool> {
        let (io, conn) = self.get_mut();
        if rustls_holds_bytes(&mut **conn) {
            return Some(true);
        }
        io.poll_unread(cx)
    }
}

impl<IO: Transport> Transport for tokio_rustls::client::TlsStream<IO> {
    fn abort_on_close(&self) {
        self.get_ref().0.abort_on_close()
    }
    fn has_unacked(&self) -> Option<bool> {
        self.get_ref().0.has_unacked()
    }
    fn poll_unread(&mut self, cx: &mut Context<'_>) -> Option<bool> {
        let (io, conn) = self.get_mut();
        if rustls_holds_bytes(&mut **conn) {
            return Some(true);
        }
        io.poll_unread(cx)
    }
}

/// Either side's TLS stream, for code that handles both (tunnel, proxy).
#[derive(Debug)]
pub enum TlsStream<IO> {
    /// Accepted by a [`TlsServer`].
    Server(tokio_rustls::server::TlsStream<IO>),
    /// Connected by a [`TlsClient`].
    Client(tokio_rustls::client::TlsStream<IO>),
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsStream::Server(s) => Pin::new(s).poll_read(cx, buf),
            TlsStream::Client(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TlsStream::Server(s) => Pin::new(s).poll_write(cx, buf),
            TlsStream::Client(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsStream::Server(s) => Pin::new(s).poll_flush(cx),
            TlsStream::Client(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsStream::Server(s) => Pin::new(s).poll_shutdown(cx),
            TlsStream::Client(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TlsStream::Server(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            TlsStream::Client(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            TlsStream::Server(s) => s.is_write_vectored(),
            TlsStream::Client(s) => s.is_write_vectored(),
        }
    }
}

impl<IO: Transport> Transport for TlsStream<IO> {
    fn abort_on_close(&self) {
        match self {
            TlsStream::Server(s) => s.abort_on_close(),
            TlsStream::Client(s) => s.abort_on_close(),
        }
    }
    fn has_unacked(&self) -> Option<bool> {
        match self {
            TlsStream::Server(s) => s.has_unacked(),
            TlsStream::Client(s) => s.has_unacked(),
        }
    }
    fn poll_unread(&mut self, cx: &mut Context<'_>) -> Option<bool> {
        match self {
            TlsStream::Server(s) => s.poll_unread(cx),
            TlsStream::Client(s) => s.poll_unread(cx),
        }
    }
}

// --- Mutual-TLS identity --------------------------------------------------------------------

/// Why a client certificate names no principal.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The certificate could not be parsed.
    #[error("client certificate does not parse")]
    Parse,
    /// Neither a subject CN nor a DNS/URI SAN.
    #[error("client certificate has no CN and no DNS or URI SAN")]
    NoName,
}

/// The principal a client certificate (DER) names: see the module docs for the rule.
pub fn principal_from_certificate(der: &[u8]) -> Result<Principal, IdentityError> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};

    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Parse)?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let name = match cn {
        Some(cn) => cn,
        None => {
            let san = cert
                .subject_alternative_name()
                .map_err(|_| IdentityError::Parse)?;
            san.and_then(|ext| {
                ext.value.general_names.iter().find_map(|g| match g {
                    GeneralName::DNSName(n) | GeneralName::URI(n) if !n.is_empty() => {
                        Some((*n).to_owned())
                    }
                    _ => None,
                })
            })
            .ok_or(IdentityError::NoName)?
        }
    };
    let not_after = cert.validity().not_after.timestamp();
    let expires_at = if not_after >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(not_after as u64))
    } else {
        Some(UNIX_EPOCH)
    };
    let mut p = Principal::new(Scheme::Mtls, name.clone(), AllowedIds::only(name))
        .with_issuer(cert.issuer().to_string());
    // A notAfter beyond what SystemTime holds: no expiry.
    p.expires_at = expires_at;
    Ok(p)
}

/// The principal of the client certificate on an accepted TLS stream: `None` without a
/// client certificate (mutual TLS not configured), else [`principal_from_certificate`] of the
/// leaf.
pub fn peer_principal<IO>(
    stream: &tokio_rustls::server::TlsStream<IO>,
) -> Option<Result<Principal, IdentityError>> {
    let certs = stream.get_ref().1.peer_certificates()?;
    let leaf = certs.first()?;
    Some(principal_from_certificate(leaf))
}

/// A fresh directory for one test's files, removed (with the keys written there) when it
/// drops.
#[cfg(test)]
pub(crate) fn test_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("tether-test-{tag}-"))
        .tempdir()
        .expect("create test dir")
}

#[cfg(test)]
mod tests;
