//! Resume tokens as credentials: the server keeps only a SHA-256 hash of a session's token,
//! bound to the client id and the principal that opened the session; a resume is checked
//! against all three (the hash in constant time) and, on success, the token is rotated, so
//! every token is good for one resume.
//!
//! ```text
//!  new session:  (grant, token) = ResumeCredential::issue(id, principal)   token → WELCOME
//!  resume:       grant.check(id, principal, presented)?                     refuse on Err
//!                token' = grant.rotate()                                    token' → WELCOME(RESUMED)
//! ```
//!
//! The token has 128 bits from the OS random source, so a plain hash (no salt, no slow KDF)
//! cannot be reversed or guessed; what the hash buys is that a memory dump or a debug print
//! of the session table does not hand out live tokens. `Debug` never shows hash or token.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tether_proto::codec::TOKEN_LEN;
use thiserror::Error;

use super::PrincipalKey;

/// Domain separation: a hash of a resume token is never a hash of anything else.
const DOMAIN: &[u8] = b"tether resume token v1\0";

/// A resume token as sent on the wire (secret).
pub type ResumeToken = [u8; TOKEN_LEN];

/// The SHA-256 of a resume token.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Hashes `token`.
    pub fn of(token: &ResumeToken) -> Self {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(token);
        TokenHash(h.finalize().into())
    }

    /// Whether `presented` hashes to this, compared in constant time.
    pub fn matches(&self, presented: &ResumeToken) -> bool {
        self.same(&TokenHash::of(presented))
    }

    /// Whether `other` is this hash, compared in constant time.
    pub fn same(&self, other: &TokenHash) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }

    /// The hash's bytes (to move a session's credential to another server; a hash does not
    /// resume anything by itself, but keep it out of logs all the same).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// A hash from its bytes ([`to_bytes`](Self::to_bytes)).
    pub fn from_bytes(b: [u8; 32]) -> Self {
        TokenHash(b)
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

/// Why a resume was refused. The server answers every variant with the same REFUSE
/// (SESSION_UNKNOWN = 14, or ID_NOT_ALLOWED = 18 for [`ResumeRefusal::OtherPrincipal`]) and
/// counts it as a failure for the source address; the real session is untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ResumeRefusal {
    /// The session belongs to another client id.
    #[error("session belongs to another client id")]
    OtherId,
    /// The session was opened by another principal.
    #[error("session belongs to another principal")]
    OtherPrincipal,
    /// The token is wrong, or was already used (rotated away).
    #[error("wrong or used resume token")]
    WrongToken,
}

/// A fresh 128-bit token from the OS random source.
pub fn new_token() -> Result<ResumeToken, getrandom::Error> {
    let mut t = [0u8; TOKEN_LEN];
    getrandom::getrandom(&mut t)?;
    Ok(t)
}

/// What the server keeps to authenticate the next resume of one session: the token's hash,
/// the client id and the owning principal (`None` on a server without authentication).
#[derive(Clone)]
pub struct ResumeCredential {
    hash: TokenHash,
    /// The token the last rotation replaced, still accepted until the client shows it has the
    /// new one ([`ResumeCredential::confirm`]): a WELCOME lost with its connection must not
    /// leave the client holding only a dead token.
    previous: Option<TokenHash>,
    client_id: String,
    principal: Option<PrincipalKey>,
}

impl fmt::Debug for ResumeCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResumeCredential")
            .field("client_id", &self.client_id)
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

impl ResumeCredential {
    /// A credential for `token` (which the caller sends in the WELCOME and then forgets).
    pub fn new(token: &ResumeToken, client_id: &str, principal: Option<PrincipalKey>) -> Self {
        ResumeCredential {
            hash: TokenHash::of(token),
            previous: None,
            client_id: client_id.into(),
            principal,
        }
    }

    /// A new credential with a fresh random token; returns it with the token to send.
    pub fn issue(
        client_id: &str,
        principal: Option<PrincipalKey>,
    ) -> Result<(Self, ResumeToken), getrandom::Error> {
        let token = new_token()?;
        Ok((Self::new(&token, client_id, principal), token))
    }

    /// Checks a resume request: same client id, same principal, right token (constant time).
    /// The token is compared even when the id or principal already failed, so the time taken
    /// does not depend on which check failed first.
    pub fn check(
        &self,
        client_id: &str,
        principal: Option<&PrincipalKey>,
        presented: &ResumeToken,
    ) -> Result<(), ResumeRefusal> {
        self.check_hash(client_id, principal, &TokenHash::of(presented))
    }

    /// [`check`](Self::check) with the presented token's hash instead of the token (another
    /// server asks for the session on behalf of a client that presented the token there).
    pub fn check_hash(
        &self,
        client_id: &str,
        principal: Option<&PrincipalKey>,
        presented: &TokenHash,
    ) -> Result<(), ResumeRefusal> {
        // Both compared whenever both exist (constant time for each).
        let current = self.hash.same(presented);
        let previous = self.previous.as_ref().is_some_and(|h| h.same(presented));
        if self.client_id != client_id {
            return Err(ResumeRefusal::OtherId);
        }
        if self.principal.as_ref() != principal {
            return Err(ResumeRefusal::OtherPrincipal);
        }
        if !(current | previous) {
            return Err(ResumeRefusal::WrongToken);
        }
        Ok(())
    }

    /// The current token's hash and the previous one's (still accepted until
    /// [`confirm`](Self::confirm)).
    pub fn hashes(&self) -> (&TokenHash, Option<&TokenHash>) {
        (&self.hash, self.previous.as_ref())
    }

