//! The agent's HTTP endpoints (one hyper server): `/metrics`, `/healthz`, `/readyz` from the
//! agent's [`AgentStatus`], and `/v1/trace`, which runs `netprobe trace -o json` as a child
//! process and streams its records back as typed [`Frame`]s, and `/v1/failures`, what the
//! agent remembers of failed connections ([`super::failures`]).

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{CONNECTION, CONTENT_TYPE, HeaderValue, UPGRADE},
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    sync::{Semaphore, mpsc},
};

use super::{
    failures::{FAILURES_PATH, FailuresQuery},
    memory::{SharedFailures, unix_now},
    protocol::{Frame, READY_FD, TRACE_PATH, TraceRequest},
};
use crate::error::{Error, Result};

/// Concurrent remote traces per agent (each loads its own probes).
pub const MAX_CONCURRENT: usize = 4;
/// A request head must arrive within this time (a slow client must not hold a connection).
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames buffered per trace before the child's output waits for the client.
const FRAME_QUEUE: usize = 256;

/// What the agent's HTTP endpoints read; implemented by the agent's metrics state.
pub trait AgentStatus: Send + Sync + 'static {
    /// Prometheus text exposition for /metrics.
    fn metrics(&self) -> String;
    /// /readyz: Ok(body) → 200, Err(body) → 503.
    fn readiness(&self) -> std::result::Result<String, String>;
}

type Body = BoxBody<Bytes, Infallible>;

/// Serves the agent's endpoints on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    status: Arc<dyn AgentStatus>,
    traces: TraceServer,
) {
    loop {
        let Ok((sock, peer)) = listener.accept().await else {
            continue;
        };
        let local = sock.local_addr().ok();
        let (status, traces) = (status.clone(), traces.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let reply = route(req, peer, local, status.as_ref(), &traces);
                async move { Ok::<_, Infallible>(reply) }
            });
            // One request a connection, as the scrapers and tests expect (they read to EOF).
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(8192)
                .serve_connection(TokioIo::new(sock), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                log::debug!("HTTP connection from {peer}: {e}");
            }
        });
    }
}

