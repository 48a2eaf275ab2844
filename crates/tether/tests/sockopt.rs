//! Socket options read back from the kernel (getsockopt) equal the policy's values, on both
//! an accepted and a connected socket. Loopback only.

use std::time::Duration;

use tether::sockopt::{self, SocketSettings};
use tether_proto::{Keepalive, Policy};
use tokio::net::{TcpListener, TcpStream};

/// Distinct, non-default values everywhere, so a swapped or ignored field shows.
fn policy() -> Policy {
    Policy {
        heartbeat_interval: Duration::from_secs(4),
        dead_after: Duration::from_secs(13),
        idle_timeout: None,
        keepalive: Some(Keepalive {
            idle: Duration::from_secs(7),
            interval: Duration::from_secs(3),
            count: 4,
        }),
        user_timeout: Some(Duration::from_millis(23_456)),
        ping_interval: None,
        ..Policy::default()
    }
}

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (connected.unwrap(), accepted.unwrap().0)
}

#[tokio::test]
async fn accepted_and_connected_sockets_read_back_the_policy() {
    let p = policy();
    let (connected, accepted) = pair().await;
    // Before: the kernel defaults differ from the policy (otherwise the test proves nothing).
    let before = sockopt::read_back(&accepted).unwrap();
    assert_ne!(before, SocketSettings::from_policy(&p));

    for (name, s) in [("connected", &connected), ("accepted", &accepted)] {
        sockopt::apply(s, &p).unwrap();
        let got = sockopt::read_back(s).unwrap();
        assert!(got.nodelay, "{name}: TCP_NODELAY");
        let ka = got
            .keepalive
            .unwrap_or_else(|| panic!("{name}: SO_KEEPALIVE off"));
        assert_eq!(ka.idle, Duration::from_secs(7), "{name}: TCP_KEEPIDLE");
        #[cfg(any(
            target_os = "linux",
            target_os = "android",
            target_vendor = "apple",
            target_os = "freebsd"
        ))]
        {
            assert_eq!(ka.interval, Duration::from_secs(3), "{name}: TCP_KEEPINTVL");
            assert_eq!(ka.count, 4, "{name}: TCP_KEEPCNT");
        }
        #[cfg(target_os = "linux")]
        assert_eq!(
            got.user_timeout,
            Some(Duration::from_millis(23_456)),
            "{name}: TCP_USER_TIMEOUT"
        );
        assert_eq!(got, SocketSettings::from_policy(&p), "{name}");
    }
}

#[tokio::test]
async fn options_survive_traffic_and_are_per_socket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = policy();
    let (mut connected, mut accepted) = pair().await;
    sockopt::apply(&connected, &p).unwrap();
    connected.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    accepted.read_exact(&mut b).await.unwrap();
    assert_eq!(
        sockopt::read_back(&connected).unwrap(),
        SocketSettings::from_policy(&p)
    );
    // The other end of the same connection was not touched.
    let other = sockopt::read_back(&accepted).unwrap();
    assert_eq!(other.keepalive, None);
}

#[tokio::test]
async fn a_policy_without_keepalive_or_user_timeout_turns_them_off() {
    let (connected, _accepted) = pair().await;
    sockopt::apply(&connected, &policy()).unwrap();
    let off = Policy {
        keepalive: None,
        user_timeout: None,
        ..policy()
    };
    sockopt::apply(&connected, &off).unwrap();
    let got = sockopt::read_back(&connected).unwrap();
    assert_eq!(got.keepalive, None);
    assert_eq!(got.user_timeout, None);
    assert!(got.nodelay);
    assert_eq!(got, SocketSettings::from_policy(&off));
}

#[tokio::test]
async fn default_policy_reads_back_too() {
    let (connected, accepted) = pair().await;
    let p = Policy::default();
    for s in [&connected, &accepted] {
        sockopt::apply(s, &p).unwrap();
        assert_eq!(
            sockopt::read_back(s).unwrap(),
            SocketSettings::from_policy(&p)
        );
    }
}
