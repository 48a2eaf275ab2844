//! `tether probe`: measure a path's idle timeout against a `tether serve` responder, then
//! print the `tether plan` advice for what was measured. The measuring is in
//! `tether::probe`; this module parses flags, shows progress and prints.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use tether::probe::{self, Direction, DirectionResult, ProbeConfig, ProbeReport, Progress};
use tether_proto::duration::{self, Human};
use tether_proto::policy::Policy;
use tether_proto::presets::PathSpec;

use crate::exit::{Exit, UsageError};

/// Long help for `tether probe`.
pub(crate) const LONG_ABOUT: &str = "\
Measure the idle timeout of the path to a `tether serve` responder: how long a NAT, load
balancer or firewall between here and there keeps an idle TCP connection.

Many connections idle for different, geometrically spaced periods (4% apart, 1% near --hint),
each measured from its own last packet, and are then tested; a connection whose test goes
unanswered (or is reset, or closed) tells that the timeout is at most its idle period. A
control connection with frequent traffic tells a path or server outage from an expiry: then
the result is inconclusive, never a wrong number. Both directions are probed: the client
speaking first after the idle period, and the server speaking first. The probe ends once the
timeout is bracketed, in about 1.1–1.3 times the timeout plus set-up, and prints the
`tether plan` advice for the measured lower bound.

Exit codes: 0 conclusive result (a bracket, or no timeout below --max); 1 runtime error
(responder unreachable or not a tether responder); 2 bad arguments; 4 inconclusive.

Examples:
  tether probe 203.0.113.7:7300                       up to 30 min, both directions
  tether probe lb.example:7300 --hint azure-lb        rungs dense around 240 s
  tether probe 10.0.0.5:7300 --max 10m --json         machine-readable result";

/// Which side speaks first after the idle period.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DirectionArg {
    /// Both directions (connections are split evenly).
    Both,
    /// The client sends first.
    Client,
    /// The server sends first.
    Server,
}

/// Flags of `tether probe`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ProbeArgs {
    /// The responder: a `tether serve` address (HOST:PORT, or a port on 127.0.0.1)
    #[arg(value_name = "ADDR")]
    pub(crate) addr: String,

    /// Longest timeout to consider; none below it reports "no timeout below MAX"
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = duration::parse)]
    pub(crate) max: Duration,

    /// Put the rungs densely around this path's timeout: a preset (`tether plan --list`),
    /// PRESET=DURATION or a duration
    #[arg(long, value_name = "PRESET|DURATION", value_parser = PathSpec::parse)]
    pub(crate) hint: Option<PathSpec>,

    /// Connections idling at once, over both directions (more: closer to 1.1× the timeout)
    #[arg(long, value_name = "N", default_value_t = 96,
          value_parser = clap::value_parser!(u32).range(2..=4096))]
    pub(crate) connections: u32,

    /// Which side speaks first after the idle period
    #[arg(long, value_enum, default_value = "both")]
    pub(crate) direction: DirectionArg,

    /// How long a test waits for its answer [default: max(200ms + 3×RTT, 300ms)]
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    pub(crate) grace: Option<Duration>,

    /// Detection bound for the advice printed at the end
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration::parse)]
    pub(crate) detect_within: Duration,

    /// Print the result as JSON on stdout
    #[arg(long)]
    pub(crate) json: bool,

    /// No progress output on stderr
    #[arg(long, short)]
    pub(crate) quiet: bool,
}

