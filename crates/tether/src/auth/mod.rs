//! Authentication and per-id authorization: who a peer is ([`Principal`]), which client ids it
//! may use ([`AllowedIds`]), how a HELLO is judged ([`Authorize`]), and the pieces the server
//! needs to make resume tokens credentials ([`resume`]) and to slow down guessing
//! ([`throttle`]).
//!
//! ```text
//!  HELLO(id, credential?) ─┐
//!  remote address ─────────┼─▶ Authorize::authorize ─▶ Allow(Principal) ─▶ WELCOME(credential_ttl)
//!  mTLS principal? ────────┘        │                  Deny(17 UNAUTHORIZED | 18 ID_NOT_ALLOWED)
//!                                   └─ Builtin: credential → JwtVerifier, else mTLS principal
//!
//!  later, on the same connection:  AUTH(credential) ─▶ refresh() ─▶ AUTH_OK(ttl) | CLOSE(7)
//! ```
//!
//! What it deliberately does not do: I/O beyond reading key files once, or any policy on *when*
//! to ask (the server decides that per listener). Verification is synchronous and CPU-bound
//! (an HS256 check is a few microseconds, RS256 tens).
//!
//! # Principal equality
//!
//! "Only the same principal may replace a live connection, or resume or take over a held
//! session" compares [`PrincipalKey`]s: the authentication **scheme** (JWT, mutual TLS, or a
//! named custom scheme), the **issuer** (the JWT `iss`, the client certificate's issuer DN, or
//! what a custom scheme sets) and the **name** (JWT `sub`, the certificate's CN or first
//! DNS/URI SAN). The allowed ids and the expiry are *not* part of it: a refreshed token with a
//! later `exp` or a different id list is still the same principal. A JWT `sub = alice` and a
//! client certificate `CN = alice` are different principals: two trust roots never vouch for
//! each other.

pub mod jwt;
pub mod resume;
pub mod throttle;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use thiserror::Error;

pub use jwt::{sign_hs256, JwtConfig, JwtVerifier, KeyError, TokenSpec, DEFAULT_IDS_CLAIM};
pub use tether_proto::CloseCode;

/// How a principal was authenticated. Part of its identity ([`PrincipalKey`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Scheme {
    /// A JSON Web Token in the HELLO's credential.
    Jwt,
    /// The client certificate of a mutual-TLS connection.
    Mtls,
    /// An application's own scheme (the name it gives, e.g. `"api-key"`).
    Custom(String),
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scheme::Jwt => f.write_str("jwt"),
            Scheme::Mtls => f.write_str("mtls"),
            Scheme::Custom(s) => write!(f, "custom:{s}"),
        }
    }
}

/// What makes two principals the same: scheme, issuer and name (see the module docs). Store
/// it with a live connection and a held session; compare it on replace, resume and takeover.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PrincipalKey {
    /// How the principal was authenticated.
    pub scheme: Scheme,
    /// Who vouched for it (JWT `iss`, certificate issuer DN); `None` when the credential
    /// names no issuer.
    pub issuer: Option<String>,
    /// Its name (JWT `sub`, certificate CN or SAN).
    pub name: String,
}

impl fmt::Display for PrincipalKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.issuer {
            Some(iss) => write!(f, "{}:{} (issuer {iss})", self.scheme, self.name),
            None => write!(f, "{}:{}", self.scheme, self.name),
        }
    }
}

/// One entry of an allowed-id list: an exact id, or a prefix written `prefix*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdPattern {
    /// Exactly this id.
    Exact(String),
    /// Any id that starts with this (written with a trailing `*`; a lone `*` allows every
    /// id, for operators' tokens).
    Prefix(String),
}

/// Why an allowed-id pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PatternError {
    /// An empty pattern allows nothing and is almost certainly a mistake.
    #[error("empty id pattern")]
    Empty,
    /// `*` is only allowed once, at the end.
    #[error("id pattern {pattern:?}: '*' is only allowed once, at the end")]
    MisplacedStar {
        /// The pattern as written.
        pattern: String,
    },
    /// Control characters never belong in an id.
    #[error("id pattern {pattern:?} contains a control character")]
    Control {
        /// The pattern as written.
        pattern: String,
    },
}

