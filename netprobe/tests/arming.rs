//! Privileged tests of rule attribution without a running trace (the always-on agent's
//! library pieces, driven directly): armed flows (a dropped SYN arms a narrow nftables trace of
//! its client flow, the retransmit names the rule) and rule counter differences (a REJECT the
//! client never retries). Real kernel programs, real rule sets loaded into a lab node, real
//! `nft`; each test asserts the ruleset is as it was once nothing is armed.

mod support;

use std::{
    net::{IpAddr, SocketAddr},
    rc::Rc,
    time::{Duration, Instant},
};

use netprobe::{
    enrich::{Enricher, Stage},
    events::{Event, Kind},
    model::Protocol,
    netns::NetnsRef,
    probes::{Probes, btf::KernelBtf, nft_trace},
    session::{Input, Source},
    sources::{
        nftrace::armed::{ArmOnDrop, ArmedTrace},
        ring::{EventReader, RingSource},
        xtables::{Counted, RuleCounters},
    },
};
use netprobe_lab::{
    Connect, Lab,
    rules::{CLUSTER_IP, calico_egress_filter, kube_proxy_no_endpoints, restore},
};
use support::{S1, load_s1_rules, s1_lab};

const TTL: Duration = Duration::from_secs(5);

fn stateless_ruleset(lab: &Lab) -> String {
    lab.sh(lab.node(), "nft -s list ruleset").unwrap()
}

fn node_ns(lab: &Lab) -> NetnsRef {
    NetnsRef::resolve(lab.node()).unwrap()
}

fn enricher(node: &NetnsRef) -> Rc<Enricher> {
    let e = Enricher::new(&KernelBtf::load().unwrap()).unwrap();
    e.add_netns(node.inode, &node.name);
    Rc::new(e)
}

/// The kernel side of the agent, reduced to what these tests need: the drop tracepoints of
/// every port in the lab's node namespace, failure signals only (the agent's filter), read on
/// a current-thread runtime.
struct Kernel {
    node: NetnsRef,
    rt: tokio::runtime::Runtime,
    enricher: Rc<Enricher>,
    /// Keeps the programs attached.
    _probes: Probes,
    ring: RingSource,
}

impl Kernel {
    fn attach(lab: &Lab) -> Self {
        let node = node_ns(lab);
        let rt = runtime();
        let enricher = enricher(&node);
        let kbtf = KernelBtf::load().unwrap();
        let filter = netprobe_common::Filter {
            netns_enabled: 1,
            failures_only: 1,
            ..Default::default()
        };
        let mut probes = Probes::load(&kbtf, filter).unwrap();
        probes.set_netns_filter(&[node.inode]).unwrap();
        probes.attach_tracepoints(kbtf.aya()).unwrap();
        // The ring's fd registers with the runtime's reactor.
        let _in_runtime = rt.enter();
        let reader = EventReader::new(probes.take_events().unwrap()).unwrap();
        let ring = RingSource::new(reader, enricher.clone());
        Self {
            node,
            rt,
            enricher,
            _probes: probes,
            ring,
        }
    }
}

/// Runs `client` (on its own thread) while the ring runs through `stages` (and the armed
/// trace, if any), until the first `netfilter` event or 3 s; asserts the event came `within`
/// the client's start. What the client returned, and the event.
fn named_within<R: Send>(
    rt: &tokio::runtime::Runtime,
    client: impl FnOnce() -> R + Send,
    within: Duration,
    ring: &mut RingSource,
    armed: Option<&mut ArmedTrace>,
    stages: &mut [&mut dyn Stage],
) -> (R, Event) {
    let start = wall_ns();
    let (outcome, found, seen) = std::thread::scope(|s| {
        let c = s.spawn(client);
        let (found, seen) = rt.block_on(first_netfilter(ring, armed, stages));
        (c.join().unwrap(), found, seen)
    });
    let (e, named_at) = found.unwrap_or_else(|| {
        let dump: Vec<String> = seen
            .iter()
            .map(|e| serde_json::to_string(e).unwrap())
            .collect();
        panic!("no netfilter event:\n{}", dump.join("\n"))
    });
    let elapsed = Duration::from_nanos(named_at - start);
    eprintln!("the rule was named {elapsed:?} after the first packet");
    assert!(
        elapsed <= within,
        "named {elapsed:?} after the first packet"
    );
    (outcome, e)
}

/// A TCP connect from `client_netns` to the S1 ClusterIP, 2 s timeout.
fn dial_cluster_ip(lab: &Lab, client_netns: &str) -> impl FnOnce() -> Connect + Send {
    let to: SocketAddr = format!("{CLUSTER_IP}:9004").parse().unwrap();
    move || lab.connect(client_netns, to, Duration::from_secs(2))
}

