//! The lab's errors.

use std::io;

/// Why a lab run could not be carried out. (A peer that is never detected is a result, not an
/// error: see [`Outcome`](crate::Outcome).)
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// Namespaces and nftables need root.
    #[error("the lab needs root (network namespaces, nftables): run it as root or with sudo")]
    NotRoot,
    /// A tool the lab runs is not installed.
    #[error("`{tool}` not found: install the {package} package (apt-get install {package})")]
    ToolMissing {
        /// The missing program.
        tool: &'static str,
        /// The package that provides it.
        package: &'static str,
    },
    /// A tool could not be started.
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A tool ran and failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Every lab slot (namespace names and address blocks) is taken.
    #[error(
        "no free lab slot: {live} lab namespaces exist (stale ones: `ip netns list | grep tlab`)"
    )]
    NoSlot {
        /// How many slots were tried.
        live: usize,
    },
    /// A thread could not enter its namespace.
    #[error("cannot enter namespace {name}")]
    Netns {
        /// The namespace.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A side of the connection failed before the fault (connect, accept, handshake).
    #[error("{role} side failed during setup: {message}")]
    Setup {
        /// `client` or `server`.
        role: &'static str,
        /// What went wrong.
        message: String,
    },
    /// `process-crash` needs the peer program and none was given or found.
    #[error("process-crash needs the lab peer program (tether-lab-peer or `tether lab peer`); none found")]
    NoPeerProgram,
    /// A bad name or setting.
    #[error("invalid {what}: {value:?} ({expected})")]
    Invalid {
        /// What was being parsed.
        what: &'static str,
        /// The value given.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// Writing a report failed.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Drawing the chart failed.
    #[error("cannot draw the chart: {0}")]
    Chart(String),
}