    /// A credential from the hashes another server kept ([`hashes`](Self::hashes)).
    pub fn from_hashes(
        hash: TokenHash,
        previous: Option<TokenHash>,
        client_id: &str,
        principal: Option<PrincipalKey>,
    ) -> Self {
        ResumeCredential {
            hash,
            previous,
            client_id: client_id.into(),
            principal,
        }
    }

    /// Replaces the token after a successful resume with `presented` (the token that
    /// resume used). Returns the new token to send in the WELCOME. `presented` stays valid
    /// until [`confirm`](Self::confirm): the WELCOME may be lost with its connection (a path
    /// that fails right after the resume), and the client then still holds only
    /// `presented`. Every other earlier token is dead.
    pub fn rotate(&mut self, presented: &ResumeToken) -> Result<ResumeToken, getrandom::Error> {
        let token = new_token()?;
        self.rotate_to(presented, &token);
        Ok(token)
    }

    /// [`ResumeCredential::rotate`] with a given new token (tests, deterministic callers).
    pub fn rotate_to(&mut self, presented: &ResumeToken, token: &ResumeToken) {
        self.previous = Some(TokenHash::of(presented));
        self.hash = TokenHash::of(token);
    }

    /// The client has the newest token (it spoke on the connection whose WELCOME carried
    /// it): the token it resumed with is dead from now on, single use as it should be.
    pub fn confirm(&mut self) {
        self.previous = None;
    }

    /// The client id the session belongs to.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The principal that owns the session.
    pub fn principal(&self) -> Option<&PrincipalKey> {
        self.principal.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scheme;

    fn key(name: &str) -> PrincipalKey {
        PrincipalKey {
            scheme: Scheme::Jwt,
            issuer: None,
            name: name.into(),
        }
    }

    #[test]
    fn only_the_hash_is_kept_and_it_matches_only_its_token() {
        let t = [7u8; TOKEN_LEN];
        let h = TokenHash::of(&t);
        assert!(h.matches(&t));
        let mut other = t;
        other[15] ^= 1;
        assert!(!h.matches(&other));
        // Known answer: SHA-256("tether resume token v1\0" || 07 × 16).
        let mut d = Sha256::new();
        d.update(b"tether resume token v1\0");
        d.update([7u8; 16]);
        assert_eq!(h.0, <[u8; 32]>::from(d.finalize()));
        // Neither the token nor the hash is printable.
        let c = ResumeCredential::new(&t, "alice", Some(key("alice")));
        let dbg = format!("{c:?} {h:?}");
        assert!(!dbg.contains("07") && !dbg.contains('7'), "{dbg}");
        assert!(dbg.contains("alice"));
    }

    #[test]
    fn a_resume_needs_the_id_the_principal_and_the_token() {
        let t = [1u8; TOKEN_LEN];
        let c = ResumeCredential::new(&t, "alice", Some(key("alice")));
        let alice = key("alice");
        assert_eq!(c.check("alice", Some(&alice), &t), Ok(()));
        assert_eq!(
            c.check("alice", Some(&key("bob")), &t),
            Err(ResumeRefusal::OtherPrincipal)
        );
        assert_eq!(
            c.check("alice", None, &t),
            Err(ResumeRefusal::OtherPrincipal)
        );
        assert_eq!(
            c.check("bob", Some(&alice), &t),
            Err(ResumeRefusal::OtherId)
        );
        assert_eq!(
            c.check("alice", Some(&alice), &[2u8; TOKEN_LEN]),
            Err(ResumeRefusal::WrongToken)
        );
        // A server without authentication binds to no principal.
        let anon = ResumeCredential::new(&t, "a", None);
        assert_eq!(anon.check("a", None, &t), Ok(()));
        assert_eq!(
            anon.check("a", Some(&alice), &t),
            Err(ResumeRefusal::OtherPrincipal)
        );
    }

    #[test]
    fn rotation_kills_the_old_token_once_the_client_has_the_new_one() {
        let (mut c, t1) = ResumeCredential::issue("alice", None).unwrap();
        assert_eq!(c.check("alice", None, &t1), Ok(()));
        let t2 = c.rotate(&t1).unwrap();
        assert_ne!(t1, t2);
        // The WELCOME with t2 may have been lost: t1 still resumes, until confirmed.
        assert_eq!(c.check("alice", None, &t1), Ok(()));
        assert_eq!(c.check("alice", None, &t2), Ok(()));
        c.confirm();
        assert_eq!(
            c.check("alice", None, &t1),
            Err(ResumeRefusal::WrongToken),
            "a used token is dead"
        );
        assert_eq!(c.check("alice", None, &t2), Ok(()));
        // A resume with the lost-WELCOME token again: the never-delivered t2 dies at once.
        let t3 = c.rotate(&t2).unwrap();
        let t4 = c.rotate(&t2).unwrap();
        assert_eq!(c.check("alice", None, &t3), Err(ResumeRefusal::WrongToken));
        assert_eq!(c.check("alice", None, &t2), Ok(()));
        assert_eq!(c.check("alice", None, &t4), Ok(()));
        c.rotate_to(&t4, &[9; TOKEN_LEN]);
        c.confirm();
        assert_eq!(c.check("alice", None, &t2), Err(ResumeRefusal::WrongToken));
        assert_eq!(c.check("alice", None, &t4), Err(ResumeRefusal::WrongToken));
        assert_eq!(c.check("alice", None, &[9; TOKEN_LEN]), Ok(()));
        assert_eq!(c.client_id(), "alice");
        assert_eq!(c.principal(), None);
    }

    #[test]
    fn issued_tokens_are_random() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0; TOKEN_LEN]);
    }
}
