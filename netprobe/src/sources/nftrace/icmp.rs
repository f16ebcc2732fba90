//! ICMP errors about the traced flow (IPv4 "destination unreachable", "fragmentation needed"
//! included; ICMPv6 "destination unreachable" / "packet too big"), named by the rule that
//! dropped them, paired with the flow they quote.
//!
//! nf_tables puts only the first 20 bytes of the transport header in a trace message
//! (`NFT_TRACETYPE_TRANSPORT_HSIZE`): the ICMP header and 12 bytes of the quoted IP header —
//! neither the quoted addresses nor the quoted ports, for IPv4 as for IPv6. The kernel's drop
//! event of the same ICMP packet has them (the probe reads the quoted headers). The two are
//! joined by namespace, the address the error goes to (the quoted packet's sender), ICMP type
//! and code, within [`JOIN_WINDOW`]: whichever arrives first waits for the other. Two flows of
//! the same sender hit by the same error in the same window may be paired crosswise (both with
//! the same rule: the name stays right).

use std::{
    collections::VecDeque,
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{
    attribution::Netfilter,
    events::{Event, Interface},
    model::{Protocol, drop_reason},
    netlink::nftrace::TraceMsg,
};

/// How long one half of a pair waits for the other (they arrive through different sources).
pub const JOIN_WINDOW: Duration = Duration::from_secs(3);
/// Halves waiting at once, per side; the oldest goes first.
pub const MAX_WAITING: usize = 64;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// (netns inode, the address the error goes to, ICMP type, ICMP code).
pub type ErrorKey = (u64, IpAddr, u8, u8);

/// The rule that dropped a traced ICMP error, and where.
#[derive(Debug, Clone)]
pub struct TracedError {
    pub nf: Netfilter,
    pub interface: Option<Interface>,
}

/// The quoted flow of a dropped ICMP error, as the kernel's drop event has it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuotedFlow {
    pub protocol: Protocol,
    pub tuple: (IpAddr, u16, IpAddr, u16),
}

/// Is a type/code an error that quotes a packet (ICMP type 3, ICMPv6 types 1 and 2)?
fn quotes_a_packet(icmpv6: bool, icmp_type: u8) -> bool {
    if icmpv6 {
        matches!(icmp_type, 1 | 2)
    } else {
        icmp_type == 3
    }
}

/// The key of a traced path that ended in a drop, when its packet is an ICMP error.
pub fn traced_error(inode: u64, path: &[TraceMsg]) -> Option<ErrorKey> {
    let m = path.iter().rev().find(|m| m.tuple.is_some())?;
    let icmpv6 = match m.l4proto? {
        IPPROTO_ICMP => false,
        IPPROTO_ICMPV6 => true,
        _ => return None,
    };
    // For an ICMP packet the "source port" is its type and code.
    let (_, type_code, to, _) = m.tuple?;
    let [icmp_type, code] = type_code.to_be_bytes();
    quotes_a_packet(icmpv6, icmp_type).then_some((inode, to, icmp_type, code))
}

/// The key of a kernel drop event of an ICMP error at a netfilter rule, and its quoted flow.
pub fn dropped_error(e: &Event) -> Option<(ErrorKey, QuotedFlow)> {
    let by_rule = e
        .drop
        .as_ref()
        .is_some_and(|d| d.reason == drop_reason::NETFILTER_DROP);
    let icmp = e.icmp.as_ref()?;
    let error = quotes_a_packet(e.protocol == Protocol::Icmpv6, icmp.icmp_type);
    if !(by_rule && error && e.protocol.is_icmp() && e.sport != 0) {
        return None;
    }
    let inode = e.netns.as_ref()?.inode;
    Some((
        (inode, e.src, icmp.icmp_type, icmp.code),
        QuotedFlow {
            protocol: e.protocol,
            tuple: (e.src, e.sport, e.dst, e.dport),
        },
    ))
}

/// Halves of one side waiting for their other half, and how many were let go at the bound
/// before their window ended.
struct Waiting<T> {
    halves: VecDeque<(Instant, ErrorKey, T)>,
    evicted: u64,
}

impl<T> Default for Waiting<T> {
    fn default() -> Self {
        Self {
            halves: VecDeque::new(),
            evicted: 0,
        }
    }
}

impl<T> Waiting<T> {
    fn push(&mut self, key: ErrorKey, v: T, now: Instant) {
        if self.halves.len() >= MAX_WAITING {
            self.halves.pop_front();
            self.evicted += 1;
        }
        self.halves.push_back((now, key, v));
    }

    /// The oldest half of `key` still within the window; older halves are let go.
    fn take(&mut self, key: &ErrorKey, now: Instant) -> Option<T> {
        self.halves
            .retain(|(at, _, _)| now.saturating_duration_since(*at) < JOIN_WINDOW);
        let i = self.halves.iter().position(|(_, k, _)| k == key)?;
        self.halves.remove(i).map(|(_, _, v)| v)
    }
}

/// The join of traced ICMP errors with the kernel's drop events of the same packets.
#[derive(Default)]
pub struct IcmpJoin {
    traced: Waiting<TracedError>,
    dropped: Waiting<QuotedFlow>,
}

impl IcmpJoin {
    /// Halves let go at the bound ([`MAX_WAITING`] per side) before their other half came:
    /// those ICMP errors' rules may go unnamed.
    pub fn evicted(&self) -> u64 {
        self.traced.evicted + self.dropped.evicted
    }

    /// A traced ICMP error that a rule dropped: with its quoted flow if its drop event came
    /// already; otherwise it waits for it.
    pub fn traced(
        &mut self,
        key: ErrorKey,
        err: TracedError,
        now: Instant,
    ) -> Option<(QuotedFlow, TracedError)> {
        match self.dropped.take(&key, now) {
            Some(flow) => Some((flow, err)),
            None => {
                self.traced.push(key, err, now);
                None
            }
        }
    }

