//! The cross-node plan: when the traced pod dials a destination whose pods run on other nodes
//! (TCP, or UDP: with `--dns`, the cluster DNS Service's CoreDNS pods), the agents of those
//! nodes trace the server pods too (started first, so "never arrived" is
//! only said of attempts they watched), and each attempt's two verdicts are joined
//! ([`crate::verdict::join`]).

use std::{io::Write, net::IpAddr, time::Duration};

use k8s_openapi::api::{core::v1::Pod, discovery::v1::EndpointSlice};
use kube::{Api, api::ListParams};
use tokio::sync::mpsc;

use super::{
    client::{Forwarder, Options, find_agent, kube_err, node_of, session},
    protocol::{Frame, TraceRequest},
};
use crate::{
    enrich::pods::Backend,
    error::{Error, Result},
    sinks::{Format, Printer, Summary},
    verdict::{Verdict, join},
};

/// Longest wait for the server nodes' traces to start, and to finish after a stop.
const PEER_WAIT: Duration = Duration::from_secs(30);
/// Server nodes traced at most per cross-node trace (each loads probes on its node).
const MAX_PEER_NODES: usize = 3;

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
pub(super) struct Plan {
    /// The client pod's node and its agent.
    node: String,
    agent: String,
    /// The server pods' other nodes.
    peers: Vec<Peer>,
    /// Every backend of the destination is on another node.
    all_remote: bool,
    /// The destination the client dials (`--addr`, or the cluster DNS Service's ClusterIP).
    dialed: IpAddr,
}

/// The plan when `--addr` leads to pods on other nodes with agents; `None`: one node traces.
pub(super) async fn plan(
    client: &kube::Client,
    opts: &Options,
    node: &str,
    agent: &str,
    stderr: &mut dyn Write,
) -> Option<Plan> {
    let r = &opts.request;
    if r.events {
        return None;
    }
    let addr = match r.addr {
        Some(a) => a,
        None if r.udp && r.port == netprobe_common::DNS_PORT => {
            cluster_dns(client, node, stderr).await?
        }
        None => return None,
    };
    let found = match backends(client, addr, r.port).await {
        Ok(found) => found,
        Err(e) => {
            let _ = writeln!(
                stderr,
                "netprobe: WARNING: cannot find where {addr} leads ({e}); tracing node {node} alone"
            );
            return None;
        }
    };
    let all_remote = found.iter().all(|b| b.node != node);
    let mut peers: Vec<Peer> = Vec::new();
    for b in found.into_iter().filter(|b| b.node != node) {
        if let Some(p) = peers.iter_mut().find(|p| p.node == b.node) {
            p.ips.push(b.ip);
            continue;
        }
        if peers.len() == MAX_PEER_NODES {
            continue;
        }
        match find_agent(client, &opts.agent_namespace, &b.node).await {
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
    (!peers.is_empty()).then(|| Plan {
        node: node.into(),
        agent: agent.into(),
        peers,
        all_remote,
        dialed: addr,
    })
}

/// The Service a pod's DNS lookups go to (its resolv.conf names the ClusterIP of
/// `kube-system/kube-dns`, the name every mainstream install gives CoreDNS's Service).
const CLUSTER_DNS: (&str, &str) = ("kube-system", "kube-dns");

/// The cluster DNS Service's ClusterIP, which `--dns` lookups dial; `None` (with a warning)
/// when it cannot be read.
async fn cluster_dns(client: &kube::Client, node: &str, stderr: &mut dyn Write) -> Option<IpAddr> {
    use k8s_openapi::api::core::v1::Service;
    let (ns, name) = CLUSTER_DNS;
    let found = Api::<Service>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(kube_err(format!("reading Service {ns}/{name}")));
    let ip = match &found {
        Ok(s) => s
            .as_ref()
            .and_then(|s| s.spec.as_ref()?.cluster_ip.as_ref()?.parse().ok()),
        Err(_) => None,
    };
    if ip.is_none() {
        let why = found.err().map_or("no ClusterIP".into(), |e| e.to_string());
        let _ = writeln!(
            stderr,
            "netprobe: WARNING: cannot find the cluster DNS Service {ns}/{name} ({why}); tracing node {node} alone"
        );
    }
    ip
}

/// The pods behind `addr:port`: a Service's ready endpoints (by ClusterIP), or the pod with that
/// IP. The objects are listed here; the resolution is the inventory's
/// ([`crate::enrich::pods::backends`]).
async fn backends(client: &kube::Client, addr: IpAddr, port: u16) -> Result<Vec<Backend>> {
    use k8s_openapi::api::core::v1::Service;
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(kube_err("listing Services".into()))?
        .items;
    let ip = addr.to_string();
    let (slices, pods) = match crate::enrich::pods::service_at_ip(&services, addr) {
        Some((ns, name)) => {
            let slices = Api::<EndpointSlice>::namespaced(client.clone(), &ns)
                .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
                .await
                .map_err(kube_err(format!("listing EndpointSlices of {ns}/{name}")))?
                .items;
            (slices, Vec::new())
        }
        None => {
            let pods = Api::<Pod>::all(client.clone())
                .list(&ListParams::default().fields(&format!("status.podIP={ip}")))
                .await
                .map_err(kube_err(format!("looking up the pod with IP {ip}")))?
                .items;
            (Vec::new(), pods)
        }
    };
    let mut found = crate::enrich::pods::backends(&services, &slices, &pods, addr, port);
    // A slice endpoint without its node: the pod knows it.
    for b in found.iter_mut().filter(|b| b.node.is_empty()) {
        let (ns, name) = b.pod.split_once('/').unwrap_or_default();
        b.node = Api::<Pod>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(kube_err(format!("reading pod {}", b.pod)))?
            .as_ref()
            .and_then(node_of)
            .unwrap_or_default();
    }
    found.retain(|b| !b.node.is_empty());
    Ok(found)
}

/// Frames of all traces of a cross-node trace, by trace (0: the client's node, i: peer i-1).
type Frames = mpsc::UnboundedSender<(usize, Frame)>;

/// Runs one trace's session in the background; the returned sender stops it (also if dropped).
fn spawn_session(
    i: usize,
    req: TraceRequest,
    token: String,
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    tx: &Frames,
) -> tokio::sync::oneshot::Sender<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let tx = tx.clone();
    tokio::spawn(async move {
        let stop = async {
            let _ = stop_rx.await;
        };
        let r = session(stream, &req, &token, |f| drop(tx.send((i, f))), stop).await;
        let code = r.unwrap_or_else(|e| {
            let message = e.to_string();
            let _ = tx.send((i, Frame::Error { message }));
            2
        });
        let _ = tx.send((i, Frame::Exit { code }));
    });
    stop_tx
}

/// What a server node traces: its backend pod, all of it (joined on this side).
fn peer_request(p: &Peer, client: &TraceRequest) -> TraceRequest {
    TraceRequest {
        port: p.port,
        udp: client.udp,
        pod: p.pod.clone(),
        duration: client.duration,
        no_rule_trace: client.no_rule_trace,
        ..Default::default()
    }
}

/// The state of a cross-node trace while it runs.
struct Run<'a, W: Write> {
    node: String,
    peers: Vec<Peer>,
    all_remote: bool,
    /// The destination the client dialled.
    dialed: Option<IpAddr>,
    printer: Printer<W>,
    stderr: &'a mut dyn Write,
    /// Client-node verdicts waiting for their server node's side.
    held: Vec<(usize, Verdict)>,
    summary: Option<Box<Summary>>,
}

