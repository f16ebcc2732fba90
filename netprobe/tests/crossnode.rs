//! Privileged tests of the cross-node trace: two node namespaces joined by an underlay (plain
//! routes, or Flannel-style VXLAN), a pod on each, an agent per node, and the Kubernetes API
//! stand-in serving both nodes' pods and port-forwarding to each agent. The CLI ("the laptop",
//! unprivileged) asks both agents and joins what they saw of each attempt.

use std::{
    net::TcpStream,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

mod support;

use netprobe_lab::{
    Lab, Pod,
    kubeapi::{FakeKube, Kind, endpoint_slice, pod, service},
    rules,
    underlay::{NODE_IPS, Overlay, Underlay},
};
use serde_json::{Value, json};

const NODES: [&str; 2] = ["node-a", "node-b"];
const CLIENT_IP: &str = "10.42.0.5";
const SERVER_IP: &str = "10.42.1.7";

fn agent_pod(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "netprobe", "uid": format!("0a0a0a0a-0000-4000-8000-00000000000{}", name.len()),
                     "labels": {"app.kubernetes.io/name": "netprobe"}},
        "spec": {"nodeName": node, "hostNetwork": true, "containers": [{"name": "agent", "image": "netprobe"}]},
        "status": {"phase": "Running", "podIP": "192.0.2.1"},
    })
}

/// Two nodes, the S1 client on the first and the Seldon scheduler on the second, an agent on
/// each, kube-proxy's DNAT for the scheduler's ClusterIP on the client's node.
struct TwoNodes {
    labs: [Lab; 2],
    server: Pod,
    client: Pod,
    underlay: Underlay,
    kube: FakeKube,
    kubeconfig: std::path::PathBuf,
    agents: Vec<Child>,
    /// What the client node's agent wrote (NDJSON).
    agent_out: Arc<std::sync::Mutex<String>>,
    port: u16,
}

impl TwoNodes {
    fn new(tag: &str, overlay: Overlay) -> Self {
        netprobe_lab::require_root();
        let mut a = Lab::new(&format!("{tag}a")).unwrap();
        let mut b = Lab::new(&format!("{tag}b")).unwrap();
        let client = a
            .add_pod(
                "financial-inference",
                "client-0",
                CLIENT_IP.parse().unwrap(),
            )
            .unwrap();
        let server = b
            .add_pod(
                "financial-inference",
                "seldon-scheduler-0",
                SERVER_IP.parse().unwrap(),
            )
            .unwrap();
        let underlay = Underlay::connect(&a, "10.42.0.0/24", &b, "10.42.1.0/24", overlay).unwrap();
        netprobe_lab::serve(
            b.listen(&server.netns, format!("{SERVER_IP}:9004").parse().unwrap())
                .unwrap(),
        );
        rules::restore(&a, "iptables-restore", &rules::kube_proxy_dnat(SERVER_IP)).unwrap();

        // The API stand-in lives on the first node's underlay address: both nodes reach it.
        let kube = FakeKube::start(
            a.listen(a.node(), format!("{}:0", NODE_IPS[0]).parse().unwrap())
                .unwrap(),
        );
        let kubeconfig = std::env::temp_dir().join(format!(
            "netprobe-crossnode-kubeconfig-{}-{tag}",
            std::process::id()
        ));
        std::fs::write(
            &kubeconfig,
            kube.kubeconfig()
                .replace("http://127.0.0.1:", &format!("http://{}:", NODE_IPS[0])),
        )
        .unwrap();
        std::fs::set_permissions(
            &kubeconfig,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        kube.apply(
            Kind::Pod,
            pod(
                "financial-inference",
                "client-0",
                NODES[0],
                CLIENT_IP,
                &[("main", "1b1b1b1b1b1b1b1b", &[])],
            ),
        );
        kube.apply(
            Kind::Pod,
            pod(
                "financial-inference",
                "seldon-scheduler-0",
                NODES[1],
                SERVER_IP,
                &[("scheduler", "2c2c2c2c2c2c2c2c", &[9004, 9005])],
            ),
        );
        kube.apply(
            Kind::Service,
            service(
                "financial-inference",
                "seldon-scheduler",
                rules::CLUSTER_IP,
                &[("xds", 9004, 9004)],
            ),
        );
        let mut slice = endpoint_slice(
            "financial-inference",
            "seldon-scheduler",
            &[(SERVER_IP, "seldon-scheduler-0")],
            &[("xds", 9004)],
        );
        slice["endpoints"][0]["nodeName"] = json!(NODES[1]);
        kube.apply(Kind::EndpointSlice, slice);
        // One agent per node, same loopback port (separate namespaces), as a DaemonSet runs.
        let port = 22000 + (std::process::id() % 20000) as u16;
        let kc = kubeconfig.to_str().unwrap().to_string();
        let mut agents = Vec::new();
        let agent_out = Arc::new(std::sync::Mutex::new(String::new()));
        for (lab, node) in [(&a, NODES[0]), (&b, NODES[1])] {
            let name = format!("netprobe-{node}");
            kube.apply(Kind::Pod, agent_pod(&name, node));
            let mut agent = support::start_agent(
                lab.node(),
                port,
                &[],
                &[("KUBECONFIG", &kc), ("NODE_NAME", node)],
                node == NODES[0],
            );
            // The client node's always-on NDJSON, read as it comes (a full pipe would stall it).
            if let Some(mut stdout) = agent.stdout.take() {
                let out = agent_out.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = std::io::Read::read(&mut stdout, &mut buf) {
                        out.lock()
                            .unwrap()
                            .push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                });
            }
            agents.push(agent);
            let ns = lab.node().to_string();
            kube.port_forward("netprobe", &name, move |p| {
                netprobe_lab::in_netns(&ns, || TcpStream::connect(("127.0.0.1", p)))
                    .map_err(std::io::Error::other)?
            });
        }
        Self {
            labs: [a, b],
            server,
            client,
            underlay,
            kube,
            kubeconfig,
            agents,
            agent_out,
            port,
        }
    }