fn text(code: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

fn route(
    req: Request<Incoming>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    status: &dyn AgentStatus,
    traces: &TraceServer,
) -> Response<Body> {
    match req.uri().path() {
        TRACE_PATH => traces.answer(req, peer, local),
        FAILURES_PATH => traces.failures(&req, peer, local),
        "/metrics" => text(StatusCode::OK, status.metrics()),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match status.readiness() {
            Ok(body) => text(StatusCode::OK, body),
            Err(body) => text(StatusCode::SERVICE_UNAVAILABLE, body),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

// ---------------------------------------------------------------------------------------------
// Who may trace (or read failures): root-owned sockets only
// ---------------------------------------------------------------------------------------------

/// Only root-owned peers: the kubelet/containerd end of a port-forward (RBAC-checked by the API
/// server), or root on the node. Other local users must not start traces or read what failed.
fn authorised(peer: SocketAddr, local: Option<SocketAddr>) -> bool {
    local.and_then(|l| socket_uid(peer, l)) == Some(0)
}

fn forbidden(what: &str) -> Response<Body> {
    text(
        StatusCode::FORBIDDEN,
        format!("{what} through the Kubernetes API (pods/portforward) or by root on the node\n"),
    )
}

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

// ---------------------------------------------------------------------------------------------
// /v1/trace
// ---------------------------------------------------------------------------------------------

/// Shared state of the agent's trace endpoint.
#[derive(Clone)]
pub struct TraceServer {
    /// The `netprobe` executable the traces run (a stand-in in tests).
    exe: PathBuf,
    slots: Arc<Semaphore>,
    /// What the agent remembers of failures (`/v1/failures`), when it keeps them.
    failures: Option<SharedFailures>,
}

/// What the client says on an upgraded stream.
enum Control {
    /// A line ([`super::protocol::STOP`]): end the trace, its last verdicts still come.
    Stop,
    /// The client went away: end the trace, nobody reads it.
    Gone,
}

impl TraceServer {
    pub fn new() -> Result<Self> {
        let exe =
            std::env::current_exe().map_err(|e| Error::io("finding the netprobe executable", e))?;
        Ok(Self::running(exe))
    }

    /// Traces run `exe` (the agent's own executable; a stand-in in tests).
    pub fn running(exe: PathBuf) -> Self {
        Self {
            exe,
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT)),
            failures: None,
        }
    }

    /// Also answers `/v1/failures` from `failures` (fed by the agent's failures sink).
    pub fn with_failures(mut self, failures: SharedFailures) -> Self {
        self.failures = Some(failures);
        self
    }

    /// Answers one `GET /v1/failures?…` from the agent's memory, as JSON.
    fn failures(
        &self,
        req: &Request<Incoming>,
        peer: SocketAddr,
        local: Option<SocketAddr>,
    ) -> Response<Body> {
        if !authorised(peer, local) {
            return forbidden("failures are read");
        }
        let Some(memory) = &self.failures else {
            return text(StatusCode::NOT_FOUND, "this agent keeps no failures\n");
        };
        let query = match FailuresQuery::from_query(req.uri().query().unwrap_or("")) {
            Ok(q) => q,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
        // Copied under the lock, serialized after it: the session's sink is not held up.
        let answer = memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .answer(&query, unix_now());
        let mut body = serde_json::to_vec(&answer).expect("answers serialize");
        body.push(b'\n');
        let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    }

    /// Answers one `GET /v1/trace?…`: refused, or a stream of frames (an upgraded two-way
    /// stream when the client asks for [`super::protocol::UPGRADE`], else the response body).
    fn answer(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        local: Option<SocketAddr>,
    ) -> Response<Body> {
        if !authorised(peer, local) {
            return forbidden("traces are started");
        }
        let trace = match TraceRequest::from_query(req.uri().query().unwrap_or("")) {
            Ok(r) => r,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return text(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{MAX_CONCURRENT} traces already run on this node\n"),
            );
        };
        log::info!("remote trace: {}", trace.argv().join(" "));
        let (frames, queue) = mpsc::channel(FRAME_QUEUE);
        let (control, commands) = mpsc::unbounded_channel();
        let exe = self.exe.clone();
        tokio::spawn(async move {
            run_trace(&exe, &trace, frames, commands).await;
            drop(slot);
        });
        let upgrade = req.headers().get(UPGRADE).cloned();
        match upgrade {
            Some(proto) if proto == super::protocol::UPGRADE => {
                let on_upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    match on_upgrade.await {
                        Ok(io) => pump(TokioIo::new(io), queue, control).await,
                        Err(e) => log::warn!("remote trace: upgrade failed: {e}"),
                    }
                });
                let mut r = Response::new(Full::new(Bytes::new()).boxed());
                *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("upgrade"));
                r.headers_mut().insert(UPGRADE, proto);
                r
            }
            // A plain GET (root with curl on the node): frames in the body; no stop but
            // going away.
            _ => {
                drop(control);
                streamed(queue)
            }
        }
    }
}

/// The frames as a chunked NDJSON response body.
fn streamed(queue: mpsc::Receiver<Frame>) -> Response<Body> {
    let body = futures::stream::unfold(queue, |mut q| async move {
        let f = q.recv().await?;
        Some((
            Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(f.line()))),
            q,
        ))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(body)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// Writes the frames to an upgraded stream and reads the client's control lines from it.
async fn pump(
    io: TokioIo<hyper::upgrade::Upgraded>,
    mut queue: mpsc::Receiver<Frame>,
    control: mpsc::UnboundedSender<Control>,
) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let reader = async {
        let mut buf = [0u8; 64];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return Control::Gone,
                Ok(n) if buf[..n].contains(&b'\n') => return Control::Stop,
                Ok(_) => {}
            }
        }
    };
    let mut reader = std::pin::pin!(reader);
    let mut reading = true;
    loop {
        tokio::select! {
            // One control line is all a client says (after a stop, a vanished client shows
            // as a failed write).
            c = &mut reader, if reading => {
                reading = false;
                let gone = matches!(c, Control::Gone);
                let _ = control.send(c);
                if gone { return; }
            }
            f = queue.recv() => {
                let Some(f) = f else { let _ = wr.shutdown().await; return };
                if wr.write_all(&f.line()).await.is_err() {
                    let _ = control.send(Control::Gone);
                    return;
                }
            }
        }
    }
}

