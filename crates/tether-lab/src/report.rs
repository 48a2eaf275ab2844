//! Reports: the terminal table, Markdown, JSON (one object per cell and side), an SVG chart,
//! and the checks the lab's claims rest on.
//!
//! ```text
//!  fault          topology      side    | os-default     keepalive      user-timeout …
//!  bound                                | -              3s             3s
//!  blackhole      outbound-nat  client  | never (>12s)   2.4s keepalive 3.0s user-timeout …
//! ```

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;

use crate::error::LabError;
use crate::fault::{Fault, FaultKind};
use crate::method::{Method, Scale};
use crate::run::{CellResult, Outcome};
use crate::topology::{Role, Shape};

/// How far past its bound a `tether` cell may detect (the issue's +25%).
pub const BOUND_SLACK: f64 = 1.25;

/// A violated claim.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CheckFailure {
    /// `fault / method / topology`.
    pub cell: String,
    /// The side.
    pub side: Role,
    /// What is wrong.
    pub problem: String,
}

impl std::fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} side): {}", self.cell, self.side, self.problem)
    }
}

/// Checks the lab's claims on `results`:
/// - every `tether` side survives idle faults and detects every other fault within its bound
///   + 25%;
/// - on the control fault (`none`) no side reports a death for the live connection (the
///   idle timer's *closed idle* is its documented behaviour, not a death report);
/// - no run failed.
pub fn check(results: &[CellResult]) -> Vec<CheckFailure> {
    let mut out = Vec::new();
    for r in results {
        for role in [Role::Client, Role::Server] {
            let o = r.side(role);
            let fail = |problem: String| CheckFailure {
                cell: r.cell.to_string(),
                side: role,
                problem,
            };
            if let Outcome::Error { message } = o {
                out.push(fail(format!("run failed: {message}")));
                continue;
            }
            if r.cell.fault == Fault::None {
                match o {
                    Outcome::Survived | Outcome::ClosedIdle { .. } => {}
                    other => out.push(fail(format!(
                        "the connection was alive but the side reported {}",
                        short(other)
                    ))),
                }
            }
            if !r.cell.method.is_checked() {
                continue;
            }
            match (r.cell.fault.kind(), o, r.bound) {
                (FaultKind::Idle, Outcome::Survived, _) => {}
                (FaultKind::Idle, other, _) => out.push(fail(format!(
                    "idle connection did not survive: {}",
                    short(other)
                ))),
                (_, Outcome::Detected { after, .. }, Some(b))
                    if after.as_secs_f64() <= b.as_secs_f64() * BOUND_SLACK => {}
                (_, other, b) => out.push(fail(format!(
                    "not detected within the bound {} + 25%: {}",
                    b.map(secs).unwrap_or_default(),
                    short(other)
                ))),
            }
        }
    }
    out
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s:.1}s")
    }
}

/// A reason label shortened for tables.
fn short_reason(reason: &str) -> &str {
    match reason {
        "heartbeat-timeout" => "heartbeat",
        "keepalive-timeout" => "keepalive",
        "peer-reset" => "rst",
        "peer-closed" => "fin",
        "idle-timeout" => "idle-timer",
        r if r.starts_with("io-error") => "io-error",
        r if r.starts_with("peer-close") => "close",
        r => r,
    }
}

/// A side's outcome in a few characters: `survived`, `2.9s heartbeat`, `never (>12s)`, …
pub fn short(o: &Outcome) -> String {
    match o {
        Outcome::Survived => "survived".into(),
        Outcome::Detected { after, reason } => {
            format!("{:.1}s {}", after.as_secs_f64(), short_reason(reason))
        }
        Outcome::ClosedIdle { after, .. } => format!("idle-closed {:.1}s", after.as_secs_f64()),
        Outcome::NotDetected { cap } => format!("never (>{})", secs(*cap)),
        Outcome::Error { .. } => "ERROR".into(),
    }
}

fn methods_in(results: &[CellResult]) -> Vec<Method> {
    let mut m: Vec<Method> = results.iter().map(|r| r.cell.method).collect();
    m.sort();
    m.dedup();
    m
}

