//! Who listens in a namespace: TCP listening sockets (or bound UDP sockets) from sock_diag, with the owning process
//! (found by socket inode in /proc/PID/fd of processes in that namespace). The evidence behind
//! "nothing listens on 127.0.0.1:9500 in this pod".

use std::{collections::HashMap, net::IpAddr, os::unix::fs::MetadataExt};

use serde::{Deserialize, Serialize};

use crate::{error::Result, netlink, netns::NetnsRef};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Listener {
    pub addr: IpAddr,
    pub port: u16,
    /// An IPv6 socket that refuses IPv4 connections.
    pub v6only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// Container of the owning process, when the inventory knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

impl Listener {
    /// Would a connection to `dst:port` reach this socket?
    pub fn accepts(&self, dst: IpAddr, port: u16) -> bool {
        if self.port != port {
            return false;
        }
        match (self.addr, dst) {
            (IpAddr::V4(a), IpAddr::V4(d)) => a.is_unspecified() || a == d,
            (IpAddr::V6(a), IpAddr::V6(d)) => a.is_unspecified() || a == d,
            // A dual-stack [::] socket takes IPv4 too; [::ffff:a.b.c.d] takes that address.
            (IpAddr::V6(a), IpAddr::V4(d)) => {
                !self.v6only && (a.is_unspecified() || a.to_ipv4_mapped() == Some(d))
            }
            (IpAddr::V4(_), IpAddr::V6(_)) => false,
        }
    }

    /// `0.0.0.0:9001 (mlserver)`
    pub fn describe(&self) -> String {
        format!(
            "{}{}",
            self.endpoint(),
            self.comm
                .as_ref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        )
    }

    pub fn endpoint(&self) -> String {
        match self.addr {
            IpAddr::V4(a) => format!("{a}:{}", self.port),
            IpAddr::V6(a) => format!("[{a}]:{}", self.port),
        }
    }
}

/// socket inode → (pid, comm) for processes in the namespace with inode `netns`.
fn socket_owners(netns: u64) -> HashMap<u32, (u32, String)> {
    let mut out = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::metadata(p.path().join("ns/net"))
            .map(|m| m.ino())
            .ok()
            != Some(netns)
        {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let comm = std::fs::read_to_string(p.path().join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && let Some(ino) = target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse().ok())
            {
                out.entry(ino).or_insert((pid, comm.clone()));
            }
        }
    }
    out
}

/// The TCP listeners of a namespace, with their processes.
pub fn listeners_in(ns: &NetnsRef) -> Result<Vec<Listener>> {
    with_owners(ns, ns.run(netlink::tcp_listeners)??)
}

/// The bound, unconnected UDP sockets of a namespace (what receives a datagram to its port),
/// with their processes.
pub fn udp_listeners_in(ns: &NetnsRef) -> Result<Vec<Listener>> {
    with_owners(ns, ns.run(netlink::udp_listeners)??)
}

fn with_owners(ns: &NetnsRef, sockets: Vec<netlink::ListenSocket>) -> Result<Vec<Listener>> {
    let owners = socket_owners(ns.inode);
    let mut out: Vec<Listener> = sockets
        .into_iter()
        .map(|s| {
            let owner = owners.get(&s.inode);
            Listener {
                addr: s.addr,
                port: s.port,
                v6only: s.v6only,
                pid: owner.map(|o| o.0),
                comm: owner.map(|o| o.1.clone()),
                container: None,
            }
        })
        .collect();
    out.sort_by_key(|l| (l.port, l.addr));
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(addr: &str, port: u16, v6only: bool) -> Listener {
        Listener {
            addr: addr.parse().unwrap(),
            port,
            v6only,
            pid: None,
            comm: None,
            container: None,
        }
    }

    #[test]
    fn which_listener_accepts_what() {
        let v4 = "127.0.0.1".parse().unwrap();
        assert!(l("127.0.0.1", 9500, false).accepts(v4, 9500));
        assert!(l("0.0.0.0", 9500, false).accepts(v4, 9500));
        assert!(l("::", 9500, false).accepts(v4, 9500));
        assert!(!l("::", 9500, true).accepts(v4, 9500), "v6only");
        assert!(
            !l("::1", 9500, false).accepts(v4, 9500),
            "[::1] is not 127.0.0.1"
        );
        assert!(!l("127.0.0.1", 9000, false).accepts(v4, 9500));
        assert!(!l("10.42.0.10", 9500, false).accepts(v4, 9500));
        assert_eq!(l("::1", 9500, false).endpoint(), "[::1]:9500");
    }
}