/// Runs the pipeline until the first `netfilter` event (or 3 s): it and when it came out
/// (wall clock: a derived event carries the time of the drop it explains), and every event
/// seen.
async fn first_netfilter(
    ring: &mut RingSource,
    mut armed: Option<&mut ArmedTrace>,
    stages: &mut [&mut dyn Stage],
) -> (Option<(Event, u64)>, Vec<Event>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut seen = Vec::new();
    let found = 'found: loop {
        let input = tokio::select! {
            i = ring.next() => i,
            i = async { armed.as_mut().unwrap().next().await }, if armed.is_some() => i,
            _ = tokio::time::sleep_until(deadline) => break 'found None,
        };
        let Input::Events(events) = input.unwrap() else {
            continue;
        };
        for mut e in events {
            let mut derived = Vec::new();
            for s in stages.iter_mut() {
                s.enrich(&mut e, &mut derived);
            }
            seen.push(e);
            seen.extend(derived);
        }
        if let Some(e) = seen.iter().find(|e| e.kind == Kind::Netfilter) {
            break 'found Some((e.clone(), wall_ns()));
        }
    };
    (found, seen)
}

/// Wall-clock now, in the events' unit (`time_ns`).
fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// S1 (ClusterIP → DNAT → Calico end-of-tier deny), agent style: nobody traces port 9004.
/// The first dropped SYN arms its client flow; the retransmit one second later is traced
/// from before DNAT to the Calico rule.
#[test]
fn s1_dropped_syn_arms_its_flow_and_the_retransmit_names_the_calico_rule() {
    let s1 = s1_lab("arms1");
    load_s1_rules(&s1);
    let S1 {
        lab,
        client,
        server,
    } = s1;
    let _l = lab
        .listen(&server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    let before = stateless_ruleset(&lab);
    let mut k = Kernel::attach(&lab);
    let mut armed = ArmedTrace::new(k.enricher.clone(), 32, TTL);
    let arming = armed.arming();
    arming.add_netns(&k.node);
    assert_eq!(
        stateless_ruleset(&lab),
        before,
        "nothing armed, nothing added"
    );
    let mut arm = ArmOnDrop(arming.clone());

    // The first retransmit leaves 1 s after the SYN.
    let (outcome, e) = named_within(
        &k.rt,
        dial_cluster_ip(&lab, &client.netns),
        Duration::from_millis(1500),
        &mut k.ring,
        Some(&mut armed),
        &mut [&mut arm],
    );
    assert_eq!(outcome, Connect::TimedOut);
    let n = e.netfilter.as_ref().unwrap();
    assert_eq!(n.chain, format!("cali-tw-{}", server.host_if));
    assert!(
        n.comments
            .contains(&"Drop if no policies passed packet".to_string()),
        "{n:#?}"
    );
    assert_eq!(
        n.owner.policies,
        ["financial-inference/scheduler-allow-xds"]
    );
    assert_eq!(serde_json::to_value(n.owner.system).unwrap(), "calico");
    assert!(n.evidence.is_trace());
    let chains: Vec<&str> = n.path.iter().map(|s| s.chain.as_str()).collect();
    assert!(chains.contains(&"cali-to-wl-dispatch"), "{chains:?}");
    // Marked before DNAT: the event shows the ClusterIP the client dialled, and where it went.
    let cluster_ip: IpAddr = CLUSTER_IP.parse().unwrap();
    assert_eq!(
        (e.src, e.dst, e.dport),
        (client.ip.into(), cluster_ip, 9004)
    );
    assert_eq!(e.protocol, Protocol::Tcp);
    let t = e.translated.as_ref().expect("the backend after DNAT");
    assert_eq!((t.dst, t.dport), ("10.42.0.30".parse().unwrap(), 9004));

    arming.settle();
    let stats = arming.stats();
    assert_eq!(
        (
            stats.armed_total,
            stats.traced,
            stats.armed_now,
            stats.errors
        ),
        (1, 1, 0, 0)
    );
    eprintln!(
        "arming kept the session {} µs; the longest nft run (table, chains, element or the table's removal) took {} µs on the worker",
        stats.arm_us_max, stats.nft_us_max
    );
    // The first arm in a namespace opens its trace socket (a thread in the namespace); the
    // nft run is on the worker. The session must not wait ~20 ms.
    assert!(stats.arm_us_max < 20_000, "{stats:?}");
    assert_eq!(
        stateless_ruleset(&lab),
        before,
        "the explained flow was disarmed, the table removed with it"
    );
}

/// kube-proxy "has no endpoints" REJECT: refused at once, never retried, so never traced.
/// The counters name the rule and the Service from the first drop.
#[test]
fn no_endpoints_reject_is_named_by_counters_within_half_a_second() {
    let S1 { lab, client, .. } = s1_lab("armrej");
    restore(&lab, "iptables-restore", &kube_proxy_no_endpoints()).unwrap();
    let before = stateless_ruleset(&lab);
    let mut k = Kernel::attach(&lab);
    let mut counters = RuleCounters::new(Counted::All);
    let scope = counters.scope();
    scope.add_netns(&k.node).unwrap();

    let (outcome, e) = named_within(
        &k.rt,
        dial_cluster_ip(&lab, &client.netns),
        Duration::from_millis(500),
        &mut k.ring,
        None,
        &mut [&mut counters],
    );
    assert_eq!(outcome, Connect::Refused);
    let n = e.netfilter.as_ref().unwrap();
    assert_eq!(n.chain, "KUBE-SERVICES");
    assert_eq!(n.backend.as_str(), "iptables-nft");
    assert_eq!(n.action.as_str(), "reject");
    assert_eq!(n.client_sees, "connection refused");
    assert_eq!(n.owner.kind, "kube-proxy-no-endpoints");
    assert_eq!(
        n.owner.object.as_deref(),
        Some("financial-inference/seldon-scheduler:xds")
    );
    assert!(!n.evidence.is_trace(), "found by counters");
    assert!(n.path.is_empty(), "no trace, no path: {:?}", n.path);
    assert_eq!((e.dst, e.dport), (CLUSTER_IP.parse().unwrap(), 9004));
    let stats = scope.stats();
    assert!(stats.reads >= 1 && stats.attributed >= 1, "{stats:?}");
    assert_eq!(stateless_ruleset(&lab), before, "counters only read");
}

/// A DNS query dropped by the client's Calico egress policy (§6): the drop arms the query's
/// flow, and the resolver's retry from the same socket names the rule and the policy.
#[test]
fn dropped_dns_query_arms_its_flow_and_the_retry_names_the_egress_rule() {
    let s1 = s1_lab("armdns");
    let S1 {
        lab,
        client,
        server,
    } = s1;
    let egress = calico_egress_filter(&client.host_if, &server.host_if, false);
    restore(&lab, "iptables-restore", &egress).unwrap();
    let mut k = Kernel::attach(&lab);
    let mut armed = ArmedTrace::new(k.enricher.clone(), 32, TTL);
    let arming = armed.arming();
    arming.add_netns(&k.node);
    let mut arm = ArmOnDrop(arming.clone());
    let resolver = SocketAddr::new(server.ip.into(), 53);
    let query_twice = || {
        netprobe_lab::in_netns(&client.netns, || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.send_to(b"\x42\x42query", resolver).unwrap();
            // A resolver's retry, from the same socket (same source port).
            std::thread::sleep(Duration::from_millis(300));
            sock.send_to(b"\x42\x42query", resolver).unwrap();
            sock.local_addr().unwrap().port()
        })
        .unwrap()
    };
    let (sport, e) = named_within(
        &k.rt,
        query_twice,
        Duration::from_millis(1000),
        &mut k.ring,
        Some(&mut armed),
        &mut [&mut arm],
    );
    assert_eq!(e.protocol, Protocol::Udp);
    assert_eq!((e.sport, e.dst, e.dport), (sport, resolver.ip(), 53));
    let n = e.netfilter.as_ref().unwrap();
    assert_eq!(n.chain, format!("cali-fw-{}", client.host_if));
    assert!(
        n.comments
            .contains(&"Drop if no policies passed packet".to_string()),
        "{n:#?}"
    );
    assert_eq!(n.owner.policies, ["financial-inference/client-egress"]);
    assert!(n.evidence.is_trace());
}

