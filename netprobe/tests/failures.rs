//! Privileged tests of `kubectl netprobe failures`: the two-node S1 lab (an agent per node, each
//! writing Events about its node's pods to the Kubernetes API stand-in), failures made on both
//! nodes, and the CLI as nobody ("the laptop") reading the Events from the API — grouped, the
//! client's and the server's Events of one failure counted once — as RBAC on Events allows.

mod support;

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use netprobe_lab::{
    dns::a_query,
    rules::CLUSTER_IP,
    two_nodes::{CLIENT_IP, SERVER_IP, TwoNodes},
    underlay::Overlay,
};
use serde_json::Value;

fn lab(tag: &str) -> TwoNodes {
    netprobe_lab::require_root();
    TwoNodes::new(tag, Overlay::Routed, support::netprobe_bin()).unwrap()
}

/// `netprobe failures ARGS` as nobody on node-a: (exit code, stdout, stderr).
fn failures(lab: &TwoNodes, args: &[&str]) -> (i32, String, String) {
    let child = lab
        .laptop(support::netprobe_bin())
        .arg("failures")
        .args(args)
        .spawn()
        .unwrap();
    let out = netprobe_lab::process::wait_output(child, Duration::from_secs(60)).unwrap();
    (out.code(), out.stdout, out.stderr)
}

/// The JSON answer (schema-checked), asked again until `done` holds or 90 s passed (the agents
/// judge an attempt within seconds of its end and create its Event at once; repeats of the
/// same key are written in an update a minute later).
fn answer_until(lab: &TwoNodes, args: &[&str], done: impl Fn(&Value) -> bool) -> (Value, String) {
    let start = Instant::now();
    loop {
        let (code, out, err) = failures(lab, &[args, &["-o", "json"]].concat());
        assert_eq!(code, 0, "an agent answered:\n{out}\n{err}");
        let a: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
        support::assert_schema_valid(std::slice::from_ref(&a));
        if done(&a) || start.elapsed() > Duration::from_secs(90) {
            return (a, err);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The group of `client` (a workload or pod name) to `port`.
fn group<'a>(a: &'a Value, client: &str, port: u16) -> Option<&'a Value> {
    a["groups"]
        .as_array()?
        .iter()
        .find(|g| g["client"]["name"] == client && g["port"] == port)
}

/// The group of attempts to `port` with `outcome` (one attempt across nodes may be judged by
/// both agents, each with what its node saw; an agent names only its own node's pods, so the
/// server's node knows the client by its address).
fn group_of<'a>(a: &'a Value, port: u16, outcome: &str) -> Option<&'a Value> {
    a["groups"]
        .as_array()?
        .iter()
        .find(|g| g["port"] == port && g["outcome"] == outcome)
}

fn seen_on(g: &Value, node: &str) -> bool {
    g["nodes"].as_array().unwrap().iter().any(|n| n == node)
}