/// The child trace with its output pipes and the read end of its ready pipe.
struct Child {
    process: tokio::process::Child,
    ready: tokio::net::unix::pipe::Receiver,
}

/// A pipe whose both ends are closed on exec (the write end is handed to one child only).
fn ready_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fresh descriptors, owned from here on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn spawn_trace(exe: &PathBuf, req: &TraceRequest) -> std::io::Result<Child> {
    let (read, write) = ready_pipe()?;
    let write_fd = write.as_raw_fd();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(req.argv())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: prctl, dup2 and fcntl are async-signal-safe. If the agent dies (even SIGKILL),
    // the trace gets SIGINT and removes its table and programs instead of running on as an
    // orphan. The ready pipe becomes the child's READY_FD (dup2 clears close-on-exec).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = if write_fd == READY_FD {
                libc::fcntl(READY_FD, libc::F_SETFD, 0)
            } else {
                libc::dup2(write_fd, READY_FD)
            };
            if ok < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let process = cmd.spawn()?;
    drop(write);
    let ready = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
    Ok(Child { process, ready })
}

/// Runs one trace child and sends its output as frames until it exits or the client is gone.
async fn run_trace(
    exe: &PathBuf,
    req: &TraceRequest,
    frames: mpsc::Sender<Frame>,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let mut child = match spawn_trace(exe, req) {
        Ok(c) => c,
        Err(e) => {
            let message = format!("netprobe agent: cannot start the trace: {e}");
            let _ = frames.send(Frame::Error { message }).await;
            let _ = frames.send(Frame::Exit { code: 2 }).await;
            return;
        }
    };
    let out = child.process.stdout.take().expect("piped");
    let err = child.process.stderr.take().expect("piped");
    let mut out = BufReader::new(out).lines();
    let mut err = BufReader::new(err).lines();
    let (mut out_open, mut err_open, mut ready_open, mut control_open) = (true, true, true, true);
    let mut stopping = false;
    let mut mark = [0u8; 8];
    while out_open || err_open {
        let frame = tokio::select! {
            n = child.ready.read(&mut mark), if ready_open => {
                ready_open = false;
                match n { Ok(n) if n > 0 => Frame::Ready {}, _ => continue }
            }
            l = out.next_line(), if out_open => match l {
                Ok(Some(l)) => Frame::of_trace_record(&l),
                _ => { out_open = false; continue; }
            },
            l = err.next_line(), if err_open => match l {
                Ok(Some(line)) => Frame::Log { line },
                _ => { err_open = false; continue; }
            },
            c = control.recv(), if control_open => {
                match c {
                    Some(Control::Stop) if !stopping => { stopping = true; interrupt(&child.process) }
                    Some(Control::Stop) => {}
                    Some(Control::Gone) => return stop_child(&mut child.process).await,
                    None => control_open = false,
                }
                continue;
            }
            _ = frames.closed() => return stop_child(&mut child.process).await,
        };
        if frames.send(frame).await.is_err() {
            return stop_child(&mut child.process).await;
        }
    }
    let code = match child.process.wait().await {
        Ok(status) => status.code().unwrap_or_else(|| {
            128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
        }),
        Err(_) => 2,
    };
    let _ = frames.send(Frame::Exit { code }).await;
}

/// SIGINT: the trace prints what it has, removes its table and programs, and exits.
fn interrupt(child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own, not yet reaped child.
        unsafe { libc::kill(pid as i32, libc::SIGINT) };
    }
}

