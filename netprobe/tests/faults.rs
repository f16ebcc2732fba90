//! Privileged fault tests: what netprobe does when the machine misbehaves — a probe the kernel
//! refuses, a ring buffer too small for a storm, no BTF, a traced namespace deleted mid-trace,
//! an agent killed while it runs a remote trace. Each must end in a clear message, counted losses
//! and an unchanged ruleset, never a silent gap.

mod support;

use std::{
    io::Write,
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use netprobe_lab::{
    Lab, in_netns,
    kubeapi::{ADMIN_TOKEN, FakeKube, Kind, pod},
    metrics::sum as metric_sum,
    process::{Agent, Spawn},
};

fn stop(agent: Agent) -> (String, String) {
    let out = support::stop(agent);
    assert!(out.success(), "agent exit {}", out.status);
    (out.stdout, out.stderr)
}

/// The kernel refuses one probe (its verifier rejects `kfree_skb` loaded against a tracepoint
/// with one argument): the agent runs without it, says which and why on stderr, in /readyz and
/// in /metrics, and still reports what the other probes see.
#[test]
fn agent_runs_degraded_when_the_kernel_refuses_one_probe() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("degraded").unwrap();
    let p = lab
        .add_pod("financial-ml", "mlserver-0", "10.42.0.10".parse().unwrap())
        .unwrap();
    // Raw events too: which probes still report is what is tested.
    let agent = support::start_agent(
        lab.node(),
        &["--raw-events"],
        &[("NETPROBE_FAULT_PROBE", "kfree_skb")],
        true,
    );
    let (code, body) = support::get(&agent, "/readyz");
    assert_eq!(code, 200, "degraded is still useful: {body}");
    assert!(
        body.contains("degraded") && body.contains("probe kfree_skb refused by the kernel"),
        "{body}"
    );
    let (_, m) = support::get(&agent, "/metrics");
    assert_eq!(
        metric_sum(&m, "netprobe_probe_up", &[("probe", "kfree_skb")]),
        0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "netprobe_probe_up", &[("probe", "tcp_send_reset")]),
        1,
        "{m}"
    );
    // S2 in the pod: the reset is still seen (the NO_SOCKET drop is not: kfree_skb is off).
    let refused = in_netns(&p.netns, || {
        TcpStream::connect_timeout(&"127.0.0.1:9500".parse().unwrap(), Duration::from_secs(2))
    })
    .unwrap();
    assert!(refused.is_err());
    std::thread::sleep(Duration::from_millis(500));
    let (stdout, stderr) = stop(agent);
    assert!(
        stderr.contains("DEGRADED: probe kfree_skb refused"),
        "{stderr}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("\"kind\":\"send_reset\"")),
        "the other probes still report: {stdout}"
    );
    assert!(
        !stdout.lines().any(|l| l.contains("\"kind\":\"drop\"")),
        "{stdout}"
    );
    // The reset alone still explains the refusal.
    assert!(
        stdout.lines().any(|l| l.contains("\"kind\":\"verdict\"")
            && l.contains("\"outcome\":\"refused_no_listener\"")),
        "{stdout}"
    );
}

