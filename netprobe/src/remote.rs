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

use crate::error::{Error, Result};

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
                // The client closed the connection: stop the trace cleanly.
                n = rd.read(&mut probe) => {
                    if matches!(n, Ok(0) | Err(_)) { gone = true; break; }
                    continue;
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

/// SIGINT (the trace removes its table and programs), then SIGKILL after 5 s.
async fn stop_child(child: &mut &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGINT) };
    }
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

/// Runs a trace on the pod's node through its agent; returns the node-side exit code.
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
    let kube_err = |what: String| {
        move |e: kube::Error| Error::Kube {
            what,
            reason: e.to_string(),
        }
    };
    let pod = Api::<Pod>::namespaced(client.clone(), &namespace)
        .get_opt(&opts.pod)
        .await
        .map_err(kube_err(format!("reading pod {namespace}/{}", opts.pod)))?
        .ok_or_else(|| Error::UnknownPod {
            namespace: Some(namespace.clone()),
            name: opts.pod.clone(),
        })?;
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or_else(|| Error::Kube {
            what: format!("pod {namespace}/{}", opts.pod),
            reason: "not scheduled on a node yet".into(),
        })?;
    let agents = Api::<Pod>::namespaced(client.clone(), &opts.agent_namespace);
    let list = agents
        .list(
            &ListParams::default()
                .labels(AGENT_LABEL)
                .fields(&format!("spec.nodeName={node}")),
        )
        .await
        .map_err(kube_err(format!(
            "listing netprobe agents in namespace {}",
            opts.agent_namespace
        )))?;
    let agent = list
        .items
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()))
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .and_then(|p| p.metadata.name.clone())
        .ok_or_else(|| Error::NoAgent {
            node: node.clone(),
            namespace: opts.agent_namespace.clone(),
        })?;
    opts.request.pod = format!("{namespace}/{}", opts.pod);
    let _ = writeln!(
        stderr,
        "netprobe: pod {namespace}/{} runs on node {node}; tracing through agent {}/{agent}",
        opts.pod, opts.agent_namespace
    );
    let mut pf = agents
        .portforward(&agent, &[opts.agent_port])
        .await
        .map_err(kube_err(format!(
            "port-forward to agent {}/{agent}",
            opts.agent_namespace
        )))?;
    let stream = pf.take_stream(opts.agent_port).expect("requested port");
    let code = exchange(stream, &opts.request, stdout, stderr).await;
    pf.abort();
    code
}

/// Sends the request over `stream` and relays the agent's frames; returns the exit code.
pub async fn exchange(
    stream: impl AsyncRead + AsyncWrite + Unpin,
    req: &TraceRequest,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
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
    let mut line = String::new();
    loop {
        line.clear();
        let n = stream
            .read_line(&mut line)
            .await
            .map_err(io("reading the agent's stream"))?;
        if n == 0 {
            return Err(Error::Remote {
                reason: "the agent closed the stream before the trace ended".into(),
            });
        }
        let frame: Frame = serde_json::from_str(line.trim_end()).map_err(|e| Error::Remote {
            reason: format!("unreadable record from the agent: {e}"),
        })?;
        let w = match frame {
            Frame::Stdout(l) => writeln!(stdout, "{l}").and_then(|_| stdout.flush()),
            Frame::Stderr(l) => writeln!(stderr, "{l}"),
            Frame::Exit(c) => return Ok(c),
        };
        w.map_err(io("writing the trace output"))?;
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
