//! `tether lab`: reproduce middlebox failures in network namespaces and compare detection
//! methods side by side (needs root, nftables, conntrack, iproute2). The work happens in the
//! `tether-lab` crate; this module parses arguments, shows progress and writes reports.
//!
//! Exit codes: 0 every check passed; 1 the lab could not run (not root, tool missing, …);
//! 2 bad arguments; 4 a check failed (a tether side outside its bound + 25%, a death reported
//! on the healthy control, or a run that errored).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use tether_lab::{
    report, Cell, ClientCommand, Fault, Lab, Method, PeerCommand, Progress, Scale, Shape,
};
use tether_proto::duration;

use crate::exit::{Exit, UsageError};

/// Arguments of `tether lab`.
#[derive(Args, Debug)]
pub(crate) struct LabArgs {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand, Debug)]
enum LabCommand {
    /// List the faults (with what they model), methods and topologies.
    List,
    /// Run one fault with one method and print what each side experienced.
    Run {
        /// The fault (see `tether lab list`).
        #[arg(value_parser = parse::<Fault>)]
        fault: Fault,
        /// The detection method.
        #[arg(long, short, value_parser = parse::<Method>, default_value = "tether")]
        method: Method,
        /// The topology.
        #[arg(long, short, value_parser = parse::<Shape>, default_value = "outbound-nat")]
        topology: Shape,
        /// Write the result as JSON (one object per side) to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        client: ClientCmdArgs,
        #[command(flatten)]
        scale: ScaleArgs,
    },
    /// Run every fault × method × topology with bounded parallelism and print the table.
    Matrix {
        /// Runs at once (most of a run is waiting, so more than the core count is fine).
        #[arg(long, short, default_value_t = 16)]
        jobs: usize,
        /// Only these faults (repeatable). Default: all.
        #[arg(long = "fault", value_parser = parse::<Fault>)]
        faults: Vec<Fault>,
        /// Only these methods (repeatable). Default: all.
        #[arg(long = "method", value_parser = parse::<Method>)]
        methods: Vec<Method>,
        /// Only these topologies (repeatable). Default: both.
        #[arg(long = "topology", value_parser = parse::<Shape>)]
        topologies: Vec<Shape>,
        /// Write one JSON object per cell and side to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write matrix.md (table) and matrix.svg (chart) into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        client: ClientCmdArgs,
        #[command(flatten)]
        scale: ScaleArgs,
    },
    /// One side of a lab connection in its own process (used by process-crash).
    #[command(hide = true)]
    Peer {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Bring your own client (docs/LAB.md, "Bring your own client").
#[derive(Args, Debug)]
struct ClientCmdArgs {
    /// Measure your own client: run this command in the client namespace against a tether
    /// server with the lab's policy, as method `client-cmd` (`{server}` becomes HOST:PORT; it
    /// prints READY / RECEIVED / DETECTED `<reason>`, see docs/LAB.md). With it, `matrix` runs
    /// only `client-cmd` unless --method is given too.
    #[arg(long, value_name = "CMD")]
    client_cmd: Option<String>,
}

impl ClientCmdArgs {
    fn command(&self) -> anyhow::Result<Option<ClientCommand>> {
        Ok(match &self.client_cmd {
            Some(c) => Some(ClientCommand::new(c.clone())?),
            None => None,
        })
    }
}

/// The lab's time scale.
#[derive(Args, Debug)]
struct ScaleArgs {
    /// The router's idle timeout (whole seconds: the kernel's conntrack timeout unit).
    #[arg(long, value_name = "DURATION", default_value = "4s", value_parser = duration::parse)]
    middlebox_timeout: Duration,
    /// The detection bound every method is configured for.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = duration::parse)]
    bound: Duration,
    /// How long to wait before reporting "not detected".
    #[arg(long, value_name = "DURATION", default_value = "12s", value_parser = duration::parse)]
    cap: Duration,
    /// One lab second stands for this many real seconds (for the printed scale only).
    #[arg(long, default_value_t = 60)]
    scale_factor: u32,
}

impl ScaleArgs {
    fn scale(&self) -> anyhow::Result<Scale> {
        let t = self.middlebox_timeout;
        if t.subsec_nanos() != 0 || t.is_zero() {
            return Err(UsageError(format!(
                "invalid value for --middlebox-timeout: {} (whole seconds, at least 1s)",
                duration::Human(t)
            ))
            .into());
        }
        let scale = Scale {
            factor: self.scale_factor,
            middlebox_timeout: t,
            bound: self.bound,
            cap: self.cap,
        };
        scale
            .validate()
            .map_err(|e| UsageError(format!("invalid value for the lab scale: {e}")))?;
        Ok(scale)
    }
}

fn or_all<T: Copy>(chosen: Vec<T>, all: &[T]) -> Vec<T> {
    if chosen.is_empty() {
        all.to_vec()
    } else {
        chosen
    }
}

fn parse<T: std::str::FromStr<Err = tether_lab::LabError>>(s: &str) -> Result<T, String> {
    s.parse::<T>().map_err(|e| e.to_string())
}

fn lab(scale: Scale, client: Option<ClientCommand>) -> anyhow::Result<Lab> {
    let exe = std::env::current_exe().context("cannot find the tether executable")?;
    let mut lab = Lab::new(scale).peer(PeerCommand::new(exe, &["lab", "peer"]));
    if let Some(c) = client {
        lab = lab.client_command(c);
    }
    lab.check()?;
    Ok(lab)
}

/// Runs `tether lab`.
pub(crate) fn run(args: LabArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        LabCommand::List => {
            list();
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Peer { args } => Ok(tether_lab::peer_main(&args)),
        LabCommand::Run {
            fault,
            method,
            topology,
            json,
            client,
            scale,
        } => {
            let scale = scale.scale()?;
            let client = client.command()?;
            let method = if client.is_some() {
                Method::ClientCmd
            } else {
                method
            };
            let lab = lab(scale, client)?;
            println!("{}", scale.describe());
            let cell = Cell {
                fault,
                method,
                shape: topology,
            };
            eprintln!("running {cell} …");
            let result = lab.run_cell(cell)?;
            let bound = result
                .bound
                .map(|b| format!("{:.1}s", b.as_secs_f64()))
                .unwrap_or_else(|| "none".into());
            println!("{cell}  (bound {bound})");
            for role in [tether_lab::Role::Client, tether_lab::Role::Server] {
                println!("  {role:<6}  {}", report::short(result.side(role)));
            }
            let results = [result];
            if let Some(path) = json {
                report::write_json(&results, &scale, &path)?;
            }
            Ok(checks(&results))
        }
        LabCommand::Matrix {
            jobs,
            faults,
            methods,
            topologies,
            json,
            out,
            client,
            scale,
        } => {
            let scale = scale.scale()?;
            let client = client.command()?;
            let methods = match &client {
                Some(_) => methods.into_iter().chain([Method::ClientCmd]).collect(),
                None => or_all(methods, &Method::ALL),
            };
            let lab = lab(scale, client)?;
            let cells = tether_lab::cells(
                &or_all(faults, &Fault::ALL),
                &methods,
                &or_all(topologies, &Shape::ALL),
            );
            println!("{}", scale.describe());
            let started = Instant::now();
            let tty = std::io::stderr().is_terminal();
            let progress = |p: &Progress| {
                let mut err = std::io::stderr().lock();
                let line = format!(
                    "[{:>3}/{} {:>4.0}s] {}",
                    p.done,
                    p.total,
                    p.elapsed.as_secs_f64(),
                    p.cell
                );
                let _ = if tty {
                    write!(err, "\r\x1b[2K{line}")
                } else {
                    writeln!(err, "{line}")
                };
                let _ = err.flush();
            };
            let results = lab.run_matrix(&cells, jobs, &progress)?;
            let wall = started.elapsed();
            if tty {
                eprintln!();
            }
            print!("{}", report::text_table(&results, &scale));
            println!("\n{}", report::LEGEND);
            println!(
                "\n{} cells, wall time {:.0} s ({} jobs)",
                results.len(),
                wall.as_secs_f64(),
                jobs
            );
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            if let Some(path) = json {
                report::write_json(&results, &scale, &path)?;
                println!("wrote {}", path.display());
            }
            if let Some(dir) = out {
                report::write_dir(&results, &scale, &dir, &command, wall)?;
                println!("wrote {}/matrix.md and matrix.svg", dir.display());
            }
            Ok(checks(&results))
        }
    }
}

/// Prints the checks and returns the exit code (0 passed, 4 failed).
fn checks(results: &[tether_lab::CellResult]) -> ExitCode {
    let failures = report::check(results);
    if failures.is_empty() {
        println!("checks passed: tether within its bound + 25% (or survived); no death on the healthy control");
        ExitCode::SUCCESS
    } else {
        println!("CHECKS FAILED:");
        for f in &failures {
            println!("  {f}");
        }
        Exit::CheckFailed.into()
    }
}

fn list() {
    println!("faults:");
    for f in Fault::ALL {
        println!("  {:<14} {}", f.name(), f.models());
        if f != Fault::None {
            println!("  {:<14} source: {}", "", f.source());
        }
    }
    println!("\nmethods:");
    for m in Method::SELECTABLE {
        println!("  {:<14} {}", m.name(), m.describe());
    }
    println!("\ntopologies:");
    for s in Shape::ALL {
        println!("  {:<14} {}", s.name(), s.describe());
    }
    println!("\ndefault {}", Scale::default().describe());
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        s: ScaleArgs,
    }

    #[test]
    fn every_time_flag_takes_a_duration() {
        let t = T::try_parse_from([
            "t",
            "--bound",
            "3s",
            "--cap",
            "1m",
            "--middlebox-timeout",
            "4s",
        ])
        .unwrap();
        let s = t.s.scale().unwrap();
        assert_eq!(
            (s.bound, s.cap),
            (Duration::from_secs(3), Duration::from_secs(60))
        );
        let t = T::try_parse_from(["t", "--bound", "2.5"]).unwrap();
        assert_eq!(
            t.s.bound,
            Duration::from_millis(2500),
            "a bare number is seconds"
        );
        let e = T::try_parse_from(["t", "--bound", "soon"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("\"soon\""), "{e}");
        let t = T::try_parse_from(["t", "--middlebox-timeout", "4.5s"]).unwrap();
        let e = t.s.scale().unwrap_err();
        assert_eq!(crate::exit::classify(&e), Exit::Usage, "{e}");
    }
}
