//! `tether token` as a process: the printed token verifies with `tether::auth`, and bad
//! arguments exit with code 2.

use std::process::Command;
use std::time::{Duration, SystemTime};

use tether::auth::{CredentialVerifier, JwtVerifier};

const BIN: &str = env!("CARGO_BIN_EXE_tether");

#[test]
fn the_printed_token_verifies_and_bad_secrets_exit_2() {
    let dir = std::env::temp_dir().join(format!("tether-token-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    let out = Command::new(BIN)
        .args(["token", "--secret"])
        .arg(&secret)
        .args(["--sub", "alice", "--ttl", "1h", "--ids", "alice,bot-*"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    let token = token.trim_end();
    let v = JwtVerifier::hs256(b"0123456789abcdef0123456789abcdef").unwrap();
    let now = SystemTime::now();
    let p = v.verify(token.as_bytes(), now).unwrap();
    assert_eq!(p.name, "alice");
    assert!(p.allows("bot-1") && !p.allows("bob"));
    let ttl = p.wire_ttl(now);
    assert!(
        ttl > Duration::from_secs(3500) && ttl <= Duration::from_secs(3600 + 31),
        "{ttl:?}"
    );

    std::fs::write(&secret, "short\n").unwrap();
    let out = Command::new(BIN)
        .args(["token", "--sub", "alice", "--secret"])
        .arg(&secret)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 32"));
    std::fs::remove_dir_all(&dir).unwrap();
}
