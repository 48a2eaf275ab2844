//! Exit codes of the `tether` command, and how an error becomes one: by its type, never by
//! the words of its message.
//!
//! | code | meaning |
//! | ---: | --- |
//! | 0 | success |
//! | 1 | runtime error (cannot listen, I/O, gave up connecting, …) |
//! | 2 | bad arguments or configuration (a flag, a `TETHER_*` variable, a config file key) |
//! | 3 | `connect`: the server refused the connection (server-full, unauthorized, …) |
//! | 4 | `lab`: a check failed; `probe`: the result is inconclusive |
//! | 5 | `connect`: replaced by a newer connection with the same client id (terminal) |
//! | 6 | `connect`: messages read from stdin were not delivered |

use std::process::ExitCode;

use tether_proto::duration::DurationError;
use tether_proto::policy::PolicyError;
use tether_proto::presets::PathSpecError;

/// The help text listing the exit codes (`tether --help`).
pub(crate) const HELP: &str = "\
Exit codes:
  0  success
  1  runtime error (cannot listen, I/O, gave up connecting, ...)
  2  bad arguments or configuration (a flag, a TETHER_* variable, a config file key)
  3  connect: the server refused the connection (server-full, unauthorized, ...)
  4  lab: a check failed; probe: the result is inconclusive
  5  connect: replaced by a newer connection with the same client id
  6  connect: messages read from stdin were not delivered";

/// How the command ended (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// 0.
    Success,
    /// 1.
    Failure,
    /// 2.
    Usage,
    /// 3.
    Refused,
    /// 4.
    CheckFailed,
    /// 5.
    Replaced,
    /// 6.
    NotDelivered,
}

impl Exit {
    /// The process exit code.
    pub(crate) fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::Refused => 3,
            Exit::CheckFailed => 4,
            Exit::Replaced => 5,
            Exit::NotDelivered => 6,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

/// A bad argument or configuration value (exit 2). The message names the setting, where
/// the value came from, and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);

/// The exit code for an error: 2 when any error in its chain is a usage or configuration
/// error (ours, or the core's typed errors for policies, paths and durations), else 1.
pub(crate) fn classify(e: &anyhow::Error) -> Exit {
    let usage = e.downcast_ref::<UsageError>().is_some()
        || e.chain().any(|c| {
            c.is::<UsageError>()
                || c.is::<PolicyError>()
                || c.is::<PathSpecError>()
                || c.is::<DurationError>()
        });
    if usage {
        Exit::Usage
    } else {
        Exit::Failure
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn codes_come_from_types_not_words() {
        let io: anyhow::Error = std::io::Error::other("invalid value in config file").into();
        assert_eq!(
            classify(&io),
            Exit::Failure,
            "words do not make a usage error"
        );
        let usage: anyhow::Error = UsageError("bad".into()).into();
        assert_eq!(classify(&usage.context("while starting")), Exit::Usage);
        let ctx = Err::<(), _>(std::io::Error::other("x"))
            .context(UsageError("cannot read config file".into()))
            .unwrap_err();
        assert_eq!(classify(&ctx), Exit::Usage);
        let policy =
            tether_proto::policy::Policy::derive(std::time::Duration::from_millis(1), None)
                .context("the liveness settings are inconsistent")
                .unwrap_err();
        assert_eq!(classify(&policy), Exit::Usage);
        let codes: Vec<u8> = [
            Exit::Success,
            Exit::Failure,
            Exit::Usage,
            Exit::Refused,
            Exit::CheckFailed,
            Exit::Replaced,
            Exit::NotDelivered,
        ]
        .iter()
        .map(|e| e.code())
        .collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 5, 6]);
        for c in codes {
            assert!(HELP.contains(&format!("\n  {c}  ")), "{c} documented");
        }
    }
}
