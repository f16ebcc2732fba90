//! Privileged tests of `netprobe trace` in its default mode: one verdict per connection
//! attempt, with class, rule, object and names, from real kernel programs in netns labs.
//! Run with NETPROBE_RECORD_FIXTURES=netprobe/src/verdict/fixtures to refresh the recorded
//! event streams the verdict unit tests replay.

mod support;

use std::{net::SocketAddr, time::Duration};

use netprobe_lab::{
    Connect, Lab, Pod,
    rules::{calico_filter, kube_proxy_dnat},
};
use serde_json::Value;
use support::{S1, TraceOutput, normalize_fixture, record_args, s1_lab, start_verdict_trace};

fn verdict_trace(
    lab: &Lab,
    name: &str,
    args: &[&str],
    connect: impl FnOnce() -> Connect,
    expect: Connect,
    code: i32,
) -> (Value, TraceOutput) {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend(record_args(name));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let trace = start_verdict_trace(lab.node(), &refs);
    assert_eq!(connect(), expect);
    let out = trace.finish_with_code(code);
    let verdicts: Vec<&Value> = out
        .events
        .iter()
        .filter(|e| e["kind"] == "verdict")
        .collect();
    assert_eq!(
        verdicts.len(),
        1,
        "one verdict per attempt:\n{}",
        out.dump()
    );
    (verdicts[0].clone(), out)
}

fn mlserver(lab: &mut Lab) -> Pod {
    lab.add_pod("financial-ml", "mlserver-0", "10.42.0.10".parse().unwrap())
        .unwrap()
}

