//! The lab's peer process (see `tether_lab::peer`): one side of a lab connection in its own
//! process, so that `process-crash` can SIGKILL it.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    tether_lab::peer_main(&args)
}
