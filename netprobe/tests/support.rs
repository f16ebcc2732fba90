//! Runs the real `netprobe` binary inside a lab namespace and collects its NDJSON output.

#![allow(
    dead_code,
    reason = "shared by several test binaries, each using a part"
)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use netprobe_lab::process::{Agent, Finished, Running, Signal, Spawn};
use serde_json::Value;

/// How long a trace may run before the test gives up on it (the longest `--duration` is 60 s).
const TRACE_LIMIT: Duration = Duration::from_secs(300);

/// The binary under test.
pub fn netprobe_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_netprobe"))
}

pub struct TraceRun {
    run: Running,
}

/// Starts `ip netns exec <netns> netprobe trace <args> -o json` and waits until its probes are
/// attached. Panics (with netprobe's stderr) if it exits early: a trace that cannot load its
/// probes must fail the test, never skip it.
pub fn start_trace(netns: &str, args: &[&str]) -> TraceRun {
    let mut all = vec!["--events"];
    all.extend_from_slice(args);
    spawn_trace(netns, &all, &[])
}

/// Starts a trace in verdict mode (the default).
pub fn start_verdict_trace(netns: &str, args: &[&str]) -> TraceRun {
    spawn_trace(netns, args, &[])
}

/// Starts a trace in verdict mode with extra environment (e.g. KUBECONFIG).
pub fn start_verdict_trace_env(netns: &str, args: &[&str], env: &[(&str, &str)]) -> TraceRun {
    spawn_trace(netns, args, env)
}

fn spawn_trace(netns: &str, args: &[&str], env: &[(&str, &str)]) -> TraceRun {
    netprobe_lab::require_root();
    let run = Spawn::trace(netprobe_bin(), netns)
        .args(["-o", "json"])
        .args(args)
        .envs(env)
        .start()
        .unwrap_or_else(|e| panic!("{e:#}"));
    TraceRun { run }
}

pub struct TraceOutput {
    pub events: Vec<Value>,
    pub summary: Value,
    pub stderr: String,
}

impl TraceRun {
    /// Waits for the trace to end (it was started with --duration) and parses its output.
    pub fn finish(self) -> TraceOutput {
        self.finish_with_code(0)
    }

    /// Waits for the trace to end and checks its exit code (verdict mode: 1 = failure diagnosed).
    pub fn finish_with_code(self, code: i32) -> TraceOutput {
        let out = self.wait();
        let stderr = out.stderr;
        assert_eq!(
            out.status.code(),
            Some(code),
            "netprobe trace exit code; stderr: {stderr}\nstdout: {}",
            out.stdout
        );
        let mut lines: Vec<Value> = out
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let summary = lines.pop().expect("summary line");
        assert_eq!(
            summary["kind"], "summary",
            "last line is the summary: {summary}"
        );
        assert_schema_valid(&lines);
        assert_schema_valid(std::slice::from_ref(&summary));
        for e in &lines {
            let schema = e["schema"].as_str().unwrap_or_default();
            assert!(
                schema == "netprobe.event/v1" || schema == "netprobe.verdict/v1",
                "{e}"
            );
        }
        TraceOutput {
            events: lines,
            summary,
            stderr,
        }
    }

    /// Waits for a trace that must fail with `code`; returns its stderr (no summary expected).
    pub fn finish_error(self, code: i32) -> String {
        let out = self.wait();
        let stderr = out.stderr;
        assert_eq!(out.status.code(), Some(code), "exit code; stderr: {stderr}");
        stderr
    }

    fn wait(self) -> Finished {
        self.run.wait_output(TRACE_LIMIT).expect("netprobe output")
    }

    /// Ctrl-C: the trace ends as at the end of its duration.
    pub fn interrupt(&self) {
        self.run.signal(Signal::Int).expect("SIGINT netprobe trace");
    }

    /// SIGKILLs netprobe (`ip netns exec` execs it, so the child is netprobe itself).
    pub fn kill9(self) {
        self.run.kill9();
    }
}

