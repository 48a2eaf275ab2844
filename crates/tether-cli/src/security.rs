//! The security flags every tether listener and client shares, and what they turn into:
//! a reloadable TLS configuration and authorization rule for `serve` and `tunnel exit`, a TLS
//! client and a credential source for `connect` and `tunnel entry`.
//!
//! ```text
//!  server: --tls-cert --tls-key [--client-ca]   ─▶ TlsServer (reloaded on SIGHUP)
//!          --auth-secret | --auth-public-key | --auth-jwks [--auth-issuer --auth-audience]
//!                                                ─▶ Builtin(JWT verifier, reloaded on SIGHUP; mTLS)
//!          neither, on a non-loopback address    ─▶ refuse to start unless --insecure
//!  client: --tls [--ca --server-name --cert --key] ─▶ TlsClient
//!          --token TOKEN | --token-file FILE      ─▶ Credentials (the file is read again
//!                                                    at every connect and refresh)
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use anyhow::{Context, Result};
use clap::Args;
use tether::auth::{
    AllowedIds, AuthError, Authorize, Builtin, CredentialVerifier, JwtConfig, JwtVerifier,
    Principal,
};
use tether::credential::Credentials;
use tether::tls::{ClientTlsOptions, ServerTlsFiles, TlsClient, TlsServer};

use crate::config::{parse_bool, Layers};
use crate::exit::UsageError;

/// TLS and authentication flags of a listener (`serve`, `tunnel exit`).
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct ServerSecurityArgs {
    /// Speak TLS with this PEM certificate chain (leaf first); needs --tls-key. Reloaded on
    /// SIGHUP.
    #[arg(long, value_name = "FILE", help_heading = "Security")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (PKCS#8, RSA or SEC1). Reloaded on SIGHUP.
    #[arg(long, value_name = "FILE", help_heading = "Security")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Mutual TLS: require a client certificate issued by a CA in this PEM file. The
    /// certificate's subject CN (else its first DNS or URI SAN) is the client's principal and
    /// the one client id it may use. Needs --tls-cert.
    #[arg(long, value_name = "FILE", help_heading = "Security")]
    pub(crate) client_ca: Option<PathBuf>,
    /// Require a JWT signed with the HS256 secret in this file (at least 32 bytes; `tether
    /// token` signs with it). `sub` is the principal; `tether_ids` (else `sub`) the ids it may
    /// use; `exp` is enforced. Reloaded on SIGHUP.
    #[arg(long, value_name = "FILE", help_heading = "Security")]
    pub(crate) auth_secret: Option<PathBuf>,
    /// Require a JWT signed by the RSA (RS256), EC P-256 (ES256) or Ed25519 key whose public
    /// half is in this PEM file. Reloaded on SIGHUP.
    #[arg(long, value_name = "FILE", help_heading = "Security")]
    pub(crate) auth_public_key: Option<PathBuf>,
    /// Require a JWT signed by a key of this JWKS file (picked by `kid`; keys bound to
    /// --auth-issuer when given). Reloaded on SIGHUP.
    #[arg(long, value_name = "FILE", help_heading = "Security")]
    pub(crate) auth_jwks: Option<PathBuf>,
    /// Accept only tokens whose `iss` is this.
    #[arg(long, value_name = "ISSUER", help_heading = "Security")]
    pub(crate) auth_issuer: Option<String>,
    /// Accept only tokens whose `aud` names this (without it, tokens with an `aud` are
    /// refused).
    #[arg(long, value_name = "AUDIENCE", help_heading = "Security")]
    pub(crate) auth_audience: Option<String>,
    /// Allow listening beyond loopback without TLS or without authentication (anyone who can
    /// reach the port can then read the traffic, or claim any client id).
    #[arg(long, help_heading = "Security")]
    pub(crate) insecure: bool,
}

/// The config-file and `TETHER_*` keys of [`ServerSecurityArgs`].
pub(crate) const SERVER_KEYS: &[&str] = &[
    "tls_cert",
    "tls_key",
    "client_ca",
    "auth_secret",
    "auth_public_key",
    "auth_jwks",
    "auth_issuer",
    "auth_audience",
    "insecure",
];

