//! TCP ports for the listeners a test starts (an agent's `--metrics-addr`): asked from the
//! kernel of the namespace the listener will live in, so a port never collides with anything
//! bound there (the API stand-in's ephemeral port, another run's agent), and never handed out
//! twice by this process, so tests running in parallel threads do not race for one port
//! between allocation and bind.

use std::{
    collections::HashSet,
    io,
    net::{Ipv4Addr, TcpListener},
    sync::Mutex,
};

use anyhow::{Result, bail};

use crate::in_netns;

/// Ports this process handed out (never reused within a run).
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
/// Attempts before giving up (the kernel repeating only ports we already handed out).
const ATTEMPTS: usize = 64;

/// A free port on 127.0.0.1 inside `netns`.
pub fn free_tcp(netns: &str) -> Result<u16> {
    in_netns(netns, free_tcp_here)?
}

/// A free port on 127.0.0.1 in this thread's namespace.
pub fn free_tcp_here() -> Result<u16> {
    let mut taken = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    pick(ephemeral_port, taken.get_or_insert_with(HashSet::new))
}

/// What the kernel gives a socket bound to port 0 (free at that moment).
fn ephemeral_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// The first port from `candidate` not in `taken`, recorded there.
fn pick(mut candidate: impl FnMut() -> io::Result<u16>, taken: &mut HashSet<u16>) -> Result<u16> {
    for _ in 0..ATTEMPTS {
        let port = candidate()?;
        if taken.insert(port) {
            return Ok(port);
        }
    }
    bail!("no free TCP port after {ATTEMPTS} attempts")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_never_handed_out_twice() {
        let mut offers = [5000, 5000, 5001, 5000, 5002].into_iter();
        let mut taken = HashSet::new();
        let mut next = || pick(|| Ok(offers.next().unwrap()), &mut taken).unwrap();
        assert_eq!([next(), next(), next()], [5000, 5001, 5002]);
    }

    #[test]
    fn gives_up_when_only_taken_ports_come() {
        let mut taken = HashSet::from([7]);
        assert!(pick(|| Ok(7), &mut taken).is_err());
        let err = pick(|| Err(io::Error::other("no socket")), &mut taken);
        assert!(err.is_err());
    }

    /// Distinct and real. (Whether a port is still free when bound is not asserted here: other
    /// tests of this binary run in parallel in the same namespace and the kernel may give one of
    /// them the port meanwhile — the lab's callers bind in their own namespace.)
    #[test]
    fn free_ports_are_distinct() {
        let ports: HashSet<u16> = (0..20).map(|_| free_tcp_here().unwrap()).collect();
        assert_eq!(ports.len(), 20);
        assert!(ports.iter().all(|p| *p > 0));
    }
}