/// Rows: (fault, shape) in order, each with both sides.
fn rows(results: &[CellResult]) -> Vec<(Fault, Shape)> {
    let mut rows: Vec<(Fault, Shape)> = results
        .iter()
        .map(|r| (r.cell.fault, r.cell.shape))
        .collect();
    rows.sort();
    rows.dedup();
    rows
}

fn find(results: &[CellResult], fault: Fault, shape: Shape, method: Method) -> Option<&CellResult> {
    results
        .iter()
        .find(|r| r.cell.fault == fault && r.cell.shape == shape && r.cell.method == method)
}

fn grid(results: &[CellResult], scale: &Scale) -> (Vec<String>, Vec<Vec<String>>) {
    let methods = methods_in(results);
    let mut header = vec!["fault".to_string(), "topology".into(), "side".into()];
    header.extend(methods.iter().map(|m| m.name().to_string()));
    let mut lines = Vec::new();
    let mut bound = vec!["(bound)".to_string(), String::new(), String::new()];
    bound.extend(
        methods
            .iter()
            .map(|m| m.bound(scale).map(secs).unwrap_or_else(|| "-".into())),
    );
    lines.push(bound);
    for (fault, shape) in rows(results) {
        for role in [Role::Client, Role::Server] {
            let mut line = vec![
                fault.name().to_string(),
                shape.name().to_string(),
                role.name().to_string(),
            ];
            for m in &methods {
                line.push(
                    find(results, fault, shape, *m)
                        .map(|r| short(r.side(role)))
                        .unwrap_or_default(),
                );
            }
            lines.push(line);
        }
    }
    (header, lines)
}

/// The terminal table: one row per fault, topology and side; one column per method; the
/// first row gives each method's configured bound.
pub fn text_table(results: &[CellResult], scale: &Scale) -> String {
    let (header, lines) = grid(results, scale);
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for l in &lines {
        for (w, c) in width.iter_mut().zip(l) {
            *w = (*w).max(c.chars().count());
        }
    }
    let fmt = |cells: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            if i == 3 {
                s.push_str("| ");
            }
            let _ = write!(s, "{c:<w$}  ");
        }
        s.trim_end().to_string()
    };
    let mut out = fmt(&header);
    out.push('\n');
    out.push_str(&"-".repeat(out.trim_end().chars().count()));
    out.push('\n');
    for l in &lines {
        out.push_str(&fmt(l));
        out.push('\n');
    }
    out
}

/// What the short outcomes mean.
pub const LEGEND: &str = "survived = the idle connection still delivered data after 3x the middlebox timeout; \
Ns REASON = the side learned the connection was gone N s after the fault (idle faults: after both sides sent), \
reasons: heartbeat (tether dead_after), keepalive (kernel gave up after probes), user-timeout (unacked data), \
idle-timer (read deadline), rst (RST received), fin (peer's kernel closed); \
idle-closed = the idle timer closed the connection before the fault took effect (it cannot tell idle from dead); \
never (>cap) = still believed in a dead connection when the run ended.";

/// The Markdown report: scale, table, legend, checks.
pub fn markdown(results: &[CellResult], scale: &Scale, command: &str, wall: Duration) -> String {
    let (header, lines) = grid(results, scale);
    let mut s = String::new();
    let _ = writeln!(s, "# tether lab matrix\n");
    let _ = writeln!(
        s,
        "Command: `{command}` (wall time {:.0} s)\n",
        wall.as_secs_f64()
    );
    let _ = writeln!(s, "{}\n", scale.describe());
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(header.len()));
    for l in &lines {
        let _ = writeln!(s, "| {} |", l.join(" | "));
    }
    let _ = writeln!(s, "\n{LEGEND}\n");
    let failures = check(results);
    if failures.is_empty() {
        let _ = writeln!(
            s,
            "Checks: every tether side detected within its bound + 25% or survived; no death reported on the healthy control."
        );
    } else {
        let _ = writeln!(s, "Checks FAILED:\n");
        for f in failures {
            let _ = writeln!(s, "- {f}");
        }
    }
    s
}

