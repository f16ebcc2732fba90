//! The public event: what `trace -o json` prints, one object per line. Versioned by
//! [`SCHEMA`]; fields are only ever added within a version.

pub mod dns;
pub mod raw;

use std::net::IpAddr;

use netprobe_common::{AF_INET, IPPROTO_ICMP, IPPROTO_ICMPV6, RawEvent, kind};
use serde::{Deserialize, Serialize};

pub use crate::model::{
    Direction, DnsFailureReason, Endpoint, Family, Named, Outcome, Peer, Protocol, TcpFlag,
    TcpState,
};

/// Identifies the shape of every JSON object netprobe prints.
pub const SCHEMA: &str = "netprobe.event/v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A tc checkpoint: the packet passed an interface.
    Packet,
    /// The kernel dropped the packet (`skb:kfree_skb`).
    Drop,
    /// The kernel sent a TCP RST.
    SendReset,
    /// A socket received a TCP RST.
    ReceiveReset,
    /// A segment was retransmitted (a SYN retransmit means nobody answered).
    Retransmit,
    /// A TCP socket changed state.
    StateChange,
    /// The error a socket reports to its application.
    SocketError,
    /// A netfilter rule (or chain policy) dropped or rejected the packet: which rule, the chain
    /// path, and the object behind it (from the nftables trace).
    Netfilter,
    /// A DNS lookup failed (always-on agent): `dns` names the query, `dns_failure` says why;
    /// `src` is the client, `dst` the server it asked (the kube-dns ClusterIP before DNAT).
    DnsFailure,
    /// A route lookup of a connect() or send failed in a watched namespace, before any packet
    /// existed (`fib:fib_table_lookup`): `error` is the lookup's error (`EAGAIN`: that table
    /// had no route), `process` who asked; `sport` is 0 (and `src` unspecified) while the
    /// socket has no port (address) yet.
    RouteFailed,
}

