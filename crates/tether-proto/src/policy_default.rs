//! TEMPORARY until the policy branch lands: a default policy (30 s detection bound).
use std::time::Duration;

use crate::policy::{Keepalive, Policy};

impl Default for Policy {
    fn default() -> Self {
        Policy {
            heartbeat_interval: Duration::from_secs(10),
            dead_after: Duration::from_secs(30),
            idle_timeout: None,
            keepalive: Some(Keepalive {
                idle: Duration::from_secs(15),
                interval: Duration::from_secs(5),
                count: 3,
            }),
            user_timeout: Some(Duration::from_secs(30)),
            ping_interval: None,
        }
    }
}