impl IdPattern {
    /// Parses `"alice"` (exact) or `"device-*"` (prefix). A `*` anywhere but at the end is an
    /// error, so that `a*b` is never mistaken for a literal id.
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if s.chars().any(char::is_control) {
            return Err(PatternError::Control { pattern: s.into() });
        }
        match s.find('*') {
            None => Ok(IdPattern::Exact(s.into())),
            Some(i) if i == s.len() - 1 => Ok(IdPattern::Prefix(s[..i].into())),
            Some(_) => Err(PatternError::MisplacedStar { pattern: s.into() }),
        }
    }

    /// Whether `id` matches. Comparison is byte-exact (no case folding, no normalisation).
    pub fn matches(&self, id: &str) -> bool {
        match self {
            IdPattern::Exact(e) => e == id,
            IdPattern::Prefix(p) => id.starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdPattern::Exact(e) => f.write_str(e),
            IdPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// The client ids a principal may use.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllowedIds {
    patterns: Vec<IdPattern>,
}

impl AllowedIds {
    /// Exactly one id.
    pub fn only(id: impl Into<String>) -> Self {
        AllowedIds {
            patterns: vec![IdPattern::Exact(id.into())],
        }
    }

    /// Every id (the pattern `*`).
    pub fn any() -> Self {
        AllowedIds {
            patterns: vec![IdPattern::Prefix(String::new())],
        }
    }

    /// From patterns as written (`"a"`, `"device-*"`).
    pub fn parse<I, S>(patterns: I) -> Result<Self, PatternError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let patterns = patterns
            .into_iter()
            .map(|p| IdPattern::parse(p.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AllowedIds { patterns })
    }

    /// Whether `id` matches any pattern.
    pub fn allows(&self, id: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(id))
    }

    /// The patterns, in the order given.
    pub fn patterns(&self) -> &[IdPattern] {
        &self.patterns
    }
}

/// An authenticated peer: who it is, which ids it may use, and until when.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Principal {
    /// How it was authenticated.
    pub scheme: Scheme,
    /// Who vouched for it (JWT `iss`, certificate issuer DN).
    pub issuer: Option<String>,
    /// Its name (JWT `sub`, certificate CN or first DNS/URI SAN).
    pub name: String,
    /// The client ids it may claim.
    pub allowed: AllowedIds,
    /// When its credential stops being valid; `None` = does not expire. For a JWT this is
    /// `exp` plus the verifier's leeway (the instant the verifier would start refusing it).
    pub expires_at: Option<SystemTime>,
}

impl Principal {
    /// A principal that may use exactly the ids in `allowed`, with no issuer and no expiry.
    pub fn new(scheme: Scheme, name: impl Into<String>, allowed: AllowedIds) -> Self {
        Principal {
            scheme,
            issuer: None,
            name: name.into(),
            allowed,
            expires_at: None,
        }
    }

    /// Sets the issuer.
    pub fn with_issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }

    /// Sets the expiry.
    pub fn with_expiry(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// Its identity for equality (scheme, issuer, name).
    pub fn key(&self) -> PrincipalKey {
        PrincipalKey {
            scheme: self.scheme.clone(),
            issuer: self.issuer.clone(),
            name: self.name.clone(),
        }
    }

    /// Whether `other` is the same principal (same [`PrincipalKey`]); allowed ids and expiry
    /// do not matter.
    pub fn is_same(&self, other: &Principal) -> bool {
        self.scheme == other.scheme && self.issuer == other.issuer && self.name == other.name
    }

    /// Whether it may use client id `id`.
    pub fn allows(&self, id: &str) -> bool {
        self.allowed.allows(id)
    }

    /// Whether the credential has run out at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    /// What a WELCOME or AUTH_OK carries as `credential_ttl`: `Duration::ZERO` when the
    /// credential does not expire, else the time left at `now`, at least 1 ms (an expired
    /// credential is refused before this is asked).
    pub fn wire_ttl(&self, now: SystemTime) -> Duration {
        match self.expires_at {
            None => Duration::ZERO,
            Some(at) => at
                .duration_since(now)
                .unwrap_or_default()
                .max(Duration::from_millis(1)),
        }
    }
}