/// A ring buffer far too small for a burst of drops: every drop is still counted in the kernel,
/// what could not be queued is counted as lost, and delivered + lost adds up to what happened.
#[test]
fn ring_buffer_overflow_is_counted_in_metrics_and_trace_output() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("overflow").unwrap();
    let a = lab
        .add_pod("default", "a-0", "10.42.0.91".parse().unwrap())
        .unwrap();
    let _b = lab
        .add_pod("default", "b-0", "10.42.0.92".parse().unwrap())
        .unwrap();
    lab.sh(
        lab.node(),
        "iptables -N NP_FLOOD; iptables -A NP_FLOOD -j DROP; iptables -A FORWARD -p tcp --dport 9999 -j NP_FLOOD",
    )
    .unwrap();
    // 4 KiB: room for a few dozen events. Outputs go to files: 20000 events and verdicts must
    // not block on a pipe nobody reads.
    let agent = support::start_agent(
        lab.node(),
        &["--ring-buffer-kib", "4", "--rate-limit", "1000000"],
        &[],
        false,
    );
    let dir = std::env::temp_dir().join(format!("netprobe-overflow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = Spawn::trace(support::netprobe_bin(), lab.node())
        .args([
            "--port",
            "9999",
            "--duration",
            "8s",
            "--ring-buffer-kib",
            "4",
        ])
        .args(["--no-rule-trace", "-o", "json"])
        .stdout(std::fs::File::create(dir.join("out")).unwrap())
        .stderr(std::fs::File::create(dir.join("err")).unwrap())
        .start()
        .unwrap_or_else(|e| panic!("{e:#}"));
    lab.sh(
        &a.netns,
        "hping3 -q -S -p 9999 -i u20 -c 20000 10.42.0.92 >/dev/null 2>&1 || true",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let generated: u64 = lab
        .sh(lab.node(), "iptables -L NP_FLOOD -v -x -n")
        .unwrap()
        .lines()
        .find(|l| l.contains("DROP"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(generated >= 19000, "hping3 sent {generated}");
    let (_, m) = support::get(&agent, "/metrics");
    let nf = &[("reason", "NETFILTER_DROP")];
    let counted = metric_sum(&m, "netprobe_kernel_drops_total", nf);
    let delivered = metric_sum(&m, "netprobe_drops_total", nf);
    let lost = metric_sum(&m, "netprobe_lost_events_total", &[]);
    assert_eq!(counted, generated, "every drop counted in the kernel:\n{m}");
    assert!(lost > 0, "a 4 KiB ring must overflow:\n{m}");
    // The lost count covers events of every kind: the lab's own background drops (IPv6
    // neighbour discovery on new links) may be among them.
    let background = metric_sum(&m, "netprobe_kernel_drops_total", &[]) - counted;
    assert!(
        (generated..=generated + background).contains(&(delivered + lost)),
        "nothing lost silently ({background} background drops):\n{m}"
    );
    let (_, _) = stop(agent);
    let st = trace.wait_output(Duration::from_secs(60)).unwrap().status;
    let out = std::fs::read_to_string(dir.join("out")).unwrap();
    let err = std::fs::read_to_string(dir.join("err")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(st.code(), Some(1), "drops diagnosed: {err}");
    let summary: serde_json::Value = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["kind"] == "summary")
        .unwrap_or_else(|| panic!("no summary: {err}"));
    assert!(summary["lost"].as_u64().unwrap() > 0, "{summary:#}");
    assert!(err.contains("events lost (ring buffer full)"), "{err}");
}

/// No BTF: a clear error naming the file and the kernel option, exit 2 (agent and trace).
#[test]
fn missing_btf_is_a_clear_error() {
    netprobe_lab::require_root();
    let lab = Lab::new("nobtf").unwrap();
    for args in [
        vec!["trace", "--port", "1", "--duration", "1s"],
        vec!["agent", "--metrics-addr", "127.0.0.1:0"],
    ] {
        let out = Command::new("ip")
            .args(["netns", "exec", lab.node(), env!("CARGO_BIN_EXE_netprobe")])
            .args(&args)
            .env("NETPROBE_BTF", "/nonexistent/vmlinux")
            .stdout(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("cannot read kernel BTF from /nonexistent/vmlinux")
                && err.contains("CONFIG_DEBUG_INFO_BTF"),
            "{args:?}: {err}"
        );
    }
}

/// The traced namespace is deleted mid-trace: a clear message, exit 2, the ruleset of the node
/// unchanged and no trace table left.
#[test]
fn traced_namespace_deleted_mid_trace_is_a_clear_error() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("nsgone").unwrap();
    let p = lab
        .add_pod("default", "gone-0", "10.42.0.95".parse().unwrap())
        .unwrap();
    let before = lab.sh(lab.node(), "nft -s list ruleset").unwrap();
    let trace = support::start_verdict_trace_env(
        lab.node(),
        &["--netns", &p.netns, "--port", "9500", "--duration", "20s"],
        &[],
    );
    let t = Instant::now();
    Command::new("ip")
        .args(["netns", "del", &p.netns])
        .status()
        .unwrap();
    let stderr = trace.finish_error(2);
    assert!(t.elapsed() < Duration::from_secs(10), "noticed promptly");
    assert!(
        stderr.contains(&format!("network namespace `{}`", p.netns))
            && stderr.contains("was deleted during the trace"),
        "{stderr}"
    );
    let after = lab.sh(lab.node(), "nft -s list ruleset").unwrap();
    assert_eq!(before, after, "ruleset unchanged");
    let _ = lab.remove_pod(&p);
}

/// The agent is SIGKILLed while it runs a remote trace: the trace does not run on as an orphan
/// (it gets SIGINT through PR_SET_PDEATHSIG) and removes its nftables table.
#[test]
fn agent_sigkill_mid_remote_trace_leaves_no_orphan_and_no_table() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("killmid").unwrap();
    let _p = lab
        .add_pod("financial-ml", "mlserver-0", "10.42.0.10".parse().unwrap())
        .unwrap();
    let kube = FakeKube::start(
        lab.listen(lab.node(), "127.0.0.1:0".parse().unwrap())
            .unwrap(),
    );
    kube.apply(
        Kind::Pod,
        pod(
            "financial-ml",
            "mlserver-0",
            "lab-node",
            "10.42.0.10",
            &[("mlserver", "3a3a3a3a3a3a3a3a", &[9500])],
        ),
    );
    let kubeconfig =
        std::env::temp_dir().join(format!("netprobe-faults-kubeconfig-{}", std::process::id()));
    std::fs::write(&kubeconfig, kube.kubeconfig()).unwrap();
    let mut agent = support::start_agent(
        lab.node(),
        &[],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", "lab-node"),
        ],
        false,
    );
    // A remote trace, as the port-forward would ask for it (with the lab admin's token).
    let node = lab.node().to_string();
    let port = agent.port;
    let mut sock = in_netns(&node, || TcpStream::connect(("127.0.0.1", port)))
        .unwrap()
        .unwrap();
    write!(
        sock,
        "GET /v1/trace?port=9500&pod=financial-ml/mlserver-0&duration_ms=600000 HTTP/1.1\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
    )
    .unwrap();
    // Wait until the trace runs: its table is in place.
    let start = Instant::now();
    let child: u32 = loop {
        let tables = lab.sh(lab.node(), "nft list tables").unwrap();
        if let Some(pid) = tables
            .lines()
            .find_map(|l| l.trim().strip_prefix("table inet netprobe_"))
        {
            break pid.parse().unwrap();
        }
        assert!(
            agent.proc.is_running() && start.elapsed() < Duration::from_secs(30),
            "the remote trace never installed its table"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    agent.proc.kill9();
    let start = Instant::now();
    while std::path::Path::new(&format!("/proc/{child}")).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "trace {child} still runs 10 s after its agent was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(sock);
    let _ = std::fs::remove_file(kubeconfig);
    let tables = lab.sh(lab.node(), "nft list tables").unwrap();
    assert!(!tables.contains("netprobe"), "{tables}");
}

/// The API server is down for 30 s and a pod's veth is deleted while attached: the agent keeps
/// running (healthy and ready), drops the vanished interface, and still reports drops after.
#[test]
fn agent_survives_a_30s_api_outage_and_a_vanishing_veth() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("apidown").unwrap();
    let a = lab
        .add_pod("default", "a-0", "10.42.0.97".parse().unwrap())
        .unwrap();
    let b = lab
        .add_pod("default", "b-0", "10.42.0.98".parse().unwrap())
        .unwrap();
    let kube = FakeKube::start(
        lab.listen(lab.node(), "127.0.0.1:0".parse().unwrap())
            .unwrap(),
    );
    for p in [&a, &b] {
        kube.apply(
            Kind::Pod,
            pod(
                &p.namespace,
                &p.name,
                "lab-node",
                &p.ip.to_string(),
                &[("c", "c0c0c0c0c0c0c0c0", &[])],
            ),
        );
    }
    let kubeconfig = std::env::temp_dir().join(format!(
        "netprobe-apidown-kubeconfig-{}",
        std::process::id()
    ));
    std::fs::write(&kubeconfig, kube.kubeconfig()).unwrap();
    lab.sh(
        lab.node(),
        "iptables -A FORWARD -p tcp --dport 9009 -j DROP",
    )
    .unwrap();
    let agent = support::start_agent(
        lab.node(),
        &[],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", "lab-node"),
        ],
        true,
    );
    let attached = |m: &str| metric_sum(m, "netprobe_attached_interfaces", &[]);
    let before = attached(&support::get(&agent, "/metrics").1);
    kube.set_down(true);
    lab.remove_pod(&b).unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_secs(5));
        assert_eq!(support::get(&agent, "/healthz").0, 200);
        assert_eq!(support::get(&agent, "/readyz").0, 200);
    }
    let m = support::get(&agent, "/metrics").1;
    assert_eq!(
        attached(&m),
        before - 1,
        "the deleted veth is dropped:\n{m}"
    );
    kube.set_down(false);
    let _ = lab.connect(
        &a.netns,
        "10.42.0.99:9009".parse().unwrap(),
        Duration::from_millis(1500),
    );
    std::thread::sleep(Duration::from_millis(500));
    let (stdout, _) = stop(agent);
    assert!(
        stdout.lines().any(|l| l.contains("\"kind\":\"verdict\"")
            && l.contains("NETFILTER_DROP")
            && l.contains("\"port\":9009")),
        "drops are still explained after the outage:\n{stdout}"
    );
    let _ = std::fs::remove_file(kubeconfig);
}

