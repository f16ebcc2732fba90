//! Privileged tests of causes the kernel leaves no clear trace of (issue #16, items 1 and 2):
//! a full accept queue (the SYN is consumed, not dropped) and a failed route lookup on the node
//! (the node's own kernel sends the ICMP error, quoting the client's SYN) or inside the client
//! pod (connect() fails there before any packet exists: only `fib:fib_table_lookup` sees it).
//! Real eBPF, real netns labs, real `netprobe trace`.

mod support;

use std::{net::SocketAddr, time::Duration};

use netprobe_lab::{Connect, Lab, kubeapi::pod};
use serde_json::Value;
use support::{S1, s1_lab, start_verdict_trace, start_verdict_trace_env};

/// A server that listens with backlog 1 and never accepts, as container `api` of the server
/// pod (a process in a kubelet-shaped cgroup of the pod published in the API stand-in).
const SLOW_SERVER: &str = "import socket,time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('10.42.0.30', 9100)); s.listen(1)
time.sleep(120)";

/// Five connects at once, each given 2.5 s: the first two fill the queue, the rest time out.
const BURST: &str = "import socket,time
socks = []
for _ in range(5):
    s = socket.socket(); s.setblocking(False)
    try: s.connect(('10.42.0.30', 9100))
    except BlockingIOError: pass
    socks.append(s)
time.sleep(2.5)
for s in socks: s.close()";

/// The S1 lab with the slow server running as container `api` of the published server pod.
struct SlowServer {
    s1: S1,
    _kube: netprobe_lab::kubeapi::FakeKube,
    kubeconfig: std::path::PathBuf,
    pid: u32,
}

fn slow_server(tag: &str) -> SlowServer {
    let S1 {
        mut lab,
        client,
        server,
    } = s1_lab(tag);
    let (kube, kubeconfig) = support::kube_api(&lab);
    let api_id = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
    let obj = pod(
        &server.namespace,
        &server.name,
        "lab-node",
        &server.ip.to_string(),
        &[("api", api_id, &[9100])],
    );
    kube.apply(netprobe_lab::kubeapi::Kind::Pod, obj.clone());
    support::publish_pod(&kube, &client);
    let uid = obj["metadata"]["uid"].as_str().unwrap().to_string();
    let pid = lab
        .spawn(&server.netns, &["python3", "-c", SLOW_SERVER])
        .unwrap();
    lab.join_cgroup(pid, &format!("kubepods/besteffort/pod{uid}/{api_id}"))
        .unwrap();
    wait_listening(&lab, &server.netns);
    SlowServer {
        s1: S1 {
            lab,
            client,
            server,
        },
        _kube: kube,
        kubeconfig,
        pid,
    }
}

/// What every listen-overflow verdict must say: the listener, its pod, container and process,
/// its queue and backlog, and the cause.
fn assert_names_the_full_queue(v: &Value, pid: u32) {
    assert_eq!(v["outcome"], "dropped_by_kernel", "{v:#}");
    let q = &v["listen_queue"];
    assert_eq!(q["accept_queue"], 2, "{v:#}");
    assert_eq!(q["backlog"], 1, "{v:#}");
    assert!(q["listen_overflows"].as_u64().unwrap() > 0, "{v:#}");
    assert_eq!(q["listener"]["port"], 9100);
    assert_eq!(q["listener"]["addr"], "10.42.0.30");
    assert_eq!(q["listener"]["pid"], pid, "{v:#}");
    assert_eq!(q["listener"]["comm"], "python3");
    assert_eq!(v["listeners"][0]["container"], "api", "{v:#}");
    assert_eq!(v["server"]["peer"]["pod"], "seldon-scheduler-0", "{v:#}");
    let headline = v["headline"].as_str().unwrap();
    assert!(headline.contains("accept queue is full"), "{headline}");
    let why = v["explanation"].as_str().unwrap();
    for part in [
        "10.42.0.30:9100",
        "pod financial-inference/seldon-scheduler-0",
        "container api",
        "process python3",
        "2 connections waiting to be accept()ed and a backlog of 1",
        "does not accept() fast enough, or its backlog is too small",
    ] {
        assert!(why.contains(part), "{part:?} in {why}");
    }
    let next = v["next_steps"].to_string();
    assert!(
        next.contains(&format!("nsenter -t {pid} -n ss -ltn")),
        "{next}"
    );
}