pub(crate) fn path(s: &str) -> std::result::Result<PathBuf, String> {
    if s.is_empty() {
        return Err("empty path".into());
    }
    Ok(PathBuf::from(s))
}

fn text(s: &str) -> std::result::Result<String, String> {
    Ok(s.to_owned())
}

/// A path flag as the layers take it (a flag that is given wins over `TETHER_*` and the
/// file; the layers then parse it like the others).
fn flag(p: &Option<PathBuf>) -> Option<&str> {
    p.as_deref().and_then(Path::to_str)
}

/// Where the JWT keys come from.
#[derive(Debug, Clone)]
enum KeySource {
    Secret(PathBuf),
    PublicKey(PathBuf),
    Jwks(PathBuf),
}

impl KeySource {
    fn load(&self, cfg: &JwtConfig, issuer: Option<&str>) -> Result<JwtVerifier> {
        let v = match self {
            KeySource::Secret(p) => JwtVerifier::hs256_file(p),
            KeySource::PublicKey(p) => JwtVerifier::public_key_file(p),
            KeySource::Jwks(p) => JwtVerifier::jwks_file(p, issuer),
        }?;
        Ok(v.with_config(cfg.clone()))
    }

    fn describe(&self) -> String {
        match self {
            KeySource::Secret(p) => format!("hs256:{}", p.display()),
            KeySource::PublicKey(p) => format!("public-key:{}", p.display()),
            KeySource::Jwks(p) => format!("jwks:{}", p.display()),
        }
    }
}

/// A JWT verifier that can be reloaded from its files: the rule `Builtin` consults, swapped
/// whole on SIGHUP (an in-flight check keeps the verifier it started with).
struct KeyFiles {
    source: KeySource,
    cfg: JwtConfig,
    issuer: Option<String>,
    current: RwLock<Arc<JwtVerifier>>,
}

impl KeyFiles {
    fn reload(&self) -> Result<()> {
        let v = self.source.load(&self.cfg, self.issuer.as_deref())?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(v);
        Ok(())
    }
}

/// [`KeyFiles`] as the `Builtin` rule's verifier.
struct Reloadable(Arc<KeyFiles>);

impl CredentialVerifier for Reloadable {
    fn verify(&self, credential: &[u8], now: SystemTime) -> Result<Principal, AuthError> {
        let v = self
            .0
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        v.verify(credential, now)
    }
}

/// A listener's TLS and authentication, resolved and loaded.
pub(crate) struct ServerSecurity {
    pub(crate) tls: Option<Arc<TlsServer>>,
    keys: Option<Arc<KeyFiles>>,
    mtls: bool,
    pub(crate) insecure: bool,
}

