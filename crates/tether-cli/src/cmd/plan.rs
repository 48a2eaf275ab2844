//! `tether plan`: turn "detect a dead peer within D across path P" into a tether policy and
//! the equivalent settings for other stacks. The computation is in `tether_proto::plan`;
//! this module parses flags, and [`render`] shows the result (text, JSON, the why of each
//! value).

mod render;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use tether_proto::duration::{self, Human};
use tether_proto::plan::Plan;
use tether_proto::policy::Policy;
use tether_proto::presets::{PathSpec, PRESETS};

/// Long help for `tether plan` (also usable as the subcommand's `long_about`).
pub(crate) const LONG_ABOUT: &str = "\
Turn what you know into settings: how fast a dead peer must be detected (--detect-within) and,
optionally, the idle timeout of the NAT, load balancer or firewall on the path (--path).

Prints the tether policy it implies first (heartbeat interval, dead_after, suspect_after, TCP
keepalive idle/interval/count, TCP_USER_TIMEOUT) with the reason for each value, then the
equivalent settings for other stacks: Linux setsockopt and sysctl, Windows registry and
setsockopt, Go net.KeepAliveConfig, .NET Socket options, HAProxy and nginx stream. A line
starting with '!' marks where a stack cannot meet the goal (an L7 proxy that ignores TCP
keepalive, Windows' fixed probe count, whole-second kernel keepalive, host-wide sysctl).

--path takes a preset name (see --list; each comes with its source), a preset with the timeout
you configured (azure-lb=30m), or a timeout: a bare number is seconds (240), or a duration
(240s, 4m, 1h30m). Measure an unknown path with `tether probe`.

Examples:
  tether plan --path azure-lb                      Azure LB (4 min, silent drop), 30 s bound
  tether plan --path aws-alb --detect-within 10s   L7 proxy: only heartbeats keep it open
  tether plan --path 350 --detect-within 2m        a measured 350 s path
  tether plan --path azure-lb=30m --json           configured timeout, machine-readable
  tether plan --list                               all presets with timeout, behaviour, source";

/// Flags of `tether plan`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct PlanArgs {
    /// Idle timeout of the path: a preset (see --list), PRESET=DURATION, or seconds / a duration
    #[arg(long, value_name = "PRESET|SECONDS", value_parser = PathSpec::parse)]
    pub(crate) path: Option<PathSpec>,

    /// Detect a dead peer within this long (e.g. 500ms, 10s, 2m, 1h30m; bare number = seconds)
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration::parse)]
    pub(crate) detect_within: Duration,

    /// Print JSON instead of text
    #[arg(long)]
    pub(crate) json: bool,

    /// List the path presets (timeout, behaviour at expiry, source) and exit
    #[arg(long)]
    pub(crate) list: bool,
}

/// Runs `tether plan`. Exit code 0 on success; an impossible combination of flags is an
/// error (the caller prints it and exits non-zero).
pub(crate) fn run(args: PlanArgs) -> anyhow::Result<ExitCode> {
    if args.list {
        let out = if args.json { list_json()? } else { list_text() };
        print!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    let policy =
        Policy::derive(args.detect_within, args.path).with_context(|| match args.path {
            Some(p) => format!(
                "no policy detects a dead peer within {} across path {p}",
                Human(args.detect_within)
            ),
            None => format!(
                "no policy detects a dead peer within {}",
                Human(args.detect_within)
            ),
        })?;
    if args.json {
        println!("{}", pretty_json(&Plan::new(&policy))?);
    } else {
        print!("{}", render_advice(&policy));
    }
    Ok(ExitCode::SUCCESS)
}

/// The `tether plan` text advice for a policy (the policy carries its path, if any), for
/// commands that end with advice, such as `tether probe`.
pub(crate) fn render_advice(policy: &Policy) -> String {
    render::text(&Plan::new(policy))
}

/// The plan as a JSON value (for documents that embed it, such as `tether probe --json`).
pub(crate) fn json_value(policy: &Policy) -> serde_json::Value {
    // Serializing plain structs of numbers and strings into a Value cannot fail.
    serde_json::to_value(render::json(&Plan::new(policy))).unwrap_or(serde_json::Value::Null)
}

/// The plan as pretty JSON.
pub(crate) fn pretty_json(plan: &Plan) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(&render::json(plan))?)
}

fn list_text() -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<21} {:>8}  {:<16} {:<9} CONFIGURABLE",
        "PRESET", "TIMEOUT", "AT EXPIRY", "TCP KA"
    );
    for p in PRESETS {
        let _ = writeln!(
            out,
            "{:<21} {:>8}  {:<16} {:<9} {}",
            p.name,
            Human(p.timeout).to_string(),
            p.expiry.name(),
            if p.tcp_keepalive_counts {
                "counts"
            } else {
                "ignored"
            },
            p.configurable
        );
        let _ = writeln!(out, "{:<21} {}: {}", "", p.title, p.expiry_text);
        let _ = writeln!(out, "{:<21} source: {}", "", p.source);
    }
    out.push_str(
        "\nTCP KA \"ignored\": an L7 proxy; only application bytes (tether heartbeats) keep the flow open.\n\
         Use a preset with a configured timeout as NAME=DURATION, e.g. --path azure-lb=30m.\n",
    );
    out
}

