//! The typed model shared by events, the verdict engine, attribution and the sinks: what the
//! engine decides on is an enum, never a string. Serialized names are those of
//! `netprobe.event/v1` / `netprobe.verdict/v1`, unchanged (see `verdict/golden.rs`). [`trace`]
//! is the `Trace` custom resource, whose status carries verdicts and events.

mod drops;
mod endpoint;
mod names;
mod outcome;
mod packet;
mod peer;
mod route;
mod stamp;
pub mod stats;
pub mod trace;

use std::borrow::Cow;

pub use drops::{RpFilter, TcProgram};
pub use endpoint::Endpoint;
pub use names::Named;
pub(crate) use names::{by_name, fixed_names};
pub use outcome::{DnsFailureReason, Outcome};
pub use packet::{Direction, Family, Protocol, TcpFlag, TcpState, drop_reason};
pub use peer::Peer;
pub use route::{Encap, RouteHint};
pub use stamp::{Observed, Written};

/// What a netfilter rule did to the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NfAction {
    Drop,
    Reject,
}
fixed_names!(NfAction { Drop => "drop", Reject => "reject" });

/// How the ruleset that decided is programmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// iptables rules in nf_tables.
    IptablesNft,
    /// Native nftables.
    Nftables,
    /// x_tables (iptables-legacy): counters, no trace.
    IptablesLegacy,
}
fixed_names!(Backend {
    IptablesNft => "iptables-nft",
    Nftables => "nftables",
    IptablesLegacy => "iptables-legacy",
});

/// A system that programs netfilter rules for Kubernetes networking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cni {
    Calico,
    KubeProxy,
    KubeRouter,
    Flannel,
}
fixed_names!(Cni {
    Calico => "calico",
    KubeProxy => "kube-proxy",
    KubeRouter => "kube-router",
    Flannel => "flannel",
});

/// Who installed a rule (`Owner.system`): one of the known systems, or a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OwnerSystem {
    Cni(Cni),
    User,
}

impl Named for OwnerSystem {
    fn name(&self) -> Cow<'static, str> {
        match self {
            Self::Cni(c) => c.name(),
            Self::User => Cow::Borrowed("user"),
        }
    }
    fn from_name(s: &str) -> Option<Self> {
        match s {
            "user" => Some(Self::User),
            other => Cni::from_name(other).map(Self::Cni),
        }
    }
}
by_name!(OwnerSystem);

impl From<Cni> for OwnerSystem {
    fn from(c: Cni) -> Self {
        Self::Cni(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Named + PartialEq + std::fmt::Debug>(name: &str) {
        let v = T::from_name(name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(v.name(), name);
    }

    #[test]
    fn names_round_trip() {
        for n in ["calico", "kube-proxy", "kube-router", "flannel", "user"] {
            round_trip::<OwnerSystem>(n);
        }
        for n in ["tcp", "udp", "icmp", "icmpv6", "ip-proto-47"] {
            round_trip::<Protocol>(n);
        }
        for n in ["ESTABLISHED", "SYN_SENT", "?", "NEW_SYN_RECV", "STATE_42"] {
            round_trip::<TcpState>(n);
        }
        for n in ["dropped", "rejected", "unanswered", "servfail", "refused"] {
            round_trip::<DnsFailureReason>(n);
        }
        assert_eq!(TcpState::from_number(2), TcpState::SynSent);
        assert_eq!(TcpState::from_number(99).name(), "STATE_99");
        assert_eq!(Protocol::from_number(132).name(), "ip-proto-132");
        assert_eq!(
            serde_json::to_string(&Backend::IptablesNft).unwrap(),
            "\"iptables-nft\""
        );
    }
}