/// S2: nothing on 127.0.0.1:9500, the server listens on 9000.
#[test]
fn s2_verdict_nothing_listens_on_9500_server_on_9000() {
    let mut lab = Lab::new("vs2").unwrap();
    let pod = mlserver(&mut lab);
    let _l = lab
        .listen(&pod.netns, "127.0.0.1:9000".parse().unwrap())
        .unwrap();
    let addr: SocketAddr = "127.0.0.1:9500".parse().unwrap();
    let (v, _) = verdict_trace(
        &lab,
        "s2_refused",
        &[
            "--port",
            "9500",
            "--netns",
            &pod.netns,
            "--duration",
            "10s",
            "--count",
            "1",
        ],
        || lab.connect(&pod.netns, addr, Duration::from_secs(2)),
        Connect::Refused,
        1,
    );
    normalize_fixture("s2_refused", &[(&pod.netns, "pod")]);
    assert_eq!(v["outcome"], "refused_no_listener", "{v:#}");
    assert_eq!(v["server"]["addr"], "127.0.0.1");
    assert_eq!(v["server"]["port"], 9500);
    assert_eq!(v["server"]["netns"], pod.netns.as_str());
    assert_eq!(v["drop"]["reason"], "NO_SOCKET");
    assert!(
        v["explanation"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:9000"),
        "{v:#}"
    );
    let listeners = v["listeners"].as_array().unwrap();
    assert!(
        listeners
            .iter()
            .any(|l| l["port"] == 9000 && l["addr"] == "127.0.0.1"),
        "{v:#}"
    );
    assert!(v["netfilter"].is_null());
}

/// S2 variant: the server is bound to [::1]:9500 only; the client dials 127.0.0.1.
#[test]
fn s2_verdict_server_bound_to_ipv6_loopback_only() {
    let mut lab = Lab::new("vs2v6").unwrap();
    let pod = mlserver(&mut lab);
    let _l = lab
        .listen(&pod.netns, "[::1]:9500".parse().unwrap())
        .unwrap();
    let (v, _) = verdict_trace(
        &lab,
        "s2_v6only",
        &[
            "--port",
            "9500",
            "--netns",
            &pod.netns,
            "--duration",
            "10s",
            "--count",
            "1",
        ],
        || {
            lab.connect(
                &pod.netns,
                "127.0.0.1:9500".parse().unwrap(),
                Duration::from_secs(2),
            )
        },
        Connect::Refused,
        1,
    );
    assert_eq!(v["outcome"], "refused_no_listener");
    assert!(
        v["explanation"]
            .as_str()
            .unwrap()
            .contains("bound to [::1]:9500 only"),
        "{v:#}"
    );
}

fn restore(lab: &Lab, rules: &str) {
    netprobe_lab::rules::restore(lab, "iptables-restore", rules).unwrap();
}

/// S1: the Calico end-of-tier deny through the ClusterIP.
#[test]
fn s1_verdict_calico_end_of_tier_deny_through_the_cluster_ip() {
    let S1 {
        lab,
        client,
        server,
    } = s1_lab("vs1");
    let _l = lab
        .listen(&server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    restore(&lab, &kube_proxy_dnat("10.42.0.30"));
    restore(&lab, &calico_filter(&server.host_if, &client.host_if));
    let iface = &server.host_if;
    let (v, _) = verdict_trace(
        &lab,
        "s1_calico",
        &["--port", "9004", "--duration", "5s"],
        || {
            lab.connect(
                &client.netns,
                "10.43.51.131:9004".parse().unwrap(),
                Duration::from_secs(3),
            )
        },
        Connect::TimedOut,
        1,
    );
    normalize_fixture(
        "s1_calico",
        &[
            (lab.node(), "node"),
            (&client.netns, "client"),
            (&server.netns, "server"),
        ],
    );
    assert_eq!(v["outcome"], "dropped_by_rule", "{v:#}");
    assert_eq!(v["dialed"]["addr"], "10.43.51.131");
    assert_eq!(v["server"]["addr"], "10.42.0.30");
    assert_eq!(v["client"]["addr"], "10.42.0.20");
    assert_eq!(v["netfilter"]["chain"], format!("cali-tw-{iface}"));
    assert_eq!(
        v["netfilter"]["owner"]["policies"],
        serde_json::json!(["financial-inference/scheduler-allow-xds"])
    );
    assert!(
        v["explanation"].as_str().unwrap().contains("timeout"),
        "{v:#}"
    );
    // The drop and its traced rule are known at the first SYN: the verdict comes before the
    // client's first retransmit (issue #16 item 9; it used to wait for one).
    assert_eq!(v["syn_retransmits"], 0, "{v:#}");
}

/// kube-proxy: Service without endpoints → REJECT → refused by rule.
#[test]
fn kube_proxy_no_endpoints_verdict_is_refused_by_rule() {
    let S1 { lab, client, .. } = s1_lab("vkp");
    restore(
        &lab,
        "*filter
:FORWARD ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.43.51.131/32 -p tcp -m comment --comment \"financial-inference/seldon-scheduler:xds has no endpoints\" -m tcp --dport 9004 -j REJECT --reject-with icmp-port-unreachable
COMMIT
",
    );
    let (v, _) = verdict_trace(
        &lab,
        "kube_proxy_reject",
        &["--port", "9004", "--duration", "10s", "--count", "1"],
        || {
            lab.connect(
                &client.netns,
                "10.43.51.131:9004".parse().unwrap(),
                Duration::from_secs(2),
            )
        },
        Connect::Refused,
        1,
    );
    normalize_fixture(
        "kube_proxy_reject",
        &[(lab.node(), "node"), (&client.netns, "client")],
    );
    assert_eq!(v["outcome"], "refused_by_rule", "{v:#}");
    assert_eq!(
        v["netfilter"]["owner"]["object"],
        "financial-inference/seldon-scheduler:xds"
    );
}

/// rp_filter: a SYN from a source the node does not route back through that veth.
#[test]
fn rp_filter_drop_verdict_is_a_kernel_drop() {
    let S1 {
        lab,
        client,
        server,
    } = s1_lab("vrp");
    let _l = lab
        .listen(&server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    lab.sh(
        lab.node(),
        &format!(
            "sysctl -qw net.ipv4.conf.all.rp_filter=1; sysctl -qw net.ipv4.conf.{}.rp_filter=1",
            client.host_if
        ),
    )
    .unwrap();
    lab.sh(&client.netns, "ip addr add 10.42.7.7/32 dev eth0")
        .unwrap();
    // A static gateway neighbour: proxy ARP (rightly) ignores requests from the unroutable
    // source, which would make this a neighbour failure instead of an rp_filter drop.
    support::static_gateway_neighbour(&lab, &client);
    let (v, _) = verdict_trace(
        &lab,
        "rp_filter",
        &["--port", "9004", "--duration", "4s"],
        || {
            let r = lab.sh(
                &client.netns,
                "python3 -c \"
import socket
s = socket.socket(); s.settimeout(2); s.bind(('10.42.7.7', 0))
try:
    s.connect(('10.42.0.30', 9004)); print('connected')
except socket.timeout:
    print('timeout')
except OSError as e:
    print(e)
\"",
            );
            if r.unwrap().trim() == "timeout" {
                Connect::TimedOut
            } else {
                Connect::Other(0)
            }
        },
        Connect::TimedOut,
        1,
    );
    normalize_fixture(
        "rp_filter",
        &[
            (lab.node(), "node"),
            (&client.netns, "client"),
            (&server.netns, "server"),
        ],
    );
    assert_eq!(v["outcome"], "dropped_by_kernel", "{v:#}");
    assert_eq!(v["drop"]["reason"], "IP_RPFILTER");
    assert!(v["netfilter"].is_null());
}

/// A plain success: exit 0, connected.
#[test]
fn plain_success_verdict_is_connected_and_exit_0() {
    let S1 {
        lab,
        client,
        server,
    } = s1_lab("vok");
    netprobe_lab::serve(
        lab.listen(&server.netns, "10.42.0.30:9005".parse().unwrap())
            .unwrap(),
    );
    let (v, _) = verdict_trace(
        &lab,
        "success",
        &["--port", "9005", "--duration", "10s", "--count", "1"],
        || {
            lab.connect(
                &client.netns,
                "10.42.0.30:9005".parse().unwrap(),
                Duration::from_secs(2),
            )
        },
        Connect::Connected,
        0,
    );
    normalize_fixture(
        "success",
        &[
            (lab.node(), "node"),
            (&client.netns, "client"),
            (&server.netns, "server"),
        ],
    );
    assert_eq!(v["outcome"], "connected", "{v:#}");
}

/// No attempt within the timeout: exit 3.
#[test]
fn no_attempt_within_timeout_exits_3() {
    let S1 { lab, .. } = s1_lab("vnone");
    let trace = start_verdict_trace(lab.node(), &["--port", "9099", "--timeout", "1s"]);
    let out = trace.finish_with_code(3);
    assert!(
        out.stderr.contains("no connection attempt seen"),
        "{}",
        out.stderr
    );
}
