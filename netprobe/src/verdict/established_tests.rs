//! The engine past the handshake, from synthetic event streams shaped like the lab's
//! (`netprobe/tests/after_handshake.rs` runs the real thing).

use std::net::IpAddr;

use super::*;
use crate::{
    attribution::rules::{attribute_counted, legacy, ruleset::Ruleset},
    events::{DropInfo, ErrorInfo, Icmp, StateInfo, derived},
    model::{Protocol, TcpFlag, TcpState},
};

pub(super) const CLIENT: (&str, u16) = ("10.42.0.20", 40000);
pub(super) const SERVER: (&str, u16) = ("10.42.0.30", 9500);
pub(super) const MS: u64 = 1_000_000;

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An event of the connection, client → server (`back`: server → client).
pub(super) fn ev(t_ms: u64, kind: Kind, back: bool) -> Event {
    let (c, s) = ((ip(CLIENT.0), CLIENT.1), (ip(SERVER.0), SERVER.1));
    let (a, b) = if back { (s, c) } else { (c, s) };
    derived(t_ms * MS, kind, Protocol::Tcp, (a.0, a.1, b.0, b.1))
}

fn state(t_ms: u64, old: TcpState, new: TcpState) -> Event {
    Event {
        state: Some(StateInfo {
            old,
            new,
            retransmitted: None,
        }),
        sock: Some("0x1".into()),
        ..ev(t_ms, Kind::StateChange, false)
    }
}

/// SYN (MSS 1460), SYN-ACK (MSS 1460), the client's ESTABLISHED.
pub(super) fn handshake() -> Vec<Event> {
    let syn = Event {
        tcp_flags: vec![TcpFlag::Syn],
        mss: Some(1460),
        ..ev(0, Kind::Packet, false)
    };
    let syn_ack = Event {
        tcp_flags: vec![TcpFlag::Syn, TcpFlag::Ack],
        mss: Some(1400),
        ..ev(1, Kind::Packet, true)
    };
    vec![
        state(0, TcpState::Close, TcpState::SynSent),
        syn,
        syn_ack,
        state(1, TcpState::SynSent, TcpState::Established),
    ]
}

pub(super) fn retransmit(t_ms: u64, seq: u32) -> Event {
    Event {
        seq: Some(seq),
        size: Some(1448),
        ..ev(t_ms, Kind::Retransmit, false)
    }
}

pub(super) fn error(t_ms: u64, errno: i32, name: &str) -> Event {
    Event {
        error: Some(ErrorInfo {
            errno,
            name: name.into(),
        }),
        ..ev(t_ms, Kind::SocketError, false)
    }
}

pub(super) fn drop_of(t_ms: u64, reason: &str, size: u32) -> Event {
    Event {
        drop: Some(DropInfo {
            reason: reason.into(),
            location: "ip_forward+0x1f0".into(),
            ..Default::default()
        }),
        size: Some(size),
        ..ev(t_ms, Kind::Drop, false)
    }
}

pub(super) fn rule(save: &str) -> crate::attribution::Netfilter {
    let fired = legacy::fired(
        &legacy::Counters::new(),
        &legacy::parse_counters("ip", &format!("*filter\n[1:60] {save}\nCOMMIT\n")),
    );
    attribute_counted(&fired, &Ruleset::default(), None).expect("a rule")
}

/// Everything pushed 10 ms apart on the caller's clock, then polled well after.
pub(super) fn judge(events: Vec<Event>) -> Vec<Verdict> {
    let mut engine = Engine::new(Context {
        port: SERVER.1,
        ..Context::default()
    })
    .follow_established();
    let mut out = Vec::new();
    let mut now = 0;
    for e in events {
        now = e.time_ns.max(now) + MS;
        out.extend(engine.push(e, now));
        out.extend(engine.poll(now));
    }
    out.extend(engine.poll(now + 10 * SETTLE_NS));
    out
}