fn list_json() -> anyhow::Result<String> {
    let presets: Vec<serde_json::Value> = PRESETS
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.name,
                "title": p.title,
                "timeout_s": p.timeout.as_secs_f64(),
                "configurable": p.configurable,
                "expiry": p.expiry.name(),
                "expiry_text": p.expiry_text,
                "tcp_keepalive_counts": p.tcp_keepalive_counts,
                "source": p.source,
            })
        })
        .collect();
    Ok(serde_json::to_string_pretty(&presets)? + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        args: PlanArgs,
    }

    fn parse(argv: &[&str]) -> Result<PlanArgs, clap::Error> {
        let mut full = vec!["plan"];
        full.extend_from_slice(argv);
        TestCli::try_parse_from(full).map(|c| c.args)
    }

    #[test]
    fn flags_parse() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.detect_within, Duration::from_secs(30));
        assert!(a.path.is_none() && !a.json && !a.list);

        let a = parse(&["--path", "azure-lb", "--detect-within", "1h30m", "--json"]).unwrap();
        assert_eq!(a.path.unwrap().preset.unwrap().name, "azure-lb");
        assert_eq!(a.detect_within, Duration::from_secs(5400));

        let a = parse(&["--path", "240"]).unwrap();
        assert_eq!(a.path.unwrap().timeout, Duration::from_secs(240));

        // A configured timeout outside the preset's documented range is refused.
        let e = parse(&["--path", "azure-lb=1m"]).unwrap_err().to_string();
        assert!(e.contains("azure-lb=1m") && e.contains("4–100 min"), "{e}");
        assert!(parse(&["--path", "azure-lb=100m"]).is_ok());
        let e = parse(&["--path", "azur-lb"]).unwrap_err().to_string();
        assert!(e.contains("did you mean azure-lb"), "{e}");
        let e = parse(&["--detect-within", "soon"]).unwrap_err().to_string();
        assert!(e.contains("\"soon\""), "{e}");
    }

    #[test]
    fn impossible_combination_is_an_error_naming_values() {
        let a = parse(&["--path", "4m", "--detect-within", "50ms"]).unwrap();
        let e = format!("{:#}", run(a).unwrap_err());
        assert!(
            e.contains("50ms") && e.contains("120ms") && e.contains("4m"),
            "{e}"
        );
    }

    #[test]
    fn json_is_valid_and_complete() {
        for path in [
            None,
            Some("azure-lb"),
            Some("aws-alb"),
            Some("350"),
            Some("azure-lb=30m"),
        ] {
            let policy = Policy::derive(
                Duration::from_secs(30),
                path.map(|p| PathSpec::parse(p).unwrap()),
            )
            .unwrap();
            let plan = Plan::new(&policy);
            let v = json_value(&policy);
            assert_eq!(v["detect_within_s"], 30.0);
            assert_eq!(v["policy"]["heartbeat_s"], 10.0);
            assert_eq!(v["policy"]["dead_after_s"], 30.0);
            assert_eq!(v["policy"]["suspect_after_s"], 15.0);
            assert_eq!(v["policy"]["keepalive"]["count"], 3);
            assert_eq!(v["stacks"].as_array().unwrap().len(), 8);
            let linux = &v["stacks"][0];
            assert_eq!(linux["id"], "linux-socket");
            assert_eq!(linux["settings"]["TCP_KEEPIDLE"], 15);
            assert_eq!(linux["settings"]["TCP_USER_TIMEOUT"], 30_000);
            match path {
                None => assert!(v["path"].is_null()),
                Some("aws-alb") => {
                    assert_eq!(v["path"]["tcp_keepalive_counts"], false);
                    assert_eq!(linux["meets_goal"], false);
                    assert_eq!(linux["keeps_path_open"], false);
                }
                Some("azure-lb=30m") => {
                    assert_eq!(v["path"]["timeout_s"], 1800.0);
                    assert_eq!(v["path"]["spec"], "azure-lb=30m");
                }
                Some(_) => assert_eq!(linux["meets_goal"], true),
            }
            assert!(pretty_json(&plan).is_ok());
        }
    }

    #[test]
    fn list_shows_every_preset_with_source() {
        let text = list_text();
        for p in PRESETS {
            assert!(
                text.contains(p.name) && text.contains(p.source),
                "{}",
                p.name
            );
        }
        assert!(text.contains("ignored"));
        let v: serde_json::Value = serde_json::from_str(&list_json().unwrap()).unwrap();
        assert_eq!(v.as_array().unwrap().len(), PRESETS.len());
        assert_eq!(v[0]["name"], "azure-lb");
        assert_eq!(v[0]["timeout_s"], 240.0);
    }

    #[test]
    fn advice_matches_plan_text() {
        let p = Policy::default();
        let text = render_advice(&p);
        assert!(text.starts_with("Goal: detect a dead peer within 30s"));
        assert!(text.contains("Go (net.KeepAliveConfig"));
    }
}