impl Kind {
    pub fn from_raw(k: u8) -> Option<Self> {
        Some(match k {
            kind::TC_INGRESS | kind::TC_EGRESS => Self::Packet,
            kind::DROP => Self::Drop,
            kind::SEND_RESET => Self::SendReset,
            kind::RECEIVE_RESET => Self::ReceiveReset,
            kind::RETRANSMIT => Self::Retransmit,
            kind::STATE_CHANGE => Self::StateChange,
            kind::SOCK_ERROR => Self::SocketError,
            kind::ROUTE_FAILED => Self::RouteFailed,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Netns {
    pub inode: u64,
    /// `ip netns` name (or pod netns file name) when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Interface {
    pub ifindex: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DropInfo {
    /// `enum skb_drop_reason` name without the `SKB_DROP_REASON_` prefix, from the running kernel's BTF.
    pub reason: String,
    pub reason_code: u32,
    /// `function+0xoff` from /proc/kallsyms (raw address when symbols are hidden).
    pub location: String,
    /// TC_INGRESS/TC_EGRESS: the tc programs on that hook of the interface when the drop was
    /// seen (netprobe's own left out); one of them returned the drop.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tc_programs: Vec<crate::model::TcProgram>,
    /// IP_RPFILTER: the interface's rp_filter settings and the route back to the source, read
    /// when the drop was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rp_filter: Option<crate::model::RpFilter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ResetInfo {
    /// `enum sk_rst_reason` name (6.10+), e.g. `NOT_SPECIFIED`, `TCP_OLD_ACK`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StateInfo {
    pub old: TcpState,
    pub new: TcpState,
    /// Segments the connection had sent again so far, fast retransmits and loss probes
    /// included (`tcp_sock.total_retrans`; only retransmits after a timeout are events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retransmitted: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorInfo {
    pub errno: i32,
    /// e.g. `ECONNREFUSED`, `ETIMEDOUT`.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Icmp {
    #[serde(rename = "type")]
    pub icmp_type: u8,
    pub code: u8,
}

/// Why a DNS lookup failed (`dns_failure` events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DnsFailure {
    /// `dropped`, `rejected`, `unanswered`, `servfail` or `refused` (the last two: answered with
    /// that rcode).
    pub reason: DnsFailureReason,
    /// The verdict's outcome (`dropped_in_netfilter`, `unanswered`, …).
    pub outcome: Outcome,
    pub explanation: String,
    /// The DNS server the query went to after DNAT (a CoreDNS pod), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Endpoint>,
    /// Did any reply come back?
    pub replied: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
}

/// A destination on the other side of a DNAT: after it (`translated`) or before it (`dialed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Translated {
    pub dst: IpAddr,
    pub dport: u16,
    /// The backend's pod and node, when the inventory knows them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<Peer>,
}

/// One observation, enriched. For ICMP errors the addresses and ports are those of the packet
/// the error quotes (so the event matches the connection it answers). For `send_reset` they are
/// those of the segment that caused the reset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Event {
    pub schema: String,
    /// Wall-clock time, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    pub kind: Kind,
    pub netns: Option<Netns>,
    pub interface: Option<Interface>,
    /// `ingress` or `egress` for `packet` events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// `ipv4` or `ipv6`.
    pub family: Family,
    /// `tcp`, `udp`, `icmp`, `icmpv6`.
    pub protocol: Protocol,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub tcp_flags: Vec<TcpFlag>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop: Option<DropInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset: Option<ResetInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<StateInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp: Option<Icmp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<Process>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netfilter: Option<crate::attribution::Netfilter>,
    /// Pod/container/node/Service of the source and destination addresses, when an inventory is
    /// available (fields it cannot name are null: unknown, never guessed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Peer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Peer>,
    /// Where a connection to a Service really went: the destination after DNAT, from the
    /// node's conntrack (always-on agent, for SYN retransmits and socket errors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translated: Option<Translated>,
    /// Header and question of the DNS message of a UDP datagram to or from port 53 (as far as
    /// the kernel captured it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<dns::Dns>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_failure: Option<DnsFailure>,
    /// A dropped packet's destination as the client dialled it (a ClusterIP before DNAT), from
    /// the packet's conntrack entry; equal to `dst`/`dport` when nothing translated it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dialed: Option<Translated>,
    /// TCP sequence number of a retransmitted data segment, or of a RST at a tc checkpoint
    /// (0: it answers a SYN — a refusal; else the reset of an established connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
    /// Bytes: a retransmitted data segment's payload, or a dropped TCP/UDP packet's IP length
    /// (how a path MTU black hole shows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    /// The MSS option a SYN or SYN-ACK announced (tc checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mss: Option<u16>,
    /// Kernel `sk_buff` address: equal values are the same packet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skb: Option<String>,
    /// Kernel `sock` address: equal values are the same socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sock: Option<String>,
    /// `time` (`time_ns` in RFC 3339) and `node`: added by the NDJSON writer, last.
    #[serde(flatten)]
    pub observed: crate::model::Observed,
    /// The destination is a Service endpoint in the inventory: the client may have dialled a
    /// ClusterIP that only a later report (the agent's armed trace) names. Not serialised.
    #[serde(skip)]
    #[schemars(skip)]
    pub to_service_endpoint: bool,
}

pub fn ip_of(family: u8, addr: &[u8; 16]) -> IpAddr {
    if family == AF_INET {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        IpAddr::from(*addr)
    }
}

pub fn errno_name(e: i32) -> String {
    match e {
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::ETIMEDOUT => "ETIMEDOUT".into(),
        libc::ECONNRESET => "ECONNRESET".into(),
        libc::EHOSTUNREACH => "EHOSTUNREACH".into(),
        libc::ENETUNREACH => "ENETUNREACH".into(),
        libc::EPIPE => "EPIPE".into(),
        libc::ECONNABORTED => "ECONNABORTED".into(),
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EAGAIN => "EAGAIN".into(),
        other => format!("errno {other}"),
    }
}

impl Event {
    /// `SYN`, `ACK`, … as printed.
    pub fn flag_names(&self) -> Vec<&'static str> {
        self.tcp_flags.iter().map(TcpFlag::as_str).collect()
    }

    pub fn has_flag(&self, flag: TcpFlag) -> bool {
        self.tcp_flags.contains(&flag)
    }

    /// A TCP segment with SYN and without ACK: a connection attempt's first segment.
    pub fn is_syn(&self) -> bool {
        self.has_flag(TcpFlag::Syn) && !self.has_flag(TcpFlag::Ack)
    }
}

/// An event that no kernel program produced: only the tuple is set.
pub fn derived(
    time_ns: u64,
    kind: Kind,
    protocol: Protocol,
    (src, sport, dst, dport): (IpAddr, u16, IpAddr, u16),
) -> Event {
    Event {
        schema: SCHEMA.to_string(),
        time_ns,
        kind,
        netns: None,
        interface: None,
        direction: None,
        family: Family::of(src),
        protocol,
        src,
        sport,
        dst,
        dport,
        tcp_flags: Vec::new(),
        drop: None,
        reset: None,
        state: None,
        error: None,
        icmp: None,
        process: None,
        netfilter: None,
        source: None,
        destination: None,
        translated: None,
        dns: None,
        dns_failure: None,
        dialed: None,
        seq: None,
        size: None,
        mss: None,
        skb: None,
        sock: None,
        to_service_endpoint: false,
        observed: Default::default(),
    }
}

/// A netfilter verdict event (from the nftables trace, not from a kernel program), for a flow
/// of `protocol` (`tcp` or `udp`, the traced one; anything else is taken as tcp).
pub fn netfilter(
    time_ns: u64,
    protocol: Protocol,
    netns: Option<Netns>,
    interface: Option<Interface>,
    tuple: Option<(IpAddr, u16, IpAddr, u16)>,
    nf: crate::attribution::Netfilter,
) -> Event {
    let unspecified = IpAddr::from([0u8, 0, 0, 0]);
    let tuple = tuple.unwrap_or((unspecified, 0, unspecified, 0));
    Event {
        netns,
        interface,
        netfilter: Some(nf),
        ..derived(time_ns, Kind::Netfilter, protocol, tuple)
    }
}

/// Raw fields of an event that need no lookup: the enrichment fills the rest.
pub fn base(ev: &RawEvent, time_ns: u64) -> Option<Event> {
    let kind = Kind::from_raw(ev.kind)?;
    Some(Event {
        schema: SCHEMA.to_string(),
        time_ns,
        kind,
        netns: None,
        interface: None,
        direction: match ev.kind {
            netprobe_common::kind::TC_INGRESS => Some(Direction::Ingress),
            netprobe_common::kind::TC_EGRESS => Some(Direction::Egress),
            _ => None,
        },
        family: if ev.family == AF_INET {
            Family::Ipv4
        } else {
            Family::Ipv6
        },
        protocol: Protocol::from_number(ev.proto),
        src: ip_of(ev.family, &ev.saddr),
        sport: ev.sport,
        dst: ip_of(ev.family, &ev.daddr),
        dport: ev.dport,
        tcp_flags: TcpFlag::from_bits(ev.tcp_flags),
        drop: None,
        reset: None,
        state: (ev.kind == netprobe_common::kind::STATE_CHANGE).then(|| StateInfo {
            old: TcpState::from_number(ev.aux),
            new: TcpState::from_number(ev.reason),
            retransmitted: Some(ev.seq),
        }),
        error: matches!(
            ev.kind,
            netprobe_common::kind::SOCK_ERROR | netprobe_common::kind::ROUTE_FAILED
        )
        .then(|| ErrorInfo {
            errno: ev.reason as i32,
            name: errno_name(ev.reason as i32),
        }),
        icmp: (ev.proto == IPPROTO_ICMP || ev.proto == IPPROTO_ICMPV6).then_some(Icmp {
            icmp_type: (ev.aux >> 8) as u8,
            code: ev.aux as u8,
        }),
        process: (ev.pid != 0).then(|| Process {
            pid: ev.pid,
            comm: String::from_utf8_lossy(
                &ev.comm[..ev.comm.iter().position(|&c| c == 0).unwrap_or(16)],
            )
            .into_owned(),
        }),
        netfilter: None,
        source: None,
        destination: None,
        translated: None,
        dns: None,
        dns_failure: None,
        dialed: (ev.kind == netprobe_common::kind::DROP && ev.orig_known != 0).then(|| {
            Translated {
                dst: ip_of(ev.family, &ev.orig_daddr),
                dport: ev.orig_dport,
                peer: None,
            }
        }),
        seq: (data_retransmit(ev) || tc_reset(ev)).then_some(ev.seq),
        size: size_of_raw(ev),
        mss: mss_of_raw(ev),
        skb: (ev.skb != 0).then(|| format!("{:#x}", ev.skb)),
        sock: (ev.sk != 0).then(|| format!("{:#x}", ev.sk)),
        to_service_endpoint: false,
        observed: Default::default(),
    })
}

/// A RST passing a tc checkpoint: its sequence number tells a refusal (0: it answers a SYN)
/// from the reset of an established connection.
fn tc_reset(ev: &RawEvent) -> bool {
    matches!(ev.kind, kind::TC_INGRESS | kind::TC_EGRESS)
        && ev.proto == netprobe_common::IPPROTO_TCP
        && ev.tcp_flags & netprobe_common::tcp_flags::RST != 0
}

/// A retransmit of a data segment (not a SYN): the kernel gave its length.
fn data_retransmit(ev: &RawEvent) -> bool {
    ev.kind == kind::RETRANSMIT && ev.tcp_flags == 0 && ev.reason != 0
}

/// A retransmitted segment's payload, or a dropped TCP/UDP packet's IP length.
fn size_of_raw(ev: &RawEvent) -> Option<u32> {
    let ip_payload =
        ev.proto == netprobe_common::IPPROTO_TCP || ev.proto == netprobe_common::IPPROTO_UDP;
    if data_retransmit(ev) {
        Some(ev.reason)
    } else {
        (ev.kind == kind::DROP && ip_payload && ev.aux != 0).then_some(ev.aux)
    }
}

/// The MSS option of a SYN (or SYN-ACK) at a tc checkpoint.
fn mss_of_raw(ev: &RawEvent) -> Option<u16> {
    let tc = ev.kind == kind::TC_INGRESS || ev.kind == kind::TC_EGRESS;
    let syn = ev.tcp_flags & netprobe_common::tcp_flags::SYN != 0;
    (tc && syn && ev.proto == netprobe_common::IPPROTO_TCP && ev.aux != 0).then_some(ev.aux as u16)
}

#[cfg(test)]
mod tests {
    use netprobe_common::{AF_INET6, IPPROTO_TCP};