    /// `netprobe trace --cluster` as nobody on the first node, while the client pod dials the
    /// Service every second (3 s connect timeout, like a Go dialer with a short timeout).
    fn trace(&self) -> (i32, Vec<Value>, String) {
        let child = Command::new("ip")
            .args(["netns", "exec", self.labs[0].node()])
            .args([
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ])
            .arg(env!("CARGO_BIN_EXE_netprobe"))
            .args([
                "trace",
                "--cluster",
                "--agent-port",
                &self.port.to_string(),
                "--pod",
                "client-0",
                "-n",
                "financial-inference",
                "--port",
                "9004",
                "--addr",
                rules::CLUSTER_IP,
                "--duration",
                "40s",
                "--count",
                "1",
                "-o",
                "json",
            ])
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("NODE_NAME")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let ns = self.client.netns.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let traffic = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let _ = netprobe_lab::in_netns(&ns, || {
                    TcpStream::connect_timeout(
                        &format!("{}:9004", rules::CLUSTER_IP).parse().unwrap(),
                        Duration::from_secs(3),
                    )
                });
                std::thread::sleep(Duration::from_millis(1000));
            }
        });
        let (code, stdout, stderr) = support::wait_output(child, Duration::from_secs(90));
        stop.store(true, Ordering::Relaxed);
        traffic.join().unwrap();
        let records: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{stderr}")))
            .collect();
        support::assert_schema_valid(&records);
        (code, records, stderr)
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        for a in &mut self.agents {
            // SAFETY: plain kill(2) on our child.
            unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
            let status = a.wait();
            if std::thread::panicking() {
                let mut err = String::new();
                if let Some(mut e) = a.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                eprintln!("agent {status:?}:\n{err}");
            }
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn verdict<'a>(records: &'a [Value], stderr: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["kind"] == "verdict")
        .unwrap_or_else(|| panic!("no verdict: {records:#?}\n{stderr}"))
}

#[test]
fn cross_node_syn_dropped_by_calico_on_the_server_node_names_both_pods_and_the_rule() {
    let lab = TwoNodes::new("xdrop", Overlay::Routed);
    // Calico on the scheduler's node admits 9005 only.
    let b = &lab.labs[1];
    rules::restore(
        b,
        "iptables-restore",
        &rules::calico_filter(&lab.server.host_if, "cali00000000000"),
    )
    .unwrap();
    let (code, records, stderr) = lab.trace();
    assert_eq!(
        code, 1,
        "a diagnosed failure is exit 1:\n{records:#?}\n{stderr}"
    );
    assert!(
        stderr.contains("leads to pod financial-inference/seldon-scheduler-0 on node node-b"),
        "{stderr}"
    );
    let v = verdict(&records, &stderr);
    assert_eq!(v["outcome"], "dropped_by_rule", "{v:#}\n{stderr}");
    assert_eq!(v["client"]["peer"]["pod"], "client-0", "{v:#}");
    assert_eq!(v["server"]["peer"]["pod"], "seldon-scheduler-0", "{v:#}");
    assert_eq!(v["dialed"]["addr"], rules::CLUSTER_IP, "{v:#}");
    let nf = &v["netfilter"];
    assert_eq!(
        nf["chain"],
        format!("cali-tw-{}", lab.server.host_if),
        "{v:#}"
    );
    assert!(
        nf["rule"]
            .as_str()
            .unwrap()
            .contains("Drop if no policies passed packet"),
        "{v:#}"
    );
    assert!(
        nf["owner"]["policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("scheduler-allow-xds")),
        "the Calico policy: {v:#}"
    );
    let x = &v["cross_node"];
    assert_eq!(x["client_node"], "node-a", "{v:#}");
    assert_eq!(x["server_node"], "node-b", "{v:#}");
    assert_eq!(x["arrived"], true, "{v:#}");
    assert_eq!(x["left_via"]["interface"], "eth0", "{v:#}");
    assert_eq!(x["arrived_via"]["interface"], "eth0", "{v:#}");
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.starts_with("The SYN left node node-a via eth0")
            && why.contains("arrived at node node-b via eth0"),
        "{why}"
    );
    assert!(
        kube_forwarded(&lab.kube).len() >= 2,
        "both agents asked: {:?}",
        lab.kube.forwarded()
    );
    // Nothing of either trace is left on either node.
    for l in &lab.labs {
        let tables = l.sh(l.node(), "nft list tables").unwrap();
        assert!(!tables.contains("netprobe"), "{tables}");
    }
}

