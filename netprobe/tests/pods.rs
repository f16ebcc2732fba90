//! Privileged tests of the pod-aware trace: the real kube-rs client against a local HTTP server
//! speaking the Kubernetes API (the one allowed stand-in), real netns labs, processes in
//! kubelet-shaped cgroups.

mod support;

use std::{path::PathBuf, time::Duration};

use netprobe_lab::{
    Connect, Lab, Pod,
    kubeapi::{FakeKube, Kind, pod},
};
use serde_json::Value;
use support::{TraceOutput, start_verdict_trace_env};

const NODE: &str = "lab-node";

/// The API stand-in, listening inside the node namespace (where netprobe runs), and a
/// kubeconfig for it.
fn api(lab: &Lab) -> (FakeKube, PathBuf) {
    support::kube_api(lab)
}

fn publish(kube: &FakeKube, p: &Pod, containers: &[(&str, &str, &[u16])]) -> Value {
    let obj = pod(&p.namespace, &p.name, NODE, &p.ip.to_string(), containers);
    kube.apply(Kind::Pod, obj.clone());
    obj
}

fn verdicts(out: &TraceOutput) -> Vec<Value> {
    out.events
        .iter()
        .filter(|e| e["kind"] == "verdict")
        .cloned()
        .collect()
}

/// Done-when of the pod-aware issue: the S1 drop through the ClusterIP names the client pod,
/// the backend pod, the Service and the ClusterIP.
#[test]
fn s1_pod_trace_names_client_backend_service_and_cluster_ip() {
    let mut lab = Lab::new("pods1").unwrap();
    let client = lab
        .add_pod(
            "financial-inference",
            "client-0",
            "10.42.0.20".parse().unwrap(),
        )
        .unwrap();
    let server = lab
        .add_pod(
            "financial-inference",
            "seldon-scheduler-0",
            "10.42.0.30".parse().unwrap(),
        )
        .unwrap();
    let _l = lab
        .listen(&server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    support::s1_rules(&lab, &server, &client);
    let (kube, kubeconfig) = api(&lab);
    publish(&kube, &client, &[("client", "c0c0c0c0c0c0c0c0", &[])]);
    publish(
        &kube,
        &server,
        &[("scheduler", "5e5e5e5e5e5e5e5e", &[9004, 9005])],
    );
    support::publish_seldon_scheduler(&kube);

    let trace = start_verdict_trace_env(
        lab.node(),
        &[
            "--pod",
            "seldon-scheduler-0",
            "-n",
            "financial-inference",
            "--port",
            "9004",
            "--duration",
            "5s",
            "--node-name",
            NODE,
        ],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    assert_eq!(
        lab.connect(
            &client.netns,
            "10.43.51.131:9004".parse().unwrap(),
            Duration::from_secs(3)
        ),
        Connect::TimedOut
    );
    let out = trace.finish_with_code(1);
    let v = verdicts(&out);
    let v = v
        .first()
        .unwrap_or_else(|| panic!("no verdict:\n{}\n{}", out.dump(), out.stderr));
    assert_eq!(v["outcome"], "dropped_by_rule", "{v:#}");
    assert_eq!(v["client"]["peer"]["pod"], "client-0", "{v:#}");
    assert_eq!(v["client"]["peer"]["namespace"], "financial-inference");
    assert_eq!(v["server"]["peer"]["pod"], "seldon-scheduler-0", "{v:#}");
    assert_eq!(v["dialed"]["addr"], "10.43.51.131");
    assert_eq!(
        v["netfilter"]["owner"]["workload"], "financial-inference/seldon-scheduler-0",
        "{v:#}"
    );
    assert_eq!(
        v["dialed"]["peer"]["service"], "financial-inference/seldon-scheduler:xds",
        "{v:#}"
    );
    let _ = std::fs::remove_file(kubeconfig);
}

/// The cgroup v2 mount (hybrid hosts mount it at /sys/fs/cgroup/unified).
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let m = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .expect("a cgroup2 mount");
    PathBuf::from(m.split_whitespace().nth(1).unwrap())
}

/// S2 by pod name: the refused connect from container `agent` names pod and container and
/// lists what listens in the pod.
#[test]
fn s2_pod_trace_names_the_pod_the_container_and_the_listeners() {
    let mut lab = Lab::new("pods2").unwrap();
    let p = lab
        .add_pod("financial-ml", "mlserver-0", "10.42.0.10".parse().unwrap())
        .unwrap();
    let _l = lab
        .listen(&p.netns, "127.0.0.1:9000".parse().unwrap())
        .unwrap();
    let agent_id = "a9e17a9e17a9e17a9e17a9e17a9e17a9e17a9e17a9e17a9e17a9e17a9e17a9e1";
    let (kube, kubeconfig) = api(&lab);
    let obj = publish(
        &kube,
        &p,
        &[
            ("mlserver", "3a3a3a3a3a3a3a3a", &[9500]),
            ("agent", agent_id, &[]),
        ],
    );
    let uid = obj["metadata"]["uid"].as_str().unwrap().to_string();
    // The agent container: a process in the pod's netns, in a kubelet-shaped cgroup.
    let cg = cgroup2_root().join(format!("kubepods/besteffort/pod{uid}/{agent_id}"));
    std::fs::create_dir_all(&cg).unwrap();
    let trace = start_verdict_trace_env(
        lab.node(),
        &[
            "--pod",
            "mlserver-0",
            "-n",
            "financial-ml",
            "--port",
            "9500",
            "--duration",
            "8s",
            "--count",
            "1",
        ],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let pid = lab
        .spawn(&p.netns, &["python3", "-c", "import socket,time\ntime.sleep(1)\ntry:\n  socket.create_connection(('127.0.0.1',9500),2)\nexcept OSError: pass\ntime.sleep(1)"])
        .unwrap();
    std::fs::write(cg.join("cgroup.procs"), pid.to_string()).unwrap();
    let out = trace.finish_with_code(1);
    // Leave the cgroup before removing it (deepest first).
    let _ = std::fs::write(cgroup2_root().join("cgroup.procs"), pid.to_string());
    let _ = std::fs::remove_dir(&cg);
    let _ = std::fs::remove_dir(cg.parent().unwrap());
    let v = verdicts(&out);
    let v = v
        .first()
        .unwrap_or_else(|| panic!("no verdict:\n{}\n{}", out.dump(), out.stderr));
    assert_eq!(v["outcome"], "refused_no_listener", "{v:#}");
    assert_eq!(v["client"]["peer"]["pod"], "mlserver-0", "{v:#}");
    assert_eq!(v["client"]["peer"]["container"], "agent", "{v:#}");
    assert_eq!(v["server"]["peer"]["pod"], "mlserver-0");
    assert!(
        v["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["port"] == 9000),
        "{v:#}"
    );
    assert!(
        v["explanation"].as_str().unwrap().contains(
            "declares containerPort 9500 in container mlserver, but nothing listens on it"
        ),
        "{v:#}"
    );
    let _ = std::fs::remove_file(kubeconfig);
}

/// An unknown pod is a clear error, exit 2.
#[test]
fn unknown_pod_is_exit_2() {
    let lab = Lab::new("podunk").unwrap();
    let (_kube, kubeconfig) = api(&lab);
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            lab.node(),
            env!("CARGO_BIN_EXE_netprobe"),
            "trace",
            "--pod",
            "nope-0",
            "-n",
            "default",
            "--port",
            "1",
            "--duration",
            "1s",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pod `nope-0` in namespace `default` not found"),
        "{err}"
    );
    let _ = std::fs::remove_file(kubeconfig);
}

/// The API server going away and coming back does not kill the trace; names survive.
#[test]
fn api_server_outage_does_not_kill_the_trace() {
    let mut lab = Lab::new("podout").unwrap();
    let client = lab
        .add_pod("default", "client-0", "10.42.0.21".parse().unwrap())
        .unwrap();
    let server = lab
        .add_pod("default", "server-0", "10.42.0.31".parse().unwrap())
        .unwrap();
    netprobe_lab::serve(
        lab.listen(&server.netns, "10.42.0.31:9005".parse().unwrap())
            .unwrap(),
    );
    let (kube, kubeconfig) = api(&lab);
    publish(&kube, &client, &[("c", "c1c1c1c1c1c1c1c1", &[])]);
    publish(&kube, &server, &[("s", "d1d1d1d1d1d1d1d1", &[9005])]);
    let trace = start_verdict_trace_env(
        lab.node(),
        &["--port", "9005", "--duration", "6s"],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    kube.set_down(true);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        lab.connect(
            &client.netns,
            "10.42.0.31:9005".parse().unwrap(),
            Duration::from_secs(2)
        ),
        Connect::Connected
    );
    kube.set_down(false);
    let out = trace.finish_with_code(0);
    let v = verdicts(&out);
    let v = v
        .first()
        .unwrap_or_else(|| panic!("no verdict:\n{}\n{}", out.dump(), out.stderr));
    assert_eq!(v["outcome"], "connected");
    assert_eq!(
        v["client"]["peer"]["pod"], "client-0",
        "names from before the outage: {v:#}"
    );
    assert_eq!(v["server"]["peer"]["pod"], "server-0");
    let _ = std::fs::remove_file(kubeconfig);
}

/// A pod deleted and recreated with a new IP (new namespace, same name) is named within ~1 s.
#[test]
fn recreated_pod_with_a_new_ip_is_picked_up_within_a_second() {
    let mut lab = Lab::new("podnew").unwrap();
    let client = lab
        .add_pod("default", "client-0", "10.42.0.21".parse().unwrap())
        .unwrap();
    let server = lab
        .add_pod("default", "server-0", "10.42.0.31".parse().unwrap())
        .unwrap();
    netprobe_lab::serve(
        lab.listen(&server.netns, "10.42.0.31:9005".parse().unwrap())
            .unwrap(),
    );
    let (kube, kubeconfig) = api(&lab);
    publish(&kube, &client, &[("c", "c1c1c1c1c1c1c1c1", &[])]);
    publish(&kube, &server, &[("s", "d1d1d1d1d1d1d1d1", &[9005])]);
    let trace = start_verdict_trace_env(
        lab.node(),
        &["--port", "9005", "--duration", "6s", "--count", "1"],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    kube.delete(Kind::Pod, "default", "client-0");
    lab.remove_pod(&client).unwrap();
    let again = lab
        .add_pod("default", "client-0", "10.42.0.22".parse().unwrap())
        .unwrap();
    publish(&kube, &again, &[("c", "c2c2c2c2c2c2c2c2", &[])]);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        lab.connect(
            &again.netns,
            "10.42.0.31:9005".parse().unwrap(),
            Duration::from_secs(2)
        ),
        Connect::Connected
    );
    let out = trace.finish_with_code(0);
    let v = verdicts(&out);
    let v = v
        .first()
        .unwrap_or_else(|| panic!("no verdict:\n{}\n{}", out.dump(), out.stderr));
    assert_eq!(v["client"]["addr"], "10.42.0.22");
    assert_eq!(v["client"]["peer"]["pod"], "client-0", "{v:#}");
    assert_eq!(
        v["client"]["netns"],
        again.netns.as_str(),
        "the new namespace is traced: {v:#}"
    );
    let _ = std::fs::remove_file(kubeconfig);
}

/// `--from-pod` keeps only the attempts of that client pod.
#[test]
fn from_pod_keeps_only_that_clients_attempts() {
    let mut lab = Lab::new("podfrom").unwrap();
    let a = lab
        .add_pod("default", "a-0", "10.42.0.41".parse().unwrap())
        .unwrap();
    let b = lab
        .add_pod("default", "b-0", "10.42.0.42".parse().unwrap())
        .unwrap();
    let server = lab
        .add_pod("default", "server-0", "10.42.0.31".parse().unwrap())
        .unwrap();
    netprobe_lab::serve(
        lab.listen(&server.netns, "10.42.0.31:9005".parse().unwrap())
            .unwrap(),
    );
    let (kube, kubeconfig) = api(&lab);
    for (p, id) in [
        (&a, "a1a1a1a1a1a1a1a1"),
        (&b, "b1b1b1b1b1b1b1b1"),
        (&server, "d1d1d1d1d1d1d1d1"),
    ] {
        publish(&kube, p, &[("c", id, &[])]);
    }
    let trace = start_verdict_trace_env(
        lab.node(),
        &[
            "--port",
            "9005",
            "--from-pod",
            "default/b-0",
            "--duration",
            "6s",
            "--count",
            "1",
        ],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let to = "10.42.0.31:9005".parse().unwrap();
    assert_eq!(
        lab.connect(&a.netns, to, Duration::from_secs(2)),
        Connect::Connected
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        lab.connect(&b.netns, to, Duration::from_secs(2)),
        Connect::Connected
    );
    let out = trace.finish_with_code(0);
    let v = verdicts(&out);
    assert_eq!(v.len(), 1, "{}", out.dump());
    assert_eq!(v[0]["client"]["peer"]["pod"], "b-0", "{:#}", v[0]);
    let _ = std::fs::remove_file(kubeconfig);
}