/// One JSON object per cell and side.
#[derive(Debug, serde::Serialize)]
pub struct JsonRow<'a> {
    /// The fault.
    pub fault: Fault,
    /// The method.
    pub method: Method,
    /// The topology.
    pub topology: Shape,
    /// The side measured.
    pub side: Role,
    /// `survived`, `detected`, `closed-idle`, `not-detected`, `error`.
    pub outcome: &'static str,
    /// Detection (or idle close) time in seconds, when there is one.
    pub seconds: Option<f64>,
    /// The configured bound in seconds (`null` for os-default).
    pub bound_seconds: Option<f64>,
    /// The reason label (or the error), when there is one.
    pub reason: Option<&'a str>,
    /// The cap in seconds.
    pub cap_seconds: f64,
    /// One lab second stands for this many real seconds.
    pub scale_factor: u32,
}

/// The JSON rows for `results`.
pub fn json_rows<'a>(results: &'a [CellResult], scale: &Scale) -> Vec<JsonRow<'a>> {
    let mut rows = Vec::new();
    for r in results {
        for role in [Role::Client, Role::Server] {
            let o = r.side(role);
            rows.push(JsonRow {
                fault: r.cell.fault,
                method: r.cell.method,
                topology: r.cell.shape,
                side: role,
                outcome: o.label(),
                seconds: o.seconds().map(|s| (s * 1000.0).round() / 1000.0),
                bound_seconds: r.bound.map(|b| b.as_secs_f64()),
                reason: o.reason(),
                cap_seconds: scale.cap.as_secs_f64(),
                scale_factor: scale.factor,
            });
        }
    }
    rows
}

/// Writes the JSON rows to `path` (an array, pretty-printed), creating its directory.
pub fn write_json(results: &[CellResult], scale: &Scale, path: &Path) -> Result<(), LabError> {
    let text = serde_json::to_string_pretty(&json_rows(results, scale))
        .map_err(|e| LabError::Chart(format!("json: {e}")))?;
    let w = |source| LabError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(w)?;
    }
    std::fs::write(path, text + "\n").map_err(w)
}

fn method_color(m: Method) -> RGBColor {
    match m {
        Method::OsDefault => RGBColor(127, 127, 127),
        Method::OsKeepalive => RGBColor(188, 189, 34),
        Method::Keepalive => RGBColor(31, 119, 180),
        Method::UserTimeout => RGBColor(255, 127, 14),
        Method::IdleTimer => RGBColor(148, 103, 189),
        Method::Tether => RGBColor(44, 160, 44),
        Method::ClientCmd => RGBColor(214, 39, 40),
        #[allow(unreachable_patterns)]
        _ => RGBColor(0, 0, 0),
    }
}

/// Draws detection time per method per fault as grouped bars, one panel per side, to an
/// SVG file. Bars reaching the cap with a pale fill and `∞` on top mean *never*; a `✓` at the foot means
/// *survived*; an outlined bar means *idle-closed*; the dashed line is the bound.
pub fn write_svg(results: &[CellResult], scale: &Scale, path: &Path) -> Result<(), LabError> {
    draw_svg(results, scale, path).map_err(|e| LabError::Chart(e.to_string()))
}

