//! What became of an attempt, and of a failed DNS lookup.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Connected,
    /// The kernel answered RST: no socket listens on that address and port.
    RefusedNoListener,
    /// A netfilter rule rejected the SYN (ICMP unreachable or TCP reset).
    RefusedByRule,
    /// A netfilter rule dropped the SYN silently: the client times out.
    DroppedByRule,
    /// Dropped inside netfilter, but the rule is not known (rule trace off or unavailable).
    DroppedInNetfilter,
    /// The kernel dropped it for another reason (rp_filter, no route, backlog, a tc program …).
    DroppedByKernel,
    /// An ICMP error came back (host/network unreachable …) without a rule on this node.
    Unreachable,
    /// The server side (or something on the way) answered with a reset.
    ResetByPeer,
    /// SYNs left and nothing came back, and nothing on this node dropped them.
    TimedOut,
    /// The SYN left the client's node toward the server's node and never arrived there
    /// (cross-node trace: both nodes' agents watched).
    LostBetweenNodes,
    /// A reply came back to the UDP client (for DNS: whatever its rcode; NXDOMAIN is an answer).
    Answered,
    /// The UDP datagram left, no reply came back, and nothing on this node dropped it.
    Unanswered,
    /// Not enough evidence (the trace ended before anything decisive).
    Unknown,
    /// After the handshake (trace): the connection closed cleanly (FIN, no reset).
    Closed,
    /// After the handshake: a reset ended it; `after_handshake.reset_by` says who sent it (the
    /// peer, a netfilter rule, this node's kernel).
    ResetAfterEstablished,
    /// After the handshake: data was sent again and again and nothing acknowledged it.
    Stalled,
    /// After the handshake: segments too big for a device on the path were dropped
    /// (`PKT_TOO_BIG`) and the "fragmentation needed" error never reached the sender.
    MtuBlackhole,
    /// After the handshake: the connection ended with an error the application got (its
    /// errno), without retransmits, drops or resets that explain it.
    Aborted,
}

impl Outcome {
    pub fn is_failure(self) -> bool {
        !matches!(
            self,
            Self::Connected | Self::Answered | Self::Unknown | Self::Closed
        )
    }

    pub fn headline(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::RefusedNoListener => "refused: nothing listens there",
            Self::RefusedByRule => "refused by a firewall rule",
            Self::DroppedByRule => "silently dropped by a firewall rule (client sees a timeout)",
            Self::DroppedInNetfilter => "silently dropped in netfilter (client sees a timeout)",
            Self::DroppedByKernel => "dropped by the kernel",
            Self::Unreachable => "unreachable (ICMP error)",
            Self::ResetByPeer => "reset by the peer",
            Self::TimedOut => "timed out, with no drop on this node",
            Self::LostBetweenNodes => {
                "lost between the nodes (left the client's node, never reached the server's)"
            }
            Self::Answered => "answered",
            Self::Unanswered => "unanswered: no reply, and no drop on this node",
            Self::Unknown => "undetermined",
            Self::Closed => "connected, then closed cleanly",
            Self::ResetAfterEstablished => "connected, then reset",
            Self::Stalled => "connected, then stalled: data retransmitted, nothing acknowledged",
            Self::MtuBlackhole => {
                "connected, then stalled in a path MTU black hole (segments too big, dropped)"
            }
            Self::Aborted => "connected, then aborted (the application got an error)",
        }
    }
}

/// Why a DNS lookup failed (`dns_failure` events): the last two were answered with that rcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DnsFailureReason {
    Dropped,
    Rejected,
    Unanswered,
    Servfail,
    Refused,
}
super::fixed_names!(DnsFailureReason {
    Dropped => "dropped",
    Rejected => "rejected",
    Unanswered => "unanswered",
    Servfail => "servfail",
    Refused => "refused",
});

impl DnsFailureReason {
    /// The failure a lookup's outcome (and, when answered, its rcode) means; None for lookups
    /// that worked (NXDOMAIN included) or are undecided.
    pub fn of(outcome: Outcome, rcode: Option<&str>) -> Option<Self> {
        Some(match outcome {
            Outcome::Answered => match rcode {
                Some("SERVFAIL") => Self::Servfail,
                Some("REFUSED") => Self::Refused,
                _ => return None,
            },
            Outcome::DroppedByRule | Outcome::DroppedInNetfilter | Outcome::DroppedByKernel => {
                Self::Dropped
            }
            Outcome::RefusedByRule | Outcome::RefusedNoListener | Outcome::Unreachable => {
                Self::Rejected
            }
            Outcome::Unanswered => Self::Unanswered,
            _ => return None,
        })
    }
}
