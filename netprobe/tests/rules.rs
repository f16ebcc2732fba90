//! Privileged tests of netfilter attribution: real rule sets in the formats Calico, kube-proxy
//! and kube-router write (see shared/reference), loaded into a lab node namespace; real SYNs;
//! the real binary. Each asserts table, chain, rule text/comment, the translated object, and
//! that the ruleset is unchanged after the trace (`nft -s`: stateless, counters aside).

mod support;

use std::{net::SocketAddr, time::Duration};

use netprobe_lab::{Connect, Lab, Pod};
use serde_json::Value;
use support::{S1, TraceOutput, s1_lab, start_trace};

use netprobe_lab::rules::{
    CLUSTER_IP, calico_filter, kube_proxy_dnat, kube_proxy_no_endpoints, kube_router_reject,
};

fn load(lab: &Lab, restore: &str, rules: &str) {
    let path = std::env::temp_dir().join(format!("netprobe-rules-{}", std::process::id()));
    std::fs::write(&path, rules).unwrap();
    lab.sh(
        lab.node(),
        &format!("{restore} --noflush < {}", path.display()),
    )
    .unwrap();
    let _ = std::fs::remove_file(path);
}

fn stateless_ruleset(lab: &Lab) -> String {
    lab.sh(lab.node(), "nft -s list ruleset").unwrap()
}

fn netfilter_events(out: &TraceOutput) -> Vec<Value> {
    out.of_kind("netfilter").into_iter().cloned().collect()
}

/// Runs a trace in the node while `connect` runs, returning its output; asserts the ruleset is
/// the same before and after.
fn trace_connect(
    lab: &Lab,
    port: &str,
    client: &Pod,
    to: SocketAddr,
    expect: Connect,
) -> TraceOutput {
    let before = stateless_ruleset(lab);
    let trace = start_trace(lab.node(), &["--port", port, "--duration", "4s"]);
    assert_eq!(
        lab.connect(&client.netns, to, Duration::from_secs(2)),
        expect
    );
    let out = trace.finish();
    let after = stateless_ruleset(lab);
    assert_eq!(before, after, "the trace left the ruleset changed");
    assert!(!after.contains("netprobe_"), "trace table removed");
    out
}