/// What the server knows when it judges a HELLO (or an AUTH refresh).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct AuthRequest<'a> {
    /// The client id the HELLO claims.
    pub client_id: &'a str,
    /// The HELLO's credential (flag CREDENTIAL), if any. A secret: never log it.
    pub credential: Option<&'a [u8]>,
    /// The peer's address, when known.
    pub remote: Option<SocketAddr>,
    /// The principal from the client certificate, on a mutual-TLS connection.
    pub tls_principal: Option<&'a Principal>,
    /// The HELLO asks to resume a session (the server still checks the resume token and
    /// that the session's principal is the same). False for an AUTH refresh.
    pub resume: bool,
    /// The current time (wall clock: credentials carry absolute times).
    pub now: SystemTime,
}

impl<'a> AuthRequest<'a> {
    /// A request for `client_id` at `now`, with nothing else known yet.
    pub fn new(client_id: &'a str, now: SystemTime) -> Self {
        AuthRequest {
            client_id,
            credential: None,
            remote: None,
            tls_principal: None,
            resume: false,
            now,
        }
    }

    /// Sets whether the HELLO resumes a session.
    pub fn resume(mut self, resume: bool) -> Self {
        self.resume = resume;
        self
    }

    /// Sets the credential.
    pub fn credential(mut self, c: Option<&'a [u8]>) -> Self {
        self.credential = c;
        self
    }

    /// Sets the remote address.
    pub fn remote(mut self, addr: Option<SocketAddr>) -> Self {
        self.remote = addr;
        self
    }

    /// Sets the mutual-TLS principal.
    pub fn tls_principal(mut self, p: Option<&'a Principal>) -> Self {
        self.tls_principal = p;
        self
    }
}

/// A refusal: the REFUSE code and text. The text goes to the peer: it says what is wrong
/// without echoing the credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// [`CloseCode::UNAUTHORIZED`] (no or bad credential) or [`CloseCode::ID_NOT_ALLOWED`]
    /// (valid credential, wrong id); a custom scheme may use an application code (1000+).
    pub code: CloseCode,
    /// Human-readable detail.
    pub text: String,
}

impl Denial {
    /// REFUSE(UNAUTHORIZED, text).
    pub fn unauthorized(text: impl Into<String>) -> Self {
        Denial {
            code: CloseCode::UNAUTHORIZED,
            text: text.into(),
        }
    }

    /// REFUSE(ID_NOT_ALLOWED, text).
    pub fn id_not_allowed(text: impl Into<String>) -> Self {
        Denial {
            code: CloseCode::ID_NOT_ALLOWED,
            text: text.into(),
        }
    }
}

/// The answer to an [`AuthRequest`].
#[derive(Debug)]
pub enum AuthDecision {
    /// Accept; the connection belongs to this principal. The principal must allow the
    /// requested client id and must not have expired (the server checks both again).
    Allow(Principal),
    /// Refuse with this code and text.
    Deny(Denial),
    /// Not decided yet: the server awaits the future (on a task of its own) and acts on its
    /// answer. For a HELLO the handshake deadline bounds the wait (past it the client is
    /// refused with HANDSHAKE_TIMEOUT); for an AUTH the credential's expiry does (the
    /// connection is closed when it runs out, answer or not). A future that answers
    /// `Pending` again is taken as a denial.
    Pending(PendingDecision),
}

/// A decision still being made (an HTTP call to a backend, a database lookup): see
/// [`AuthDecision::Pending`].
///
/// ```
/// use tether::auth::{AuthDecision, AuthRequest, Authorize, Denial, PendingDecision};
///
/// struct Webhook;
/// impl Authorize for Webhook {
///     fn authorize(&self, req: &AuthRequest<'_>) -> AuthDecision {
///         // Copy what the call needs: the request borrows from the connection.
///         let id = req.client_id.to_owned();
///         AuthDecision::Pending(PendingDecision::new(async move {
///             // ... ask the backend about `id` ...
///             AuthDecision::Deny(Denial::unauthorized(format!("backend says no to {id}")))
///         }))
///     }
/// }
/// ```
pub struct PendingDecision(Pin<Box<dyn Future<Output = AuthDecision> + Send + 'static>>);

impl PendingDecision {
    /// Wraps the future that decides.
    pub fn new(decide: impl Future<Output = AuthDecision> + Send + 'static) -> Self {
        PendingDecision(Box::pin(decide))
    }
}

impl Future for PendingDecision {
    type Output = AuthDecision;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<AuthDecision> {
        self.0.as_mut().poll(cx)
    }
}

impl fmt::Debug for PendingDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PendingDecision(..)")
    }
}

