//! Connections that die after the handshake, for the always-on agent: the [`crate::mtu`] pods
//! published in the Kubernetes API stand-in, a policy change that cuts flows already
//! established, and a quiet background (no IPv6 neighbour discovery) so that the agent's event
//! count shows what a transfer costs.

use anyhow::Result;

use crate::{
    kubeapi::{FakeKube, Kind, pod},
    mtu::Pods,
};

/// The comment of the rule [`cut_flows`] inserts.
pub const CUT_COMMENT: &str = "cut-existing-flows";

/// Publishes both pods on `node` (the server declaring its port 9500).
pub fn publish(kube: &FakeKube, p: &Pods, node: &str) {
    for (pod_of, id, ports) in [
        (&p.client, "c0c0c0c0c0c0c0c0", &[][..]),
        (&p.server, "5e5e5e5e5e5e5e5e", &[9500][..]),
    ] {
        kube.apply(
            Kind::Pod,
            pod(
                &pod_of.namespace,
                &pod_of.name,
                node,
                &pod_of.ip.to_string(),
                &[(pod_of.name.as_str(), id, ports)],
            ),
        );
    }
}

/// A policy change on the node: the server's port is cut in FORWARD with `target` (`DROP`, or
/// `REJECT --reject-with tcp-reset`), established flows included.
pub fn cut_flows(p: &Pods, target: &str) -> Result<()> {
    p.lab.sh(
        p.lab.node(),
        &format!(
            "iptables -I FORWARD -p tcp --dport 9500 -m comment --comment {CUT_COMMENT} -j {target}"
        ),
    )?;
    Ok(())
}

/// No IPv6 on the node and in both pods (router and neighbour solicitations are the lab's only
/// background packets).
pub fn without_ipv6(p: &Pods) -> Result<()> {
    for ns in [
        p.lab.node(),
        p.client.netns.as_str(),
        p.server.netns.as_str(),
    ] {
        p.lab.sh(
            ns,
            "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1",
        )?;
    }
    Ok(())
}

/// Segments the kernel sent again on `s` so far (`TCP_INFO`'s `tcpi_total_retrans`): fast
/// retransmits and loss probes included.
pub fn total_retrans(s: &std::net::TcpStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket fd, a buffer of `len` bytes the kernel fills.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(info.tcpi_total_retrans)
    } else {
        Err(std::io::Error::last_os_error())
    }
}
