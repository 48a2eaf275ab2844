//! Layered configuration: command-line flags win over `TETHER_*` environment variables, which
//! win over a TOML file (`--config`), which wins over built-in defaults. A bad value is an
//! error that names the key, where the value came from, and the value.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::net::SocketAddr;

use anyhow::{Context, Result};

use crate::exit::UsageError;
use tether_proto::policy::Policy;
use tether_proto::presets::PathSpec;

/// The liveness flags shared by `serve`, `proxy` and `tunnel` (raw, as given on the command
/// line; `None` when absent).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PolicyFlags<'a> {
    pub(crate) detect_within: Option<&'a str>,
    pub(crate) path: Option<&'a str>,
    pub(crate) heartbeat: Option<&'a str>,
    pub(crate) idle_timeout: Option<&'a str>,
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    Flag(String),
    Env(String),
    File(PathBuf, String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(k) => write!(f, "flag {k}"),
            Source::Env(k) => write!(f, "environment variable {k}"),
            Source::File(p, k) => write!(f, "key `{k}` in {}", p.display()),
        }
    }
}

/// The layers for one subcommand.
pub(crate) struct Layers {
    file: Option<(PathBuf, BTreeMap<String, String>)>,
}

impl Layers {
    /// Loads the TOML file (if any). `known` lists the keys the subcommand understands; any
    /// other key in the file is an error naming it.
    pub(crate) fn load(path: Option<&Path>, known: &[&str]) -> Result<Layers> {
        let Some(path) = path else {
            return Ok(Layers { file: None });
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| UsageError(format!("cannot read config file {}", path.display())))?;
        let table: toml::Table = toml::from_str(&text).with_context(|| {
            UsageError(format!("config file {} is not valid TOML", path.display()))
        })?;
        let mut map = BTreeMap::new();
        for (k, v) in table {
            let key = k.replace('-', "_");
            if !known.contains(&key.as_str()) {
                return Err(UsageError(format!(
                    "unknown key `{k}` in config file {} (known keys: {})",
                    path.display(),
                    known.join(", ")
                ))
                .into());
            }
            let s = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(UsageError(format!(
                        "key `{k}` in config file {} must be a string, number or boolean, not {}",
                        path.display(),
                        other.type_str()
                    ))
                    .into())
                }
            };
            map.insert(key, s);
        }
        Ok(Layers {
            file: Some((path.to_owned(), map)),
        })
    }

    /// The raw value of `key` (snake_case) with its source: the flag value if given, else
    /// `TETHER_<KEY>`, else the file.
    pub(crate) fn raw(&self, key: &str, flag: Option<&str>) -> Option<(String, Source)> {
        if let Some(v) = flag {
            return Some((
                v.to_owned(),
                Source::Flag(format!("--{}", key.replace('_', "-"))),
            ));
        }
        let env = format!("TETHER_{}", key.to_ascii_uppercase());
        if let Ok(v) = std::env::var(&env) {
            return Some((v, Source::Env(env)));
        }
        let (path, map) = self.file.as_ref()?;
        map.get(key)
            .map(|v| (v.clone(), Source::File(path.clone(), key.to_owned())))
    }

    /// Parses `key` with `parse`; the error names the key, its source and the value.
    pub(crate) fn get<T, E: fmt::Display>(
        &self,
        key: &str,
        flag: Option<&str>,
        parse: impl FnOnce(&str) -> std::result::Result<T, E>,
    ) -> Result<Option<T>> {
        match self.raw(key, flag) {
            None => Ok(None),
            Some((v, src)) => match parse(v.trim()) {
                Ok(t) => Ok(Some(t)),
                Err(e) => Err(UsageError(format!("invalid value {v:?} for {src}: {e}")).into()),
            },
        }
    }

    /// The liveness policy from the flags every long-running command shares
    /// (`detect_within`, `path`, and the optional `heartbeat` / `idle_timeout` overrides).
    pub(crate) fn policy(&self, f: PolicyFlags<'_>, default_detect: Duration) -> Result<Policy> {
        let detect = self
            .get("detect_within", f.detect_within, parse_duration)?
            .unwrap_or(default_detect);
        let path = self.get("path", f.path, |s| {
            PathSpec::parse(s).map_err(|e| e.to_string())
        })?;
        let mut b = Policy::builder(detect).path(path);
        if let Some(h) = self.get("heartbeat", f.heartbeat, parse_duration)? {
            b = b.heartbeat(h);
        }
        if let Some(i) = self.get("idle_timeout", f.idle_timeout, parse_duration)? {
            b = b.idle_timeout(Some(i));
        }
        b.build().context("the liveness settings are inconsistent")
    }

    /// An address that can be switched off with `off` or `none`; `default` when not given.
    pub(crate) fn optional_addr(
        &self,
        key: &str,
        flag: Option<&str>,
        default: Option<SocketAddr>,
    ) -> Result<Option<SocketAddr>> {
        match self.raw(key, flag) {
            Some((v, _)) if v.eq_ignore_ascii_case("off") || v.eq_ignore_ascii_case("none") => {
                Ok(None)
            }
            Some(_) => self.get(key, flag, parse_addr),
            None => Ok(default),
        }
    }

    /// A boolean: a bare flag counts as true.
    pub(crate) fn flag(&self, key: &str, flag: bool) -> Result<bool> {
        Ok(self
            .get(key, flag.then_some("true"), parse_bool)?
            .unwrap_or(false))
    }
}

