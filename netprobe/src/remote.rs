//! Cluster-mode trace: `netprobe trace --cluster --pod X` (or `kubectl netprobe trace --pod X`)
//! run from a laptop finds the pod's node through the API, opens a port-forward to that node's
//! agent (the agent is hostNetwork, so the port-forward lands on the node's loopback where the
//! agent listens) and asks it to run the trace; verdicts stream back as they happen.
//!
//! Who may trace is decided by RBAC (`create` on `pods/portforward` of the agent pods); on the
//! node the agent only accepts trace requests from root-owned sockets (the kubelet/containerd
//! side of a port-forward), never from other local users, and nothing listens on the node
//! network.
//!
//! The agent runs the node-side `netprobe trace` as a child process (its own probes, its own
//! temporary nftables table, cleaned up like any trace) and relays its output framed as NDJSON
//! records of schema `netprobe.remote/v1`: `{"stdout": line}`, `{"stderr": line}`, then
//! `{"exit": code}`.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::Semaphore,
};

use crate::{
    error::{Error, Result},
    verdict::{Verdict, join},
};

/// The agent's HTTP path for trace requests.
pub const TRACE_PATH: &str = "/v1/trace";
/// Longest trace an agent runs for a remote client.
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// Default duration of a remote trace when the client gives none.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(60);
/// Concurrent remote traces per agent (each loads its own probes).
pub const MAX_CONCURRENT: usize = 4;
/// Label of the agent pods (deploy/).
pub const AGENT_LABEL: &str = "app.kubernetes.io/name=netprobe";
/// Sent by a client on an open trace stream: end the trace now, but send its final verdicts.
pub const STOP: &[u8] = b"stop\n";
/// Longest wait for the server nodes' traces to start, and to finish after a stop.
const PEER_WAIT: Duration = Duration::from_secs(30);
/// Server nodes traced at most per cross-node trace (each loads probes on its node).
const MAX_PEER_NODES: usize = 3;

/// What a client asks an agent to trace; the node-side `netprobe trace` flags.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TraceRequest {
    pub port: u16,
    /// UDP (DNS at port 53) instead of TCP.
    pub udp: bool,
    /// NAMESPACE/NAME of the pod to trace.
    pub pod: String,
    pub addr: Option<IpAddr>,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub from_pod: Option<String>,
    pub events: bool,
    pub json: bool,
    pub no_rule_trace: bool,
}

fn encode(v: &str) -> String {
    let mut s = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

fn decode(v: &str) -> Result<String, String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = v.get(i + 1..i + 3).ok_or("truncated %-escape")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad %-escape")?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "query is not UTF-8".into())
}

impl TraceRequest {
    pub fn to_query(&self) -> String {
        let mut q = vec![
            format!("port={}", self.port),
            format!("pod={}", encode(&self.pod)),
        ];
        if let Some(a) = self.addr {
            q.push(format!("addr={}", encode(&a.to_string())));
        }
        if let Some(d) = self.duration {
            q.push(format!("duration_ms={}", d.as_millis()));
        }
        if let Some(c) = self.count {
            q.push(format!("count={c}"));
        }
        if let Some(f) = &self.from_pod {
            q.push(format!("from_pod={}", encode(f)));
        }
        for (flag, name) in [
            (self.events, "events"),
            (self.udp, "udp"),
            (self.json, "json"),
            (self.no_rule_trace, "no_rule_trace"),
        ] {
            if flag {
                q.push(format!("{name}=1"));
            }
        }
        q.join("&")
    }

