//! Two lab nodes joined by an underlay network, the way k3s nodes are: each node namespace gets
//! `eth0` on a bridge in a "wire" namespace (the switch between the machines), and reaches the
//! other node's pod CIDR either by plain routes or through a Flannel-style VXLAN device
//! (`flannel.1`, VNI 1, UDP 8472, static neighbour and FDB entries as flanneld writes them).
//! The wire namespace is not a node: what it drops (a firewall between the machines) no node
//! sees.

use anyhow::{Context, Result, bail};

use crate::{Lab, run};

/// How pod traffic crosses between the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlay {
    /// Host routes to the other node's pod CIDR via its underlay address.
    Routed,
    /// Flannel's VXLAN backend: `flannel.1`, VNI 1, UDP 8472 over `eth0`.
    Vxlan,
}

/// Underlay address of the first and second node.
pub const NODE_IPS: [&str; 2] = ["192.168.77.1", "192.168.77.2"];
/// VTEP MAC addresses of `flannel.1` on the first and second node.
const VTEP_MACS: [&str; 2] = ["02:00:00:77:00:01", "02:00:00:77:00:02"];
pub const VXLAN_PORT: u16 = 8472;

/// The wire between two lab nodes; deleted (and with it both nodes' `eth0`) on drop.
pub struct Underlay {
    wire: String,
}

/// `10.42.1.0/24` → `10.42.1.0`.
fn network(cidr: &str) -> Result<&str> {
    match cidr.split_once('/') {
        Some((net, bits)) if bits.parse::<u8>().is_ok_and(|b| b <= 32) => Ok(net),
        _ => bail!("not an IPv4 CIDR: {cidr}"),
    }
}

impl Underlay {
    /// Joins `a` (pods in `a_pods`) and `b` (pods in `b_pods`).
    pub fn connect(a: &Lab, a_pods: &str, b: &Lab, b_pods: &str, overlay: Overlay) -> Result<Self> {
        let wire = format!("{}-wire", a.node().trim_end_matches("-node"));
        if std::path::Path::new("/run/netns").join(&wire).exists() {
            let _ = run(&["ip", "netns", "del", &wire]);
        }
        run(&["ip", "netns", "add", &wire])?;
        let u = Self { wire };
        u.wire_up(a, b)
            .and_then(|_| u.overlay(a, a_pods, b, b_pods, overlay))
            .with_context(|| format!("joining {} and {}", a.node(), b.node()))?;
        Ok(u)
    }

    fn wire_up(&self, a: &Lab, b: &Lab) -> Result<()> {
        let w = &self.wire;
        a.sh(
            w,
            &format!(
                "ip link set lo up
                 ip link add br0 type bridge
                 ip link set br0 up
                 ip link add to-a type veth peer name eth0 netns {}
                 ip link add to-b type veth peer name eth0 netns {}
                 ip link set to-a master br0 up
                 ip link set to-b master br0 up",
                a.node(),
                b.node()
            ),
        )?;
        for (lab, ip) in [(a, NODE_IPS[0]), (b, NODE_IPS[1])] {
            lab.sh(
                lab.node(),
                &format!("ip addr add {ip}/24 dev eth0\nip link set eth0 up"),
            )?;
        }
        Ok(())
    }

    fn overlay(
        &self,
        a: &Lab,
        a_pods: &str,
        b: &Lab,
        b_pods: &str,
        overlay: Overlay,
    ) -> Result<()> {
        let sides = [(a, a_pods, b_pods, 0usize), (b, b_pods, a_pods, 1usize)];
        for (lab, own, other, i) in sides {
            let peer_ip = NODE_IPS[1 - i];
            let script = match overlay {
                Overlay::Routed => format!("ip route add {other} via {peer_ip} dev eth0"),
                Overlay::Vxlan => {
                    let (own_net, other_net) = (network(own)?, network(other)?);
                    format!(
                        "ip link add flannel.1 type vxlan id 1 local {} dev eth0 dstport {VXLAN_PORT} nolearning
                         ip link set flannel.1 address {} mtu 1450
                         ip addr add {own_net}/32 dev flannel.1
                         ip link set flannel.1 up
                         ip route add {other} via {other_net} dev flannel.1 onlink
                         ip neigh add {other_net} lladdr {} dev flannel.1 nud permanent
                         bridge fdb append {} dev flannel.1 dst {peer_ip}",
                        NODE_IPS[i],
                        VTEP_MACS[i],
                        VTEP_MACS[1 - i],
                        VTEP_MACS[1 - i],
                    )
                }
            };
            lab.sh(lab.node(), &script)?;
        }
        Ok(())
    }

    /// The wire namespace's name.
    pub fn wire(&self) -> &str {
        &self.wire
    }

    /// A firewall between the machines: drops bridged frames matching an nftables expression
    /// (e.g. `udp dport 8472`, `ip daddr 10.42.1.0/24`).
    pub fn block(&self, lab: &Lab, matching: &str) -> Result<()> {
        lab.sh(
            &self.wire,
            &format!(
                "nft add table bridge wire
                 nft add chain bridge wire forward '{{ type filter hook forward priority 0; }}'
                 nft add rule bridge wire forward {matching} drop"
            ),
        )
        .map(drop)
    }

    /// Removes the firewall between the machines.
    pub fn unblock(&self, lab: &Lab) -> Result<()> {
        lab.sh(&self.wire, "nft delete table bridge wire").map(drop)
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.wire]);
    }
}