/// `true/false/yes/no/on/off/1/0`.
pub(crate) fn parse_bool(s: &str) -> std::result::Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// A human duration (`30s`, `500ms`, `4m`, bare number = seconds).
pub(crate) fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    tether_proto::duration::parse(s).map_err(|e| e.to_string())
}

/// A socket address; `host:port` names are resolved, a bare port means 127.0.0.1.
pub(crate) fn parse_addr(s: &str) -> std::result::Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("not an address (expected HOST:PORT): {e}"))?
        .next()
        .ok_or_else(|| "name resolved to no address".to_owned())
}

/// A positive integer.
pub(crate) fn parse_count(s: &str) -> std::result::Result<usize, String> {
    match s.replace('_', "").parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A byte size: `65536`, `64KiB`, `1MiB`, `1M`.
pub(crate) fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .replace('_', "")
        .parse()
        .map_err(|_| "expected a number of bytes like 65536 or 64KiB".to_owned())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        u => return Err(format!("unknown unit {u:?} (use B, KiB, MiB or GiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| "too large".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_flag_env_file() {
        let dir = std::env::temp_dir().join(format!("tether-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:9000\"\ndetect-within = \"20s\"\nmax_connections = 5\n",
        )
        .unwrap();
        let l = Layers::load(
            Some(&f),
            &["listen", "detect_within", "max_connections", "zz_unset_key"],
        )
        .unwrap();
        // File value when nothing else.
        assert_eq!(
            l.get("max_connections", None, parse_count).unwrap(),
            Some(5)
        );
        // Flag wins over file.
        assert_eq!(
            l.get("max_connections", Some("7"), parse_count).unwrap(),
            Some(7)
        );
        // Env wins over file (a key no other test touches).
        std::env::set_var("TETHER_ZZ_UNSET_KEY", "3");
        assert_eq!(l.get("zz_unset_key", None, parse_count).unwrap(), Some(3));
        assert_eq!(
            l.get("zz_unset_key", Some("4"), parse_count).unwrap(),
            Some(4)
        );
        std::env::remove_var("TETHER_ZZ_UNSET_KEY");
        // A bad value names key, source and value.
        let e = l
            .get("detect_within", Some("soon"), parse_duration)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--detect-within") && e.contains("\"soon\""),
            "{e}"
        );
        let e = l
            .get("listen", None, |_| Err::<(), _>("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `listen`") && e.contains("t.toml"), "{e}");
    }

    #[test]
    fn unknown_file_key_is_an_error() {
        let dir = std::env::temp_dir().join(format!("tether-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t.toml");
        std::fs::write(&f, "listne = \"x\"\n").unwrap();
        let e = Layers::load(Some(&f), &["listen"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown key `listne`"), "{e}");
    }

    #[test]
    fn parsers() {
        assert_eq!(parse_bytes("64KiB").unwrap(), 65536);
        assert_eq!(parse_bytes("1_000").unwrap(), 1000);
        assert!(parse_bytes("12 parsecs").is_err());
        assert_eq!(parse_addr("7300").unwrap().port(), 7300);
        assert!(parse_count("0").is_err());
        assert!(parse_bool("maybe").is_err());
    }
}