impl ServerSecurity {
    /// Reads the flags (then `TETHER_*`, then the file) and loads every file; errors name
    /// the file and what is wrong (exit 2).
    pub(crate) fn resolve(a: &ServerSecurityArgs, l: &Layers) -> Result<ServerSecurity> {
        let cert = l.get("tls_cert", flag(&a.tls_cert), path)?;
        let key = l.get("tls_key", flag(&a.tls_key), path)?;
        let client_ca = l.get("client_ca", flag(&a.client_ca), path)?;
        let tls = match (cert, key) {
            (Some(cert), Some(key)) => {
                let mut files = ServerTlsFiles::new(cert, key);
                if let Some(ca) = &client_ca {
                    files = files.client_ca(ca);
                }
                let t = TlsServer::from_files(files).map_err(|e| UsageError(format!("{e:#}")))?;
                Some(Arc::new(t))
            }
            (None, None) if client_ca.is_some() => {
                return Err(UsageError("--client-ca needs --tls-cert and --tls-key".into()).into())
            }
            (None, None) => None,
            _ => return Err(UsageError("TLS needs both --tls-cert and --tls-key".into()).into()),
        };
        let secret = l.get("auth_secret", flag(&a.auth_secret), path)?;
        let public = l.get("auth_public_key", flag(&a.auth_public_key), path)?;
        let jwks = l.get("auth_jwks", flag(&a.auth_jwks), path)?;
        let issuer = l.get("auth_issuer", a.auth_issuer.as_deref(), text)?;
        let audience = l.get("auth_audience", a.auth_audience.as_deref(), text)?;
        let sources: Vec<KeySource> = [
            secret.map(KeySource::Secret),
            public.map(KeySource::PublicKey),
            jwks.map(KeySource::Jwks),
        ]
        .into_iter()
        .flatten()
        .collect();
        if sources.len() > 1 {
            return Err(UsageError(
                "give one of --auth-secret, --auth-public-key and --auth-jwks".into(),
            )
            .into());
        }
        if sources.is_empty() && (issuer.is_some() || audience.is_some()) {
            return Err(UsageError(
                "--auth-issuer and --auth-audience need --auth-secret, --auth-public-key or --auth-jwks"
                    .into(),
            )
            .into());
        }
        let mut cfg = JwtConfig::default();
        if let Some(iss) = &issuer {
            cfg = cfg.issuers([iss.clone()]);
        }
        if let Some(aud) = &audience {
            cfg = cfg.audience([aud.clone()]);
        }
        let keys = match sources.into_iter().next() {
            None => None,
            Some(source) => {
                let v = source
                    .load(&cfg, issuer.as_deref())
                    .map_err(|e| UsageError(format!("{e:#}")))?;
                Some(Arc::new(KeyFiles {
                    source,
                    cfg,
                    issuer,
                    current: RwLock::new(Arc::new(v)),
                }))
            }
        };
        Ok(ServerSecurity {
            tls,
            keys,
            mtls: client_ca.is_some(),
            insecure: l
                .get("insecure", a.insecure.then_some("true"), parse_bool)?
                .unwrap_or(false),
        })
    }

    /// Whether clients must authenticate (a JWT, or a client certificate).
    pub(crate) fn authenticates(&self) -> bool {
        self.keys.is_some() || self.mtls
    }

    /// The authorization rule: JWTs checked by the loaded keys, client certificates as
    /// principals under mutual TLS. `None` without either (every client is anonymous).
    pub(crate) fn authorizer(&self) -> Option<Arc<dyn Authorize>> {
        self.authorizer_with_ids(None)
    }

    /// [`ServerSecurity::authorizer`], with every authenticated principal allowed exactly
    /// `ids` when given (the tunnel exit: `tun-*`).
    pub(crate) fn authorizer_with_ids(
        &self,
        ids: Option<AllowedIds>,
    ) -> Option<Arc<dyn Authorize>> {
        if !self.authenticates() {
            return None;
        }
        let mut b = Builtin::new().mtls(self.mtls);
        if let Some(ids) = ids {
            b = b.allowed_ids(ids);
        }
        if let Some(k) = &self.keys {
            b = b.credentials(Reloadable(k.clone()));
        }
        Some(Arc::new(b))
    }

    /// Refuses a listener beyond loopback without both TLS and authentication, unless
    /// --insecure was given; the message says what to add.
    pub(crate) fn check_exposure(&self, listen: SocketAddr, what: &str) -> Result<()> {
        self.check_exposure_with(listen, what, false)
    }

