//! kubectl's flags on the cluster-mode commands (`--kubeconfig`, `--context`, `-n`, `--as`,
//! `--request-timeout`), checked on the wire: the real binary talks to the Kubernetes API
//! stand-in, which records every request (path, `Impersonate-User`) and can hang. No root, no
//! agent: each run ends where the API's answers lead it (unknown pod, refused TokenRequest,
//! an agent pod nothing forwards to), and that end is part of what is checked.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use netprobe_lab::{
    kubeapi::{ADMIN_TOKEN, FakeKube, Kind, Seen},
    scratch::Scratch,
};
use serde_json::json;

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

/// A Running agent pod on node-a (nothing forwards to it: the port-forward is refused).
fn agent_pod(api: &FakeKube) {
    api.apply(
        Kind::Pod,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "netprobe-a", "namespace": "netprobe", "uid": "0a0a0a0a-0000-4000-8000-0000000000aa",
                         "labels": {"app.kubernetes.io/name": "netprobe"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "agent", "image": "netprobe"}]},
            "status": {"phase": "Running"},
        }),
    );
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

#[test]
fn as_impersonates_every_request_and_decides_whose_token_the_agents_get() {
    let scratch = Scratch::new("kubectl-as");
    let (api, unused) = (api_server(), api_server());
    agent_pod(&api);
    let config = kubeconfig(&scratch.0, &api, &unused);
    let config = config.to_str().unwrap();
    let failures = ["failures", "--kubeconfig", config];

    // A user: the agents cannot be told; refused before asking anything.
    let out = netprobe(&scratch.0, &[&failures[..], &["--as", "alice"]].concat());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--as-service-account"),
        "{}",
        stderr(&out)
    );
    assert!(api.requests().is_empty(), "{:?}", api.requests());

    // A user and the ServiceAccount whose token to request, as that user: alice may not yet.
    let with_sa = [
        &failures[..],
        &[
            "--as",
            "alice",
            "--as-service-account",
            "netprobe/netprobe-tracer",
        ],
    ]
    .concat();
    let out = netprobe(&scratch.0, &with_sa);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("User \"alice\" cannot create resource \"serviceaccounts/token\""),
        "{}",
        stderr(&out)
    );
    let seen = api.requests();
    assert_eq!(
        paths(&seen),
        [
            "GET /api/v1/namespaces/netprobe/pods",
            "POST /api/v1/namespaces/netprobe/serviceaccounts/netprobe-tracer/token"
        ]
    );
    assert!(
        seen.iter()
            .all(|s| s.impersonate.as_deref() == Some("alice")),
        "{seen:?}"
    );
    assert!(api.token_requests().is_empty());

    // Allowed: the token is requested as alice and the port-forward is opened as alice.
    api.allow(
        "alice",
        "create",
        "",
        "serviceaccounts/token",
        Some("netprobe"),
    );
    let out = netprobe(&scratch.0, &with_sa);
    assert_eq!(
        out.status.code(),
        Some(2),
        "no agent answers: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("did not answer"), "{}", stderr(&out));
    assert_eq!(api.token_requests().len(), 1);
    let seen = api.requests();
    assert!(
        seen.iter()
            .any(|s| s.target.contains("/pods/netprobe-a/portforward")
                && s.impersonate.as_deref() == Some("alice")),
        "{seen:?}"
    );

    // A ServiceAccount: its own token is requested (the agents see whom the API server saw).
    let sa = "system:serviceaccount:netprobe:netprobe-tracer";
    api.allow(sa, "create", "", "serviceaccounts/token", Some("netprobe"));
    let before = api.requests().len();
    let out = netprobe(&scratch.0, &[&failures[..], &["--as", sa]].concat());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(api.token_requests().len(), 2);
    let seen = &api.requests()[before..];
    assert!(
        seen.iter().any(
            |s| s.target.contains("/serviceaccounts/netprobe-tracer/token?")
                && s.impersonate.as_deref() == Some(sa)
        ),
        "{seen:?}"
    );

    // Without --as: no impersonation, and the kubeconfig's own token (no TokenRequest).
    let before = api.requests().len();
    let out = netprobe(&scratch.0, &failures);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(api.token_requests().len(), 2);
    assert!(
        api.requests()[before..]
            .iter()
            .all(|s| s.impersonate.is_none())
    );
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
        ["GET /api/v1/namespaces/netprobe/pods"]
    );
}
