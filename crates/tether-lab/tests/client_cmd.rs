//! Bring your own client: the Python client of this repository (`clients/python/lab_client.py`)
//! run through `--client-cmd` in a real lab run. Needs root, the lab's tools and `python3`;
//! without them the test prints a loud SKIP line and passes.

use std::io::Write;
use std::path::PathBuf;

use tether_lab::report::BOUND_SLACK;
use tether_lab::{Cell, ClientCommand, Fault, Lab, Method, Outcome, PeerCommand, Scale, Shape};

fn skip(why: &str) {
    let line = format!("\nSKIP tether-lab client_cmd: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

#[test]
fn a_client_command_is_measured_like_tether() {
    if let Some(why) = tether_lab::skip_reason() {
        return skip(&why);
    }
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../clients/python/lab_client.py");
    let python = std::process::Command::new("python3")
        .arg("--version")
        .output();
    if python.map(|o| !o.status.success()).unwrap_or(true) {
        return skip("python3 not found");
    }
    let cmd = ClientCommand::new(format!("python3 {} {{server}}", script.display())).unwrap();
    let lab = Lab::new(Scale::default())
        .peer(PeerCommand::new(env!("CARGO_BIN_EXE_tether-lab-peer"), &[]))
        .client_command(cmd);
    let r = lab
        .run_cell(Cell {
            fault: Fault::Blackhole,
            method: Method::ClientCmd,
            shape: Shape::OutboundNat,
        })
        .expect("the run");
    let bound = r
        .bound
        .expect("client-cmd has the tether bound")
        .as_secs_f64();
    // Silence is declared dead after d; the last byte before the fault came at most one
    // heartbeat interval earlier, so detection comes between d - h and d after the fault.
    let h = lab.scale().policy().heartbeat_interval.as_secs_f64();
    for (side, o) in [("client", &r.client), ("server", &r.server)] {
        match o {
            Outcome::Detected { after, reason } => {
                assert_eq!(reason, "heartbeat-timeout", "{side}");
                let s = after.as_secs_f64();
                assert!(
                    s >= bound - h - 0.1 && s <= bound * BOUND_SLACK,
                    "{side} detected after {s:.2} s, bound {bound} s"
                );
            }
            other => panic!("{side}: {other:?}"),
        }
    }
    // Without a command, a client-cmd cell is an error, not a silent pass.
    let bare = Lab::new(Scale::default());
    assert!(bare
        .run_cell(Cell {
            fault: Fault::Blackhole,
            method: Method::ClientCmd,
            shape: Shape::OutboundNat,
        })
        .is_err());
}
