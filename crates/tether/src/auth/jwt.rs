//! JWT credentials (RFC 7519, compact JWS): verification with an HS256 shared secret, an
//! RS256/ES256/EdDSA public key, or a JWKS file whose keys are picked by `kid`; and signing
//! of HS256 tokens for `tether token`.
//!
//! Signatures and algorithms are checked by the `jsonwebtoken` crate; the claims are checked
//! here, with strict types and an injected clock:
//!
//! | claim | rule |
//! |---|---|
//! | `sub` | required, a non-empty string: the principal's name |
//! | `tether_ids` (name configurable) | optional array of id patterns (`"a"`, `"device-*"`, `"*"`): the ids the token may use. Absent: the token may use exactly the id `sub`. Present: exactly these (`sub` is then only the principal's name). |
//! | `exp` | required (unless [`JwtConfig::require_exp`] is off), a number: refused from `exp + leeway` on |
//! | `nbf` | optional number: refused before `nbf - leeway` |
//! | `iss` | optional string; required and checked when issuers are configured; binds JWKS keys |
//! | `aud` | string or array; when an audience is configured one of them must match it; when none is configured a token that has `aud` is refused (RFC 7519 §4.1.3: it was meant for someone else) |
//!
//! A claim with the wrong JSON type (e.g. `"exp": "never"`) refuses the token. Keys are
//! never taken from the token (`jwk`, `jku`, `x5u`, `x5c` headers are ignored). The algorithm
//! must be one the key was loaded for: `none` never verifies, and an HS256 token is never
//! checked against an RSA/EC public key (the HS/RS confusion).
//!
//! JWKS keys are stored by **(issuer, kid)**: a set loaded for issuer A never verifies a
//! token whose `iss` is B, even when B's token names a `kid` that A's set contains (the
//! Centrifugo JWKS cache bug).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};
use thiserror::Error;

use super::{AllowedIds, AuthError, CredentialVerifier, Principal, Scheme};

/// The claim that lists the ids a token may use, unless configured otherwise.
pub const DEFAULT_IDS_CLAIM: &str = "tether_ids";
/// Shortest HS256 secret accepted (RFC 7518 §3.2: a key of at least the hash's size).
pub const MIN_HMAC_SECRET_LEN: usize = 32;

/// Why key material could not be loaded, or a token not signed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An HS256 secret shorter than [`MIN_HMAC_SECRET_LEN`].
    #[error("{}: secret is {len} bytes, HS256 needs at least {MIN_HMAC_SECRET_LEN}", path.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_else(|| "secret".into()))]
    ShortSecret {
        /// The file, when it came from one.
        path: Option<PathBuf>,
        /// Its length after trimming trailing whitespace.
        len: usize,
    },
    /// A public key that is not an RSA, EC (P-256) or Ed25519 key in PEM.
    #[error("{}: not an RSA, EC or Ed25519 public key in PEM", path.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_else(|| "public key".into()))]
    PublicKey {
        /// The file, when it came from one.
        path: Option<PathBuf>,
    },
    /// A JWKS document that is not `{"keys": [...]}` or holds no usable signing key.
    #[error("{}: {why}", path.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_else(|| "jwks".into()))]
    Jwks {
        /// The file, when it came from one.
        path: Option<PathBuf>,
        /// What was wrong.
        why: String,
    },
    /// Signing a token failed.
    #[error("cannot sign token: {why}")]
    Sign {
        /// What was wrong.
        why: String,
    },
}

/// Claim checks for a [`JwtVerifier`].
#[derive(Debug, Clone)]
pub struct JwtConfig {
    leeway: Duration,
    audience: Option<Vec<String>>,
    issuers: Option<Vec<String>>,
    require_exp: bool,
    ids_claim: String,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            leeway: Duration::from_secs(30),
            audience: None,
            issuers: None,
            require_exp: true,
            ids_claim: DEFAULT_IDS_CLAIM.into(),
        }
    }
}

