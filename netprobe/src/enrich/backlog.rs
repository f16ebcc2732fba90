//! A full accept queue (listen overflow). The kernel drops a SYN to a listener whose accept queue
//! is full in `tcp_conn_request` and frees it as consumed, not dropped: no drop event, and the
//! client's timeout looks like silence. What shows it is the listener's queue (sock_diag:
//! `idiag_rqueue` = connections waiting for accept(), `idiag_wqueue` = the backlog) and the
//! TcpExt counters of the server's namespace, read when a timeout is judged.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::listeners::{Listener, listeners_in};
use crate::{error::Result, netlink, netns::NetnsRef};

/// A listener whose accept queue is full, and its namespace's overflow counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ListenQueue {
    pub listener: Listener,
    /// The namespace of the listener.
    pub netns: String,
    /// Connections established and waiting for the server to accept() them.
    pub accept_queue: u32,
    /// The listen backlog (listen()'s argument, capped by `net.core.somaxconn`); the queue is
    /// full when it holds more than this.
    pub backlog: u32,
    /// TcpExt `ListenOverflows` and `ListenDrops` of the namespace, since it was created.
    pub listen_overflows: u64,
    pub listen_drops: u64,
    /// `net.ipv4.tcp_syncookies` in the namespace (0 off, 1 on flood, 2 always).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syncookies: Option<u8>,
    /// TcpExt `SyncookiesSent` of the namespace.
    pub syncookies_sent: u64,
}

/// What one namespace shows about a listener of `dst:port`, read inside it.
struct Reading {
    listener: netlink::ListenSocket,
    netstat: String,
    syncookies: Option<u8>,
}

/// The full listener that takes connections to `dst:port` in `ns`, if `dst` is an address of
/// `ns` and that listener's queue is full (or overflowed and is still at its backlog).
pub fn full_queue(ns: &NetnsRef, dst: IpAddr, port: u16) -> Result<Option<ListenQueue>> {
    let Some(r) = ns.run(|| read_listener(dst, port))?? else {
        return Ok(None);
    };
    let (overflows, drops, cookies_sent) = (
        tcp_ext(&r.netstat, "ListenOverflows").unwrap_or(0),
        tcp_ext(&r.netstat, "ListenDrops").unwrap_or(0),
        tcp_ext(&r.netstat, "SyncookiesSent").unwrap_or(0),
    );
    let (queue, backlog) = (r.listener.rqueue, r.listener.wqueue);
    if !is_full(queue, backlog, overflows) {
        return Ok(None);
    }
    let owner = listeners_in(ns)
        .ok()
        .and_then(|ls| {
            ls.into_iter()
                .find(|l| (l.addr, l.port) == (r.listener.addr, r.listener.port))
        })
        .unwrap_or(bare(&r.listener));
    Ok(Some(ListenQueue {
        listener: owner,
        netns: ns.name.clone(),
        accept_queue: queue,
        backlog,
        listen_overflows: overflows,
        listen_drops: drops,
        syncookies: r.syncookies,
        syncookies_sent: cookies_sent,
    }))
}

/// Is `dst` served on this node, as the calling thread's namespace routes it: to a pod's veth,
/// or locally (lo)? Servers elsewhere have no accept queue to read here.
pub fn served_here(dst: IpAddr) -> bool {
    let Ok(Some(route)) = netlink::route_to(dst) else {
        return false;
    };
    let Ok(links) = netlink::links() else {
        return false;
    };
    route
        .oif
        .and_then(|i| links.iter().find(|l| l.index == i))
        .is_some_and(|l| l.name == "lo" || l.kind.as_deref() == Some("veth"))
}

/// The kernel refuses new SYNs when the queue holds more than the backlog
/// (`sk_acceptq_is_full`); a queue at its backlog after overflows is as good as full.
fn is_full(queue: u32, backlog: u32, overflows: u64) -> bool {
    queue > backlog || (queue == backlog && overflows > 0)
}

/// Runs inside the namespace: the listener of `dst:port` when `dst` is local there, with the
/// namespace's counters (`/proc/thread-self`: this thread is the one in the namespace).
fn read_listener(dst: IpAddr, port: u16) -> Result<Option<Reading>> {
    if !netlink::addresses()?.contains(&dst) {
        return Ok(None);
    }
    let Some(listener) = netlink::tcp_listeners()?
        .into_iter()
        .filter(|s| s.port == port && accepts(s, dst))
        // A socket bound to the address wins over a wildcard one.
        .max_by_key(|s| !s.addr.is_unspecified())
    else {
        return Ok(None);
    };
    Ok(Some(Reading {
        listener,
        netstat: std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default(),
        syncookies: std::fs::read_to_string("/proc/sys/net/ipv4/tcp_syncookies")
            .ok()
            .and_then(|s| s.trim().parse().ok()),
    }))
}

fn accepts(s: &netlink::ListenSocket, dst: IpAddr) -> bool {
    bare(s).accepts(dst, s.port)
}

/// The listener of a socket whose owner is not known.
fn bare(s: &netlink::ListenSocket) -> Listener {
    Listener {
        addr: s.addr,
        port: s.port,
        v6only: s.v6only,
        pid: None,
        comm: None,
        container: None,
    }
}

/// A `TcpExt:` counter of /proc/net/netstat (a line of names, then a line of values).
fn tcp_ext(netstat: &str, name: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let i = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_ext_counters_by_name() {
        let netstat = "TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops\n\
                       TcpExt: 3 0 6 7\n\
                       IpExt: InNoRoutes\nIpExt: 1\n";
        assert_eq!(tcp_ext(netstat, "ListenOverflows"), Some(6));
        assert_eq!(tcp_ext(netstat, "ListenDrops"), Some(7));
        assert_eq!(tcp_ext(netstat, "SyncookiesSent"), Some(3));
        assert_eq!(tcp_ext(netstat, "InNoRoutes"), None);
    }

    #[test]
    fn full_is_more_than_the_backlog() {
        assert!(is_full(2, 1, 0));
        assert!(is_full(1, 1, 4), "at its backlog after overflows");
        assert!(!is_full(1, 1, 0));
        assert!(!is_full(0, 128, 9));
    }
}
