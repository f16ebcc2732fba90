//! Privileged tests of connections that die after the handshake (issue #18): `trace` keeps
//! following a connection that connected and judges how it ends — an MTU black hole, a reset
//! by a netfilter rule inserted mid-stream, a stall with no drop on this node, and a long
//! healthy transfer that closes cleanly. Real kernel programs, real traffic, netns labs.

mod support;

use std::{
    io::{ErrorKind, Read, Write},
    net::SocketAddr,
    time::Duration,
};

use netprobe_lab::mtu::{self, Pods};
use serde_json::Value;
use support::{TraceOutput, start_verdict_trace};

const PORT: &str = "9500";
const SERVER: &str = "10.42.0.30:9500";

fn server_addr() -> SocketAddr {
    SERVER.parse().unwrap()
}

/// A sink server on the server pod.
fn serve(p: &Pods) {
    mtu::sink(p.lab.listen(&p.server.netns, server_addr()).unwrap());
}

/// The connection's two verdicts: `connected` first, then how it ended.
fn two_verdicts(out: &TraceOutput) -> (Value, Value) {
    let v = out.verdicts();
    assert_eq!(
        v.len(),
        2,
        "connected, then how it ended:\n{}\n{}",
        out.dump(),
        out.stderr
    );
    assert_eq!(v[0]["outcome"], "connected", "{:#}", v[0]);
    assert_eq!(
        (&v[0]["client"]["port"], &v[0]["server"]["addr"]),
        (&v[1]["client"]["port"], &v[1]["server"]["addr"]),
        "the same connection"
    );
    (v[0].clone(), v[1].clone())
}

/// A client sending through the black hole to `server` under a trace: how it ended, checked
/// for the device, its MTU, the dropped sizes and the rule that ate the ICMP.
fn black_hole_verdict(p: &Pods, server: SocketAddr) -> Value {
    let trace = start_verdict_trace(
        p.lab.node(),
        &["--port", PORT, "--duration", "30s", "--count", "2"],
    );
    let mut s = mtu::connect(&p.client.netns, server).unwrap();
    let err = mtu::send_and_wait(&mut s, 256 * 1024, Duration::from_secs(3))
        .expect_err("the client cannot get its data through the black hole");
    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
    let out = trace.finish_with_code(1);
    let (_, v) = two_verdicts(&out);
    support::assert_names_the_black_hole(&v, &p.server.host_if);
    v
}

#[test]
fn mtu_black_hole_names_device_mtu_sizes_and_the_rule_that_eats_the_icmp() {
    let p = mtu::black_hole("ahmtu").unwrap();
    serve(&p);
    let v = black_hole_verdict(&p, server_addr());
    let a = &v["after_handshake"];
    assert_eq!(a["mss"]["client"], 1460, "{v:#}");
    assert_eq!(a["mss"]["server"], 1460, "{v:#}");
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.contains(&p.server.host_if) && why.contains("MTU 1400"),
        "{why}"
    );
    let steps = v["next_steps"].to_string();
    assert!(steps.contains("1450") && steps.contains("frag"), "{steps}");
}

/// The same black hole over IPv6: segments too big for the narrow hop, the node's ICMPv6
/// "packet too big" eaten by an ip6tables rule.
#[test]
fn mtu_black_hole_over_ipv6_names_device_mtu_sizes_and_the_rule_that_eats_the_icmpv6() {
    let p = mtu::black_hole_v6("ahmtu6").unwrap();
    let server = SocketAddr::new(p.server.ip6.into(), 9500);
    mtu::sink(p.lab.listen(&p.server.netns, server).unwrap());
    let v = black_hole_verdict(&p, server);
    // IPv6 headers are 40 bytes: the MSS both sides announce is 1440.
    assert_eq!(v["after_handshake"]["mss"]["client"], 1440, "{v:#}");
}

