//! The agent's engine (every port, failure signals only) past the handshake, from synthetic
//! streams shaped like the agent's (`netprobe/tests/agent_after_handshake.rs` runs the real
//! thing): no SYN, no state change, only what goes wrong.

use super::*;
use crate::{
    events::{Icmp, ResetInfo},
    verdict::{
        ANY_PORT, Context, SETTLE_NS,
        established::ResetBy,
        established_tests::{CLIENT, MS, drop_of, error, ev, retransmit, rule},
    },
};

fn agent_engine() -> Engine {
    Engine::new(Context {
        port: ANY_PORT,
        ..Context::default()
    })
    .judge_midstream()
}

/// Everything pushed on the caller's clock (event time + 1 ms), then polled `after_ms` later.
fn judge_after(engine: &mut Engine, events: Vec<Event>, after_ms: u64) -> Vec<Verdict> {
    let mut out = Vec::new();
    let mut now = 0;
    for e in events {
        now = e.time_ns.max(now) + MS;
        out.extend(engine.push(e, now));
    }
    for t in (now..=now + after_ms * MS).step_by((100 * MS) as usize) {
        out.extend(engine.poll(t));
    }
    out
}

fn judge(events: Vec<Event>) -> Vec<Verdict> {
    judge_after(&mut agent_engine(), events, 2 * SETTLE_NS / MS)
}

/// The reset a REJECT with tcp-reset sends for a segment that acknowledged something: no ACK
/// flag, the sequence the client expects.
fn rule_reset(t_ms: u64) -> Event {
    Event {
        tcp_flags: vec![TcpFlag::Rst],
        seq: Some(123_456),
        ..ev(t_ms, Kind::Packet, true)
    }
}

fn frag_needed_drop(t_ms: u64) -> [Event; 2] {
    let icmp = Event {
        protocol: Protocol::Icmp,
        icmp: Some(Icmp {
            icmp_type: 3,
            code: 4,
        }),
        ..drop_of(t_ms, drop_reason::NETFILTER_DROP, 576)
    };
    let eaten_by = Event {
        protocol: Protocol::Icmp,
        netfilter: Some(rule(
            "-A OUTPUT -p icmp -m icmp --icmp-type 3/4 -m comment --comment eater -j DROP",
        )),
        ..ev(t_ms, Kind::Netfilter, false)
    };
    [icmp, eaten_by]
}

#[test]
fn a_reject_mid_stream_is_a_reset_by_the_rule_without_any_handshake_seen() {
    let v = judge(vec![
        rule_reset(500),
        drop_of(500, drop_reason::NETFILTER_DROP, 80),
        Event {
            netfilter: Some(rule(
                "-A FORWARD -p tcp -m tcp --dport 9500 -m comment --comment cut -j REJECT --reject-with tcp-reset",
            )),
            ..ev(500, Kind::Netfilter, false)
        },
        error(501, libc::ECONNRESET, "ECONNRESET"),
    ]);
    assert_eq!(v.len(), 1, "{v:#?}");
    let v = &v[0];
    assert_eq!(v.outcome, Outcome::ResetAfterEstablished);
    assert_eq!(
        v.after_handshake.as_ref().unwrap().reset_by,
        Some(ResetBy::Rule)
    );
    assert_eq!(v.netfilter.as_ref().unwrap().chain, "FORWARD");
    assert_eq!((v.client.port, v.server.port), (CLIENT.1, 9500));
    assert_eq!(v.app_error.as_deref(), Some("ECONNRESET"));
}

#[test]
fn too_big_segments_are_an_mtu_black_hole_at_once_without_waiting_for_the_application() {
    let mut events = Vec::from(frag_needed_drop(100));
    events.extend((0..3).map(|_| drop_of(100, drop_reason::PKT_TOO_BIG, 1500)));
    // Judged a settle time after the burst: the application has not given up yet.
    let v = judge(events);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].outcome, Outcome::MtuBlackhole);
    let m = v[0].after_handshake.as_ref().unwrap().mtu.as_ref().unwrap();
    assert_eq!(m.dropped_sizes, [1500]);
    assert_eq!(m.icmp.dropped_by.as_ref().unwrap().chain, "OUTPUT");
}

#[test]
fn a_segment_and_its_retransmit_dropped_by_a_rule_are_a_stall_naming_the_rule() {
    let cut = rule("-A FORWARD -p tcp -m tcp --dport 9500 -m comment --comment cut -j DROP");
    let mut events = vec![drop_of(500, drop_reason::NETFILTER_DROP, 80)];
    events.push(Event {
        netfilter: Some(cut),
        ..ev(500, Kind::Netfilter, false)
    });
    events.push(retransmit(720, 1000));
    events.push(drop_of(720, drop_reason::NETFILTER_DROP, 80));
    let v = judge(events);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].outcome, Outcome::Stalled);
    assert!(
        v[0].explanation
            .contains("A netfilter rule on this node drops"),
        "{}",
        v[0].explanation
    );
}

#[test]
fn a_retransmission_timeout_that_recovers_gives_no_verdict_and_is_let_go() {
    let mut engine = agent_engine();
    let v = judge_after(
        &mut engine,
        vec![retransmit(300, 1000), retransmit(700, 1000)],
        QUIET_NS / MS + 2000,
    );
    assert!(v.is_empty(), "{v:#?}");
    assert!(engine.midstream.as_ref().unwrap().news.is_empty());
}

