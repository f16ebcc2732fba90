//! Privileged tests of `Trace` objects answered by the agent in its own session (issue #24):
//! the real agent in a netns lab, the real kube-rs client against the Kubernetes API stand-in,
//! real rules and real traffic. The test creates, reads and deletes the objects as a person
//! would (kube-rs), and the agent writes their status.

mod support;

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use netprobe::model::trace::{Trace, TracePhase, TraceSpec, TraceStatus};
use netprobe_lab::{
    Connect, Lab,
    kubeapi::{FakeKube, Kind, pod},
    process::Agent,
    rules::CLUSTER_IP,
};

const NODE: &str = "lab-node";

/// A person's kube-rs client of the stand-in (which listens in the lab's node namespace: the
/// calls run there).
struct Person {
    rt: tokio::runtime::Runtime,
    client: Client,
    node: String,
}

impl Person {
    fn new(lab: &Lab, kubeconfig: &Path) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async {
            let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap();
            Client::try_from(config).unwrap()
        });
        Self {
            rt,
            client,
            node: lab.node().to_string(),
        }
    }

    fn run<R: Send>(&self, f: impl Future<Output = R> + Send) -> R {
        netprobe_lab::in_netns(&self.node, || self.rt.block_on(f)).unwrap()
    }

    fn api(&self, ns: &str) -> Api<Trace> {
        Api::namespaced(self.client.clone(), ns)
    }
}

/// The API stand-in with the Trace CRD installed, and its kubeconfig.
fn kube_api(lab: &Lab) -> (FakeKube, std::path::PathBuf) {
    let (kube, kubeconfig) = support::kube_api(lab);
    kube.install_crd(&serde_json::to_value(<Trace as kube::CustomResourceExt>::crd()).unwrap());
    (kube, kubeconfig)
}

/// The agent of `lab-node`, naming pods and answering Trace objects through the stand-in.
fn start_agent(lab: &Lab, kubeconfig: &Path) -> Agent {
    support::start_named_agent(lab.node(), kubeconfig, false)
}

fn create(p: &Person, ns: &str, name: &str, spec: TraceSpec) {
    let api = p.api(ns);
    p.run(api.create(&PostParams::default(), &Trace::new(name, spec)))
        .unwrap();
}

fn get(p: &Person, ns: &str, name: &str) -> Option<Trace> {
    let api = p.api(ns);
    p.run(api.get_opt(name)).unwrap()
}

fn delete(p: &Person, ns: &str, name: &str) {
    let api = p.api(ns);
    p.run(api.delete(name, &DeleteParams::default())).unwrap();
}

fn status(t: &Trace) -> TraceStatus {
    t.status.clone().unwrap_or_default()
}

/// Polls the object every 20 ms until `done` holds of its status (or panics after `limit`):
/// the status, and how long it took.
fn wait_for(
    p: &Person,
    ns: &str,
    name: &str,
    limit: Duration,
    done: impl Fn(&TraceStatus) -> bool,
) -> (TraceStatus, Duration) {
    let started = Instant::now();
    loop {
        let st = get(p, ns, name).map(|t| status(&t)).unwrap_or_default();
        if done(&st) {
            return (st, started.elapsed());
        }
        assert!(
            started.elapsed() < limit,
            "Trace {ns}/{name} not there within {limit:?}: {st:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spec(pod: &str, port: u16, duration: &str) -> TraceSpec {
    let mut s = TraceSpec::port(pod, port);
    s.duration = duration.into();
    s
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Dials `addr` from `netns` in a loop until stopped (each attempt waits at most 300 ms).
fn keep_dialling(netns: &str, addr: &str) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, ns, addr) = (stop.clone(), netns.to_string(), addr.parse().unwrap());
    let handle = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            let _ = netprobe_lab::in_netns(&ns, || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300))
            });
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    (stop, handle)
}

