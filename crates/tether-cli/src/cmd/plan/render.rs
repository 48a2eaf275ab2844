//! How `tether plan` shows a [`Plan`]: text for people, JSON for scripts (serde), and the
//! "why" of every policy value. The computation is in `tether_proto::{policy, plan}`.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use tether_proto::duration::Human;
use tether_proto::plan::{Plan, Value};
use tether_proto::policy::{self, Policy};

/// One setting of a policy, its value, and why (see [`explain`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Explanation {
    /// The setting (`"heartbeat"`, `"dead_after"`, `"tcp_keepalive"`, …).
    pub(crate) setting: &'static str,
    /// Its value, human-formatted.
    pub(crate) value: String,
    /// The rule that produced it.
    pub(crate) why: String,
}

impl Explanation {
    fn new(setting: &'static str, value: String, why: String) -> Explanation {
        Explanation {
            setting,
            value,
            why,
        }
    }
}

/// One line per setting of `policy`: the value and why it has that value.
pub(crate) fn explain(policy: &Policy) -> Vec<Explanation> {
    let this = policy;
    let d_w = this.detect_within;
    let h = this.heartbeat_interval;
    let mut out = Vec::new();

    // Bounds are shown to the millisecond: "3.333s", not "3.333333333s".
    let approx = |d: Duration| Human(Duration::from_millis(d.as_millis() as u64));
    let mut bounds = vec![format!("detect_within/3 = {}", approx(d_w / 3))];
    if d_w < Duration::from_millis(300) {
        bounds.push(format!(
            "(detect_within − 100ms)/2 = {}",
            approx(d_w.saturating_sub(policy::MIN_MARGIN) / 2)
        ));
    }
    if let Some(p) = this.path_timeout {
        bounds.push(format!("path/3 = {}", approx(p / 3)));
    }
    let derived_h = this.derived_heartbeat();
    let mut why = format!(
        "a side silent this long sends an empty frame; at most {}, rounded down, so that \
         dead_after holds two heartbeats plus margin{}",
        if bounds.len() == 1 {
            bounds[0].clone()
        } else {
            format!("min({})", bounds.join(", "))
        },
        if this.path_timeout.is_some() {
            ", and a late heartbeat still refreshes the path's idle timer"
        } else {
            ""
        }
    );
    if derived_h != h {
        why = format!("set explicitly (derived: {}); {why}", Human(derived_h));
    }
    out.push(Explanation::new("heartbeat", Human(h).to_string(), why));

    let why = format!(
        "no byte at all for this long declares the peer dead; ≤ detect_within ({}) and ≥ \
         2 × heartbeat + margin max(heartbeat/2, 100ms) = {}, so one late heartbeat is not a death",
        Human(d_w),
        Human(policy::min_dead_after(h))
    );
    out.push(Explanation::new(
        "dead_after",
        Human(this.dead_after).to_string(),
        why,
    ));

    out.push(Explanation::new(
        "suspect_after",
        Human(this.suspect_after()).to_string(),
        "heartbeat + margin: the server shows a silent client as Suspect before it is dead"
            .to_string(),
    ));

    match this.keepalive {
        Some(k) => {
            let path = match (this.path_timeout, this.path_preset) {
                (Some(_), Some(p)) if !p.tcp_keepalive_counts => format!(
                    "; {} ignores TCP keepalive, so only heartbeats keep it open",
                    p.name
                ),
                (Some(p), _) => format!(
                    "; idle and interval ≤ path/3 ({}) keep the path open by themselves",
                    Human(p / 3)
                ),
                _ => String::new(),
            };
            out.push(Explanation::new(
                "tcp_keepalive",
                format!(
                    "idle {} interval {} count {}",
                    Human(k.idle),
                    Human(k.interval),
                    k.count
                ),
                format!(
                    "second line of defence in whole seconds: the kernel gives up after \
                     idle + count × interval = {} (goal: ≤ detect_within {}){path}",
                    Human(k.total()),
                    Human(d_w)
                ),
            ));
        }
        None => out.push(Explanation::new(
            "tcp_keepalive",
            "off".to_string(),
            "disabled: heartbeats are the only liveness check".to_string(),
        )),
    }
    out.push(match this.user_timeout {
        Some(u) => Explanation::new(
            "tcp_user_timeout",
            Human(u).to_string(),
            "data unacknowledged this long aborts the connection (instead of ~15 min of \
             retransmissions); catches one-way failures; = detect_within"
                .to_string(),
        ),
        None => Explanation::new(
            "tcp_user_timeout",
            "off".to_string(),
            "disabled: unacknowledged data is retransmitted for ~15 min (tcp_retries2)".to_string(),
        ),
    });
    if let Some(i) = this.idle_timeout {
        out.push(Explanation::new(
            "idle_timeout",
            Human(i).to_string(),
            "no application data this long closes the connection, heartbeats notwithstanding"
                .to_string(),
        ));
    }
    if let Some(p) = this.ping_interval {
        out.push(Explanation::new(
            "ping_interval",
            Human(p).to_string(),
            "a PING this often measures the round-trip time".to_string(),
        ));
    }
    out
}

