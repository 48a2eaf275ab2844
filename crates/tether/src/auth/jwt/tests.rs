//! JWT verification: valid, expired, not yet valid, wrong signature, wrong algorithm (`none`,
//! HS/RS confusion), audience and issuer, strict claim types, allowed ids, JWKS by kid and by
//! (issuer, kid). The clock is injected: every test runs at a fixed `NOW`.

use super::*;
use crate::auth::{AuthError, CredentialVerifier};
use serde_json::json;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
/// A fixed instant (2023-11-14T22:13:20Z).
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}
const NOW_S: i64 = 1_700_000_000;

/// A test-only RSA key pair (generated once with openssl; never used outside tests).
const RSA_PRIVATE: &[u8] = include_bytes!("../testdata/rsa-test-private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../testdata/rsa-test-public.pem");

fn sign(alg: Algorithm, kid: Option<&str>, claims: Value, key: &EncodingKey) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

fn hs(claims: Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        claims,
        &EncodingKey::from_secret(SECRET),
    )
}

fn verify(v: &JwtVerifier, token: &str) -> Result<Principal, AuthError> {
    v.verify(token.as_bytes(), now())
}

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..chunk.len() + 1 {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// An EC P-256 key pair: (signing key, public PEM, JWK with `kid`).
fn ec_key(kid: &str) -> (EncodingKey, String, Value) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
    let raw = kp.public_key_raw(); // 04 || x || y
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
        "x": b64url(&raw[1..33]), "y": b64url(&raw[33..65]),
    });
    (enc, kp.public_key_pem(), jwk)
}

#[test]
fn a_valid_hs256_token_names_its_sub_and_may_use_that_id_only() {
    let v = JwtVerifier::hs256(SECRET).unwrap();
    let p = verify(&v, &hs(json!({"sub": "alice", "exp": NOW_S + 3600}))).unwrap();
    assert_eq!(p.name, "alice");
    assert_eq!(p.scheme, Scheme::Jwt);
    assert_eq!(p.issuer, None);
    assert!(p.allows("alice"));
    assert!(!p.allows("bob"));
    // Valid until exp + leeway (30 s by default).
    assert_eq!(
        p.expires_at,
        Some(UNIX_EPOCH + Duration::from_secs(1_700_003_630))
    );
}

#[test]
fn the_ids_claim_lists_exact_ids_and_prefixes() {
    let v = JwtVerifier::hs256(SECRET).unwrap();
    let t = hs(json!({"sub": "fleet", "exp": NOW_S + 60, "tether_ids": ["a", "device-*"]}));
    let p = verify(&v, &t).unwrap();
    assert_eq!(p.name, "fleet");
    for ok in ["a", "device-1", "device-"] {
        assert!(p.allows(ok), "{ok}");
    }
    // With the claim present, sub is only the principal's name.
    for no in ["fleet", "b", "devic", "xdevice-1"] {
        assert!(!p.allows(no), "{no}");
    }
    // A configured claim name.
    let v2 = JwtVerifier::hs256(SECRET)
        .unwrap()
        .with_config(JwtConfig::default().ids_claim("ids"));
    let p = verify(
        &v2,
        &hs(json!({"sub": "s", "exp": NOW_S + 60, "ids": ["x"]})),
    )
    .unwrap();
    assert!(p.allows("x") && !p.allows("s"));
    // Bad lists refuse the token.
    for bad in [json!(["a*b"]), json!("a"), json!([1]), json!([""])] {
        let t = hs(json!({"sub": "s", "exp": NOW_S + 60, "tether_ids": bad}));
        assert!(
            matches!(
                verify(&v, &t),
                Err(AuthError::Claim {
                    claim: "tether_ids",
                    ..
                })
            ),
            "{bad}"
        );
    }
}

#[test]
fn expired_tokens_are_refused_after_the_leeway() {
    let v = JwtVerifier::hs256(SECRET).unwrap();
    assert_eq!(
        verify(&v, &hs(json!({"sub": "a", "exp": NOW_S - 31}))).unwrap_err(),
        AuthError::Expired
    );
    // exactly exp + leeway: refused.
    assert_eq!(
        verify(&v, &hs(json!({"sub": "a", "exp": NOW_S - 30}))).unwrap_err(),
        AuthError::Expired
    );
    // within the leeway: accepted, and expires at exp + leeway.
    let p = verify(&v, &hs(json!({"sub": "a", "exp": NOW_S - 10}))).unwrap();
    assert_eq!(p.wire_ttl(now()), Duration::from_secs(20));
    // No leeway.
    let strict = JwtVerifier::hs256(SECRET)
        .unwrap()
        .with_config(JwtConfig::default().leeway(Duration::ZERO));
    assert_eq!(
        verify(&strict, &hs(json!({"sub": "a", "exp": NOW_S}))).unwrap_err(),
        AuthError::Expired
    );
    assert!(verify(&strict, &hs(json!({"sub": "a", "exp": NOW_S + 1}))).is_ok());
}