#[test]
fn mid_stream_reset_by_a_rule_inserted_after_the_handshake_names_the_rule() {
    let p = mtu::pods("ahrst").unwrap();
    serve(&p);
    let trace = start_verdict_trace(
        p.lab.node(),
        &["--port", PORT, "--duration", "20s", "--count", "2"],
    );
    let mut s = mtu::connect(&p.client.netns, server_addr()).unwrap();
    s.write_all(b"hello before the policy change").unwrap();
    std::thread::sleep(Duration::from_millis(700));
    p.lab
        .sh(
            p.lab.node(),
            "iptables -I FORWARD -p tcp --dport 9500 -m comment --comment cut-existing-flows -j REJECT --reject-with tcp-reset",
        )
        .unwrap();
    s.write_all(b"hello after it").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let err = s.read(&mut [0u8; 16]).expect_err("reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    let out = trace.finish_with_code(1);
    let (_, v) = two_verdicts(&out);
    assert_eq!(v["outcome"], "reset_after_established", "{v:#}");
    assert_eq!(v["after_handshake"]["reset_by"], "rule", "{v:#}");
    assert_eq!(v["netfilter"]["chain"], "FORWARD", "{v:#}");
    assert!(
        v["netfilter"]["rule"]
            .as_str()
            .unwrap_or_default()
            .contains("cut-existing-flows"),
        "{v:#}"
    );
    assert_eq!(v["app_error"], "ECONNRESET", "{v:#}");
}

#[test]
fn stall_with_no_drop_on_this_node_names_the_route() {
    let p = mtu::pods("ahstall").unwrap();
    serve(&p);
    // Only the node and the client are watched: the server pod is "beyond this node", and
    // what it drops nobody here sees.
    let trace = start_verdict_trace(
        p.lab.node(),
        &[
            "--port",
            PORT,
            "--netns",
            p.lab.node(),
            "--netns",
            &p.client.netns,
            "--duration",
            "30s",
            "--count",
            "2",
        ],
    );
    let mut s = mtu::connect(&p.client.netns, server_addr()).unwrap();
    p.lab
        .sh(
            &p.server.netns,
            "iptables -I INPUT -p tcp --dport 9500 -m length --length 200:65535 -j DROP",
        )
        .unwrap();
    let err = mtu::send_and_wait(&mut s, 64 * 1024, Duration::from_secs(3))
        .expect_err("nothing is acknowledged");
    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
    let out = trace.finish_with_code(1);
    let (_, v) = two_verdicts(&out);
    assert_eq!(v["outcome"], "stalled", "{v:#}");
    let a = &v["after_handshake"];
    assert!(a["drops"].as_array().is_none_or(Vec::is_empty), "{v:#}");
    let resent = a["retransmits"].as_array().expect("retransmits");
    assert!(
        resent.len() >= 2 && resent.iter().all(|r| r["bytes"].as_u64() > Some(0)),
        "{v:#}"
    );
    assert_eq!(v["route"]["dev"], p.server.host_if.as_str(), "{v:#}");
    assert_eq!(v["app_error"], "ETIMEDOUT", "{v:#}");
    let why = v["explanation"].as_str().unwrap();
    assert!(why.contains("Nothing on this node dropped"), "{why}");
}

/// `bytes` sent from the client pod to the sink server and closed, under a trace of the port
/// (exit 0: every connection connected and closed cleanly).
fn traced_transfer(p: &Pods, bytes: usize) -> TraceOutput {
    let trace = start_verdict_trace(
        p.lab.node(),
        &["--port", PORT, "--duration", "40s", "--count", "2"],
    );
    let mut s = mtu::connect(&p.client.netns, server_addr()).unwrap();
    mtu::send_and_wait(&mut s, bytes, Duration::from_secs(10)).expect("a healthy transfer");
    drop(s);
    trace.finish_with_code(0)
}

/// A lossy but healthy transfer (a rule drops 0.3 % of its data segments): the kernel
/// recovers with fast retransmits, which are counted, not events — the closed verdict has the
/// connection's lifetime count (`resent_total`) above the retransmits it lists (only those
/// after a retransmission timeout), and the trace received far fewer events than that.
#[test]
fn lossy_transfer_closes_cleanly_and_its_fast_retransmits_are_counted_not_events() {
    let p = mtu::pods("ahloss").unwrap();
    serve(&p);
    p.lab
        .sh(
            p.lab.node(),
            "nft add table inet lossy
             nft add chain inet lossy thin '{ type filter hook forward priority 0; }'
             nft add rule inet lossy thin tcp dport 9500 numgen random mod 1000 '<' 3 drop",
        )
        .unwrap();
    let out = traced_transfer(&p, 64 * 1024 * 1024);
    let (_, v) = two_verdicts(&out);
    assert_eq!(v["outcome"], "closed", "{v:#}");
    let a = &v["after_handshake"];
    let total = a["resent_total"].as_u64().expect("resent_total");
    let after_timeout = a["retransmits"].as_array().map_or(0, Vec::len) as u64;
    assert!(
        total >= 20 && total > after_timeout,
        "fast retransmits counted by the kernel: {v:#}"
    );
    let events = out.summary["events"]
        .as_u64()
        .expect("events in the summary");
    // Each dropped segment is a drop event; its fast retransmit is not one.
    assert!(
        events < 3 * total,
        "{events} events for {total} segments resent"
    );
}

#[test]
fn long_healthy_transfer_stays_connected_and_closes_cleanly() {
    let p = mtu::pods("ahok").unwrap();
    serve(&p);
    let out = traced_transfer(&p, 512 * 1024 * 1024);
    let (connected, v) = two_verdicts(&out);
    assert_eq!(connected["outcome"], "connected");
    assert_eq!(v["outcome"], "closed", "{v:#}");
    assert!(v["after_handshake"]["reset_by"].is_null(), "{v:#}");
    assert_eq!(
        out.summary["lost"].as_u64().expect("lost in the summary"),
        0
    );
}
