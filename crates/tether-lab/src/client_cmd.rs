//! Bring your own client: any program, in any language, measured the way the matrix measures
//! tether's own client. The lab runs it in the client namespace against a tether server with
//! the lab's policy (the server dictates the heartbeat and dead-after of the scale) and reads
//! what it notices from its standard output.
//!
//! ```text
//!  lab ──sh -c "exec CMD"──▶ your client (in tlabNc)            tether server (in tlabNs)
//!        {server} = HOST:PORT ──connect, handshake, send "hello" ──▶ sends "hello"
//!                            ◀── stdout "READY"   (the server's "hello" arrived)
//!  stdin "SEND" ───────────▶ send one message
//!                            ◀── stdout "RECEIVED" (any later message from the server)
//!                            ◀── stdout "DETECTED <reason>"  (the connection is gone)
//!  stdin closed ───────────▶ exit
//! ```
//!
//! The contract, in full:
//!
//! 1. The command line is run with `sh -c` inside the client namespace; `{server}` is replaced
//!    by the server's `HOST:PORT`, `{host}` and `{port}` by its parts, and
//!    `TETHER_LAB_SERVER=HOST:PORT` is set in its environment.
//! 2. Connect to the server (tether protocol, any client id; a session is optional), then send
//!    one application message `hello`. The server sends `hello` too.
//! 3. Print `READY` on a line of its own once the server's first message arrived.
//! 4. Print `RECEIVED` for every later message from the server.
//! 5. For every line `SEND` on standard input, send one message (any payload).
//! 6. When the client learns that its connection is gone, print `DETECTED <reason>` (reason:
//!    free text, e.g. `heartbeat-timeout`). Only the first one counts; a reconnecting client may
//!    keep running.
//! 7. `FAILED <why>` reports a setup failure. Exit when standard input closes.
//!
//! Other output lines are ignored; standard error is passed through, prefixed with
//! `[client-cmd]`. The clients in `clients/` ship such a program (`lab_client.py`,
//! `cmd/labclient`, `lab/LabClient.cs`).

use std::net::SocketAddr;

use crate::error::LabError;

/// A user's client command line (`tether lab --client-cmd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCommand {
    template: String,
}

impl ClientCommand {
    /// A command line; `{server}`, `{host}` and `{port}` are filled in per run.
    pub fn new(template: impl Into<String>) -> Result<ClientCommand, LabError> {
        let template = template.into();
        if template.trim().is_empty() {
            return Err(LabError::Invalid {
                what: "client command",
                value: template,
                expected: "a command line, e.g. 'python3 my_client.py {server}'".into(),
            });
        }
        Ok(ClientCommand { template })
    }

    /// The command line as given.
    pub fn template(&self) -> &str {
        &self.template
    }

    /// The command line for a server at `server`.
    pub fn render(&self, server: SocketAddr) -> String {
        self.template
            .replace("{server}", &server.to_string())
            .replace("{host}", &server.ip().to_string())
            .replace("{port}", &server.port().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_in() {
        let c = ClientCommand::new("python3 c.py {server} --host {host} --port {port}").unwrap();
        let addr: SocketAddr = "198.18.0.6:7000".parse().unwrap();
        assert_eq!(
            c.render(addr),
            "python3 c.py 198.18.0.6:7000 --host 198.18.0.6 --port 7000"
        );
        assert!(ClientCommand::new("  ").is_err());
    }
}
