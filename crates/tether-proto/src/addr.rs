//! A socket address in 16 bytes (issue 17: per-connection records of a server holding many
//! idle clients). A [`SocketAddr`] takes 32 bytes, sized for IPv6 with its flow info and
//! scope; nearly every client of a server is IPv4. [`PackedAddr`] keeps an IPv4 address
//! inline and boxes an IPv6 one whole, and carries one flag of its owner's in the padding
//! (the presence registry's "suspect").

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

/// A [`SocketAddr`] and one flag in 16 bytes (see the module docs). The flag starts false.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedAddr(Repr);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Repr {
    V4(SocketAddrV4, bool),
    V6(Box<SocketAddrV6>, bool),
}

impl PackedAddr {
    /// `a`, with the flag false. An IPv6 address is boxed (one allocation).
    pub fn new(a: SocketAddr) -> Self {
        PackedAddr(match a {
            SocketAddr::V4(a) => Repr::V4(a, false),
            SocketAddr::V6(a) => Repr::V6(Box::new(a), false),
        })
    }

    /// The address.
    pub fn get(&self) -> SocketAddr {
        match &self.0 {
            Repr::V4(a, _) => SocketAddr::V4(*a),
            Repr::V6(a, _) => SocketAddr::V6(**a),
        }
    }

    /// Replaces the address, keeping the flag.
    pub fn set(&mut self, a: SocketAddr) {
        let flag = self.flag();
        *self = PackedAddr::new(a);
        self.set_flag(flag);
    }

    /// The owner's flag.
    pub fn flag(&self) -> bool {
        match &self.0 {
            Repr::V4(_, f) | Repr::V6(_, f) => *f,
        }
    }

    /// Sets the owner's flag.
    pub fn set_flag(&mut self, to: bool) {
        match &mut self.0 {
            Repr::V4(_, f) | Repr::V6(_, f) => *f = to,
        }
    }
}

impl From<SocketAddr> for PackedAddr {
    fn from(a: SocketAddr) -> Self {
        PackedAddr::new(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_and_its_flag_round_trip_in_16_bytes() {
        assert_eq!(std::mem::size_of::<PackedAddr>(), 16);
        for a in [
            "192.0.2.7:4040",
            "[2001:db8::1]:443",
            "0.0.0.0:0",
            "[::1]:65535",
        ] {
            let a: SocketAddr = a.parse().expect("an address");
            let mut p = PackedAddr::new(a);
            assert_eq!(p.get(), a);
            assert!(!p.flag());
            p.set_flag(true);
            assert_eq!(p.get(), a);
            assert!(p.flag());
            let other: SocketAddr = "[2001:db8::2]:1".parse().expect("an address");
            p.set(other);
            assert_eq!((p.get(), p.flag()), (other, true), "set keeps the flag");
            p.set(a);
            p.set_flag(false);
            assert_eq!((p.get(), p.flag()), (a, false));
        }
        // IPv6 keeps its flow info and scope.
        let v6 = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().expect("ip"), 7, 9, 3));
        assert_eq!(PackedAddr::new(v6).get(), v6);
    }
}