    use super::*;

    #[test]
    fn base_event_carries_tuple_flags_and_state() {
        let mut ev = RawEvent {
            kind: kind::STATE_CHANGE,
            family: AF_INET,
            proto: IPPROTO_TCP,
            sport: 41000,
            dport: 9500,
            aux: 2,
            reason: 7,
            pid: 42,
            ..Default::default()
        };
        ev.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        ev.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        ev.comm[..5].copy_from_slice(b"agent");
        let e = base(&ev, 5).unwrap();
        assert_eq!(e.kind, Kind::StateChange);
        assert_eq!(
            e.state,
            Some(StateInfo {
                old: TcpState::SynSent,
                new: TcpState::Close,
                retransmitted: Some(0),
            })
        );
        assert_eq!(e.process.unwrap().comm, "agent");
        assert_eq!(e.dst.to_string(), "127.0.0.1");
        let json = serde_json::to_value(base(&ev, 5).unwrap()).unwrap();
        assert_eq!(json["schema"], SCHEMA);
        assert_eq!(json["kind"], "state_change");
    }

    #[test]
    fn retransmit_size_drop_size_and_syn_mss() {
        let rtx = RawEvent {
            kind: kind::RETRANSMIT,
            proto: IPPROTO_TCP,
            seq: 1000,
            reason: 1448,
            ..Default::default()
        };
        let e = base(&rtx, 0).unwrap();
        assert_eq!((e.seq, e.size, e.mss), (Some(1000), Some(1448), None));
        let syn_rtx = RawEvent {
            tcp_flags: netprobe_common::tcp_flags::SYN,
            reason: 1,
            ..rtx
        };
        assert_eq!(base(&syn_rtx, 0).unwrap().size, None);
        let drop = RawEvent {
            kind: kind::DROP,
            proto: IPPROTO_TCP,
            aux: 1500,
            ..Default::default()
        };
        assert_eq!(base(&drop, 0).unwrap().size, Some(1500));
        let syn = RawEvent {
            kind: kind::TC_EGRESS,
            proto: IPPROTO_TCP,
            tcp_flags: netprobe_common::tcp_flags::SYN,
            aux: 1460,
            ..Default::default()
        };
        let e = base(&syn, 0).unwrap();
        assert_eq!((e.mss, e.size, e.icmp), (Some(1460), None, None));
        // A RST's sequence number tells a refusal (0) from an established connection's reset.
        let refusal = RawEvent {
            kind: kind::TC_INGRESS,
            proto: IPPROTO_TCP,
            tcp_flags: netprobe_common::tcp_flags::RST | netprobe_common::tcp_flags::ACK,
            ..Default::default()
        };
        assert_eq!(base(&refusal, 0).unwrap().seq, Some(0));
        let mid_stream = RawEvent { seq: 77, ..refusal };
        let e = base(&mid_stream, 0).unwrap();
        assert_eq!((e.seq, e.size), (Some(77), None));
        assert_eq!(base(&RawEvent { seq: 77, ..syn }, 0).unwrap().seq, None);
    }

    #[test]
    fn ipv6_and_icmp_fields() {
        let ev = RawEvent {
            kind: kind::TC_INGRESS,
            family: AF_INET6,
            proto: IPPROTO_ICMPV6,
            aux: (1 << 8) | 4,
            saddr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            ..Default::default()
        };
        let e = base(&ev, 0).unwrap();
        assert_eq!(e.family, Family::Ipv6);
        assert_eq!(e.src.to_string(), "::1");
        assert_eq!(
            e.icmp,
            Some(Icmp {
                icmp_type: 1,
                code: 4
            })
        );
        assert_eq!(e.direction, Some(Direction::Ingress));
        assert_eq!(
            TcpFlag::from_bits(netprobe_common::tcp_flags::SYN | netprobe_common::tcp_flags::ACK),
            vec![TcpFlag::Syn, TcpFlag::Ack]
        );
    }
}
