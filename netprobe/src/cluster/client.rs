//! The laptop's side: find the pod's node and that node's agent through the Kubernetes API,
//! port-forward to the agent, ask it to trace and render the frames it streams back.

use std::io::Write;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{
    Request, StatusCode,
    header::{AUTHORIZATION, CONNECTION, HOST, UPGRADE},
};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use super::{
    kubeconfig::{Clients, KubeOptions},
    protocol::{AGENT_LABEL, Frame, STOP, TRACE_PATH, TraceRequest},
};
use crate::{
    error::{Error, Result},
    sinks::{Format, Printer},
};

pub struct Options {
    pub pod: String,
    pub namespace: Option<String>,
    /// Namespace of the agent DaemonSet.
    pub agent_namespace: String,
    /// The agent's loopback port (its --metrics-addr).
    pub agent_port: u16,
    pub request: TraceRequest,
    /// How the laptop prints what the node saw.
    pub format: Format,
    /// Request the agents' token for this ServiceAccount (`--as-service-account`).
    pub service_account: Option<(String, String)>,
    /// How to reach the API server (kubectl's flags).
    pub kube: KubeOptions,
}

/// Runs a trace on the pod's node through its agent; returns the node-side exit code. When
/// `--addr` names a destination (a Service's ClusterIP or a pod IP) whose pods run on other
/// nodes, the agents of those nodes trace too and each attempt gets one joined verdict
/// ([`super::crossnode`]).
pub async fn run(mut opts: Options, stdout: &mut dyn Write, stderr: &mut dyn Write) -> Result<i32> {
    let service_account = super::token::agent_service_account(
        opts.kube.impersonate.as_deref(),
        opts.service_account.as_ref(),
    )?;
    let clients = opts.kube.clients().await?;
    let client = clients.api.clone();
    let namespace = opts
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let what = || format!("reading pod {namespace}/{}", opts.pod);
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let read = async { pods.get_opt(&opts.pod).await.map_err(kube_err(what())) };
    let pod = opts
        .kube
        .bounded(what, read)
        .await?
        .ok_or_else(|| Error::UnknownPod {
            namespace: Some(namespace.clone()),
            name: opts.pod.clone(),
        })?;
    let node = node_of(&pod).ok_or_else(|| Error::Kube {
        what: format!("pod {namespace}/{}", opts.pod),
        reason: "not scheduled on a node yet".into(),
    })?;
    let agent = opts
        .kube
        .bounded(
            || format!("finding the agent of node {node}"),
            find_agent(&client, &opts.agent_namespace, &node),
        )
        .await?;
    opts.request.pod = format!("{namespace}/{}", opts.pod);
    let _ = writeln!(
        stderr,
        "netprobe: pod {namespace}/{} runs on node {node}; tracing through agent {}/{agent}",
        opts.pod, opts.agent_namespace
    );
    let forwarder = Forwarder::new(&clients, &opts.kube, &opts.agent_namespace, opts.agent_port)
        .with_token(&clients, service_account.as_ref())
        .await?;
    let plan = super::crossnode::plan(&client, &opts, &node, &agent, stderr).await;
    match plan {
        Some(plan) => super::crossnode::run(&opts, plan, &forwarder, stdout, stderr).await,
        None => {
            let (pf, stream) = forwarder.open(&agent).await?;
            let code = exchange(
                stream,
                &opts.request,
                &forwarder.token,
                opts.format,
                stdout,
                stderr,
            )
            .await;
            pf.abort();
            code
        }
    }
}

/// Opens port-forwards to agent pods; what the client says there carries `token`.
pub(super) struct Forwarder {
    agents: Api<Pod>,
    namespace: String,
    port: u16,
    /// Bounds opening a port-forward (`--request-timeout`).
    kube: KubeOptions,
    /// The caller's bearer token, sent to every agent (each checks it with the API server).
    pub(super) token: String,
}

impl Forwarder {
    fn new(clients: &Clients, kube: &KubeOptions, namespace: &str, port: u16) -> Self {
        Self {
            agents: Api::namespaced(clients.streams.clone(), namespace),
            namespace: namespace.into(),
            port,
            kube: kube.clone(),
            token: String::new(),
        }
    }

    /// With the token the agents get ([`super::token::bearer`]).
    async fn with_token(
        mut self,
        clients: &Clients,
        service_account: Option<&(String, String)>,
    ) -> Result<Self> {
        let token = super::token::bearer(&clients.api, &clients.config, service_account);
        self.token = self
            .kube
            .bounded(|| "getting the agents' bearer token".into(), token)
            .await?;
        Ok(self)
    }

    pub(super) async fn open(
        &self,
        agent: &str,
    ) -> Result<(
        kube::api::Portforwarder,
        impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    )> {
        let what = || format!("port-forward to agent {}/{agent}", self.namespace);
        let opened = async {
            self.agents
                .portforward(agent, &[self.port])
                .await
                .map_err(kube_err(what()))
        };
        let mut pf = self.kube.bounded(what, opened).await?;
        let stream = pf.take_stream(self.port).expect("requested port");
        Ok((pf, stream))
    }
}

pub(super) fn kube_err(what: String) -> impl FnOnce(kube::Error) -> Error {
    move |e: kube::Error| Error::Kube {
        what,
        reason: e.to_string(),
    }
}

pub(super) fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref().and_then(|s| s.node_name.clone())
}

