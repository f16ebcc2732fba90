//! Privileged tests of issue #16 "Diagnosis: the causes netprobe still gets wrong or leaves
//! vague": a refusal on localhost for a port another pod or a Service serves, interfaces named
//! in their own namespace when an ifindex exists twice, timelines without noise. Real netns
//! labs, real kernel programs, the real binary (DNS SERVFAIL/REFUSED: tests/dns.rs).

mod support;

use std::{net::SocketAddr, time::Duration};

use netprobe_lab::{
    Connect, Lab, Pod,
    kubeapi::{Kind, service},
    rules::restore,
};
use serde_json::Value;
use support::{TraceOutput, start_verdict_trace, start_verdict_trace_env};

const NODE: &str = "lab-node";

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

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

/// Item 5's lab: `team-a/web-0` (listening on 8080 only) and `team-b/api-0` (listening on
/// 0.0.0.0:9004) on this node, Service `team-b/api` with port 9004, all in the API stand-in.
struct Localhost {
    lab: Lab,
    web: Pod,
    _listeners: Vec<std::net::TcpListener>,
    _kube: netprobe_lab::kubeapi::FakeKube,
    kubeconfig: std::path::PathBuf,
}

impl Drop for Localhost {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn localhost_lab(tag: &str) -> Localhost {
    netprobe_lab::require_root();
    let mut lab = Lab::new(tag).unwrap();
    let web = lab
        .add_pod("team-a", "web-0", "10.42.0.10".parse().unwrap())
        .unwrap();
    let api = lab
        .add_pod("team-b", "api-0", "10.42.0.31".parse().unwrap())
        .unwrap();
    let listeners = vec![
        lab.listen(&api.netns, "0.0.0.0:9004".parse().unwrap())
            .unwrap(),
        lab.listen(&web.netns, "0.0.0.0:8080".parse().unwrap())
            .unwrap(),
    ];
    let (kube, kubeconfig) = support::kube_api(&lab);
    for p in [&web, &api] {
        support::publish_pod(&kube, p);
    }
    kube.apply(
        Kind::Service,
        service("team-b", "api", "10.43.0.50", &[("http", 9004, 9004)]),
    );
    Localhost {
        lab,
        web,
        _listeners: listeners,
        _kube: kube,
        kubeconfig,
    }
}

impl Localhost {
    fn env(&self) -> [(&str, &str); 2] {
        [
            ("KUBECONFIG", self.kubeconfig.to_str().unwrap()),
            ("NODE_NAME", NODE),
        ]
    }

    /// web-0 dials 127.0.0.1:9004 and is refused.
    fn dial_localhost(&self) {
        let got = self.lab.connect(
            &self.web.netns,
            "127.0.0.1:9004".parse().unwrap(),
            Duration::from_secs(2),
        );
        assert_eq!(got, Connect::Refused);
    }
}

/// The refusal names who serves 9004, says that 127.0.0.1 only reaches the client's own pod,
/// and what to dial instead; the pod's own listeners are still listed.
fn assert_names_who_serves_the_port(v: &Value) {
    assert_eq!(v["outcome"], "refused_no_listener", "{v:#}");
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.contains(
            "Port 9004 is served by pod team-b/api-0 (10.42.0.31:9004) and Service team-b/api \
             (10.43.0.50:9004), not by this pod: 127.0.0.1 only reaches the containers of this pod."
        ),
        "{v:#}"
    );
    assert!(why.contains("0.0.0.0:8080"), "own listeners: {v:#}");
    let next = strings(&v["next_steps"]);
    assert!(
        next[0].starts_with("dial api.team-b.svc:9004 instead of 127.0.0.1:9004"),
        "{next:#?}"
    );
    for cmd in [
        "kubectl -n team-b get service api",
        "kubectl -n team-b get pod api-0 -o wide",
    ] {
        assert!(next.contains(&cmd), "{cmd}: {next:#?}");
    }
}