/// S1 through a Trace object: `financial-inference/seldon-scheduler-0`'s port 9004 traced,
/// the client dials the ClusterIP, Calico's end-of-tier deny drops the SYN, and the verdict
/// naming the rule and the policy is in the object's status within 1 s of the SYN. The object
/// is Completed at the end of its duration with a summary; the client's process (a peer's) is
/// not in it. The agent's memory with the trace running is measured against without.
#[test]
fn s1_through_a_trace_object_names_the_calico_drop_within_a_second() {
    let s1 = support::s1_lab("tos1");
    let _l = s1
        .lab
        .listen(&s1.server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    support::s1_rules(&s1.lab, &s1.server, &s1.client);
    let (kube, kubeconfig) = kube_api(&s1.lab);
    support::publish_pod(&kube, &s1.client);
    kube.apply(
        Kind::Pod,
        pod(
            "financial-inference",
            "seldon-scheduler-0",
            NODE,
            "10.42.0.30",
            &[("scheduler", "5e5e5e5e5e5e5e5e", &[9004, 9005])],
        ),
    );
    support::publish_seldon_scheduler(&kube);
    let agent = start_agent(&s1.lab, &kubeconfig);
    let p = Person::new(&s1.lab, &kubeconfig);
    // Settled before the measure: the inventory listed, the first scrape done.
    std::thread::sleep(Duration::from_secs(2));
    let rss_before = rss_kib(agent.id());

    create(
        &p,
        "financial-inference",
        "s1",
        spec("seldon-scheduler-0", 9004, "6s"),
    );
    let (st, took) = wait_for(
        &p,
        "financial-inference",
        "s1",
        Duration::from_secs(5),
        |s| s.phase == TracePhase::Running,
    );
    eprintln!("Running {took:?} after the object was created");
    assert_eq!(st.node.as_deref(), Some(NODE), "{st:#?}");
    assert!(st.start_time.is_some(), "{st:#?}");

    let started = Instant::now();
    let dial = std::thread::spawn({
        let ns = s1.client.netns.clone();
        move || {
            netprobe_lab::in_netns(&ns, || {
                std::net::TcpStream::connect_timeout(
                    &format!("{CLUSTER_IP}:9004").parse().unwrap(),
                    Duration::from_millis(2500),
                )
            })
        }
    });
    let (st, _) = wait_for(
        &p,
        "financial-inference",
        "s1",
        Duration::from_secs(5),
        |s| !s.verdicts.is_empty(),
    );
    let judged_after = started.elapsed();
    eprintln!("MEASURED: verdict in the Trace's status {judged_after:?} after the SYN was sent");
    let rss_during = rss_kib(agent.id());
    eprintln!(
        "MEASURED: agent RSS {rss_before} KiB without a trace, {rss_during} KiB with one running (+{} KiB)",
        rss_during.saturating_sub(rss_before)
    );
    assert!(dial.join().unwrap().unwrap().is_err(), "the SYN is dropped");
    let v = serde_json::to_value(&st.verdicts[0]).unwrap();
    assert_eq!(v["schema"], "netprobe.verdict/v1", "{v:#}");
    assert_eq!(v["outcome"], "dropped_by_rule", "{v:#}");
    assert_eq!(v["netfilter"]["owner"]["system"], "calico", "{v:#}");
    assert_eq!(
        v["netfilter"]["owner"]["policies"],
        serde_json::json!(["financial-inference/scheduler-allow-xds"]),
        "{v:#}"
    );
    assert_eq!(v["client"]["peer"]["pod"], "client-0", "{v:#}");
    assert_eq!(v["node"], NODE, "stamped as trace -o json stamps it: {v:#}");
    // The client is the peer here: none of its processes.
    for f in ["process", "pid", "netns"] {
        assert!(
            v["client"].get(f).is_none(),
            "peer's {f} in the status: {v:#}"
        );
    }
    assert!(
        judged_after < Duration::from_secs(1),
        "the verdict was in the status {judged_after:?} after the SYN"
    );
    assert!(
        rss_during.saturating_sub(rss_before) <= 8 * 1024,
        "a running trace costs the agent {} KiB",
        rss_during - rss_before
    );

    let (st, _) = wait_for(
        &p,
        "financial-inference",
        "s1",
        Duration::from_secs(10),
        |s| s.phase == TracePhase::Completed,
    );
    assert!(st.completion_time.is_some(), "{st:#?}");
    let summary = serde_json::to_value(st.summary.as_ref().expect("a summary")).unwrap();
    assert!(summary["attempts"].as_u64().unwrap() >= 1, "{summary:#}");
    assert!(summary["failed"].as_u64().unwrap() >= 1, "{summary:#}");
    support::stop(agent);
    let _ = std::fs::remove_file(kubeconfig);
}

/// Two tenants on one node: a Trace in team-a naming team-b's pod fails with a message (a
/// Trace's pod is a name in its own namespace); a Trace on team-a's pod, with the raw events,
/// never shows team-b's flows on the same port although the agent judged them.
#[test]
fn a_trace_in_team_a_sees_nothing_of_team_b() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("toten").unwrap();
    let web = lab
        .add_pod("team-a", "web-0", "10.42.0.40".parse().unwrap())
        .unwrap();
    let db0 = lab
        .add_pod("team-b", "db-0", "10.42.0.41".parse().unwrap())
        .unwrap();
    let db1 = lab
        .add_pod("team-b", "db-1", "10.42.0.42".parse().unwrap())
        .unwrap();
    // Every connection to 5432 across the node dies in a rule: the agent judges them all.
    lab.sh(
        lab.node(),
        "iptables -A FORWARD -p tcp --dport 5432 -j DROP",
    )
    .unwrap();
    let (kube, kubeconfig) = kube_api(&lab);
    for p in [&web, &db0, &db1] {
        support::publish_pod(&kube, p);
    }
    let agent = support::start_agent(
        lab.node(),
        &[],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", NODE),
        ],
        true,
    );
    let p = Person::new(&lab, &kubeconfig);

    create(&p, "team-a", "steal", spec("db-0", 5432, "5s"));
    let (st, _) = wait_for(&p, "team-a", "steal", Duration::from_secs(5), |s| {
        s.phase == TracePhase::Failed
    });
    assert_eq!(
        st.message.as_deref(),
        Some("pod db-0 not found in namespace team-a (a Trace traces a pod of its own namespace)"),
        "{st:#?}"
    );
    assert!(st.verdicts.is_empty() && st.events.is_empty(), "{st:#?}");

    let mut s = spec("web-0", 5432, "4s");
    s.events = true;
    create(&p, "team-a", "mine", s);
    wait_for(&p, "team-a", "mine", Duration::from_secs(5), |s| {
        s.phase == TracePhase::Running
    });
    // team-b's traffic on the same port, all through the trace; team-a's one attempt.
    let (stop, b) = keep_dialling(&db0.netns, "10.42.0.42:5432");
    assert_eq!(
        lab.connect(
            &web.netns,
            "10.42.0.42:5432".parse().unwrap(),
            Duration::from_millis(1500)
        ),
        Connect::TimedOut
    );
    let (st, _) = wait_for(&p, "team-a", "mine", Duration::from_secs(10), |s| {
        s.phase == TracePhase::Completed
    });
    stop.store(true, Ordering::Relaxed);
    b.join().unwrap();
    let out = support::stop(agent);
    let records = support::ndjson(&out.stdout);
    let team_b_judged = records
        .iter()
        .filter(|r| r["kind"] == "verdict" && r["client"]["addr"] == "10.42.0.41")
        .count();
    assert!(
        team_b_judged > 0,
        "the agent judged team-b's flows: {}",
        out.stderr
    );
    assert!(!st.verdicts.is_empty(), "team-a's own attempt: {st:#?}");
    assert!(!st.events.is_empty(), "team-a's events: {st:#?}");
    let web_ip: std::net::IpAddr = "10.42.0.40".parse().unwrap();
    for v in &st.verdicts {
        assert!(
            v.client.addr == web_ip || v.server.addr == web_ip,
            "not team-a's: {}",
            serde_json::to_string_pretty(v).unwrap()
        );
    }
    for e in &st.events {
        assert!(e.src == web_ip || e.dst == web_ip, "not team-a's: {e:#?}");
    }
    let _ = std::fs::remove_file(kubeconfig);
}

