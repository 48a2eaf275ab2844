//! `tether connect` as a program people script, against the real binary: exit codes
//! (refused, not a tether server, replaced, undelivered), and a signal with stdin still open.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tether");

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port on 127.0.0.1 where nothing listens (bound, then released).
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `connect` with `input` on stdin (then EOF); returns (exit code, stderr).
fn connect_with_input(addr: &str, input: &str, extra: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(["connect", addr, "--id", "scripted", "--linger", "300ms"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (child.wait().unwrap().code(), err)
}

/// `tether serve` on free ports; returns it and its tether address.
fn serve(extra: &[&str]) -> (Kill, String, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--http", "off"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("serve logs");
    let addr = first
        .split("addr=")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .unwrap_or_else(|| panic!("no addr in {first}"))
        .to_owned();
    (Kill(child), addr, rx)
}

/// Waits for a log line containing every word of `words`.
fn wait_line(rx: &mpsc::Receiver<String>, words: &[&str], within: Duration) -> String {
    let t = Instant::now();
    let mut seen = Vec::new();
    while t.elapsed() < within {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            if words.iter().all(|w| l.contains(w)) {
                return l;
            }
            seen.push(l);
        }
    }
    panic!("no line with {words:?} within {within:?}; seen: {seen:#?}");
}

fn sigterm(child: &Child) {
    // SAFETY: kill(2) with a pid we spawned and still own (not yet waited for).
    let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(r, 0);
}

#[test]
fn a_message_sent_to_nothing_is_not_delivered_and_says_so() {
    let addr = format!("127.0.0.1:{}", closed_port());
    let started = Instant::now();
    let (code, err) = connect_with_input(&addr, "important\n", &[]);
    assert_eq!(code, Some(6), "exit 6: not delivered\n{err}");
    assert!(
        err.contains("1 of 1 message(s) read from stdin was not delivered")
            && err.contains("never connected"),
        "{err}"
    );
    // Ends after the linger and the close wait, not after a reconnect loop.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Without input there is nothing to lose: exit 0.
    let (code, err) = connect_with_input(&addr, "", &[]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn a_port_that_is_not_tether_is_not_a_success() {
    // A tiny HTTP server: answers anything with 400 and closes.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let (code, err) = connect_with_input(&addr, "important\n", &[]);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("not delivered"), "{err}");
    // What the peer said is on stderr, as the core reports it.
    assert!(
        err.contains("protocol-error") || err.contains("not a tether server"),
        "{err}"
    );
}

#[test]
fn refused_by_the_server_exits_3() {
    let (_serve, addr, rx) = serve(&["--max-connections", "1"]);
    let first = Kill(
        Command::new(BIN)
            .args(["connect", &addr, "--id", "one"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_line(&rx, &["one", "connected"], Duration::from_secs(10));
    let (code, err) = connect_with_input(&addr, "", &[]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("refused") && err.contains("server-full"),
        "{err}"
    );
    drop(first);
}

#[test]
fn sigterm_with_stdin_open_exits_within_2s() {
    let (_serve, addr, rx) = serve(&[]);
    for target in [addr.clone(), format!("127.0.0.1:{}", closed_port())] {
        let mut child = Kill(
            Command::new(BIN)
                .args(["connect", &target, "--id", "held"])
                .stdin(Stdio::piped()) // kept open: nobody presses Enter
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        if target == addr {
            wait_line(&rx, &["held", "connected"], Duration::from_secs(10));
        } else {
            std::thread::sleep(Duration::from_millis(500)); // in its reconnect loop
        }
        let t = Instant::now();
        sigterm(&child.0);
        let status = loop {
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "still running after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = t.elapsed();
        println!(
            "{target}: exited {:?} {took:?} after SIGTERM",
            status.code()
        );
        assert!(took < Duration::from_secs(2), "took {took:?} ({target})");
        assert_eq!(status.code(), Some(0), "{target}");
        if target == addr {
            wait_line(
                &rx,
                &["held", "disconnected", "client closing"],
                Duration::from_secs(5),
            );
        }
    }
}

#[test]
fn replaced_by_a_newer_connection_exits_5() {
    let (_serve, addr, rx) = serve(&[]);
    let mut older = Kill(
        Command::new(BIN)
            .args(["connect", &addr, "--id", "twin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_line(&rx, &["twin", "connected"], Duration::from_secs(10));
    let newer = Kill(
        Command::new(BIN)
            .args(["connect", &addr, "--id", "twin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    let status = loop {
        if let Some(s) = older.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the replaced client kept running"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    older
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(5), "{err}");
    assert!(
        err.contains("replaced") && err.contains("not reconnecting"),
        "{err}"
    );
    drop(newer);
}

/// Issue 11 §1: a line written right at start (before or during the handshake) is echoed at
/// once, not after a heartbeat interval (it took the default 10 s). Real sockets, so the bound
/// is loose: well under the 1 s heartbeat given to the server.
#[test]
fn a_line_written_at_start_is_echoed_at_once() {
    let (_serve, addr, _rx) = serve(&["--echo", "--detect-within", "3s"]);
    for _ in 0..3 {
        let t = Instant::now();
        let mut child = Kill(
            Command::new(BIN)
                .args(["connect", &addr, "--id", "quick"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Written at once; stdin stays open (a terminal).
        let mut stdin = child.0.stdin.take().unwrap();
        stdin.write_all(b"first words\n").unwrap();
        let out = child.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("no echo within 10 s");
        let took = t.elapsed();
        println!("echo of a line written at start: {took:?} (process start included)");
        assert_eq!(line, "first words");
        assert!(took < Duration::from_millis(900), "echoed after {took:?}");
        drop(stdin);
    }
}