/// The advice as text for a terminal: the policy and why first, then each stack.
pub(crate) fn text(plan: &Plan) -> String {
    let this = plan;
    let p = &this.policy;
    let mut out = String::new();
    let _ = write!(
        out,
        "Goal: detect a dead peer within {}",
        Human(p.detect_within)
    );
    match p.path() {
        Some(path) => {
            let _ = write!(
                out,
                " across a path with idle timeout {}",
                Human(path.timeout)
            );
            if let Some(pr) = path.preset {
                let _ = write!(
                    out,
                    " ({}: {}; at expiry: {})",
                    pr.name, pr.title, pr.expiry_text
                );
            }
            out.push('\n');
        }
        None => {
            out.push_str(" (no path idle timeout given: use --path to keep NAT/LB flows open)\n")
        }
    }

    out.push_str("\ntether policy\n");
    for e in &explain(p) {
        let _ = writeln!(out, "  {:<17} {}", e.setting, e.value);
        wrap_into(&mut out, &e.why, "      ", 92);
    }

    if !this.warnings.is_empty() {
        out.push_str("\nwarnings\n");
        for w in &this.warnings {
            wrap_into(&mut out, &format!("! {w}"), "  ", 92);
        }
    }

    out.push_str("\nusual defaults\n");
    for d in &this.defaults {
        let _ = write!(
            out,
            "  {:<20} first probe after {:<6} gives up after {}",
            d.stack,
            Human(d.first_probe).to_string(),
            Human(d.gives_up_after)
        );
        match d.keeps_path_open {
            Some(true) => out.push_str(", keeps the path open"),
            Some(false) => out.push_str(", path expires first"),
            None => {}
        }
        out.push('\n');
    }

    for s in &this.stacks {
        let verdict = if s.meets_goal(p.detect_within) {
            "meets the goal"
        } else {
            "falls short"
        };
        let _ = writeln!(out, "\n{} [{}] — {}", s.title, s.scope, verdict);
        for line in s.snippet.lines() {
            let _ = writeln!(out, "    {line}");
        }
        for w in &s.warnings {
            wrap_into(&mut out, &format!("! {w}"), "  ", 92);
        }
    }
    out
}