/// Beyond `established::MAX_FOLLOWED` connected connections the oldest is let go, and counted
/// where the summary and `/metrics` read the engine's evictions.
#[test]
fn connections_followed_beyond_the_bound_are_let_go_and_counted() {
    let mut engine = Engine::new(Context {
        port: SERVER.1,
        ..Context::default()
    })
    .follow_established();
    let mut now = 0;
    for n in 0..=established::MAX_FOLLOWED as u16 {
        let port = 20000 + n;
        for mut e in handshake() {
            for p in [&mut e.sport, &mut e.dport] {
                if *p == CLIENT.1 {
                    *p = port;
                }
            }
            e.sock = e.sock.map(|_| format!("{port:#x}"));
            now = e.time_ns.max(now) + MS;
            engine.push(e, now);
        }
    }
    engine.poll(now + 10 * SETTLE_NS);
    assert_eq!(engine.stats.tcp.followed_evicted, 1);
}

#[test]
fn a_clean_close_is_connected_then_closed_not_a_failure() {
    let mut events = handshake();
    events.push(retransmit(300, 1000));
    events.push(state(900, TcpState::Established, TcpState::FinWait1));
    events.push(state(901, TcpState::FinWait2, TcpState::Close));
    let v = judge(events);
    let outcomes: Vec<Outcome> = v.iter().map(|v| v.outcome).collect();
    assert_eq!(outcomes, [Outcome::Connected, Outcome::Closed]);
    assert!(!v[1].is_failure());
    let a = v[1].after_handshake.as_ref().unwrap();
    assert_eq!((a.mss.client, a.mss.server), (Some(1460), Some(1400)));
}

#[test]
fn fast_retransmits_of_one_segment_are_no_stall_rto_backoff_is() {
    let mut fast = handshake();
    fast.extend((0..8).map(|i| retransmit(400 + i, 1000)));
    assert_eq!(
        judge(fast).len(),
        1,
        "a burst of fast retransmits is healthy"
    );
    let mut rto = handshake();
    rto.extend([200, 600, 1400, 3000, 6200].map(|t| retransmit(t, 1000)));
    let v = judge(rto);
    assert_eq!(v.len(), 2);
    assert_eq!(v[1].outcome, Outcome::Stalled);
    assert!(
        v[1].explanation.contains("Nothing on this node dropped"),
        "{}",
        v[1].explanation
    );
}

#[test]
fn too_big_segments_with_the_icmp_eaten_by_a_rule_are_an_mtu_black_hole() {
    let mut events = handshake();
    events.push(drop_of(100, drop_reason::PKT_TOO_BIG, 1500));
    let icmp_drop = Event {
        protocol: Protocol::Icmp,
        icmp: Some(Icmp {
            icmp_type: 3,
            code: 4,
        }),
        ..drop_of(100, drop_reason::NETFILTER_DROP, 0)
    };
    let eaten_by = Event {
        protocol: Protocol::Icmp,
        netfilter: Some(rule(
            "-A OUTPUT -p icmp -m icmp --icmp-type 3/4 -m comment --comment eater -j DROP",
        )),
        ..ev(100, Kind::Netfilter, false)
    };
    events.extend([icmp_drop, eaten_by]);
    events.extend([300, 700].map(|t| retransmit(t, 1000)));
    events.push(error(3000, libc::ETIMEDOUT, "ETIMEDOUT"));
    let v = judge(events);
    assert_eq!(v.len(), 2);
    let v = &v[1];
    assert_eq!(v.outcome, Outcome::MtuBlackhole);
    assert!(v.is_failure());
    let m = v.after_handshake.as_ref().unwrap().mtu.as_ref().unwrap();
    assert_eq!(m.dropped_sizes, [1500]);
    assert!(m.icmp.dropped);
    assert_eq!(m.icmp.dropped_by.as_ref().unwrap().chain, "OUTPUT");
    assert!(
        v.next_steps
            .iter()
            .any(|s| s.contains("1450") && s.contains("Felix"))
    );
    assert!(
        v.next_steps
            .iter()
            .any(|s| s.contains("fragmentation needed"))
    );
    let mut named = v.clone();
    established::name_mtu_device(
        &mut named,
        &crate::model::RouteHint {
            dst: ip(SERVER.0),
            dev: "cali0".into(),
            kind: Some("veth".into()),
            mtu: Some(1400),
            gateway: None,
            encap: None,
        },
    );
    assert!(
        named
            .explanation
            .contains("via cali0, MTU 1400: segments of 1500 bytes do not fit")
    );
}

