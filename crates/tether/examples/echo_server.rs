//! An echo server: every message comes back to its sender.
//!
//! ```text
//! cargo run -p tether --example echo_server -- 127.0.0.1:7300
//! cargo run -p tether --example client -- 127.0.0.1:7300 alice     # in another terminal
//! ```
//!
//! The echo never waits on a client (`try_send`): a client that sends but never reads is
//! closed as a slow consumer once what waits for it passes its bound, instead of stalling
//! everyone else.

use std::time::Duration;

use tether::duration::Human;
use tether::{Policy, SendError, Server, ServerConfig, ServerEvent};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7300".into())
        .parse()?;
    // Detect a vanished client within 30 s.
    let policy = Policy::builder(Duration::from_secs(30)).build()?;
    let mut server = Server::bind(ServerConfig::new(listen).policy(policy)).await?;
    let handle = server.handle();
    println!("echo server on {}", server.local_addr());
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            ev = server.next_event() => match ev {
                Some(ServerEvent::Connected { client_id, remote, .. }) => {
                    println!("{client_id}: connected from {remote}");
                }
                Some(ServerEvent::Message { client_id, msg, .. }) => {
                    match handle.try_send(&client_id, msg) {
                        Ok(()) => {}
                        Err(SendError::SlowConsumer(_)) => println!("{client_id}: does not read, closing"),
                        Err(e) => println!("{client_id}: not echoed: {e}"),
                    }
                }
                Some(ServerEvent::Disconnected { client_id, disconnect, .. }) => {
                    println!(
                        "{client_id}: disconnected ({}, silent for {})",
                        disconnect.reason,
                        Human::ms(disconnect.silent_for)
                    );
                }
                Some(_) => {}
                None => break,
            },
            _ = &mut stop => break,
        }
    }
    // Tell every client we are going (CLOSE going-away) and give them a moment.
    handle.shutdown(Duration::from_secs(2)).await;
    Ok(())
}