/// Appends `text` wrapped at `width` columns, each line starting with `indent`.
fn wrap_into(out: &mut String, text: &str, indent: &str, width: usize) {
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty()
            && indent.len() + line.chars().count() + 1 + word.chars().count() > width
        {
            let _ = writeln!(out, "{indent}{line}");
            line.clear();
            // Continuation lines of a "! warning" align under its text.
            if text.starts_with("! ") {
                line.push_str("  ");
            }
        }
        if !line.is_empty() && !line.ends_with("  ") {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.trim().is_empty() {
        let _ = writeln!(out, "{indent}{line}");
    }
}

// ---- JSON ------------------------------------------------------------------------------------

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The plan as JSON (durations as seconds in `*_s` keys; absent values `null`).
#[derive(Debug, Serialize)]
pub(crate) struct PlanJson<'a> {
    detect_within_s: f64,
    path: Option<PathJson>,
    policy: PolicyJson,
    explain: Vec<Explanation>,
    warnings: &'a [String],
    defaults: Vec<DefaultJson>,
    stacks: Vec<StackJson<'a>>,
}

#[derive(Debug, Serialize)]
struct PathJson {
    spec: String,
    timeout_s: f64,
    tcp_keepalive_counts: bool,
    preset: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiry: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiry_text: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'static str>,
}

#[derive(Debug, Serialize)]
struct PolicyJson {
    heartbeat_s: f64,
    dead_after_s: f64,
    suspect_after_s: f64,
    margin_s: f64,
    keepalive: Option<KeepaliveJson>,
    user_timeout_s: Option<f64>,
    idle_timeout_s: Option<f64>,
    ping_interval_s: Option<f64>,
}

#[derive(Debug, Serialize)]
struct KeepaliveJson {
    idle_s: f64,
    interval_s: f64,
    count: u32,
    gives_up_after_s: f64,
}

#[derive(Debug, Serialize)]
struct DefaultJson {
    stack: &'static str,
    first_probe_s: f64,
    gives_up_after_s: f64,
    keeps_path_open: Option<bool>,
    source: &'static str,
}

#[derive(Debug, Serialize)]
struct StackJson<'a> {
    id: &'static str,
    title: &'static str,
    scope: &'static str,
    settings: Settings<'a>,
    snippet: &'a str,
    gives_up_after_s: Option<f64>,
    keeps_path_open: Option<bool>,
    meets_goal: bool,
    warnings: &'a [String],
}

/// A stack's settings as one object, in the stack's order: `{"TCP_KEEPIDLE": 15, …}`.
#[derive(Debug)]
struct Settings<'a>(&'a [tether_proto::plan::Setting]);

impl Serialize for Settings<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(untagged)]
        enum V<'a> {
            Int(u64),
            Bool(bool),
            Text(&'a str),
        }
        s.collect_map(self.0.iter().map(|st| {
            let v = match &st.value {
                Value::Int(i) => V::Int(*i),
                Value::Bool(b) => V::Bool(*b),
                Value::Text(t) => V::Text(t),
            };
            (st.name.as_str(), v)
        }))
    }
}