    pub fn from_query(query: &str) -> Result<Self, String> {
        let mut r = Self::default();
        let mut port = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v)?;
            let bad = |what: &str| format!("invalid {what} `{v}`");
            match k {
                "port" => port = Some(v.parse().map_err(|_| bad("port"))?),
                "pod" => r.pod = v,
                "addr" => r.addr = Some(v.parse().map_err(|_| bad("addr"))?),
                "duration_ms" => {
                    let ms: u64 = v.parse().map_err(|_| bad("duration_ms"))?;
                    r.duration = Some(Duration::from_millis(ms));
                }
                "count" => r.count = Some(v.parse().map_err(|_| bad("count"))?),
                "from_pod" => r.from_pod = Some(v),
                "events" => r.events = v == "1",
                "udp" => r.udp = v == "1",
                "json" => r.json = v == "1",
                "no_rule_trace" => r.no_rule_trace = v == "1",
                other => return Err(format!("unknown parameter `{other}`")),
            }
        }
        r.port = port.ok_or("missing parameter `port`")?;
        let valid_name = |s: &str| {
            // DNS-1123: starts and ends alphanumeric, so never read as a flag.
            s.len() <= 253
                && s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.ends_with(|c: char| c.is_ascii_alphanumeric())
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
        };
        match r.pod.split_once('/') {
            Some((ns, name)) if valid_name(ns) && valid_name(name) => {}
            _ => return Err(format!("`pod` must be NAMESPACE/NAME, got `{}`", r.pod)),
        }
        if let Some(f) = &r.from_pod
            && !f.split('/').all(valid_name)
        {
            return Err(format!("invalid from_pod `{f}`"));
        }
        Ok(r)
    }

    /// The node-side command line (after the executable).
    pub fn argv(&self) -> Vec<String> {
        let (ns, name) = self.pod.split_once('/').unwrap_or(("default", &self.pod));
        let duration = self.duration.unwrap_or(DEFAULT_DURATION).min(MAX_DURATION);
        let mut a: Vec<String> = vec![
            "trace".into(),
            "--port".into(),
            self.port.to_string(),
            "--proto".into(),
            if self.udp { "udp" } else { "tcp" }.into(),
            "--pod".into(),
            name.into(),
            "-n".into(),
            ns.into(),
            "--duration".into(),
            format!("{}ms", duration.as_millis()),
            "-o".into(),
            if self.json { "json" } else { "text" }.into(),
        ];
        if let Some(x) = self.addr {
            a.extend(["--addr".into(), x.to_string()]);
        }
        if let Some(c) = self.count {
            a.extend(["--count".into(), c.to_string()]);
        }
        if let Some(f) = &self.from_pod {
            a.extend(["--from-pod".into(), f.clone()]);
        }
        if self.events {
            a.push("--events".into());
        }
        if self.no_rule_trace {
            a.push("--no-rule-trace".into());
        }
        a
    }
}

/// One record of the agent → client stream.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Frame {
    Stdout(String),
    Stderr(String),
    Exit(i32),
}

// ---------------------------------------------------------------------------------------------
// Agent side
// ---------------------------------------------------------------------------------------------

/// The owner uid of the local socket `local` connected to `remote`, from /proc/net/tcp{,6} of
/// this namespace.
pub fn socket_uid(local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let files: &[&str] = match local {
        SocketAddr::V4(_) => &["/proc/net/tcp", "/proc/net/tcp6"],
        SocketAddr::V6(_) => &["/proc/net/tcp6"],
    };
    files.iter().find_map(|f| {
        let text = std::fs::read_to_string(f).ok()?;
        find_uid(&text, local, remote)
    })
}

fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (a, p) = s.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let ip: IpAddr = match a.len() {
        // The address's bytes, printed as one host-order 32-bit word.
        8 => std::net::Ipv4Addr::from(u32::from_str_radix(a, 16).ok()?.to_ne_bytes()).into(),
        32 => {
            let mut b = [0u8; 16];
            for (i, chunk) in b.chunks_mut(4).enumerate() {
                let w = u32::from_str_radix(&a[i * 8..i * 8 + 8], 16).ok()?;
                // Each 32-bit word is printed in host order.
                chunk.copy_from_slice(&w.to_ne_bytes());
            }
            std::net::Ipv6Addr::from(b).to_canonical()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn find_uid(text: &str, local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let (local, remote) = (canonical(local), canonical(remote));
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let l = parse_proc_addr(f.get(1)?)?;
        let r = parse_proc_addr(f.get(2)?)?;
        (l == local && r == remote).then(|| f.get(7)?.parse().ok())?
    })
}

/// Shared state of the agent's trace endpoint.
#[derive(Clone)]
pub struct TraceServer {
    exe: PathBuf,
    slots: Arc<Semaphore>,
}

