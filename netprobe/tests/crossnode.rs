//! Privileged tests of the cross-node trace: two node namespaces joined by an underlay (plain
//! routes, or Flannel-style VXLAN), a pod on each, an agent per node, and the Kubernetes API
//! stand-in serving both nodes' pods and port-forwarding to each agent. The CLI ("the laptop",
//! unprivileged) asks both agents and joins what they saw of each attempt.

mod support;

use netprobe_lab::{
    kubeapi::FakeKube,
    rules,
    two_nodes::{SERVER_IP, TwoNodes},
    underlay::Overlay,
};
use serde_json::Value;

fn two_nodes(tag: &str, overlay: Overlay) -> TwoNodes {
    netprobe_lab::require_root();
    TwoNodes::new(tag, overlay, support::netprobe_bin()).unwrap()
}

/// Runs the cluster-mode trace (JSON); every record is checked against the schema.
fn trace(lab: &TwoNodes) -> (i32, Vec<Value>, String) {
    let t = lab.trace(support::netprobe_bin(), "json").unwrap();
    let records: Vec<Value> = t
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{}", t.stderr)))
        .collect();
    support::assert_schema_valid(&records);
    (t.code, records, t.stderr)
}

fn verdict<'a>(records: &'a [Value], stderr: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["kind"] == "verdict")
        .unwrap_or_else(|| panic!("no verdict: {records:#?}\n{stderr}"))
}

