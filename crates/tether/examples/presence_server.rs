//! A presence server: prints who is online, who is suspect (silent past a heartbeat plus
//! margin), who is resuming (session held for a reconnect) and who went offline and why.
//!
//! ```text
//! cargo run -p tether --example presence_server -- 127.0.0.1:7300
//! cargo run -p tether --example client -- 127.0.0.1:7300 alice     # then kill it with -9
//! ```

use std::time::Duration;

use tether::duration::Human;
use tether::{PresenceKind, PresenceState, Server, ServerConfig};
use tokio::sync::broadcast::error::RecvError;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7300".into())
        .parse()?;
    let policy = tether::Policy::builder(Duration::from_secs(10)).build()?;
    let cfg = ServerConfig::new(listen)
        .policy(policy)
        .session_linger(Some(Duration::from_secs(20)));
    let mut server = Server::bind(cfg).await?;
    let handle = server.handle();
    let mut changes = handle.subscribe();
    println!("presence server on {}", server.local_addr());
    // Messages are not used here, but the event stream must be drained.
    tokio::spawn(async move { while server.next_event().await.is_some() {} });
    let mut roll_call = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            ch = changes.recv() => match ch {
                Ok(ch) => match &ch.to {
                    PresenceState::Online => println!("{} is online", ch.id),
                    PresenceState::Suspect => println!("{} is suspect (silent)", ch.id),
                    PresenceState::Resuming { reason, until, .. } => println!(
                        "{} is resuming ({reason}); session held for {}",
                        ch.id,
                        Human::ms(until.saturating_duration_since(ch.at))
                    ),
                    PresenceState::Offline { reason, silent_for, .. } => println!(
                        "{} is offline: {reason} (silent for {})",
                        ch.id,
                        Human::ms(*silent_for)
                    ),
                },
                Err(RecvError::Lagged(n)) => println!("({n} changes missed)"),
                Err(RecvError::Closed) => return Ok(()),
            },
            _ = roll_call.tick() => {
                let online: Vec<String> = handle
                    .clients()
                    .into_iter()
                    .filter(|c| c.state.kind() == PresenceKind::Online)
                    .map(|c| c.id)
                    .collect();
                let counts = handle.presence_counts();
                println!(
                    "online now: {online:?} ({} suspect, {} resuming, {} recently offline)",
                    counts.suspect, counts.resuming, counts.offline
                );
            }
        }
    }
}
