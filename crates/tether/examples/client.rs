//! A client that reconnects on its own and resumes its session: every line typed is sent,
//! exactly once even across reconnects; what the server sends is printed.
//!
//! ```text
//! cargo run -p tether --example client -- 127.0.0.1:7300 alice
//! ```
//!
//! It stops for good when the server says it was replaced (another client took the same
//! id) or refuses it for a reason retrying cannot fix, and says what may not have been
//! delivered.

use bytes::Bytes;
use tether::{Client, ClientConfig, ClientEvent};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:7300".into())
        .parse()?;
    let id = args.next().unwrap_or_else(|| "example-client".into());
    let mut client = Client::start(ClientConfig::new(addr, id));
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            ev = client.next_event() => match ev {
                Some(ClientEvent::Connected { welcome }) => println!(
                    "connected (heartbeat {:?}, session {})",
                    welcome.heartbeat,
                    if welcome.session.is_some() { "granted" } else { "off" }
                ),
                Some(ClientEvent::Resumed { replayed }) => println!("resumed; {replayed} message(s) sent again"),
                Some(ClientEvent::SessionLost { unacked }) => println!("session lost; may be missing: {unacked:?}"),
                Some(ClientEvent::Message(m)) => println!("< {}", String::from_utf8_lossy(&m)),
                Some(ClientEvent::Disconnected { disconnect }) => println!("disconnected: {}", disconnect.reason),
                Some(ClientEvent::Reconnecting { attempt, delay }) => println!("reconnecting (attempt {attempt}) in {delay:?}"),
                Some(ClientEvent::GaveUp { reason, unacked, unsent }) => {
                    println!("stopped: {reason}; may be missing: {unacked:?}; never sent: {}", unsent.len());
                    return Ok(());
                }
                Some(_) => {}
                None => return Ok(()),
            },
            line = lines.next_line() => match line? {
                Some(l) => client.send(Bytes::from(l.into_bytes())).await?,
                None => {
                    client.shutdown(std::time::Duration::from_secs(2)).await;
                    return Ok(());
                }
            },
        }
    }
}