    /// The kernel's drop event of an ICMP error at a rule: the traced rule if its trace came
    /// already; otherwise the quoted flow waits for it.
    pub fn dropped(
        &mut self,
        key: ErrorKey,
        flow: QuotedFlow,
        now: Instant,
    ) -> Option<TracedError> {
        let found = self.traced.take(&key, now);
        if found.is_none() {
            self.dropped.push(key, flow, now);
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        attribution::{Evidence, Owner},
        events::{DropInfo, Icmp, Kind, Netns, derived},
        model::{Backend, NfAction, OwnerSystem},
        netlink::nftrace::{TraceType, Verdict},
    };

    const CLIENT: &str = "10.42.0.20";

    fn nf() -> TracedError {
        TracedError {
            nf: Netfilter {
                backend: Backend::Nftables,
                family: "inet".into(),
                hook: Some("output".into()),
                table: "eater".into(),
                chain: "out".into(),
                handle: Some(3),
                position: None,
                rule: Some("icmp type destination-unreachable drop".into()),
                comments: Vec::new(),
                action: NfAction::Drop,
                client_sees: "timeout".into(),
                path: Vec::new(),
                owner: Owner::new(OwnerSystem::User, "rule", "a rule".into()),
                evidence: Evidence::Trace,
            },
            interface: None,
        }
    }

    /// The trace message of a dropped frag-needed from the node to the client.
    fn traced_frag_needed(l4proto: u8) -> TraceMsg {
        TraceMsg {
            id: 1,
            table_family: 1,
            nfproto: 2,
            table: "eater".into(),
            chain: "out".into(),
            handle: Some(3),
            kind: TraceType::Rule,
            verdict: Some(Verdict::Drop),
            policy: None,
            iif: None,
            oif: None,
            tuple: Some((
                "10.42.0.1".parse().unwrap(),
                0x0304,
                CLIENT.parse().unwrap(),
                0xbeef,
            )),
            l4proto: Some(l4proto),
        }
    }

    /// The kernel's drop event of the same ICMP packet: the quoted segment's tuple.
    fn dropped_frag_needed() -> Event {
        let tuple = (
            CLIENT.parse().unwrap(),
            40000,
            "10.42.0.30".parse().unwrap(),
            9500,
        );
        let mut e = derived(1, Kind::Drop, Protocol::Icmp, tuple);
        e.icmp = Some(Icmp {
            icmp_type: 3,
            code: 4,
        });
        e.netns = Some(Netns {
            inode: 7,
            name: None,
        });
        e.drop = Some(DropInfo {
            reason: drop_reason::NETFILTER_DROP.into(),
            location: "nft_do_chain+0x46f".into(),
            ..Default::default()
        });
        e
    }

    #[test]
    fn a_traced_frag_needed_and_its_drop_event_pair_in_either_order() {
        let key = traced_error(7, &[traced_frag_needed(1)]).expect("an ICMP error");
        assert_eq!(key, (7, CLIENT.parse().unwrap(), 3, 4));
        let (dkey, flow) = dropped_error(&dropped_frag_needed()).expect("a dropped ICMP error");
        assert_eq!(dkey, key);
        assert_eq!(flow.tuple.1, 40000);
        let now = Instant::now();
        let mut j = IcmpJoin::default();
        assert!(j.traced(key, nf(), now).is_none(), "waits for its drop");
        let rule = j.dropped(dkey, flow, now).expect("paired");
        assert_eq!(rule.nf.table, "eater");
        assert!(j.dropped(dkey, flow, now).is_none(), "a trace pairs once");
        let (quoted, _) = j.traced(key, nf(), now).expect("the drop came first");
        assert_eq!(quoted, flow);
    }

    #[test]
    fn halves_older_than_the_window_and_other_packets_do_not_pair() {
        let key = traced_error(7, &[traced_frag_needed(1)]).unwrap();
        let (_, flow) = dropped_error(&dropped_frag_needed()).unwrap();
        let then = Instant::now();
        let mut j = IcmpJoin::default();
        assert!(j.traced(key, nf(), then).is_none());
        assert!(j.dropped(key, flow, then + JOIN_WINDOW).is_none());
        assert!(traced_error(7, &[traced_frag_needed(6)]).is_none(), "TCP");
        let mut echo = traced_frag_needed(1);
        echo.tuple.as_mut().unwrap().1 = 0x0800;
        assert!(traced_error(7, &[echo]).is_none(), "an echo request");
        let mut too_big = traced_frag_needed(58);
        too_big.tuple.as_mut().unwrap().1 = 0x0200;
        assert_eq!(traced_error(7, &[too_big]).map(|k| k.2), Some(2));
        let mut not_by_rule = dropped_frag_needed();
        not_by_rule.drop.as_mut().unwrap().reason = "NO_SOCKET".into();
        assert!(dropped_error(&not_by_rule).is_none());
    }

    #[test]
    fn halves_beyond_the_bound_are_let_go_and_counted() {
        let key = traced_error(7, &[traced_frag_needed(1)]).unwrap();
        let (_, flow) = dropped_error(&dropped_frag_needed()).unwrap();
        let now = Instant::now();
        let mut j = IcmpJoin::default();
        for n in 0..MAX_WAITING as u8 + 2 {
            let other = (7, format!("10.42.1.{n}").parse().unwrap(), 3, 4);
            assert!(
                j.traced(if n == 0 { key } else { other }, nf(), now)
                    .is_none()
            );
        }
        assert_eq!(j.evicted(), 2);
        // The first one waited longest and went first: its drop event finds nothing.
        assert!(j.dropped(key, flow, now).is_none());
    }
}
