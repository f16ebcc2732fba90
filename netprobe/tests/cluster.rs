//! Privileged test of cluster-mode trace: an unprivileged CLI ("the laptop") finds the pod's node
//! through the Kubernetes API stand-in, opens a real `pods/portforward` WebSocket (kube-rs) to
//! that node's agent, and the agent runs the trace in the node and streams the verdict back.

use std::{net::TcpStream, time::Duration};

mod support;

use netprobe_lab::{
    Lab,
    kubeapi::{FakeKube, Kind, pod},
};
use serde_json::{Value, json};

const NODE: &str = "lab-node";

fn agent_pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "netprobe", "uid": "0a0a0a0a-0000-4000-8000-000000000001",
                     "labels": {"app.kubernetes.io/name": "netprobe"}},
        "spec": {"nodeName": NODE, "hostNetwork": true, "containers": [{"name": "agent", "image": "netprobe"}]},
        "status": {"phase": "Running", "podIP": "192.0.2.1"},
    })
}

/// Runs the CLI as nobody (it cannot load eBPF or enter namespaces: all work happens in the
/// agent) in the node namespace, where the API stand-in listens.
fn cli(lab: &Lab, kubeconfig: &str, args: &[&str]) -> std::process::Child {
    cli_as(
        lab,
        kubeconfig,
        env!("CARGO_BIN_EXE_netprobe").as_ref(),
        args,
    )
}

fn cli_as(
    lab: &Lab,
    kubeconfig: &str,
    program: &std::path::Path,
    args: &[&str],
) -> std::process::Child {
    support::laptop(lab.node(), kubeconfig, program)
        .args(args)
        .spawn()
        .unwrap()
}

/// Waits for the CLI at most `limit` (then kills it): (exit code or -1, stdout, stderr).
fn wait(cli: std::process::Child, limit: Duration) -> (i32, String, String) {
    let out = netprobe_lab::process::wait_output(cli, limit).unwrap();
    (out.code(), out.stdout, out.stderr)
}

