//! What the node showed at a drop besides its reason: the tc programs on the hook that dropped
//! (TC_INGRESS/TC_EGRESS), the reverse-path filter and the route back (IP_RPFILTER). Read when
//! the drop is seen, in the namespace of the interface, since both change (programs are
//! replaced, sysctls and routes edited).

use serde::{Deserialize, Serialize};

/// A tc program attached on the hook where a packet was dropped (netprobe's own excluded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TcProgram {
    /// The program's name as the kernel keeps it (at most 15 characters).
    pub name: String,
    /// Kernel program id (`bpftool prog show id ID`).
    pub id: u32,
    /// Kernel program tag (hash of its instructions), 16 hex digits.
    pub tag: String,
    /// `tcx` (bpf_mprog link, 6.6+) or `clsact` (a `bpf` filter on the clsact qdisc).
    pub mode: String,
    /// `ingress` or `egress`.
    pub hook: String,
    /// Who installs programs named this way: `Calico` (`calico_*`, `cali_*`), `Cilium` (`cil_*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl TcProgram {
    /// The owner a program's name reveals.
    pub fn owner_of(name: &str) -> Option<&'static str> {
        if name.starts_with("calico_") || name.starts_with("cali_") {
            Some("Calico")
        } else if name.starts_with("cil_") {
            Some("Cilium")
        } else {
            None
        }
    }

    /// `cali_tc_drop (id 812, tag 3b18…, clsact egress, Calico)`.
    pub fn describe(&self) -> String {
        let owner = self
            .owner
            .as_deref()
            .map(|o| format!(", {o}"))
            .unwrap_or_default();
        format!(
            "{} (id {}, tag {}, {} {}{owner})",
            self.name, self.id, self.tag, self.mode, self.hook
        )
    }
}

/// Reverse-path filtering on the interface a packet came in on, and where the namespace routes
/// the packet's source instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RpFilter {
    /// The interface the packet came in on.
    pub interface: String,
    /// `net.ipv4.conf.all.rp_filter` (0 off, 1 strict, 2 loose).
    pub all: u8,
    /// `net.ipv4.conf.<interface>.rp_filter`; the higher of the two applies.
    pub iface: u8,
    /// The device the namespace routes the source address through; absent when it has no route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_back: Option<String>,
}

impl RpFilter {
    /// The mode that applies: the kernel takes the higher of `all` and the interface's.
    pub fn effective(&self) -> u8 {
        self.all.max(self.iface)
    }
}
