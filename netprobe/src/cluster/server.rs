//! The agent's HTTP endpoints (one hyper server): `/metrics`, `/healthz`, `/readyz` from the
//! agent's [`AgentStatus`], and `/v1/trace`, which runs `netprobe trace -o json` as a child
//! process and streams its records back as typed [`Frame`]s, and `/v1/failures`, what the
//! agent remembers of failed connections ([`super::failures`]).

use std::{
    convert::Infallible,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HeaderValue, UPGRADE, WWW_AUTHENTICATE},
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    sync::{Semaphore, mpsc, watch},
};

use super::{
    auth::{Authorizer, Caller, Permission, Refusal, bearer},
    failures::{FAILURES_PATH, FailuresAnswer, FailuresQuery},
    memory::{SharedFailures, unix_now},
    protocol::{Frame, READY_FD, TRACE_PATH, TraceRequest},
};
use crate::error::{Error, Result};

/// Concurrent remote traces per agent (each loads its own probes).
pub const MAX_CONCURRENT: usize = 4;
/// Open HTTP connections at most; beyond, a connection is answered 503 and closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// A request head must arrive within this time (a slow client must not hold a connection).
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (request line and headers, a bearer token included); larger is 431.
pub const MAX_HEAD: usize = 16 * 1024;
/// Frames buffered per trace before the child's output waits for the client.
const FRAME_QUEUE: usize = 256;
/// After SIGINT, how long a trace child has to remove its tables before SIGKILL (well within
/// the pod's terminationGracePeriodSeconds, 30 s by default).
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Longest pause after a failed accept (EMFILE…): the loop backs off instead of spinning.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

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
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::ZERO;
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff = Duration::ZERO;
                accepted
            }
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(10), ACCEPT_BACKOFF_MAX);
                log::warn!("accepting an HTTP connection: {e}; retrying in {backoff:?}");
                traces.http.accept_errors.fetch_add(1, Relaxed);
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            traces.http.busy.fetch_add(1, Relaxed);
            tokio::spawn(too_many_connections(sock));
            continue;
        };
        let (status, traces) = (status.clone(), traces.clone());
        tokio::spawn(async move {
            serve_connection(sock, peer, status, traces).await;
            drop(permit);
        });
    }
}

/// Counters of the HTTP side, for /metrics.
#[derive(Default)]
struct HttpStats {
    accept_errors: AtomicU64,
    busy: AtomicU64,
}

/// A connection beyond [`MAX_CONNECTIONS`]: a short 503, written without waiting long.
async fn too_many_connections(mut sock: tokio::net::TcpStream) {
    let answer = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 21\r\nConnection: close\r\n\r\ntoo many connections\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), sock.write_all(answer)).await;
}

async fn serve_connection(
    sock: tokio::net::TcpStream,
    peer: SocketAddr,
    status: Arc<dyn AgentStatus>,
    traces: TraceServer,
) {
    let service = hyper::service::service_fn(move |req| {
        let (status, traces) = (status.clone(), traces.clone());
        async move { Ok::<_, Infallible>(route(req, peer, status.as_ref(), &traces).await) }
    });
    // One request a connection, as the scrapers and tests expect (they read to EOF).
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(sock), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        log::debug!("HTTP connection from {peer}: {e}");
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

/// The Prometheus text exposition, with the content type of the encoder that wrote it.
fn metrics_page(body: String) -> Response<Body> {
    let mut r = text(StatusCode::OK, body);
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(crate::sinks::prometheus::exposition::CONTENT_TYPE),
    );
    r
}