/// The armed-flows table exists only while a flow is armed: none at start, gone after the
/// verdict's disarm, after the TTL, and when the handle is dropped; the rest of the ruleset is
/// never touched. A killed agent's table is removed at the next start.
#[test]
fn armed_flows_leave_the_ruleset_untouched_and_stale_tables_are_removed() {
    let s1 = s1_lab("armrs");
    load_s1_rules(&s1);
    let S1 { lab, client, .. } = s1;
    let before = stateless_ruleset(&lab);
    let node = node_ns(&lab);
    let armed = ArmedTrace::new(enricher(&node), 32, TTL);
    let arming = armed.arming();
    arming.add_netns(&node);
    let ours = nft_trace::armed_table_name();
    let flow = (IpAddr::from(client.ip), 40000);

    assert!(arming.arm(node.inode, Protocol::Tcp, flow));
    arming.settle();
    let armed_rs = stateless_ruleset(&lab);
    assert!(
        armed_rs.contains(&format!("table inet {ours}")),
        "{armed_rs}"
    );
    assert!(armed_rs.contains("hook prerouting priority -2147483648"));
    assert!(armed_rs.contains("10.42.0.20 . tcp . 40000"), "{armed_rs}");
    assert!(arming.arm(node.inode, Protocol::Tcp, flow), "idempotent");
    assert_eq!(arming.stats().armed_now, 1);
    arming.disarm(Protocol::Tcp, flow);
    arming.settle();
    assert_eq!(stateless_ruleset(&lab), before, "disarmed: no chain hooked");

    assert!(arming.arm(node.inode, Protocol::Udp, flow));
    arming.expire(Instant::now() + TTL);
    arming.settle();
    assert_eq!(arming.stats().expired, 1);
    assert_eq!(stateless_ruleset(&lab), before, "expired: no chain hooked");

    // A flow whose verdict is out is not armed again: another one.
    let other = (flow.0, flow.1 + 1);
    assert!(!arming.arm(node.inode, Protocol::Tcp, flow));
    assert!(arming.arm(node.inode, Protocol::Tcp, other));
    arming.remove_netns(node.inode);
    arming.settle();
    assert_eq!(
        stateless_ruleset(&lab),
        before,
        "namespace forgotten: table removed"
    );
    let third = (flow.0, flow.1 + 2);
    assert!(
        !arming.arm(node.inode, Protocol::Tcp, third),
        "not watched any more"
    );

    arming.add_netns(&node);
    assert!(arming.arm(node.inode, Protocol::Tcp, third));
    drop((armed, arming));
    assert_eq!(stateless_ruleset(&lab), before, "dropped: table removed");

    // A killed agent's table (its pid is gone) goes at the next start; a live one stays.
    let dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    let mut dead = dead;
    dead.wait().unwrap();
    for pid in [dead_pid, std::process::id()] {
        lab.sh(
            lab.node(),
            &format!("nft add table inet netprobe_{pid}_armed"),
        )
        .unwrap();
    }
    nft_trace::remove_stale_in(&node).unwrap();
    let after = stateless_ruleset(&lab);
    assert!(
        !after.contains(&format!("netprobe_{dead_pid}_armed")),
        "{after}"
    );
    assert!(after.contains(&ours), "a live process's table stays");
    lab.sh(lab.node(), &format!("nft delete table inet {ours}"))
        .unwrap();
    assert_eq!(stateless_ruleset(&lab), before);
}