impl JwtConfig {
    /// Clock skew tolerated on `exp` and `nbf`; a token is treated as valid until
    /// `exp + leeway`. Default: 30 s.
    pub fn leeway(mut self, d: Duration) -> Self {
        self.leeway = d;
        self
    }

    /// Audiences this server answers to: a token must name one in `aud`. Default: none
    /// (tokens with `aud` are refused).
    pub fn audience<I: IntoIterator<Item = S>, S: Into<String>>(mut self, aud: I) -> Self {
        self.audience = Some(aud.into_iter().map(Into::into).collect());
        self
    }

    /// Issuers accepted: a token must carry one as `iss`. Default: any (or none).
    pub fn issuers<I: IntoIterator<Item = S>, S: Into<String>>(mut self, iss: I) -> Self {
        self.issuers = Some(iss.into_iter().map(Into::into).collect());
        self
    }

    /// Whether a token without `exp` is refused. Default: true.
    pub fn require_exp(mut self, on: bool) -> Self {
        self.require_exp = on;
        self
    }

    /// The claim that lists the allowed ids. Default: `tether_ids`.
    pub fn ids_claim(mut self, name: impl Into<String>) -> Self {
        self.ids_claim = name.into();
        self
    }
}

#[derive(Clone)]
struct VerifyKey {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
    /// JWKS keys loaded for one issuer verify only that issuer's tokens.
    issuer: Option<String>,
}

#[derive(Clone)]
enum Keys {
    /// One key; the header's `kid` is ignored.
    Single(VerifyKey),
    /// JWKS keys by (issuer, kid).
    Set(HashMap<(Option<String>, Option<String>), VerifyKey>),
}

/// Verifies JWT credentials and turns their claims into a [`Principal`] (scheme
/// [`Scheme::Jwt`], issuer `iss`, name `sub`).
#[derive(Clone)]
pub struct JwtVerifier {
    keys: Keys,
    cfg: JwtConfig,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = match &self.keys {
            Keys::Single(k) => format!("one key {:?}", k.algorithms),
            Keys::Set(m) => format!("{} jwks keys", m.len()),
        };
        f.debug_struct("JwtVerifier")
            .field("keys", &keys)
            .field("cfg", &self.cfg)
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.into(),
        source,
    })
}

/// Reads an HS256 secret file: its bytes without trailing whitespace (so `echo secret >
/// file` and an editor's final newline do not change the key), at least
/// [`MIN_HMAC_SECRET_LEN`] bytes. `tether serve --auth-secret` and `tether token --secret`
/// both read secrets with this, so they agree on the key.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, KeyError> {
    let mut s = read(path)?;
    while s.last().is_some_and(u8::is_ascii_whitespace) {
        s.pop();
    }
    if s.len() < MIN_HMAC_SECRET_LEN {
        return Err(KeyError::ShortSecret {
            path: Some(path.into()),
            len: s.len(),
        });
    }
    Ok(s)
}

fn check_secret(secret: &[u8]) -> Result<(), KeyError> {
    if secret.len() < MIN_HMAC_SECRET_LEN {
        return Err(KeyError::ShortSecret {
            path: None,
            len: secret.len(),
        });
    }
    Ok(())
}

fn family_algorithms(f: AlgorithmFamily) -> Vec<Algorithm> {
    match f {
        AlgorithmFamily::Hmac => vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
        AlgorithmFamily::Rsa => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmFamily::Ec => vec![Algorithm::ES256, Algorithm::ES384],
        AlgorithmFamily::Ed => vec![Algorithm::EdDSA],
    }
}

impl JwtVerifier {
    /// HS256 with a shared secret (at least [`MIN_HMAC_SECRET_LEN`] bytes).
    pub fn hs256(secret: &[u8]) -> Result<Self, KeyError> {
        check_secret(secret)?;
        Ok(JwtVerifier {
            keys: Keys::Single(VerifyKey {
                key: DecodingKey::from_secret(secret),
                algorithms: vec![Algorithm::HS256],
                issuer: None,
            }),
            cfg: JwtConfig::default(),
        })
    }