#[test]
fn full_accept_queue_names_the_listener_its_queue_and_backlog() {
    let SlowServer {
        s1: S1 { lab, client, .. },
        _kube,
        kubeconfig,
        pid,
    } = slow_server("dpq");
    let trace = start_verdict_trace_env(
        lab.node(),
        &["--port", "9100", "--duration", "7s"],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    lab.sh(&client.netns, &format!("python3 -c \"{BURST}\""))
        .unwrap();
    let out = trace.finish_with_code(1);
    let _ = std::fs::remove_file(kubeconfig);
    let all = out.verdicts();
    assert!(
        all.iter().all(|v| v["outcome"] != "timed_out"),
        "the drop is on this node, not beyond it:\n{}",
        out.dump()
    );
    let full: Vec<&Value> = all
        .iter()
        .filter(|v| !v["listen_queue"].is_null())
        .collect();
    assert!(
        full.len() >= 2,
        "the SYNs beyond the queue:\n{}",
        out.dump()
    );
    assert_names_the_full_queue(full[0], pid);
}

/// The always-on agent judges with the same pipeline: the same verdict, without a trace.
#[test]
fn the_agent_names_the_full_accept_queue_too() {
    let SlowServer {
        s1: S1 { lab, client, .. },
        _kube,
        kubeconfig,
        pid,
    } = slow_server("dpqa");
    let agent = support::start_named_agent(lab.node(), &kubeconfig, true);
    lab.sh(&client.netns, &format!("python3 -c \"{BURST}\""))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let out = support::stop(agent);
    let _ = std::fs::remove_file(kubeconfig);
    let records = support::ndjson(&out.stdout);
    support::assert_schema_valid(&records);
    let full: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "verdict" && !r["listen_queue"].is_null())
        .collect();
    assert!(!full.is_empty(), "{}\n{}", out.stdout, out.stderr);
    assert_names_the_full_queue(full[0], pid);
}

fn wait_listening(lab: &Lab, netns: &str) {
    for _ in 0..50 {
        if lab
            .sh(netns, "ss -Hltn 'sport = :9100'")
            .is_ok_and(|s| !s.trim().is_empty())
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the slow server did not listen");
}

/// Where a lab test breaks the route toward the server pod.
#[derive(Clone, Copy, PartialEq)]
enum Where {
    /// The node's route (the SYN is forwarded, then freed there).
    Node,
    /// The client pod's own route (connect() fails there before any packet exists).
    Pod,
}

/// The route toward the server pod replaced by `route` (or removed, with the default route,
/// when `None`) on the node or in the client pod; one connect from the client; the trace's one
/// verdict.
fn route_verdict(tag: &str, at: Where, route: Option<&str>, expect: Connect) -> Value {
    let S1 {
        lab,
        client,
        server: _server,
    } = s1_lab(tag);
    let ns = match at {
        Where::Node => lab.node().to_string(),
        Where::Pod => client.netns.clone(),
    };
    let change = match (route, at) {
        (Some(r), _) => format!("ip route replace {r}"),
        (None, Where::Node) => "ip route del 10.42.0.30/32; ip route del default".into(),
        (None, Where::Pod) => "ip route del default".into(),
    };
    lab.sh(&ns, &change).unwrap();
    if route.is_none() && at == Where::Node {
        // Proxy ARP answers only while the node has a route for the gateway address: a static
        // neighbour keeps this a routing failure, not a neighbour failure.
        support::static_gateway_neighbour(&lab, &client);
    }
    let trace = start_verdict_trace(lab.node(), &["--port", "9100", "--duration", "4s"]);
    let addr: SocketAddr = "10.42.0.30:9100".parse().unwrap();
    assert_eq!(
        lab.connect(&client.netns, addr, Duration::from_millis(1500)),
        expect
    );
    let out = trace.finish_with_code(1);
    let all = out.verdicts();
    assert_eq!(all.len(), 1, "one attempt:\n{}\n{}", out.dump(), out.stderr);
    let v = all[0].clone();
    let why = v["explanation"].as_str().unwrap();
    assert!(
        !why.contains("from 10.42.0.20"),
        "the client did not send the ICMP error: {why}"
    );
    assert_eq!(v["no_route"]["netns"], ns.as_str(), "{v:#}");
    if at == Where::Node {
        assert_eq!(v["no_route"]["interface"], client.host_if.as_str(), "{v:#}");
    } else {
        assert_in_connect(&v, &client.netns);
    }
    v
}

fn node_route_verdict(tag: &str, route: Option<&str>, expect: Connect) -> Value {
    route_verdict(tag, Where::Node, route, expect)
}

/// A connect() in the client pod whose lookup failed there: said so, with no SYN and no
/// source address.
fn assert_in_connect(v: &Value, client_ns: &str) {
    assert_eq!(v["outcome"], "unreachable", "{v:#}");
    assert_eq!(v["no_route"]["in_connect"], true, "{v:#}");
    assert_eq!(v["client"]["netns"], client_ns, "{v:#}");
    assert_eq!(
        (&v["server"]["addr"], &v["server"]["port"]),
        (&"10.42.0.30".into(), &9100.into()),
        "{v:#}"
    );
    assert_eq!(v["app_error"], v["no_route"]["client_sees"], "{v:#}");
    let why = v["explanation"].as_str().unwrap();
    let expected =
        format!("connect() to 10.42.0.30:9100 in {client_ns} failed before any packet left");
    assert!(why.starts_with(&expected), "{why}");
}

fn assert_route(v: &Value, kind: &str, client_sees: &str) {
    let r = &v["no_route"]["route"];
    assert_eq!(r["kind"], kind, "{v:#}");
    assert_eq!(r["prefix"], "10.42.0.30/32", "{v:#}");
    assert_eq!(r["table"], "main", "{v:#}");
    assert_eq!(v["no_route"]["client_sees"], client_sees, "{v:#}");
    let headline = v["headline"].as_str().unwrap();
    assert!(
        headline.contains(&format!("no route: {kind} route to 10.42.0.30")),
        "{headline}"
    );
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.contains(&format!("the {kind} route 10.42.0.30/32 (table main)")),
        "{why}"
    );
}

