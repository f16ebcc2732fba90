//! Privileged tests of the cross-node trace: two node namespaces joined by an underlay (plain
//! routes, or Flannel-style VXLAN), a pod on each, an agent per node, and the Kubernetes API
//! stand-in serving both nodes' pods and port-forwarding to each agent. The CLI ("the laptop",
//! unprivileged) asks both agents and joins what they saw of each attempt.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use netprobe_lab::{
    kubeapi::{FakeKube, Kind, endpoint_slice, pod, service},
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
    let records = records(&t.stdout, &t.stderr);
    (t.code, records, t.stderr)
}

/// The trace's JSON records, each checked against the schema.
fn records(stdout: &str, stderr: &str) -> Vec<Value> {
    let records: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{stderr}")))
        .collect();
    support::assert_schema_valid(&records);
    records
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
    block_vxlan(&lab);
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
    assert_lost_on_the_vxlan_underlay(v, "The SYN");
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

/// The CoreDNS stand-in's pod on node-b and the name the client looks up.
const COREDNS: &str = "coredns-6799fbcd5-x7k2p";
const COREDNS_IP: &str = "10.42.1.3";
const DNS_NAME: &str = "seldon-scheduler.financial-inference.svc.cluster.local";

/// CoreDNS on node-b behind the cluster DNS Service (kube-proxy's DNAT on node-a), answering
/// every A query.
fn coredns_on_node_b(lab: &mut TwoNodes) -> netprobe_lab::Pod {
    let coredns = lab.labs[1]
        .add_pod("kube-system", COREDNS, COREDNS_IP.parse().unwrap())
        .unwrap();
    let sock = netprobe_lab::in_netns(&coredns.netns, || {
        std::net::UdpSocket::bind(format!("{COREDNS_IP}:53"))
    })
    .unwrap()
    .unwrap();
    netprobe_lab::dns::serve(sock, Some(std::net::Ipv4Addr::new(10, 43, 51, 131)));
    rules::restore(
        &lab.labs[0],
        "iptables-restore",
        &rules::kube_dns_dnat(COREDNS_IP),
    )
    .unwrap();
    let node_b = netprobe_lab::two_nodes::NODES[1];
    lab.kube.apply(
        Kind::Pod,
        pod(
            "kube-system",
            COREDNS,
            node_b,
            COREDNS_IP,
            &[("coredns", "3d3d3d3d3d3d3d3d", &[53])],
        ),
    );
    lab.kube.apply(
        Kind::Service,
        service(
            "kube-system",
            "kube-dns",
            rules::KUBE_DNS_IP,
            &[("dns", 53, 53)],
        ),
    );
    let mut slice = endpoint_slice(
        "kube-system",
        "kube-dns",
        &[(COREDNS_IP, COREDNS)],
        &[("dns", 53)],
    );
    slice["endpoints"][0]["nodeName"] = serde_json::json!(node_b);
    lab.kube.apply(Kind::EndpointSlice, slice);
    coredns
}

/// `kubectl netprobe trace --pod client-0 --dns --count 1 -o json` from the laptop while the
/// client pod looks [`DNS_NAME`] up through the cluster DNS Service every second.
fn trace_dns(lab: &TwoNodes) -> (i32, Vec<Value>, String) {
    let port = lab.port.to_string();
    let child = lab
        .laptop(support::netprobe_bin())
        .args(["trace", "--cluster", "--via-agent", "--agent-port", &port])
        .args(["--pod", "client-0", "-n", "financial-inference", "--dns"])
        .args(["--duration", "40s", "--count", "1", "-o", "json"])
        .spawn()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, ns) = (stop.clone(), lab.client.netns.clone());
    let lookups = std::thread::spawn(move || {
        let to = format!("{}:53", rules::KUBE_DNS_IP);
        let mut id = 0x5150u16;
        while !stop2.load(Ordering::Relaxed) {
            netprobe_lab::in_netns(&ns, || {
                let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                s.send_to(&netprobe_lab::dns::a_query(id, DNS_NAME), &to)
                    .unwrap();
                let _ = s.recv(&mut [0u8; 512]);
            })
            .unwrap();
            id = id.wrapping_add(1);
        }
    });
    let t = netprobe_lab::process::wait_output(child, Duration::from_secs(90));
    stop.store(true, Ordering::Relaxed);
    lookups.join().unwrap();
    let t = t.unwrap();
    let records = records(&t.stdout, &t.stderr);
    (t.code(), records, t.stderr)
}

