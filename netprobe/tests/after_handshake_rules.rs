//! Privileged tests of netfilter drops after the handshake (issue #18 §2, §3): every rule that
//! drops something of an established connection is named by a trace, with its path, whether
//! it has a counter or not — the ICMP "fragmentation needed" of an MTU black hole eaten by a
//! native nft rule, data segments cut by a native nft rule inserted mid-stream, and segments
//! dropped as conntrack INVALID after conntrack lost the flow. Real kernel programs, real
//! traffic, netns labs.

mod support;

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use netprobe_lab::mtu::{self, Pods};
use serde_json::Value;
use support::{TraceRun, start_verdict_trace};

const PORT: &str = "9500";

fn server_addr() -> SocketAddr {
    "10.42.0.30:9500".parse().unwrap()
}

/// Pods with a sink server, and a trace of the port on the node.
fn traced(p: &Pods, seconds: u32) -> TraceRun {
    traced_at(p, server_addr(), seconds)
}

/// [`traced`] with the server listening on `server`.
fn traced_at(p: &Pods, server: SocketAddr, seconds: u32) -> TraceRun {
    mtu::sink(p.lab.listen(&p.server.netns, server).unwrap());
    let duration = format!("{seconds}s");
    start_verdict_trace(
        p.lab.node(),
        &["--port", PORT, "--duration", &duration, "--count", "2"],
    )
}

/// The verdict on how the connection ended (the second one, after `connected`), once the
/// client gave up with ETIMEDOUT.
fn ended(trace: TraceRun, sent: std::io::Result<()>) -> Value {
    let err = sent.expect_err("nothing gets through");
    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
    let out = trace.finish_with_code(1);
    let v = out.verdicts();
    assert_eq!(v.len(), 2, "{}\n{}", out.dump(), out.stderr);
    assert_eq!(v[0]["outcome"], "connected", "{:#}", v[0]);
    v[1].clone()
}

/// A connection that carried data, then `script` ran on the node.
fn changed_mid_stream(p: &Pods, script: &str) -> TcpStream {
    let mut s = mtu::connect(&p.client.netns, server_addr()).unwrap();
    s.write_all(b"hello before the change").unwrap();
    std::thread::sleep(Duration::from_millis(700));
    p.lab.sh(p.lab.node(), script).unwrap();
    s
}

/// A rule named by a trace: with its path, not by counters.
fn assert_traced(nf: &Value, table: &str, comment: &str, v: &Value) {
    assert_eq!(nf["table"], table, "{v:#}");
    assert!(
        nf["rule"].as_str().unwrap_or_default().contains(comment),
        "{v:#}"
    );
    assert!(nf["evidence"].is_null(), "traced, not counted: {v:#}");
    assert!(
        nf["path"].as_array().is_some_and(|p| !p.is_empty()),
        "{v:#}"
    );
}

#[test]
fn mtu_black_hole_names_a_native_nft_rule_without_counter_eating_the_icmp() {
    let p = mtu::black_hole_nft("ahrnft").unwrap();
    let trace = traced(&p, 30);
    let mut s = mtu::connect(&p.client.netns, server_addr()).unwrap();
    let sent = mtu::send_and_wait(&mut s, 256 * 1024, Duration::from_secs(3));
    let v = ended(trace, sent);
    assert_eq!(v["outcome"], "mtu_blackhole", "{v:#}");
    let icmp = &v["after_handshake"]["mtu"]["icmp"];
    assert_eq!(icmp["dropped"], true, "{v:#}");
    let nf = &icmp["dropped_by"];
    assert_traced(nf, "frag_eater", "frag-needed-eater-nft", &v);
    assert_eq!(nf["backend"], "nftables", "{v:#}");
    assert_eq!(nf["chain"], "out", "{v:#}");
    let steps = v["next_steps"].to_string();
    assert!(steps.contains("frag_eater"), "{steps}");
}

/// The same over IPv6: the ICMPv6 "packet too big" eaten by a native nft rule without counter.
#[test]
fn mtu_black_hole_over_ipv6_names_a_native_nft_rule_without_counter_eating_the_icmpv6() {
    let p = mtu::black_hole_nft_v6("ahrnft6").unwrap();
    let server = SocketAddr::new(p.server.ip6.into(), 9500);
    let trace = traced_at(&p, server, 30);
    let mut s = mtu::connect(&p.client.netns, server).unwrap();
    let sent = mtu::send_and_wait(&mut s, 256 * 1024, Duration::from_secs(3));
    let v = ended(trace, sent);
    support::assert_names_the_black_hole(&v, &p.server.host_if);
    let nf = &v["after_handshake"]["mtu"]["icmp"]["dropped_by"];
    assert_traced(nf, "frag_eater", "frag-needed-eater-nft", &v);
}

#[test]
fn data_cut_mid_stream_by_a_native_nft_rule_without_counter_is_named() {
    let p = mtu::pods("ahrcut").unwrap();
    let trace = traced(&p, 30);
    // A policy change that cuts existing flows: their data, not new connections.
    let mut s = changed_mid_stream(
        &p,
        "nft -f - <<'EOF'
table inet cut {
  chain forward_cut {
    type filter hook forward priority filter; policy accept;
    tcp dport 9500 tcp flags & (fin | syn | rst) == 0 drop comment \"cut-existing-flows\"
  }
}
EOF",
    );
    let sent = mtu::send_and_wait(&mut s, 64 * 1024, Duration::from_secs(3));
    let v = ended(trace, sent);
    assert_eq!(v["outcome"], "stalled", "{v:#}");
    assert_traced(&v["netfilter"], "cut", "cut-existing-flows", &v);
    assert_eq!(v["netfilter"]["backend"], "nftables", "{v:#}");
    assert_eq!(v["netfilter"]["hook"], "forward", "{v:#}");
    let why = v["explanation"].as_str().unwrap();
    assert!(why.contains("A netfilter rule on this node drops"), "{why}");
    // The armed-flows table went with the flow, the trace table with the trace.
    let left = support::netprobe_tables(&p.lab, p.lab.node());
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn conntrack_invalid_mid_stream_names_the_rule_and_explains_invalid() {
    let p = mtu::pods("ahrinv").unwrap();
    // Conntrack follows the flow from its SYN (the rule registers its hooks); strict TCP
    // tracking will not pick the flow up again once its entry is gone.
    p.lab
        .sh(
            p.lab.node(),
            "iptables -I FORWARD -m conntrack --ctstate INVALID -m comment --comment ct-invalid-drop -j DROP
             sysctl -qw net.netfilter.nf_conntrack_tcp_loose=0",
        )
        .unwrap();
    let trace = traced(&p, 30);
    let mut s = mtu::connect(&p.client.netns, server_addr()).unwrap();
    s.write_all(b"hello before conntrack loses the flow")
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    p.lab
        .sh(p.lab.node(), "conntrack -D -p tcp --dport 9500")
        .unwrap();
    let sent = mtu::send_and_wait(&mut s, 64 * 1024, Duration::from_secs(3));
    let v = ended(trace, sent);
    assert_eq!(v["outcome"], "stalled", "{v:#}");
    assert_traced(&v["netfilter"], "filter", "ct-invalid-drop", &v);
    assert_eq!(v["netfilter"]["chain"], "FORWARD", "{v:#}");
    let why = v["explanation"].as_str().unwrap();
    assert!(why.contains("INVALID"), "{why}");
    let steps = v["next_steps"].to_string();
    assert!(
        steps.contains("asymmetric routing")
            && steps.contains("conntrack -S")
            && steps.contains("nf_conntrack_tcp_loose"),
        "{steps}"
    );
}
