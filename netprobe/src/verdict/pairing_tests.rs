//! The DNS engine stays bounded and cheap under a flood of distinct queries, and what its caps
//! let go of is counted exactly.

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::{
    events::Kind,
    verdict::{Context, Engine, MAX_EVENTS_DNS, MAX_HELD, Outcome, tests::load},
};

const FLOOD: u32 = 100_000;

fn dns_engine() -> Engine {
    Engine::new(Context {
        port: 53,
        udp: true,
        ..Context::default()
    })
}

/// The answered lookup of the fixture: its client's query (leaving the client) and the reply.
fn query_and_reply() -> (Event, Event) {
    let events = load("dns_answered");
    let query = events[0].clone();
    let reply = events
        .iter()
        .find(|e| e.kind == Kind::Packet && e.dns.as_ref().is_some_and(|d| !d.query))
        .expect("the fixture has a reply")
        .clone();
    (query, reply)
}

/// Client `i` of a flood: distinct address, port and id for each `i`, scattered as random
/// ones would be (a multiplication by an odd number is a bijection modulo 2^32).
fn client(i: u32) -> (IpAddr, u16, u16) {
    let h = i.wrapping_mul(2_654_435_761);
    let addr = Ipv4Addr::new(10, (h >> 24) as u8, (h >> 16) as u8, (h >> 8) as u8);
    (
        IpAddr::V4(addr),
        1024 + (h & 0x3fff) as u16,
        (h >> 3) as u16,
    )
}

fn query_of(template: &Event, i: u32) -> Event {
    let (addr, port, id) = client(i);
    let mut e = template.clone();
    (e.src, e.sport) = (addr, port);
    e.dns.as_mut().expect("dns").id = id;
    e
}

fn reply_of(template: &Event, i: u32) -> Event {
    let (addr, port, id) = client(i);
    let mut e = template.clone();
    (e.dst, e.dport) = (addr, port);
    e.dns.as_mut().expect("dns").id = id;
    e
}

/// 100k unanswered queries with random addresses, ports and ids, at 100k/s: the open and the
/// decided exchanges stay at their caps, each eviction is counted, the work per datagram is
/// bounded, and the queries still open at the timeout are judged unanswered.
#[test]
fn dns_pairing_stays_bounded_under_100k_random_id_queries() {
    let (query, _) = query_and_reply();
    let mut engine = dns_engine();
    let mut verdicts = Vec::new();
    let mut most = (0, 0, 0, 0);
    for i in 0..FLOOD {
        verdicts.extend(engine.push(query_of(&query, i), u64::from(i) * 10_000));
        most = most.max((
            engine.attempts.len(),
            engine.done.len(),
            engine.order.len(),
            engine.by_port.len(),
        ));
    }
    assert!(verdicts.is_empty(), "nothing is judged before its timeout");
    let (open, done, order, ports) = most;
    assert!(open <= MAX_OPEN && done <= MAX_DONE, "{most:?}");
    assert!(
        order <= COMPACT_AT && ports <= MAX_OPEN + MAX_DONE,
        "{most:?}"
    );
    let dropped = u64::from(FLOOD) - MAX_OPEN as u64;
    assert_eq!(engine.stats.dns.dropped, dropped);
    assert_eq!(engine.stats.dns.forgotten_early, dropped - MAX_DONE as u64);
    assert_eq!(engine.stats.dns.judged_early, 0);
    assert_eq!(engine.done_order.len(), engine.done.len());
    // The old engine looked at every open exchange per datagram (4096 × 100k here).
    assert!(
        engine.visited < 8 * u64::from(FLOOD),
        "entries visited: {}",
        engine.visited
    );
    let end = u64::from(FLOOD) * 10_000 + udp::UDP_TIMEOUT_NS;
    let late = engine.poll(end);
    assert_eq!(
        late.len(),
        MAX_OPEN,
        "the open ones are judged at their timeout"
    );
    assert!(late.iter().all(|v| v.outcome == Outcome::Unanswered));
    engine.poll(end + DONE_KEEP_UDP_NS);
    assert!(engine.attempts.is_empty() && engine.done.is_empty());
    assert!(engine.by_port.is_empty() && engine.done_order.is_empty());
}