#[test]
fn not_yet_valid_tokens_are_refused() {
    let v = JwtVerifier::hs256(SECRET).unwrap();
    assert_eq!(
        verify(
            &v,
            &hs(json!({"sub": "a", "exp": NOW_S + 600, "nbf": NOW_S + 60}))
        )
        .unwrap_err(),
        AuthError::NotYetValid
    );
    assert!(verify(
        &v,
        &hs(json!({"sub": "a", "exp": NOW_S + 600, "nbf": NOW_S + 10}))
    )
    .is_ok());
}

#[test]
fn claims_of_the_wrong_type_refuse_the_token() {
    // CVE-2026-25537's class: a string exp/nbf must not count as "absent".
    let v = JwtVerifier::hs256(SECRET)
        .unwrap()
        .with_config(JwtConfig::default().require_exp(false));
    for (claims, name) in [
        (json!({"sub": "a", "exp": "never"}), "exp"),
        (json!({"sub": "a", "nbf": "99999999999"}), "nbf"),
        (json!({"sub": "a", "exp": -5}), "exp"),
        (json!({"sub": "a", "iss": 7}), "iss"),
        (json!({"sub": 7}), "sub"),
        (json!({"sub": ""}), "sub"),
        (json!({"exp": NOW_S + 5}), "sub"),
    ] {
        match verify(&v, &hs(claims.clone())) {
            Err(AuthError::Claim { claim, .. }) => assert_eq!(claim, name, "{claims}"),
            other => panic!("{claims}: {other:?}"),
        }
    }
    // aud of the wrong type: refused too (needs an audience to get that far).
    let v = v.with_config(JwtConfig::default().audience(["t"]));
    assert!(matches!(
        verify(&v, &hs(json!({"sub": "a", "exp": NOW_S + 5, "aud": 1}))),
        Err(AuthError::Claim { claim: "aud", .. })
    ));
}

#[test]
fn exp_is_required_unless_switched_off() {
    let v = JwtVerifier::hs256(SECRET).unwrap();
    assert!(matches!(
        verify(&v, &hs(json!({"sub": "a"}))),
        Err(AuthError::Claim { claim: "exp", .. })
    ));
    let lax = v.with_config(JwtConfig::default().require_exp(false));
    assert_eq!(
        verify(&lax, &hs(json!({"sub": "a"}))).unwrap().expires_at,
        None
    );
}

#[test]
fn a_wrong_signature_is_refused() {
    let v = JwtVerifier::hs256(SECRET).unwrap();
    let other = sign(
        Algorithm::HS256,
        None,
        json!({"sub": "a", "exp": NOW_S + 60}),
        &EncodingKey::from_secret(b"another secret of at least 32 bytes!"),
    );
    assert_eq!(verify(&v, &other).unwrap_err(), AuthError::Signature);
    // Payload swapped for another's (alice's signature, mallory's claims).
    let alice = hs(json!({"sub": "alice", "exp": NOW_S + 60}));
    let mallory = hs(json!({"sub": "mallory", "exp": NOW_S + 60, "tether_ids": ["*"]}));
    let a: Vec<&str> = alice.split('.').collect();
    let m: Vec<&str> = mallory.split('.').collect();
    let forged = format!("{}.{}.{}", a[0], m[1], a[2]);
    assert_eq!(verify(&v, &forged).unwrap_err(), AuthError::Signature);
}

#[test]
fn malformed_credentials_are_refused_not_panics() {
    let v = JwtVerifier::hs256(SECRET).unwrap();
    for bad in [
        &b"\xff\xfe"[..],
        b"",
        b"abc",
        b"a.b",
        b"a.b.c",
        b"....",
        b"eyJhbGciOiJIUzI1NiJ9.!!!.x",
    ] {
        assert!(
            matches!(
                v.verify(bad, now()),
                Err(AuthError::Malformed { .. } | AuthError::Signature)
            ),
            "{bad:?}: {:?}",
            v.verify(bad, now())
        );
    }
}