/// Pre-6.6 kernels attach with clsact filters, which outlive a SIGKILLed process (forced here
/// with NETPROBE_TC_MODE=clsact). The next start removes the orphans — programs no live process
/// holds — and leaves the filters of a netprobe that still runs.
#[test]
fn clsact_filters_of_a_killed_netprobe_are_removed_at_next_start_and_live_ones_kept() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("clsact").unwrap();
    let p = lab
        .add_pod("default", "c-0", "10.42.0.97".parse().unwrap())
        .unwrap();
    let ours = |lab: &Lab| {
        lab.sh(
            lab.node(),
            &format!("tc filter show dev {} ingress", p.host_if),
        )
        .unwrap()
        .lines()
        .filter(|l| l.contains("name tc_ingress"))
        .count()
    };
    let clsact = [("NETPROBE_TC_MODE", "clsact")];
    let args = ["--port", "9500", "--duration", "60s"];
    let live = support::start_verdict_trace_env(lab.node(), &args, &clsact);
    assert_eq!(ours(&lab), 1, "clsact mode attached a filter");
    let killed = support::start_verdict_trace_env(lab.node(), &args, &clsact);
    assert_eq!(ours(&lab), 2);
    killed.kill9();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ours(&lab), 2, "a SIGKILLed clsact trace leaves its filter");

    // The next netprobe (tcx, as on this kernel) removes only the orphan.
    let next =
        support::start_verdict_trace_env(lab.node(), &["--port", "9500", "--duration", "1s"], &[]);
    assert_eq!(
        ours(&lab),
        1,
        "the orphan is gone, the live trace's filter stays"
    );
    let out = next.finish_with_code(3);
    assert!(
        out.stderr
            .contains("tc filter(s) a killed netprobe left on"),
        "{}",
        out.stderr
    );
    // The live trace still works, and removes its own filters at its end.
    live.interrupt();
    let _ = live.finish_with_code(3);
    assert_eq!(ours(&lab), 0);
}