fn kube_forwarded(kube: &FakeKube) -> Vec<String> {
    let mut agents: Vec<String> = kube.forwarded().into_iter().map(|(_, p, _)| p).collect();
    agents.sort();
    agents.dedup();
    agents
}

#[test]
fn cross_node_syn_lost_on_the_vxlan_underlay_is_left_a_never_reached_b() {
    let lab = TwoNodes::new("xlost", Overlay::Vxlan);
    // First the path works: the same trace says connected (so the test can fail both ways).
    let (code, records, stderr) = lab.trace();
    let v = verdict(&records, &stderr);
    assert_eq!(code, 0, "{v:#}\n{stderr}");
    assert_eq!(v["outcome"], "connected", "{v:#}");
    assert_eq!(v["cross_node"]["arrived"], true, "{v:#}");
    assert_eq!(
        v["cross_node"]["left_via"]["interface"], "flannel.1",
        "{v:#}"
    );

    // A firewall between the machines drops VXLAN: no node sees it.
    lab.underlay
        .block(
            &lab.labs[0],
            &format!("udp dport {}", netprobe_lab::underlay::VXLAN_PORT),
        )
        .unwrap();
    let (code, records, stderr) = lab.trace();
    assert_eq!(code, 1, "{records:#?}\n{stderr}");
    let v = verdict(&records, &stderr);
    assert_eq!(v["outcome"], "lost_between_nodes", "{v:#}\n{stderr}");
    let x = &v["cross_node"];
    assert_eq!(x["arrived"], false, "{v:#}");
    assert_eq!(x["left_via"]["interface"], "flannel.1", "{v:#}");
    let r = &v["route"];
    assert_eq!(r["dev"], "flannel.1", "{v:#}");
    assert_eq!(r["mtu"], 1450, "{v:#}");
    assert_eq!(r["encap"]["kind"], "vxlan", "{v:#}");
    assert_eq!(r["encap"]["vni"], 1, "{v:#}");
    assert_eq!(r["encap"]["port"], 8472, "{v:#}");
    assert_eq!(r["encap"]["underlay"], "eth0", "{v:#}");
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.contains("left node node-a via flannel.1")
            && why.contains("never arrived there")
            && why.contains("vxlan VNI 1, UDP 8472 over eth0"),
        "{why}"
    );
    assert!(
        v["next_steps"][0]
            .as_str()
            .unwrap()
            .contains("VXLAN (UDP 8472)"),
        "{v:#}"
    );
    assert_eq!(v["client"]["peer"]["pod"], "client-0", "{v:#}");
    // The client's node names the backend on the other node from its EndpointSlice.
    assert_eq!(v["server"]["peer"]["pod"], "seldon-scheduler-0", "{v:#}");

    // Always on: the client node's agent saw the SYN retransmits and, from its conntrack, that
    // they went to the scheduler pod on node-b.
    let (_, metrics) = support::http_get(lab.labs[0].node(), lab.port, "/metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("netprobe_syn_retransmits_total{dst_node=\"node-b\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap() >= 1,
        "{line}"
    );
    let out = lab.agent_out.lock().unwrap().clone();
    let events: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    support::assert_schema_valid(&events);
    let r = events
        .iter()
        .find(|e| e["kind"] == "retransmit" && e["dst"] == rules::CLUSTER_IP)
        .unwrap_or_else(|| panic!("no SYN retransmit to the Service:\n{out}"));
    assert_eq!(r["translated"]["dst"], SERVER_IP, "{r:#}");
    assert_eq!(
        r["translated"]["peer"]["pod"], "seldon-scheduler-0",
        "{r:#}"
    );
    assert_eq!(r["translated"]["peer"]["node"], "node-b", "{r:#}");
    assert_eq!(r["source"]["pod"], "client-0", "{r:#}");
}
