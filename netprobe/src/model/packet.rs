//! What a packet observation is: direction, address family, protocol, TCP flags and states,
//! and the kernel drop reasons the engine decides on.

use std::borrow::Cow;

use netprobe_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, tcp_flags};

use super::{Named, by_name, fixed_names};

/// Which way a packet passed a tc checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}
fixed_names!(Direction { Ingress => "ingress", Egress => "egress" });

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
}
fixed_names!(Family { Ipv4 => "ipv4", Ipv6 => "ipv6" });

impl Family {
    pub fn of(addr: std::net::IpAddr) -> Self {
        if addr.is_ipv4() {
            Self::Ipv4
        } else {
            Self::Ipv6
        }
    }
}

/// IP protocol; others print as `ip-proto-<n>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Other(u8),
}

impl Protocol {
    pub fn from_number(p: u8) -> Self {
        match p {
            IPPROTO_TCP => Self::Tcp,
            IPPROTO_UDP => Self::Udp,
            IPPROTO_ICMP => Self::Icmp,
            IPPROTO_ICMPV6 => Self::Icmpv6,
            other => Self::Other(other),
        }
    }

    pub fn is_icmp(self) -> bool {
        matches!(self, Self::Icmp | Self::Icmpv6)
    }
}

impl Named for Protocol {
    fn name(&self) -> Cow<'static, str> {
        match self {
            Self::Tcp => "tcp".into(),
            Self::Udp => "udp".into(),
            Self::Icmp => "icmp".into(),
            Self::Icmpv6 => "icmpv6".into(),
            Self::Other(n) => format!("ip-proto-{n}").into(),
        }
    }
    fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "tcp" => Self::Tcp,
            "udp" => Self::Udp,
            "icmp" => Self::Icmp,
            "icmpv6" => Self::Icmpv6,
            other => Self::Other(other.strip_prefix("ip-proto-")?.parse().ok()?),
        })
    }
}
by_name!(Protocol);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpFlag {
    Syn,
    Ack,
    Rst,
    Fin,
    Psh,
}
fixed_names!(TcpFlag { Syn => "SYN", Ack => "ACK", Rst => "RST", Fin => "FIN", Psh => "PSH" });

impl TcpFlag {
    /// The flags set in a TCP header's flag byte, in the order netprobe prints them.
    pub fn from_bits(f: u8) -> Vec<Self> {
        [
            (tcp_flags::SYN, Self::Syn),
            (tcp_flags::ACK, Self::Ack),
            (tcp_flags::RST, Self::Rst),
            (tcp_flags::FIN, Self::Fin),
            (tcp_flags::PSH, Self::Psh),
        ]
        .into_iter()
        .filter(|(bit, _)| f & bit != 0)
        .map(|(_, flag)| flag)
        .collect()
    }
}

/// `include/net/tcp_states.h` (a userspace-visible, stable numbering); 0 prints as `?`,
/// numbers beyond the table as `STATE_<n>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    Invalid,
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    Other(u32),
}

const TCP_STATES: [(TcpState, &str); 13] = [
    (TcpState::Invalid, "?"),
    (TcpState::Established, "ESTABLISHED"),
    (TcpState::SynSent, "SYN_SENT"),
    (TcpState::SynRecv, "SYN_RECV"),
    (TcpState::FinWait1, "FIN_WAIT1"),
    (TcpState::FinWait2, "FIN_WAIT2"),
    (TcpState::TimeWait, "TIME_WAIT"),
    (TcpState::Close, "CLOSE"),
    (TcpState::CloseWait, "CLOSE_WAIT"),
    (TcpState::LastAck, "LAST_ACK"),
    (TcpState::Listen, "LISTEN"),
    (TcpState::Closing, "CLOSING"),
    (TcpState::NewSynRecv, "NEW_SYN_RECV"),
];

impl TcpState {
    pub fn from_number(s: u32) -> Self {
        TCP_STATES
            .get(s as usize)
            .map_or(Self::Other(s), |(state, _)| *state)
    }
}

impl Named for TcpState {
    fn name(&self) -> Cow<'static, str> {
        match self {
            Self::Other(n) => format!("STATE_{n}").into(),
            known => TCP_STATES
                .iter()
                .find(|(s, _)| s == known)
                .map_or(Cow::Borrowed("?"), |(_, n)| Cow::Borrowed(*n)),
        }
    }
    fn from_name(s: &str) -> Option<Self> {
        if let Some((state, _)) = TCP_STATES.iter().find(|(_, n)| *n == s) {
            return Some(*state);
        }
        Some(Self::Other(s.strip_prefix("STATE_")?.parse().ok()?))
    }
}
by_name!(TcpState);

/// Kernel drop reasons stay strings (their names come from the running kernel's BTF); the
/// ones the engine decides on are named here, once.
pub mod drop_reason {
    /// Answered SYNs may be freed with it: not evidence of a drop.
    pub const NOT_SPECIFIED: &str = "NOT_SPECIFIED";
    pub const NO_SOCKET: &str = "NO_SOCKET";
    pub const NETFILTER_DROP: &str = "NETFILTER_DROP";
    /// A socket's queues freed at close: housekeeping, not a packet lost on the way.
    pub const QUEUE_PURGE: &str = "QUEUE_PURGE";
    /// A tc program on the interface's ingress (egress) hook returned TC_ACT_SHOT.
    pub const TC_INGRESS: &str = "TC_INGRESS";
    pub const TC_EGRESS: &str = "TC_EGRESS";
    /// Reverse-path filtering: the source is not routed back through the receiving interface.
    pub const IP_RPFILTER: &str = "IP_RPFILTER";
    /// Too big for the output device's MTU with DF set (`ip_forward`): a path MTU black hole
    /// when the ICMP "fragmentation needed" never reaches the sender.
    pub const PKT_TOO_BIG: &str = "PKT_TOO_BIG";
    /// A closed socket's queued data freed: teardown, not a loss.
    pub const SOCKET_CLOSE: &str = "SOCKET_CLOSE";

    /// What a kernel drop reason means, for the explanation.
    pub fn hint(reason: &str) -> &'static str {
        match reason {
            "IP_RPFILTER" => {
                "reverse-path filtering (rp_filter): the source address is not routed back through the interface it came in on"
            }
            "IP_NOROUTE" | "IP_OUTNOROUTES" => "there is no route to the destination",
            "IP_INADDRERRORS" | "IP_INNOROUTES" => {
                "the destination address is not routable here (martian or no route)"
            }
            "TC_INGRESS" | "TC_EGRESS" => {
                "a tc program (e.g. Calico's eBPF dataplane or Cilium) returned drop on this interface"
            }
            "TCP_LISTEN_OVERFLOW" | "SOCKET_BACKLOG" => "the listener's accept backlog is full",
            "PKT_TOO_BIG" => {
                "the packet is bigger than the output device's MTU and may not be fragmented"
            }
            "NEIGH_FAILED" | "NEIGH_QUEUEFULL" => {
                "the next hop did not answer ARP/neighbour discovery"
            }
            _ => "see the kernel drop reason",
        }
    }
}
