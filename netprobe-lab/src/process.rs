//! `netprobe agent` and `netprobe trace` as processes inside a lab namespace, for the
//! privileged tests, the bench and the demo: started through `ip netns exec` (which execs, so
//! the child's pid is netprobe's), ready when netprobe creates its `--ready-file` (probes
//! attached), stopped with a signal, waited for with a limit, killed on drop (a failing test
//! must not leave a netprobe running: it would skew the next tests).

use std::{
    ffi::OsStr,
    io::{self, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// How long netprobe may take to attach its probes unless told otherwise.
pub const READY_LIMIT: Duration = Duration::from_secs(60);
/// How long an agent may take to drain and exit after SIGTERM.
pub const STOP_LIMIT: Duration = Duration::from_secs(60);
/// How often the ready file and the child are polled (short: the bench times agent starts).
const POLL: Duration = Duration::from_millis(5);

/// The signals tests send to netprobe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Drain, detach, exit 0 (the agent; a trace ends as at the end of its duration).
    Term,
    /// Ctrl-C.
    Int,
    /// No cleanup at all.
    Kill,
}

impl Signal {
    fn raw(self) -> i32 {
        match self {
            Self::Term => libc::SIGTERM,
            Self::Int => libc::SIGINT,
            Self::Kill => libc::SIGKILL,
        }
    }
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: Signal) -> io::Result<()> {
    kill(pid as i32, sig)
}

/// Sends `sig` to every process of the process group `pgid`.
pub fn signal_group(pgid: u32, sig: Signal) -> io::Result<()> {
    kill(-(pgid as i32), sig)
}

fn kill(pid: i32, sig: Signal) -> io::Result<()> {
    // SAFETY: plain kill(2); callers pass their own unreaped children, so the pid is not reused.
    match unsafe { libc::kill(pid, sig.raw()) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// How a process ended and what it printed (the streams that were piped).
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    /// Killed because it outlived the limit it was waited for.
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// The exit code, -1 when killed by a signal (or after the limit).
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Itself when it exited 0, else an error with its stderr.
    pub fn ok(self) -> Result<Self> {
        if !self.success() {
            bail!("exit {}: {}", self.status, self.stderr);
        }
        Ok(self)
    }
}

fn read_all(r: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` at most `limit` (then SIGKILLs it), reading its piped stdout and stderr
/// meanwhile (a full pipe must not stall it).
pub fn wait_output(mut child: Child, limit: Duration) -> Result<Finished> {
    let out = read_all(child.stdout.take());
    let err = read_all(child.stderr.take());
    let (status, timed_out) = wait_limited(&mut child, limit)?;
    Ok(Finished {
        status,
        timed_out,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// (exit status, whether it had to be killed after `limit`).
fn wait_limited(child: &mut Child, limit: Duration) -> Result<(ExitStatus, bool)> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok((st, false));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            return Ok((child.wait()?, true));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A unique ready-file path for this process.
fn ready_path(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "netprobe-{what}-ready-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A `netprobe <subcommand>` about to start inside a namespace. stdin is null, stdout and
/// stderr are piped unless set otherwise.
pub struct Spawn {
    cmd: Command,
    what: String,
    ready: PathBuf,
    ready_limit: Duration,
}

impl Spawn {
    /// `ip netns exec <netns> <bin> <subcommand> --ready-file <unique path>`.
    pub fn netprobe(bin: &Path, netns: &str, subcommand: &str) -> Self {
        let ready = ready_path(subcommand);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(bin)
            .arg(subcommand)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Self {
            cmd,
            what: format!("netprobe {subcommand}"),
            ready,
            ready_limit: READY_LIMIT,
        }
    }

    /// `netprobe trace` in `netns`.
    pub fn trace(bin: &Path, netns: &str) -> Self {
        Self::netprobe(bin, netns, "trace")
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.cmd.arg(arg);
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.cmd.args(args);
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    pub fn envs<'a>(mut self, vars: impl IntoIterator<Item = &'a (&'a str, &'a str)>) -> Self {
        self.cmd.envs(vars.into_iter().copied());
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.cmd.env_remove(key);
        self
    }

    pub fn stdout(mut self, to: impl Into<Stdio>) -> Self {
        self.cmd.stdout(to);
        self
    }

    pub fn stderr(mut self, to: impl Into<Stdio>) -> Self {
        self.cmd.stderr(to);
        self
    }

    /// How long to wait for the ready file ([`READY_LIMIT`] by default).
    pub fn ready_limit(mut self, limit: Duration) -> Self {
        self.ready_limit = limit;
        self
    }

    /// Starts the process and waits until it is ready. Fails with its output if it exits
    /// first or is not ready within the limit (it is killed then).
    pub fn start(mut self) -> Result<Running> {
        let _ = std::fs::remove_file(&self.ready);
        let child = self
            .cmd
            .spawn()
            .with_context(|| format!("start {}", self.what))?;
        let mut running = Running {
            child: Some(child),
            ready: self.ready,
            what: self.what,
        };
        running.wait_ready(self.ready_limit)?;
        Ok(running)
    }
}

/// A started netprobe (or any child); killed and reaped on drop.
pub struct Running {
    child: Option<Child>,
    ready: PathBuf,
    what: String,
}

impl Running {
    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        while !self.ready.exists() {
            if let Some(st) = self.child().try_wait()? {
                let out = self.take_output(st);
                bail!(
                    "{} exited before it was ready ({st}): {}{}",
                    self.what,
                    out.stderr,
                    out.stdout
                );
            }
            if start.elapsed() > limit {
                let _ = self.child().kill();
                let st = self.child().wait()?;
                let out = self.take_output(st);
                bail!(
                    "{} not ready after {limit:?}: {}{}",
                    self.what,
                    out.stderr,
                    out.stdout
                );
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// The output of the exited child (its streams hit EOF: reading cannot block).
    fn take_output(&mut self, status: ExitStatus) -> Finished {
        let child = self.child();
        let (out, err) = (read_all(child.stdout.take()), read_all(child.stderr.take()));
        Finished {
            status,
            timed_out: false,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        }
    }

    /// The child process (to take a stream, or poll it).
    pub fn child(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("the child is taken only by consuming methods")
    }

    pub fn id(&self) -> u32 {
        // Never 0 for a taken child: kill(0, …) would signal our own process group.
        self.child
            .as_ref()
            .map(Child::id)
            .expect("the child is taken only by consuming methods")
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child().try_wait(), Ok(None))
    }

    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        signal(self.id(), sig)
    }

    /// Waits at most `limit` for the process to exit by itself (then kills it).
    pub fn wait_output(mut self, limit: Duration) -> Result<Finished> {
        let child = self.child.take().expect("a child");
        wait_output(child, limit)
    }

    /// Sends `sig`, then waits at most `limit`.
    pub fn stop_with(self, sig: Signal, limit: Duration) -> Result<Finished> {
        self.signal(sig)?;
        self.wait_output(limit)
    }

    /// SIGKILL and reap, nothing read.
    pub fn kill9(mut self) {
        let _ = self.signal(Signal::Kill);
        let _ = self.child().wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.ready);
    }
}

/// A running `netprobe agent` with its endpoints on `127.0.0.1:port` inside `netns`.
pub struct Agent {
    pub proc: Running,
    pub netns: String,
    pub port: u16,
}

impl Agent {
    /// Starts `netprobe agent` in `netns` on a free loopback port; `configure` adds arguments,
    /// environment and stream settings.
    pub fn start(bin: &Path, netns: &str, configure: impl FnOnce(Spawn) -> Spawn) -> Result<Self> {
        let port = crate::ports::free_tcp(netns)?;
        Self::start_on(bin, netns, port, configure)
    }

    /// Starts `netprobe agent` in `netns` on `port` (one the caller allocated).
    pub fn start_on(
        bin: &Path,
        netns: &str,
        port: u16,
        configure: impl FnOnce(Spawn) -> Spawn,
    ) -> Result<Self> {
        let spawn = Spawn::netprobe(bin, netns, "agent")
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{port}"));
        Ok(Self {
            proc: configure(spawn).start()?,
            netns: netns.to_string(),
            port,
        })
    }

    pub fn id(&self) -> u32 {
        self.proc.id()
    }

    /// GET `path` from the agent: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        crate::metrics::http_get(&self.netns, self.port, path)
    }

    /// The body of `/metrics`.
    pub fn metrics(&self) -> Result<String> {
        crate::metrics::scrape(&self.netns, self.port)
    }

    /// SIGTERM (drain, detach, exit) and its output, within [`STOP_LIMIT`].
    pub fn stop(self) -> Result<Finished> {
        self.proc.stop_with(Signal::Term, STOP_LIMIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Child {
        Command::new("sh")
            .args(["-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    #[test]
    fn wait_output_collects_both_streams_and_the_code() {
        let f = wait_output(
            sh("echo out; echo err >&2; exit 3"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!((f.code(), f.timed_out), (3, false));
        assert_eq!((f.stdout.as_str(), f.stderr.as_str()), ("out\n", "err\n"));
        assert!(f.ok().unwrap_err().to_string().contains("err"));
    }

    #[test]
    fn wait_output_kills_after_the_limit() {
        let f = wait_output(sh("exec sleep 30"), Duration::from_millis(200)).unwrap();
        assert!(f.timed_out);
        assert_eq!(f.code(), -1);
    }

    #[test]
    fn a_big_output_does_not_stall_the_child() {
        let f = wait_output(sh("head -c 1000000 /dev/zero"), Duration::from_secs(10)).unwrap();
        assert!(!f.timed_out && f.success());
        assert_eq!(f.stdout.len(), 1_000_000);
    }

    #[test]
    fn signals_reach_the_child() {
        for (sig, raw) in [(Signal::Term, 15), (Signal::Int, 2), (Signal::Kill, 9)] {
            let child = sh("exec sleep 30");
            signal(child.id(), sig).unwrap();
            let f = wait_output(child, Duration::from_secs(10)).unwrap();
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(f.status.signal(), Some(raw), "{sig:?}");
        }
    }
}
