//! Privileged tests of the always-on agent explaining failed connections by itself (no trace
//! running): one `netprobe.verdict/v1` record per failed attempt, with the rule, the policy or
//! Service, the listeners and both pods — the S1 and S2 incidents in real netns labs, the real
//! binary, the Kubernetes API stand-in for names.

mod support;

use std::{path::Path, time::Duration};

use netprobe_lab::{
    Connect, Lab, Pod,
    kubeapi::{FakeKube, Kind, pod},
    process::Agent,
    rules::{CLUSTER_IP, restore},
};
use serde_json::Value;

const NODE: &str = "lab-node";

fn publish(kube: &FakeKube, p: &Pod, containers: &[(&str, &str, &[u16])]) {
    kube.apply(
        Kind::Pod,
        pod(&p.namespace, &p.name, NODE, &p.ip.to_string(), containers),
    );
}

/// The agent in the lab's node namespace, naming pods through the API stand-in.
fn start_agent(lab: &Lab, kubeconfig: &Path) -> Agent {
    support::start_agent(
        lab.node(),
        &[],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", NODE),
        ],
        true,
    )
}

/// Stops the agent; its NDJSON records (schema-checked) and stderr.
fn records(agent: Agent) -> (Vec<Value>, String) {
    let out = support::stop(agent);
    let records = support::ndjson(&out.stdout);
    support::assert_schema_valid(&records);
    (records, out.stderr)
}

/// With the agent alone running: `client` dials the scheduler's ClusterIP (S1) and gets
/// `expect`; the agent's records once it had time to judge.
fn dial_the_cluster_ip(
    lab: &Lab,
    kubeconfig: &Path,
    client: &Pod,
    expect: Connect,
) -> (Vec<Value>, String) {
    let agent = start_agent(lab, kubeconfig);
    assert_eq!(
        lab.connect(
            &client.netns,
            format!("{CLUSTER_IP}:9004").parse().unwrap(),
            Duration::from_millis(2500)
        ),
        expect
    );
    std::thread::sleep(Duration::from_millis(600));
    records(agent)
}

fn verdicts(records: &[Value]) -> Vec<&Value> {
    records.iter().filter(|r| r["kind"] == "verdict").collect()
}

fn stateless_ruleset(lab: &Lab) -> String {
    lab.sh(lab.node(), "nft -s list ruleset").unwrap()
}

/// The S1 objects: both pods, the Service and its endpoints.
fn publish_s1(kube: &FakeKube, client: &Pod, server: &Pod) {
    publish(kube, client, &[("client", "c0c0c0c0c0c0c0c0", &[])]);
    publish(
        kube,
        server,
        &[("scheduler", "5e5e5e5e5e5e5e5e", &[9004, 9005])],
    );
    support::publish_seldon_scheduler(kube);
}