#[test]
fn cross_node_syn_dropped_by_calico_on_the_server_node_names_both_pods_and_the_rule() {
    let lab = two_nodes("xdrop", Overlay::Routed);
    // Calico on the scheduler's node admits 9005 only.
    let b = &lab.labs[1];
    rules::restore(
        b,
        "iptables-restore",
        &rules::calico_filter(&lab.server.host_if, "cali00000000000"),
    )
    .unwrap();
    let (code, records, stderr) = trace(&lab);
    assert_eq!(
        code, 1,
        "a diagnosed failure is exit 1:\n{records:#?}\n{stderr}"
    );
    assert!(
        stderr.contains("leads to pod financial-inference/seldon-scheduler-0 on node node-b"),
        "{stderr}"
    );
    let v = verdict(&records, &stderr);
    assert_eq!(v["outcome"], "dropped_by_rule", "{v:#}\n{stderr}");
    assert_eq!(v["client"]["peer"]["pod"], "client-0", "{v:#}");
    assert_eq!(v["server"]["peer"]["pod"], "seldon-scheduler-0", "{v:#}");
    assert_eq!(v["dialed"]["addr"], rules::CLUSTER_IP, "{v:#}");
    let nf = &v["netfilter"];
    assert_eq!(
        nf["chain"],
        format!("cali-tw-{}", lab.server.host_if),
        "{v:#}"
    );
    assert!(
        nf["rule"]
            .as_str()
            .unwrap()
            .contains("Drop if no policies passed packet"),
        "{v:#}"
    );
    assert!(
        nf["owner"]["policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("scheduler-allow-xds")),
        "the Calico policy: {v:#}"
    );
    let x = &v["cross_node"];
    assert_eq!(x["client_node"], "node-a", "{v:#}");
    assert_eq!(x["server_node"], "node-b", "{v:#}");
    assert_eq!(x["arrived"], true, "{v:#}");
    assert_eq!(x["left_via"]["interface"], "eth0", "{v:#}");
    assert_eq!(x["arrived_via"]["interface"], "eth0", "{v:#}");
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.starts_with("The SYN left node node-a via eth0")
            && why.contains("arrived at node node-b via eth0"),
        "{why}"
    );
    assert!(
        kube_forwarded(&lab.kube).len() >= 2,
        "both agents asked: {:?}",
        lab.kube.forwarded()
    );
    // Nothing of either trace is left on either node; the server node's agent armed the
    // dropped flow (its own table), disarmed once the drop was explained.
    for l in &lab.labs {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(6);
        let tables = loop {
            let tables = l.sh(l.node(), "nft list tables").unwrap();
            if !tables.contains("netprobe") || std::time::Instant::now() > deadline {
                break tables;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        assert!(!tables.contains("netprobe"), "{tables}");
    }
}

fn kube_forwarded(kube: &FakeKube) -> Vec<String> {
    let mut agents: Vec<String> = kube.forwarded().into_iter().map(|(_, p, _)| p).collect();
    agents.sort();
    agents.dedup();
    agents
}

#[test]
fn cross_node_syn_lost_on_the_vxlan_underlay_is_left_a_never_reached_b() {
    let lab = two_nodes("xlost", Overlay::Vxlan);
    // First the path works: the same trace says connected (so the test can fail both ways).
    let (code, records, stderr) = trace(&lab);
    let v = verdict(&records, &stderr);
    assert_eq!(code, 0, "{v:#}\n{stderr}");
    assert_eq!(v["outcome"], "connected", "{v:#}");
    assert_eq!(v["cross_node"]["arrived"], true, "{v:#}");
    assert_eq!(
        v["cross_node"]["left_via"]["interface"], "flannel.1",
        "{v:#}"
    );

    // A firewall between the machines drops VXLAN: no node sees it.
    lab.underlay
        .block(
            &lab.labs[0],
            &format!("udp dport {}", netprobe_lab::underlay::VXLAN_PORT),
        )
        .unwrap();
    let (code, records, stderr) = trace(&lab);
    assert_eq!(code, 1, "{records:#?}\n{stderr}");
    let v = verdict(&records, &stderr);
    assert_eq!(v["outcome"], "lost_between_nodes", "{v:#}\n{stderr}");
    let x = &v["cross_node"];
    assert_eq!(x["arrived"], false, "{v:#}");
    assert_eq!(x["left_via"]["interface"], "flannel.1", "{v:#}");
    let r = &v["route"];
    assert_eq!(r["dev"], "flannel.1", "{v:#}");
    assert_eq!(r["mtu"], 1450, "{v:#}");
    assert_eq!(r["encap"]["kind"], "vxlan", "{v:#}");
    assert_eq!(r["encap"]["vni"], 1, "{v:#}");
    assert_eq!(r["encap"]["port"], 8472, "{v:#}");
    assert_eq!(r["encap"]["underlay"], "eth0", "{v:#}");
    // The other node's VTEP, from flannel.1's neighbour and FDB entries.
    assert_eq!(
        r["encap"]["remote"],
        netprobe_lab::underlay::NODE_IPS[1],
        "{v:#}"
    );
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.contains("left node node-a via flannel.1")
            && why.contains("never arrived there")
            && why.contains("vxlan VNI 1, UDP 8472 over eth0"),
        "{why}"
    );
    assert!(
        v["next_steps"][0]
            .as_str()
            .unwrap()
            .contains("VXLAN (UDP 8472)"),
        "{v:#}"
    );
    assert_eq!(v["client"]["peer"]["pod"], "client-0", "{v:#}");
    // The client's node names the backend on the other node from its EndpointSlice.
    assert_eq!(v["server"]["peer"]["pod"], "seldon-scheduler-0", "{v:#}");

    // Always on: the client node's agent saw the SYN retransmits and, from its conntrack, that
    // they went to the scheduler pod on node-b.
    let metrics = netprobe_lab::metrics::scrape(lab.labs[0].node(), lab.port).unwrap();
    let to_node_b = &[("dst_node", "node-b")];
    assert!(
        netprobe_lab::metrics::sum(&metrics, "netprobe_syn_retransmits_total", to_node_b) >= 1,
        "{metrics}"
    );
    let out = lab.agent_out.lock().unwrap().clone();
    let events: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    support::assert_schema_valid(&events);
    // Its own verdict: the Service dialled, the backend on node-b, nothing dropped here.
    let v = events
        .iter()
        .find(|e| e["kind"] == "verdict" && e["dialed"]["addr"] == rules::CLUSTER_IP)
        .unwrap_or_else(|| panic!("no verdict of an attempt to the Service:\n{out}"));
    assert_eq!(v["outcome"], "timed_out", "{v:#}");
    assert_eq!(v["server"]["addr"], SERVER_IP, "{v:#}");
    assert_eq!(
        v["dialed"]["peer"]["service"], "financial-inference/seldon-scheduler:xds",
        "{v:#}"
    );
    assert_eq!(v["client"]["peer"]["pod"], "client-0", "{v:#}");
}
