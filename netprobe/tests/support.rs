//! Runs the real `netprobe` binary inside a lab namespace and collects its NDJSON output.

#![allow(
    dead_code,
    reason = "shared by several test binaries, each using a part"
)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

pub struct TraceRun {
    child: Child,
    ready: PathBuf,
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
    let ready = std::env::temp_dir().join(format!(
        "netprobe-ready-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let _ = std::fs::remove_file(&ready);
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            env!("CARGO_BIN_EXE_netprobe"),
            "trace",
            "-o",
            "json",
            "--ready-file",
        ])
        .arg(&ready)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn netprobe");
    let start = Instant::now();
    while !ready.exists() {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("netprobe trace exited before it was ready ({status}): {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "netprobe trace not ready after 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    TraceRun { child, ready }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
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
    pub fn finish_with_code(mut self, code: i32) -> TraceOutput {
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .expect("netprobe output");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "netprobe trace exit code; stderr: {stderr}\nstdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let mut lines: Vec<Value> = String::from_utf8(out.stdout)
            .expect("utf8")
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
}

impl TraceRun {
    /// Waits for a trace that must fail with `code`; returns its stderr (no summary expected).
    pub fn finish_error(mut self, code: i32) -> String {
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .expect("netprobe output");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "exit code; stderr: {stderr}");
        stderr
    }

    /// SIGKILLs netprobe (`ip netns exec` execs it, so the child is netprobe itself).
    /// Ctrl-C: the trace ends as at the end of its duration.
    pub fn interrupt(&self) {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
    }

    pub fn kill9(mut self) {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for TraceRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.ready);
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

/// The S1 client pod `financial-inference/client-0` (10.42.0.20).
pub fn add_client(lab: &mut netprobe_lab::Lab) -> netprobe_lab::Pod {
    lab.add_pod(
        "financial-inference",
        "client-0",
        "10.42.0.20".parse().unwrap(),
    )
    .unwrap()
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

/// Starts `ip netns exec <node> netprobe agent --metrics-addr 127.0.0.1:<port> <extra>` with
/// `env` and waits until its probes are attached; panics with its stderr if it exits early.
/// stdout (the NDJSON stream) is piped when `capture_stdout`, discarded otherwise.
pub fn start_agent(
    node: &str,
    port: u16,
    extra: &[&str],
    env: &[(&str, &str)],
    capture_stdout: bool,
) -> Child {
    let ready = std::env::temp_dir().join(format!(
        "netprobe-agent-ready-{}-{port}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&ready);
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            node,
            env!("CARGO_BIN_EXE_netprobe"),
            "agent",
        ])
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--ready-file")
        .arg(&ready)
        .args(extra)
        .envs(env.iter().copied())
        .stdout(if capture_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !ready.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("agent exited ({st}): {err}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "agent not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(&ready);
    child
}

/// GET `path` from the agent on 127.0.0.1:`port` inside `node`: (status, body).
pub fn http_get(node: &str, port: u16, path: &str) -> (u16, String) {
    netprobe_lab::in_netns(node, || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("agent endpoint");
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let code = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = resp
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        (code, body)
    })
    .unwrap()
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

/// Waits for a child at most `limit` (then kills it): (exit code or -1, stdout, stderr).
pub fn wait_output(mut child: std::process::Child, limit: Duration) -> (i32, String, String) {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
