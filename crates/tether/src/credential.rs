//! Where a client's credential comes from: once per connection (for the HELLO) and again
//! when the server's ttl is 90 % gone (for an in-band refresh, AUTH), so a long-lived
//! client keeps its connection across token lifetimes.
//!
//! ```text
//!  connect ──▶ Credentials::fetch ──▶ HELLO(credential) ──▶ WELCOME(ttl)
//!                    ▲                                        │ 90 % of ttl
//!                    └──────── RefreshCredential ◀────────────┘
//!                    fetch ──▶ AUTH(credential) ──▶ AUTH_OK(ttl') …
//! ```
//!
//! Built in: a fixed token ([`Credentials::token`]), a file read on every fetch
//! ([`Credentials::file`]: an agent that rewrites it rotates the client's token without a
//! restart), and any async function ([`Credentials::from_fn`]: fetch from an identity
//! provider). A fetch that fails is retried at the next connection attempt; meanwhile the
//! server closes the connection when the old credential runs out (`credential-expired`).

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tether_proto::codec::{check_credential, Credential, CredentialLenError};
use thiserror::Error;

/// Why a credential could not be had.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// A token file could not be read.
    #[error("cannot read the token file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The credential is empty or longer than the protocol carries (8192 bytes).
    #[error("credential from {from}: {source}")]
    Length {
        /// Where it came from ("the token", a file name, "the credential source").
        from: String,
        /// What is wrong.
        #[source]
        source: CredentialLenError,
    },
    /// A custom source failed.
    #[error("credential source: {0}")]
    Source(String),
}

/// The future a [`CredentialSource`] returns.
pub type CredentialFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Credential, CredentialError>> + Send + 'a>>;

/// Gives a client its credential, each time it needs one (see the module docs).
pub trait CredentialSource: Send + Sync + 'static {
    /// The credential to present now.
    fn fetch(&self) -> CredentialFuture<'_>;
}

/// A client's credential source, cheap to clone. `Debug` never shows a token.
#[derive(Clone)]
pub struct Credentials(Arc<dyn CredentialSource>);

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(..)")
    }
}

struct Fixed(Credential);

impl CredentialSource for Fixed {
    fn fetch(&self) -> CredentialFuture<'_> {
        let c = self.0.clone();
        Box::pin(async move { Ok(c) })
    }
}

struct File(PathBuf);

/// Reads a token file: its bytes without surrounding whitespace (a trailing newline is
/// what editors and `echo` leave).
pub fn read_token_file(path: &Path) -> Result<Credential, CredentialError> {
    let raw = std::fs::read(path).map_err(|source| CredentialError::Read {
        path: path.into(),
        source,
    })?;
    let trimmed = raw.trim_ascii();
    check_credential(trimmed).map_err(|source| CredentialError::Length {
        from: path.display().to_string(),
        source,
    })?;
    Ok(Credential(Bytes::copy_from_slice(trimmed)))
}

impl CredentialSource for File {
    fn fetch(&self) -> CredentialFuture<'_> {
        // A small local file: read in place (no blocking worth a thread).
        let r = read_token_file(&self.0);
        Box::pin(async move { r })
    }
}

struct FromFn<F>(F);

impl<F, Fut> CredentialSource for FromFn<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Credential, CredentialError>> + Send + 'static,
{
    fn fetch(&self) -> CredentialFuture<'_> {
        Box::pin((self.0)())
    }
}

impl Credentials {
    /// Always the same token (a JWT in compact form, or whatever the server's authorizer
    /// accepts). Checked here: 1 to 8192 bytes.
    pub fn token(token: impl Into<Bytes>) -> Result<Self, CredentialError> {
        let t: Bytes = token.into();
        check_credential(&t).map_err(|source| CredentialError::Length {
            from: "the token".into(),
            source,
        })?;
        Ok(Credentials(Arc::new(Fixed(Credential(t)))))
    }

    /// The contents of `path` (trimmed), read again on every fetch. Read once here, so a
    /// missing or empty file is reported at once.
    pub fn file(path: impl Into<PathBuf>) -> Result<Self, CredentialError> {
        let path = path.into();
        read_token_file(&path)?;
        Ok(Credentials(Arc::new(File(path))))
    }

    /// Whatever `f` returns each time.
    pub fn from_fn<F, Fut>(f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Credential, CredentialError>> + Send + 'static,
    {
        Credentials(Arc::new(FromFn(f)))
    }

    /// A custom source.
    pub fn from_source(source: impl CredentialSource) -> Self {
        Credentials(Arc::new(source))
    }

    /// Fetches the credential to present now (length-checked).
    pub async fn fetch(&self) -> Result<Credential, CredentialError> {
        let c = self.0.fetch().await?;
        check_credential(&c).map_err(|source| CredentialError::Length {
            from: "the credential source".into(),
            source,
        })?;
        Ok(c)
    }

    /// Fetches a fresh credential on a task of its own and hands it to the connection's task
    /// for an AUTH frame (a failure is logged: the server closes at expiry, and the next
    /// connection attempt fetches again).
    pub(crate) fn refresh_into(&self, shared: &Arc<crate::driver::Shared>) {
        let me = self.clone();
        let shared = Arc::downgrade(shared);
        tokio::spawn(async move {
            match me.fetch().await {
                Ok(c) => {
                    if let Some(s) = shared.upgrade() {
                        s.resolve(crate::driver::Resolved::Credential(c));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot refresh the credential"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_files_and_functions_give_checked_credentials() {
        let t = Credentials::token("abc").unwrap();
        assert_eq!(t.fetch().await.unwrap().as_bytes(), b"abc");
        assert!(matches!(
            Credentials::token(""),
            Err(CredentialError::Length { .. })
        ));
        assert!(Credentials::token(vec![b'x'; 8193]).is_err());
        assert_eq!(format!("{t:?}"), "Credentials(..)");

        let dir = std::env::temp_dir().join(format!("tether-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "  first\n").unwrap();
        let c = Credentials::file(&f).unwrap();
        assert_eq!(c.fetch().await.unwrap().as_bytes(), b"first");
        // Rewritten by an agent: the next fetch sees the new token.
        std::fs::write(&f, "second\n").unwrap();
        assert_eq!(c.fetch().await.unwrap().as_bytes(), b"second");
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(
            c.fetch().await,
            Err(CredentialError::Length { .. })
        ));
        let missing = Credentials::file(dir.join("missing")).unwrap_err();
        assert!(missing.to_string().contains("missing"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();

        let n = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let n2 = n.clone();
        let f = Credentials::from_fn(move || {
            let k = n2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async move { Ok(Credential::from(format!("t{k}"))) }
        });
        assert_eq!(f.fetch().await.unwrap().as_bytes(), b"t0");
        assert_eq!(f.fetch().await.unwrap().as_bytes(), b"t1");
        let empty = Credentials::from_fn(|| async { Ok(Credential::from(Vec::new())) });
        assert!(empty.fetch().await.is_err());
    }
}