    /// HS256 with the secret in `path` (see [`read_secret_file`]).
    pub fn hs256_file(path: &Path) -> Result<Self, KeyError> {
        Self::hs256(&read_secret_file(path)?)
    }

    /// A public key in PEM (`PUBLIC KEY`, `RSA PUBLIC KEY`, or a certificate): RSA keys
    /// verify RS256, EC P-256 keys ES256, Ed25519 keys EdDSA.
    pub fn public_key_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let (key, alg) = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
            (k, Algorithm::RS256)
        } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
            (k, Algorithm::ES256)
        } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
            (k, Algorithm::EdDSA)
        } else {
            return Err(KeyError::PublicKey { path: None });
        };
        Ok(JwtVerifier {
            keys: Keys::Single(VerifyKey {
                key,
                algorithms: vec![alg],
                issuer: None,
            }),
            cfg: JwtConfig::default(),
        })
    }

    /// [`JwtVerifier::public_key_pem`] from a file.
    pub fn public_key_file(path: &Path) -> Result<Self, KeyError> {
        Self::public_key_pem(&read(path)?).map_err(|e| match e {
            KeyError::PublicKey { .. } => KeyError::PublicKey {
                path: Some(path.into()),
            },
            e => e,
        })
    }

    /// A JWKS document (`{"keys": [...]}`), its keys picked by the token's `kid`. With
    /// `issuer`, the keys verify only tokens whose `iss` is that issuer. Keys marked
    /// `"use": "enc"` and keys of unsupported types are skipped; a key's `alg`, when given,
    /// is the only algorithm it verifies (else its type's family: RS*/PS*, ES256/ES384,
    /// EdDSA, HS*).
    pub fn jwks(json: &[u8], issuer: Option<&str>) -> Result<Self, KeyError> {
        let mut v = JwtVerifier {
            keys: Keys::Set(HashMap::new()),
            cfg: JwtConfig::default(),
        };
        v.add_jwks_inner(json, issuer)
            .map_err(|why| KeyError::Jwks { path: None, why })?;
        Ok(v)
    }

    /// [`JwtVerifier::jwks`] from a file.
    pub fn jwks_file(path: &Path, issuer: Option<&str>) -> Result<Self, KeyError> {
        let json = read(path)?;
        let mut v = JwtVerifier {
            keys: Keys::Set(HashMap::new()),
            cfg: JwtConfig::default(),
        };
        v.add_jwks_inner(&json, issuer)
            .map_err(|why| KeyError::Jwks {
                path: Some(path.into()),
                why,
            })?;
        Ok(v)
    }

    /// Adds another JWKS document (another issuer's keys) to a JWKS verifier.
    pub fn add_jwks(mut self, json: &[u8], issuer: Option<&str>) -> Result<Self, KeyError> {
        self.add_jwks_inner(json, issuer)
            .map_err(|why| KeyError::Jwks { path: None, why })?;
        Ok(self)
    }

    fn add_jwks_inner(&mut self, json: &[u8], issuer: Option<&str>) -> Result<(), String> {
        let Keys::Set(map) = &mut self.keys else {
            return Err("not a jwks verifier".into());
        };
        let doc: Value = serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("no \"keys\" array")?;
        let mut added = 0;
        let mut skipped = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let jwk: Jwk = match serde_json::from_value(k.clone()) {
                Ok(j) => j,
                Err(e) => {
                    skipped.push(format!("key {i}: {e}"));
                    continue;
                }
            };
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let key = match DecodingKey::from_jwk(&jwk) {
                Ok(k) => k,
                Err(e) => {
                    skipped.push(format!("key {i}: {e}"));
                    continue;
                }
            };
            let algorithms = match jwk.common.key_algorithm {
                Some(ka) => {
                    let name = serde_json::to_value(ka)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    match Algorithm::from_str(&name) {
                        Ok(a) if a.family() == key.family() => vec![a],
                        _ => {
                            skipped.push(format!("key {i}: alg {name:?} does not fit the key"));
                            continue;
                        }
                    }
                }
                None => family_algorithms(key.family()),
            };
            let kid = jwk.common.key_id.clone();
            let id = (issuer.map(str::to_owned), kid);
            if map.contains_key(&id) {
                return Err(format!("two keys with kid {:?}", id.1));
            }
            map.insert(
                id,
                VerifyKey {
                    key,
                    algorithms,
                    issuer: issuer.map(str::to_owned),
                },
            );
            added += 1;
        }
        if added == 0 {
            return Err(if skipped.is_empty() {
                "no signing keys".into()
            } else {
                format!("no usable signing keys ({})", skipped.join("; "))
            });
        }
        Ok(())
    }

    /// Replaces the claim checks.
    pub fn with_config(mut self, cfg: JwtConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// The claim checks.
    pub fn config(&self) -> &JwtConfig {
        &self.cfg
    }

    fn pick_key(&self, token: &str) -> Result<(&VerifyKey, Header), AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            // Unknown algorithm names (`none` among them) fail to parse.
            ErrorKind::Json(_) if token_alg_is_unknown(token) => AuthError::Algorithm,
            _ => AuthError::Malformed {
                why: "bad header".into(),
            },
        })?;
        let key = match &self.keys {
            Keys::Single(k) => k,
            Keys::Set(map) => {
                // The issuer picks the key set before the signature is checked (it is checked
                // against the verified claims afterwards).
                let iss = peek_issuer(token)?;
                let kid = header.kid.clone();
                let bound = iss.clone().and_then(|i| map.get(&(Some(i), kid.clone())));
                bound
                    .or_else(|| map.get(&(None, kid.clone())))
                    .ok_or(AuthError::UnknownKey { kid })?
            }
        };
        if !key.algorithms.contains(&header.alg) {
            return Err(AuthError::Algorithm);
        }
        Ok((key, header))
    }
}

