//! Privileged tests of `netprobe agent`: always-on in a lab node, real drops, real HTTP.

use std::{
    io::Read,
    process::Command,
    time::{Duration, Instant},
};

mod support;

use netprobe_lab::{
    Connect, Lab,
    metrics::{self, sum as metric_sum},
    process::Agent,
};

fn start_agent(lab: &Lab, extra: &[&str]) -> Agent {
    support::start_agent(lab.node(), extra, &[], true)
}

/// Ids of the eBPF programs process `pid` holds open (its /proc/PID/fdinfo): the agent's own,
/// whatever else runs on the machine (it is shared: other users' programs are not this test's).
fn programs_of(pid: u32) -> std::collections::HashSet<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Default::default();
    };
    dir.flatten()
        .filter_map(|f| std::fs::read_to_string(f.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:")?.trim().parse().ok())
        })
        .collect()
}

/// Is any of the programs `ids` still loaded?
fn still_loaded(ids: &std::collections::HashSet<u32>) -> bool {
    let progs = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&progs.stdout)
        .lines()
        .filter_map(|l| l.split_once(": ")?.0.parse::<u32>().ok())
        .any(|id| ids.contains(&id))
}

/// The agent's `tc_ingress` programs (there must be some).
fn agent_programs(pid: u32) -> std::collections::HashSet<u32> {
    let ids = programs_of(pid);
    let progs = Command::new("bpftool")
        .args(["prog", "show", "name", "tc_ingress"])
        .output()
        .unwrap();
    let tc: Vec<u32> = String::from_utf8_lossy(&progs.stdout)
        .lines()
        .filter_map(|l| l.split_once(": sched_cls")?.0.parse().ok())
        .collect();
    let ours: std::collections::HashSet<u32> =
        tc.iter().filter(|id| ids.contains(id)).copied().collect();
    assert!(
        !ours.is_empty(),
        "the agent holds its tc program: {ids:?}, tc_ingress programs {tc:?}"
    );
    ours
}

/// A drop storm: the NDJSON stream stays within the budget, the rest is reported as
/// `suppressed` counts, and stream + suppressed = what /metrics counted (nothing lost silently).
#[test]
fn agent_storm_is_rate_limited_and_nothing_is_lost_silently() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("storm").unwrap();
    let a = lab
        .add_pod("default", "a-0", "10.42.0.61".parse().unwrap())
        .unwrap();
    let _server = lab
        .add_pod("default", "server-0", "10.42.0.62".parse().unwrap())
        .unwrap();
    lab.sh(
        lab.node(),
        "iptables -A FORWARD -p tcp --dport 9004 -j DROP",
    )
    .unwrap();
    // Raw events written too: the storm control of the log is what is tested.
    let agent = start_agent(&lab, &["--rate-limit", "5", "--raw-events"]);
    // ~2000 SYNs per second for 2 seconds.
    let _ = lab.sh(
        &a.netns,
        "timeout 2 hping3 -q -S -p 9004 -i u500 10.42.0.62 || true",
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (_, metrics) = support::get(&agent, "/metrics");
    let counted = metric_sum(
        &metrics,
        "netprobe_drops_total",
        &[("reason", "NETFILTER_DROP")],
    );
    let lost = metric_sum(&metrics, "netprobe_lost_events_total", &[]);
    let out = support::stop(agent);
    assert!(out.success());
    let lines = support::ndjson(&out.stdout);
    // Events and suppressed-counts alike match the published JSON Schemas.
    support::assert_schema_valid(&lines);
    let written = lines
        .iter()
        .filter(|e| e["kind"] == "drop" && e["drop"]["reason"] == "NETFILTER_DROP")
        .count() as u64;
    let suppressed: u64 = lines
        .iter()
        .filter(|e| {
            e["kind"] == "suppressed"
                && e["event_kind"] == "drop"
                && e["reason"] == "NETFILTER_DROP"
        })
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    assert!(
        counted > 1000,
        "a storm happened: {counted} drops\n{metrics}"
    );
    assert!(
        written <= 5 * 6,
        "at most 5 per second per key were written, got {written}"
    );
    assert_eq!(
        written + suppressed,
        counted,
        "every drop is written or counted as suppressed (lost: {lost})"
    );
}

