//! Attribution: who is behind the rule that dropped or rejected a packet, in the words of the
//! system that made it. One module per CNI ([`cni`]) holds that system's chain names, comment
//! formats, interface naming, explanations and next steps; the verdict engine only asks.

pub mod cni;
pub mod rules;

use serde::{Deserialize, Serialize};

use crate::model::{Backend, Cni, NfAction, OwnerSystem};

/// The Kubernetes (or other) object behind a rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Owner {
    /// `calico`, `kube-proxy`, `kube-router`, `flannel`, `user`.
    pub system: OwnerSystem,
    /// What kind of rule it is, e.g. `calico-end-of-tier-deny`, `kube-proxy-no-endpoints`.
    pub kind: String,
    /// Policies in force (namespace/name) where the rule is a policy default deny.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// `namespace/name[:port]` of a Service, `namespace/pod` of a pod, when the rule names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// Host-side interface of the workload, for Calico per-endpoint chains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// `namespace/pod` behind that interface (from the inventory: Calico names it
    /// `cali` + sha1("<namespace>.<pod>")[:11]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Every network-policy engine filtering pod traffic on this node, when more than one does
    /// and this rule is one of theirs: a flow must be admitted by each (k3s's embedded
    /// kube-router policy controller left running beside Calico after a migration).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_engines: Vec<Cni>,
    /// One sentence for a human.
    pub explanation: String,
    /// Appended to the explanation whenever it is rendered again (iptables-legacy: the other
    /// rules whose counters moved meanwhile). Not part of the JSON: it is in `explanation`.
    #[serde(skip)]
    pub note: String,
}

impl Owner {
    pub fn new(system: impl Into<OwnerSystem>, kind: &str, explanation: String) -> Self {
        Self {
            system: system.into(),
            kind: kind.into(),
            policies: Vec::new(),
            object: None,
            interface: None,
            workload: None,
            policy_engines: Vec::new(),
            explanation,
            note: String::new(),
        }
    }

    /// Adds a remark to the explanation, kept when the explanation is rendered again.
    pub fn add_note(&mut self, note: &str) {
        self.note.push_str(note);
        self.explanation.push_str(note);
    }
}

/// One step of a packet's way through netfilter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Step {
    pub table: String,
    pub chain: String,
    /// Rule handle; absent for a chain policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub verdict: String,
}

/// The rule that decided a packet's fate, and why it exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Netfilter {
    /// `iptables-nft` (iptables rules in nf_tables), `nftables` (native), `iptables-legacy`.
    pub backend: Backend,
    /// nf_tables family of the table: `ip`, `ip6`, `inet`.
    pub family: String,
    /// Netfilter hook of the base chain the packet entered: `prerouting`, `input`, `forward`, …
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    pub table: String,
    pub chain: String,
    /// nf_tables rule handle (absent when a chain policy decided).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<u64>,
    /// 1-based position in the chain (as `iptables -L --line-numbers`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    /// Full rule text (iptables-save syntax for iptables-nft tables, nft syntax otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub comments: Vec<String>,
    /// `drop` or `reject`.
    pub action: NfAction,
    /// What the client application sees: `timeout` (silent drop), `connection refused`,
    /// `no route to host`.
    pub client_sees: String,
    /// Chains and rules the packet went through before, in order.
    pub path: Vec<Step>,
    pub owner: Owner,
    /// How the rule was found; absent: `trace`.
    #[serde(default, skip_serializing_if = "Evidence::is_trace")]
    pub evidence: Evidence,
}

/// How netprobe knows which rule decided.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Evidence {
    /// An nftables trace of the packet: `path` shows its way to the rule.
    #[default]
    Trace,
    /// The rule's packet counter moved when the kernel dropped the packet (a REJECT, a drop
    /// never retried, iptables-legacy): `path` is empty, the way there is unknown.
    Counters,
}

impl Evidence {
    pub fn is_trace(&self) -> bool {
        *self == Self::Trace
    }
}
