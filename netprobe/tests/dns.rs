//! Privileged tests of UDP and DNS diagnosis: a client pod asks the cluster DNS Service
//! (kube-dns ClusterIP, kube-proxy DNAT) for a name, a CoreDNS-shaped pod answers (or not), a
//! Calico-shaped egress policy lets it through (or not). Real sockets, real rules, the real
//! binary; DNS messages built by hand.

mod support;

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use netprobe_lab::{
    Lab, Pod,
    dns::a_query,
    kubeapi::{FakeKube, Kind, endpoint_slice, pod, service},
    rules::{KUBE_DNS_IP, calico_egress_filter, kube_dns_dnat, restore},
};
use serde_json::Value;
use support::{TraceOutput, start_verdict_trace_env};

const NAME: &str = "seldon-scheduler.financial-inference.svc.cluster.local";
const NODE: &str = "lab-node";
const COREDNS: &str = "coredns-6799fbcd5-x7k2p";
/// What the CoreDNS stand-in answers (the scheduler Service's ClusterIP).
const ANSWER: Ipv4Addr = Ipv4Addr::new(10, 43, 51, 131);

struct DnsLab {
    lab: Lab,
    client: Pod,
    coredns: Pod,
    _kube: FakeKube,
    kubeconfig: PathBuf,
}

impl Drop for DnsLab {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// Client `financial-inference/client-0` (10.42.0.20), CoreDNS `kube-system/coredns-…`
/// (10.42.0.3) serving 53/udp (answering A queries when `answers`), kube-dns ClusterIP
/// 10.43.0.10 DNAT-ed to it; with `egress` Some(allow_dns), the client's Calico egress policy.
fn dns_lab(tag: &str, answers: bool, egress: Option<bool>) -> DnsLab {
    dns_lab_serving(
        tag,
        |sock| netprobe_lab::dns::serve(sock, answers.then_some(ANSWER)),
        egress,
    )
}

/// [`dns_lab`] with CoreDNS's socket served by `serve`.
fn dns_lab_serving(tag: &str, serve: impl FnOnce(UdpSocket), egress: Option<bool>) -> DnsLab {
    netprobe_lab::require_root();
    let mut lab = Lab::new(tag).unwrap();
    let client = support::add_client(&mut lab);
    let coredns = lab
        .add_pod("kube-system", COREDNS, "10.42.0.3".parse().unwrap())
        .unwrap();
    let sock = netprobe_lab::in_netns(&coredns.netns, || UdpSocket::bind("10.42.0.3:53"))
        .unwrap()
        .unwrap();
    serve(sock);
    restore(&lab, "iptables-restore", &kube_dns_dnat("10.42.0.3")).unwrap();
    if let Some(allow_dns) = egress {
        restore(
            &lab,
            "iptables-restore",
            &calico_egress_filter(&client.host_if, &coredns.host_if, allow_dns),
        )
        .unwrap();
    }
    let (kube, kubeconfig) = support::kube_api(&lab);
    for (p, c) in [(&client, "client"), (&coredns, "coredns")] {
        kube.apply(
            Kind::Pod,
            pod(
                &p.namespace,
                &p.name,
                NODE,
                &p.ip.to_string(),
                &[(c, "c0c0c0c0c0c0c0c0", &[])],
            ),
        );
    }
    kube.apply(
        Kind::Service,
        service("kube-system", "kube-dns", KUBE_DNS_IP, &[("dns", 53, 53)]),
    );
    kube.apply(
        Kind::EndpointSlice,
        endpoint_slice(
            "kube-system",
            "kube-dns",
            &[("10.42.0.3", COREDNS)],
            &[("dns", 53)],
        ),
    );
    DnsLab {
        lab,
        client,
        coredns,
        _kube: kube,
        kubeconfig,
    }
}

/// Sends `query` from `netns` to `to` and waits up to 1.5 s for a reply.
fn ask(netns: &str, to: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    netprobe_lab::in_netns(netns, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        s.send_to(query, to).unwrap();
        let mut buf = [0u8; 512];
        s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    })
    .unwrap()
}

