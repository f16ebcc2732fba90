//! Privileged tests of resets after the handshake that a socket on this node sent (issue #18):
//! who sent the reset (the server pod's process closing or dying with unread data, or the
//! kernel for a socket that no longer exists) and why (the kernel's `sk_rst_reason`, named
//! from its BTF). Real server processes, real kernel programs, netns labs.

mod support;

use std::{
    io::{ErrorKind, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use netprobe_lab::{
    mtu::{self, Pods},
    process::{Signal, signal},
    resets::{self, SERVER_COMM, Then},
};
use serde_json::Value;
use support::{TraceOutput, TraceRun, kube_api, kube_env, publish_pod, start_verdict_trace_env};

const PORT: &str = "9500";
const SERVER: &str = "10.42.0.30:9500";

fn server_addr() -> SocketAddr {
    SERVER.parse().unwrap()
}

/// The pods, published in the API stand-in (so that the sender's pod is named), and a trace
/// of the port running on the node.
struct Traced {
    p: Pods,
    _kube: netprobe_lab::kubeapi::FakeKube,
    kubeconfig: PathBuf,
}

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn lab(tag: &str) -> Traced {
    let p = mtu::pods(tag).unwrap();
    let (kube, kubeconfig) = kube_api(&p.lab);
    publish_pod(&kube, &p.client);
    publish_pod(&kube, &p.server);
    Traced {
        p,
        _kube: kube,
        kubeconfig,
    }
}

fn trace(t: &Traced, extra: &[&str]) -> TraceRun {
    let mut args = vec!["--port", PORT, "--duration", "20s", "--count", "2"];
    args.extend_from_slice(extra);
    start_verdict_trace_env(t.p.lab.node(), &args, &kube_env(&t.kubeconfig))
}

/// The connection's second verdict (how it ended), after its `connected`.
fn ended(out: &TraceOutput) -> Value {
    let v = out.verdicts();
    let outcomes: Vec<&Value> = v.iter().map(|v| &v["outcome"]).collect();
    assert!(
        outcomes.len() == 2
            && outcomes[0] == "connected"
            && v[0]["client"]["port"] == v[1]["client"]["port"],
        "one connection: connected, then how it ended; got {outcomes:?}\n{}\n{}",
        out.dump(),
        out.stderr
    );
    support::assert_schema_valid(&out.events);
    v[1].clone()
}

/// A started scenario: the lab, the server process's pid, the trace, the client's connection
/// (which has sent `bytes`).
struct Started {
    t: Traced,
    pid: u32,
    run: TraceRun,
    s: TcpStream,
}

fn start(tag: &str, then: Then, bytes: usize) -> Started {
    let mut t = lab(tag);
    let pid = resets::server(&mut t.p, server_addr(), then).unwrap();
    let run = trace(&t, &[]);
    let s = resets::connect_and_send(&t.p, server_addr(), bytes).unwrap();
    Started { t, pid, run, s }
}

/// The client's read fails with ECONNRESET; the trace's second verdict.
fn reset_seen(mut x: Started) -> (Value, Traced) {
    let err = resets::read_until_end(&mut x.s, Duration::from_secs(5)).expect_err("a reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    let out = x.run.finish_with_code(1);
    (ended(&out), x.t)
}

/// The verdict's reset: by whom, the kernel's reason, the sender's side and process.
fn assert_reset(v: &Value, by: &str, reason: &str) {
    assert_eq!(v["outcome"], "reset_after_established", "{v:#}");
    let a = &v["after_handshake"];
    assert_eq!(a["reset_by"], by, "{v:#}");
    assert_eq!(a["reset_reason"], reason, "{v:#}");
}

/// The server pod's process, named as the one that closed its socket.
fn assert_sent_by_server_process(v: &Value, pid: u32) {
    let s = &v["after_handshake"]["reset_sender"];
    assert_eq!(s["side"], "server", "{v:#}");
    assert_eq!(s["process"]["pid"], pid, "{v:#}");
    assert_eq!(s["process"]["comm"], SERVER_COMM, "{v:#}");
    assert_eq!(s["pod"]["namespace"], "default", "{v:#}");
    assert_eq!(s["pod"]["pod"], "server", "{v:#}");
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.contains(&format!("{SERVER_COMM} (pid {pid}) in default/server")),
        "{why}"
    );
    assert!(!why.contains("nothing on this node sent it"), "{why}");
}

#[test]
fn server_closing_with_unread_data_is_named_with_its_process_pod_and_abort_on_close() {
    let x = start("rstcl", Then::CloseUnread, 64 * 1024);
    let pid = x.pid;
    let (v, _t) = reset_seen(x);
    assert_reset(&v, "peer", "TCP_ABORT_ON_CLOSE");
    assert_sent_by_server_process(&v, pid);
    let why = v["explanation"].as_str().unwrap();
    assert!(why.contains("unread"), "{why}");
    assert_eq!(v["app_error"], "ECONNRESET", "{v:#}");
}

#[test]
fn server_process_killed_with_unread_data_is_named_as_the_dying_process() {
    let x = start("rstkill", Then::Hold, 64 * 1024);
    // Let it read its first bytes; the rest stays unread when it dies.
    std::thread::sleep(Duration::from_millis(700));
    signal(x.pid, Signal::Kill).unwrap();
    let pid = x.pid;
    let (v, _t) = reset_seen(x);
    assert_reset(&v, "peer", "TCP_ABORT_ON_CLOSE");
    assert_sent_by_server_process(&v, pid);
}

#[test]
fn a_segment_after_the_server_socket_is_gone_is_the_kernels_no_socket() {
    let mut x = start("rstgone", Then::ReadAllAndExit, 2 * resets::READ_FIRST);
    // The server reads everything, closes cleanly and exits: the client sees the end of the
    // stream, and the server pod's kernel forgets the socket.
    resets::read_until_end(&mut x.s, Duration::from_secs(5)).expect("a clean end of stream");
    resets::wait_socket_gone(&x.t.p, server_addr()).unwrap();
    x.s.write_all(b"are you still there?").unwrap();
    // The answer is a reset: the next write fails (the stream had already ended for reads).
    std::thread::sleep(Duration::from_millis(300));
    let err = x.s.write_all(b"hello?").expect_err("a reset");
    assert_eq!(err.raw_os_error(), Some(libc::EPIPE), "{err}");
    let v = ended(&x.run.finish_with_code(1));
    assert_reset(&v, "kernel", "NO_SOCKET");
    let a = &v["after_handshake"];
    assert!(a["reset_sender"].is_null(), "no socket sent it: {v:#}");
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.contains("NO_SOCKET") && why.contains(&x.t.p.server.netns),
        "{why}"
    );
}

#[test]
fn a_socket_destroyed_with_ss_names_ss_and_the_state_reason() {
    let x = start("rstss", Then::Hold, 64 * 1024);
    std::thread::sleep(Duration::from_millis(300));
    x.t.p
        .lab
        .sh(&x.t.p.server.netns, "ss -K -tn dst 10.42.0.20 >/dev/null")
        .unwrap();
    let (v, _t) = reset_seen(x);
    assert_reset(&v, "peer", "TCP_STATE");
    let s = &v["after_handshake"]["reset_sender"];
    assert_eq!(s["process"]["comm"], "ss", "{v:#}");
    assert_eq!(s["pod"]["pod"], "server", "{v:#}");
}