/// A program that is not netprobe's but carries the name of its ingress program: `tc_ingress`,
/// returning TC_ACT_UNSPEC, with no map (assembled with llvm-mc into `dir`).
fn foreign_tc_ingress_object(dir: &std::path::Path) -> std::path::PathBuf {
    support::assemble_bpf(
        dir,
        "foreign",
        "\t.section \"classifier\",\"ax\"\n\t.globl tc_ingress\n\t.type tc_ingress,@function\n\
         tc_ingress:\n\tr0 = -1\n\texit\n\t.size tc_ingress, .-tc_ingress\n\
         \t.section \"license\",\"aw\"\n_license:\n\t.asciz \"GPL\"\n",
    )
}

/// A SIGKILLed `trace --pod` in clsact mode (pre-6.6 kernels) leaves its tc filters and its
/// `netprobe_<pid>` table in the pod's namespace as well as the node's. The agent's start
/// removes both in both namespaces; a foreign clsact filter whose program is also named
/// `tc_ingress` (not netprobe's: none of netprobe's maps) and held by no process stays.
#[test]
fn agent_start_cleans_a_killed_pod_trace_in_the_pod_namespace_and_keeps_foreign_filters() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("podleft").unwrap();
    let (p, _kube, kubeconfig) = support::published_pod(&mut lab, "left-0", "10.42.0.93");
    let env = [
        ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ("NETPROBE_TC_MODE", "clsact"),
    ];
    let args = ["--pod", "left-0", "-n", "default", "--port", "9500"];
    let trace = support::start_verdict_trace_env(
        lab.node(),
        &[&args[..], &["--node-name", "lab-node", "--duration", "60s"]].concat(),
        &env,
    );
    trace.kill9();
    std::thread::sleep(Duration::from_millis(300));
    let pod_filters = support::bpf_filters(&lab, &p.netns);
    assert!(
        !support::netprobe_tables(&lab, &p.netns).is_empty(),
        "the killed trace left its table in the pod"
    );
    assert!(
        pod_filters.iter().any(|f| f.contains("name tc_ingress"))
            && pod_filters.iter().any(|f| f.contains("name tc_egress")),
        "the killed trace left its filters in the pod: {pod_filters:?}"
    );
    let dir = std::env::temp_dir().join(format!("netprobe-foreign-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let obj = foreign_tc_ingress_object(&dir);
    lab.sh(
        &p.netns,
        &format!(
            "tc filter add dev eth0 ingress pref 7 bpf da obj {} sec classifier",
            obj.display()
        ),
    )
    .unwrap();
    let foreign: Vec<String> = support::bpf_filters(&lab, &p.netns)
        .into_iter()
        .filter(|f| f.contains("foreign.o"))
        .collect();
    assert!(
        foreign.len() == 1 && foreign[0].contains("name tc_ingress"),
        "{foreign:?}"
    );

    let agent = support::start_agent(lab.node(), &[], &[], false);
    for ns in [p.netns.as_str(), lab.node()] {
        let left = support::netprobe_tables(&lab, ns);
        assert!(left.is_empty(), "tables left in {ns}: {left:?}");
    }
    assert_eq!(
        support::bpf_filters(&lab, &p.netns),
        foreign,
        "only the foreign filter is left in the pod"
    );
    assert!(
        support::bpf_filters(&lab, lab.node()).is_empty(),
        "node: {:?}",
        support::bpf_filters(&lab, lab.node())
    );
    let (_, stderr) = stop(agent);
    assert!(
        stderr.contains("tc filter(s) a killed netprobe left on"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(kubeconfig);
}

/// `trace --pod` whose pod's network namespace is deleted mid-trace (the pod is deleted): the
/// message says so and the exit code is 2, as for `--netns` (it used to be 0 with `--pod`).
#[test]
fn pod_trace_whose_pod_namespace_vanishes_exits_non_zero() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("podgone").unwrap();
    let (p, _kube, kubeconfig) = support::published_pod(&mut lab, "gone-1", "10.42.0.94");
    let trace = support::start_verdict_trace_env(
        lab.node(),
        &[
            "--pod",
            "gone-1",
            "-n",
            "default",
            "--port",
            "9500",
            "--node-name",
            "lab-node",
            "--duration",
            "30s",
        ],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let t = Instant::now();
    lab.remove_pod(&p).unwrap();
    let stderr = trace.finish_error(2);
    assert!(t.elapsed() < Duration::from_secs(10), "noticed promptly");
    assert!(stderr.contains("was deleted during the trace"), "{stderr}");
    let left = support::netprobe_tables(&lab, lab.node());
    assert!(left.is_empty(), "{left:?}");
    let _ = std::fs::remove_file(kubeconfig);
}

/// Durations too large for the clock (`Instant + Duration` overflows) are a usage error, not a
/// panic: `--duration` / `--timeout` are at most 365 days.
#[test]
fn a_huge_duration_is_a_clear_error_not_a_panic() {
    netprobe_lab::require_root();
    let lab = Lab::new("hugedur").unwrap();
    for d in ["99999999999h", "18446744073709551615s", "9000000h"] {
        for flag in ["--duration", "--timeout"] {
            let out = Command::new("ip")
                .args(["netns", "exec", lab.node()])
                .arg(support::netprobe_bin())
                .args(["trace", "--port", "9500", flag, d])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{flag} {d}: {stderr}");
            assert!(
                !stderr.contains("panicked") && stderr.contains("at most 365 days"),
                "{flag} {d}: {stderr}"
            );
        }
    }
}

/// A network namespace this test made by hand (not a lab pod), deleted when dropped.
struct LooseNetns(String);

impl Drop for LooseNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A pod namespace the running agent has not seen yet (no veth to the node) holds what a
/// killed clsact trace left; once its veth appears, the agent cleans it within seconds.
#[test]
fn agent_cleans_a_pod_namespace_it_sees_appear() {
    netprobe_lab::require_root();
    let lab = Lab::new("podlate").unwrap();
    let late = LooseNetns(format!("np-late-{}", std::process::id()));
    let st = Command::new("ip").args(["netns", "add", &late.0]).status();
    assert!(st.unwrap().success());
    lab.sh(&late.0, "ip link set lo up").unwrap();
    let trace = support::start_verdict_trace_env(
        lab.node(),
        &["--netns", &late.0, "--port", "9500", "--duration", "60s"],
        &[("NETPROBE_TC_MODE", "clsact")],
    );
    trace.kill9();
    assert!(!support::netprobe_tables(&lab, &late.0).is_empty());
    assert!(!support::bpf_filters(&lab, &late.0).is_empty());

    let agent = support::start_agent(lab.node(), &[], &[], false);
    assert!(
        !support::bpf_filters(&lab, &late.0).is_empty(),
        "not a pod of this node yet: not the agent's to clean"
    );
    lab.sh(
        lab.node(),
        &format!(
            "ip link add nplate0 type veth peer name eth0 netns {} && ip link set nplate0 up",
            late.0
        ),
    )
    .unwrap();
    let start = Instant::now();
    while !support::bpf_filters(&lab, &late.0).is_empty()
        || !support::netprobe_tables(&lab, &late.0).is_empty()
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "left after 10 s: {:?} {:?}",
            support::bpf_filters(&lab, &late.0),
            support::netprobe_tables(&lab, &late.0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, stderr) = stop(agent);
    assert!(
        stderr.contains(&format!("left on 1 interface(s) in netns {}", late.0)),
        "{stderr}"
    );
}