/// The S1 lab with its objects and an agent: a Trace on the client pod, Running, the client
/// dialling the ClusterIP (its drops armed in the node's nftables) until the caller stops it.
struct Tracing {
    s1: support::S1,
    _kube: FakeKube,
    kubeconfig: std::path::PathBuf,
    /// None once stopped.
    agent: Option<Agent>,
    p: Person,
    traffic: (Arc<AtomicBool>, std::thread::JoinHandle<()>),
}

impl Tracing {
    fn start(tag: &str) -> Self {
        let s1 = support::s1_lab(tag);
        support::s1_rules(&s1.lab, &s1.server, &s1.client);
        let (kube, kubeconfig) = kube_api(&s1.lab);
        support::publish_pod(&kube, &s1.client);
        support::publish_pod(&kube, &s1.server);
        support::publish_seldon_scheduler(&kube);
        let agent = start_agent(&s1.lab, &kubeconfig);
        let p = Person::new(&s1.lab, &kubeconfig);
        create(&p, "financial-inference", "t", spec("client-0", 9004, "5m"));
        wait_for(
            &p,
            "financial-inference",
            "t",
            Duration::from_secs(5),
            |s| s.phase == TracePhase::Running,
        );
        let traffic = keep_dialling(&s1.client.netns, &format!("{CLUSTER_IP}:9004"));
        // Until the trace has its first verdict.
        wait_for(
            &p,
            "financial-inference",
            "t",
            Duration::from_secs(5),
            |s| !s.verdicts.is_empty(),
        );
        Self {
            s1,
            _kube: kube,
            kubeconfig,
            agent: Some(agent),
            p,
            traffic,
        }
    }