#[test]
fn a_single_segment_dropped_by_a_rule_then_silence_is_let_go() {
    // A late segment conntrack calls INVALID, dropped by a rule: the connection goes on.
    let mut engine = agent_engine();
    let v = judge_after(
        &mut engine,
        vec![drop_of(500, drop_reason::NETFILTER_DROP, 80)],
        QUIET_NS / MS + 2000,
    );
    assert!(v.is_empty(), "{v:#?}");
    assert!(engine.midstream.as_ref().unwrap().news.is_empty());
}

/// Segments too big for the path at `times_ms`, the node's ICMP "fragmentation needed" going
/// back to the client after the first.
fn too_big_with_the_icmp_going_back(times_ms: &[u64]) -> Vec<Event> {
    let mut events: Vec<Event> = times_ms
        .iter()
        .map(|t| drop_of(*t, drop_reason::PKT_TOO_BIG, 1500))
        .collect();
    events.insert(
        1,
        Event {
            protocol: Protocol::Icmp,
            icmp: Some(Icmp {
                icmp_type: 3,
                code: 4,
            }),
            ..ev(times_ms[0], Kind::Packet, false)
        },
    );
    events
}

#[test]
fn too_big_segments_whose_icmp_gets_through_are_path_mtu_discovery_not_a_black_hole() {
    let v = judge_after(
        &mut agent_engine(),
        too_big_with_the_icmp_going_back(&[100, 100, 101]),
        QUIET_NS / MS + 2000,
    );
    assert!(v.is_empty(), "{v:#?}");
    let v = judge(too_big_with_the_icmp_going_back(&[100, 100, 1300]));
    assert_eq!(v.len(), 1, "still too big a second later: {v:#?}");
    assert_eq!(v[0].outcome, Outcome::MtuBlackhole);
    let icmp = &v[0]
        .after_handshake
        .as_ref()
        .unwrap()
        .mtu
        .as_ref()
        .unwrap()
        .icmp;
    assert!(
        !icmp.dropped,
        "the ICMP went back, then was lost beyond this node: {icmp:?}"
    );
}

#[test]
fn a_refusal_stays_an_attempt() {
    let refusal = Event {
        tcp_flags: vec![TcpFlag::Rst, TcpFlag::Ack],
        seq: Some(0),
        ..ev(10, Kind::Packet, true)
    };
    let no_socket = Event {
        tcp_flags: vec![TcpFlag::Syn],
        reset: Some(ResetInfo {
            reason: Some(drop_reason::NO_SOCKET.into()),
        }),
        ..ev(10, Kind::SendReset, false)
    };
    let v = judge_after(
        &mut agent_engine(),
        vec![
            no_socket,
            refusal,
            error(11, libc::ECONNREFUSED, "ECONNREFUSED"),
        ],
        super::super::IDLE_NS / MS + 500,
    );
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].outcome, Outcome::RefusedNoListener);
    assert!(v[0].after_handshake.is_none());
}

#[test]
fn later_signals_of_a_judged_connection_open_nothing() {
    let mut engine = agent_engine();
    let first = judge_after(
        &mut engine,
        frag_needed_drop(100)
            .into_iter()
            .chain([drop_of(100, drop_reason::PKT_TOO_BIG, 1500)])
            .collect(),
        1000,
    );
    assert_eq!(first.len(), 1);
    let later = judge_after(
        &mut engine,
        vec![
            drop_of(3000, drop_reason::PKT_TOO_BIG, 1500),
            drop_of(3000, drop_reason::PKT_TOO_BIG, 1500),
        ],
        QUIET_NS / MS + 2000,
    );
    assert!(later.is_empty(), "{later:#?}");
}

#[test]
fn followed_connections_are_bounded_and_the_evicted_counted() {
    let mut engine = agent_engine();
    let events: Vec<Event> = (0..MAX_FOLLOWED as u16 + 5)
        .map(|i| Event {
            sport: 40000 + i,
            ..drop_of(u64::from(i), drop_reason::NETFILTER_DROP, 80)
        })
        .collect();
    let v = judge_after(&mut engine, events, 0);
    let m = engine.midstream.as_ref().unwrap();
    assert_eq!(m.news.len(), MAX_FOLLOWED);
    assert_eq!(engine.stats.tcp.followed_evicted, 5);
    // One drop each, nothing that persisted: let go without a verdict.
    assert!(v.is_empty(), "{v:#?}");
}

#[test]
fn the_error_report_of_a_reset_socket_finds_its_connection_by_the_socket() {
    let sock = Some("0xabc".to_string());
    let received = Event {
        sock: sock.clone(),
        ..ev(500, Kind::ReceiveReset, false)
    };
    // After the reset the socket's tuple is gone: as the kernel reports it then.
    let report = Event {
        sock,
        dport: 0,
        ..ev(501, Kind::SocketError, true)
    };
    let report = Event {
        error: error(501, libc::ECONNRESET, "ECONNRESET").error,
        ..report
    };
    let v = judge(vec![rule_reset(500), received, report]);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].app_error.as_deref(), Some("ECONNRESET"));
}
