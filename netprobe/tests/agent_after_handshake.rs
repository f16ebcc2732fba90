//! Privileged tests of the always-on agent judging connections that die after the handshake
//! (issue #18) from failure signals alone — an MTU black hole, a reset by a rule inserted
//! mid-stream, a mid-stream drop by a rule — and of a long healthy transfer costing it no event
//! and no verdict. Real kernel programs, real traffic, netns labs, the API stand-in for names.

mod support;

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use netprobe_lab::{
    kubeapi::FakeKube,
    metrics,
    midstream::{self, CUT_COMMENT},
    mtu::{self, Pods},
    process::Agent,
};
use serde_json::Value;

const NODE: &str = "lab-node";
const SERVER: &str = "10.42.0.30:9500";

fn server_addr() -> SocketAddr {
    SERVER.parse().unwrap()
}

/// The pods published, a sink server, and the agent naming them (started last: it sees no
/// handshake of what follows).
struct Running {
    p: Pods,
    kube: FakeKube,
    kubeconfig: PathBuf,
    agent: Agent,
}

fn run(p: Pods) -> Running {
    midstream::without_ipv6(&p).unwrap();
    mtu::sink(p.lab.listen(&p.server.netns, server_addr()).unwrap());
    let (kube, kubeconfig) = support::kube_api(&p.lab);
    midstream::publish(&kube, &p, NODE);
    let agent = support::start_named_agent(p.lab.node(), &kubeconfig, true);
    Running {
        p,
        kube,
        kubeconfig,
        agent,
    }
}

/// The agent's verdicts (schema-checked records), its /metrics at the end, its stderr.
fn stop(r: Running) -> (Vec<Value>, String, String, FakeKube, Pods) {
    // Time to judge what ended last (the settle time, a counter read).
    std::thread::sleep(Duration::from_millis(800));
    let (_, m) = support::get(&r.agent, "/metrics");
    let out = support::stop(r.agent);
    let _ = std::fs::remove_file(&r.kubeconfig);
    let records = support::ndjson(&out.stdout);
    support::assert_schema_valid(&records);
    let verdicts = records
        .into_iter()
        .filter(|r| r["kind"] == "verdict")
        .collect();
    (verdicts, m, out.stderr, r.kube, r.p)
}

/// The one verdict, about the lab's connection, naming both pods.
fn the_verdict(verdicts: &[Value], stderr: &str) -> Value {
    assert_eq!(verdicts.len(), 1, "one verdict: {verdicts:#?}\n{stderr}");
    let v = verdicts[0].clone();
    assert_eq!(v["client"]["peer"]["pod"], "client", "{v:#}");
    assert_eq!(v["server"]["peer"]["pod"], "server", "{v:#}");
    assert_eq!(v["server"]["port"], 9500, "{v:#}");
    v
}

/// The Kubernetes Event the agent posted for `reason`, on the client pod.
fn event_on_client(kube: &FakeKube, reason: &str) -> Value {
    let posted = kube.posted();
    posted
        .iter()
        .find(|e| e["reason"] == reason && e["regarding"]["name"] == "client")
        .cloned()
        .unwrap_or_else(|| panic!("no {reason} Event on the client: {posted:#?}"))
}

fn failed(m: &str, outcome: &str) -> u64 {
    metrics::sum(
        m,
        "netprobe_failed_connections_total",
        &[("outcome", outcome)],
    )
}

#[test]
fn agent_names_an_mtu_black_hole_with_device_mtu_sizes_and_the_rule_that_eats_the_icmp() {
    let r = run(mtu::black_hole("aamtu").unwrap());
    let mut s = mtu::connect(&r.p.client.netns, server_addr()).unwrap();
    let err = mtu::send_and_wait(&mut s, 256 * 1024, Duration::from_secs(3))
        .expect_err("the client cannot get its data through the black hole");
    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
    let (verdicts, m, stderr, kube, p) = stop(r);
    let v = the_verdict(&verdicts, &stderr);
    support::assert_names_the_black_hole(&v, &p.server.host_if);
    let steps = v["next_steps"].to_string();
    assert!(steps.contains("1450") && steps.contains("frag"), "{steps}");
    assert_eq!(failed(&m, "mtu_blackhole"), 1, "{m}");
    event_on_client(&kube, "PathMTUBlackhole");
}