/// Judges a HELLO: the hook behind `ServerConfig::authorize`. Implement it for an
/// application's own scheme; [`Builtin`] covers JWT and mutual TLS.
///
/// Called on the connection's task during the handshake: it must not block. Checks that
/// need I/O (a backend, a database) answer [`AuthDecision::Pending`] with a future.
pub trait Authorize: Send + Sync + 'static {
    /// Allow (with the principal) or deny (with the code and text to send).
    fn authorize(&self, req: &AuthRequest<'_>) -> AuthDecision;

    /// Judges an in-band refresh (AUTH frame) on a connection that `current` owns. The
    /// default authorizes the new credential like a HELLO for the same id and then requires
    /// the same principal. A denial closes the connection with CLOSE(CREDENTIAL_EXPIRED).
    fn refresh(&self, current: &Principal, req: &AuthRequest<'_>) -> AuthDecision {
        same_principal(current.key(), self.authorize(req))
    }
}

/// A refresh's decision from an authorization of the new credential: allowed only for the
/// same principal; denials become CREDENTIAL_EXPIRED (the code that closes the connection).
fn same_principal(current: PrincipalKey, d: AuthDecision) -> AuthDecision {
    match d {
        AuthDecision::Allow(p) if p.key() == current => AuthDecision::Allow(p),
        AuthDecision::Allow(p) => AuthDecision::Deny(Denial {
            code: CloseCode::CREDENTIAL_EXPIRED,
            text: format!("refreshed credential names {}, not {current}", p.key()),
        }),
        AuthDecision::Deny(d) => AuthDecision::Deny(Denial {
            code: CloseCode::CREDENTIAL_EXPIRED,
            text: d.text,
        }),
        AuthDecision::Pending(f) => AuthDecision::Pending(PendingDecision::new(async move {
            match f.await {
                AuthDecision::Pending(_) => AuthDecision::Deny(Denial {
                    code: CloseCode::CREDENTIAL_EXPIRED,
                    text: "authorization did not decide".into(),
                }),
                d => same_principal(current, d),
            }
        })),
    }
}

/// Why a credential was not accepted. Each maps to a refusal code ([`AuthError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The HELLO carried no credential and no client certificate vouched for the peer.
    #[error("credential required")]
    Missing,
    /// Not a JWT in compact form (or not UTF-8, or undecodable parts).
    #[error("malformed token: {why}")]
    Malformed {
        /// What was wrong.
        why: String,
    },
    /// The header names an algorithm this verifier does not accept for the key (including
    /// `none`, and HS256 presented to an RSA/EC key).
    #[error("token algorithm not accepted")]
    Algorithm,
    /// The signature does not verify.
    #[error("token signature does not verify")]
    Signature,
    /// JWKS: no key with the token's `kid` (for its issuer).
    #[error("no key for kid {kid:?}")]
    UnknownKey {
        /// The `kid` from the header (`None` when absent).
        kid: Option<String>,
    },
    /// `exp` has passed (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is still in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `aud` does not name this server's audience (or names one when none is configured).
    #[error("token audience not accepted")]
    Audience,
    /// `iss` is not one of the accepted issuers.
    #[error("token issuer not accepted")]
    Issuer,
    /// A claim is missing or has the wrong type.
    #[error("claim {claim}: {why}")]
    Claim {
        /// The claim's name.
        claim: &'static str,
        /// What was wrong.
        why: String,
    },
    /// The credential is valid but does not allow the requested id.
    #[error("{principal} may not use client id {id:?}")]
    IdNotAllowed {
        /// The principal (display form of its key).
        principal: String,
        /// The id it asked for.
        id: String,
    },
}

impl AuthError {
    /// The REFUSE code for this error: [`CloseCode::ID_NOT_ALLOWED`] for
    /// [`AuthError::IdNotAllowed`], [`CloseCode::UNAUTHORIZED`] for everything else.
    pub fn code(&self) -> CloseCode {
        match self {
            AuthError::IdNotAllowed { .. } => CloseCode::ID_NOT_ALLOWED,
            _ => CloseCode::UNAUTHORIZED,
        }
    }

    /// The refusal to send.
    pub fn denial(&self) -> Denial {
        Denial {
            code: self.code(),
            text: self.to_string(),
        }
    }
}