/// Runs `tether probe`.
pub(crate) fn run(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    let addr = crate::config::parse_addr(&args.addr)
        .map_err(|e| UsageError(format!("invalid value for ADDR {:?}: {e}", args.addr)))?;
    if args.max > probe::MAX_DELAY || args.max.is_zero() {
        return Err(UsageError(format!(
            "invalid value for --max: {} (a responder accepts idle periods up to {})",
            Human(args.max),
            Human(probe::MAX_DELAY)
        ))
        .into());
    }
    if args
        .grace
        .is_some_and(|g| g.is_zero() || g > probe::MAX_GRACE)
    {
        return Err(UsageError(format!(
            "invalid value for --grace: must be between 1ms and {}",
            Human(probe::MAX_GRACE)
        ))
        .into());
    }
    let (cf, sf) = match args.direction {
        DirectionArg::Both => (true, true),
        DirectionArg::Client => (true, false),
        DirectionArg::Server => (false, true),
    };
    let cfg = ProbeConfig::new(addr)
        .max(args.max)
        .connections(args.connections as usize)
        .directions(cf, sf)
        .hint(args.hint.map(|h| h.timeout))
        .grace(args.grace);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let mut display = ProgressDisplay::new(!args.quiet, std::io::stderr().is_terminal(), args.max);
    let report = rt
        .block_on(probe::run(cfg, |p| display.update(p)))
        .with_context(|| format!("probe of {addr} failed"))?;
    display.finish();
    let advice = advice(&report, args.detect_within);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&args.addr, &report, &advice))?
        );
    } else {
        print!("{}", render_text(&args.addr, &report, &advice));
    }
    Ok(if report.conclusive {
        ExitCode::SUCCESS
    } else {
        // Inconclusive (an outage during the probe, contradicting results, or connections
        // that could not be opened).
        Exit::CheckFailed.into()
    })
}

/// The policy for what was measured: the path's timeout is taken as the lower bound (the
/// safe side), or `--max` when nothing expired below it.
fn advice(report: &ProbeReport, detect_within: Duration) -> Result<Policy, String> {
    if !report.conclusive {
        return Err("the result is inconclusive; run the probe again".into());
    }
    let path = match report.upper {
        Some(_) => report.lower,
        None => report.max,
    };
    if path.is_zero() {
        return Err("the path forgets idle flows faster than the shortest idle tested".into());
    }
    Policy::derive(detect_within, Some(PathSpec::from(path))).map_err(|e| {
        format!(
            "no policy detects a dead peer within {} across a path with idle timeout {}: {e}",
            Human(detect_within),
            Human(path)
        )
    })
}

