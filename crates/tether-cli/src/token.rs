//! `tether token`: print a signed HS256 token for tests and small deployments.
//!
//! ```text
//! tether token --secret FILE --sub alice --ttl 24h [--ids a,b,device-*] [--issuer I] [--audience A]
//! ```
//!
//! The token carries `sub`, `iat`, `exp = now + ttl`, and `tether_ids` when `--ids` is given
//! (then exactly those ids, else the id `sub`). The secret file is read as `tether serve
//! --auth-secret FILE` reads it: its bytes without trailing whitespace, at least 32 of them.
//! Larger deployments have their identity provider sign tokens (RS256/ES256, JWKS).
//!
//! Exit codes: 0 the token is on stdout; 2 bad arguments (secret too short or unreadable,
//! bad id pattern, zero ttl).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tether::auth::jwt::read_secret_file;
use tether::auth::{sign_hs256, TokenSpec};

fn parse_duration(s: &str) -> Result<Duration, String> {
    tether_proto::duration::parse(s).map_err(|e| e.to_string())
}

/// Arguments of `tether token`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct TokenArgs {
    /// File holding the HS256 secret (at least 32 bytes; trailing whitespace is ignored).
    #[arg(long, value_name = "FILE")]
    secret: PathBuf,
    /// Subject: the principal's name, and its client id unless --ids is given.
    #[arg(long)]
    sub: String,
    /// How long the token stays valid (e.g. 24h, 30m, 90s).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    ttl: Duration,
    /// Client ids the token may use instead of SUB, comma-separated: exact ids or prefixes
    /// ending in '*' (e.g. a,b,device-*).
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    ids: Option<Vec<String>>,
    /// Issuer (`iss`), for servers that check it.
    #[arg(long)]
    issuer: Option<String>,
    /// Audience (`aud`), for servers that check it.
    #[arg(long)]
    audience: Option<String>,
}

/// The token `args` describe, issued at `now`.
fn make_token(args: &TokenArgs, now: SystemTime) -> anyhow::Result<String> {
    anyhow::ensure!(!args.ttl.is_zero(), "--ttl must be more than zero");
    let secret = read_secret_file(&args.secret).context("--secret")?;
    let mut spec = TokenSpec::new(args.sub.clone(), args.ttl);
    if let Some(ids) = &args.ids {
        spec = spec.ids(ids.iter().cloned());
    }
    if let Some(iss) = &args.issuer {
        spec = spec.issuer(iss.clone());
    }
    if let Some(aud) = &args.audience {
        spec = spec.audience(aud.clone());
    }
    Ok(sign_hs256(&secret, &spec, now)?)
}

/// Prints the token on stdout.
pub(crate) fn run(args: TokenArgs) -> anyhow::Result<ExitCode> {
    match make_token(&args, SystemTime::now()) {
        Ok(t) => {
            println!("{t}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use tether::auth::{CredentialVerifier, JwtVerifier};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TokenArgs,
    }

    fn secret_file(tag: &str, content: &[u8]) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("tether-token-test-{}-{tag}", std::process::id()));
        std::fs::write(&p, content).unwrap();
        p
    }

    #[test]
    fn a_token_from_the_command_verifies_with_the_auth_module() {
        let secret = b"an HS256 secret of 32 bytes or more";
        let path = secret_file("good", &[&secret[..], b"\n"].concat());
        let cli = Cli::try_parse_from([
            "token",
            "--secret",
            path.to_str().unwrap(),
            "--sub",
            "alice",
            "--ttl",
            "24h",
            "--ids",
            "alice,alice-*",
        ])
        .unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let token = make_token(&cli.args, now).unwrap();
        let v = JwtVerifier::hs256(secret).unwrap();
        let p = v.verify(token.as_bytes(), now).unwrap();
        assert_eq!(p.name, "alice");
        assert!(p.allows("alice") && p.allows("alice-phone") && !p.allows("bob"));
        // 24 h, plus the verifier's default leeway of 30 s.
        assert_eq!(p.wire_ttl(now), Duration::from_secs(24 * 3600 + 30));
        assert!(v
            .verify(token.as_bytes(), now + Duration::from_secs(24 * 3600 + 30))
            .is_err());
        // The default ttl is 24 h too; without --ids the token may use exactly its sub.
        let cli =
            Cli::try_parse_from(["token", "--secret", path.to_str().unwrap(), "--sub", "bob"])
                .unwrap();
        let p = v
            .verify(make_token(&cli.args, now).unwrap().as_bytes(), now)
            .unwrap();
        assert!(p.allows("bob") && !p.allows("alice"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bad_arguments_are_refused() {
        let short = secret_file("short", b"short");
        let cli = Cli::try_parse_from(["token", "--secret", short.to_str().unwrap(), "--sub", "a"])
            .unwrap();
        let e = make_token(&cli.args, SystemTime::now()).unwrap_err();
        assert!(format!("{e:#}").contains("at least 32"), "{e:#}");
        std::fs::remove_file(short).unwrap();
        let ok = secret_file("ok", b"an HS256 secret of 32 bytes or more!");
        for extra in [&["--ids", "a*b"][..], &["--ttl", "0s"]] {
            let mut argv = vec!["token", "--secret", ok.to_str().unwrap(), "--sub", "a"];
            argv.extend(extra);
            let cli = Cli::try_parse_from(argv).unwrap();
            assert!(
                make_token(&cli.args, SystemTime::now()).is_err(),
                "{extra:?}"
            );
        }
        assert!(
            Cli::try_parse_from(["token", "--sub", "a"]).is_err(),
            "--secret is required"
        );
        assert!(Cli::try_parse_from([
            "token",
            "--secret",
            ok.to_str().unwrap(),
            "--sub",
            "a",
            "--ttl",
            "soon"
        ])
        .is_err());
        std::fs::remove_file(ok).unwrap();
    }
}
