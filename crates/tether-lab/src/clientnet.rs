//! A namespace of their own for a bench's load generators, joined to the root namespace by
//! one veth pair whose receive runs in kernel threads (`tether bench hold --clients-over
//! veth`).
//!
//! On loopback the kernel delivers a segment inside the sender's `send`: each answer a
//! server writes is received, queued and its client's thread woken on the server's CPU
//! time, which is its client's work on any real network. Here each end of the pair has GRO
//! on (veth then receives through NAPI), TSO and GSO off (veth takes only segments GRO
//! could merge through NAPI) and threaded NAPI (`/sys/class/net/IF/threaded`), so the
//! receive runs in `napi/IF-N` kernel threads, neither the server's nor its clients'. The
//! sender still pays its own TCP and IP output and the wake-up of the NAPI thread.
//!
//! ```text
//!   root namespace                       tlab{slot}r (the clients')
//!   server listens on base+1 ──veth── base+2 … base+14: the clients' source addresses
//!        tb{slot}s  (NAPI thread)         tb{slot}c  (NAPI thread)
//! ```
//!
//! The slot (its namespace name and its /28 in 198.18.0.0/15) is claimed as a lab
//! topology's is, so benches and lab runs never collide; dropping the net, or a SIGINT or
//! SIGTERM, deletes the namespace and with it the pair.

use std::net::Ipv4Addr;

use crate::error::LabError;
use crate::sys;
use crate::topology::{claim_slot, delete_netns, slot_addr};

/// The clients' source addresses: `base+2` to `base+14` of the slot's /28.
const CLIENT_ADDRS: u32 = 13;

/// A live client namespace (see the module's documentation). Dropping it deletes it.
#[derive(Debug)]
pub struct ClientNet {
    slot: u32,
    ns: String,
}

impl ClientNet {
    /// Creates the namespace, the veth pair and its addresses, and moves both ends' receive
    /// into NAPI threads. Needs root, `ip` and `ethtool`; names the missing one.
    pub fn create() -> Result<ClientNet, LabError> {
        if sys::find_tool("ethtool").is_none() {
            return Err(LabError::ToolMissing {
                tool: "ethtool",
                package: "ethtool",
            });
        }
        let slot = claim_slot()?;
        let net = ClientNet {
            slot,
            ns: format!("tlab{slot}r"),
        };
        // From here on `net`'s Drop deletes whatever was made.
        net.wire()?;
        Ok(net)
    }

    fn wire(&self) -> Result<(), LabError> {
        let (ns, server_if, client_if) = (&self.ns, self.server_if(), self.client_if());
        sys::run(
            "ip",
            &[
                "link", "add", &server_if, "type", "veth", "peer", "name", &client_if, "netns", ns,
            ],
            None,
        )?;
        let features = ["gro", "on", "tso", "off", "gso", "off"];
        let mut args = vec!["-K", server_if.as_str()];
        args.extend(features);
        sys::run("ethtool", &args, None)?;
        args[1] = client_if.as_str();
        sys::run_in(ns, "ethtool", &args, None)?;
        let root = format!(
            "addr add {}/28 dev {server_if}\nlink set {server_if} up\n",
            self.server_addr()
        );
        let mut clients = String::from("link set lo up\n");
        for i in 0..CLIENT_ADDRS as usize {
            clients += &format!("addr add {}/28 dev {client_if}\n", self.client_addr(i));
        }
        clients += &format!("link set {client_if} up\n");
        sys::run("ip", &["-batch", "-"], Some(&root))?;
        sys::run("ip", &["-n", ns, "-batch", "-"], Some(&clients))?;
        // NAPI instances exist once the device is up: only then can they be threaded.
        let threaded = |file: String| format!("echo 1 > {file} && test \"$(cat {file})\" = 1");
        sys::run(
            "sh",
            &[
                "-c",
                &threaded(format!("/sys/class/net/{server_if}/threaded")),
            ],
            None,
        )?;
        sys::run_in(
            ns,
            "sh",
            &[
                "-c",
                &threaded(format!("/sys/class/net/{client_if}/threaded")),
            ],
            None,
        )?;
        Ok(())
    }

    /// The clients' namespace (run a load generator in it with `ip netns exec`).
    pub fn netns(&self) -> &str {
        &self.ns
    }

    /// Where a server in the root namespace listens for the clients.
    pub fn server_addr(&self) -> Ipv4Addr {
        slot_addr(self.slot, 1)
    }

    /// The `i`-th of the clients' 13 source addresses (taken modulo 13).
    pub fn client_addr(&self, i: usize) -> Ipv4Addr {
        slot_addr(self.slot, 2 + (i as u32 % CLIENT_ADDRS))
    }

    /// The root namespace's end of the pair.
    pub fn server_if(&self) -> String {
        format!("tb{}s", self.slot)
    }

    /// The clients' end of the pair.
    pub fn client_if(&self) -> String {
        format!("tb{}c", self.slot)
    }
}

impl Drop for ClientNet {
    fn drop(&mut self) {
        // The pair goes with the namespace that holds one of its ends.
        delete_netns(std::slice::from_ref(&self.ns));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_in_the_slots_block() {
        let net = ClientNet {
            slot: 3,
            ns: "unused".into(),
        };
        assert_eq!(net.server_addr(), Ipv4Addr::new(198, 18, 0, 49));
        assert_eq!(net.client_addr(0), Ipv4Addr::new(198, 18, 0, 50));
        assert_eq!(net.client_addr(12), Ipv4Addr::new(198, 18, 0, 62));
        assert_eq!(net.client_addr(13), net.client_addr(0));
        assert_eq!(
            (net.server_if(), net.client_if()),
            ("tb3s".into(), "tb3c".into())
        );
        // Nothing was created: keep Drop from running `ip netns delete unused`.
        std::mem::forget(net);
    }
}