/// Traces the client pod's lookups (`--pod client-0 --dns`) while it asks for [`NAME`];
/// returns the reply it got and the trace's verdict.
/// With NETPROBE_RECORD_FIXTURES=DIR the trace's events are recorded as DIR/`fixture`.ndjson.
fn trace_lookup(
    d: &DnsLab,
    id: u16,
    exit_code: i32,
    fixture: &str,
) -> (Option<Vec<u8>>, Value, TraceOutput) {
    let mut args: Vec<String> = [
        "--pod",
        "client-0",
        "-n",
        "financial-inference",
        "--dns",
        "--duration",
        "4s",
        "--count",
        "1",
    ]
    .map(String::from)
    .to_vec();
    args.extend(support::record_args(fixture));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let trace = start_verdict_trace_env(
        d.lab.node(),
        &args,
        &[("KUBECONFIG", d.kubeconfig.to_str().unwrap())],
    );
    let reply = ask(
        &d.client.netns,
        format!("{KUBE_DNS_IP}:53").parse().unwrap(),
        &a_query(id, NAME),
    );
    let out = trace.finish_with_code(exit_code);
    support::normalize_fixture(
        fixture,
        &[
            (d.lab.node(), "node"),
            (&d.client.netns, "client"),
            (&d.coredns.netns, "coredns"),
        ],
    );
    let v = out.verdicts();
    let v = v
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("no verdict:\n{}\n{}", out.dump(), out.stderr));
    (reply, v, out)
}

fn assert_names_the_lookup(v: &Value, d: &DnsLab, id: u16) {
    let dns = &v["udp"]["dns"];
    assert_eq!(dns["name"], NAME, "{v:#}");
    assert_eq!(dns["type"], "A", "{v:#}");
    assert_eq!(dns["id"], id, "{v:#}");
    assert_eq!(v["client"]["addr"], "10.42.0.20", "{v:#}");
    assert_eq!(v["client"]["peer"]["pod"], "client-0", "{v:#}");
    assert_eq!(v["dialed"]["addr"], KUBE_DNS_IP, "{v:#}");
    assert_eq!(v["dialed"]["port"], 53, "{v:#}");
    assert_eq!(
        v["dialed"]["peer"]["service"], "kube-system/kube-dns:dns",
        "{v:#}"
    );
    assert_eq!(v["server"]["addr"], d.coredns.ip.to_string(), "{v:#}");
    assert_eq!(v["server"]["peer"]["pod"], COREDNS, "{v:#}");
}

/// The done-when of the DNS half of issue #9: a lookup blocked by the client's Calico egress
/// policy names the query, the client pod, the Service, the rule and the policy; no reply.
#[test]
fn dns_lookup_blocked_by_calico_egress_names_query_rule_and_policy() {
    let d = dns_lab("dnsdeny", true, Some(false));
    let (reply, v, out) = trace_lookup(&d, 0x4242, 1, "dns_calico_egress");
    assert_eq!(reply, None, "the lookup is blocked");
    assert_eq!(v["outcome"], "dropped_by_rule", "{v:#}\n{}", out.dump());
    assert_names_the_lookup(&v, &d, 0x4242);
    assert_eq!(v["udp"]["replied"], false, "{v:#}");
    let nf = &v["netfilter"];
    assert_eq!(
        nf["chain"],
        format!("cali-fw-{}", d.client.host_if),
        "{v:#}"
    );
    assert!(
        nf["comments"]
            .as_array()
            .unwrap()
            .contains(&"Drop if no policies passed packet".into()),
        "{v:#}"
    );
    assert!(nf["rule"].as_str().unwrap().contains("-j DROP"), "{v:#}");
    assert_eq!(nf["owner"]["system"], "calico", "{v:#}");
    assert_eq!(
        nf["owner"]["policies"],
        serde_json::json!(["financial-inference/client-egress"]),
        "{v:#}"
    );
    assert_eq!(
        nf["owner"]["workload"], "financial-inference/client-0",
        "{v:#}"
    );
    assert!(
        v["explanation"]
            .as_str()
            .unwrap()
            .contains(&format!("The DNS query A {NAME}")),
        "{v:#}"
    );
}

/// The same lab with DNS admitted by the policy: answered, NOERROR (so the test above can
/// fail both ways).
#[test]
fn dns_lookup_admitted_is_answered_noerror() {
    let d = dns_lab("dnsok", true, Some(true));
    let (reply, v, out) = trace_lookup(&d, 0x0a0a, 0, "dns_answered");
    let reply = reply.expect("CoreDNS answered");
    assert_eq!(&reply[..2], &[0x0a, 0x0a]);
    assert_eq!(v["outcome"], "answered", "{v:#}\n{}", out.dump());
    assert_eq!(v["headline"], "answered: NOERROR", "{v:#}");
    assert_names_the_lookup(&v, &d, 0x0a0a);
    assert_eq!(v["udp"]["replied"], true, "{v:#}");
    assert_eq!(v["udp"]["dns"]["rcode"], "NOERROR", "{v:#}");
    assert_eq!(v["udp"]["dns"]["answers"], 1, "{v:#}");
    assert!(v.get("netfilter").is_none(), "{v:#}");
    // The events of a DNS trace carry the decoded message.
    assert!(out.summary["events"].as_u64().unwrap() >= 2);
}