/// Whether the token's header names an algorithm jsonwebtoken does not know (so a parse
/// failure is reported as "algorithm", e.g. for `none`).
fn token_alg_is_unknown(token: &str) -> bool {
    let Some(h) = token.split('.').next() else {
        return false;
    };
    let Some(bytes) = b64url_decode(h) else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return false;
    };
    v.get("alg")
        .and_then(Value::as_str)
        .is_some_and(|a| Algorithm::from_str(a).is_err())
}

/// Base64url without padding (the JWT alphabet), for peeking at the header only.
fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The unverified `iss` of a token (to choose the issuer's key set); `None` when absent.
fn peek_issuer(token: &str) -> Result<Option<String>, AuthError> {
    #[derive(serde::Deserialize)]
    struct Peek {
        iss: Option<Value>,
    }
    let data = jsonwebtoken::dangerous::insecure_decode::<Peek>(token).map_err(|_| {
        AuthError::Malformed {
            why: "bad payload".into(),
        }
    })?;
    match data.claims.iss {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(AuthError::Claim {
            claim: "iss",
            why: "not a string".into(),
        }),
    }
}

fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<f64>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if f.is_finite() && f >= 0.0 => Ok(Some(f)),
            _ => Err(AuthError::Claim {
                claim: name,
                why: "not a valid date".into(),
            }),
        },
        Some(_) => Err(AuthError::Claim {
            claim: name,
            why: "not a number".into(),
        }),
    }
}

fn seconds(f: f64) -> Duration {
    // Finite and non-negative (checked by numeric_date); far-future dates saturate.
    Duration::try_from_secs_f64(f).unwrap_or(Duration::MAX)
}