/// Traces the server nodes first, then the client's node; joins each attempt's verdicts.
pub(super) async fn run(
    opts: &Options,
    plan: Plan,
    forwarder: &Forwarder,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<i32> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Frame)>();
    let mut forwards = Vec::new();
    let mut stops = Vec::new();
    for (i, p) in plan.peers.iter().enumerate() {
        let (pf, stream) = forwarder.open(&p.agent).await?;
        forwards.push(pf);
        stops.push(spawn_session(
            i + 1,
            peer_request(p, &opts.request),
            forwarder.token.clone(),
            stream,
            &tx,
        ));
    }
    let mut run = Run {
        node: plan.node,
        peers: plan.peers,
        all_remote: plan.all_remote,
        dialed: Some(plan.dialed),
        printer: Printer::new(stdout, opts.format),
        stderr,
        held: Vec::new(),
        summary: None,
    };
    run.wait_for_peers(&mut rx).await;
    // Then the client's node. Its addr filter would hide the SYN after DNAT: the verdicts are
    // matched to the destination here instead.
    let req = TraceRequest {
        addr: None,
        ..opts.request.clone()
    };
    let (pf, stream) = forwarder.open(&plan.agent).await?;
    forwards.push(pf);
    // The client node's trace ends by itself (duration, --count); only the servers' are
    // stopped. (Dropping a stop sender would stop its trace: this one is kept to the end.)
    let _client_stop = spawn_session(0, req, forwarder.token.clone(), stream, &tx);
    let code = run.client_node(&mut rx).await?;
    // Stop the server nodes' traces; their last verdicts (attempts still open) come back.
    for s in stops {
        let _ = s.send(());
    }
    run.finish(&mut rx, opts.format).await?;
    for pf in forwards {
        pf.abort();
    }
    Ok(code)
}

fn output_err(e: std::io::Error) -> Error {
    Error::io("writing the trace output", e)
}