/// The S1 lab with its rules and a listening scheduler, and the API stand-in that names its
/// objects; the kubeconfig file (removed by the caller) and the listener (kept open).
fn s1_published(
    tag: &str,
) -> (
    support::S1,
    FakeKube,
    std::path::PathBuf,
    std::net::TcpListener,
) {
    let s1 = support::s1_lab(tag);
    let listener = s1
        .lab
        .listen(&s1.server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    support::s1_rules(&s1.lab, &s1.server, &s1.client);
    let (kube, kubeconfig) = support::kube_api(&s1.lab);
    publish_s1(&kube, &s1.client, &s1.server);
    (s1, kube, kubeconfig, listener)
}

/// Done-when of #14: with only the agent running, the S1 drop (Calico end-of-tier deny behind
/// the kube-proxy ClusterIP) is one verdict naming the chain, the rule comment, the policy, the
/// Service with its ClusterIP and both pods; nothing else is written (no kernel noise); the
/// ruleset is as it was once the agent is gone.
#[test]
fn s1_the_agent_alone_names_rule_policy_service_and_both_pods() {
    let support::S1 {
        lab,
        client,
        server,
    } = support::s1_lab("avs1");
    let _l = lab
        .listen(&server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    support::s1_rules(&lab, &server, &client);
    let (kube, kubeconfig) = support::kube_api(&lab);
    publish_s1(&kube, &client, &server);
    let before = stateless_ruleset(&lab);
    let (records, stderr) = dial_the_cluster_ip(&lab, &kubeconfig, &client, Connect::TimedOut);
    assert_eq!(
        before,
        stateless_ruleset(&lab),
        "the agent left the ruleset changed"
    );
    let dump = || format!("{records:#?}\n{stderr}");
    let v = verdicts(&records);
    assert_eq!(v.len(), 1, "one verdict for one attempt: {}", dump());
    let v = v[0];
    assert_eq!(v["schema"], "netprobe.verdict/v1");
    assert_eq!(v["outcome"], "dropped_by_rule", "{v:#}");
    let n = &v["netfilter"];
    assert_eq!(n["chain"], format!("cali-tw-{}", server.host_if), "{v:#}");
    assert!(
        n["comments"]
            .as_array()
            .is_some_and(|c| c.contains(&"Drop if no policies passed packet".into())),
        "{v:#}"
    );
    assert_eq!(n["owner"]["system"], "calico", "{v:#}");
    assert_eq!(
        n["owner"]["policies"],
        serde_json::json!(["financial-inference/scheduler-allow-xds"]),
        "{v:#}"
    );
    assert_eq!(v["dialed"]["addr"], CLUSTER_IP, "{v:#}");
    assert_eq!(
        v["dialed"]["peer"]["service"], "financial-inference/seldon-scheduler:xds",
        "{v:#}"
    );
    assert_eq!(v["client"]["peer"]["pod"], "client-0", "{v:#}");
    assert_eq!(v["server"]["peer"]["pod"], "seldon-scheduler-0", "{v:#}");
    // Only verdicts reach the log: no raw drops, no IPv6 router solicitations.
    for r in &records {
        assert!(
            ["verdict", "suppressed"].contains(&r["kind"].as_str().unwrap_or("")),
            "not a verdict: {r:#}"
        );
    }
    let _ = std::fs::remove_file(kubeconfig);
}

/// Done-when of #14, S2: a refusal on 127.0.0.1:9500 inside the pod is explained with what
/// listens there and what the pod declares, by the agent alone.
#[test]
fn s2_the_agent_alone_explains_a_refusal_with_listeners_and_declared_ports() {
    let mut lab = Lab::new("avs2").unwrap();
    let p = lab
        .add_pod("financial-ml", "mlserver-0", "10.42.0.10".parse().unwrap())
        .unwrap();
    let _l = lab
        .listen(&p.netns, "127.0.0.1:9000".parse().unwrap())
        .unwrap();
    let (kube, kubeconfig) = support::kube_api(&lab);
    publish(
        &kube,
        &p,
        &[
            ("mlserver", "3a3a3a3a3a3a3a3a", &[9500]),
            ("agent", "a9e1a9e1a9e1a9e1", &[]),
        ],
    );
    let agent = start_agent(&lab, &kubeconfig);
    assert_eq!(
        lab.connect(
            &p.netns,
            "127.0.0.1:9500".parse().unwrap(),
            Duration::from_secs(2)
        ),
        Connect::Refused
    );
    std::thread::sleep(Duration::from_millis(600));
    let (records, stderr) = records(agent);
    let v = verdicts(&records);
    assert_eq!(v.len(), 1, "{records:#?}\n{stderr}");
    let v = v[0];
    assert_eq!(v["outcome"], "refused_no_listener", "{v:#}");
    assert_eq!(v["server"]["addr"], "127.0.0.1");
    assert_eq!(v["server"]["port"], 9500);
    assert_eq!(v["server"]["peer"]["pod"], "mlserver-0", "{v:#}");
    assert!(
        v["listeners"]
            .as_array()
            .is_some_and(|l| l.iter().any(|l| l["port"] == 9000)),
        "{v:#}"
    );
    let why = v["explanation"].as_str().unwrap();
    assert!(why.contains("Nothing listens on 127.0.0.1:9500"), "{why}");
    assert!(
        why.contains(
            "declares containerPort 9500 in container mlserver, but nothing listens on it"
        ),
        "{why}"
    );
    let _ = std::fs::remove_file(kubeconfig);
}

/// Done-when of #14: a kube-proxy "has no endpoints" REJECT that the client does not retry is
/// named by the agent alone, with its Service.
#[test]
fn a_no_endpoints_reject_not_retried_is_named_with_its_service() {
    let support::S1 { lab, client, .. } = support::s1_lab("avnoep");
    restore(
        &lab,
        "iptables-restore",
        &netprobe_lab::rules::kube_proxy_no_endpoints(),
    )
    .unwrap();
    let (kube, kubeconfig) = support::kube_api(&lab);
    publish(&kube, &client, &[("client", "c0c0c0c0c0c0c0c0", &[])]);
    support::publish_seldon_scheduler(&kube);
    let (records, stderr) = dial_the_cluster_ip(&lab, &kubeconfig, &client, Connect::Refused);
    let v = verdicts(&records);
    assert_eq!(v.len(), 1, "{records:#?}\n{stderr}");
    let v = v[0];
    assert_eq!(v["outcome"], "refused_by_rule", "{v:#}");
    let n = &v["netfilter"];
    assert_eq!(n["chain"], "KUBE-SERVICES", "{v:#}");
    assert_eq!(n["owner"]["kind"], "kube-proxy-no-endpoints", "{v:#}");
    assert_eq!(
        n["owner"]["object"], "financial-inference/seldon-scheduler:xds",
        "{v:#}"
    );
    assert_eq!(v["server"]["addr"], CLUSTER_IP, "{v:#}");
    assert_eq!(
        v["server"]["peer"]["service"], "financial-inference/seldon-scheduler:xds",
        "{v:#}"
    );
    assert_eq!(v["client"]["peer"]["pod"], "client-0", "{v:#}");
    let _ = std::fs::remove_file(kubeconfig);
}

/// A killed agent's armed-flow table (its process is gone) is removed when the next agent
/// starts; the rest of the ruleset is left as it was.
#[test]
fn a_killed_agents_armed_table_is_removed_at_the_next_start() {
    netprobe_lab::require_root();
    let lab = Lab::new("avleft").unwrap();
    lab.sh(
        lab.node(),
        "iptables -A FORWARD -p tcp --dport 9004 -j DROP",
    )
    .unwrap();
    let before = stateless_ruleset(&lab);
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let table = format!("netprobe_{dead}_armed");
    lab.sh(
        lab.node(),
        &format!(
            "nft add table inet {table}; nft add chain inet {table} pre '{{ type filter hook prerouting priority -2147483648; policy accept; }}'"
        ),
    )
    .unwrap();
    assert!(stateless_ruleset(&lab).contains(&table));
    let agent = support::start_agent(lab.node(), &[], &[], false);
    assert_eq!(
        stateless_ruleset(&lab),
        before,
        "the left-over is gone, nothing else changed"
    );
    support::stop(agent);
    assert_eq!(stateless_ruleset(&lab), before);
}

/// Wall-clock time from just before `client_ns` dials `addr` to the agent's first failure
/// counted in /metrics (counted when it writes the verdict), and what connect() got.
fn time_the_verdict(
    lab: &Lab,
    agent: &Agent,
    client_ns: &str,
    addr: std::net::SocketAddr,
) -> (Duration, Connect) {
    let failed = |agent: &Agent| {
        netprobe_lab::metrics::sum(
            &support::get(agent, "/metrics").1,
            "netprobe_failed_connections_total",
            &[],
        )
    };
    assert_eq!(failed(agent), 0);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        let client = s.spawn(|| lab.connect(client_ns, addr, Duration::from_millis(2500)));
        let judged_after = loop {
            if failed(agent) > 0 {
                break started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "no verdict within 5 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        (judged_after, client.join().unwrap())
    })
}

/// Issue #16 item 9: a SYN dropped by a rule is judged as soon as the drop and its rule are
/// known (the rule from the counters read at the drop), before the client's first retransmit
/// (1 s after the SYN). Timed by wall clock from just before connect() to the failure counted
/// in /metrics (the agent counts it when it writes the verdict); the old engine waited for the
/// retransmit and a settle time (~1.4 s).
#[test]
fn a_syn_dropped_by_a_rule_is_judged_before_the_first_retransmit() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("avfast").unwrap();
    let a = lab
        .add_pod("default", "a-0", "10.42.0.81".parse().unwrap())
        .unwrap();
    lab.add_pod("default", "b-0", "10.42.0.82".parse().unwrap())
        .unwrap();
    lab.sh(
        lab.node(),
        "iptables -A FORWARD -p tcp --dport 9011 -j DROP",
    )
    .unwrap();
    let agent = support::start_agent(lab.node(), &[], &[], true);
    let (judged_after, connect) =
        time_the_verdict(&lab, &agent, &a.netns, "10.42.0.82:9011".parse().unwrap());
    assert_eq!(connect, Connect::TimedOut);
    eprintln!("agent verdict {judged_after:?} after the SYN");
    let (records, stderr) = records(agent);
    let v = verdicts(&records);
    assert_eq!(v.len(), 1, "{records:#?}\n{stderr}");
    assert_eq!(v[0]["outcome"], "dropped_by_rule", "{:#}", v[0]);
    assert_eq!(v[0]["netfilter"]["chain"], "FORWARD", "{:#}", v[0]);
    assert_eq!(
        v[0]["syn_retransmits"], 0,
        "judged before the retransmit: {:#}",
        v[0]
    );
    assert!(
        judged_after < Duration::from_millis(950),
        "the verdict came {judged_after:?} after the SYN (the first retransmit is at 1 s)"
    );
}

/// Issue #16 item 9, through a Service: the S1 SYN to the ClusterIP, DNAT'd to the scheduler
/// pod and dropped there by Calico's policy, is judged before the client's first retransmit
/// and still names the ClusterIP and Service dialled: the drop carries the original destination
/// of its conntrack entry (the agent used to wait for its armed trace of the retransmit, ~1.4 s).
#[test]
fn a_syn_to_a_service_dropped_by_a_rule_names_the_cluster_ip_before_the_first_retransmit() {
    let (support::S1 { lab, client, .. }, _kube, kubeconfig, _l) = s1_published("avsvcfast");
    let agent = start_agent(&lab, &kubeconfig);
    let (judged_after, connect) = time_the_verdict(
        &lab,
        &agent,
        &client.netns,
        format!("{CLUSTER_IP}:9004").parse().unwrap(),
    );
    assert_eq!(connect, Connect::TimedOut);
    eprintln!("agent verdict {judged_after:?} after the SYN to the ClusterIP");
    let (records, stderr) = records(agent);
    let v = verdicts(&records);
    assert_eq!(v.len(), 1, "{records:#?}\n{stderr}");
    let v = v[0];
    assert_eq!(v["outcome"], "dropped_by_rule", "{v:#}");
    assert_eq!(
        v["syn_retransmits"], 0,
        "judged before the retransmit: {v:#}"
    );
    assert_eq!(v["dialed"]["addr"], CLUSTER_IP, "{v:#}");
    assert_eq!(v["dialed"]["port"], 9004, "{v:#}");
    assert_eq!(
        v["dialed"]["peer"]["service"], "financial-inference/seldon-scheduler:xds",
        "{v:#}"
    );
    assert_eq!(v["server"]["addr"], "10.42.0.30", "{v:#}");
    assert_eq!(v["server"]["peer"]["pod"], "seldon-scheduler-0", "{v:#}");
    assert_eq!(v["client"]["peer"]["pod"], "client-0", "{v:#}");
    assert!(
        judged_after < Duration::from_millis(950),
        "the verdict came {judged_after:?} after the SYN (the first retransmit is at 1 s)"
    );
    let _ = std::fs::remove_file(kubeconfig);
}

/// Issue #16 item 2 in the always-on agent: a connect() in a pod whose own route table has an
/// unreachable route fails before any packet exists; the agent names the pod, the route and
/// the errno.
#[test]
fn the_agent_names_an_unreachable_route_inside_a_pod() {
    let (support::S1 { lab, client, .. }, _kube, kubeconfig, _l) = s1_published("avpodrt");
    lab.sh(&client.netns, "ip route replace unreachable 10.42.0.30/32")
        .unwrap();
    let agent = start_agent(&lab, &kubeconfig);
    let (_, connect) = time_the_verdict(
        &lab,
        &agent,
        &client.netns,
        "10.42.0.30:9004".parse().unwrap(),
    );
    assert_eq!(connect, Connect::Other(libc::EHOSTUNREACH));
    let (records, stderr) = records(agent);
    let v = verdicts(&records);
    assert_eq!(v.len(), 1, "{records:#?}\n{stderr}");
    let v = v[0];
    assert_eq!(v["outcome"], "unreachable", "{v:#}");
    assert_eq!(v["client"]["peer"]["pod"], "client-0", "{v:#}");
    assert_eq!(
        v["client"]["peer"]["namespace"], "financial-inference",
        "{v:#}"
    );
    assert_eq!(v["server"]["peer"]["pod"], "seldon-scheduler-0", "{v:#}");
    let n = &v["no_route"];
    assert_eq!(n["in_connect"], true, "{v:#}");
    assert_eq!(n["client_sees"], "EHOSTUNREACH", "{v:#}");
    assert_eq!(n["route"]["kind"], "unreachable", "{v:#}");
    assert_eq!(n["route"]["prefix"], "10.42.0.30/32", "{v:#}");
    assert_eq!(n["route"]["table"], "main", "{v:#}");
    let why = v["explanation"].as_str().unwrap();
    assert!(!why.contains("0.0.0.0"), "no source address existed: {why}");
    let _ = std::fs::remove_file(kubeconfig);
}