/// Answered lookups faster than they settle: beyond the cap the oldest answered one is judged
/// early, with the verdict it would have had; none is dropped.
#[test]
fn dns_answered_beyond_the_cap_are_judged_early_not_dropped() {
    let (query, reply) = query_and_reply();
    let mut engine = dns_engine();
    let mut verdicts = Vec::new();
    let n = MAX_OPEN as u32 + 1000;
    for i in 0..n {
        let now = u64::from(i) * 1_000;
        verdicts.extend(engine.push(query_of(&query, i), now));
        verdicts.extend(engine.push(reply_of(&reply, i), now));
    }
    assert_eq!(engine.stats.dns.judged_early, 1000);
    assert_eq!(engine.stats.dns.dropped, 0);
    assert_eq!(verdicts.len(), 1000);
    assert!(verdicts.iter().all(|v| v.outcome == Outcome::Answered));
    assert_eq!(
        engine.poll(u64::from(n) * 1_000 + SETTLE_NS).len(),
        MAX_OPEN
    );
}

/// A late reply of a query forgotten unjudged opens nothing (no verdict without a request).
#[test]
fn a_late_reply_of_a_dropped_query_opens_nothing() {
    let (query, reply) = query_and_reply();
    let mut engine = dns_engine();
    for i in 0..=MAX_OPEN as u32 {
        engine.push(query_of(&query, i), u64::from(i));
    }
    assert_eq!(engine.stats.dns.dropped, 1);
    assert!(engine.push(reply_of(&reply, 0), 5_000).is_empty());
    assert_eq!(
        engine.attempts.len(),
        MAX_OPEN,
        "the reply opened no exchange"
    );
}

/// One client repeating one query id keeps at most MAX_EVENTS_DNS of its datagrams (the rest
/// is counted), and the reply that decides still joins it.
#[test]
fn one_query_repeated_keeps_bounded_evidence() {
    let (query, reply) = query_and_reply();
    let mut engine = dns_engine();
    for t in 0..1000 {
        engine.push(query_of(&query, 7), t);
    }
    assert_eq!(
        engine.stats.dns.events_dropped,
        1000 - MAX_EVENTS_DNS as u64
    );
    engine.push(reply_of(&reply, 7), 1000);
    let v = engine.poll(1000 + SETTLE_NS);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].outcome, Outcome::Answered);
    assert_eq!(v[0].timeline.len(), MAX_EVENTS_DNS + 1);
}

/// Every open exchange repeating its query: the engine holds at most MAX_HELD events beyond the
/// first and deciding one of each exchange, and each one it let go of is counted.
#[test]
fn the_events_held_by_an_engine_are_bounded() {
    let (query, reply) = query_and_reply();
    let mut engine = dns_engine();
    let repeats = 10u32;
    for r in 0..repeats {
        for i in 0..MAX_OPEN as u32 {
            engine.push(query_of(&query, i), u64::from(r));
        }
    }
    let held: usize = engine.attempts.values().map(|a| a.events.len()).sum();
    assert_eq!(held, engine.held);
    assert_eq!(
        held, MAX_HELD,
        "the first event of each, then up to the bound"
    );
    let offered = u64::from(repeats) * MAX_OPEN as u64;
    assert_eq!(engine.stats.dns.events_dropped, offered - MAX_HELD as u64);
    // The reply that decides an exchange still joins it, beyond the bound.
    engine.push(reply_of(&reply, 0), 20);
    assert_eq!(engine.held, MAX_HELD + 1);
    let v = engine.poll(20 + SETTLE_NS);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].outcome, Outcome::Answered);
    assert_eq!(engine.held, MAX_HELD + 1 - v[0].timeline.len());
}

/// A trace of one port under a SYN flood from new ports: the decided attempts it remembers stay
/// at their cap (they grew by one per port for as long as the trace ran), counted.
#[test]
fn a_trace_under_a_syn_flood_remembers_a_bounded_number_of_attempts() {
    let syn_drop = load("s1_calico")
        .into_iter()
        .find(|e| e.kind == Kind::Drop && e.is_syn())
        .expect("the S1 fixture has a dropped SYN");
    let mut engine = Engine::new(Context {
        port: syn_drop.dport,
        ..Context::default()
    });
    let mut most_done = 0;
    for i in 0..FLOOD {
        let (addr, port, _) = client(i);
        let mut e = syn_drop.clone();
        (e.src, e.sport) = (addr, port);
        // 20 000 SYNs a second, for five seconds.
        engine.push(e, u64::from(i) * 50_000);
        most_done = most_done.max(engine.done.len());
    }
    assert!(
        most_done <= MAX_DONE + 20_000,
        "pruned once a second: {most_done}"
    );
    assert!(engine.stats.tcp.forgotten_early > 0);
    assert!(engine.attempts.len() <= MAX_OPEN);
    assert!(
        engine.visited < 8 * u64::from(FLOOD),
        "entries visited: {}",
        engine.visited
    );
}