/// Issue #16 item 10: a DNS lookup whose CoreDNS pod is on another node, VXLAN blocked between
/// the nodes: the query left node-a via flannel.1 and never reached node-b.
#[test]
fn cross_node_dns_lookup_lost_on_the_vxlan_underlay_is_left_a_never_reached_b() {
    let mut lab = two_nodes("xdns", Overlay::Vxlan);
    coredns_on_node_b(&mut lab);
    block_vxlan(&lab);
    let (code, records, stderr) = trace_dns(&lab);
    assert!(
        stderr.contains(&format!(
            "{} leads to pod kube-system/{COREDNS} on node node-b",
            rules::KUBE_DNS_IP
        )),
        "{stderr}"
    );
    let v = verdict(&records, &stderr);
    assert_eq!(v["outcome"], "lost_between_nodes", "{v:#}\n{stderr}");
    assert_eq!(code, 1, "{v:#}\n{stderr}");
    assert_eq!(v["udp"]["dns"]["name"], DNS_NAME, "{v:#}");
    assert_eq!(v["udp"]["replied"], false, "{v:#}");
    assert_eq!(v["dialed"]["addr"], rules::KUBE_DNS_IP, "{v:#}");
    assert_eq!(v["server"]["addr"], COREDNS_IP, "{v:#}");
    assert_eq!(v["client"]["peer"]["pod"], "client-0", "{v:#}");
    assert_eq!(v["cross_node"]["client_node"], "node-a", "{v:#}");
    assert_eq!(v["cross_node"]["server_node"], "node-b", "{v:#}");
    assert_eq!(v["cross_node"]["arrived"], false, "{v:#}");
    assert_eq!(
        v["cross_node"]["left_via"]["interface"], "flannel.1",
        "{v:#}"
    );
    assert_eq!(v["route"]["encap"]["port"], 8472, "{v:#}");
    assert_lost_on_the_vxlan_underlay(v, &format!("The DNS query A {DNS_NAME}"));
    assert!(
        kube_forwarded(&lab.kube).len() >= 2,
        "both agents asked: {:?}",
        lab.kube.forwarded()
    );
}

/// Issue #16 item 10: the query crossed the VXLAN underlay and a Calico ingress policy on
/// CoreDNS's node dropped it: the joined verdict names that rule and both nodes.
#[test]
fn cross_node_dns_lookup_dropped_by_calico_on_the_dns_node_names_the_rule() {
    let mut lab = two_nodes("xdnsdrop", Overlay::Vxlan);
    let coredns = coredns_on_node_b(&mut lab);
    rules::restore(
        &lab.labs[1],
        "iptables-restore",
        &rules::calico_filter(&coredns.host_if, "cali00000000000"),
    )
    .unwrap();
    let (code, records, stderr) = trace_dns(&lab);
    let v = verdict(&records, &stderr);
    assert_eq!(v["outcome"], "dropped_by_rule", "{v:#}\n{stderr}");
    assert_eq!(code, 1, "{v:#}\n{stderr}");
    assert_eq!(v["udp"]["dns"]["name"], DNS_NAME, "{v:#}");
    assert_eq!(
        v["netfilter"]["chain"],
        format!("cali-tw-{}", coredns.host_if),
        "{v:#}"
    );
    let rule = v["netfilter"]["rule"].as_str().unwrap();
    assert!(rule.contains("Drop if no policies passed packet"), "{v:#}");
    let x = &v["cross_node"];
    assert_eq!(x["arrived"], true, "{v:#}");
    assert_eq!(x["server_node_outcome"], "dropped_by_rule", "{v:#}");
    assert_eq!(x["left_via"]["interface"], "flannel.1", "{v:#}");
    assert_eq!(x["arrived_via"]["interface"], "flannel.1", "{v:#}");
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.starts_with(&format!(
            "The DNS query A {DNS_NAME} left node node-a via flannel.1"
        )) && why.contains("arrived at node node-b via flannel.1")
            && why.contains("There it was stopped by a rule. Calico network policies"),
        "{why}"
    );
}

/// The joined verdict says what was `sent` left node-a via flannel.1, never reached node-b, and
/// names the VXLAN underlay to check.
fn assert_lost_on_the_vxlan_underlay(v: &Value, sent: &str) {
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.starts_with(&format!("{sent} left node node-a via flannel.1"))
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
}

/// A firewall between the machines that drops VXLAN (UDP 8472) leaving node-a.
fn block_vxlan(lab: &TwoNodes) {
    let vxlan = format!("udp dport {}", netprobe_lab::underlay::VXLAN_PORT);
    lab.underlay.block(&lab.labs[0], &vxlan).unwrap();
}