/// At most `limit` flows are armed at once; more are refused and counted.
#[test]
fn arming_more_flows_than_the_bound_is_refused_and_counted() {
    let S1 { lab, client, .. } = s1_lab("armcap");
    let before = stateless_ruleset(&lab);
    let node = node_ns(&lab);
    let armed = ArmedTrace::new(enricher(&node), 2, TTL);
    let arming = armed.arming();
    arming.add_netns(&node);
    let ip = IpAddr::from(client.ip);
    assert!(arming.arm(node.inode, Protocol::Tcp, (ip, 40001)));
    assert!(arming.arm(node.inode, Protocol::Udp, (ip, 40002)));
    assert!(!arming.arm(node.inode, Protocol::Tcp, (ip, 40003)));
    assert!(!arming.arm(node.inode, Protocol::Tcp, (ip, 40004)));
    arming.settle();
    let stats = arming.stats();
    assert_eq!(
        (
            stats.armed_now,
            stats.armed_total,
            stats.refused,
            stats.errors
        ),
        (2, 2, 2, 0)
    );
    let rs = stateless_ruleset(&lab);
    assert!(rs.contains("10.42.0.20 . tcp . 40001"), "{rs}");
    assert!(rs.contains("10.42.0.20 . udp . 40002"), "{rs}");
    assert!(!rs.contains("40003"), "{rs}");
    // A disarmed flow makes room again; its own retransmits do not arm it again (its verdict
    // is out), nor does a flow whose verdict came without it being armed.
    arming.disarm(Protocol::Tcp, (ip, 40001));
    assert!(arming.arm(node.inode, Protocol::Tcp, (ip, 40003)));
    assert!(!arming.arm(node.inode, Protocol::Tcp, (ip, 40001)));
    arming.disarm(Protocol::Tcp, (ip, 40005));
    arming.disarm(Protocol::Udp, (ip, 40002));
    assert!(!arming.arm(node.inode, Protocol::Tcp, (ip, 40005)));
    assert!(arming.arm(node.inode, Protocol::Tcp, (ip, 40006)));
    drop((armed, arming));
    assert_eq!(stateless_ruleset(&lab), before);
}