async fn route(
    req: Request<Incoming>,
    peer: SocketAddr,
    status: &dyn AgentStatus,
    traces: &TraceServer,
) -> Response<Body> {
    match req.uri().path() {
        TRACE_PATH => traces.answer(req, peer).await,
        FAILURES_PATH => traces.failures(&req, peer).await,
        "/metrics" => metrics_page(status.metrics() + &traces.metrics()),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match status.readiness() {
            Ok(body) => text(StatusCode::OK, body),
            Err(body) => text(StatusCode::SERVICE_UNAVAILABLE, body),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

// ---------------------------------------------------------------------------------------------
// Who may trace (or read failures): the Kubernetes API decides (super::auth)
// ---------------------------------------------------------------------------------------------

/// The answer to a refused request: 401 (with how to authenticate), 403 naming the missing
/// permission, or 503 when the API server could not be asked.
fn refused(r: &Refusal) -> Response<Body> {
    let code = match r {
        Refusal::NoToken | Refusal::BadToken(_) => StatusCode::UNAUTHORIZED,
        Refusal::Denied { .. } => StatusCode::FORBIDDEN,
        Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut resp = text(code, format!("{r}\n"));
    if code == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"netprobe\""),
        );
    }
    resp
}

/// An authorised request not served (bad query, busy, stopping): logged, answered `code`.
fn rejected(
    peer: SocketAddr,
    caller: &Caller,
    what: &str,
    code: StatusCode,
    why: &str,
) -> Response<Body> {
    let reason = format!("{} {why}", code.as_u16());
    eprintln!(
        "netprobe agent: audit {caller} {what} peer={peer} decision=rejected reason={reason:?}"
    );
    text(code, format!("{why}\n"))
}

/// One line per decision on stderr, never the token: who, what, the decision.
fn audit(
    peer: SocketAddr,
    who: Option<&Caller>,
    what: &str,
    decision: std::result::Result<(), &Refusal>,
) {
    let who = who.map_or_else(|| "user=anonymous".to_string(), Caller::to_string);
    let decision = match decision {
        Ok(()) => "decision=allowed".to_string(),
        Err(r) => format!("decision=refused reason={:?}", r.to_string()),
    };
    eprintln!("netprobe agent: audit {who} {what} peer={peer} {decision}");
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
    auth: Arc<Authorizer>,
    http: Arc<HttpStats>,
    /// Set when the agent stops: running traces are interrupted, new ones refused.
    stopping: watch::Sender<bool>,
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
            auth: Arc::new(Authorizer::default()),
            http: Arc::default(),
            stopping: watch::Sender::new(false),
        }
    }

    /// Also answers `/v1/failures` from `failures` (fed by the agent's failures sink).
    pub fn with_failures(mut self, failures: SharedFailures) -> Self {
        self.failures = Some(failures);
        self
    }

    /// Authorises through `client`'s API server (default: the agent's kubeconfig or
    /// in-cluster config, read on first use).
    pub fn with_kube(mut self, client: kube::Client) -> Self {
        self.auth = Arc::new(Authorizer::with_client(client));
        self
    }

    /// The HTTP side's and the authorisation's counters, Prometheus text.
    fn metrics(&self) -> String {
        use crate::sinks::prometheus::exposition::{Family, Labels, text};
        let a = self.auth.stats();
        let kind = |k: &'static str, n: u64| (Labels::one("kind", k), n);
        text(vec![
            Family::counters(
                "netprobe_auth_reviews_total",
                "TokenReviews and SubjectAccessReviews the agent asked the API server.",
                [
                    kind("token", a.token_reviews),
                    kind("access", a.access_reviews),
                ],
            ),
            Family::counter(
                "netprobe_auth_cache_evictions_total",
                format!(
                    "Cached authorisation answers evicted before they expired (bound {}).",
                    super::auth::CACHE_ENTRIES
                ),
                a.cache_evictions,
            ),
            Family::counter(
                "netprobe_http_refused_connections_total",
                format!("Connections answered 503 beyond {MAX_CONNECTIONS} open ones."),
                self.http.busy.load(Relaxed),
            ),
            Family::counter(
                "netprobe_http_accept_errors_total",
                "Failed accepts (e.g. out of file descriptors), each followed by a pause.",
                self.http.accept_errors.load(Relaxed),
            ),
        ])
    }

    /// Who sent `req`: the caller its bearer token names.
    async fn caller(
        &self,
        req: &Request<Incoming>,
    ) -> std::result::Result<(String, Caller), Refusal> {
        let token = bearer(req.headers().get(AUTHORIZATION)).ok_or(Refusal::NoToken)?;
        let caller = self.auth.authenticate(token).await?;
        Ok((token.to_string(), caller))
    }

    /// Stops every running trace (SIGINT, then SIGKILL after [`STOP_GRACE`]) and waits for
    /// them, so that their tables and programs are gone before the agent exits.
    pub async fn shutdown(&self) {
        self.stopping.send_replace(true);
        let all = MAX_CONCURRENT as u32;
        let waited = STOP_GRACE + Duration::from_secs(3);
        if tokio::time::timeout(waited, self.slots.acquire_many(all))
            .await
            .is_err()
        {
            log::warn!("netprobe agent: a remote trace did not end within {waited:?}");
        }
    }

    /// Answers one `GET /v1/failures?…` from the agent's memory, as JSON: everything for a
    /// caller who may list failures cluster-wide, else the groups with a side in a namespace
    /// the caller may list.
    async fn failures(&self, req: &Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let what = format!(
            "request=failures query={:?}",
            req.uri().query().unwrap_or("")
        );
        let (token, caller) = match self.caller(req).await {
            Ok(c) => c,
            Err(r) => {
                audit(peer, None, &what, Err(&r));
                return refused(&r);
            }
        };
        let Some(memory) = &self.failures else {
            return rejected(
                peer,
                &caller,
                &what,
                StatusCode::NOT_FOUND,
                "this agent keeps no failures",
            );
        };
        let query = match FailuresQuery::from_query(req.uri().query().unwrap_or("")) {
            Ok(q) => q,
            Err(e) => return rejected(peer, &caller, &what, StatusCode::BAD_REQUEST, &e),
        };
        // Copied under the lock, serialized after it: the session's sink is not held up.
        let answer = memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .answer(&query, unix_now());
        let asked = query.namespace.clone();
        let answer = match self.readable(&token, &caller, answer, asked).await {
            Ok(a) => a,
            Err(r) => {
                audit(peer, Some(&caller), &what, Err(&r));
                return refused(&r);
            }
        };
        audit(peer, Some(&caller), &what, Ok(()));
        let mut body = serde_json::to_vec(&answer).expect("answers serialize");
        body.push(b'\n');
        let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    }

    /// `answer` without the groups `caller` may not read (neither side in a namespace it may
    /// list, unless it may list cluster-wide); refused when `asked` names a namespace it may
    /// not list.
    async fn readable(
        &self,
        token: &str,
        caller: &Caller,
        mut answer: FailuresAnswer,
        asked: Option<String>,
    ) -> std::result::Result<FailuresAnswer, Refusal> {
        let sides = |g: &super::failures::FailureGroup| {
            [
                g.key.client.namespace.clone(),
                g.key.destination.namespace.clone(),
            ]
        };
        let wanted = answer
            .groups
            .iter()
            .flat_map(sides)
            .flatten()
            .chain(asked.clone());
        let Some(readable) = self.auth.readable_namespaces(token, caller, wanted).await? else {
            return Ok(answer);
        };
        // Asked for a namespace it may not list: refused. Otherwise what it may read, maybe
        // nothing (a tracer of other namespaces asks every agent).
        if let Some(ns) = asked
            && !readable.contains(&ns)
        {
            return Err(Refusal::Denied {
                user: caller.user.clone(),
                verb: "list",
                resource: super::auth::FAILURES,
                namespace: ns,
            });
        }
        answer
            .groups
            .retain(|g| sides(g).iter().flatten().any(|n| readable.contains(n)));
        Ok(answer)
    }

    /// Answers one `GET /v1/trace?…`: refused, or a stream of frames (an upgraded two-way
    /// stream when the client asks for [`super::protocol::UPGRADE`], else the response body).
    async fn answer(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let what = format!("request=trace query={:?}", req.uri().query().unwrap_or(""));
        let (token, caller) = match self.caller(&req).await {
            Ok(c) => c,
            Err(r) => {
                audit(peer, None, &what, Err(&r));
                return refused(&r);
            }
        };
        let trace = match TraceRequest::from_query(req.uri().query().unwrap_or("")) {
            Ok(r) => r,
            Err(e) => return rejected(peer, &caller, &what, StatusCode::BAD_REQUEST, &e),
        };
        let (ns, pod) = trace.pod.split_once('/').expect("checked by from_query");
        let what = format!(
            "request=trace namespace={ns} pod={pod} port={} addr={}",
            trace.port,
            trace.addr.map_or("-".into(), |a| a.to_string())
        );
        if let Err(r) = self
            .auth
            .require(&token, &caller, &Permission::trace(ns, pod))
            .await
        {
            audit(peer, Some(&caller), &what, Err(&r));
            return refused(&r);
        }
        drop(token);
        if *self.stopping.borrow() {
            let why = "the agent is stopping";
            return rejected(peer, &caller, &what, StatusCode::SERVICE_UNAVAILABLE, why);
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            let why = format!("{MAX_CONCURRENT} traces already run on this node");
            return rejected(peer, &caller, &what, StatusCode::TOO_MANY_REQUESTS, &why);
        };
        audit(peer, Some(&caller), &what, Ok(()));
        let (frames, queue) = mpsc::channel(FRAME_QUEUE);
        let (control, commands) = mpsc::unbounded_channel();
        let exe = self.exe.clone();
        let stopping = self.stopping.subscribe();
        tokio::spawn(async move {
            run_trace(&exe, &trace, frames, commands, stopping).await;
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
            // A plain GET (curl on the node, with a token): frames in the body; no stop but
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

/// Runs one trace child and sends its output as frames until it exits or the client is gone;
/// when the agent stops, the child gets SIGINT, then SIGKILL after [`STOP_GRACE`].
async fn run_trace(
    exe: &PathBuf,
    req: &TraceRequest,
    frames: mpsc::Sender<Frame>,
    mut control: mpsc::UnboundedReceiver<Control>,
    mut stopping: watch::Receiver<bool>,
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
    let mut stopping_now = *stopping.borrow();
    if stopping_now {
        interrupt(&child.process);
    }
    let kill_at = tokio::time::sleep(STOP_GRACE);
    let mut kill_at = std::pin::pin!(kill_at);
    let mut stopped = false;
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
                    Some(Control::Stop) if !stopped => { stopped = true; interrupt(&child.process) }
                    Some(Control::Stop) => {}
                    Some(Control::Gone) => return stop_child(&mut child.process).await,
                    None => control_open = false,
                }
                continue;
            }
            _ = stopping.changed(), if !stopping_now => {
                stopping_now = true;
                interrupt(&child.process);
                kill_at.as_mut().reset(tokio::time::Instant::now() + STOP_GRACE);
                continue;
            }
            _ = &mut kill_at, if stopping_now => {
                let _ = child.process.kill().await;
                break;
            }
            _ = frames.closed() => return stop_child(&mut child.process).await,
        };
        // While the agent stops, a client that does not read must not hold the child up.
        if stopping_now {
            let _ = frames.try_send(frame);
        } else if frames.send(frame).await.is_err() {
            return stop_child(&mut child.process).await;
        }
    }
    let code = match child.process.wait().await {
        Ok(status) => status.code().unwrap_or_else(|| {
            128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
        }),
        Err(_) => 2,
    };
    if stopping_now {
        let _ = frames.try_send(Frame::Exit { code });
    } else {
        let _ = frames.send(Frame::Exit { code }).await;
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
    use netprobe_lab::kubeapi::{ADMIN_TOKEN, FakeKube};

    use super::*;

    struct Fixed;
    impl AgentStatus for Fixed {
        fn metrics(&self) -> String {
            "netprobe_up 1\n".into()
        }
        fn readiness(&self) -> std::result::Result<String, String> {
            Err("probes not attached yet\n".into())
        }
    }

    /// The API stand-in, and a client of it.
    fn api() -> (FakeKube, kube::Client) {
        let kube = FakeKube::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let url = format!("http://127.0.0.1:{}", kube.port).parse().unwrap();
        let client = kube::Client::try_from(kube::Config::new(url)).unwrap();
        (kube, client)
    }

    async fn serving(server: TraceServer) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Arc::new(Fixed), server));
        addr
    }

    async fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn get_as(addr: SocketAddr, path: &str, token: Option<&str>) -> String {
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
        raw(addr, head.as_bytes()).await
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        get_as(addr, path, None).await
    }

    #[tokio::test]
    async fn the_endpoints_answer_from_the_agent_status() {
        let addr = serving(TraceServer::new().unwrap()).await;
        let m = get(addr, "/metrics").await;
        assert!(
            m.starts_with("HTTP/1.1 200") && m.contains("\r\n\r\nnetprobe_up 1\n"),
            "{m}"
        );
        assert!(
            m.contains("\nnetprobe_auth_cache_evictions_total 0\n"),
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

    fn refused_memory() -> SharedFailures {
        let memory = crate::cluster::memory::Failures::shared("node-a".into());
        for (ns, port) in [("team-a", 40000), ("team-b", 40001)] {
            let mut v = crate::verdict::classify(
                &[],
                ("10.42.0.5".parse().unwrap(), port),
                &Default::default(),
                &Default::default(),
            );
            v.outcome = crate::model::Outcome::RefusedNoListener;
            v.client.peer = Some(crate::model::Peer {
                namespace: Some(ns.into()),
                pod: Some(format!("client-{port}")),
                ..Default::default()
            });
            memory.lock().unwrap().record(&v, unix_now());
        }
        memory
    }

    fn answer_of(r: &str) -> super::super::failures::FailuresAnswer {
        serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn failures_need_a_token_and_are_filtered_by_the_namespaces_the_caller_may_list() {
        let (kube, client) = api();
        kube.add_token("alice-token", "alice", &["team-a-devs"]);
        kube.allow(
            "team-a-devs",
            "list",
            "netprobe.io",
            "failures",
            Some("team-a"),
        );
        kube.add_token("bob-token", "bob", &[]);
        let server = TraceServer::new()
            .unwrap()
            .with_failures(refused_memory())
            .with_kube(client);
        let addr = serving(server).await;
        let r = get(addr, "/v1/failures?since=10m").await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        assert!(
            r.contains("www-authenticate: Bearer realm=\"netprobe\""),
            "{r}"
        );
        let r = get_as(addr, "/v1/failures", Some("forged")).await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        // A cluster admin reads everything.
        let r = get_as(addr, "/v1/failures?since=10m", Some(ADMIN_TOKEN)).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("application/json"), "{r}");
        let a = answer_of(&r);
        assert_eq!(a.schema, "netprobe.failures/v1");
        assert_eq!((a.since_s, a.nodes[0].node.as_str()), (600, "node-a"));
        assert_eq!(a.groups.len(), 2);
        // alice: team-a's only.
        let r = get_as(addr, "/v1/failures", Some("alice-token")).await;
        let a = answer_of(&r);
        assert_eq!(a.groups.len(), 1, "{r}");
        assert_eq!(a.groups[0].key.client.namespace.as_deref(), Some("team-a"));
        let r = get_as(addr, "/v1/failures?namespace=team-b", Some("alice-token")).await;
        assert!(r.starts_with("HTTP/1.1 403"), "{r}");
        assert!(
            r.contains("alice may not list failures.netprobe.io in namespace team-b"),
            "{r}"
        );
        // bob may list nothing: nothing (the node's failures are not his to see).
        let r = get_as(addr, "/v1/failures", Some("bob-token")).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert_eq!(answer_of(&r).groups.len(), 0, "{r}");
        for bad in ["since=99h", "since=1m&since=2m", "pod=x"] {
            let r = get_as(addr, &format!("/v1/failures?{bad}"), Some(ADMIN_TOKEN)).await;
            assert!(r.starts_with("HTTP/1.1 400"), "{bad}: {r}");
        }
        // Answers are reused: alice's token was reviewed once.
        let before = kube.reviews();
        let _ = get_as(addr, "/v1/failures", Some("alice-token")).await;
        assert_eq!(kube.reviews(), before);
        // The API server down: 503, never allowed.
        kube.set_down(true);
        let r = get_as(addr, "/v1/failures", Some("carol-token")).await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    }

    /// A stand-in for `netprobe trace -o json`: says it is ready, logs, prints one record;
    /// with `wait`, runs until SIGINT and writes `interrupted` to `<exe>.int` then.
    fn stand_in(name: &str, record: &str, wait: bool) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("netprobe-stand-in-{}-{name}", std::process::id()));
        let wait = if wait {
            format!(
                "trap 'echo interrupted > {}.int; exit 130' INT\nwhile :; do sleep 0.1; done\n",
                path.display()
            )
        } else {
            "exit 1\n".into()
        };
        let script = format!(
            "#!/bin/sh\necho ready > /proc/self/fd/{READY_FD}\necho 'netprobe: waiting' >&2\necho '{record}'\n{wait}"
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        path
    }

    #[tokio::test]
    async fn a_trace_streams_typed_frames_over_the_upgraded_connection() {
        let (kube, client) = api();
        kube.add_token("alice-token", "alice", &[]);
        kube.allow("alice", "create", "netprobe.io", "traces", Some("team-a"));
        let v = crate::verdict::classify(
            &[],
            ("10.42.0.5".parse().unwrap(), 40000),
            &Default::default(),
            &Default::default(),
        );
        let exe = stand_in("frames", &serde_json::to_string(&v).unwrap(), false);
        let addr = serving(TraceServer::running(exe.clone()).with_kube(client)).await;
        let trace = |pod: &str, token: &'static str| {
            let req = TraceRequest::from_query(&format!("port=9500&pod={pod}")).unwrap();
            async move {
                let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
                let mut frames = Vec::new();
                let r = crate::cluster::client::session(
                    sock,
                    &req,
                    token,
                    |f| frames.push(f),
                    std::future::pending(),
                )
                .await;
                (r.map_err(|e| e.to_string()), frames)
            }
        };
        let (refused, frames) = trace("team-b/api-0", "alice-token").await;
        assert!(frames.is_empty(), "{frames:?}");
        let e = refused.unwrap_err();
        assert!(
            e.contains("403")
                && e.contains("alice may not create traces.netprobe.io in namespace team-b"),
            "{e}"
        );
        let (code, frames) = trace("team-a/api-0", "alice-token").await;
        let _ = std::fs::remove_file(exe);
        assert_eq!(code.unwrap(), 1);
        assert!(frames.contains(&Frame::Ready {}), "{frames:?}");
        assert!(frames.contains(&Frame::Log {
            line: "netprobe: waiting".into()
        }));
        assert!(frames.contains(&Frame::Verdict {
            verdict: Box::new(v)
        }));
    }

    #[tokio::test]
    async fn a_trace_without_a_token_is_refused_and_nothing_runs() {
        let (kube, client) = api();
        let exe = stand_in("untouched", "{}", true);
        let addr = serving(TraceServer::running(exe.clone()).with_kube(client)).await;
        // The kubelet's httpGet probe of the issue: root, node loopback, no credentials.
        let r = get(addr, "/v1/trace?pod=team-a/api-0&port=9500").await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        assert!(r.contains("www-authenticate: Bearer"), "{r}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(kube.reviews(), (0, 0), "refused before asking anyone");
        let running = std::process::Command::new("pgrep")
            .args(["-f", exe.to_str().unwrap()])
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&exe);
        assert!(running.stdout.is_empty(), "a trace child ran");
    }

    #[tokio::test]
    async fn bad_trace_queries_are_refused_with_their_reason_and_start_nothing() {
        let (_kube, client) = api();
        let exe = stand_in("bad-queries", "{}", true);
        let server = TraceServer::running(exe.clone()).with_kube(client);
        let addr = serving(server.clone()).await;
        for (query, reason) in [
            ("pod=team-a/api-0&port=0", "`port=0` refused"),
            (
                "pod=team-a/api-0&port=9500&port=9501",
                "parameter `port` given twice",
            ),
            (
                "pod=team-a/api-0&pod=team-b/db-0&port=9500",
                "parameter `pod` given twice",
            ),
        ] {
            let r = get_as(addr, &format!("/v1/trace?{query}"), Some(ADMIN_TOKEN)).await;
            assert!(
                r.starts_with("HTTP/1.1 400") && r.contains(reason),
                "{query}: {r}"
            );
        }
        let _ = std::fs::remove_file(exe);
        assert_eq!(server.slots.available_permits(), MAX_CONCURRENT);
    }

    #[tokio::test]
    async fn stopping_interrupts_the_running_traces_and_waits_for_them() {
        let (_kube, client) = api();
        let exe = stand_in("stopping", "{}", true);
        let server = TraceServer::running(exe.clone()).with_kube(client);
        let addr = serving(server.clone()).await;
        let r = tokio::spawn(get_as(
            addr,
            "/v1/trace?pod=team-a/api-0&port=9500",
            Some(ADMIN_TOKEN),
        ));
        let marker = exe.with_extension("int");
        for _ in 0..50 {
            if server.slots.available_permits() < MAX_CONCURRENT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(server.slots.available_permits(), MAX_CONCURRENT - 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = std::time::Instant::now();
        server.shutdown().await;
        assert!(started.elapsed() < STOP_GRACE, "the trace ended on SIGINT");
        assert_eq!(server.slots.available_permits(), MAX_CONCURRENT);
        let said = std::fs::read_to_string(&marker).unwrap_or_default();
        let _ = (std::fs::remove_file(&exe), std::fs::remove_file(&marker));
        assert_eq!(said, "interrupted\n");
        let r = r.await.unwrap();
        assert!(
            r.contains("netprobe.cluster.exit/v1") && r.contains("\"code\":130"),
            "{r}"
        );
        let late = get_as(
            addr,
            "/v1/trace?pod=team-a/api-0&port=9500",
            Some(ADMIN_TOKEN),
        )
        .await;
        assert!(
            late.starts_with("HTTP/1.1 503") && late.contains("stopping"),
            "{late}"
        );
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_refused_unread() {
        let (kube, client) = api();
        let addr = serving(TraceServer::new().unwrap().with_kube(client)).await;
        let big = format!(
            "GET /v1/trace?pod=team-a/api-0&port=9500 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        let r = raw(addr, big.as_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 431"), "{r}");
        assert_eq!(kube.reviews(), (0, 0), "never processed");
    }

    #[tokio::test]
    async fn connections_beyond_the_bound_are_answered_503_at_once() {
        let addr = serving(TraceServer::new().unwrap()).await;
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = tokio::time::timeout(Duration::from_secs(2), get(addr, "/healthz"))
            .await
            .expect("answered at once");
        assert!(
            r.starts_with("HTTP/1.1 503") && r.ends_with("too many connections\n"),
            "{r}"
        );
        drop(idle);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(get(addr, "/healthz").await.ends_with("\r\n\r\nok\n"));
        let m = get(addr, "/metrics").await;
        assert!(
            m.contains("\nnetprobe_http_refused_connections_total 1\n"),
            "{m}"
        );
    }

    /// The child side of [`accept_errors_are_backed_off_not_spun_on`]: serves with only a few
    /// free descriptors, so that accepts fail with EMFILE; prints its port.
    #[test]
    fn accept_errors_child() {
        if std::env::var_os("NETPROBE_ACCEPT_CHILD").is_none() {
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            println!("{}", listener.local_addr().unwrap().port());
            let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
            let limit = libc::rlimit {
                rlim_cur: open + 2,
                rlim_max: open + 2,
            };
            // SAFETY: setrlimit on this (child) process only.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
            let server = serve(listener, Arc::new(Fixed), TraceServer::new().unwrap());
            let _ = tokio::time::timeout(Duration::from_secs(20), server).await;
        });
    }

    /// CPU time (user + system, clock ticks) of process `pid`.
    fn cpu_ticks(pid: u32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    #[test]
    fn accept_errors_are_backed_off_not_spun_on() {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cluster::server::tests::accept_errors_child",
                "--nocapture",
            ])
            .env("NETPROBE_ACCEPT_CHILD", "1")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let port = loop {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            if let Ok(p) = line.trim().parse::<u16>() {
                break p;
            }
        };
        // Silent connections hold the few descriptors (until the 5 s head timeout); the
        // next ones wait in the backlog while accept fails with EMFILE.
        let held: Vec<_> = (0..8)
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let before = cpu_ticks(child.id());
        std::thread::sleep(Duration::from_secs(2));
        let spent = cpu_ticks(child.id()) - before;
        drop(held);
        // After the head timeout the agent has descriptors again and answers.
        let answered = (0..40).any(|_| {
            std::thread::sleep(Duration::from_millis(250));
            let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                return false;
            };
            let _ = std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut r = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut r);
            r.contains("\nnetprobe_http_accept_errors_total ")
                && !r.contains("\nnetprobe_http_accept_errors_total 0\n")
        });
        let _ = child.kill();
        let _ = child.wait();
        // 100 ticks a second: a spinning accept loop would spend about 200 in 2 s.
        assert!(spent < 40, "{spent} ticks in 2 s");
        assert!(
            answered,
            "the agent answered again, having counted its failed accepts"
        );
    }
}