fn s2(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn describe(r: &DirectionResult, max: Duration) -> String {
    let who = match r.direction {
        Direction::ClientFirst => "client speaks first",
        Direction::ServerFirst => "server speaks first",
    };
    let mut line = match (r.upper, r.expiry) {
        (Some(u), e) => format!(
            "{who}: {} < timeout ≤ {}, at expiry: {}",
            s2(r.lower),
            s2(u),
            e.map_or("unknown", |e| e.name())
        ),
        (None, _) => format!("{who}: no timeout below {}", Human(max)),
    };
    let _ = write!(line, " ({} tests)", r.tests);
    if let Some(n) = &r.note {
        let _ = write!(line, "; {n}");
    }
    line
}

fn render_text(addr: &str, r: &ProbeReport, advice: &Result<Policy, String>) -> String {
    let mut out = String::new();
    if !r.conclusive {
        let _ = writeln!(
            out,
            "tether probe {addr}: INCONCLUSIVE: {}",
            r.note.as_deref().unwrap_or("unknown reason")
        );
        let (l, u) = (r.lower, r.upper);
        let _ = writeln!(
            out,
            "  (not trustworthy: partial bracket {} < timeout ≤ {})",
            s2(l),
            u.map_or("?".to_string(), s2)
        );
    } else {
        match r.upper {
            Some(u) => {
                let _ = writeln!(
                    out,
                    "tether probe {addr}: idle timeout between {} and {} ({:.1}% wide)",
                    s2(r.lower),
                    s2(u),
                    100.0 * (u.as_secs_f64() - r.lower.as_secs_f64()) / u.as_secs_f64()
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "tether probe {addr}: no timeout below {} (idle periods up to {} survived)",
                    Human(r.max),
                    s2(r.lower)
                );
            }
        }
    }
    for d in &r.directions {
        let _ = writeln!(out, "  {}", describe(d, r.max));
    }
    let _ = writeln!(
        out,
        "  wall time {}, {} connections, rtt {:.2} ms, grace {}",
        s2(r.wall),
        r.connections,
        r.rtt.as_secs_f64() * 1e3,
        Human(r.grace)
    );
    out.push('\n');
    match advice {
        Ok(policy) => out.push_str(&crate::cmd::plan::render_advice(policy)),
        Err(why) => {
            let _ = writeln!(out, "no advice: {why}");
        }
    }
    out
}

fn secs_json(d: Option<Duration>) -> serde_json::Value {
    match d {
        Some(d) => serde_json::json!((d.as_secs_f64() * 1e3).round() / 1e3),
        None => serde_json::Value::Null,
    }
}

fn direction_json(r: &DirectionResult) -> serde_json::Value {
    serde_json::json!({
        "lower_s": secs_json(Some(r.lower)),
        "upper_s": secs_json(r.upper),
        "expiry": r.expiry.map(|e| e.name()),
        "conclusive": r.conclusive,
        "note": r.note,
        "tests": r.tests,
    })
}

fn to_json(addr: &str, r: &ProbeReport, advice: &Result<Policy, String>) -> serde_json::Value {
    let mut dirs = serde_json::Map::new();
    let mut expiry = serde_json::Map::new();
    for d in &r.directions {
        let key = match d.direction {
            Direction::ClientFirst => "client_first",
            Direction::ServerFirst => "server_first",
        };
        dirs.insert(key.into(), direction_json(d));
        expiry.insert(key.into(), serde_json::json!(d.expiry.map(|e| e.name())));
    }
    let (advice, advice_error) = match advice {
        Ok(p) => (crate::cmd::plan::json_value(p), serde_json::Value::Null),
        Err(why) => (serde_json::Value::Null, serde_json::json!(why)),
    };
    serde_json::json!({
        "address": addr,
        "conclusive": r.conclusive,
        "note": r.note,
        "lower_s": secs_json(Some(r.lower)),
        "upper_s": secs_json(r.upper),
        "no_timeout_below_max": r.conclusive && r.upper.is_none(),
        "max_s": secs_json(Some(r.max)),
        "expiry": expiry,
        "directions": dirs,
        "wall_s": secs_json(Some(r.wall)),
        "rtt_ms": (r.rtt.as_secs_f64() * 1e6).round() / 1e3,
        "grace_ms": r.grace.as_millis() as u64,
        "connections": r.connections,
        "advice": advice,
        "advice_error": advice_error,
    })
}

/// Progress on stderr: a redrawn bar with an ETA on a terminal, plain lines otherwise (one
/// when the bracket changes, at most one every 5 s otherwise).
struct ProgressDisplay {
    on: bool,
    tty: bool,
    max: Duration,
    drawn: bool,
    last_line: Option<(Duration, Option<Duration>)>,
    last_at: Duration,
}

impl ProgressDisplay {
    fn new(on: bool, tty: bool, max: Duration) -> Self {
        ProgressDisplay {
            on,
            tty,
            max,
            drawn: false,
            last_line: None,
            last_at: Duration::ZERO,
        }
    }

    fn update(&mut self, p: &Progress) {
        if !self.on {
            return;
        }
        let bracket = match p.upper {
            Some(u) => format!("{} < T ≤ {}", s2(p.lower), s2(u)),
            None if p.lower.is_zero() => "T unknown yet".to_string(),
            None => format!("T > {}", s2(p.lower)),
        };
        let mut err = std::io::stderr().lock();
        if self.tty {
            let total = (p.elapsed + p.remaining).as_secs_f64().max(1e-3);
            let frac = (p.elapsed.as_secs_f64() / total).clamp(0.0, 1.0);
            let width = 24;
            let filled = (frac * width as f64).round() as usize;
            let _ = write!(
                err,
                "\r\x1b[K[{}{}] {:>3.0}%  {bracket}  {} tests, {} idling  {} elapsed, ETA {}",
                "#".repeat(filled),
                "-".repeat(width - filled),
                frac * 100.0,
                p.tests,
                p.open,
                Human(round(p.elapsed)),
                Human(round(p.remaining)),
            );
            let _ = err.flush();
            self.drawn = true;
        } else {
            let key = (p.lower, p.upper);
            let changed = self.last_line.is_none_or(|k| k.1 != key.1 || k.0 != key.0);
            let due = p.elapsed >= self.last_at + Duration::from_secs(5);
            if (changed && p.elapsed >= self.last_at + Duration::from_millis(500)) || due {
                let _ = writeln!(
                    err,
                    "probe: {} elapsed: {bracket} ({} tests, {} idling, about {} left, max {})",
                    Human(round(p.elapsed)),
                    p.tests,
                    p.open,
                    Human(round(p.remaining)),
                    Human(self.max)
                );
                self.last_line = Some(key);
                self.last_at = p.elapsed;
            }
        }
    }

    fn finish(&mut self) {
        if self.drawn {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64 / 100 * 100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether::probe::Expiry;

    fn report(upper: Option<f64>, conclusive: bool) -> ProbeReport {
        let dir = |d| DirectionResult {
            direction: d,
            lower: Duration::from_secs_f64(5.9),
            upper: upper.map(Duration::from_secs_f64),
            expiry: upper.map(|_| Expiry::Reset),
            conclusive,
            note: None,
            decided_at: None,
            tests: 20,
        };
        ProbeReport {
            lower: Duration::from_secs_f64(5.9),
            upper: upper.map(Duration::from_secs_f64),
            max: Duration::from_secs(30),
            conclusive,
            note: (!conclusive).then(|| "the control connection was closed".to_string()),
            directions: vec![dir(Direction::ClientFirst), dir(Direction::ServerFirst)],
            wall: Duration::from_secs_f64(6.7),
            rtt: Duration::from_micros(250),
            grace: Duration::from_millis(300),
            connections: 60,
        }
    }

    #[test]
    fn json_has_bounds_expiry_per_direction_wall_and_conclusive() {
        let r = report(Some(6.1), true);
        let a = advice(&r, Duration::from_secs(30));
        let v = to_json("h:1", &r, &a);
        assert_eq!(v["lower_s"], 5.9);
        assert_eq!(v["upper_s"], 6.1);
        assert_eq!(v["conclusive"], true);
        assert_eq!(v["expiry"]["client_first"], "rst");
        assert_eq!(v["expiry"]["server_first"], "rst");
        assert_eq!(v["directions"]["server_first"]["upper_s"], 6.1);
        assert_eq!(v["wall_s"], 6.7);
        assert_eq!(v["no_timeout_below_max"], false);
        assert!(v["advice"].is_object(), "{v}");
    }

    #[test]
    fn advice_uses_the_lower_bound_and_text_ends_with_it() {
        let r = report(Some(6.1), true);
        let a = advice(&r, Duration::from_secs(30)).unwrap();
        assert_eq!(a.path().unwrap().timeout, Duration::from_secs_f64(5.9));
        let text = render_text("h:1", &r, &Ok(a.clone()));
        assert!(
            text.contains("idle timeout between 5.90 s and 6.10 s"),
            "{text}"
        );
        assert!(text.contains("at expiry: rst"), "{text}");
        assert!(
            text.ends_with(&crate::cmd::plan::render_advice(&a)),
            "{text}"
        );
    }

    #[test]
    fn no_timeout_uses_max_for_advice() {
        let r = report(None, true);
        let a = advice(&r, Duration::from_secs(30)).unwrap();
        assert_eq!(a.path().unwrap().timeout, Duration::from_secs(30));
        let text = render_text("h:1", &r, &Ok(a));
        assert!(text.contains("no timeout below 30s"), "{text}");
        assert_eq!(
            to_json("h:1", &r, &Ok(advice(&r, Duration::from_secs(30)).unwrap()))
                ["no_timeout_below_max"],
            true
        );
    }

    #[test]
    fn inconclusive_gives_no_advice() {
        let r = report(Some(6.1), false);
        let a = advice(&r, Duration::from_secs(30));
        assert!(a.is_err());
        let text = render_text("h:1", &r, &a);
        assert!(
            text.contains("INCONCLUSIVE: the control connection was closed"),
            "{text}"
        );
        assert!(text.contains("no advice"), "{text}");
        assert_eq!(to_json("h:1", &r, &a)["advice"], serde_json::Value::Null);
    }
}