/// Verifies a credential (the HELLO's or an AUTH's bytes) and says who it names.
pub trait CredentialVerifier: Send + Sync + 'static {
    /// The principal the credential names, if it is valid at `now`.
    fn verify(&self, credential: &[u8], now: SystemTime) -> Result<Principal, AuthError>;
}

/// The built-in rule for `tether serve`: a HELLO with a credential is judged by the JWT
/// verifier (when configured); a HELLO without one is judged by its client certificate (when
/// mutual TLS is on and accepted as identity). The principal must allow the requested id.
///
/// | credential | verifier | mTLS principal | result |
/// |---|---|---|---|
/// | yes | yes | any | JWT principal, or UNAUTHORIZED |
/// | yes | no | yes | mTLS principal (the credential is ignored) |
/// | yes | no | no | UNAUTHORIZED ("this server does not accept credentials") |
/// | no | any | yes | mTLS principal |
/// | no | any | no | UNAUTHORIZED ("credential required") |
///
/// then: the principal does not allow the id → ID_NOT_ALLOWED.
pub struct Builtin {
    jwt: Option<Box<dyn CredentialVerifier>>,
    mtls: bool,
    ids: Option<AllowedIds>,
}

impl fmt::Debug for Builtin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builtin")
            .field("jwt", &self.jwt.is_some())
            .field("mtls", &self.mtls)
            .field("ids", &self.ids)
            .finish()
    }
}

impl Builtin {
    /// Nothing accepted yet (every HELLO is refused until a scheme is added).
    pub fn new() -> Self {
        Builtin {
            jwt: None,
            mtls: false,
            ids: None,
        }
    }

    /// Accept credentials checked by `verifier` (a [`JwtVerifier`] in practice).
    pub fn credentials(mut self, verifier: impl CredentialVerifier) -> Self {
        self.jwt = Some(Box::new(verifier));
        self
    }

    /// Accept the client certificate's principal (mutual TLS) when the HELLO has no
    /// credential. Default: off.
    pub fn mtls(mut self, on: bool) -> Self {
        self.mtls = on;
        self
    }

    /// Every authenticated principal may use exactly `ids`, whatever its credential names.
    /// For servers whose client ids are not names, such as the tunnel exit (an entry's
    /// tunnels are `tun-<random>`): authentication decides who gets in, and ids, connections
    /// and sessions stay bound to the principal that opened them. Default: the credential's
    /// ids (a certificate's: its name).
    pub fn allowed_ids(mut self, ids: AllowedIds) -> Self {
        self.ids = Some(ids);
        self
    }
}

impl Default for Builtin {
    fn default() -> Self {
        Builtin::new()
    }
}