fn draw_svg(
    results: &[CellResult],
    scale: &Scale,
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let groups = rows(results);
    let methods = methods_in(results);
    let width = (140 + groups.len() * 20 * (methods.len() + 1)).max(900) as u32;
    let root = SVGBackend::new(path, (width, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(60);
    title
        .draw(&Text::new(
            format!(
                "tether lab: time to detect a dead connection (lab seconds; 1 s stands for {} s), cap {}",
                scale.factor,
                secs(scale.cap)
            ),
            (20, 15),
            ("sans-serif", 20).into_font(),
        ))
        ?;
    for (i, m) in methods.iter().enumerate() {
        let x = 20 + i as i32 * 170;
        title.draw(&Rectangle::new(
            [(x, 40), (x + 14, 54)],
            method_color(*m).filled(),
        ))?;
        title.draw(&Text::new(
            m.name(),
            (x + 20, 41),
            ("sans-serif", 14).into_font(),
        ))?;
    }
    let panels = body.split_evenly((2, 1));
    let cap = scale.cap.as_secs_f64();
    let n = groups.len() as f64;
    let k = methods.len() as f64;
    for (panel, role) in panels.iter().zip([Role::Client, Role::Server]) {
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{role} detects"), ("sans-serif", 16))
            .margin(10)
            .margin_bottom(40)
            .x_label_area_size(10)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..n, 0f64..cap * 1.08)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_desc("seconds")
            .draw()?;
        for (gi, (fault, shape)) in groups.iter().enumerate() {
            let g = gi as f64;
            for (mi, m) in methods.iter().enumerate() {
                let Some(r) = find(results, *fault, *shape, *m) else {
                    continue;
                };
                let x0 = g + 0.1 + mi as f64 * 0.8 / k;
                let x1 = x0 + 0.8 / k * 0.9;
                let c = method_color(*m);
                let bar = |h: f64, style: ShapeStyle| Rectangle::new([(x0, 0.0), (x1, h)], style);
                let label = |t: String, y: f64, color: RGBColor| {
                    Text::new(t, (x0, y), ("sans-serif", 9).into_font().color(&color))
                };
                match r.side(role) {
                    Outcome::Detected { after, .. } => {
                        let h = after.as_secs_f64().min(cap);
                        chart.draw_series([bar(h.max(cap * 0.01), c.filled())])?;
                        chart.draw_series([label(format!("{h:.1}"), h + cap * 0.05, BLACK)])
                    }
                    Outcome::NotDetected { .. } => {
                        chart.draw_series([bar(cap, c.mix(0.35).filled())])?;
                        chart.draw_series([label("∞".into(), cap * 1.06, BLACK)])
                    }
                    Outcome::ClosedIdle { after, .. } => {
                        let h = after.as_secs_f64().min(cap);
                        chart.draw_series([bar(h, c.stroke_width(2))])?;
                        chart.draw_series([label("idle".into(), h + cap * 0.05, c)])
                    }
                    Outcome::Survived => chart.draw_series([Text::new(
                        "✓",
                        (x0, cap * 0.05),
                        ("sans-serif", 14).into_font().color(&c),
                    )]),
                    Outcome::Error { .. } => chart.draw_series([Text::new(
                        "!",
                        (x0, cap * 0.05),
                        ("sans-serif", 14).into_font().color(&RED),
                    )]),
                }?;
            }
            let (px, py) = chart.backend_coord(&(g + 0.05, 0.0));
            let (ox, oy) = panel.get_base_pixel();
            let (px, py) = (px - ox, py - oy);
            panel.draw(&Text::new(
                fault.name(),
                (px, py + 6),
                ("sans-serif", 12).into_font(),
            ))?;
            panel.draw(&Text::new(
                shape.name(),
                (px, py + 20),
                ("sans-serif", 11).into_font().color(&RGBColor(90, 90, 90)),
            ))?;
        }
        let b = scale.bound.as_secs_f64();
        chart.draw_series(DashedLineSeries::new(
            [(0.0, b), (n, b)],
            6,
            4,
            RGBColor(200, 0, 0).stroke_width(1),
        ))?;
    }
    root.present()?;
    Ok(())
}

/// Writes `matrix.md` and `matrix.svg` into `dir` (created if missing).
pub fn write_dir(
    results: &[CellResult],
    scale: &Scale,
    dir: &Path,
    command: &str,
    wall: Duration,
) -> Result<(), LabError> {
    let w = |source| LabError::Write {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(w)?;
    std::fs::write(
        dir.join("matrix.md"),
        markdown(results, scale, command, wall),
    )
    .map_err(w)?;
    write_svg(results, scale, &dir.join("matrix.svg"))
}