/// S1: client → ClusterIP 10.43.51.131:9004 → DNAT to the scheduler → Calico end-of-tier drop,
/// because the only policy selecting the scheduler (`scheduler-allow-xds`) admits 9005 only.
#[test]
fn s1_calico_end_of_tier_deny_names_chain_rule_and_policy() {
    let S1 {
        lab,
        client,
        server,
    } = s1_lab("s1cal");
    let _l = lab
        .listen(&server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    load(&lab, "iptables-restore", &kube_proxy_dnat("10.42.0.30"));
    load(
        &lab,
        "iptables-restore",
        &calico_filter(&server.host_if, &client.host_if),
    );

    let out = trace_connect(
        &lab,
        "9004",
        &client,
        format!("{CLUSTER_IP}:9004").parse().unwrap(),
        Connect::TimedOut,
    );
    let nf = netfilter_events(&out);
    let e = nf
        .first()
        .unwrap_or_else(|| panic!("no netfilter event:\n{}", out.dump()));
    let n = &e["netfilter"];
    assert_eq!(n["backend"], "iptables-nft");
    assert_eq!(n["table"], "filter");
    assert_eq!(n["hook"], "forward");
    assert_eq!(n["chain"], format!("cali-tw-{}", server.host_if));
    assert_eq!(n["action"], "drop");
    assert_eq!(n["client_sees"], "timeout");
    assert!(
        n["comments"]
            .as_array()
            .unwrap()
            .contains(&"Drop if no policies passed packet".into()),
        "{n:#}"
    );
    assert!(n["rule"].as_str().unwrap().contains("-j DROP"), "{n:#}");
    assert_eq!(n["position"], 7);
    assert_eq!(n["owner"]["system"], "calico");
    assert_eq!(n["owner"]["kind"], "calico-end-of-tier-deny");
    assert_eq!(
        n["owner"]["policies"],
        serde_json::json!(["financial-inference/scheduler-allow-xds"])
    );
    assert_eq!(n["owner"]["interface"], server.host_if.as_str());
    // The path shows the way there: FORWARD → cali-FORWARD → dispatch → cali-tw → policy chain.
    let chains: Vec<&str> = n["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["chain"].as_str().unwrap())
        .collect();
    for c in [
        "FORWARD",
        "cali-FORWARD",
        "cali-to-wl-dispatch",
        "cali-pi-_Lc1X7Z1pBVYpIRt7Dkd",
    ] {
        assert!(chains.contains(&c), "{c} in path {chains:?}");
    }
    // After DNAT: the dropped packet is addressed to the backend pod.
    assert_eq!(e["dst"], "10.42.0.30");
    assert_eq!(e["src"], "10.42.0.20");
    // The kernel's view agrees.
    assert!(
        out.of_kind("drop")
            .iter()
            .any(|d| d["drop"]["reason"] == "NETFILTER_DROP"),
        "{}",
        out.dump()
    );
}

/// The admitted port still connects through the same rules (the lab is not simply broken).
#[test]
fn s1_admitted_port_connects_and_gives_no_netfilter_event() {
    let S1 {
        lab,
        client,
        server,
    } = s1_lab("s1ok");
    let l = lab
        .listen(&server.netns, "10.42.0.30:9005".parse().unwrap())
        .unwrap();
    netprobe_lab::serve(l);
    load(
        &lab,
        "iptables-restore",
        &calico_filter(&server.host_if, &client.host_if),
    );
    let out = trace_connect(
        &lab,
        "9005",
        &client,
        "10.42.0.30:9005".parse().unwrap(),
        Connect::Connected,
    );
    assert!(netfilter_events(&out).is_empty(), "{}", out.dump());
}

/// kube-proxy (iptables mode) Service without endpoints: REJECT → the client sees refused.
#[test]
fn kube_proxy_no_endpoints_reject_names_the_service() {
    let S1 { lab, client, .. } = s1_lab("kpnoep");
    load(&lab, "iptables-restore", &kube_proxy_no_endpoints());
    let out = trace_connect(
        &lab,
        "9004",
        &client,
        format!("{CLUSTER_IP}:9004").parse().unwrap(),
        Connect::Refused,
    );
    let nf = netfilter_events(&out);
    let n = &nf
        .first()
        .unwrap_or_else(|| panic!("no netfilter event:\n{}", out.dump()))["netfilter"];
    assert_eq!(n["chain"], "KUBE-SERVICES");
    assert_eq!(n["action"], "reject");
    assert_eq!(n["client_sees"], "connection refused");
    assert_eq!(n["owner"]["kind"], "kube-proxy-no-endpoints");
    assert_eq!(
        n["owner"]["object"],
        "financial-inference/seldon-scheduler:xds"
    );
    assert!(
        n["rule"]
            .as_str()
            .unwrap()
            .contains("--reject-with icmp-port-unreachable")
    );
}

/// kube-router (k3s's policy controller) REJECT for a pod, with the policies in force.
#[test]
fn kube_router_reject_names_the_pod_and_policies() {
    let S1 {
        lab,
        client,
        server,
    } = s1_lab("kr");
    let _l = lab
        .listen(&server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    load(&lab, "iptables-restore", &kube_router_reject());
    let out = trace_connect(
        &lab,
        "9004",
        &client,
        "10.42.0.30:9004".parse().unwrap(),
        Connect::Refused,
    );
    let nf = netfilter_events(&out);
    let n = &nf
        .first()
        .unwrap_or_else(|| panic!("no netfilter event:\n{}", out.dump()))["netfilter"];
    assert_eq!(n["chain"], "KUBE-POD-FW-4HZJ5VQMYRPBZKTG");
    assert_eq!(n["owner"]["system"], "kube-router");
    assert_eq!(
        n["owner"]["object"],
        "financial-inference/seldon-scheduler-0"
    );
    assert_eq!(
        n["owner"]["policies"],
        serde_json::json!(["financial-inference/scheduler-allow-xds"])
    );
    assert_eq!(n["client_sees"], "connection refused");
    assert!(
        n["owner"].get("policy_engines").is_none(),
        "one engine alone is not called out: {n:#}"
    );
}

/// S1's likeliest root cause: a Flannel→Calico migration that kept k3s's embedded network policy
/// controller. kube-router's chains still REJECT 9004 to the scheduler beside Calico's: the
/// verdict names kube-router's rule, says that two engines enforce and gives the k3s fix.
#[test]
fn two_policy_engines_are_called_out_with_the_fix() {
    let S1 {
        lab,
        client,
        server,
    } = s1_lab("two");
    let _l = lab
        .listen(&server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    load(&lab, "iptables-restore", &kube_router_reject());
    load(
        &lab,
        "iptables-restore",
        &calico_filter(&server.host_if, &client.host_if),
    );
    let trace = support::start_verdict_trace(lab.node(), &["--port", "9004", "--duration", "4s"]);
    assert_eq!(
        lab.connect(
            &client.netns,
            "10.42.0.30:9004".parse().unwrap(),
            Duration::from_secs(2)
        ),
        Connect::Refused
    );
    let out = trace.finish_with_code(1);
    let v = out
        .verdicts()
        .into_iter()
        .find(|v| v["outcome"] == "refused_by_rule")
        .unwrap_or_else(|| panic!("no refused_by_rule verdict:\n{}", out.dump()));
    let owner = &v["netfilter"]["owner"];
    assert_eq!(owner["system"], "kube-router", "{v:#}");
    assert_eq!(
        owner["policy_engines"],
        serde_json::json!(["calico", "kube-router"]),
        "{v:#}"
    );
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.contains(
            "two NetworkPolicy engines filter pod traffic on this node: calico and kube-router"
        ),
        "{why}"
    );
    let steps = v["next_steps"].to_string();
    assert!(steps.contains("--disable-network-policy"), "{steps}");

    // `netprobe check` on that node says it too.
    let out = lab
        .sh(
            lab.node(),
            &format!("{} check -o json", support::netprobe_bin().display()),
        )
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains("calico and kube-router both filter pod traffic")
            && warnings.contains("--disable-network-policy"),
        "{report:#}"
    );
}

/// kube-proxy in nftables mode (native nf_tables, no iptables): the Service name lives in the
/// no-endpoint-services verdict map.
#[test]
fn kube_proxy_nft_mode_no_endpoints_names_the_service_from_the_map() {
    let S1 { lab, client, .. } = s1_lab("kpnft");
    let script = format!(
        "table ip kube-proxy {{
  comment \"rules for kube-proxy\"
  map no-endpoint-services {{
    type ipv4_addr . inet_proto . inet_service : verdict
    comment \"vmap to drop or reject packets to services with no endpoints\"
    elements = {{ {CLUSTER_IP} . tcp . 9004 comment \"financial-inference/seldon-scheduler:xds\" : goto reject-chain }}
  }}
  chain filter-forward {{
    type filter hook forward priority -110; policy accept;
    ct state new jump service-endpoints-check
  }}
  chain service-endpoints-check {{
    ip daddr . meta l4proto . th dport vmap @no-endpoint-services
  }}
  chain reject-chain {{
    comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\"
    reject
  }}
}}
"
    );
    let path = std::env::temp_dir().join(format!("netprobe-nft-{}", std::process::id()));
    std::fs::write(&path, script).unwrap();
    lab.sh(lab.node(), &format!("nft -f {}", path.display()))
        .unwrap();
    let _ = std::fs::remove_file(path);
    let out = trace_connect(
        &lab,
        "9004",
        &client,
        format!("{CLUSTER_IP}:9004").parse().unwrap(),
        Connect::Refused,
    );
    let nf = netfilter_events(&out);
    let n = &nf
        .first()
        .unwrap_or_else(|| panic!("no netfilter event:\n{}", out.dump()))["netfilter"];
    assert_eq!(n["backend"], "nftables");
    assert_eq!(n["table"], "kube-proxy");
    assert_eq!(n["chain"], "reject-chain");
    assert_eq!(n["rule"], "reject");
    assert_eq!(n["owner"]["kind"], "kube-proxy-no-endpoints");
    assert_eq!(
        n["owner"]["object"],
        "financial-inference/seldon-scheduler:xds"
    );
    assert_eq!(n["client_sees"], "connection refused");
}

/// Calico in nftables mode (`table ip calico`, chains prefixed `filter-`, comments
/// `cali:<hash>; <text>`, 3.30+ end-of-tier wording, 3.32+ policy naming).
#[test]
fn calico_nft_mode_end_of_tier_deny() {
    let S1 {
        lab,
        client,
        server,
    } = s1_lab("calnft");
    let _l = lab
        .listen(&server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    let (srv, cli) = (&server.host_if, &client.host_if);
    let pi = "filter-cali-pi-_Lc1X7Z1pBVYpIRt7Dkd";
    let script = format!(
        "table ip calico {{
  chain filter-FORWARD {{
    type filter hook forward priority filter; policy accept;
    counter jump filter-cali-FORWARD comment \"cali:wUHhoiAYhphO9Mso\"
  }}
  chain filter-cali-FORWARD {{
    oifname \"cali*\" counter jump filter-cali-to-wl-dispatch comment \"cali:8ZoYfO5HKXWbB3pk\"
  }}
  chain filter-cali-to-wl-dispatch {{
    oifname \"{cli}\" goto filter-cali-tw-{cli}
    oifname \"{srv}\" goto filter-cali-tw-{srv}
    counter drop comment \"cali:7hQCjoCgYI1Wtsyx; Unknown interface\"
  }}
  chain filter-cali-tw-{cli} {{
    ct state established,related counter accept comment \"cali:t1\"
    counter accept comment \"cali:t2; Profile kns.financial-inference ingress\"
  }}
  chain filter-cali-tw-{srv} {{
    ct state established,related counter accept comment \"cali:ssg63ESdTkJdLs3t\"
    ct state invalid counter drop comment \"cali:uhsvZ4gX1hyTXc8D\"
    counter meta mark set mark and 0xfffdffff comment \"cali:dqWGtg_u8IuD2ITe\"
    meta mark & 0x00020000 == 0x00000000 counter jump {pi} comment \"cali:4vxgGeAtzKktlGJ1\"
    meta mark & 0x00010000 == 0x00010000 counter return comment \"cali:GN6svEb6OlGGrQcn; Return if policy accepted\"
    meta mark & 0x00020000 == 0x00000000 counter drop comment \"cali:8sgO4ZIfeZ3lBhMH; End of tier default. Drop if no policies passed packet\"
  }}
  chain {pi} {{
    counter comment \"cali:oqyvZH-6l-xXFWWb; KubernetesNetworkPolicy financial-inference/scheduler-allow-xds ingress\"
    tcp dport 9005 counter meta mark set mark or 0x10000 comment \"cali:Xx2Wr3Yj0ZVtLaVq\"
  }}
}}
"
    );
    let path = std::env::temp_dir().join(format!("netprobe-calnft-{}", std::process::id()));
    std::fs::write(&path, script).unwrap();
    lab.sh(lab.node(), &format!("nft -f {}", path.display()))
        .unwrap();
    let _ = std::fs::remove_file(path);

    let out = trace_connect(
        &lab,
        "9004",
        &client,
        "10.42.0.30:9004".parse().unwrap(),
        Connect::TimedOut,
    );
    let nf = netfilter_events(&out);
    let n = &nf
        .first()
        .unwrap_or_else(|| panic!("no netfilter event:\n{}", out.dump()))["netfilter"];
    assert_eq!(n["backend"], "nftables");
    assert_eq!(n["table"], "calico");
    assert_eq!(n["hook"], "forward");
    assert_eq!(n["chain"], format!("filter-cali-tw-{srv}"));
    assert!(
        n["comments"][0]
            .as_str()
            .unwrap()
            .ends_with("End of tier default. Drop if no policies passed packet"),
        "{n:#}"
    );
    assert_eq!(n["owner"]["kind"], "calico-end-of-tier-deny");
    assert_eq!(
        n["owner"]["policies"],
        serde_json::json!(["financial-inference/scheduler-allow-xds"])
    );
    assert_eq!(n["client_sees"], "timeout");
}

/// iptables-legacy (x_tables): no nft trace; attributed by counter difference, and the node
/// mixing legacy and nf_tables rules is reported.
#[test]
fn iptables_legacy_drop_is_attributed_and_mixed_backends_are_reported() {
    let S1 {
        lab,
        client,
        server,
    } = s1_lab("legacy");
    let _l = lab
        .listen(&server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    // nf_tables side: an ordinary iptables-nft rule set (kube-proxy-shaped NAT, unused here).
    load(&lab, "iptables-restore", &kube_proxy_dnat("10.42.0.30"));
    lab.sh(
        lab.node(),
        "iptables-legacy -A FORWARD -p tcp --dport 9004 -m comment --comment 'flannel-era leftover' -j DROP",
    )
    .unwrap();
    let legacy_before = lab
        .sh(lab.node(), "iptables-legacy-save | grep -v '^#'")
        .unwrap();
    let out = trace_connect(
        &lab,
        "9004",
        &client,
        "10.42.0.30:9004".parse().unwrap(),
        Connect::TimedOut,
    );
    assert_eq!(
        lab.sh(lab.node(), "iptables-legacy-save | grep -v '^#'")
            .unwrap(),
        legacy_before
    );
    let nf = netfilter_events(&out);
    let n = &nf
        .first()
        .unwrap_or_else(|| panic!("no netfilter event:\n{}", out.dump()))["netfilter"];
    assert_eq!(n["backend"], "iptables-legacy");
    assert_eq!(n["table"], "filter");
    assert_eq!(n["chain"], "FORWARD");
    assert_eq!(n["hook"], "forward");
    assert_eq!(n["position"], 1);
    assert_eq!(n["comments"], serde_json::json!(["flannel-era leftover"]));
    assert_eq!(n["client_sees"], "timeout");
    let drop = out.of_kind("drop");
    assert!(
        drop.iter().any(|d| d["drop"]["location"]
            .as_str()
            .unwrap()
            .starts_with("nf_hook_slow")),
        "{}",
        out.dump()
    );
    let warnings = out.summary["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| w
            .as_str()
            .unwrap()
            .contains("iptables-legacy rules next to nf_tables rules")),
        "{warnings:?}"
    );
}

/// A SIGKILLed trace leaves its table behind; the next trace removes it, and its own on exit.
#[test]
fn leftover_trace_table_of_a_killed_netprobe_is_removed_at_next_start() {
    let S1 {
        lab,
        client,
        server,
    } = s1_lab("kill");
    let _l = lab
        .listen(&server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    let before = stateless_ruleset(&lab);
    let killed = start_trace(lab.node(), &["--port", "9004", "--duration", "30s"]);
    assert!(
        stateless_ruleset(&lab).contains("table inet netprobe_"),
        "trace table installed while tracing"
    );
    killed.kill9();
    assert!(
        stateless_ruleset(&lab).contains("table inet netprobe_"),
        "a SIGKILL cannot clean up"
    );
    let next = start_trace(lab.node(), &["--port", "9004", "--duration", "2s"]);
    let tables = stateless_ruleset(&lab);
    assert_eq!(
        tables.matches("table inet netprobe_").count(),
        1,
        "only the running trace's table:\n{tables}"
    );
    assert_eq!(
        lab.connect(
            &client.netns,
            "10.42.0.30:9004".parse().unwrap(),
            Duration::from_secs(2)
        ),
        Connect::Connected
    );
    next.finish();
    assert_eq!(
        stateless_ruleset(&lab),
        before,
        "leftover removed, own table removed"
    );
}