/// SIGKILL leaves nothing behind (tcx links die with the process), a restarted agent works, and
/// SIGTERM after that leaves nothing either.
#[test]
fn agent_sigkill_restart_sigterm_leaves_no_tc_program() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("agentkill").unwrap();
    let _a = lab
        .add_pod("default", "a-0", "10.42.0.71".parse().unwrap())
        .unwrap();
    let first = start_agent(&lab, &[]);
    let progs = agent_programs(first.id());
    first.proc.kill9();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!still_loaded(&progs), "a killed agent leaves no tc program");
    // What a remote trace killed with its agent leaves: its trace table (pid beyond pid_max,
    // so surely dead). The next agent removes it at start.
    lab.sh(
        lab.node(),
        "nft add table inet netprobe_4999999; nft add table inet keep_me",
    )
    .unwrap();
    let second = start_agent(&lab, &[]);
    let tables = lab.sh(lab.node(), "nft list tables").unwrap();
    assert!(
        !tables.contains("netprobe_4999999") && tables.contains("keep_me"),
        "stale trace tables removed at start, nothing else: {tables}"
    );
    lab.sh(lab.node(), "nft delete table inet keep_me").unwrap();
    assert_eq!(support::get(&second, "/readyz").0, 200);
    let progs = agent_programs(second.id());
    assert!(support::stop(second).success());
    assert!(
        !still_loaded(&progs),
        "a stopped agent leaves no tc program"
    );
    let tables = lab.sh(lab.node(), "nft list tables").unwrap();
    assert!(
        !tables.contains("netprobe"),
        "the agent installs no rule: {tables}"
    );
}

#[test]
fn agent_exports_drops_as_ndjson_and_metrics_attaches_new_veths_and_cleans_up() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("agent").unwrap();
    let _a = lab
        .add_pod("default", "a-0", "10.42.0.51".parse().unwrap())
        .unwrap();
    let server = lab
        .add_pod("default", "server-0", "10.42.0.52".parse().unwrap())
        .unwrap();
    netprobe_lab::serve(
        lab.listen(&server.netns, "10.42.0.52:9004".parse().unwrap())
            .unwrap(),
    );
    lab.sh(
        lab.node(),
        "iptables -A FORWARD -p tcp --dport 9004 -j DROP",
    )
    .unwrap();
    // Raw events too (by default the log has verdicts only; agent_verdicts.rs tests those).
    let agent = start_agent(&lab, &["--raw-events"]);
    assert_eq!(support::get(&agent, "/readyz").0, 200);
    assert_eq!(support::get(&agent, "/healthz").0, 200);
    let progs = agent_programs(agent.id());

    // A pod that appears after the agent started: its veth and namespace join within 200 ms.
    let late = lab
        .add_pod("default", "late-0", "10.42.0.53".parse().unwrap())
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        lab.connect(
            &late.netns,
            "10.42.0.52:9004".parse().unwrap(),
            Duration::from_millis(2500)
        ),
        Connect::TimedOut
    );
    std::thread::sleep(Duration::from_millis(300));
    let (_, metrics) = support::get(&agent, "/metrics");
    let counted = metric_sum(
        &metrics,
        "netprobe_drops_total",
        &[("reason", "NETFILTER_DROP")],
    );
    let attached = metric_sum(&metrics, "netprobe_attached_interfaces", &[]);
    let retrans = metric_sum(&metrics, "netprobe_syn_retransmits_total", &[]);

    // SIGTERM: drain, detach, exit promptly.
    let t = Instant::now();
    let out = support::stop(agent);
    assert!(t.elapsed() < Duration::from_secs(5), "exit within 5 s");
    assert!(out.success(), "{}", out.stderr);
    let lines = support::ndjson(&out.stdout);
    // Every line matches the published JSON Schema (`netprobe schema`).
    support::assert_schema_valid(&lines);
    let drops: Vec<_> = lines
        .iter()
        .filter(|e| e["kind"] == "drop" && e["drop"]["reason"] == "NETFILTER_DROP")
        .collect();
    assert!(drops.len() >= 2, "first SYN and a retransmit: {lines:#?}");
    assert_eq!(
        counted,
        drops.len() as u64,
        "/metrics agrees with the NDJSON stream:\n{metrics}"
    );
    assert!(
        drops
            .iter()
            .all(|d| d["schema"] == "netprobe.event/v1" && d["src"] == "10.42.0.53")
    );
    assert!(
        drops
            .iter()
            .all(|d| d["interface"]["name"] == late.host_if.as_str()),
        "{drops:#?}"
    );
    assert!(retrans >= 1, "{metrics}");
    // npgw0, npgw1 and three cali veths (the late one included).
    assert_eq!(attached, 5, "{metrics}");
    // Nothing left behind: no netprobe tc program is loaded any more.
    assert!(!still_loaded(&progs), "tc programs left behind");
}