#[test]
fn cluster_mode_trace_runs_on_the_pods_node_through_a_port_forward_to_its_agent() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("cluster").unwrap();
    let p = lab
        .add_pod("financial-ml", "mlserver-0", "10.42.0.10".parse().unwrap())
        .unwrap();
    let _l = lab
        .listen(&p.netns, "127.0.0.1:9000".parse().unwrap())
        .unwrap();
    let kube = FakeKube::start(
        lab.listen(lab.node(), "127.0.0.1:0".parse().unwrap())
            .unwrap(),
    );
    let kubeconfig = std::env::temp_dir().join(format!(
        "netprobe-cluster-kubeconfig-{}",
        std::process::id()
    ));
    std::fs::write(&kubeconfig, kube.kubeconfig()).unwrap();
    // The CLI runs as nobody.
    std::fs::set_permissions(
        &kubeconfig,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let kc = kubeconfig.to_str().unwrap().to_string();
    kube.apply(
        Kind::Pod,
        pod(
            "financial-ml",
            "mlserver-0",
            NODE,
            "10.42.0.10",
            &[("mlserver", "3a3a3a3a3a3a3a3a", &[9500])],
        ),
    );
    kube.apply(Kind::Pod, agent_pod("netprobe-x1"));

    // The agent, in the node namespace, on loopback only.
    let agent = support::start_agent(
        lab.node(),
        &[],
        &[("KUBECONFIG", &kc), ("NODE_NAME", NODE)],
        false,
    );
    let port = agent.port;
    // The kubelet's part of a port-forward to a hostNetwork pod: the node's loopback.
    let node = lab.node().to_string();
    kube.port_forward("netprobe", "netprobe-x1", move |p| {
        netprobe_lab::in_netns(&node, || TcpStream::connect(("127.0.0.1", p)))
            .map_err(std::io::Error::other)?
    });

    // Another user on the node, without a token, cannot start a trace through the loopback
    // port (401: the agent asks for a bearer token; it answered 403 by socket owner before).
    let direct = lab
        .sh(
            lab.node(),
            &format!(
                "setpriv --reuid=65534 --regid=65534 --clear-groups python3 -c \"import socket; s=socket.create_connection(('127.0.0.1',{port})); s.sendall(b'GET /v1/trace?port=9500&pod=financial-ml/mlserver-0 HTTP/1.1\\r\\n\\r\\n'); print(s.recv(200))\""
            ),
        )
        .unwrap();
    assert!(direct.contains("401 Unauthorized"), "{direct}");

    let trace = cli(
        &lab,
        &kc,
        &[
            "trace",
            "--cluster",
            "--via-agent",
            "--agent-port",
            &port.to_string(),
            "--pod",
            "mlserver-0",
            "-n",
            "financial-ml",
            "--port",
            "9500",
            "--duration",
            "20s",
            "--count",
            "1",
            "-o",
            "json",
        ],
    );
    // The mlserver container's connection attempts, until the remote trace has seen one.
    let ns = p.netns.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let traffic = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = netprobe_lab::in_netns(&ns, || {
                TcpStream::connect_timeout(
                    &"127.0.0.1:9500".parse().unwrap(),
                    Duration::from_millis(300),
                )
            });
            std::thread::sleep(Duration::from_millis(400));
        }
    });
    let (code, stdout, stderr) = wait(trace, Duration::from_secs(40));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.join().unwrap();
    assert_eq!(
        code, 1,
        "a diagnosed failure is exit 1:\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("runs on node lab-node; tracing through agent netprobe/netprobe-x1"),
        "{stderr}"
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let v = lines
        .iter()
        .find(|l| l["kind"] == "verdict")
        .unwrap_or_else(|| panic!("no verdict:\n{stdout}\n{stderr}"));
    assert_eq!(v["outcome"], "refused_no_listener", "{v:#}");
    assert_eq!(v["server"]["peer"]["pod"], "mlserver-0", "{v:#}");
    assert!(
        v["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["port"] == 9000),
        "the pod's listeners, listed on its node: {v:#}"
    );
    assert!(
        kube.forwarded()
            .contains(&("netprobe".into(), "netprobe-x1".into(), port)),
        "went through pods/portforward: {:?}",
        kube.forwarded()
    );

    // Clear errors, exit 2: unknown pod (asked as `kubectl netprobe`, which is cluster mode
    // without --cluster); a node without an agent.
    let plugin_dir = std::env::temp_dir().join(format!("netprobe-plugin-{}", std::process::id()));
    std::fs::create_dir_all(&plugin_dir).unwrap();
    let plugin = plugin_dir.join("kubectl-netprobe");
    let _ = std::fs::remove_file(&plugin);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_netprobe"), &plugin).unwrap();
    let (code, _, err) = wait(
        cli_as(
            &lab,
            &kc,
            &plugin,
            &[
                "trace",
                "--via-agent",
                "--pod",
                "nope-0",
                "-n",
                "financial-ml",
                "--port",
                "1",
            ],
        ),
        Duration::from_secs(20),
    );
    let _ = std::fs::remove_dir_all(&plugin_dir);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("pod `nope-0` in namespace `financial-ml`"),
        "{err}"
    );
    kube.delete(Kind::Pod, "netprobe", "netprobe-x1");
    let (code, _, err) = wait(
        cli(
            &lab,
            &kc,
            &[
                "trace",
                "--cluster",
                "--via-agent",
                "--pod",
                "mlserver-0",
                "-n",
                "financial-ml",
                "--port",
                "1",
            ],
        ),
        Duration::from_secs(20),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no running netprobe agent on node lab-node"),
        "{err}"
    );

    // SIGTERM: the agent and its traces leave no trace table behind.
    let out = support::stop(agent);
    let (st, err) = (out.status, out.stderr);
    assert!(st.success(), "agent exit {st}: {err}");
    let tables = lab.sh(lab.node(), "nft list tables").unwrap();
    assert!(!tables.contains("netprobe"), "{tables}");
    let _ = std::fs::remove_file(kubeconfig);
}