#[test]
fn alg_none_never_verifies() {
    let v = JwtVerifier::hs256(SECRET).unwrap();
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64url(format!(r#"{{"sub":"a","exp":{}}}"#, NOW_S + 60).as_bytes());
    for t in [
        format!("{header}.{payload}."),
        format!("{header}.{payload}.AAAA"),
    ] {
        assert_eq!(verify(&v, &t).unwrap_err(), AuthError::Algorithm, "{t}");
    }
}

#[test]
fn hs_rs_confusion_is_refused_both_ways() {
    // An HS256 token "signed" with the RSA public key as HMAC secret, presented to the
    // RS256 verifier: the algorithm is not the key's.
    let rs = JwtVerifier::public_key_pem(RSA_PUBLIC).unwrap();
    let confused = sign(
        Algorithm::HS256,
        None,
        json!({"sub": "a", "exp": NOW_S + 60}),
        &EncodingKey::from_secret(RSA_PUBLIC),
    );
    assert_eq!(verify(&rs, &confused).unwrap_err(), AuthError::Algorithm);
    // A real RS256 token verifies with the public key...
    let rs_token = sign(
        Algorithm::RS256,
        None,
        json!({"sub": "rsa", "exp": NOW_S + 60}),
        &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
    );
    assert_eq!(verify(&rs, &rs_token).unwrap().name, "rsa");
    // ... and is refused by an HS256 verifier.
    let hs_v = JwtVerifier::hs256(SECRET).unwrap();
    assert_eq!(verify(&hs_v, &rs_token).unwrap_err(), AuthError::Algorithm);
    // RS384 with the same key: not the algorithm the PEM key was loaded for.
    let rs384 = sign(
        Algorithm::RS384,
        None,
        json!({"sub": "rsa", "exp": NOW_S + 60}),
        &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
    );
    assert_eq!(verify(&rs, &rs384).unwrap_err(), AuthError::Algorithm);
}

#[test]
fn es256_tokens_verify_with_the_public_key_pem() {
    let (enc, pem, _) = ec_key("k");
    let v = JwtVerifier::public_key_pem(pem.as_bytes()).unwrap();
    let t = sign(
        Algorithm::ES256,
        None,
        json!({"sub": "ec", "exp": NOW_S + 60}),
        &enc,
    );
    assert_eq!(verify(&v, &t).unwrap().name, "ec");
    let (other, _, _) = ec_key("k");
    let t = sign(
        Algorithm::ES256,
        None,
        json!({"sub": "ec", "exp": NOW_S + 60}),
        &other,
    );
    assert_eq!(verify(&v, &t).unwrap_err(), AuthError::Signature);
    assert!(matches!(
        JwtVerifier::public_key_pem(
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        ),
        Err(KeyError::PublicKey { .. })
    ));
}

#[test]
fn audience_and_issuer_are_checked() {
    let v = JwtVerifier::hs256(SECRET).unwrap();
    // No audience configured: a token meant for someone (anyone) is refused.
    assert_eq!(
        verify(
            &v,
            &hs(json!({"sub": "a", "exp": NOW_S + 60, "aud": "other"}))
        )
        .unwrap_err(),
        AuthError::Audience
    );
    let v = v.with_config(JwtConfig::default().audience(["tether"]).issuers(["idp"]));
    let ok = |aud: Value| hs(json!({"sub": "a", "exp": NOW_S + 60, "aud": aud, "iss": "idp"}));
    assert!(verify(&v, &ok(json!("tether"))).is_ok());
    assert!(verify(&v, &ok(json!(["x", "tether"]))).is_ok());
    assert_eq!(
        verify(&v, &ok(json!("other"))).unwrap_err(),
        AuthError::Audience
    );
    assert_eq!(verify(&v, &ok(json!([]))).unwrap_err(), AuthError::Audience);
    assert_eq!(
        verify(
            &v,
            &hs(json!({"sub": "a", "exp": NOW_S + 60, "iss": "idp"}))
        )
        .unwrap_err(),
        AuthError::Audience
    );
    assert_eq!(
        verify(
            &v,
            &hs(json!({"sub": "a", "exp": NOW_S + 60, "aud": "tether", "iss": "evil"}))
        )
        .unwrap_err(),
        AuthError::Issuer
    );
    assert_eq!(
        verify(
            &v,
            &hs(json!({"sub": "a", "exp": NOW_S + 60, "aud": "tether"}))
        )
        .unwrap_err(),
        AuthError::Issuer
    );
    let p = verify(&v, &ok(json!("tether"))).unwrap();
    assert_eq!(p.issuer.as_deref(), Some("idp"));
}

fn jwks(keys: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({ "keys": keys })).unwrap()
}

#[test]
fn jwks_keys_are_picked_by_kid_and_unknown_kids_refused() {
    let (k1, _, j1) = ec_key("k1");
    let (k2, _, j2) = ec_key("k2");
    let v = JwtVerifier::jwks(&jwks(&[j1, j2]), None).unwrap();
    let claims = || json!({"sub": "a", "exp": NOW_S + 60});
    assert!(verify(&v, &sign(Algorithm::ES256, Some("k1"), claims(), &k1)).is_ok());
    assert!(verify(&v, &sign(Algorithm::ES256, Some("k2"), claims(), &k2)).is_ok());
    // k2's key under k1's name: k1 is used, the signature fails.
    assert_eq!(
        verify(&v, &sign(Algorithm::ES256, Some("k1"), claims(), &k2)).unwrap_err(),
        AuthError::Signature
    );
    assert_eq!(
        verify(&v, &sign(Algorithm::ES256, Some("k9"), claims(), &k1)).unwrap_err(),
        AuthError::UnknownKey {
            kid: Some("k9".into())
        }
    );
    assert_eq!(
        verify(&v, &sign(Algorithm::ES256, None, claims(), &k1)).unwrap_err(),
        AuthError::UnknownKey { kid: None }
    );
    // An HS256 token whose kid names an EC key: the algorithm is not the key's.
    let hs_kid = sign(
        Algorithm::HS256,
        Some("k1"),
        claims(),
        &EncodingKey::from_secret(SECRET),
    );
    assert_eq!(verify(&v, &hs_kid).unwrap_err(), AuthError::Algorithm);
}

#[test]
fn jwks_keys_are_bound_to_their_issuer_not_only_their_kid() {
    // Two issuers whose sets both use kid "k1" (the Centrifugo cache bug: keyed by kid alone,
    // issuer B's key could verify tokens that claim issuer A).
    let (ka, _, ja) = ec_key("k1");
    let (kb, _, jb) = ec_key("k1");
    let v = JwtVerifier::jwks(&jwks(&[ja]), Some("A"))
        .unwrap()
        .add_jwks(&jwks(&[jb]), Some("B"))
        .unwrap();
    let claims = |iss: &str| json!({"sub": "a", "exp": NOW_S + 60, "iss": iss});
    let a = verify(&v, &sign(Algorithm::ES256, Some("k1"), claims("A"), &ka)).unwrap();
    assert_eq!(a.issuer.as_deref(), Some("A"));
    let b = verify(&v, &sign(Algorithm::ES256, Some("k1"), claims("B"), &kb)).unwrap();
    assert_eq!(b.issuer.as_deref(), Some("B"));
    assert!(!a.is_same(&b), "same sub, different issuers");
    // B's key signing a token that claims issuer A: A's key is used, the signature fails.
    assert_eq!(
        verify(&v, &sign(Algorithm::ES256, Some("k1"), claims("A"), &kb)).unwrap_err(),
        AuthError::Signature
    );
    // An issuer with no set, and no issuer at all: no key.
    assert!(matches!(
        verify(&v, &sign(Algorithm::ES256, Some("k1"), claims("C"), &ka)),
        Err(AuthError::UnknownKey { .. })
    ));
    assert!(matches!(
        verify(
            &v,
            &sign(
                Algorithm::ES256,
                Some("k1"),
                json!({"sub": "a", "exp": NOW_S + 60}),
                &ka
            )
        ),
        Err(AuthError::UnknownKey { .. })
    ));
}

#[test]
fn jwks_alg_and_use_are_honoured() {
    let oct = |kid: &str, alg: Option<&str>| {
        let mut j = json!({"kty": "oct", "kid": kid, "k": b64url(SECRET)});
        if let Some(a) = alg {
            j["alg"] = json!(a);
        }
        j
    };
    let v = JwtVerifier::jwks(&jwks(&[oct("h", Some("HS256"))]), None).unwrap();
    let claims = || json!({"sub": "a", "exp": NOW_S + 60});
    let key = EncodingKey::from_secret(SECRET);
    assert!(verify(&v, &sign(Algorithm::HS256, Some("h"), claims(), &key)).is_ok());
    assert_eq!(
        verify(&v, &sign(Algorithm::HS384, Some("h"), claims(), &key)).unwrap_err(),
        AuthError::Algorithm
    );
    // Encryption keys are skipped; a set of only those has no signing key.
    let mut enc = oct("e", None);
    enc["use"] = json!("enc");
    assert!(matches!(
        JwtVerifier::jwks(&jwks(&[enc]), None),
        Err(KeyError::Jwks { .. })
    ));
    for bad in [
        &b"{}"[..],
        b"not json",
        br#"{"keys": []}"#,
        br#"{"keys": [{"kty": "nope"}]}"#,
    ] {
        assert!(
            matches!(JwtVerifier::jwks(bad, None), Err(KeyError::Jwks { .. })),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    // Two keys with one kid in one set: ambiguous, refused at load.
    assert!(matches!(
        JwtVerifier::jwks(&jwks(&[oct("h", None), oct("h", None)]), None),
        Err(KeyError::Jwks { .. })
    ));
}

#[test]
fn secrets_are_read_without_trailing_whitespace_and_must_be_long_enough() {
    let tmp = crate::tls::test_dir("secret");
    let dir = tmp.path();
    let path = dir.join("secret");
    std::fs::write(&path, [SECRET, b"\r\n"].concat()).unwrap();
    let v = JwtVerifier::hs256_file(&path).unwrap();
    assert!(verify(&v, &hs(json!({"sub": "a", "exp": NOW_S + 60}))).is_ok());
    std::fs::write(&path, b"short\n").unwrap();
    let e = JwtVerifier::hs256_file(&path).unwrap_err();
    assert!(matches!(e, KeyError::ShortSecret { len: 5, .. }), "{e}");
    assert!(e.to_string().contains("secret"), "{e}");
    let e = JwtVerifier::hs256_file(&dir.join("missing")).unwrap_err();
    assert!(matches!(e, KeyError::Read { .. }));
    assert!(e.to_string().contains("missing"), "{e}");
    assert!(matches!(
        JwtVerifier::hs256(b"short"),
        Err(KeyError::ShortSecret { .. })
    ));
}

#[test]
fn signed_tokens_verify_and_carry_ttl_ids_issuer_and_audience() {
    let spec = TokenSpec::new("alice", Duration::from_secs(24 * 3600)).ids(["alice", "alice-*"]);
    let t = sign_hs256(SECRET, &spec, now()).unwrap();
    let v = JwtVerifier::hs256(SECRET)
        .unwrap()
        .with_config(JwtConfig::default().leeway(Duration::ZERO));
    let p = verify(&v, &t).unwrap();
    assert_eq!(p.name, "alice");
    assert!(p.allows("alice") && p.allows("alice-phone") && !p.allows("bob"));
    assert_eq!(p.wire_ttl(now()), Duration::from_secs(24 * 3600));
    // A sub-second ttl rounds exp up, never down to "now".
    let t = sign_hs256(
        SECRET,
        &TokenSpec::new("a", Duration::from_millis(1)),
        now(),
    )
    .unwrap();
    assert_eq!(
        verify(&v, &t).unwrap().wire_ttl(now()),
        Duration::from_secs(1)
    );
    // Expired once the ttl has passed.
    let t = sign_hs256(SECRET, &TokenSpec::new("a", Duration::from_secs(60)), now()).unwrap();
    assert_eq!(
        v.verify(t.as_bytes(), now() + Duration::from_secs(60))
            .unwrap_err(),
        AuthError::Expired
    );
    // iss and aud.
    let spec = TokenSpec::new("a", Duration::from_secs(60))
        .issuer("me")
        .audience("tether");
    let t = sign_hs256(SECRET, &spec, now()).unwrap();
    let v2 = v.with_config(JwtConfig::default().issuers(["me"]).audience(["tether"]));
    assert_eq!(verify(&v2, &t).unwrap().issuer.as_deref(), Some("me"));
    // Refusals at signing time.
    assert!(matches!(
        sign_hs256(
            b"short",
            &TokenSpec::new("a", Duration::from_secs(1)),
            now()
        ),
        Err(KeyError::ShortSecret { .. })
    ));
    assert!(matches!(
        sign_hs256(
            SECRET,
            &TokenSpec::new("a", Duration::from_secs(1)).ids(["a*b"]),
            now()
        ),
        Err(KeyError::Sign { .. })
    ));
    assert!(matches!(
        sign_hs256(SECRET, &TokenSpec::new("", Duration::from_secs(1)), now()),
        Err(KeyError::Sign { .. })
    ));
}