/// SIGINT (the trace removes its table and programs), then SIGKILL after 5 s.
async fn stop_child(child: &mut tokio::process::Child) {
    interrupt(child);
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    struct Fixed;
    impl AgentStatus for Fixed {
        fn metrics(&self) -> String {
            "netprobe_up 1\n".into()
        }
        fn readiness(&self) -> std::result::Result<String, String> {
            Err("probes not attached yet\n".into())
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_endpoints_answer_from_the_agent_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            Arc::new(Fixed),
            TraceServer::new().unwrap(),
        ));
        let m = get(addr, "/metrics").await;
        assert!(
            m.starts_with("HTTP/1.1 200") && m.ends_with("netprobe_up 1\n"),
            "{m}"
        );
        assert!(m.contains("text/plain; version=0.0.4"), "{m}");
        let r = get(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.ends_with("probes not attached yet\n"),
            "{r}"
        );
        assert!(get(addr, "/healthz").await.ends_with("\r\n\r\nok\n"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    }

    #[tokio::test]
    async fn failures_are_answered_as_typed_json_to_root_only_with_a_strict_query() {
        let memory = crate::cluster::memory::Failures::shared("node-a".into());
        let mut v = crate::verdict::classify(
            &[],
            ("10.42.0.5".parse().unwrap(), 40000),
            &Default::default(),
            &Default::default(),
        );
        v.outcome = crate::model::Outcome::RefusedNoListener;
        memory.lock().unwrap().record(&v, unix_now());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = TraceServer::new().unwrap().with_failures(memory);
        tokio::spawn(serve(listener, Arc::new(Fixed), server));
        let r = get(addr, "/v1/failures?since=10m").await;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(r.starts_with("HTTP/1.1 403"), "{r}");
            return;
        }
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("application/json"), "{r}");
        let body = r.split("\r\n\r\n").nth(1).unwrap();
        let a: super::super::failures::FailuresAnswer = serde_json::from_str(body).unwrap();
        assert_eq!(a.schema, "netprobe.failures/v1");
        assert_eq!((a.since_s, a.nodes[0].node.as_str()), (600, "node-a"));
        assert_eq!(a.groups.len(), 1);
        assert_eq!(a.groups[0].count, 1);
        for bad in ["since=99h", "since=1m&since=2m", "pod=x"] {
            let r = get(addr, &format!("/v1/failures?{bad}")).await;
            assert!(r.starts_with("HTTP/1.1 400"), "{bad}: {r}");
        }
    }

    /// A stand-in for `netprobe trace -o json`: says it is ready, logs, prints one record.
    fn stand_in(record: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("netprobe-stand-in-{}", std::process::id()));
        let script = format!(
            "#!/bin/sh\necho ready > /proc/self/fd/{READY_FD}\necho 'netprobe: waiting' >&2\necho '{record}'\nexit 1\n"
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        path
    }

    #[tokio::test]
    async fn a_trace_streams_typed_frames_over_the_upgraded_connection() {
        let v = crate::verdict::classify(
            &[],
            ("10.42.0.5".parse().unwrap(), 40000),
            &Default::default(),
            &Default::default(),
        );
        let exe = stand_in(&serde_json::to_string(&v).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            Arc::new(Fixed),
            TraceServer::running(exe.clone()),
        ));
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = TraceRequest::from_query("port=9500&pod=ns/p").unwrap();
        let mut frames = Vec::new();
        let result =
            crate::cluster::client::session(sock, &req, |f| frames.push(f), std::future::pending())
                .await;
        let _ = std::fs::remove_file(exe);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // Only root-owned client sockets may trace: this one is refused, nothing runs.
            assert!(result.is_err(), "{frames:?}");
            assert!(frames.is_empty(), "{frames:?}");
            return;
        }
        assert_eq!(result.unwrap(), 1);
        assert!(frames.contains(&Frame::Ready {}), "{frames:?}");
        assert!(frames.contains(&Frame::Log {
            line: "netprobe: waiting".into()
        }));
        assert!(frames.contains(&Frame::Verdict {
            verdict: Box::new(v)
        }));
    }
}