/// The answer read the Events of all namespaces, written by both agents.
fn assert_read_from_events(a: &Value) {
    assert_eq!(a["events"]["namespace"], Value::Null, "{:#}", a["events"]);
    assert!(
        a["events"]["used"].as_u64().unwrap() >= 2,
        "{:#}",
        a["events"]
    );
    assert_eq!(a["events"]["unreadable"], 0);
    let nodes: Vec<&str> = a["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["node-a", "node-b"], "{:#}", a["nodes"]);
}

fn connect(netns: &str, to: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let to: SocketAddr = to.parse().unwrap();
    netprobe_lab::in_netns(netns, || TcpStream::connect_timeout(&to, timeout)).unwrap()
}

/// Written against the contract of #14: the agent judges every TCP port and hands each failed
/// verdict (names and rule filled in) to its sinks.
#[test]
fn failing_connections_on_both_nodes_are_listed_grouped_with_counts() {
    let lab = lab("fails");
    let (a, b) = (&lab.labs[0], &lab.labs[1]);
    a.sh(a.node(), "iptables -A FORWARD -p tcp --dport 9004 -j DROP")
        .unwrap();
    b.sh(b.node(), "iptables -A FORWARD -p tcp --dport 9100 -j DROP")
        .unwrap();
    // node-a: the client dials the scheduler's Service twice, dropped on node-a after DNAT.
    for _ in 0..2 {
        let c = connect(
            &lab.client.netns,
            &format!("{CLUSTER_IP}:9004"),
            Duration::from_secs(3),
        );
        assert!(c.is_err(), "dropped: {c:?}");
    }
    // node-b: the scheduler dials the client pod, dropped on node-b; the client dials a port
    // of the scheduler where nothing listens, refused there.
    let c = connect(
        &lab.server.netns,
        &format!("{CLIENT_IP}:9100"),
        Duration::from_secs(3),
    );
    assert!(c.is_err(), "dropped: {c:?}");
    let refused = connect(
        &lab.client.netns,
        &format!("{SERVER_IP}:9005"),
        Duration::from_secs(3),
    );
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );

    // The second drop is a repeat of the first's Event key: counted in its update, a minute
    // after the creation.
    let all_three = |a: &Value| {
        group(a, "Pod/client-0", 9004).is_some_and(|g| g["count"].as_u64() >= Some(2))
            && group(a, "Pod/seldon-scheduler-0", 9100).is_some()
            && group_of(a, 9005, "refused_no_listener").is_some()
    };
    let (answer, _) = answer_until(&lab, &["-A", "--since", "10m"], all_three);
    assert_eq!(answer["schema"], "netprobe.failures/v1");
    assert_read_from_events(&answer);
    let dump = format!("{answer:#}");

    let to_service = group(&answer, "Pod/client-0", 9004).unwrap_or_else(|| panic!("{dump}"));
    assert_eq!(to_service["client"]["namespace"], "financial-inference");
    assert_eq!(
        to_service["destination"]["name"], "Service/seldon-scheduler",
        "{to_service:#}"
    );
    assert_eq!(to_service["outcome"], "dropped_by_rule", "{to_service:#}");
    assert_eq!(to_service["rule"]["owner"], "user", "{to_service:#}");
    assert_eq!(to_service["rule"]["chain"], "FORWARD", "{to_service:#}");
    assert!(to_service["count"].as_u64().unwrap() >= 2, "{to_service:#}");
    assert!(to_service["now"].as_u64().unwrap() >= 2, "{to_service:#}");
    assert!(seen_on(to_service, "node-a"), "{to_service:#}");
    // Two attempts: the client's Events (node-a) say 2; the scheduler (node-b) saw none.
    assert_eq!(to_service["events"], 1, "one Event per key: {to_service:#}");
    assert!(to_service.get("example").is_none(), "{to_service:#}");
    let note = to_service["note"].as_str().unwrap();
    assert!(
        note.starts_with("user rule drops client-0 → ")
            && note.contains(
                ":9004 via Service financial-inference/seldon-scheduler (FORWARD rule 1). "
            ),
        "{note}"
    );

    let dropped_b = group(&answer, "Pod/seldon-scheduler-0", 9100).unwrap();
    assert_eq!(dropped_b["outcome"], "dropped_by_rule", "{dropped_b:#}");
    assert!(seen_on(dropped_b, "node-b"), "{dropped_b:#}");
    // node-b's kernel answered the SYN with RST (nothing listens there); node-a, where the
    // client is, saw only the peer's reset.
    let reset_a = group_of(&answer, 9005, "reset_by_peer").unwrap_or_else(|| panic!("{dump}"));
    assert_eq!(reset_a["client"]["name"], "Pod/client-0", "{reset_a:#}");
    assert!(seen_on(reset_a, "node-a"), "{reset_a:#}");
    let refused_b =
        group_of(&answer, 9005, "refused_no_listener").unwrap_or_else(|| panic!("{dump}"));
    assert_eq!(
        refused_b["destination"]["name"], "Pod/seldon-scheduler-0",
        "{refused_b:#}"
    );
    assert!(seen_on(refused_b, "node-b"), "{refused_b:#}");

    // For a person: by client, then Service:port, outcome and rule, with counts.
    let (code, text, _) = failures(&lab, &["-n", "financial-inference"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with("failures in the last 10m (now = Events last observed this minute and the previous) from "),
        "{text}"
    );
    assert!(
        text.contains(" netprobe Event(s) in namespace financial-inference, written by the agents of 2 node(s): node-a, node-b\n"),
        "{text}"
    );
    assert!(
        text.contains("\nfinancial-inference/Pod/client-0\n"),
        "{text}"
    );
    assert!(
        text.contains("  → financial-inference/Service/seldon-scheduler:9004  dropped_by_rule  user FORWARD rule 1\n      now "),
        "{text}"
    );
    assert!(
        text.contains("\n      e.g. user rule drops client-0 → "),
        "{text}"
    );
    // Scopes: nothing failed in kube-system, nor in the kubeconfig's namespace (default);
    // --workload keeps the groups the scheduler is in.
    let (none, _) = answer_until(&lab, &["-n", "kube-system"], |_| true);
    assert_eq!(none["groups"], serde_json::json!([]), "{none:#}");
    assert_eq!(none["events"]["listed"], 0, "{none:#}");
    let (default, _) = answer_until(&lab, &[], |_| true);
    assert_eq!(default["events"]["namespace"], "default", "{default:#}");
    assert_eq!(default["groups"], serde_json::json!([]), "{default:#}");
    let (sched, _) = answer_until(&lab, &["-A", "--workload", "seldon-scheduler-0"], |_| true);
    let sched = sched["groups"].as_array().unwrap();
    assert!(sched.len() >= 2, "{sched:#?}");
    assert!(
        sched.iter().all(|g| [&g["client"], &g["destination"]]
            .iter()
            .any(|p| p["name"] == "Pod/seldon-scheduler-0")),
        "{sched:#?}"
    );
}

/// Fails today too: failed DNS lookups are verdicts the agent makes already.
#[test]
fn failed_dns_lookups_on_both_nodes_are_listed_with_the_query() {
    let lab = lab("fdns");
    for l in &lab.labs {
        l.sh(l.node(), "iptables -A FORWARD -p udp --dport 53 -j DROP")
            .unwrap();
    }
    let name = "seldon-scheduler.financial-inference.svc.cluster.local";
    for (netns, to) in [
        (&lab.client.netns, SERVER_IP),
        (&lab.server.netns, CLIENT_IP),
    ] {
        netprobe_lab::in_netns(netns, || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(&a_query(0x4242, name), format!("{to}:53"))
                .unwrap();
        })
        .unwrap();
    }
    let both = |a: &Value| {
        group(a, "Pod/client-0", 53).is_some() && group(a, "Pod/seldon-scheduler-0", 53).is_some()
    };
    let (answer, _) = answer_until(&lab, &["-A"], both);
    assert_read_from_events(&answer);
    let dump = format!("{answer:#}");
    for (client, node) in [
        ("Pod/client-0", "node-a"),
        ("Pod/seldon-scheduler-0", "node-b"),
    ] {
        let g = group(&answer, client, 53).unwrap_or_else(|| panic!("{client}: {dump}"));
        assert!(
            g["outcome"].as_str().unwrap().starts_with("dropped"),
            "{g:#}"
        );
        assert_eq!(g["count"], 1, "{g:#}");
        assert!(seen_on(g, node), "{g:#}");
        let note = g["note"].as_str().unwrap();
        assert!(note.contains(&format!(" DNS A {name} → ")), "{g:#}");
    }
    let (code, text, _) = failures(&lab, &["-A"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(
            "\nfinancial-inference/Pod/client-0\n  → financial-inference/Pod/seldon-scheduler-0:53  dropped"
        ),
        "{text}"
    );
    assert!(text.contains(&format!(" DNS A {name} → ")), "{text}");
    // Another user on the node, without a token, cannot read them through the loopback port
    // (401 now; 403 by socket owner before).
    let a = &lab.labs[0];
    let direct = a
        .sh(
            a.node(),
            &format!(
                "setpriv --reuid=65534 --regid=65534 --clear-groups python3 -c \"import socket; s=socket.create_connection(('127.0.0.1',{})); s.sendall(b'GET /v1/failures HTTP/1.1\\r\\n\\r\\n'); print(s.recv(200))\"",
                lab.port
            ),
        )
        .unwrap();
    assert!(direct.contains("401 Unauthorized"), "{direct}");
}