impl Authorize for Builtin {
    fn authorize(&self, req: &AuthRequest<'_>) -> AuthDecision {
        let principal = match (req.credential, &self.jwt, req.tls_principal) {
            (Some(c), Some(v), _) => match v.verify(c, req.now) {
                Ok(p) => p,
                Err(e) => return AuthDecision::Deny(e.denial()),
            },
            (_, _, Some(p)) if self.mtls => p.clone(),
            (Some(_), None, _) => {
                return AuthDecision::Deny(Denial::unauthorized(
                    "this server does not accept credentials",
                ))
            }
            (None, _, _) => return AuthDecision::Deny(AuthError::Missing.denial()),
        };
        if principal.is_expired(req.now) {
            return AuthDecision::Deny(AuthError::Expired.denial());
        }
        let mut principal = principal;
        if let Some(ids) = &self.ids {
            principal.allowed = ids.clone();
        }
        if !principal.allows(req.client_id) {
            return AuthDecision::Deny(
                AuthError::IdNotAllowed {
                    principal: principal.key().to_string(),
                    id: req.client_id.into(),
                }
                .denial(),
            );
        }
        AuthDecision::Allow(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse_exact_and_prefix_and_refuse_misplaced_stars() {
        assert_eq!(IdPattern::parse("a"), Ok(IdPattern::Exact("a".into())));
        assert_eq!(
            IdPattern::parse("device-*"),
            Ok(IdPattern::Prefix("device-".into()))
        );
        assert_eq!(IdPattern::parse("*"), Ok(IdPattern::Prefix(String::new())));
        assert_eq!(IdPattern::parse(""), Err(PatternError::Empty));
        for bad in ["a*b", "*a", "**", "a**"] {
            assert!(
                matches!(
                    IdPattern::parse(bad),
                    Err(PatternError::MisplacedStar { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            IdPattern::parse("a\u{7}"),
            Err(PatternError::Control { .. })
        ));
        assert_eq!(
            IdPattern::parse("device-*").unwrap().to_string(),
            "device-*"
        );
    }

    #[test]
    fn allowed_ids_match_exact_ids_and_prefixes_only() {
        let a = AllowedIds::parse(["a", "b", "device-*"]).unwrap();
        for ok in ["a", "b", "device-", "device-1", "device-x-y"] {
            assert!(a.allows(ok), "{ok}");
        }
        for no in ["", "A", "ab", "c", "device", "devices-1", "xdevice-1", "a "] {
            assert!(!a.allows(no), "{no}");
        }
        assert!(AllowedIds::any().allows("anything"));
        assert!(!AllowedIds::default().allows("a"));
        assert!(AllowedIds::only("alice").allows("alice"));
        assert!(!AllowedIds::only("alice").allows("alice2"));
    }

    #[test]
    fn principals_are_the_same_by_scheme_issuer_and_name_only() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let alice = Principal::new(Scheme::Jwt, "alice", AllowedIds::only("alice"))
            .with_issuer("idp")
            .with_expiry(t);
        // A refreshed token: later expiry, more ids. Same principal.
        let refreshed = Principal::new(Scheme::Jwt, "alice", AllowedIds::parse(["a*"]).unwrap())
            .with_issuer("idp")
            .with_expiry(t + Duration::from_secs(3600));
        assert!(alice.is_same(&refreshed));
        assert_eq!(alice.key(), refreshed.key());
        // Another name, another issuer, another scheme: not the same.
        let bob = Principal::new(Scheme::Jwt, "bob", AllowedIds::only("alice")).with_issuer("idp");
        let other_idp =
            Principal::new(Scheme::Jwt, "alice", AllowedIds::only("alice")).with_issuer("evil");
        let no_idp = Principal::new(Scheme::Jwt, "alice", AllowedIds::only("alice"));
        let cert =
            Principal::new(Scheme::Mtls, "alice", AllowedIds::only("alice")).with_issuer("idp");
        let custom = Principal::new(
            Scheme::Custom("jwt".into()),
            "alice",
            AllowedIds::only("alice"),
        )
        .with_issuer("idp");
        for p in [&bob, &other_idp, &no_idp, &cert, &custom] {
            assert!(!alice.is_same(p), "{:?}", p.key());
            assert_ne!(alice.key(), p.key());
        }
    }

    #[test]
    fn wire_ttl_is_zero_without_expiry_and_never_zero_with_one() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let p = Principal::new(Scheme::Jwt, "a", AllowedIds::only("a"));
        assert_eq!(p.wire_ttl(now), Duration::ZERO);
        assert!(!p.is_expired(now));
        let p = p.with_expiry(now + Duration::from_secs(60));
        assert_eq!(p.wire_ttl(now), Duration::from_secs(60));
        assert!(!p.is_expired(now));
        assert!(p.is_expired(now + Duration::from_secs(60)));
        // Past expiry: 1 ms, never "no expiry".
        assert_eq!(
            p.wire_ttl(now + Duration::from_secs(61)),
            Duration::from_millis(1)
        );
    }

    struct Fixed(Result<Principal, AuthError>);
    impl CredentialVerifier for Fixed {
        fn verify(&self, _: &[u8], _: SystemTime) -> Result<Principal, AuthError> {
            self.0.clone()
        }
    }

    fn code(d: AuthDecision) -> Result<PrincipalKey, CloseCode> {
        match d {
            AuthDecision::Allow(p) => Ok(p.key()),
            AuthDecision::Deny(d) => Err(d.code),
            AuthDecision::Pending(_) => panic!("the builtin rule decides at once"),
        }
    }

    #[test]
    fn builtin_picks_the_scheme_and_checks_the_id() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let bob = Principal::new(Scheme::Jwt, "bob", AllowedIds::only("bob"));
        let carol = Principal::new(Scheme::Mtls, "carol", AllowedIds::only("carol"));
        let jwt_only = Builtin::new().credentials(Fixed(Ok(bob.clone())));
        let both = Builtin::new()
            .credentials(Fixed(Ok(bob.clone())))
            .mtls(true);
        let mtls_only = Builtin::new().mtls(true);
        let req = |id| AuthRequest::new(id, now);

        // No credential, no certificate: UNAUTHORIZED.
        assert_eq!(
            code(jwt_only.authorize(&req("bob"))),
            Err(CloseCode::UNAUTHORIZED)
        );
        // A credential for bob: bob may be bob, not alice.
        let with = |id| req(id).credential(Some(b"t"));
        assert_eq!(code(jwt_only.authorize(&with("bob"))), Ok(bob.key()));
        assert_eq!(
            code(jwt_only.authorize(&with("alice"))),
            Err(CloseCode::ID_NOT_ALLOWED)
        );
        // Certificates count only where mTLS identity is on.
        let cert = |id| req(id).tls_principal(Some(&carol));
        assert_eq!(
            code(jwt_only.authorize(&cert("carol"))),
            Err(CloseCode::UNAUTHORIZED)
        );
        assert_eq!(code(both.authorize(&cert("carol"))), Ok(carol.key()));
        assert_eq!(code(mtls_only.authorize(&cert("carol"))), Ok(carol.key()));
        assert_eq!(
            code(mtls_only.authorize(&cert("bob"))),
            Err(CloseCode::ID_NOT_ALLOWED)
        );
        // With both, the credential wins over the certificate.
        assert_eq!(
            code(both.authorize(&cert("bob").credential(Some(b"t")))),
            Ok(bob.key())
        );
        // A credential where none is accepted is refused, not ignored.
        assert_eq!(
            code(Builtin::new().authorize(&with("bob"))),
            Err(CloseCode::UNAUTHORIZED)
        );
        // A bad credential is UNAUTHORIZED even with a valid certificate.
        let bad = Builtin::new()
            .credentials(Fixed(Err(AuthError::Signature)))
            .mtls(true);
        assert_eq!(
            code(bad.authorize(&cert("carol").credential(Some(b"t")))),
            Err(CloseCode::UNAUTHORIZED)
        );
        // An expired principal from a custom verifier is refused too.
        let old = Builtin::new().credentials(Fixed(Ok(bob.clone().with_expiry(now))));
        assert_eq!(
            code(old.authorize(&with("bob"))),
            Err(CloseCode::UNAUTHORIZED)
        );
    }

    #[test]
    fn allowed_ids_replace_what_the_credential_names() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let carol = Principal::new(Scheme::Mtls, "carol", AllowedIds::only("carol"));
        let tunnels = Builtin::new()
            .mtls(true)
            .allowed_ids(AllowedIds::parse(["tun-*"]).unwrap());
        let req = |id| AuthRequest::new(id, now).tls_principal(Some(&carol));
        assert_eq!(code(tunnels.authorize(&req("tun-0a1b"))), Ok(carol.key()));
        assert_eq!(
            code(tunnels.authorize(&req("carol"))),
            Err(CloseCode::ID_NOT_ALLOWED)
        );
        // Still nobody without a credential or certificate.
        assert_eq!(
            code(tunnels.authorize(&AuthRequest::new("tun-0a1b", now))),
            Err(CloseCode::UNAUTHORIZED)
        );
    }

    #[test]
    fn refresh_requires_the_same_principal_and_denies_with_credential_expired() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let bob = Principal::new(Scheme::Jwt, "bob", AllowedIds::only("bob"));
        let mallory = Principal::new(Scheme::Jwt, "mallory", AllowedIds::any());
        let req = AuthRequest::new("bob", now).credential(Some(b"t"));
        let same = Builtin::new().credentials(Fixed(Ok(bob.clone())));
        assert_eq!(code(same.refresh(&bob, &req)), Ok(bob.key()));
        let other = Builtin::new().credentials(Fixed(Ok(mallory)));
        assert_eq!(
            code(other.refresh(&bob, &req)),
            Err(CloseCode::CREDENTIAL_EXPIRED)
        );
        let bad = Builtin::new().credentials(Fixed(Err(AuthError::Expired)));
        assert_eq!(
            code(bad.refresh(&bob, &req)),
            Err(CloseCode::CREDENTIAL_EXPIRED)
        );
    }
}