#[test]
fn unreachable_route_on_the_node_is_named_with_its_table() {
    let v = node_route_verdict(
        "dpunr",
        Some("unreachable 10.42.0.30/32"),
        Connect::Other(libc::EHOSTUNREACH),
    );
    assert_eq!(v["outcome"], "unreachable", "{v:#}");
    assert_route(&v, "unreachable", "EHOSTUNREACH");
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.contains("ICMP type 3 code 1 (host unreachable)"),
        "{why}"
    );
    assert!(why.contains("not from the server"), "{why}");
}

#[test]
fn prohibit_route_on_the_node_is_named_with_its_table() {
    let v = node_route_verdict(
        "dpproh",
        Some("prohibit 10.42.0.30/32"),
        Connect::Other(libc::EHOSTUNREACH),
    );
    assert_eq!(v["outcome"], "unreachable", "{v:#}");
    assert_route(&v, "prohibit", "EHOSTUNREACH");
    assert!(
        v["explanation"]
            .as_str()
            .unwrap()
            .contains("administratively prohibited")
    );
}

#[test]
fn blackhole_route_on_the_node_is_a_drop_and_a_timeout() {
    let v = node_route_verdict("dpbh", Some("blackhole 10.42.0.30/32"), Connect::TimedOut);
    assert_eq!(v["outcome"], "dropped_by_kernel", "{v:#}");
    assert_route(&v, "blackhole", "a timeout");
}

/// IPv6: a blackhole route frees the SYN in `dst_discard_out`, not `ip6_pkt_*`.
#[test]
fn blackhole_ipv6_route_on_the_node_is_named_with_its_table() {
    let S1 {
        lab,
        client,
        server,
    } = s1_lab("dpbh6");
    lab.sh(
        lab.node(),
        &format!("ip -6 route replace blackhole {}/128", server.ip6),
    )
    .unwrap();
    let trace = start_verdict_trace(lab.node(), &["--port", "9100", "--duration", "4s"]);
    let addr = SocketAddr::new(server.ip6.into(), 9100);
    assert_eq!(
        lab.connect(&client.netns, addr, Duration::from_millis(1500)),
        Connect::TimedOut
    );
    let out = trace.finish_with_code(1);
    let all = out.verdicts();
    assert_eq!(all.len(), 1, "one attempt:\n{}", out.dump());
    let v = &all[0];
    assert_eq!(v["outcome"], "dropped_by_kernel", "{v:#}");
    let r = &v["no_route"]["route"];
    assert_eq!(r["kind"], "blackhole", "{v:#}");
    assert_eq!(r["prefix"], format!("{}/128", server.ip6), "{v:#}");
    assert_eq!(r["table"], "main", "{v:#}");
    assert_eq!(v["no_route"]["freed_in"], "dst_discard_out", "{v:#}");
}

#[test]
fn missing_route_on_the_node_says_there_is_none() {
    let v = node_route_verdict("dpnone", None, Connect::Other(libc::ENETUNREACH));
    assert_eq!(v["outcome"], "unreachable", "{v:#}");
    assert_eq!(v["no_route"]["route"]["kind"], "none", "{v:#}");
    assert_eq!(v["no_route"]["client_sees"], "ENETUNREACH", "{v:#}");
    let headline = v["headline"].as_str().unwrap();
    assert!(headline.starts_with("no route to 10.42.0.30"), "{headline}");
}