/// Item 5, trace: `team-a/web-0` dials 127.0.0.1:9004, where nothing listens in its pod; pod
/// `team-b/api-0` on the same node listens on 9004 and Service `team-b/api` has port 9004.
#[test]
fn refused_on_localhost_names_the_pod_and_service_that_serve_the_port() {
    let l = localhost_lab("dglocal");
    let trace = start_verdict_trace_env(
        l.lab.node(),
        &[
            "--pod",
            "web-0",
            "-n",
            "team-a",
            "--port",
            "9004",
            "--duration",
            "5s",
            "--count",
            "1",
        ],
        &l.env(),
    );
    l.dial_localhost();
    assert_names_who_serves_the_port(&only_verdict(&trace.finish_with_code(1)));
}

/// Item 5, always-on: the agent alone says the same (the same judge names its verdicts).
#[test]
fn the_agent_names_the_pod_and_service_that_serve_a_refused_localhost_port() {
    let l = localhost_lab("dglocala");
    let agent = support::start_agent(l.lab.node(), &[], &l.env(), true);
    l.dial_localhost();
    std::thread::sleep(Duration::from_millis(600));
    let out = support::stop(agent);
    let records = support::ndjson(&out.stdout);
    let v: Vec<&Value> = records.iter().filter(|r| r["kind"] == "verdict").collect();
    assert_eq!(v.len(), 1, "{records:#?}\n{}", out.stderr);
    assert_names_who_serves_the_port(v[0]);
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

/// kube-proxy's REJECT of a Service without endpoints, through the node (the client's socket
/// reports an error without errno before ECONNREFUSED).
const NO_ENDPOINTS: &str = "*filter
:FORWARD ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
-A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.43.51.131/32 -p tcp -m tcp --dport 9004 -j REJECT --reject-with icmp-port-unreachable
COMMIT
";

/// The verdict of one attempt from `client` to `to`, which ends as `expect` (the trace's exit
/// code: `code`).
fn attempt(lab: &Lab, client: &Pod, to: &str, expect: Connect, code: i32) -> Value {
    let addr: SocketAddr = to.parse().unwrap();
    let port = addr.port().to_string();
    let trace = start_verdict_trace(
        lab.node(),
        &["--port", &port, "--duration", "4s", "--count", "1"],
    );
    assert_eq!(
        lab.connect(&client.netns, addr, Duration::from_secs(2)),
        expect
    );
    only_verdict(&trace.finish_with_code(code))
}

/// Item 8: timelines carry only events that say something: no "application gets errno 0"
/// before ECONNREFUSED, no "dropped" for a socket's queues purged at close or an skb freed
/// without a reason, no state "change" to the same state.
#[test]
fn verdict_timelines_carry_no_event_without_information() {
    netprobe_lab::require_root();
    let s1 = support::s1_lab("dgnoise");
    let (lab, client) = (&s1.lab, &s1.client);
    accept_and_close(lab, &s1.server.netns, "10.42.0.30:9005");
    restore(lab, "iptables-restore", NO_ENDPOINTS).unwrap();
    let rejected = attempt(lab, client, "10.43.51.131:9004", Connect::Refused, 1);
    // Made and closed at once: its socket queues are purged at close.
    let connected = attempt(lab, client, "10.42.0.30:9005", Connect::Connected, 0);
    for (v, must) in [
        (&rejected, "SYN_SENT → CLOSE"),
        (&connected, "SYN_SENT → ESTABLISHED"),
    ] {
        let lines = timeline(v);
        assert!(
            lines.iter().any(|l| l.starts_with(must)),
            "{must}:\n{lines:#?}"
        );
        for noise in ["errno 0", "QUEUE_PURGE", "NOT_SPECIFIED"] {
            assert!(
                lines.iter().all(|l| !l.contains(noise)),
                "`{noise}` in the timeline:\n{lines:#?}"
            );
        }
        assert!(
            lines.iter().all(|l| {
                let Some((a, b)) = l.split_once(" → ") else {
                    return true;
                };
                !b.starts_with(&format!("{a} ")) && b != a
            }),
            "{lines:#?}"
        );
    }
}

/// A server at `addr` in `netns` that accepts and closes at once, so that a connection ends
/// within the trace.
fn accept_and_close(lab: &Lab, netns: &str, addr: &str) {
    let listener = lab.listen(netns, addr.parse().unwrap()).unwrap();
    std::thread::spawn(move || {
        while let Ok((s, _)) = listener.accept() {
            drop(s);
        }
    });
}