    /// [`check_exposure`](Self::check_exposure) when something else (`serve
    /// --auth-webhook`) authenticates clients if `other_auth`.
    pub(crate) fn check_exposure_with(
        &self,
        listen: SocketAddr,
        what: &str,
        other_auth: bool,
    ) -> Result<()> {
        if listen.ip().is_loopback() || self.insecure {
            return Ok(());
        }
        let mut missing = Vec::new();
        if self.tls.is_none() {
            missing.push("TLS (--tls-cert FILE --tls-key FILE)");
        }
        if !self.authenticates() && !other_auth {
            missing.push(
                "authentication (--auth-secret FILE, --auth-public-key FILE, --auth-jwks FILE, \
                 or --client-ca FILE for client certificates)",
            );
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(UsageError(format!(
            "refusing to {what} on {listen} without {}: anyone who can reach it could {}. \
             Add {}, or --insecure to accept that",
            missing
                .iter()
                .map(|m| m.split(' ').next().unwrap_or(m))
                .collect::<Vec<_>>()
                .join(" and "),
            if self.tls.is_none() && !self.authenticates() && !other_auth {
                "read the traffic and take over any client id"
            } else if self.tls.is_none() {
                "read the traffic, resume tokens and credentials included"
            } else {
                "claim any client id"
            },
            missing.join(" and ")
        ))
        .into())
    }

    /// `tls=on mtls=off auth=hs256:FILE` for the start-up log line.
    pub(crate) fn describe(&self) -> String {
        format!(
            "tls={} mtls={} auth={}",
            if self.tls.is_some() { "on" } else { "off" },
            if self.mtls { "on" } else { "off" },
            match (&self.keys, self.mtls) {
                (Some(k), _) => k.source.describe(),
                (None, true) => "client-certificate".into(),
                (None, false) => "off".into(),
            }
        )
    }

    /// Reloads the certificate, key and client CA, and the JWT keys, from their files. Each
    /// part that fails keeps what it had; established connections are never touched.
    /// Returns one log line per part: `(ok, what)`.
    pub(crate) fn reload(&self) -> Vec<(bool, String)> {
        let mut out = Vec::new();
        if let Some(t) = &self.tls {
            out.push(match t.reload() {
                Ok(()) => (
                    true,
                    format!("tls certificate from {}", t.files().cert.display()),
                ),
                Err(e) => (false, format!("tls: {e:#}; keeping the old certificate")),
            });
        }
        if let Some(k) = &self.keys {
            out.push(match k.reload() {
                Ok(()) => (true, format!("auth keys from {}", k.source.describe())),
                Err(e) => (false, format!("auth keys: {e:#}; keeping the old keys")),
            });
        }
        out
    }
}

/// TLS and credential flags of a client (`connect`, `tunnel entry`).
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct ClientSecurityArgs {
    /// Connect with TLS, verifying the server's certificate against the system's roots (or
    /// --ca). Implied by --ca, --server-name and --cert.
    #[arg(long, help_heading = "Security")]
    pub(crate) tls: bool,
    /// Trust only the CAs in this PEM file (a private CA) instead of the system's roots.
    #[arg(long, value_name = "FILE", help_heading = "Security")]
    pub(crate) ca: Option<PathBuf>,
    /// The name the server's certificate must hold (and the SNI sent). Default: the host of
    /// the address as given.
    #[arg(long, value_name = "NAME", help_heading = "Security")]
    pub(crate) server_name: Option<String>,
    /// Client certificate (PEM) for mutual TLS; needs --key.
    #[arg(long, value_name = "FILE", help_heading = "Security")]
    pub(crate) cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", help_heading = "Security")]
    pub(crate) key: Option<PathBuf>,
    /// Present this credential (a JWT, e.g. from `tether token`). Visible to other users in
    /// the process list: prefer --token-file or the TETHER_TOKEN variable.
    #[arg(long, value_name = "TOKEN", help_heading = "Security")]
    pub(crate) token: Option<String>,
    /// Present the credential in this file (trimmed), read again at every connect and every
    /// in-band refresh: rewrite the file to rotate the token without a restart.
    #[arg(long, value_name = "FILE", help_heading = "Security")]
    pub(crate) token_file: Option<PathBuf>,
}

/// The config-file and `TETHER_*` keys of [`ClientSecurityArgs`].
pub(crate) const CLIENT_KEYS: &[&str] = &[
    "tls",
    "ca",
    "server_name",
    "cert",
    "key",
    "token",
    "token_file",
];

/// A client's TLS and credential, resolved.
pub(crate) struct ClientSecurity {
    pub(crate) tls: Option<TlsClient>,
    pub(crate) credentials: Option<Credentials>,
}

impl ClientSecurity {
    /// Reads the flags (then `TETHER_*`, then the file). `host` is the host part of the
    /// address as the user wrote it: the server name to verify unless --server-name says
    /// otherwise.
    pub(crate) fn resolve(a: &ClientSecurityArgs, l: &Layers, host: &str) -> Result<Self> {
        let ca = l.get("ca", flag(&a.ca), path)?;
        let server_name = l.get("server_name", a.server_name.as_deref(), text)?;
        let cert = l.get("cert", flag(&a.cert), path)?;
        let key = l.get("key", flag(&a.key), path)?;
        let on = l
            .get("tls", a.tls.then_some("true"), parse_bool)?
            .unwrap_or(false)
            || ca.is_some()
            || server_name.is_some()
            || cert.is_some();
        let tls = if on {
            let opts = ClientTlsOptions {
                ca,
                server_name: Some(server_name.unwrap_or_else(|| host.to_owned())),
                cert,
                key,
            };
            Some(TlsClient::new(&opts).map_err(|e| UsageError(format!("{e:#}")))?)
        } else if key.is_some() {
            return Err(UsageError("--key needs --cert".into()).into());
        } else {
            None
        };
        let token = l.get("token", a.token.as_deref(), text)?;
        let token_file = l.get("token_file", flag(&a.token_file), path)?;
        let credentials = match (token, token_file) {
            (Some(_), Some(_)) => {
                return Err(UsageError("give --token or --token-file, not both".into()).into())
            }
            (Some(t), None) => Some(
                Credentials::token(t.trim().to_owned())
                    .map_err(|e| UsageError(format!("--token: {e}")))?,
            ),
            (None, Some(f)) => {
                Some(Credentials::file(&f).map_err(|e| UsageError(format!("--token-file: {e}")))?)
            }
            (None, None) => None,
        };
        Ok(ClientSecurity { tls, credentials })
    }
}

/// The host part of an address as written (`example.com:7300` → `example.com`,
/// `[::1]:7300` → `::1`, a bare port → `127.0.0.1`).
pub(crate) fn host_of(addr: &str) -> String {
    if addr.parse::<u16>().is_ok() {
        return "127.0.0.1".into();
    }
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => addr,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}

/// Reads an HTTP bearer token file (trimmed; at least 16 bytes, so that it is not a word).
pub(crate) fn read_http_token(path: &Path) -> Result<String> {
    let raw = std::fs::read_to_string(path)
        .with_context(|| UsageError(format!("cannot read --http-token-file {}", path.display())))?;
    let t = raw.trim();
    if t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(UsageError(format!(
            "--http-token-file {}: the token must be at least 16 characters without spaces",
            path.display()
        ))
        .into());
    }
    Ok(t.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_keeps_the_name_as_written() {
        assert_eq!(host_of("example.com:7300"), "example.com");
        assert_eq!(host_of("10.0.0.1:7300"), "10.0.0.1");
        assert_eq!(host_of("[::1]:7300"), "::1");
        assert_eq!(host_of("7300"), "127.0.0.1");
    }

    fn none() -> ServerSecurity {
        ServerSecurity {
            tls: None,
            keys: None,
            mtls: false,
            insecure: false,
        }
    }

    #[test]
    fn exposure_beyond_loopback_needs_tls_and_authentication_or_insecure() {
        let any: SocketAddr = "0.0.0.0:7300".parse().unwrap();
        for lo in ["127.0.0.1:7300", "[::1]:7300", "127.5.5.5:1"] {
            assert!(none().check_exposure(lo.parse().unwrap(), "listen").is_ok());
        }
        let e = none()
            .check_exposure(any, "listen")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refusing to listen on 0.0.0.0:7300 without TLS and authentication"),
            "{e}"
        );
        assert!(
            e.contains("--tls-cert FILE --tls-key FILE") && e.contains("--auth-secret FILE"),
            "{e}"
        );
        assert!(e.contains("--insecure"), "{e}");
        let mtls_only = ServerSecurity {
            mtls: true,
            ..none()
        };
        let e = mtls_only
            .check_exposure(any, "listen")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("without TLS:") || e.contains("without TLS "),
            "{e}"
        );
        assert!(!e.contains("--auth-secret"), "{e}");
        let insecure = ServerSecurity {
            insecure: true,
            ..none()
        };
        assert!(insecure.check_exposure(any, "listen").is_ok());
    }
}
