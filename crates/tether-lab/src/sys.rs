//! The host side of the lab: the root/tool preflight, running `ip`/`nft`/`conntrack`/`ss`,
//! and entering a network namespace from a thread.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::error::LabError;

/// The tools the lab runs, and the Debian/Ubuntu package each comes from.
pub(crate) const TOOLS: [(&str, &str); 4] = [
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("conntrack", "conntrack"),
    ("ss", "iproute2"),
];

/// Finds `tool` on `PATH`, then in the sbin directories (root's tools live there and a
/// user's `PATH` often lacks them).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Checks that the lab can run here: root (namespaces, nftables) and every tool present.
/// The result is computed once per process.
pub fn check_environment() -> Result<(), LabError> {
    static RESULT: OnceLock<Option<(&'static str, &'static str)>> = OnceLock::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LabError::NotRoot);
    }
    let missing = RESULT.get_or_init(|| {
        TOOLS
            .into_iter()
            .find(|(tool, _)| find_tool(tool).is_none())
    });
    match missing {
        Some((tool, package)) => Err(LabError::ToolMissing { tool, package }),
        None => Ok(()),
    }
}

fn tool_path(tool: &'static str) -> PathBuf {
    find_tool(tool).unwrap_or_else(|| PathBuf::from(tool))
}

/// Runs `tool args…` (with `stdin` fed in when given) and returns its stdout; a non-zero exit
/// is an error carrying the command line and stderr.
pub(crate) fn run(
    tool: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, LabError> {
    let command = format!("{tool} {}", args.join(" "));
    let mut cmd = Command::new(tool_path(tool));
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
        command: command.clone(),
        source,
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error shows up as the tool's failure below.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| LabError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if let Some(text) = stdin {
            stderr = format!("{stderr}\ninput was:\n{text}");
        }
        return Err(LabError::Command { command, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `tool args…` inside namespace `ns` (`ip netns exec`).
pub(crate) fn run_in(
    ns: &str,
    tool: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, LabError> {
    let tool = tool_path(tool);
    let tool = tool.to_string_lossy();
    let mut full = vec!["netns", "exec", ns, &tool];
    full.extend_from_slice(args);
    run("ip", &full, stdin)
}

/// Moves the calling thread into network namespace `name` (`/run/netns/NAME`). Sockets the
/// thread creates afterwards belong to that namespace and keep it for their whole life.
pub fn enter_netns(name: &str) -> io::Result<()> {
    let file = File::open(format!("/run/netns/{name}"))?;
    // SAFETY: setns takes a file descriptor and a flag; the descriptor is valid for the whole
    // call (`file` lives until the end of this function) and CLONE_NEWNET changes only the
    // calling thread's network namespace. No memory is shared with the kernel.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
