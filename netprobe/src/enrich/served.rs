//! Who else serves a port: a container that dials 127.0.0.1:P reaches only its own pod, and the
//! usual reason nothing listens there is that P belongs to another pod or to a Service. The
//! other pods of this node are asked (sock_diag in their namespaces), the Services come from the
//! inventory.

use std::{cell::RefCell, net::IpAddr, time::Duration};

use super::{pods::Inventory, recent::Recent};
use crate::{netlink, netns};

/// A server of the port outside the refusing pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Elsewhere {
    /// `namespace`, `name`, the address it listens on.
    Pod(String, String, IpAddr),
    /// `namespace`, `name`, `portname` (as the inventory keys it), the ClusterIP.
    Service(String, String, String, IpAddr),
}

/// At most this many servers of each kind are named (a port shared by many pods, e.g. 8080).
const MAX_NAMED: usize = 3;

/// How long the pods found listening on a port are reused: an application that retries
/// 127.0.0.1 in a loop must not have every pod namespace of the node read at each refusal.
const REUSE_FOR: Duration = Duration::from_secs(10);
/// Ports remembered at most (then all are forgotten).
const MAX_REMEMBERED: usize = 256;

type Key = (u16, bool, Option<u64>);

thread_local! {
    static RECENT: RefCell<Recent<Key, Vec<Elsewhere>>> =
        RefCell::new(Recent::new(REUSE_FOR, MAX_REMEMBERED));
}

/// Pods of this node other than the one in namespace `except` that listen on `port` (on an
/// address other pods reach), then Services with that port.
pub fn serving(inv: &Inventory, port: u16, udp: bool, except: Option<u64>) -> Vec<Elsewhere> {
    let mut out = pods_listening_recently(inv, (port, udp, except));
    out.extend(
        inv.services_on_port(port)
            .into_iter()
            .filter_map(|(svc, ip)| {
                let (ns, rest) = svc.split_once('/')?;
                let (name, port_name) = rest.split_once(':').unwrap_or((rest, ""));
                Some(Elsewhere::Service(
                    ns.into(),
                    name.into(),
                    port_name.into(),
                    ip,
                ))
            })
            .take(MAX_NAMED),
    );
    out
}

/// [`pods_listening`], read again at most every [`REUSE_FOR`] per key (none beyond the reads
/// per second of [`Recent`]: the hint is left out, counted).
fn pods_listening_recently(inv: &Inventory, key: Key) -> Vec<Elsewhere> {
    RECENT
        .with_borrow_mut(|r| r.get_or(key, || pods_listening(inv, key.0, key.1, key.2)))
        .unwrap_or_default()
}

fn pods_listening(inv: &Inventory, port: u16, udp: bool, except: Option<u64>) -> Vec<Elsewhere> {
    let mut out = Vec::new();
    for ns in netns::veth_peers().unwrap_or_default() {
        if Some(ns.inode) == except {
            continue;
        }
        let Some(pod) = inv.pod_in_netns(ns.inode) else {
            continue;
        };
        let sockets = if udp {
            ns.run(netlink::udp_listeners)
        } else {
            ns.run(netlink::tcp_listeners)
        };
        let Ok(Ok(sockets)) = sockets else { continue };
        // Bound to loopback, it serves its own pod only.
        if sockets
            .iter()
            .any(|s| s.port == port && !s.addr.is_loopback())
        {
            let ip = pod
                .ips
                .first()
                .copied()
                .unwrap_or(IpAddr::from([0, 0, 0, 0]));
            out.push(Elsewhere::Pod(pod.namespace.clone(), pod.name.clone(), ip));
        }
        if out.len() == MAX_NAMED {
            break;
        }
    }
    out
}

impl Elsewhere {
    /// `pod team-b/api-0 (10.42.0.31:9004)`, `Service team-b/api (10.43.0.50:9004)`.
    pub fn describe(&self, port: u16) -> String {
        match self {
            Self::Pod(ns, name, ip) => format!("pod {ns}/{name} ({})", endpoint(*ip, port)),
            Self::Service(ns, name, _, ip) => {
                format!("Service {ns}/{name} ({})", endpoint(*ip, port))
            }
        }
    }

    /// What the client should dial instead: the Service's DNS name, or the pod's address.
    pub fn dial_instead(&self, port: u16) -> String {
        match self {
            Self::Pod(_, _, ip) => endpoint(*ip, port),
            Self::Service(ns, name, _, _) => format!("{name}.{ns}.svc:{port}"),
        }
    }

    /// A command that shows it.
    pub fn command(&self) -> String {
        match self {
            Self::Pod(ns, name, _) => format!("kubectl -n {ns} get pod {name} -o wide"),
            Self::Service(ns, name, _, _) => format!("kubectl -n {ns} get service {name}"),
        }
    }
}

fn endpoint(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// The sentence and next steps a refusal on a loopback address gets when `port` is served
/// elsewhere; None when it is not.
pub fn loopback_hint(
    servers: &[Elsewhere],
    dialled: IpAddr,
    port: u16,
) -> Option<(String, Vec<String>)> {
    let best = servers
        .iter()
        .find(|s| matches!(s, Elsewhere::Service(..)))
        .or(servers.first())?;
    let who: Vec<String> = servers.iter().map(|s| s.describe(port)).collect();
    let why = format!(
        " Port {port} is served by {}, not by this pod: {dialled} only reaches the containers of this pod.",
        who.join(" and ")
    );
    let mut next = vec![format!(
        "dial {} instead of {}: localhost is shared only by the containers of one pod",
        best.dial_instead(port),
        endpoint(dialled, port)
    )];
    next.extend(servers.iter().map(Elsewhere::command));
    Some((why, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_is_the_address_to_dial_and_every_server_is_named() {
        let servers = vec![
            Elsewhere::Pod(
                "team-b".into(),
                "api-0".into(),
                "10.42.0.31".parse().unwrap(),
            ),
            Elsewhere::Service(
                "team-b".into(),
                "api".into(),
                "http".into(),
                "10.43.0.50".parse().unwrap(),
            ),
        ];
        let (why, next) = loopback_hint(&servers, "127.0.0.1".parse().unwrap(), 9004).unwrap();
        assert_eq!(
            why,
            " Port 9004 is served by pod team-b/api-0 (10.42.0.31:9004) and Service team-b/api (10.43.0.50:9004), not by this pod: 127.0.0.1 only reaches the containers of this pod."
        );
        assert!(next[0].starts_with("dial api.team-b.svc:9004 instead of 127.0.0.1:9004"));
        assert!(next.contains(&"kubectl -n team-b get pod api-0 -o wide".to_string()));
        assert!(next.contains(&"kubectl -n team-b get service api".to_string()));
        assert_eq!(loopback_hint(&[], "::1".parse().unwrap(), 9004), None);
    }
}