#[test]
fn a_reject_with_tcp_reset_mid_stream_is_a_reset_by_the_rule() {
    let mut events = handshake();
    events.push(drop_of(500, drop_reason::NETFILTER_DROP, 80));
    events.push(Event {
        netfilter: Some(rule(
            "-A FORWARD -p tcp -m tcp --dport 9500 -j REJECT --reject-with tcp-reset",
        )),
        ..ev(500, Kind::Netfilter, false)
    });
    events.push(Event {
        tcp_flags: vec![TcpFlag::Rst, TcpFlag::Ack],
        ..ev(500, Kind::Packet, true)
    });
    events.push(error(501, libc::ECONNRESET, "ECONNRESET"));
    let v = judge(events);
    assert_eq!(v.len(), 2);
    assert_eq!(v[1].outcome, Outcome::ResetAfterEstablished);
    let a = v[1].after_handshake.as_ref().unwrap();
    assert_eq!(a.reset_by, Some(established::ResetBy::Rule));
    assert_eq!(v[1].netfilter.as_ref().unwrap().chain, "FORWARD");
    assert_eq!(v[1].app_error.as_deref(), Some("ECONNRESET"));
}

#[test]
fn a_conntrack_invalid_drop_mid_stream_is_explained_and_the_traced_rule_preferred() {
    let counted = rule("-A FORWARD -m conntrack --ctstate INVALID -j DROP");
    let mut traced = counted.clone();
    traced.evidence = crate::attribution::Evidence::Trace;
    traced.position = Some(1);
    let mut events = handshake();
    events.push(drop_of(500, drop_reason::NETFILTER_DROP, 80));
    for (t, nf) in [(500, counted), (800, traced)] {
        events.push(Event {
            netfilter: Some(nf),
            ..ev(t, Kind::Netfilter, false)
        });
    }
    events.push(retransmit(800, 1000));
    events.push(error(3000, libc::ETIMEDOUT, "ETIMEDOUT"));
    let v = judge(events);
    assert_eq!(v[1].outcome, Outcome::Stalled);
    let nf = v[1].netfilter.as_ref().unwrap();
    assert!(nf.evidence.is_trace(), "{nf:?}");
    assert!(v[1].explanation.contains("conntrack deems INVALID"));
    let steps = v[1].next_steps.join("\n");
    assert!(steps.contains("asymmetric routing") && steps.contains("nf_conntrack_tcp_loose"));
}

#[test]
fn a_netfilter_drop_without_a_rule_points_at_a_full_conntrack_table() {
    let mut events = handshake();
    let mut dropped = drop_of(500, drop_reason::NETFILTER_DROP, 1000);
    dropped.drop.as_mut().unwrap().location = "nf_hook_slow+0x9a".into();
    events.push(dropped);
    events.push(retransmit(800, 1000));
    events.push(error(3000, libc::ETIMEDOUT, "ETIMEDOUT"));
    let v = judge(events);
    assert_eq!(v[1].outcome, Outcome::Stalled);
    assert!(v[1].explanation.contains("conntrack itself did"));
    assert!(v[1].next_steps.join("\n").contains("nf_conntrack_max"));
}

#[test]
fn a_reset_nothing_here_sent_is_the_peers() {
    let mut events = handshake();
    events.push(Event {
        sock: Some("0x1".into()),
        ..ev(500, Kind::ReceiveReset, false)
    });
    let v = judge(events);
    assert_eq!(v[1].outcome, Outcome::ResetAfterEstablished);
    assert_eq!(
        v[1].after_handshake.as_ref().unwrap().reset_by,
        Some(established::ResetBy::Peer)
    );
}

#[test]
fn without_following_an_attempt_still_ends_at_connected() {
    let mut engine = Engine::new(Context {
        port: SERVER.1,
        ..Context::default()
    });
    let mut out = Vec::new();
    for e in handshake()
        .into_iter()
        .chain([error(3000, libc::ETIMEDOUT, "ETIMEDOUT")])
    {
        let t = e.time_ns;
        out.extend(engine.push(e, t));
    }
    out.extend(engine.poll(u64::MAX / 2));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].outcome, Outcome::Connected);
}