/// When NETPROBE_RECORD_FIXTURES=DIR is set, the arguments that make a trace record its raw
/// events to DIR/<name>.ndjson (verdict unit tests replay them).
pub fn record_args(name: &str) -> Vec<String> {
    match std::env::var("NETPROBE_RECORD_FIXTURES") {
        Ok(dir) => vec!["--record".into(), format!("{dir}/{name}.ndjson")],
        Err(_) => Vec::new(),
    }
}

/// Replaces lab-specific namespace names in a recorded fixture by stable ones.
pub fn normalize_fixture(name: &str, renames: &[(&str, &str)]) {
    let Ok(dir) = std::env::var("NETPROBE_RECORD_FIXTURES") else {
        return;
    };
    let path = format!("{dir}/{name}.ndjson");
    let mut text = std::fs::read_to_string(&path).expect("recorded fixture");
    for (from, to) in renames {
        text = text.replace(&format!("\"{from}\""), &format!("\"{to}\""));
    }
    std::fs::write(&path, text).unwrap();
}

impl TraceOutput {
    pub fn verdicts(&self) -> Vec<Value> {
        self.of_kind("verdict").into_iter().cloned().collect()
    }

    pub fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["kind"] == kind).collect()
    }

    pub fn dump(&self) -> String {
        self.events
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The S1 lab: a node with `financial-inference/client-0` (10.42.0.20) and
/// `financial-inference/seldon-scheduler-0` (10.42.0.30).
pub struct S1 {
    pub lab: netprobe_lab::Lab,
    pub client: netprobe_lab::Pod,
    pub server: netprobe_lab::Pod,
}

pub fn s1_lab(tag: &str) -> S1 {
    let mut lab = netprobe_lab::Lab::new(tag).unwrap();
    let client = add_client(&mut lab);
    let server = lab
        .add_pod(
            "financial-inference",
            "seldon-scheduler-0",
            "10.42.0.30".parse().unwrap(),
        )
        .unwrap();
    S1 {
        lab,
        client,
        server,
    }
}

/// The S1 rules, loaded with iptables-restore: kube-proxy's DNAT of the ClusterIP to the
/// scheduler pod (10.42.0.30) and Calico's ingress policy on its endpoint (9004 denied).
pub fn s1_rules(lab: &netprobe_lab::Lab, server: &netprobe_lab::Pod, client: &netprobe_lab::Pod) {
    use netprobe_lab::rules::{calico_filter, kube_proxy_dnat, restore};
    let filter = calico_filter(&server.host_if, &client.host_if);
    for rules in [kube_proxy_dnat("10.42.0.30"), filter] {
        restore(lab, "iptables-restore", &rules).unwrap();
    }
}

/// S1's Service `financial-inference/seldon-scheduler` (ClusterIP 10.43.51.131, port `xds`
/// 9004) and its EndpointSlice (the scheduler pod, 10.42.0.30), in the API stand-in.
pub fn publish_seldon_scheduler(kube: &netprobe_lab::kubeapi::FakeKube) {
    use netprobe_lab::kubeapi::{Kind, endpoint_slice, service};
    kube.apply(
        Kind::Service,
        service(
            "financial-inference",
            "seldon-scheduler",
            "10.43.51.131",
            &[("xds", 9004, 9004)],
        ),
    );
    kube.apply(
        Kind::EndpointSlice,
        endpoint_slice(
            "financial-inference",
            "seldon-scheduler",
            &[("10.42.0.30", "seldon-scheduler-0")],
            &[("xds", 9004)],
        ),
    );
}

/// [`s1_rules`] for an [`S1`] lab.
pub fn load_s1_rules(s1: &S1) {
    s1_rules(&s1.lab, &s1.server, &s1.client)
}

/// The S1 client pod `financial-inference/client-0` (10.42.0.20).
pub fn add_client(lab: &mut netprobe_lab::Lab) -> netprobe_lab::Pod {
    lab.add_pod(
        "financial-inference",
        "client-0",
        "10.42.0.20".parse().unwrap(),
    )
    .unwrap()
}

/// A permanent neighbour entry for the pod's gateway (169.254.1.1, the node side's MAC): proxy
/// ARP answers only while the node has a usable route for the requester.
pub fn static_gateway_neighbour(lab: &netprobe_lab::Lab, pod: &netprobe_lab::Pod) {
    let mac = lab
        .sh(
            lab.node(),
            &format!("cat /sys/class/net/{}/address", pod.host_if),
        )
        .unwrap();
    lab.sh(
        &pod.netns,
        &format!(
            "ip neigh replace 169.254.1.1 lladdr {} dev eth0 nud permanent",
            mac.trim()
        ),
    )
    .unwrap();
}

/// The Kubernetes API stand-in, listening inside the node namespace (where netprobe runs), and
/// a kubeconfig file for it (the caller removes it).
pub fn kube_api(lab: &netprobe_lab::Lab) -> (netprobe_lab::kubeapi::FakeKube, PathBuf) {
    let listener = lab
        .listen(lab.node(), "127.0.0.1:0".parse().unwrap())
        .unwrap();
    let kube = netprobe_lab::kubeapi::FakeKube::start(listener);
    let path = std::env::temp_dir().join(format!(
        "netprobe-kubeconfig-{}-{}",
        std::process::id(),
        kube.port
    ));
    std::fs::write(&path, kube.kubeconfig()).unwrap();
    (kube, path)
}

/// Starts `ip netns exec <node> netprobe agent --metrics-addr 127.0.0.1:<free port> <extra>`
/// with `env` and waits until its probes are attached; panics with its stderr if it exits early.
/// stdout (the NDJSON stream) is piped when `capture_stdout`, discarded otherwise.
pub fn start_agent(
    node: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    capture_stdout: bool,
) -> Agent {
    netprobe_lab::require_root();
    Agent::start(netprobe_bin(), node, |s| {
        s.args(extra).envs(env).stdout(if capture_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`start_agent`] on node `lab-node`, naming pods through the API stand-in of `kubeconfig`.
pub fn start_named_agent(node: &str, kubeconfig: &Path, capture_stdout: bool) -> Agent {
    start_agent(
        node,
        &[],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", "lab-node"),
        ],
        capture_stdout,
    )
}

/// GET `path` from `agent`: (status, body).
pub fn get(agent: &Agent, path: &str) -> (u16, String) {
    agent.get(path).expect("agent endpoint")
}

/// SIGTERMs the agent and waits for it: its output.
pub fn stop(agent: Agent) -> Finished {
    agent.stop().expect("agent stops")
}

/// The NDJSON records in `stdout`.
pub fn ndjson(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Validates every NDJSON record against the JSON Schemas `netprobe schema` prints (generated
/// from the code): events and verdicts by their `schema`, summaries and suppressed-counts by
/// their `kind`.
pub fn assert_schema_valid(records: &[Value]) {
    static VALIDATORS: std::sync::OnceLock<
        std::collections::HashMap<String, jsonschema::Validator>,
    > = std::sync::OnceLock::new();
    let validators = VALIDATORS.get_or_init(|| {
        let out = Command::new(env!("CARGO_BIN_EXE_netprobe"))
            .arg("schema")
            .output()
            .expect("netprobe schema");
        let all: Value = serde_json::from_slice(&out.stdout).expect("schema JSON");
        all.as_object()
            .expect("schemas by name")
            .iter()
            .map(|(k, s)| {
                let v = jsonschema::validator_for(s)
                    .unwrap_or_else(|e| panic!("schema {k} does not compile: {e}"));
                (k.clone(), v)
            })
            .collect()
    });
    for r in records {
        let key = r["schema"].as_str().unwrap_or_default().to_string();
        let v = validators
            .get(&key)
            .unwrap_or_else(|| panic!("no schema `{key}` for {r}"));
        let errors: Vec<String> = v.iter_errors(r).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{r}\ndoes not match schema {key}: {errors:#?}"
        );
    }
}

/// Adds pod `default/NAME` at `ip` to `lab` and publishes it (one container `c` declaring port
/// 9500) in the API stand-in, which listens in the node namespace; the kubeconfig is removed
/// by the caller.
pub fn published_pod(
    lab: &mut netprobe_lab::Lab,
    name: &str,
    ip: &str,
) -> (netprobe_lab::Pod, netprobe_lab::kubeapi::FakeKube, PathBuf) {
    let p = lab.add_pod("default", name, ip.parse().unwrap()).unwrap();
    let (kube, kubeconfig) = kube_api(lab);
    publish_pod(&kube, &p);
    (p, kube, kubeconfig)
}

/// Publishes a lab pod on `lab-node` (one container `c` declaring port 9500).
pub fn publish_pod(kube: &netprobe_lab::kubeapi::FakeKube, p: &netprobe_lab::Pod) {
    use netprobe_lab::kubeapi::{Kind, pod};
    let obj = pod(
        &p.namespace,
        &p.name,
        "lab-node",
        &p.ip.to_string(),
        &[("c", "c1c1c1c1c1c1c1c1", &[9500])],
    );
    kube.apply(Kind::Pod, obj);
}

/// What netprobe may leave in `netns`: its nft tables (`netprobe_…`) and the BPF tc filters on
/// the clsact hooks of every interface (anybody's: `tc filter show` lines).
pub fn netprobe_tables(lab: &netprobe_lab::Lab, netns: &str) -> Vec<String> {
    lab.sh(netns, "nft list tables")
        .unwrap()
        .lines()
        .filter(|l| l.contains("netprobe"))
        .map(str::to_string)
        .collect()
}

/// The BPF tc filters in `netns` (every interface, both clsact hooks), as `tc` prints them.
pub fn bpf_filters(lab: &netprobe_lab::Lab, netns: &str) -> Vec<String> {
    lab.sh(
        netns,
        "for d in $(ls /sys/class/net); do tc filter show dev $d ingress; \
         tc filter show dev $d egress; done 2>/dev/null || true",
    )
    .unwrap()
    .lines()
    .filter(|l| l.contains(" bpf ") && l.contains(" id "))
    .map(str::to_string)
    .collect()
}

/// `program` run as nobody in `netns` with `kubeconfig` and without NODE_NAME ("the laptop":
/// no root, no eBPF; all work happens in the agents), output piped; add the arguments.
pub fn laptop(netns: &str, kubeconfig: &str, program: &Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns])
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .arg(program)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("NODE_NAME")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Assembles BPF assembly `source` with llvm-mc (the LLVM the toolchain route installs) into
/// `dir/NAME.o`: small foreign programs for the tests, with no compiler.
pub fn assemble_bpf(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = dir.join(format!("{name}.s"));
    let obj = dir.join(format!("{name}.o"));
    std::fs::write(&src, source).unwrap();
    let mc = ["llvm-mc", "/usr/lib/llvm-22/bin/llvm-mc"]
        .into_iter()
        .find(|m| Command::new(m).arg("--version").output().is_ok())
        .expect("llvm-mc (the LLVM the toolchain route installs)");
    let st = Command::new(mc)
        .args(["-triple", "bpfel", "-filetype=obj"])
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .status()
        .unwrap();
    assert!(st.success(), "assembling {name}");
    obj
}

/// The environment of a netprobe on the lab's node that names pods through the API stand-in.
pub fn kube_env(kubeconfig: &Path) -> [(&'static str, &str); 2] {
    [
        ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ("NODE_NAME", "lab-node"),
    ]
}

/// The `mtu_blackhole` verdict of [`netprobe_lab::mtu::black_hole`]'s lab names the server's
/// node-side veth and its MTU, dropped sizes above it, and the rule that ate the ICMP.
pub fn assert_names_the_black_hole(v: &Value, server_if: &str) {
    use netprobe_lab::mtu::PATH_MTU;
    assert_eq!(v["outcome"], "mtu_blackhole", "{v:#}");
    let m = &v["after_handshake"]["mtu"];
    assert_eq!(m["device"], server_if, "{v:#}");
    assert_eq!(m["mtu"], PATH_MTU, "{v:#}");
    let sizes: Vec<u64> = m["dropped_sizes"]
        .as_array()
        .expect("sizes")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert!(
        !sizes.is_empty() && sizes.iter().all(|s| *s > u64::from(PATH_MTU)),
        "dropped sizes above the MTU: {v:#}"
    );
    assert_eq!(m["icmp"]["dropped"], true, "{v:#}");
    let rule = m["icmp"]["dropped_by"]["rule"].as_str().unwrap_or_default();
    assert!(rule.contains("frag-needed-eater"), "the ICMP rule: {v:#}");
}
