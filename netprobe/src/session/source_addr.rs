//! A client that sends from an address that is not its pod's IP (a secondary address, a
//! source-routing rule, spoofed traffic): the address names no pod, but the socket's network
//! namespace does. Said in the verdict, since it is usually why the packet was dropped
//! (reverse-path filtering, policies keyed by pod IP).

use std::net::IpAddr;

use crate::{
    enrich::{names::PodContext, pods::PodEntry},
    verdict::Verdict,
};

/// Names the client pod from its namespace when its address names none, and says that the
/// address is not the pod's.
pub fn name_client_by_netns(names: &PodContext, v: &mut Verdict, cgroup: Option<&str>) {
    if v.client.addr.is_loopback() || v.client.peer.as_ref().is_some_and(|p| p.is_known()) {
        return;
    }
    let Some(inode) = v
        .client
        .netns
        .as_deref()
        .and_then(|n| names.netns_inode(n).or_else(|| n.parse().ok()))
    else {
        return;
    };
    let inv = &names.inventory;
    let Some(pod) = inv
        .pod_in_netns(inode)
        .filter(|p| !p.ips.contains(&v.client.addr))
    else {
        return;
    };
    if let Some(ip) = pod.ips.first() {
        v.client.peer = Some(inv.peer(*ip, v.client.port, Some(inode), cgroup));
    }
    // A connect() whose route lookup failed had no source address yet: nothing to say of it.
    if v.client.addr.is_unspecified() {
        return;
    }
    let (why, next) = not_its_ip(pod, v.client.addr, v.server.addr);
    v.explanation.push_str(&why);
    v.next_steps.insert(0, next);
}

fn not_its_ip(pod: &PodEntry, addr: IpAddr, dst: IpAddr) -> (String, String) {
    let ips: Vec<String> = pod.ips.iter().map(ToString::to_string).collect();
    let (ns, name) = (&pod.namespace, &pod.name);
    (
        format!(
            " The source address {addr} is not the IP of pod {ns}/{name} ({}), which sent it from its network namespace.",
            ips.join(", ")
        ),
        format!(
            "find why pod {ns}/{name} sends from {addr} instead of its pod IP (a secondary address, a source-routing rule, or spoofed traffic): kubectl -n {ns} exec {name} -- ip route get {dst}"
        ),
    )
}
