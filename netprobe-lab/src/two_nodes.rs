//! S1 across nodes: two lab nodes joined by an [`Underlay`], the S1 client on the first and the
//! Seldon scheduler on the second, kube-proxy's DNAT for the scheduler's ClusterIP on the
//! client's node, a netprobe agent per node (like the DaemonSet), and the Kubernetes API
//! stand-in serving both nodes' pods and port-forwarding to each agent. Shared by the
//! privileged tests and `cargo xtask demo`.

use std::{
    io::Read,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{
    Connect, Lab, Pod,
    kubeapi::{FakeKube, Kind, endpoint_slice, pod, service},
    ports,
    process::{Agent, wait_output},
    rules,
    underlay::{NODE_IPS, Overlay, Underlay},
};

pub const NODES: [&str; 2] = ["node-a", "node-b"];
pub const CLIENT_IP: &str = "10.42.0.5";
pub const SERVER_IP: &str = "10.42.1.7";

/// The agent DaemonSet's pod on `node`, as the API lists it.
pub fn agent_pod(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "netprobe", "uid": format!("0a0a0a0a-0000-4000-8000-00000000000{}", name.len()),
                     "labels": {"app.kubernetes.io/name": "netprobe"}},
        "spec": {"nodeName": node, "hostNetwork": true, "containers": [{"name": "agent", "image": "netprobe"}]},
        "status": {"phase": "Running", "podIP": "192.0.2.1"},
    })
}

pub struct TwoNodes {
    pub labs: [Lab; 2],
    pub client: Pod,
    pub server: Pod,
    pub underlay: Underlay,
    pub kube: FakeKube,
    kubeconfig: PathBuf,
    agents: Vec<Agent>,
    /// What the client node's agent wrote (NDJSON).
    pub agent_out: Arc<Mutex<String>>,
    /// The agents' loopback port (the same on both nodes, as a DaemonSet has it).
    pub port: u16,
}

/// What `netprobe trace --cluster` printed, and what the client got meanwhile.
pub struct ClusterTrace {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// The client's first connect while the trace ran.
    pub client: Connect,
}

impl TwoNodes {
    /// Builds the nodes and starts an agent (`netprobe` at `bin`) on each.
    pub fn new(tag: &str, overlay: Overlay, bin: &Path) -> Result<Self> {
        let mut a = Lab::new(&format!("{tag}a"))?;
        let mut b = Lab::new(&format!("{tag}b"))?;
        let client = a.add_pod("financial-inference", "client-0", CLIENT_IP.parse()?)?;
        let server = b.add_pod(
            "financial-inference",
            "seldon-scheduler-0",
            SERVER_IP.parse()?,
        )?;
        let underlay = Underlay::connect(&a, "10.42.0.0/24", &b, "10.42.1.0/24", overlay)?;
        crate::serve(b.listen(&server.netns, format!("{SERVER_IP}:9004").parse()?)?);
        rules::restore(&a, "iptables-restore", &rules::kube_proxy_dnat(SERVER_IP))?;

        // The API stand-in lives on the first node's underlay address: both nodes reach it.
        let kube = FakeKube::start(a.listen(a.node(), format!("{}:0", NODE_IPS[0]).parse()?)?);
        let kubeconfig = std::env::temp_dir().join(format!(
            "netprobe-two-nodes-kubeconfig-{}-{tag}",
            std::process::id()
        ));
        std::fs::write(
            &kubeconfig,
            kube.kubeconfig()
                .replace("http://127.0.0.1:", &format!("http://{}:", NODE_IPS[0])),
        )?;
        // The CLI runs as nobody.
        std::fs::set_permissions(
            &kubeconfig,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )?;
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

        // Free on the first node; the second's loopback has nothing bound yet.
        let port = ports::free_tcp(a.node())?;
        let mut nodes = Self {
            labs: [a, b],
            client,
            server,
            underlay,
            kube,
            kubeconfig,
            agents: Vec::new(),
            agent_out: Arc::new(Mutex::new(String::new())),
            port,
        };
        for i in 0..2 {
            nodes.start_agent(i, bin)?;
        }
        Ok(nodes)
    }

    fn start_agent(&mut self, i: usize, bin: &Path) -> Result<()> {
        let (lab, node) = (&self.labs[i], NODES[i]);
        let name = format!("netprobe-{node}");
        self.kube.apply(Kind::Pod, agent_pod(&name, node));
        let mut agent = Agent::start_on(bin, lab.node(), self.port, |s| {
            s.env("KUBECONFIG", &self.kubeconfig)
                .env("NODE_NAME", node)
                .stdout(if i == 0 {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
        })
        .with_context(|| format!("the agent on {node}"))?;
        // The client node's always-on NDJSON, read as it comes (a full pipe would stall it).
        if let Some(mut stdout) = agent.proc.child().stdout.take() {
            let out = self.agent_out.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stdout.read(&mut buf) {
                    out.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        self.agents.push(agent);
        let ns = lab.node().to_string();
        // The kubelet's part of a port-forward to a hostNetwork pod: the node's loopback.
        self.kube.port_forward("netprobe", &name, move |p| {
            crate::in_netns(&ns, || TcpStream::connect(("127.0.0.1", p)))
                .map_err(std::io::Error::other)?
        });
        Ok(())
    }

    /// `bin` as nobody on the first node ("the laptop", which cannot load eBPF or enter
    /// namespaces), with the API stand-in's kubeconfig; output piped.
    pub fn laptop(&self, bin: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.labs[0].node()])
            .args([
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ])
            .arg(bin)
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("NODE_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// `netprobe trace --cluster … --count 1 -o <output>` as nobody on the first node ("the
    /// laptop"), while the client pod dials the Service every second (3 s connect timeout, like
    /// a Go dialer with a short timeout).
    pub fn trace(&self, bin: &Path, output: &str) -> Result<ClusterTrace> {
        let child = self
            .laptop(bin)
            .args([
                "trace",
                "--cluster",
                // Through the agents' port-forward until they answer Trace objects (#24).
                "--via-agent",
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
                output,
            ])
            .spawn()
            .context("start netprobe trace --cluster")?;
        let waited = std::thread::spawn(move || wait_output(child, Duration::from_secs(90)));
        let ns = self.client.netns.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let traffic = std::thread::spawn(move || {
            let mut first = None;
            while !stop2.load(Ordering::Relaxed) {
                let r = crate::in_netns(&ns, || {
                    TcpStream::connect_timeout(
                        &format!("{}:9004", rules::CLUSTER_IP).parse().expect("addr"),
                        Duration::from_secs(3),
                    )
                });
                if let Ok(r) = r {
                    first.get_or_insert(Connect::of(r));
                }
                std::thread::sleep(Duration::from_millis(1000));
            }
            first.unwrap_or(Connect::Other(0))
        });
        let finished = waited.join().expect("waiter")?;
        stop.store(true, Ordering::Relaxed);
        let client = traffic.join().unwrap_or(Connect::Other(0));
        Ok(ClusterTrace {
            code: finished.code(),
            stdout: finished.stdout,
            stderr: finished.stderr,
            client,
        })
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        for a in self.agents.drain(..) {
            let stopped = a.stop();
            if std::thread::panicking() {
                match stopped {
                    Ok(f) => eprintln!("agent {}:\n{}", f.status, f.stderr),
                    Err(e) => eprintln!("agent: {e:#}"),
                }
            }
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}
