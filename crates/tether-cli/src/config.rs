//! Layered configuration: command-line flags win over `TETHER_*` environment variables, which
//! win over a TOML file (`--config`), which wins over built-in defaults. A bad value is an
//! error that names the key, where the value came from, and the value (exit 2).
//!
//! Flags are typed by clap value parsers and carry their defaults (`default_value`, shown in
//! `--help`): the one place a default is written. [`Layers::pick`] takes the parsed flag and
//! asks clap whether it was given on the command line; if not, a `TETHER_<KEY>` variable or
//! the file's key (parsed by the same parser) replaces the default.

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

/// The liveness flags, typed by clap (`detect_within` with its default applied).
#[derive(Debug, Clone, Copy)]
pub(crate) struct TypedPolicyFlags {
    pub(crate) detect_within: Duration,
    pub(crate) path: Option<PathSpec>,
    pub(crate) heartbeat: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
}

/// A setting that can be switched off with `off` or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Toggle<T>(pub(crate) Option<T>);

impl<T> Toggle<T> {
    /// Parses `off`/`none`, or the value with `parse`.
    pub(crate) fn parse<E: fmt::Display>(
        s: &str,
        parse: impl FnOnce(&str) -> std::result::Result<T, E>,
    ) -> std::result::Result<Toggle<T>, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("none") {
            return Ok(Toggle(None));
        }
        parse(s).map(|v| Toggle(Some(v))).map_err(|e| e.to_string())
    }
}

/// An address, or `off`.
pub(crate) fn parse_addr_or_off(s: &str) -> std::result::Result<Toggle<SocketAddr>, String> {
    Toggle::parse(s, parse_addr)
}

/// A duration, or `off`.
pub(crate) fn parse_duration_or_off(s: &str) -> std::result::Result<Toggle<Duration>, String> {
    Toggle::parse(s, parse_duration)
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
    /// Argument ids given on the command line (from clap's `ArgMatches`).
    given: std::collections::HashSet<String>,
}

impl Layers {
    /// Loads the TOML file (if any). `known` lists the keys the subcommand understands; any
    /// other key in the file is an error naming it.
    pub(crate) fn load(path: Option<&Path>, known: &[&str]) -> Result<Layers> {
        let Some(path) = path else {
            return Ok(Layers {
                file: None,
                given: Default::default(),
            });
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
            given: Default::default(),
        })
    }

    /// Records which flags were given on the command line (clap's `ValueSource`).
    pub(crate) fn given(mut self, matches: &clap::ArgMatches) -> Self {
        self.given = matches
            .ids()
            .filter(|id| {
                matches.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
            })
            .map(|id| id.as_str().to_owned())
            .collect();
        self
    }

    /// The value of `key`: `flag` (clap's parsed value) when given on the command line, else
    /// `TETHER_<KEY>` or the file's key parsed with `parse`, else `flag` (its default).
    pub(crate) fn pick<T, E: fmt::Display>(
        &self,
        key: &str,
        flag: T,
        parse: impl FnOnce(&str) -> std::result::Result<T, E>,
    ) -> Result<T> {
        if self.given.contains(key) {
            return Ok(flag);
        }
        match self.raw(key, None) {
            None => Ok(flag),
            Some((v, src)) => parse(v.trim())
                .map_err(|e| UsageError(format!("invalid value {v:?} for {src}: {e}")).into()),
        }
    }

    /// [`Layers::pick`] for a flag without a default.
    pub(crate) fn pick_opt<T, E: fmt::Display>(
        &self,
        key: &str,
        flag: Option<T>,
        parse: impl FnOnce(&str) -> std::result::Result<T, E>,
    ) -> Result<Option<T>> {
        self.pick(key, flag, |s| parse(s).map(Some))
    }

    /// The liveness policy from typed flags (see [`Layers::policy`]).
    pub(crate) fn typed_policy(&self, f: TypedPolicyFlags) -> Result<Policy> {
        let detect = self.pick("detect_within", f.detect_within, parse_duration)?;
        let path = self.pick_opt("path", f.path, PathSpec::parse)?;
        let mut b = Policy::builder(detect).path(path);
        if let Some(h) = self.pick_opt("heartbeat", f.heartbeat, parse_duration)? {
            b = b.heartbeat(h);
        }
        if let Some(i) = self.pick_opt("idle_timeout", f.idle_timeout, parse_duration)? {
            b = b.idle_timeout(Some(i));
        }
        b.build().context("the liveness settings are inconsistent")
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

/// A byte count that fits in memory.
pub(crate) fn parse_size(s: &str) -> std::result::Result<usize, String> {
    usize::try_from(parse_bytes(s)?).map_err(|_| "too large".to_owned())
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
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.toml");
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
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.toml");
        std::fs::write(&f, "listne = \"x\"\n").unwrap();
        let e = Layers::load(Some(&f), &["listen"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown key `listne`"), "{e}");
    }

    #[test]
    fn typed_flags_win_only_when_given() {
        use clap::{CommandFactory, FromArgMatches, Parser};
        #[derive(Parser, Debug)]
        struct T {
            #[arg(long, default_value = "30s", value_parser = parse_duration)]
            zz_typed_a: Duration,
            #[arg(long, default_value = "off", value_parser = parse_duration_or_off)]
            zz_typed_b: Toggle<Duration>,
        }
        let parse = |argv: &[&str]| {
            let m = T::command().try_get_matches_from(argv).unwrap();
            let t = T::from_arg_matches(&m).unwrap();
            (t, Layers::load(None, &[]).unwrap().given(&m))
        };
        // Default, then env over the default, then the flag over env.
        let (t, l) = parse(&["t"]);
        assert_eq!(
            l.pick("zz_typed_a", t.zz_typed_a, parse_duration).unwrap(),
            Duration::from_secs(30)
        );
        std::env::set_var("TETHER_ZZ_TYPED_A", "5s");
        assert_eq!(
            l.pick("zz_typed_a", t.zz_typed_a, parse_duration).unwrap(),
            Duration::from_secs(5)
        );
        let (t, l) = parse(&["t", "--zz-typed-a", "7s", "--zz-typed-b", "1m"]);
        assert_eq!(
            l.pick("zz_typed_a", t.zz_typed_a, parse_duration).unwrap(),
            Duration::from_secs(7)
        );
        assert_eq!(t.zz_typed_b, Toggle(Some(Duration::from_secs(60))));
        std::env::set_var("TETHER_ZZ_TYPED_A", "soon");
        let (t, l) = parse(&["t"]);
        let e = l
            .pick("zz_typed_a", t.zz_typed_a, parse_duration)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("TETHER_ZZ_TYPED_A") && e.contains("\"soon\""),
            "{e}"
        );
        std::env::remove_var("TETHER_ZZ_TYPED_A");
        assert_eq!(t.zz_typed_b, Toggle(None));
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
