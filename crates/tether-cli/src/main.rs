//! The `tether` command.
//!
//! Exit codes (also in `tether --help`; derived from the error's type in [`exit::classify`]):
//! 0 success; 1 runtime error; 2 bad arguments or configuration; 3 the server refused the
//! connection (`connect`); 4 a lab check failed (`lab`) or the result is inconclusive
//! (`probe`); 5 replaced by a newer connection with the same client id (`connect`); 6
//! messages read from stdin were not delivered (`connect`).

mod cluster;
mod cmd;
mod config;
mod exit;
mod gateway;
mod http;
mod http_auth;
mod log;
mod metrics;
mod security;
mod status;
mod token;

use cmd::{bench, connect, lab, plan, probe, proxy, serve, tunnel};

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// tether keeps long-lived TCP connections honest: both sides detect a dead peer within a
/// bound you choose, and idle connections survive NAT and load-balancer timeouts.
#[derive(Parser, Debug)]
#[command(name = "tether", version, about, long_about = None, propagate_version = true, after_help = exit::HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a server that knows who is online (status page, metrics, event log).
    Serve(Box<serve::ServeArgs>),
    /// Connect to a server: stdin lines out, messages in, reconnects on its own.
    Connect(connect::ConnectArgs),
    /// Turn a detection bound and a path's idle timeout into settings for tether and other stacks.
    #[command(long_about = plan::LONG_ABOUT)]
    Plan(plan::PlanArgs),
    /// Relay TCP to an upstream with keepalive on both legs; a dead leg closes the other at once.
    Proxy(proxy::ProxyArgs),
    /// Carry a program's TCP connections across a path that breaks (entry and exit).
    #[command(long_about = tunnel::LONG_ABOUT)]
    Tunnel(tunnel::TunnelArgs),
    /// Measure the idle timeout of the path to a `tether serve` (NAT, load balancer, firewall).
    #[command(long_about = probe::LONG_ABOUT)]
    Probe(probe::ProbeArgs),
    /// Benchmarks: idle clients held, dead-peer detection, echo; tether vs mosquitto and tokio.
    Bench(bench::BenchArgs),
    /// Reproduce middlebox failures in network namespaces and compare detection methods (root).
    Lab(lab::LabArgs),
    /// Print a signed HS256 token (for tests and small deployments).
    Token(token::TokenArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The subcommand's own matches: which flags were given (config layering).
    let sub = matches
        .subcommand()
        .map(|(_, m)| m.clone())
        .unwrap_or_default();
    init_tracing();
    let result = match cli.command {
        Command::Serve(a) => serve::run(*a, &sub),
        Command::Connect(a) => connect::run(a, &sub),
        Command::Plan(a) => plan::run(a),
        Command::Proxy(a) => proxy::run(a),
        Command::Lab(a) => lab::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Probe(a) => probe::run(a),
        Command::Tunnel(a) => tunnel::run(a),
        Command::Token(a) => token::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::classify(&e).into()
        }
    }
}