/// Issue #16 item 6: CoreDNS reached but failing (SERVFAIL: its upstream is down; REFUSED: not
/// a zone it serves) is a failed lookup for the application. The trace says so in the headline,
/// names the server and the rcode, counts it failed and exits 1, as the agent counts a
/// `dns_failure` (NXDOMAIN stays an answer: see `verdict::udp`).
#[test]
fn dns_lookup_answered_servfail_or_refused_is_a_failed_lookup() {
    for (tag, rcode, name) in [("dnssfail", 2, "SERVFAIL"), ("dnsrefus", 5, "REFUSED")] {
        let d = dns_lab_serving(
            tag,
            |sock| netprobe_lab::dns::serve_rcode(sock, rcode),
            None,
        );
        let (reply, v, out) = trace_lookup(&d, 0x2b2b, 1, &format!("dns_{tag}"));
        let reply = reply.expect("CoreDNS answered");
        assert_eq!(reply[3] & 0x0f, rcode, "the lab's answer");
        assert_eq!(v["outcome"], "answered", "{v:#}\n{}", out.dump());
        assert_eq!(
            v["headline"],
            format!("DNS lookup failed: the server answered {name}"),
            "{v:#}"
        );
        assert_names_the_lookup(&v, &d, 0x2b2b);
        assert_eq!(v["udp"]["dns"]["rcode"], name, "{v:#}");
        assert_eq!(out.summary["failed"], 1, "{}", out.summary);
        let why = v["explanation"].as_str().unwrap();
        assert!(
            why.contains(&format!(
                "reached the DNS server 10.42.0.3:53 (dialled as {KUBE_DNS_IP}:53), which answered {name}"
            )) && why.contains("the application sees a failed lookup"),
            "{v:#}"
        );
        let next: Vec<&str> = v["next_steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            next.iter().any(|n| n.starts_with(&format!(
                "kubectl exec -n financial-inference client-0 -- nslookup {NAME} 10.42.0.3"
            ))),
            "{next:#?}"
        );
        assert!(
            next.iter().any(|n| n.contains("kubectl -n kube-system")),
            "{next:#?}"
        );
    }
}

/// CoreDNS reads the query and never answers: unanswered, the query named, no drop here.
#[test]
fn dns_lookup_never_answered_is_unanswered_with_no_drop() {
    let d = dns_lab("dnssilent", false, None);
    let (reply, v, out) = trace_lookup(&d, 0x5151, 1, "dns_unanswered");
    assert_eq!(reply, None);
    assert_eq!(v["outcome"], "unanswered", "{v:#}\n{}", out.dump());
    assert_names_the_lookup(&v, &d, 0x5151);
    assert_eq!(v["udp"]["replied"], false, "{v:#}");
    assert!(
        v.get("drop").is_none() && v.get("netfilter").is_none(),
        "{v:#}"
    );
    assert!(
        v["explanation"]
            .as_str()
            .unwrap()
            .contains("nothing on this node dropped it"),
        "{v:#}"
    );
}

/// Generic UDP to a port where no socket is bound: the kernel answers ICMP port unreachable
/// (NO_SOCKET); the verdict says nothing listens and lists the UDP sockets that are there.
#[test]
fn udp_to_a_port_without_socket_is_no_listener_with_the_udp_listeners() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("udpnolisten").unwrap();
    let client = support::add_client(&mut lab);
    let server = lab
        .add_pod("financial-ml", "mlserver-0", "10.42.0.10".parse().unwrap())
        .unwrap();
    let _bound = netprobe_lab::in_netns(&server.netns, || UdpSocket::bind("0.0.0.0:9001"))
        .unwrap()
        .unwrap();
    let mut args = vec![
        "--proto",
        "udp",
        "--port",
        "9999",
        "--duration",
        "4s",
        "--count",
        "1",
    ];
    let record = support::record_args("udp_no_listener");
    args.extend(record.iter().map(String::as_str));
    let trace = support::start_verdict_trace(lab.node(), &args);
    let refused = netprobe_lab::in_netns(&client.netns, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect("10.42.0.10:9999").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        s.send(b"hello").unwrap();
        let mut buf = [0u8; 64];
        s.recv(&mut buf).map_err(|e| e.kind())
    })
    .unwrap();
    assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused));
    let out = trace.finish_with_code(1);
    support::normalize_fixture(
        "udp_no_listener",
        &[
            (lab.node(), "node"),
            (&client.netns, "client"),
            (&server.netns, "server"),
        ],
    );
    let v = out.verdicts();
    let v = v
        .first()
        .unwrap_or_else(|| panic!("no verdict:\n{}\n{}", out.dump(), out.stderr));
    assert_eq!(v["outcome"], "refused_no_listener", "{v:#}\n{}", out.dump());
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.contains("Nothing listens on udp 10.42.0.10:9999 in"),
        "{v:#}"
    );
    assert!(
        v["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["port"] == 9001),
        "{v:#}"
    );
    assert_eq!(v["udp"]["replied"], false, "{v:#}");
    assert!(v["udp"].get("dns").is_none(), "not DNS: {v:#}");
    assert_eq!(v["client"]["addr"], "10.42.0.20");
    assert_eq!(v["server"]["port"], 9999);
}