impl TraceServer {
    pub fn new() -> Result<Self> {
        let exe =
            std::env::current_exe().map_err(|e| Error::io("finding the netprobe executable", e))?;
        Ok(Self {
            exe,
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT)),
        })
    }

    /// Answers one `GET /v1/trace?…` on `sock` (request head already read).
    pub async fn serve(&self, mut sock: TcpStream, query: &str) {
        let reply = |code: u16, reason: &str, body: &str| {
            format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        };
        // Only root-owned peers: the kubelet/containerd end of a port-forward (RBAC-checked by
        // the API server), or root on the node. Other local users must not start traces.
        let peer_uid = match (sock.local_addr(), sock.peer_addr()) {
            (Ok(l), Ok(p)) => socket_uid(p, l),
            _ => None,
        };
        if peer_uid != Some(0) {
            let _ = sock
                .write_all(
                    reply(
                        403,
                        "Forbidden",
                        "traces are started through the Kubernetes API (pods/portforward) or by root on the node\n",
                    )
                    .as_bytes(),
                )
                .await;
            return;
        }
        let req = match TraceRequest::from_query(query) {
            Ok(r) => r,
            Err(e) => {
                let _ = sock
                    .write_all(reply(400, "Bad Request", &format!("{e}\n")).as_bytes())
                    .await;
                return;
            }
        };
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            let _ = sock
                .write_all(
                    reply(
                        429,
                        "Too Many Requests",
                        &format!("{MAX_CONCURRENT} traces already run on this node\n"),
                    )
                    .as_bytes(),
                )
                .await;
            return;
        };
        log::info!("remote trace: {}", req.argv().join(" "));
        if let Err(e) = self.relay(&mut sock, &req).await {
            log::warn!("remote trace ended: {e}");
        }
    }

    async fn relay(&self, sock: &mut TcpStream, req: &TraceRequest) -> std::io::Result<()> {
        let mut child = tokio::process::Command::new(&self.exe);
        child
            .args(req.argv())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe. If the agent dies (even SIGKILL), the trace gets
        // SIGINT and removes its table and programs instead of running on as an orphan.
        unsafe {
            child.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = child.spawn();
        let head =
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n";
        sock.write_all(head.as_bytes()).await?;
        let mut child = match child.as_mut() {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("netprobe agent: cannot start the trace: {e}");
                write_frame(sock, &Frame::Stderr(msg)).await?;
                return write_frame(sock, &Frame::Exit(2)).await;
            }
        };
        let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut err = BufReader::new(child.stderr.take().expect("piped")).lines();
        let (mut out_open, mut err_open) = (true, true);
        let (mut rd, mut wr) = sock.split();
        let mut probe = [0u8; 64];
        let mut gone = false;
        let mut stopping = false;
        while out_open || err_open {
            let frame = tokio::select! {
                l = out.next_line(), if out_open => match l? {
                    Some(l) => Frame::Stdout(l),
                    None => { out_open = false; continue; }
                },
                l = err.next_line(), if err_open => match l? {
                    Some(l) => Frame::Stderr(l),
                    None => { err_open = false; continue; }
                },
                // The client closed the connection: stop the trace cleanly. A line from the
                // client ([`STOP`]) ends the trace too, but its last verdicts still come back.
                n = rd.read(&mut probe) => {
                    match n {
                        Ok(0) | Err(_) => { gone = true; break; }
                        Ok(n) => {
                            if !stopping && probe[..n].contains(&b'\n') {
                                stopping = true;
                                interrupt(child);
                            }
                            continue;
                        }
                    }
                }
            };
            if write_frame(&mut wr, &frame).await.is_err() {
                gone = true;
                break;
            }
        }
        if gone {
            stop_child(&mut child).await;
            return Ok(());
        }
        let status = child.wait().await?;
        let code = status.code().unwrap_or_else(|| {
            128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
        });
        write_frame(&mut wr, &Frame::Exit(code)).await?;
        wr.flush().await
    }
}

/// SIGINT: the trace prints what it has, removes its table and programs, and exits.
fn interrupt(child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own, not yet reaped child.
        unsafe { libc::kill(pid as i32, libc::SIGINT) };
    }
}

/// SIGINT (the trace removes its table and programs), then SIGKILL after 5 s.
async fn stop_child(child: &mut &mut tokio::process::Child) {
    interrupt(child);
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

async fn write_frame(w: &mut (impl AsyncWrite + Unpin), f: &Frame) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(f).expect("serializable");
    line.push(b'\n');
    w.write_all(&line).await
}

// ---------------------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------------------

pub struct RemoteOptions {
    pub pod: String,
    pub namespace: Option<String>,
    /// Namespace of the agent DaemonSet.
    pub agent_namespace: String,
    /// The agent's loopback port (its --metrics-addr).
    pub agent_port: u16,
    pub request: TraceRequest,
}