/// Inside the client pod (#16 item 2 in a pod's namespace): the route named there, and the
/// errno connect() returned at once.
fn pod_route(tag: &str, kind: &str, errno: i32, client_sees: &str) {
    let route = format!("{kind} 10.42.0.30/32");
    let v = route_verdict(tag, Where::Pod, Some(&route), Connect::Other(errno));
    assert_route(&v, kind, client_sees);
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.contains(&format!("so the client gets {client_sees} at once")),
        "{why}"
    );
}

#[test]
fn unreachable_route_in_the_pod_is_named_with_its_table() {
    pod_route("dppunr", "unreachable", libc::EHOSTUNREACH, "EHOSTUNREACH");
}

#[test]
fn prohibit_route_in_the_pod_is_named_with_its_table() {
    pod_route("dppproh", "prohibit", libc::EACCES, "EACCES");
}

/// A local connect() to a blackhole route fails with EINVAL (only forwarded packets are
/// dropped silently).
#[test]
fn blackhole_route_in_the_pod_is_named_with_its_table() {
    pod_route("dppbh", "blackhole", libc::EINVAL, "EINVAL");
}

#[test]
fn missing_route_in_the_pod_says_there_is_none() {
    let v = route_verdict(
        "dppnone",
        Where::Pod,
        None,
        Connect::Other(libc::ENETUNREACH),
    );
    assert_eq!(v["no_route"]["route"]["kind"], "none", "{v:#}");
    assert_eq!(v["no_route"]["client_sees"], "ENETUNREACH", "{v:#}");
    let headline = v["headline"].as_str().unwrap();
    assert!(
        headline.starts_with("no route to 10.42.0.30 in "),
        "{headline}"
    );
    assert!(
        v["next_steps"][1]
            .as_str()
            .unwrap()
            .contains("add the missing route"),
        "{v:#}"
    );
}

/// The route-lookup probe is optional: a kernel that refuses it (here: the verifier, made to
/// refuse it by loading it against a one-argument tracepoint) leaves a trace that says so and
/// goes on watching everything else — an ordinary refused connection is still judged.
#[test]
fn a_trace_without_the_route_lookup_probe_says_so_and_runs() {
    let S1 {
        lab,
        client,
        server: _server,
    } = s1_lab("dppfault");
    let trace = support::start_verdict_trace_env(
        lab.node(),
        &["--port", "9100", "--duration", "3s"],
        &[("NETPROBE_FAULT_PROBE", "fib_table_lookup")],
    );
    let addr: SocketAddr = "10.42.0.30:9100".parse().unwrap();
    assert_eq!(
        lab.connect(&client.netns, addr, Duration::from_millis(1500)),
        Connect::Refused
    );
    let out = trace.finish_with_code(1);
    assert!(
        out.stderr
            .contains("optional probe fib_table_lookup refused, running without it"),
        "{}",
        out.stderr
    );
    let all = out.verdicts();
    assert_eq!(all.len(), 1, "{}\n{}", out.dump(), out.stderr);
    assert_eq!(all[0]["outcome"], "refused_no_listener", "{:#}", all[0]);
}

/// Successful lookups cost no event: with policy rules (here a rule to an empty table before
/// main), every connect() first misses the local table and that table before main finds its
/// route. Those misses are not failures: a connection that works leaves no `route_failed`
/// event and no verdict but its own.
#[test]
fn policy_rules_missing_a_table_before_main_are_no_route_failure() {
    let S1 {
        lab,
        client,
        server,
    } = s1_lab("dpprules");
    let _l = lab
        .listen(&server.netns, "10.42.0.30:9100".parse().unwrap())
        .unwrap();
    lab.sh(&client.netns, "ip rule add from all lookup 100 pref 100")
        .unwrap();
    let trace = support::start_trace(lab.node(), &["--port", "9100", "--duration", "3s"]);
    let addr: SocketAddr = "10.42.0.30:9100".parse().unwrap();
    assert_eq!(
        lab.connect(&client.netns, addr, Duration::from_millis(1500)),
        Connect::Connected
    );
    let out = trace.finish_with_code(0);
    assert!(
        out.of_kind("route_failed").is_empty(),
        "{}\n{}",
        out.dump(),
        out.stderr
    );
    assert!(out.of_kind("state_change").len() > 1, "{}", out.dump());
}