/// Always-on: a blocked lookup is a `dns_failure` record in the agent's NDJSON (naming the
/// query, the client pod and the reason; schema-valid) and counts in
/// `netprobe_dns_failures_total` for that pod; the lookup before the policy changed, admitted,
/// is only counted (`netprobe_dns_queries_total`), never written.
#[test]
fn agent_reports_a_blocked_lookup_as_a_dns_failure_of_the_pod() {
    let d = dns_lab("dnsagent", true, Some(true));
    let agent = support::start_agent(
        d.lab.node(),
        &[],
        &[("KUBECONFIG", d.kubeconfig.to_str().unwrap())],
        true,
    );
    let dns_ip: SocketAddr = format!("{KUBE_DNS_IP}:53").parse().unwrap();
    // Admitted by the policy: answered, counted, not written.
    assert!(ask(&d.client.netns, dns_ip, &a_query(0x0101, NAME)).is_some());
    // The policy changes: UDP 53 no longer admitted.
    d.lab
        .sh(
            d.lab.node(),
            "iptables -D cali-po-_rBbcmGd2jTnKVqUxcT0 -p udp -m comment --comment cali:Dn5aLw0Pp1QeZ3rT -m multiport --dports 53 -j MARK --set-xmark 0x10000/0x10000",
        )
        .unwrap();
    assert_eq!(ask(&d.client.netns, dns_ip, &a_query(0x7777, NAME)), None);
    let failures = "netprobe_dns_failures_total{namespace=\"financial-inference\",pod=\"client-0\",reason=\"dropped\"} 1";
    let start = std::time::Instant::now();
    let metrics = loop {
        let (_, m) = support::get(&agent, "/metrics");
        if m.contains(failures) || start.elapsed() > Duration::from_secs(8) {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = support::stop(agent);
    let lines = support::ndjson(&out.stdout);
    support::assert_schema_valid(&lines);
    let dump = lines
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(metrics.contains(failures), "{metrics}\n{dump}");
    assert!(
        metrics.contains("netprobe_dns_queries_total{rcode=\"NOERROR\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("netprobe_dns_queries_total{rcode=\"none\"} 1"),
        "the blocked lookup got no answer: {metrics}"
    );
    // Healthy DNS costs no NDJSON line: only the failure carries a DNS message.
    let with_dns = lines.iter().filter(|l| l.get("dns").is_some()).count();
    let fails: Vec<&Value> = lines
        .iter()
        .filter(|l| l["kind"] == "dns_failure")
        .collect();
    assert_eq!(with_dns, fails.len(), "{dump}");
    assert_eq!(
        fails.len(),
        1,
        "one failure, the answered lookup is not written:\n{dump}"
    );
    let f = fails[0];
    assert_eq!(f["dns"]["name"], NAME, "{f:#}");
    assert_eq!(f["dns"]["type"], "A", "{f:#}");
    assert_eq!(f["dns"]["id"], 0x7777, "{f:#}");
    assert_eq!(f["dns_failure"]["reason"], "dropped", "{f:#}");
    assert_eq!(f["dns_failure"]["replied"], false, "{f:#}");
    assert_eq!(f["source"]["pod"], "client-0", "{f:#}");
    assert_eq!(f["dst"], KUBE_DNS_IP, "{f:#}");
    assert_eq!(
        f["destination"]["service"], "kube-system/kube-dns:dns",
        "{f:#}"
    );
    assert_eq!(f["dns_failure"]["backend"]["addr"], "10.42.0.3", "{f:#}");
    // The agent names the rule by itself (#14 §6): the policy chain's end-of-tier drop.
    let nf = &f["netfilter"];
    assert_eq!(
        nf["chain"],
        format!("cali-fw-{}", d.client.host_if),
        "{f:#}"
    );
    assert!(
        nf["comments"]
            .as_array()
            .is_some_and(|c| c.contains(&"Drop if no policies passed packet".into())),
        "{f:#}"
    );
    assert_eq!(
        nf["owner"]["policies"],
        serde_json::json!(["financial-inference/client-egress"]),
        "{f:#}"
    );
    assert!(
        !f["dns_failure"]["explanation"]
            .as_str()
            .unwrap()
            .contains("not traced"),
        "{f:#}"
    );
}