/// The JSON document of `plan`.
pub(crate) fn json(plan: &Plan) -> PlanJson<'_> {
    let p = &plan.policy;
    PlanJson {
        detect_within_s: secs(p.detect_within),
        path: p.path().map(|path| PathJson {
            spec: path.to_string(),
            timeout_s: secs(path.timeout),
            tcp_keepalive_counts: path.tcp_keepalive_counts(),
            preset: path.preset.map(|pr| pr.name),
            title: path.preset.map(|pr| pr.title),
            expiry: path.preset.map(|pr| pr.expiry.name()),
            expiry_text: path.preset.map(|pr| pr.expiry_text),
            source: path.preset.map(|pr| pr.source),
        }),
        policy: PolicyJson {
            heartbeat_s: secs(p.heartbeat_interval),
            dead_after_s: secs(p.dead_after),
            suspect_after_s: secs(p.suspect_after()),
            margin_s: secs(p.margin()),
            keepalive: p.keepalive.map(|k| KeepaliveJson {
                idle_s: secs(k.idle),
                interval_s: secs(k.interval),
                count: k.count,
                gives_up_after_s: secs(k.total()),
            }),
            user_timeout_s: p.user_timeout.map(secs),
            idle_timeout_s: p.idle_timeout.map(secs),
            ping_interval_s: p.ping_interval.map(secs),
        },
        explain: explain(p),
        warnings: &plan.warnings,
        defaults: plan
            .defaults
            .iter()
            .map(|d| DefaultJson {
                stack: d.stack,
                first_probe_s: secs(d.first_probe),
                gives_up_after_s: secs(d.gives_up_after),
                keeps_path_open: d.keeps_path_open,
                source: d.source,
            })
            .collect(),
        stacks: plan
            .stacks
            .iter()
            .map(|s| StackJson {
                id: s.id,
                title: s.title,
                scope: s.scope,
                settings: Settings(&s.settings),
                snippet: &s.snippet,
                gives_up_after_s: s.gives_up_after.map(secs),
                keeps_path_open: s.keeps_path_open,
                meets_goal: s.meets_goal(p.detect_within),
                warnings: &s.warnings,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::presets::{PathSpec, PRESETS};

    fn s(v: u64) -> Duration {
        Duration::from_secs(v)
    }

    fn plan(d: Duration, path: Option<&str>) -> Plan {
        Plan::new(&Policy::derive(d, path.map(|p| PathSpec::parse(p).unwrap())).unwrap())
    }

    #[test]
    fn text_puts_the_policy_first() {
        let t = text(&plan(s(30), Some("azure-lb")));
        let policy_at = t.find("tether policy").unwrap();
        let linux_at = t.find("Linux, per socket").unwrap();
        assert!(policy_at < linux_at);
        assert!(t.contains("heartbeat         10s"), "{t}");
        assert!(t.contains("suspect_after     15s"), "{t}");
        assert!(t.contains("idle 15s interval 5s count 3"), "{t}");
        assert!(text(&plan(s(30), None)).contains("no path idle timeout given"));
    }

    #[test]
    fn every_preset_renders_completely() {
        for preset in PRESETS {
            for d in [Duration::from_millis(500), s(30), s(7200)] {
                let p = plan(d, Some(preset.name));
                let t = text(&p);
                assert!(t.contains(preset.name));
                assert!(t.contains("heartbeat") && t.contains("dead_after"));
                for st in &p.stacks {
                    assert!(t.contains(st.title), "{}", st.title);
                }
                let v = serde_json::to_value(json(&p)).unwrap();
                assert_eq!(v["path"]["preset"], preset.name);
                assert_eq!(v["stacks"].as_array().unwrap().len(), p.stacks.len());
            }
        }
    }

    #[test]
    fn explanations_name_the_binding_rule() {
        let p = Policy::derive(s(1800), Some(PathSpec::parse("azure-lb").unwrap())).unwrap();
        let hb = &explain(&p)[0];
        assert_eq!((hb.setting, hb.value.as_str()), ("heartbeat", "1m20s"));
        assert!(hb.why.contains("path/3 = 1m20s"), "{}", hb.why);
        let p = Policy::builder(s(30)).heartbeat(s(5)).build().unwrap();
        assert!(explain(&p)[0].why.contains("set explicitly (derived: 10s)"));
        let p = Policy::builder(s(30))
            .keepalive(None)
            .user_timeout(None)
            .idle_timeout(Some(s(600)))
            .ping_interval(Some(s(5)))
            .build()
            .unwrap();
        let settings: Vec<_> = explain(&p).iter().map(|e| e.setting).collect();
        assert!(settings.contains(&"idle_timeout") && settings.contains(&"ping_interval"));
        assert!(explain(&p)
            .iter()
            .any(|e| e.setting == "tcp_keepalive" && e.value == "off"));
    }

    #[test]
    fn wrapping_keeps_words_and_width() {
        let mut out = String::new();
        let t = "one two three four five six seven eight nine ten eleven twelve";
        wrap_into(&mut out, t, "  ", 20);
        assert!(out.lines().all(|l| l.chars().count() <= 20), "{out}");
        let words: Vec<_> = out.split_whitespace().collect();
        assert_eq!(words.join(" "), t);
    }
}