    fn stop_traffic(&mut self) {
        self.traffic.0.store(true, Ordering::Relaxed);
    }

    /// Nothing of netprobe's in the node's namespace within `limit`: no nft table, and (with
    /// `no_filters`) no tc filter.
    fn assert_nothing_left(&self, limit: Duration, no_filters: bool) {
        let lab = &self.s1.lab;
        let started = Instant::now();
        loop {
            let tables = support::netprobe_tables(lab, lab.node());
            let filters = if no_filters {
                support::bpf_filters(lab, lab.node())
            } else {
                Vec::new()
            };
            if tables.is_empty() && filters.is_empty() {
                eprintln!("MEASURED: nothing left {:?} after", started.elapsed());
                return;
            }
            assert!(
                started.elapsed() < limit,
                "left after {limit:?}: {tables:?} {filters:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Deleting the object mid-trace stops the trace at once: every netprobe table the trace's
/// flows had in the node's nftables is gone within 1 s (while the agent runs on).
#[test]
fn deleting_a_trace_mid_trace_removes_every_netprobe_table_within_a_second() {
    let mut t = Tracing::start("todel");
    let tables_while = support::netprobe_tables(&t.s1.lab, t.s1.lab.node());
    eprintln!("tables while tracing: {tables_while:?}");
    t.stop_traffic();
    delete(&t.p, "financial-inference", "t");
    t.assert_nothing_left(Duration::from_secs(1), false);
    assert!(get(&t.p, "financial-inference", "t").is_none());
    support::stop(t.agent.take().unwrap());
    let _ = std::fs::remove_file(&t.kubeconfig);
}

/// SIGTERM to the agent mid-trace: the object is Failed saying so, and nothing of netprobe is
/// left in the node (no nft table, no tc filter).
#[test]
fn sigterm_mid_trace_marks_the_object_failed_and_leaves_nothing() {
    let mut t = Tracing::start("toterm");
    let out = support::stop(t.agent.take().unwrap());
    t.stop_traffic();
    let st = status(&get(&t.p, "financial-inference", "t").expect("the object stays"));
    assert_eq!(st.phase, TracePhase::Failed, "{st:#?}\n{}", out.stderr);
    assert!(
        st.message
            .as_deref()
            .is_some_and(|m| m.contains("stopped (SIGTERM) mid-trace")),
        "{st:#?}"
    );
    assert!(st.completion_time.is_some(), "{st:#?}");
    assert!(!st.verdicts.is_empty(), "what it had found stays: {st:#?}");
    t.assert_nothing_left(Duration::from_millis(100), true);
    let _ = std::fs::remove_file(&t.kubeconfig);
}

/// An agent killed mid-trace (SIGKILL: it could write nothing) and started again: the new one
/// marks the object Failed, "the netprobe agent restarted mid-trace".
#[test]
fn an_agent_restarted_mid_trace_marks_the_object_failed() {
    let mut t = Tracing::start("torst");
    t.stop_traffic();
    t.agent.take().unwrap().proc.kill9();
    t.agent = Some(start_agent(&t.s1.lab, &t.kubeconfig));
    let (st, took) = wait_for(
        &t.p,
        "financial-inference",
        "t",
        Duration::from_secs(5),
        |s| s.phase == TracePhase::Failed,
    );
    eprintln!("Failed {took:?} after the new agent started");
    assert_eq!(
        st.message.as_deref(),
        Some("the netprobe agent restarted mid-trace"),
        "{st:#?}"
    );
    support::stop(t.agent.take().unwrap());
    let _ = std::fs::remove_file(&t.kubeconfig);
}

/// `--max-traces 1`: a second Trace of the node stays Pending, its message saying why, and
/// starts once the first is Completed; a finished object is deleted by the agent
/// `ttlSecondsAfterFinished` after its completion.
#[test]
fn traces_beyond_the_nodes_bound_wait_and_finished_ones_expire() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("tomax").unwrap();
    let web = lab
        .add_pod("team-a", "web-0", "10.42.0.50".parse().unwrap())
        .unwrap();
    let (kube, kubeconfig) = kube_api(&lab);
    support::publish_pod(&kube, &web);
    let agent = support::start_agent(
        lab.node(),
        &["--max-traces", "1"],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", NODE),
        ],
        false,
    );
    let p = Person::new(&lab, &kubeconfig);
    let mut first = spec("web-0", 8080, "2s");
    first.ttl_seconds_after_finished = 1;
    create(&p, "team-a", "first", first);
    wait_for(&p, "team-a", "first", Duration::from_secs(5), |s| {
        s.phase == TracePhase::Running
    });
    create(&p, "team-a", "second", spec("web-0", 8081, "2s"));
    let (st, _) = wait_for(&p, "team-a", "second", Duration::from_secs(5), |s| {
        s.message.is_some()
    });
    assert_eq!(st.phase, TracePhase::Pending, "{st:#?}");
    assert!(
        st.message
            .as_deref()
            .is_some_and(|m| m.contains("at most 1 at once")),
        "{st:#?}"
    );
    let (st, _) = wait_for(&p, "team-a", "first", Duration::from_secs(5), |s| {
        s.phase == TracePhase::Completed
    });
    let completed = Instant::now();
    assert!(st.summary.is_some(), "{st:#?}");
    wait_for(&p, "team-a", "second", Duration::from_secs(5), |s| {
        s.phase == TracePhase::Running
    });
    // Deleted about 1 s after its completion.
    while get(&p, "team-a", "first").is_some() {
        assert!(
            completed.elapsed() < Duration::from_secs(5),
            "a finished Trace with ttlSecondsAfterFinished 1 still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "MEASURED: deleted {:?} after it was seen Completed",
        completed.elapsed()
    );
    support::stop(agent);
    let _ = std::fs::remove_file(kubeconfig);
}

/// The whole path, as a person runs it: `kubectl netprobe trace` (the CLI as nobody, talking to
/// the API server only) creates a Trace object, the agent of the node answers it in its own
/// session, the CLI prints the S1 verdict from the object's status (`-o json`, exit 1: a
/// failure diagnosed) and deletes the object.
#[test]
fn kubectl_netprobe_trace_gets_the_s1_verdict_from_the_agent_through_the_object() {
    let s1 = support::s1_lab("tocli");
    support::s1_rules(&s1.lab, &s1.server, &s1.client);
    let (kube, kubeconfig) = kube_api(&s1.lab);
    support::publish_pod(&kube, &s1.client);
    support::publish_pod(&kube, &s1.server);
    support::publish_seldon_scheduler(&kube);
    // The CLI runs as nobody.
    std::fs::set_permissions(
        &kubeconfig,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let agent = start_agent(&s1.lab, &kubeconfig);
    let cli = support::laptop(
        s1.lab.node(),
        kubeconfig.to_str().unwrap(),
        support::netprobe_bin(),
    )
    .args([
        "trace",
        "--cluster",
        "--pod",
        "seldon-scheduler-0",
        "-n",
        "financial-inference",
        "--port",
        "9004",
        "--duration",
        "20s",
        "--count",
        "1",
        "-o",
        "json",
    ])
    .spawn()
    .unwrap();
    let (stop, traffic) = keep_dialling(&s1.client.netns, &format!("{CLUSTER_IP}:9004"));
    let out = netprobe_lab::process::wait_output(cli, Duration::from_secs(40)).unwrap();
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    let records = support::ndjson(&out.stdout);
    let v = records
        .iter()
        .find(|r| r["kind"] == "verdict")
        .unwrap_or_else(|| panic!("no verdict: {}\n{}", out.stdout, out.stderr));
    assert_eq!(v["outcome"], "dropped_by_rule", "{v:#}");
    assert_eq!(v["netfilter"]["owner"]["system"], "calico", "{v:#}");
    assert_eq!(v["client"]["peer"]["pod"], "client-0", "{v:#}");
    assert_eq!(out.code(), 1, "a failure diagnosed: {}", out.stderr);
    assert!(
        kube.custom_objects("netprobe.io/traces").is_empty(),
        "the CLI deletes its object"
    );
    support::stop(agent);
    let _ = std::fs::remove_file(kubeconfig);
}