fn unix(now: SystemTime) -> Duration {
    now.duration_since(UNIX_EPOCH).unwrap_or_default()
}

impl CredentialVerifier for JwtVerifier {
    fn verify(&self, credential: &[u8], now: SystemTime) -> Result<Principal, AuthError> {
        let token = std::str::from_utf8(credential).map_err(|_| AuthError::Malformed {
            why: "not UTF-8".into(),
        })?;
        let (key, _header) = self.pick_key(token)?;
        // jsonwebtoken checks the signature and the algorithm; the claims are checked below
        // with the injected clock and strict types.
        let mut v = Validation::new(key.algorithms[0]);
        v.algorithms = key.algorithms.clone();
        v.required_spec_claims.clear();
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = false;
        v.leeway = 0;
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &v).map_err(|e| match e
                .kind()
            {
                ErrorKind::InvalidSignature => AuthError::Signature,
                ErrorKind::InvalidAlgorithm
                | ErrorKind::MissingAlgorithm
                | ErrorKind::InvalidKeyFormat
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey => AuthError::Algorithm,
                _ => AuthError::Malformed {
                    why: "undecodable token".into(),
                },
            })?;
        let c = data.claims;
        let now_s = unix(now);

        let sub = match c.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) => {
                return Err(AuthError::Claim {
                    claim: "sub",
                    why: "empty".into(),
                })
            }
            Some(_) => {
                return Err(AuthError::Claim {
                    claim: "sub",
                    why: "not a string".into(),
                })
            }
            None => {
                return Err(AuthError::Claim {
                    claim: "sub",
                    why: "missing".into(),
                })
            }
        };

        let exp = numeric_date(&c, "exp")?;
        let nbf = numeric_date(&c, "nbf")?;
        let expires_at = match exp {
            Some(exp) => {
                let until = seconds(exp).saturating_add(self.cfg.leeway);
                if now_s >= until {
                    return Err(AuthError::Expired);
                }
                UNIX_EPOCH.checked_add(until)
            }
            None if self.cfg.require_exp => {
                return Err(AuthError::Claim {
                    claim: "exp",
                    why: "missing".into(),
                })
            }
            None => None,
        };
        if let Some(nbf) = nbf {
            if now_s.saturating_add(self.cfg.leeway) < seconds(nbf) {
                return Err(AuthError::NotYetValid);
            }
        }

        let iss = match c.get("iss") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                return Err(AuthError::Claim {
                    claim: "iss",
                    why: "not a string".into(),
                })
            }
        };
        if let Some(accepted) = &self.cfg.issuers {
            if !iss.as_ref().is_some_and(|i| accepted.contains(i)) {
                return Err(AuthError::Issuer);
            }
        }
        // A key loaded for one issuer verifies only that issuer's tokens (checked again on
        // the verified claims).
        if key.issuer.is_some() && key.issuer != iss {
            return Err(AuthError::Issuer);
        }

        let aud: Option<Vec<&str>> = match c.get("aud") {
            None => None,
            Some(Value::String(s)) => Some(vec![s.as_str()]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| {
                        v.as_str().ok_or(AuthError::Claim {
                            claim: "aud",
                            why: "not a string or an array of strings".into(),
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(_) => {
                return Err(AuthError::Claim {
                    claim: "aud",
                    why: "not a string or an array of strings".into(),
                })
            }
        };
        match (&self.cfg.audience, aud) {
            (None, None) => {}
            (None, Some(_)) => return Err(AuthError::Audience),
            (Some(_), None) => return Err(AuthError::Audience),
            (Some(ours), Some(theirs)) => {
                if !theirs.iter().any(|a| ours.iter().any(|o| o == a)) {
                    return Err(AuthError::Audience);
                }
            }
        }

        let allowed = match c.get(&self.cfg.ids_claim) {
            None => AllowedIds::only(sub.clone()),
            Some(Value::Array(a)) => {
                let ids: Vec<&str> = a
                    .iter()
                    .map(|v| {
                        v.as_str().ok_or(AuthError::Claim {
                            claim: "tether_ids",
                            why: "not an array of strings".into(),
                        })
                    })
                    .collect::<Result<_, _>>()?;
                AllowedIds::parse(ids).map_err(|e| AuthError::Claim {
                    claim: "tether_ids",
                    why: e.to_string(),
                })?
            }
            Some(_) => {
                return Err(AuthError::Claim {
                    claim: "tether_ids",
                    why: "not an array of strings".into(),
                })
            }
        };

        let mut p = Principal::new(Scheme::Jwt, sub, allowed);
        p.issuer = iss;
        p.expires_at = expires_at;
        Ok(p)
    }
}

/// What [`sign_hs256`] puts in a token.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct TokenSpec {
    /// `sub`: the principal's name (and its only id unless `ids` is given).
    pub sub: String,
    /// `tether_ids`: the ids (patterns) the token may use.
    pub ids: Option<Vec<String>>,
    /// `exp = now + ttl` (rounded up to a whole second); `None`: no `exp` (refused by
    /// verifiers that require one, the default).
    pub ttl: Option<Duration>,
    /// `iss`.
    pub issuer: Option<String>,
    /// `aud`.
    pub audience: Option<String>,
}

impl TokenSpec {
    /// A token for `sub` that expires after `ttl`.
    pub fn new(sub: impl Into<String>, ttl: Duration) -> Self {
        TokenSpec {
            sub: sub.into(),
            ttl: Some(ttl),
            ..Default::default()
        }
    }

    /// Sets the ids the token may use.
    pub fn ids<I: IntoIterator<Item = S>, S: Into<String>>(mut self, ids: I) -> Self {
        self.ids = Some(ids.into_iter().map(Into::into).collect());
        self
    }

    /// Sets `iss`.
    pub fn issuer(mut self, iss: impl Into<String>) -> Self {
        self.issuer = Some(iss.into());
        self
    }

    /// Sets `aud`.
    pub fn audience(mut self, aud: impl Into<String>) -> Self {
        self.audience = Some(aud.into());
        self
    }
}

/// Signs an HS256 token (compact form) with `secret` (at least [`MIN_HMAC_SECRET_LEN`]
/// bytes): `sub`, `iat = now`, `exp = now + ttl`, and `tether_ids` when ids are given (each a
/// valid pattern). For `tether token` and tests; production deployments usually have an
/// identity provider sign tokens.
pub fn sign_hs256(secret: &[u8], spec: &TokenSpec, now: SystemTime) -> Result<String, KeyError> {
    check_secret(secret)?;
    if spec.sub.is_empty() {
        return Err(KeyError::Sign {
            why: "empty sub".into(),
        });
    }
    let mut c = Map::new();
    c.insert("sub".into(), Value::from(spec.sub.clone()));
    let now_s = unix(now);
    c.insert("iat".into(), Value::from(now_s.as_secs()));
    if let Some(ttl) = spec.ttl {
        let exp = now_s.saturating_add(ttl);
        let exp = exp.as_secs() + u64::from(exp.subsec_nanos() > 0);
        c.insert("exp".into(), Value::from(exp));
    }
    if let Some(ids) = &spec.ids {
        AllowedIds::parse(ids).map_err(|e| KeyError::Sign { why: e.to_string() })?;
        c.insert(DEFAULT_IDS_CLAIM.into(), Value::from(ids.clone()));
    }
    if let Some(iss) = &spec.issuer {
        c.insert("iss".into(), Value::from(iss.clone()));
    }
    if let Some(aud) = &spec.audience {
        c.insert("aud".into(), Value::from(aud.clone()));
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &c,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| KeyError::Sign { why: e.to_string() })
}

#[cfg(test)]
mod tests;