/// A connection that carried data, then a policy change on the node that cuts it (`target`).
fn cut_mid_stream(tag: &str, target: &str) -> (Running, TcpStream) {
    let r = run(mtu::pods(tag).unwrap());
    let mut s = mtu::connect(&r.p.client.netns, server_addr()).unwrap();
    s.write_all(b"hello before the policy change").unwrap();
    std::thread::sleep(Duration::from_millis(700));
    midstream::cut_flows(&r.p, target).unwrap();
    (r, s)
}

#[test]
fn agent_names_the_rule_behind_a_mid_stream_reset() {
    let (r, mut s) = cut_mid_stream("aarst", "REJECT --reject-with tcp-reset");
    s.write_all(b"hello after it").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let err = s.read(&mut [0u8; 16]).expect_err("reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    let (verdicts, m, stderr, kube, _p) = stop(r);
    let v = the_verdict(&verdicts, &stderr);
    assert_eq!(v["outcome"], "reset_after_established", "{v:#}");
    assert_eq!(v["after_handshake"]["reset_by"], "rule", "{v:#}");
    assert_eq!(v["netfilter"]["chain"], "FORWARD", "{v:#}");
    let rule = v["netfilter"]["rule"].as_str().unwrap_or_default();
    assert!(rule.contains(CUT_COMMENT), "{v:#}");
    assert_eq!(v["app_error"], "ECONNRESET", "{v:#}");
    assert_eq!(failed(&m, "reset_after_established"), 1, "{m}");
    event_on_client(&kube, "ConnectionReset");
}

#[test]
fn agent_names_the_rule_behind_a_mid_stream_drop() {
    let (r, mut s) = cut_mid_stream("aadrop", "DROP");
    let err = mtu::send_and_wait(&mut s, 4096, Duration::from_secs(3))
        .expect_err("nothing gets through any more");
    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
    let (verdicts, m, stderr, kube, _p) = stop(r);
    let v = the_verdict(&verdicts, &stderr);
    assert_eq!(v["outcome"], "stalled", "{v:#}");
    assert_eq!(v["netfilter"]["chain"], "FORWARD", "{v:#}");
    let rule = v["netfilter"]["rule"].as_str().unwrap_or_default();
    assert!(rule.contains(CUT_COMMENT), "{v:#}");
    let why = v["explanation"].as_str().unwrap();
    assert!(why.contains("A netfilter rule on this node drops"), "{why}");
    assert_eq!(failed(&m, "stalled"), 1, "{m}");
    event_on_client(&kube, "ConnectionStalled");
}

/// What the kernel queued for the agent so far, and the retransmits it only counted.
fn events_total(agent: &Agent) -> (u64, u64) {
    let (_, m) = support::get(agent, "/metrics");
    (
        metrics::sum(&m, "netprobe_events_total", &[]),
        metrics::sum(&m, "netprobe_retransmits_counted_total", &[]),
    )
}

/// A healthy transfer costs the agent nothing: no verdict, and no event — its fast retransmits
/// are counted in the kernel (`netprobe_retransmits_counted_total`), not events; only a
/// retransmission timeout is one (a loaded machine may have one or two).
#[test]
fn a_long_healthy_transfer_costs_the_agent_no_event_and_no_verdict() {
    let r = run(mtu::pods("aaok").unwrap());
    // Settled: the agent's start and the lab's links are behind us.
    std::thread::sleep(Duration::from_millis(500));
    let before = events_total(&r.agent);
    let mut s: TcpStream = mtu::connect(&r.p.client.netns, server_addr()).unwrap();
    mtu::send_and_wait(&mut s, 512 * 1024 * 1024, Duration::from_secs(10))
        .expect("a healthy transfer");
    let resent = midstream::total_retrans(&s).unwrap();
    drop(s);
    std::thread::sleep(Duration::from_millis(500));
    let after = events_total(&r.agent);
    let (verdicts, m, stderr, _kube, _p) = stop(r);
    let (events, counted) = (after.0 - before.0, after.1 - before.1);
    eprintln!("healthy 512 MiB: {events} agent events, {resent} retransmits, {counted} counted");
    // The kernel counts retransmitted buffers (one may carry several segments of `resent`).
    assert!(
        resent == 0 || counted > 0,
        "{resent} segments resent, {counted} retransmits counted in the kernel, {events} events"
    );
    // A loaded machine may time out a retransmit or drop from a full backlog (real failure
    // signals, a handful); fast retransmits, thousands here, must not be events.
    assert!(
        events <= 2 + counted / 100,
        "512 MiB through the node cost the agent {events} events ({resent} segments resent, {counted} retransmits counted):\n{m}\n{stderr}"
    );
    assert!(verdicts.is_empty(), "{verdicts:#?}");
}