/// A failed connection becomes a Kubernetes Event on the server pod and on the client pod
/// (through the real kube-rs client, against the API stand-in), once per pod, reason, peer and
/// port however many attempts fail within the minute. Raw drops make no Event of their own: the
/// attempt's verdict explains them (issue #14: formerly one `PacketDropped` per drop on the
/// destination pod, which said neither the rule nor the client).
#[test]
fn agent_publishes_a_rate_limited_kubernetes_event_on_the_affected_pod() {
    use netprobe_lab::kubeapi::{FakeKube, Kind, pod};
    netprobe_lab::require_root();
    let mut lab = Lab::new("agentev").unwrap();
    let a = lab
        .add_pod("default", "a-0", "10.42.0.81".parse().unwrap())
        .unwrap();
    let server = lab
        .add_pod("default", "server-0", "10.42.0.82".parse().unwrap())
        .unwrap();
    netprobe_lab::serve(
        lab.listen(&server.netns, "10.42.0.82:9004".parse().unwrap())
            .unwrap(),
    );
    lab.sh(
        lab.node(),
        "iptables -A FORWARD -p tcp --dport 9004 -j DROP",
    )
    .unwrap();
    let kube = FakeKube::start(
        lab.listen(lab.node(), "127.0.0.1:0".parse().unwrap())
            .unwrap(),
    );
    let kubeconfig =
        std::env::temp_dir().join(format!("netprobe-agent-kubeconfig-{}", std::process::id()));
    std::fs::write(&kubeconfig, kube.kubeconfig()).unwrap();
    kube.apply(
        Kind::Pod,
        pod(
            "default",
            "a-0",
            "lab-node",
            "10.42.0.81",
            &[("c", "a1a1a1a1a1a1a1a1", &[])],
        ),
    );
    kube.apply(
        Kind::Pod,
        pod(
            "default",
            "server-0",
            "lab-node",
            "10.42.0.82",
            &[("s", "d1d1d1d1d1d1d1d1", &[9004])],
        ),
    );
    let agent = support::start_agent(
        lab.node(),
        &[],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", "lab-node"),
        ],
        false,
    );
    for _ in 0..2 {
        assert_eq!(
            lab.connect(
                &a.netns,
                "10.42.0.82:9004".parse().unwrap(),
                Duration::from_millis(2500)
            ),
            Connect::TimedOut
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let _ = agent.stop();
    let posted = kube.posted();
    assert!(
        !posted.iter().any(|e| e["reason"] == "PacketDropped"),
        "raw drops are explained by the attempt's Event: {posted:#?}"
    );
    let events: Vec<&serde_json::Value> = posted
        .iter()
        .filter(|e| e["reason"] == "ConnectionDropped")
        .collect();
    let on = |pod: &str| -> Vec<&serde_json::Value> {
        events
            .iter()
            .copied()
            .filter(|e| e["regarding"]["name"] == pod)
            .collect()
    };
    let (on_server, on_client) = (on("server-0"), on("a-0"));
    assert_eq!(
        (on_server.len(), on_client.len(), events.len()),
        (1, 1, 2),
        "one Event per pod for two failed attempts: {posted:#?}"
    );
    for (e, other) in [(on_server[0], "a-0"), (on_client[0], "server-0")] {
        assert_eq!(e["regarding"]["kind"], "Pod");
        assert_eq!(e["type"], "Warning");
        assert_eq!(e["related"]["name"], other, "{e:#}");
        let note = e["note"].as_str().unwrap();
        assert!(
            note.contains("a-0 → server-0:9004") && note.contains("(FORWARD rule 1)"),
            "the rule and both sides: {e:#}"
        );
    }
    let _ = std::fs::remove_file(kubeconfig);
}

/// Healthy traffic costs the always-on agent no event at all: handshakes, state changes and the
/// routine drops of socket teardown (QUEUE_PURGE: a closing socket discarding a queued FIN;
/// NOT_SPECIFIED: a TIME_WAIT socket consuming the peer's late FIN, which happens when the FIN
/// arrives after the server's orphaned socket became a FIN_WAIT2 timewait socket) are not emitted
/// by the kernel; the teardown drops are still counted in the kernel.
#[test]
fn healthy_connections_cost_the_agent_no_event() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("agentquiet").unwrap();
    let a = lab
        .add_pod("default", "a-0", "10.42.0.61".parse().unwrap())
        .unwrap();
    let b = lab
        .add_pod("default", "b-0", "10.42.0.62".parse().unwrap())
        .unwrap();
    // The server closes first; the client reads the FIN and closes with it still queued.
    netprobe_lab::serve(
        lab.listen(&b.netns, "10.42.0.62:7000".parse().unwrap())
            .unwrap(),
    );
    let agent = start_agent(&lab, &["--program-stats"]);
    let n = 200;
    const LATE: usize = 20;
    netprobe_lab::in_netns(&a.netns, || {
        for _ in 0..n {
            let mut s = std::net::TcpStream::connect("10.42.0.62:7000").unwrap();
            let mut buf = [0u8; 8];
            let _ = s.read(&mut buf);
        }
        // Closing late: the ACK of the server's FIN goes out alone, the server's orphaned socket
        // becomes a FIN_WAIT2 timewait socket, and that one consumes our FIN (NOT_SPECIFIED).
        for _ in 0..LATE {
            let mut s = std::net::TcpStream::connect("10.42.0.62:7000").unwrap();
            let mut buf = [0u8; 8];
            let _ = s.read(&mut buf);
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let (_, m) = support::get(&agent, "/metrics");
    // The lab's own background (IPv6 neighbour discovery on new links) may add a drop or two;
    // 200 connections must add nothing.
    assert!(metric_sum(&m, "netprobe_events_total", &[]) < 10, "{m}");
    assert!(
        metric_sum(
            &m,
            "netprobe_kernel_drops_total",
            &[("reason", "QUEUE_PURGE")]
        ) >= n / 2,
        "teardown drops are counted, not emitted:\n{m}"
    );
    assert!(
        metric_sum(
            &m,
            "netprobe_kernel_drops_total",
            &[("reason", "NOT_SPECIFIED")]
        ) >= LATE as u64 / 2,
        "late FINs consumed by timewait sockets are counted, not emitted:\n{m}"
    );
    // What they cost instead: each handshake and teardown passes the tc programs (the program
    // statistics are refreshed every second).
    let deadline = Instant::now() + Duration::from_secs(5);
    let (runs, seconds) = loop {
        let (_, m) = support::get(&agent, "/metrics");
        let label = &[("program", "tc_ingress")];
        let runs = metric_sum(&m, "netprobe_program_runs_total", label);
        let seconds = metrics::sum_f64(&m, "netprobe_program_run_seconds_total", label);
        if runs >= 3 * n || Instant::now() > deadline {
            break (runs, seconds);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        runs >= 3 * n,
        "tc_ingress ran {runs} times for {n} connections"
    );
    // The state-change tracepoint (ten runs per connection) feeds only traces: not loaded here.
    let (_, m) = support::get(&agent, "/metrics");
    assert!(
        m.contains("netprobe_program_runs_total{program=\"kfree_skb\"}")
            && !m.contains("program=\"inet_sock_set_state\""),
        "{m}"
    );
    let ns_per_run = seconds * 1e9 / runs as f64;
    assert!(
        ns_per_run > 0.0 && ns_per_run < 20_000.0,
        "tc_ingress: {ns_per_run} ns per run"
    );
    // The attempts are counted all the same, from the namespaces' TCP MIB (read every 5 s).
    let made = n + LATE as u64;
    let deadline = Instant::now() + Duration::from_secs(7);
    let attempts = loop {
        let (_, m) = support::get(&agent, "/metrics");
        let attempts = metric_sum(&m, "netprobe_connection_attempts_total", &[]);
        if attempts >= made || Instant::now() > deadline {
            break attempts;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        attempts >= made,
        "{attempts} attempts counted for {made} connections"
    );
    let out = support::stop(agent);
    assert!(out.success());
    let stdout = out.stdout;
    assert!(
        !stdout
            .lines()
            .any(|l| l.contains("\"dport\":7000") || l.contains("\"sport\":7000")),
        "{stdout}"
    );
}

/// The kernel side wakes the agent at most once a millisecond during a burst; the records of a
/// burst that came without a wakeup are read shortly after (no further traffic, agent running).
#[test]
fn a_burst_is_delivered_whole_without_later_traffic() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("agentburst").unwrap();
    let a = lab
        .add_pod("default", "a-0", "10.42.0.71".parse().unwrap())
        .unwrap();
    let _b = lab
        .add_pod("default", "b-0", "10.42.0.72".parse().unwrap())
        .unwrap();
    lab.sh(
        lab.node(),
        "iptables -A FORWARD -p tcp --dport 9004 -j DROP",
    )
    .unwrap();
    let agent = start_agent(&lab, &[]);
    let counts = || {
        let (_, m) = support::get(&agent, "/metrics");
        (
            metric_sum(
                &m,
                "netprobe_kernel_drops_total",
                &[("reason", "NETFILTER_DROP")],
            ),
            metric_sum(&m, "netprobe_drops_total", &[("reason", "NETFILTER_DROP")]),
        )
    };
    const BURSTS: u64 = 3;
    const SYNS: u64 = 8;
    for burst in 1..=BURSTS {
        // 8 SYNs 200 µs apart: the first wakes the agent, the rest fall in the same millisecond
        // or two, after the agent has read the first.
        lab.sh(
            &a.netns,
            &format!("hping3 -q -S -p 9004 -c {SYNS} -i u200 10.42.0.72 >/dev/null 2>&1 || true"),
        )
        .unwrap();
        let want = burst * SYNS;
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut seen = counts();
        while seen != (want, want) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            seen = counts();
        }
        assert_eq!(
            seen,
            (want, want),
            "(counted in the kernel, delivered) after burst {burst}"
        );
    }
}

/// The failed-attempt verdicts (port `port`) in the agent's NDJSON stream.
fn failed_verdicts(stdout: &str, port: u16) -> Vec<serde_json::Value> {
    support::ndjson(stdout)
        .into_iter()
        .filter(|v| v["kind"] == "verdict" && v["server"]["port"] == port)
        .collect()
}

/// The kinds the inventory lists, each with its `netprobe_inventory_synced` series.
const KINDS: [&str; 3] = ["pods", "services", "endpointslices"];

/// The agent starts while the API server is down (issue #15 point 3): it is ready at once and
/// judges failures without names, `/readyz` says the inventory is not synced (200: the agent
/// works, see deploy/SECURITY.md); the inventory retries in the background, and once the API
/// is back `/readyz` says synced (and `netprobe_inventory_synced{kind}` goes from 0 to 1) and a new failure names both pods, without a restart.
#[test]
fn agent_started_with_the_api_down_names_failures_once_the_api_is_back() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("apilate").unwrap();
    let (a, kube, kubeconfig) = support::published_pod(&mut lab, "a-0", "10.42.0.71");
    let server = lab
        .add_pod("default", "server-0", "10.42.0.72".parse().unwrap())
        .unwrap();
    support::publish_pod(&kube, &server);
    lab.sh(
        lab.node(),
        "iptables -A FORWARD -p tcp --dport 9006 -j DROP",
    )
    .unwrap();
    kube.set_down(true);
    let started = Instant::now();
    let agent = support::start_agent(
        lab.node(),
        &[],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", "lab-node"),
        ],
        true,
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "ready without the API server: {:?}",
        started.elapsed()
    );
    let (code, body) = support::get(&agent, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("inventory not synced") && body.contains("pods"),
        "{body}"
    );
    let synced = |agent: &Agent, kind: &str| {
        let m = support::get(agent, "/metrics").1;
        let line = format!("netprobe_inventory_synced{{kind=\"{kind}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(&line).map(str::to_string))
            .unwrap_or_else(|| panic!("no {line}in /metrics:\n{m}"))
    };
    for kind in KINDS {
        assert_eq!(synced(&agent, kind), "0", "{kind} while the API is down");
    }
    let server: std::net::SocketAddr = "10.42.0.72:9006".parse().unwrap();
    assert_eq!(
        lab.connect(&a.netns, server, Duration::from_millis(2500)),
        Connect::TimedOut
    );
    kube.set_down(false);
    let back = Instant::now();
    let body = loop {
        let (code, body) = support::get(&agent, "/readyz");
        assert_eq!(code, 200, "{body}");
        if !body.contains("not synced") {
            break body;
        }
        assert!(
            back.elapsed() < Duration::from_secs(60),
            "inventory still not synced 60 s after the API came back: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(body.starts_with("ready"), "{body}");
    for kind in KINDS {
        assert_eq!(synced(&agent, kind), "1", "{kind} once the API is back");
    }
    // The agent's housekeeping rebuilds the inventory from the stores once a second.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        lab.connect(&a.netns, server, Duration::from_millis(2500)),
        Connect::TimedOut
    );
    std::thread::sleep(Duration::from_millis(500));
    let out = support::stop(agent);
    let verdicts = failed_verdicts(&out.stdout, 9006);
    assert_eq!(verdicts.len(), 2, "one per attempt:\n{}", out.stdout);
    assert!(
        verdicts[0]["client"]["peer"]["pod"].is_null(),
        "no names while the API is down: {:#}",
        verdicts[0]
    );
    assert_eq!(
        verdicts[1]["client"]["peer"]["pod"], "a-0",
        "{:#}",
        verdicts[1]
    );
    assert_eq!(
        verdicts[1]["server"]["peer"]["pod"], "server-0",
        "{:#}",
        verdicts[1]
    );
    let _ = std::fs::remove_file(kubeconfig);
}
