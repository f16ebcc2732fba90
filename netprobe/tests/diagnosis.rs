//! Privileged tests of issue #16 "Diagnosis: the causes netprobe still gets wrong or leaves
//! vague": a refusal on localhost for a port another pod or a Service serves, interfaces named
//! in their own namespace when an ifindex exists twice, timelines without noise. Real netns
//! labs, real kernel programs, the real binary (DNS SERVFAIL/REFUSED: tests/dns.rs).

mod support;

use std::time::Duration;

use netprobe_lab::Connect;
use serde_json::Value;
use support::{TraceOutput, start_verdict_trace};

/// The only verdict of a trace (panics with the trace's output otherwise).
fn only_verdict(out: &TraceOutput) -> Value {
    let v = out.verdicts();
    assert_eq!(v.len(), 1, "one verdict:\n{}\n{}", out.dump(), out.stderr);
    v[0].clone()
}

/// The timeline's lines.
fn timeline(v: &Value) -> Vec<String> {
    v["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["what"].as_str().unwrap().to_string())
        .collect()
}

/// Item 7: the client pod's eth0 and a node interface (`np-up1`, made with the same index) share
/// an ifindex, and tc programs are attached on both. Each event names the interface of its own
/// namespace: the client's SYN leaves on eth0 in its pod, never on the node's np-up1.
#[test]
fn an_ifindex_shared_by_a_pod_and_the_node_is_named_in_the_packets_namespace() {
    netprobe_lab::require_root();
    let s1 = support::s1_lab("dgifidx");
    let (lab, client) = (&s1.lab, &s1.client);
    let _l = lab
        .listen(&s1.server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    let index = lab
        .sh(&client.netns, "cat /sys/class/net/eth0/ifindex")
        .unwrap();
    let index = index.trim();
    lab.sh(
        lab.node(),
        &format!(
            "ip link add np-up1 index {index} type veth peer name np-up1-peer
             ip link set np-up1-peer up
             ip link set np-up1 up"
        ),
    )
    .unwrap();
    let trace = start_verdict_trace(
        lab.node(),
        &[
            "--port",
            "9004",
            "--netns",
            lab.node(),
            "--netns",
            &client.netns,
            "--duration",
            "4s",
            "--count",
            "1",
        ],
    );
    let got = lab.connect(
        &client.netns,
        "10.42.0.30:9004".parse().unwrap(),
        Duration::from_secs(2),
    );
    let out = trace.finish_with_code(0);
    assert_eq!(got, Connect::Connected);
    let v = only_verdict(&out);
    assert_eq!(v["outcome"], "connected", "{v:#}");
    let lines = timeline(&v);
    assert!(
        lines.iter().all(|l| !l.contains("np-up1")),
        "a pod's packet named after a node interface:\n{lines:#?}"
    );
    let syn_out = format!("SYN egress on eth0 in {}", client.netns);
    assert!(
        lines.iter().any(|l| l.starts_with(&syn_out)),
        "{syn_out}:\n{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("SYN-ACK ingress on eth0 in {}", client.netns))),
        "{lines:#?}"
    );
}
