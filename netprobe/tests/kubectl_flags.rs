//! kubectl's flags on the cluster-mode commands (`--kubeconfig`, `--context`, `-n`, `--as`,
//! `--request-timeout`), checked on the wire: the real binary talks to the Kubernetes API
//! stand-in, which records every request (path, `Impersonate-User`) and can hang. No root, no
//! agent: each run ends where the API's answers lead it (unknown pod, Events refused or
//! listed), and that end is part of what is checked.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use netprobe_lab::{
    kubeapi::{ADMIN_TOKEN, FakeKube, Seen},
    scratch::Scratch,
};

fn api_server() -> FakeKube {
    FakeKube::start(TcpListener::bind("127.0.0.1:0").expect("bind loopback"))
}

/// A kubeconfig with context `a` (current, server `a`) and `b` (server `b`, namespace team-b),
/// both as the lab admin.
fn kubeconfig(dir: &Path, a: &FakeKube, b: &FakeKube) -> PathBuf {
    let path = dir.join("config");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: a\n  cluster: {{server: 'http://127.0.0.1:{}'}}\n- name: b\n  cluster: {{server: 'http://127.0.0.1:{}'}}\ncontexts:\n- name: a\n  context: {{cluster: a, user: admin}}\n- name: b\n  context: {{cluster: b, user: admin, namespace: team-b}}\ncurrent-context: a\nusers:\n- name: admin\n  user: {{token: {ADMIN_TOKEN}}}\n",
        a.port, b.port
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

/// Runs netprobe with only these flags to find the API: no KUBECONFIG, an empty HOME.
fn netprobe(home: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_netprobe"))
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", home)
        .output()
        .expect("run netprobe")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn paths(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .map(|s| format!("{} {}", s.method, s.target.split('?').next().unwrap_or("")))
        .collect()
}

#[test]
fn kubeconfig_and_context_choose_the_server_and_the_default_namespace() {
    let scratch = Scratch::new("kubectl-context");
    let (a, b) = (api_server(), api_server());
    let config = kubeconfig(&scratch.0, &a, &b);
    let config = config.to_str().unwrap();
    // The port-forward path (its flags are the same for Trace objects: trace_objects_api.rs).
    let trace = [
        "trace",
        "--cluster",
        "--via-agent",
        "--pod",
        "web",
        "--port",
        "80",
    ];

    let out = netprobe(
        &scratch.0,
        &[&trace[..], &["--kubeconfig", config]].concat(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        paths(&a.requests()),
        ["GET /api/v1/namespaces/default/pods/web"]
    );
    assert!(b.requests().is_empty());

    let out = netprobe(
        &scratch.0,
        &[&trace[..], &["--kubeconfig", config, "--context", "b"]].concat(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("namespace `team-b`"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        paths(&b.requests()),
        ["GET /api/v1/namespaces/team-b/pods/web"]
    );

    let out = netprobe(
        &scratch.0,
        &[
            &trace[..],
            &["--kubeconfig", config, "--context", "b", "-n", "shop"],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        paths(&b.requests())[1..],
        ["GET /api/v1/namespaces/shop/pods/web"]
    );
    assert_eq!(a.requests().len(), 1, "context b never asks server a");
}

/// `failures` talks to the API server only: `--as` impersonates its Event list, and RBAC on
/// Events decides — the context's namespace by default, every namespace with `-A`. (Whose
/// token the agents get under `--as` is `trace`'s: `cluster::token`'s tests and auth.rs.)
#[test]
fn as_impersonates_the_event_list_and_rbac_on_events_decides() {
    let scratch = Scratch::new("kubectl-as");
    let (api, unused) = (api_server(), api_server());
    let config = kubeconfig(&scratch.0, &api, &unused);
    let config = config.to_str().unwrap();
    let failures = ["failures", "--kubeconfig", config];
    let as_alice = [&failures[..], &["--as", "alice"]].concat();

    // alice may list no Events: refused by the API server, naming what is missing.
    let out = netprobe(&scratch.0, &as_alice);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(
            "User \"alice\" cannot list resource \"events\" in API group \"events.k8s.io\" in the namespace \"default\""
        ),
        "{}",
        stderr(&out)
    );
    let seen = api.requests();
    assert_eq!(
        paths(&seen),
        ["GET /apis/events.k8s.io/v1/namespaces/default/events"]
    );
    assert!(
        seen[0]
            .target
            .contains("fieldSelector=reportingController%3Dnetprobe.io%2Fagent"),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|s| s.impersonate.as_deref() == Some("alice")),
        "{seen:?}"
    );

    // Allowed in her namespace: an answer; all namespaces stay refused.
    api.allow("alice", "list", "events.k8s.io", "events", Some("default"));
    let out = netprobe(&scratch.0, &as_alice);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no failed connection attempt"),
        "{out:?}"
    );
    let out = netprobe(&scratch.0, &[&as_alice[..], &["-A"]].concat());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("at the cluster scope"),
        "{}",
        stderr(&out)
    );

    // Without --as: the kubeconfig's user, nobody impersonated; -A lists every namespace.
    let before = api.requests().len();
    let out = netprobe(&scratch.0, &[&failures[..], &["-A"]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let seen = &api.requests()[before..];
    assert_eq!(paths(seen), ["GET /apis/events.k8s.io/v1/events"]);
    assert!(seen.iter().all(|s| s.impersonate.is_none()));
    assert!(api.token_requests().is_empty(), "no token goes anywhere");
}

#[test]
fn request_timeout_bounds_a_hung_api_server() {
    let scratch = Scratch::new("kubectl-timeout");
    let (api, unused) = (api_server(), api_server());
    let config = kubeconfig(&scratch.0, &api, &unused);
    api.set_stalled(true);
    let started = Instant::now();
    let out = netprobe(
        &scratch.0,
        &[
            "failures",
            "--kubeconfig",
            config.to_str().unwrap(),
            "--request-timeout",
            "1s",
        ],
    );
    let took = started.elapsed();
    api.set_stalled(false);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        took < Duration::from_secs(10),
        "kube's own read timeout is 295 s; --request-timeout 1s took {took:?}"
    );
    assert!(
        stderr(&out).contains("no answer within --request-timeout 1s"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        paths(&api.requests()),
        ["GET /apis/events.k8s.io/v1/namespaces/default/events"]
    );
}

/// `netprobe schema | head` and the like: a reader that stops early is no error — exit 0, no
/// panic on stderr — for every one-shot command that prints to stdout.
#[test]
fn a_reader_that_stops_early_is_no_error() {
    for args in [&["schema"][..], &["completions", "bash"], &["man"]] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_netprobe"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn netprobe");
        // The read end closed before anything is read: every write gets EPIPE.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