impl<W: Write> Run<'_, W> {
    /// Until every server node's trace is ready (or gave up).
    async fn wait_for_peers(&mut self, rx: &mut mpsc::UnboundedReceiver<(usize, Frame)>) {
        let deadline = tokio::time::Instant::now() + PEER_WAIT;
        while self.peers.iter().any(|p| p.state == PeerState::Starting) {
            let Ok(Some((i, f))) = tokio::time::timeout_at(deadline, rx.recv()).await else {
                for p in self
                    .peers
                    .iter_mut()
                    .filter(|p| p.state == PeerState::Starting)
                {
                    let _ = writeln!(
                        self.stderr,
                        "netprobe: WARNING: the trace on node {} did not start in time; judging from node {} alone",
                        p.node, self.node
                    );
                    p.state = PeerState::Ended(2);
                }
                return;
            };
            if i > 0 {
                on_peer_frame(&mut self.peers[i - 1], f, self.stderr);
            }
        }
    }

    /// Relays the client node's trace until it exits; returns its exit code.
    async fn client_node(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<(usize, Frame)>,
    ) -> Result<i32> {
        while let Some((i, f)) = rx.recv().await {
            if i > 0 {
                on_peer_frame(&mut self.peers[i - 1], f, self.stderr);
                continue;
            }
            match f {
                Frame::Log { line } => {
                    let _ = writeln!(self.stderr, "{line}");
                }
                Frame::Error { message } => {
                    let _ = writeln!(self.stderr, "netprobe: agent: {message}");
                }
                Frame::Exit { code } => return Ok(code),
                Frame::Verdict { verdict } => self.client_verdict(*verdict)?,
                // The summary (the only other record of a verdict stream) comes last.
                Frame::Summary { summary } => self.summary = Some(summary),
                Frame::Ready {} | Frame::Event { .. } => {}
            }
        }
        Ok(2)
    }

    /// A verdict of the client's node: printed, joined with its server node's, or held until
    /// that node's side comes.
    fn client_verdict(&mut self, v: Verdict) -> Result<()> {
        let wanted = v.dialed.as_ref().map_or(v.server.addr, |d| d.addr);
        if self.dialed.is_some_and(|a| {
            a != wanted
                && a != v.server.addr
                && !self.peers.iter().any(|p| p.ips.contains(&v.server.addr))
        }) {
            return Ok(());
        }
        let Some(pi) = peer_of(&self.peers, &v, self.dialed, self.all_remote) else {
            return self.printer.verdict(&v).map_err(output_err);
        };
        match find_verdict(&self.peers[pi], &v) {
            Some(s) => {
                let j = join(v, &self.node, Some(&s), &self.peers[pi].node);
                self.printer.verdict(&j).map_err(output_err)
            }
            None => {
                self.held.push((pi, v));
                Ok(())
            }
        }
    }

    /// Waits for the stopped server nodes, joins the held verdicts, prints the summary.
    async fn finish(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<(usize, Frame)>,
        format: Format,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + PEER_WAIT;
        while self
            .peers
            .iter()
            .any(|p| !matches!(p.state, PeerState::Ended(_)))
        {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((i, f))) if i > 0 => on_peer_frame(&mut self.peers[i - 1], f, self.stderr),
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        for (pi, v) in std::mem::take(&mut self.held) {
            let out = self.join_held(pi, v);
            self.printer.verdict(&out).map_err(output_err)?;
        }
        let Some(s) = self.summary.take() else {
            return Ok(());
        };
        match format {
            Format::Json => self.printer.summary(&s),
            Format::Text => {
                let servers: Vec<&str> = self.peers.iter().map(|p| p.node.as_str()).collect();
                self.printer.raw_line(&format!(
                    "-- {} attempts ({} failed) seen from node {}; server node(s): {}",
                    s.attempts,
                    s.failed,
                    self.node,
                    servers.join(", ")
                ))
            }
        }
        .map_err(output_err)
    }

    /// A held verdict joined with what its server node saw, once that node's trace ended.
    fn join_held(&mut self, pi: usize, v: Verdict) -> Verdict {
        let p = &self.peers[pi];
        match (find_verdict(p, &v), p.state) {
            (Some(s), _) => join(v, &self.node, Some(&s), &p.node),
            // Only a trace that ran to its end can say "never arrived".
            (None, PeerState::Ended(0 | 1 | 3)) => join(v, &self.node, None, &p.node),
            (None, state) => {
                let _ = writeln!(
                    self.stderr,
                    "netprobe: WARNING: the trace on node {} {}; this attempt is judged from node {} alone",
                    p.node,
                    match state {
                        PeerState::Ended(c) => format!("failed (exit {c})"),
                        _ => "did not end in time".into(),
                    },
                    self.node
                );
                v
            }
        }
    }
}

fn on_peer_frame(p: &mut Peer, f: Frame, stderr: &mut dyn Write) {
    match f {
        Frame::Ready {} if p.state == PeerState::Starting => p.state = PeerState::Ready,
        Frame::Log { line } => {
            let _ = writeln!(stderr, "[{}] {line}", p.node);
        }
        Frame::Error { message } => {
            let _ = writeln!(stderr, "[{}] netprobe: agent: {message}", p.node);
            if message.contains("answered 403") {
                let _ = writeln!(
                    stderr,
                    "netprobe: you may not trace pod {} on node {}: the verdicts below are the client side's only",
                    p.pod, p.node
                );
            }
        }
        Frame::Verdict { verdict } => p.verdicts.push(*verdict),
        Frame::Exit { code } => p.state = PeerState::Ended(code),
        Frame::Ready {} | Frame::Event { .. } | Frame::Summary { .. } => {}
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