/// The Running agent pod on `node`.
pub(super) async fn find_agent(
    client: &kube::Client,
    agent_namespace: &str,
    node: &str,
) -> Result<String> {
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

/// Prints one frame of a single-node trace: records with the normal printer, the node's log
/// lines on stderr.
fn render<W: Write>(
    f: Frame,
    printer: &mut Printer<W>,
    stderr: &mut dyn Write,
) -> std::io::Result<()> {
    match f {
        Frame::Verdict { verdict } => printer.verdict(&verdict),
        Frame::Event { event } => printer.event(&event),
        Frame::Summary { summary } => printer.summary(&summary),
        Frame::Log { line } => writeln!(stderr, "{line}"),
        Frame::Error { message } => writeln!(stderr, "netprobe: agent: {message}"),
        Frame::Ready {} | Frame::Exit { .. } => Ok(()),
    }
}

/// Sends the request over `stream` and prints the agent's frames; returns the exit code.
pub async fn exchange(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    req: &TraceRequest,
    token: &str,
    format: Format,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<i32> {
    let mut failed = None;
    let mut printer = Printer::new(stdout, format);
    let code = session(
        stream,
        req,
        token,
        |f| {
            if let Err(e) = render(f, &mut printer, stderr) {
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

fn remote(reason: impl std::fmt::Display) -> Error {
    Error::Remote {
        reason: reason.to_string(),
    }
}

/// Asks the agent for a trace over an upgraded HTTP/1.1 connection; the two-way stream.
async fn open_trace(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    req: &TraceRequest,
    token: &str,
) -> Result<TokioIo<hyper::upgrade::Upgraded>> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| remote(format!("talking to the agent: {e}")))?;
    tokio::spawn(conn.with_upgrades());
    let request = Request::get(format!("{TRACE_PATH}?{}", req.to_query()))
        .header(HOST, "localhost")
        .header(CONNECTION, "upgrade")
        .header(UPGRADE, super::protocol::UPGRADE)
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .body(Empty::<Bytes>::new())
        .map_err(remote)?;
    let resp = sender
        .send_request(request)
        .await
        .map_err(|e| remote(format!("reading the agent's answer: {e}")))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let code = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        return Err(remote(format!("agent answered {code}: {body}")));
    }
    let io = hyper::upgrade::on(resp)
        .await
        .map_err(|e| remote(format!("opening the trace stream: {e}")))?;
    Ok(TokioIo::new(io))
}

/// Sends the request over `stream` and hands each frame to `on_frame` until the exit frame;
/// when `stop` completes, asks the agent to end the trace (its final output still comes).
pub async fn session(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    req: &TraceRequest,
    token: &str,
    mut on_frame: impl FnMut(Frame),
    stop: impl std::future::Future<Output = ()>,
) -> Result<i32> {
    let mut stream = BufReader::new(open_trace(stream, req, token).await?);
    let mut stop = std::pin::pin!(stop);
    let mut stopped = false;
    let mut line = String::new();
    loop {
        // read_line keeps what it read before a stop interrupted it: `line` is cleared only
        // after a whole line.
        let n = tokio::select! {
            n = stream.read_line(&mut line) => n.map_err(|e| Error::io("reading the agent's stream", e))?,
            _ = &mut stop, if !stopped => {
                stopped = true;
                stream
                    .get_mut()
                    .write_all(STOP)
                    .await
                    .map_err(|e| Error::io("asking the agent to stop the trace", e))?;
                continue;
            }
        };
        if n == 0 {
            return Err(remote("the agent closed the stream before the trace ended"));
        }
        let frame = Frame::parse(&line)
            .map_err(|e| remote(format!("unreadable record from the agent: {e}")))?;
        line.clear();
        if let Frame::Exit { code } = frame {
            return Ok(code);
        }
        on_frame(frame);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn verdict() -> crate::verdict::Verdict {
        crate::verdict::classify(
            &[],
            ("10.42.0.5".parse().unwrap(), 40000),
            &Default::default(),
            &Default::default(),
        )
    }

    #[tokio::test]
    async fn frames_are_rendered_and_the_exit_code_returned() {
        let (client, mut agent) = tokio::io::duplex(1 << 16);
        let req = TraceRequest::from_query("port=9500&pod=ns/p").unwrap();
        let v = verdict();
        let sent = v.clone();
        let server = tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            let n = agent.read(&mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            agent
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: netprobe-trace/1\r\n\r\n")
                .await
                .unwrap();
            for f in [
                Frame::Log {
                    line: "tracing".into(),
                },
                Frame::Ready {},
                Frame::Verdict {
                    verdict: Box::new(sent),
                },
                Frame::Exit { code: 1 },
            ] {
                agent.write_all(&f.line()).await.unwrap();
            }
            head
        });
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = exchange(client, &req, "tok-1", Format::Text, &mut out, &mut err)
            .await
            .unwrap();
        assert_eq!(code, 1);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            crate::sinks::text::verdict_text(&v)
        );
        assert_eq!(String::from_utf8(err).unwrap(), "tracing\n");
        let head = server.await.unwrap().to_ascii_lowercase();
        assert!(
            head.starts_with("get /v1/trace?port=9500&pod=ns%2fp http/1.1\r\n")
                && head.contains("upgrade: netprobe-trace/1")
                && head.contains("authorization: bearer tok-1\r\n"),
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
        let e = exchange(
            client,
            &req,
            "t",
            Format::Json,
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("429") && e.contains("busy"), "{e}");
    }
}
