//! Who sent a reset after the handshake, and why, from synthetic streams shaped like the lab's
//! (`netprobe/tests/after_handshake_resets.rs` runs the real thing).

use super::{
    established::ResetBy,
    established_tests::{error, ev, handshake, judge},
    resets::{Side, UNKNOWN_REASON},
    *,
};
use crate::{
    events::{Process, ResetInfo},
    model::{Peer, TcpFlag},
};

/// A reset the server pod's kernel sent: active (its socket, no causing segment) or in answer
/// to a client segment (`skb`, no socket); with the kernel's reason when it has one.
fn sent_reset(t_ms: u64, active: bool, reason: Option<&str>, by_client: bool) -> Event {
    let base = ev(t_ms, Kind::SendReset, active && !by_client);
    Event {
        reset: Some(ResetInfo {
            reason: reason.map(Into::into),
        }),
        sock: active.then(|| "0xffff1".into()),
        skb: (!active).then(|| "0xffff2".into()),
        process: Some(Process {
            pid: 4242,
            comm: "python3".into(),
        }),
        source: Some(Peer {
            namespace: Some("default".into()),
            pod: Some(if by_client { "client" } else { "server" }.into()),
            ..Default::default()
        }),
        ..base
    }
}

/// The connection, then `sent`, the reset arriving at the client and its ECONNRESET.
fn reset_with(sent: Event) -> Verdict {
    let t = sent.time_ns / MS_PER;
    let mut events = handshake();
    events.push(sent);
    events.push(Event {
        tcp_flags: vec![TcpFlag::Rst, TcpFlag::Ack],
        ..ev(t, Kind::Packet, true)
    });
    events.push(error(t + 1, libc::ECONNRESET, "ECONNRESET"));
    let v = judge(events);
    assert_eq!(v.len(), 2, "{v:#?}");
    assert_eq!(v[1].outcome, Outcome::ResetAfterEstablished);
    v[1].clone()
}

const MS_PER: u64 = 1_000_000;

#[test]
fn a_server_closing_with_unread_data_is_the_peer_named_with_its_process_and_pod() {
    let v = reset_with(sent_reset(500, true, Some("TCP_ABORT_ON_CLOSE"), false));
    let a = v.after_handshake.as_ref().unwrap();
    assert_eq!(a.reset_by, Some(ResetBy::Peer));
    assert_eq!(a.reset_reason.as_deref(), Some("TCP_ABORT_ON_CLOSE"));
    let s = a.reset_sender.as_ref().expect("the sender");
    assert_eq!(s.side, Side::Server);
    assert_eq!(s.process.as_ref().map(|p| p.pid), Some(4242));
    assert_eq!(
        s.pod.as_ref().and_then(|p| p.pod.as_deref()),
        Some("server")
    );
    assert!(
        v.explanation.contains(
            "python3 (pid 4242) in default/server closed the connection with data still unread"
        ),
        "{}",
        v.explanation
    );
    assert!(!v.explanation.contains("nothing on this node sent it"));
    assert!(
        v.next_steps[0].contains("python3 (pid 4242)"),
        "{:?}",
        v.next_steps
    );
    assert!(v.is_failure(), "a reset exits 1 whoever sent it");
}

#[test]
fn a_segment_for_a_socket_that_is_gone_is_the_kernels_no_socket() {
    let v = reset_with(sent_reset(500, false, Some("NO_SOCKET"), false));
    let a = v.after_handshake.as_ref().unwrap();
    assert_eq!(a.reset_by, Some(ResetBy::Kernel));
    assert_eq!(a.reset_reason.as_deref(), Some("NO_SOCKET"));
    assert!(a.reset_sender.is_none(), "no socket sent it");
    assert!(v.explanation.contains("(NO_SOCKET)"), "{}", v.explanation);
    assert!(v.next_steps[0].contains("restart"), "{:?}", v.next_steps);
}

#[test]
fn without_the_kernels_reason_it_is_unknown_and_the_closing_process_still_named() {
    let v = reset_with(sent_reset(500, true, None, false));
    let a = v.after_handshake.as_ref().unwrap();
    assert_eq!(a.reset_by, Some(ResetBy::Peer));
    assert_eq!(a.reset_reason.as_deref(), Some(UNKNOWN_REASON));
    let s = a.reset_sender.as_ref().unwrap();
    assert_eq!(s.process.as_ref().map(|p| p.comm.as_str()), Some("python3"));
}

#[test]
fn a_timer_reset_names_no_process_and_the_clients_own_abort_is_the_clients() {
    let v = reset_with(sent_reset(500, true, Some("TCP_KEEPALIVE_TIMEOUT"), false));
    let s = v.after_handshake.as_ref().unwrap().reset_sender.clone();
    assert!(
        s.unwrap().process.is_none(),
        "whoever ran the timer is not the cause"
    );
    assert!(v.explanation.contains("keepalive"), "{}", v.explanation);
    let v = reset_with(sent_reset(500, true, Some("TCP_ABORT_ON_LINGER"), true));
    let a = v.after_handshake.as_ref().unwrap();
    assert_eq!(a.reset_by, Some(ResetBy::Client));
    assert_eq!(a.reset_sender.as_ref().unwrap().side, Side::Client);
    assert!(
        v.explanation.contains("the client itself"),
        "{}",
        v.explanation
    );
}
