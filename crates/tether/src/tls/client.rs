//! The client side: platform roots or `--ca`, `--server-name`, `--cert/--key`.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;

use super::{certified_key, load_certs, load_key, provider, root_store, TlsError};

/// A TLS client's settings: `--ca`, `--server-name`, `--cert`, `--key` (with `--tls` and
/// none of them: the platform's roots and the host connected to).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsOptions {
    /// Trust only the CAs in this PEM file (instead of the platform's roots).
    pub ca: Option<PathBuf>,
    /// The name to verify the server's certificate against (and send as SNI), instead of the
    /// host connected to.
    pub server_name: Option<String>,
    /// Client certificate chain (PEM) for mutual TLS; needs `key`.
    pub cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS; needs `cert`.
    pub key: Option<PathBuf>,
}

/// A configured TLS client.
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

/// Parses a DNS name or an IP address (IPv6 with or without brackets).
fn parse_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    ServerName::try_from(bare.to_owned()).map_err(|_| TlsError::ServerName {
        name: name.to_owned(),
    })
}

impl TlsClient {
    /// Builds the client configuration.
    ///
    /// Roots: with `ca`, exactly the CAs in that file (a private deployment does not also
    /// trust every public CA); without, the platform's store (`rustls-native-certs`: the
    /// OS's trust store, which operators already manage and which holds their enterprise
    /// CAs; `SSL_CERT_FILE`/`SSL_CERT_DIR` override it).
    pub fn new(opts: &ClientTlsOptions) -> Result<Self, TlsError> {
        let roots = match &opts.ca {
            Some(ca) => root_store(ca)?,
            None => {
                let loaded = rustls_native_certs::load_native_certs();
                let mut roots = rustls::RootCertStore::empty();
                let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
                if added == 0 {
                    let why = if loaded.errors.is_empty() {
                        "none found".to_owned()
                    } else {
                        loaded
                            .errors
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; ")
                    };
                    return Err(TlsError::NoPlatformRoots { why });
                }
                roots
            }
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Config { source })?
            .with_root_certificates(roots);
        let config = match (&opts.cert, &opts.key) {
            (Some(cert), Some(key)) => {
                // Checks that the key is the certificate's, naming the files if not.
                certified_key(cert, key)?;
                builder
                    .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                    .map_err(|source| TlsError::Config { source })?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(TlsError::IncompleteClientCert),
        };
        let server_name = opts.server_name.as_deref().map(parse_name).transpose()?;
        Ok(TlsClient {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The name a connection to `host` verifies: `--server-name` if given, else `host` (a
    /// DNS name or an IP address, without the port).
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, TlsError> {
        match &self.server_name {
            Some(n) => Ok(n.clone()),
            None => parse_name(host),
        }
    }

    /// Runs the TLS handshake over a connected stream to `host`.
    pub async fn connect<IO>(
        &self,
        host: &str,
        io: IO,
    ) -> io::Result<tokio_rustls::client::TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = self
            .server_name(host)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        TlsConnector::from(self.config.clone())
            .connect(name, io)
            .await
    }

    /// The configuration.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }
}