/// Runs a trace on the pod's node through its agent; returns the node-side exit code. When
/// `--addr` names a destination (a Service's ClusterIP or a pod IP) whose pods run on other
/// nodes, the agents of those nodes trace too and each attempt gets one joined verdict.
pub async fn run(
    mut opts: RemoteOptions,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<i32> {
    let client = crate::enrich::kube::client().await?;
    let namespace = opts
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let pod = Api::<Pod>::namespaced(client.clone(), &namespace)
        .get_opt(&opts.pod)
        .await
        .map_err(kube_err(format!("reading pod {namespace}/{}", opts.pod)))?
        .ok_or_else(|| Error::UnknownPod {
            namespace: Some(namespace.clone()),
            name: opts.pod.clone(),
        })?;
    let node = node_of(&pod).ok_or_else(|| Error::Kube {
        what: format!("pod {namespace}/{}", opts.pod),
        reason: "not scheduled on a node yet".into(),
    })?;
    let agent = find_agent(&client, &opts.agent_namespace, &node).await?;
    opts.request.pod = format!("{namespace}/{}", opts.pod);
    let _ = writeln!(
        stderr,
        "netprobe: pod {namespace}/{} runs on node {node}; tracing through agent {}/{agent}",
        opts.pod, opts.agent_namespace
    );
    let mut peers = Vec::new();
    let mut all_remote = false;
    // Cross-node joining follows TCP attempts (SYNs); UDP is traced on the client's node.
    if let (Some(addr), false, false) = (opts.request.addr, opts.request.events, opts.request.udp) {
        match backends(&client, addr, opts.request.port).await {
            Ok(found) => {
                all_remote = found.iter().all(|b| b.node != node);
                for b in found.into_iter().filter(|b| b.node != node) {
                    if let Some(p) = peers.iter_mut().find(|p: &&mut Peer| p.node == b.node) {
                        p.ips.push(b.ip);
                        continue;
                    }
                    if peers.len() == MAX_PEER_NODES {
                        continue;
                    }
                    match find_agent(&client, &opts.agent_namespace, &b.node).await {
                        Ok(agent) => {
                            let _ = writeln!(
                                stderr,
                                "netprobe: {addr} leads to pod {} on node {}; tracing there too through agent {}/{agent}",
                                b.pod, b.node, opts.agent_namespace
                            );
                            peers.push(Peer {
                                node: b.node,
                                agent,
                                pod: b.pod,
                                ips: vec![b.ip],
                                port: b.port,
                                state: PeerState::Starting,
                                verdicts: Vec::new(),
                            });
                        }
                        Err(e) => {
                            let _ = writeln!(
                                stderr,
                                "netprobe: WARNING: {e}; attempts to {} are judged from node {node} alone",
                                b.pod
                            );
                        }
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(
                    stderr,
                    "netprobe: WARNING: cannot find where {addr} leads ({e}); tracing node {node} alone"
                );
            }
        }
    }
    let agents = Api::<Pod>::namespaced(client.clone(), &opts.agent_namespace);
    let (agent_ns, agent_port) = (opts.agent_namespace.clone(), opts.agent_port);
    let forward = |agent: String| {
        let agents = agents.clone();
        let (ns, port) = (agent_ns.clone(), agent_port);
        async move {
            let mut pf = agents
                .portforward(&agent, &[port])
                .await
                .map_err(kube_err(format!("port-forward to agent {ns}/{agent}")))?;
            let stream = pf.take_stream(port).expect("requested port");
            Ok::<_, Error>((pf, stream))
        }
    };
    if peers.is_empty() {
        let (pf, stream) = forward(agent).await?;
        let code = exchange(stream, &opts.request, stdout, stderr).await;
        pf.abort();
        return code;
    }
    cross_node(
        opts,
        Plan {
            node,
            agent,
            peers,
            all_remote,
        },
        &forward,
        stdout,
        stderr,
    )
    .await
}

fn kube_err(what: String) -> impl FnOnce(kube::Error) -> Error {
    move |e: kube::Error| Error::Kube {
        what,
        reason: e.to_string(),
    }
}

fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref().and_then(|s| s.node_name.clone())
}

/// The Running agent pod on `node`.
async fn find_agent(client: &kube::Client, agent_namespace: &str, node: &str) -> Result<String> {
    let agents = Api::<Pod>::namespaced(client.clone(), agent_namespace);
    let list = agents
        .list(
            &ListParams::default()
                .labels(AGENT_LABEL)
                .fields(&format!("spec.nodeName={node}")),
        )
        .await
        .map_err(kube_err(format!(
            "listing netprobe agents in namespace {agent_namespace}"
        )))?;
    list.items
        .iter()
        .filter(|p| node_of(p).as_deref() == Some(node))
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .and_then(|p| p.metadata.name.clone())
        .ok_or_else(|| Error::NoAgent {
            node: node.into(),
            namespace: agent_namespace.into(),
        })
}

/// A pod behind a destination address.
#[derive(Debug, Clone, PartialEq)]
struct Backend {
    /// NAMESPACE/NAME.
    pod: String,
    node: String,
    ip: IpAddr,
    /// The port the pod receives on (a Service's targetPort).
    port: u16,
}

/// The pods behind `addr:port`: a Service's ready endpoints (by ClusterIP), or the pod with that
/// IP.
async fn backends(client: &kube::Client, addr: IpAddr, port: u16) -> Result<Vec<Backend>> {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    let ip = addr.to_string();
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(kube_err("listing Services".into()))?;
    let service = services.items.into_iter().find(|s| {
        s.spec.as_ref().is_some_and(|sp| {
            sp.cluster_ip.as_deref() == Some(ip.as_str())
                || sp.cluster_ips.iter().flatten().any(|c| c == &ip)
        })
    });
    let mut out = Vec::new();
    if let Some(svc) = service {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let sport = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .and_then(|ps| ps.iter().find(|p| p.port == i32::from(port)).cloned());
        let slices = Api::<EndpointSlice>::namespaced(client.clone(), &ns)
            .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
            .await
            .map_err(kube_err(format!("listing EndpointSlices of {ns}/{name}")))?;
        for slice in slices.items {
            // The slice's port of the Service port (same name), else the targetPort number.
            let target = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name == sport.as_ref().and_then(|s| s.name.clone()))
                .and_then(|p| p.port)
                .or_else(
                    || match sport.as_ref().and_then(|s| s.target_port.as_ref()) {
                        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                            Some(*n)
                        }
                        _ => None,
                    },
                )
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(port);
            for ep in slice.endpoints {
                let Some(r) = ep.target_ref.filter(|r| r.kind.as_deref() == Some("Pod")) else {
                    continue;
                };
                let (Some(pod_ns), Some(pod_name)) = (r.namespace.or(Some(ns.clone())), r.name)
                else {
                    continue;
                };
                let node = match ep.node_name {
                    Some(n) => Some(n),
                    None => Api::<Pod>::namespaced(client.clone(), &pod_ns)
                        .get_opt(&pod_name)
                        .await
                        .map_err(kube_err(format!("reading pod {pod_ns}/{pod_name}")))?
                        .as_ref()
                        .and_then(node_of),
                };
                let (Some(node), Some(ip)) = (
                    node,
                    ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()),
                ) else {
                    continue;
                };
                out.push(Backend {
                    pod: format!("{pod_ns}/{pod_name}"),
                    node,
                    ip,
                    port: target,
                });
            }
        }
        return Ok(out);
    }
    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields(&format!("status.podIP={ip}")))
        .await
        .map_err(kube_err(format!("looking up the pod with IP {ip}")))?;
    for p in pods.items {
        let host_network = p
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        if host_network || p.status.as_ref().and_then(|s| s.pod_ip.as_deref()) != Some(ip.as_str())
        {
            continue;
        }
        if let (Some(node), Some(ns), Some(name)) = (
            node_of(&p),
            p.metadata.namespace.clone(),
            p.metadata.name.clone(),
        ) {
            out.push(Backend {
                pod: format!("{ns}/{name}"),
                node,
                ip: addr,
                port,
            });
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PeerState {
    Starting,
    Ready,
    /// Ended with this exit code (after a stop, or by itself).
    Ended(i32),
}

/// A server node traced for a cross-node trace.
struct Peer {
    node: String,
    agent: String,
    /// The backend pod traced there (NAMESPACE/NAME).
    pod: String,
    ips: Vec<IpAddr>,
    port: u16,
    state: PeerState,
    verdicts: Vec<Verdict>,
}

/// Who traces what in a cross-node trace.
struct Plan {
    /// The client pod's node and its agent.
    node: String,
    agent: String,
    /// The server pods' other nodes.
    peers: Vec<Peer>,
    /// Every backend of the destination is on another node.
    all_remote: bool,
}

/// What the node-side trace prints once its probes are attached (trace.rs).
const READY_LINE: &str = "netprobe: waiting for connections";

/// Traces the server nodes first, then the client's node; joins each attempt's verdicts.
async fn cross_node<F, Fut, S>(
    opts: RemoteOptions,
    plan: Plan,
    forward: &F,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<i32>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<(kube::api::Portforwarder, S)>>,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use crate::sinks::{Format, Printer};
    let Plan {
        node,
        agent,
        mut peers,
        all_remote,
    } = plan;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Frame)>();
    let mut forwards = Vec::new();
    let mut stops = Vec::new();
    let spawn = |i: usize, req: TraceRequest, stream: S| {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let tx = tx.clone();
        tokio::spawn(async move {
            let r = session(
                stream,
                &req,
                |f| {
                    let _ = tx.send((i, f));
                },
                async {
                    let _ = stop_rx.await;
                },
            )
            .await;
            let code = r.unwrap_or_else(|e| {
                let _ = tx.send((i, Frame::Stderr(format!("netprobe: {e}"))));
                2
            });
            let _ = tx.send((i, Frame::Exit(code)));
        });
        stop_tx
    };
    // Server nodes first: "never arrived" is only said of attempts made while they watched.
    for (i, p) in peers.iter().enumerate() {
        let req = TraceRequest {
            port: p.port,
            pod: p.pod.clone(),
            addr: None,
            duration: opts.request.duration,
            count: None,
            from_pod: None,
            events: false,
            json: true,
            no_rule_trace: opts.request.no_rule_trace,
            udp: false,
        };
        let (pf, stream) = forward(p.agent.clone()).await?;
        forwards.push(pf);
        stops.push(spawn(i + 1, req, stream));
    }
    let deadline = tokio::time::Instant::now() + PEER_WAIT;
    while peers.iter().any(|p| p.state == PeerState::Starting) {
        let Ok(Some((i, f))) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            for p in peers.iter_mut().filter(|p| p.state == PeerState::Starting) {
                let _ = writeln!(
                    stderr,
                    "netprobe: WARNING: the trace on node {} did not start in time; judging from node {node} alone",
                    p.node
                );
                p.state = PeerState::Ended(2);
            }
            break;
        };
        on_peer_frame(&mut peers[i - 1], f, stderr);
    }
    // Then the client's node. Its addr filter would hide the SYN after DNAT: the verdicts are
    // matched to the destination here instead.
    let mut req = opts.request.clone();
    req.json = true;
    req.addr = None;
    let (pf, stream) = forward(agent).await?;
    forwards.push(pf);
    // The client node's trace ends by itself (duration, --count); only the servers' are
    // stopped. (Dropping a stop sender would stop its trace: this one is kept to the end.)
    let _client_stop = spawn(0, req, stream);
    let format = if opts.request.json {
        Format::Json
    } else {
        Format::Text
    };
    let mut printer = Printer::new(stdout, format);
    let mut held: Vec<(usize, Verdict)> = Vec::new();
    let mut summary = None;
    let mut code = None;
    let io = |e| Error::io("writing the trace output", e);
    while code.is_none() {
        let Some((i, f)) = rx.recv().await else { break };
        if i > 0 {
            on_peer_frame(&mut peers[i - 1], f, stderr);
            continue;
        }
        match f {
            Frame::Stderr(l) => {
                let _ = writeln!(stderr, "{l}");
            }
            Frame::Exit(c) => code = Some(c),
            Frame::Stdout(l) => match serde_json::from_str::<Verdict>(&l) {
                Ok(v) => {
                    let wanted = v.dialed.as_ref().map_or(v.server.addr, |d| d.addr);
                    if opts.request.addr.is_some_and(|a| {
                        a != wanted
                            && a != v.server.addr
                            && !peers.iter().any(|p| p.ips.contains(&v.server.addr))
                    }) {
                        continue;
                    }
                    let Some(pi) = peer_of(&peers, &v, opts.request.addr, all_remote) else {
                        printer.verdict(&v).map_err(io)?;
                        continue;
                    };
                    match find_verdict(&peers[pi], &v) {
                        Some(s) => {
                            let j = join(v, &node, Some(&s), &peers[pi].node);
                            printer.verdict(&j).map_err(io)?;
                        }
                        None => held.push((pi, v)),
                    }
                }
                // The summary (the only other record of a verdict stream) comes last.
                Err(_) => summary = serde_json::from_str::<serde_json::Value>(&l).ok(),
            },
        }
    }
    // Stop the server nodes' traces; their last verdicts (attempts still open) come back.
    for s in stops {
        let _ = s.send(());
    }
    let deadline = tokio::time::Instant::now() + PEER_WAIT;
    while peers
        .iter()
        .any(|p| !matches!(p.state, PeerState::Ended(_)))
    {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((i, f))) if i > 0 => on_peer_frame(&mut peers[i - 1], f, stderr),
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    for (pi, v) in held {
        let p = &peers[pi];
        let out = match (find_verdict(p, &v), p.state) {
            (Some(s), _) => join(v, &node, Some(&s), &p.node),
            // Only a trace that ran to its end can say "never arrived".
            (None, PeerState::Ended(0 | 1 | 3)) => join(v, &node, None, &p.node),
            (None, state) => {
                let _ = writeln!(
                    stderr,
                    "netprobe: WARNING: the trace on node {} {}; this attempt is judged from node {node} alone",
                    p.node,
                    match state {
                        PeerState::Ended(c) => format!("failed (exit {c})"),
                        _ => "did not end in time".into(),
                    }
                );
                v
            }
        };
        printer.verdict(&out).map_err(io)?;
    }
    if let Some(s) = summary {
        match format {
            Format::Json => printer.raw_line(&s.to_string()).map_err(io)?,
            Format::Text => printer
                .raw_line(&format!(
                    "-- {} attempts ({} failed) seen from node {node}; server node(s): {}",
                    s["attempts"],
                    s["failed"],
                    peers
                        .iter()
                        .map(|p| p.node.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .map_err(io)?,
        }
    }
    for pf in forwards {
        pf.abort();
    }
    Ok(code.unwrap_or(2))
}

fn on_peer_frame(p: &mut Peer, f: Frame, stderr: &mut dyn Write) {
    match f {
        Frame::Stderr(l) => {
            if p.state == PeerState::Starting && l.starts_with(READY_LINE) {
                p.state = PeerState::Ready;
            }
            let _ = writeln!(stderr, "[{}] {l}", p.node);
        }
        Frame::Stdout(l) => {
            if let Ok(v) = serde_json::from_str::<Verdict>(&l) {
                p.verdicts.push(v);
            }
        }
        Frame::Exit(c) => p.state = PeerState::Ended(c),
    }
}

/// The server node an attempt went to (by its address after DNAT; the only one if unsure).
fn peer_of(peers: &[Peer], v: &Verdict, dialed: Option<IpAddr>, all_remote: bool) -> Option<usize> {
    peers
        .iter()
        .position(|p| p.ips.contains(&v.server.addr))
        // No DNAT seen (the SYN never got past the ClusterIP here): only sure if every backend
        // is on that one other node.
        .or_else(|| (all_remote && peers.len() == 1 && Some(v.server.addr) == dialed).then_some(0))
}

/// The server node's verdict of the same attempt: the client's address and port survive DNAT.
fn find_verdict(p: &Peer, v: &Verdict) -> Option<Verdict> {
    p.verdicts
        .iter()
        .find(|s| s.client.addr == v.client.addr && s.client.port == v.client.port)
        .cloned()
}

/// Sends the request over `stream` and relays the agent's frames; returns the exit code.
pub async fn exchange(
    stream: impl AsyncRead + AsyncWrite + Unpin,
    req: &TraceRequest,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<i32> {
    let mut failed = None;
    let code = session(
        stream,
        req,
        |f| {
            let w = match f {
                Frame::Stdout(l) => writeln!(stdout, "{l}").and_then(|_| stdout.flush()),
                Frame::Stderr(l) => writeln!(stderr, "{l}"),
                Frame::Exit(_) => Ok(()),
            };
            if let Err(e) = w {
                failed.get_or_insert(e);
            }
        },
        std::future::pending(),
    )
    .await?;
    match failed {
        Some(e) => Err(Error::io("writing the trace output", e)),
        None => Ok(code),
    }
}

/// Sends the request over `stream` and hands each frame to `on_frame` until the exit frame;
/// when `stop` completes, asks the agent to end the trace (its final output still comes).
pub async fn session(
    stream: impl AsyncRead + AsyncWrite + Unpin,
    req: &TraceRequest,
    mut on_frame: impl FnMut(Frame),
    stop: impl std::future::Future<Output = ()>,
) -> Result<i32> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e| Error::io(what, e)
    };
    let mut stream = BufReader::new(stream);
    let head = format!(
        "GET {TRACE_PATH}?{} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        req.to_query()
    );
    stream
        .get_mut()
        .write_all(head.as_bytes())
        .await
        .map_err(io("sending the trace request to the agent"))?;
    let mut status = String::new();
    stream
        .read_line(&mut status)
        .await
        .map_err(io("reading the agent's answer"))?;
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Error::Remote {
            reason: format!("not an HTTP answer: {:?}", status.trim()),
        })?;
    loop {
        let mut h = String::new();
        let n = stream
            .read_line(&mut h)
            .await
            .map_err(io("reading the agent's answer"))?;
        if n == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    if code != 200 {
        let mut body = String::new();
        let _ = stream.read_to_string(&mut body).await;
        return Err(Error::Remote {
            reason: format!("agent answered {code}: {}", body.trim()),
        });
    }
    let mut stop = std::pin::pin!(stop);
    let mut stopped = false;
    let mut line = String::new();
    loop {
        // read_line keeps what it read before a stop interrupted it: `line` is cleared only
        // after a whole line.
        let n = tokio::select! {
            n = stream.read_line(&mut line) => n.map_err(io("reading the agent's stream"))?,
            _ = &mut stop, if !stopped => {
                stopped = true;
                stream
                    .get_mut()
                    .write_all(STOP)
                    .await
                    .map_err(io("asking the agent to stop the trace"))?;
                continue;
            }
        };
        if n == 0 {
            return Err(Error::Remote {
                reason: "the agent closed the stream before the trace ended".into(),
            });
        }
        let frame: Frame = serde_json::from_str(line.trim_end()).map_err(|e| Error::Remote {
            reason: format!("unreadable record from the agent: {e}"),
        })?;
        line.clear();
        if let Frame::Exit(c) = frame {
            return Ok(c);
        }
        on_frame(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_the_query() {
        let r = TraceRequest {
            port: 9500,
            udp: true,
            pod: "financial-ml/mlserver-0".into(),
            addr: Some("10.43.51.131".parse().unwrap()),
            duration: Some(Duration::from_millis(1500)),
            count: Some(1),
            from_pod: Some("financial-inference/client-0".into()),
            events: false,
            json: true,
            no_rule_trace: true,
        };
        assert_eq!(TraceRequest::from_query(&r.to_query()).unwrap(), r);
        let argv = r.argv().join(" ");
        assert!(
            argv.starts_with(
                "trace --port 9500 --proto udp --pod mlserver-0 -n financial-ml --duration 1500ms -o json"
            ),
            "{argv}"
        );
        assert!(
            argv.ends_with("--count 1 --from-pod financial-inference/client-0 --no-rule-trace")
        );
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        assert!(
            TraceRequest::from_query("pod=a/b")
                .unwrap_err()
                .contains("port")
        );
        assert!(
            TraceRequest::from_query("port=1&pod=b")
                .unwrap_err()
                .contains("NAMESPACE/NAME")
        );
        // Names become argv: nothing that could be read as a flag or a path.
        assert!(TraceRequest::from_query("port=1&pod=a/--netns").is_err());
        assert!(TraceRequest::from_query("port=1&pod=a/b&from_pod=..%2Fx%20y").is_err());
        assert!(TraceRequest::from_query("port=1&pod=a/b&shell=1").is_err());
        assert!(TraceRequest::from_query("port=99999&pod=a/b").is_err());
    }

    #[test]
    fn durations_are_capped() {
        let mut r = TraceRequest::from_query("port=1&pod=a/b").unwrap();
        assert!(r.argv().contains(&"60000ms".to_string()));
        r.duration = Some(Duration::from_secs(86400));
        assert!(r.argv().contains(&"600000ms".to_string()));
    }

    #[test]
    fn socket_owners_are_found_in_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:26ED 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:C350 0100007F:26ED 01 00000000:00000000 00:00000000 00000000  1000        0 2 1 0 20 4 30 10 -1\n\
   2: 0100007F:26ED 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1\n";
        let agent: SocketAddr = "127.0.0.1:9965".parse().unwrap();
        let peer: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        assert_eq!(find_uid(text, peer, agent), Some(1000));
        assert_eq!(find_uid(text, agent, peer), Some(0));
        assert_eq!(find_uid(text, "127.0.0.1:1".parse().unwrap(), agent), None);
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0000000000000000FFFF00000100007F:C350 0000000000000000FFFF00000100007F:26ED 01 00000000:00000000 00:00000000 00000000    65534        0 9 1 0 20 4 30 10 -1\n\
   1: 00000000000000000000000001000000:C351 00000000000000000000000001000000:26ED 01 00000000:00000000 00:00000000 00000000    7        0 9 1 0 20 4 30 10 -1\n";
        assert_eq!(find_uid(v6, peer, agent), Some(65534));
        assert_eq!(
            find_uid(
                v6,
                "[::1]:50001".parse().unwrap(),
                "[::1]:9965".parse().unwrap()
            ),
            Some(7)
        );
    }

    #[test]
    fn attempts_are_matched_to_the_server_node_by_their_backend_address() {
        let peer = Peer {
            node: "node-b".into(),
            agent: "netprobe-b".into(),
            pod: "ns/server-0".into(),
            ips: vec!["10.42.1.7".parse().unwrap()],
            port: 9004,
            state: PeerState::Ready,
            verdicts: Vec::new(),
        };
        let peers = [peer];
        let cluster_ip: IpAddr = "10.43.51.131".parse().unwrap();
        let mut v = crate::verdict::classify(
            &[],
            ("10.42.0.5".parse().unwrap(), 40000),
            &Default::default(),
            &Default::default(),
        );
        v.server.addr = "10.42.1.7".parse().unwrap();
        assert_eq!(peer_of(&peers, &v, Some(cluster_ip), false), Some(0));
        // A local backend is not the other node's business.
        v.server.addr = "10.42.0.9".parse().unwrap();
        assert_eq!(peer_of(&peers, &v, Some(cluster_ip), true), None);
        // Still the ClusterIP (no DNAT seen): the other node only if every backend is there.
        v.server.addr = cluster_ip;
        assert_eq!(peer_of(&peers, &v, Some(cluster_ip), true), Some(0));
        assert_eq!(peer_of(&peers, &v, Some(cluster_ip), false), None);
    }

    #[tokio::test]
    async fn frames_are_relayed_and_the_exit_code_returned() {
        let (client, mut agent) = tokio::io::duplex(4096);
        let req = TraceRequest::from_query("port=9500&pod=ns/p").unwrap();
        let server = tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            let n = agent.read(&mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            agent
                .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            for f in [
                Frame::Stderr("tracing".into()),
                Frame::Stdout("refused: nothing listens".into()),
                Frame::Exit(1),
            ] {
                write_frame(&mut agent, &f).await.unwrap();
            }
            head
        });
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = exchange(client, &req, &mut out, &mut err).await.unwrap();
        assert_eq!(code, 1);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "refused: nothing listens\n"
        );
        assert_eq!(String::from_utf8(err).unwrap(), "tracing\n");
        let head = server.await.unwrap();
        assert!(
            head.starts_with("GET /v1/trace?port=9500&pod=ns/p HTTP/1.1\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn an_agent_refusal_is_an_error_with_its_reason() {
        let (client, mut agent) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            let _ = agent.read(&mut buf).await.unwrap();
            agent
                .write_all(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 5\r\n\r\nbusy\n")
                .await
                .unwrap();
        });
        let req = TraceRequest::from_query("port=1&pod=a/b").unwrap();
        let e = exchange(client, &req, &mut Vec::new(), &mut Vec::new())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("429") && e.contains("busy"), "{e}");
    }
}
