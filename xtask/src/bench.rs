//! `cargo xtask bench`: what leaving netprobe on costs, measured side by side in one run inside a
//! lab (namespaces only): throughput and connection rate without / with the agent (and with an
//! active trace), a drop storm (generated vs counted in the kernel vs delivered vs lost, agent CPU
//! and memory), attach time for 250 veths, time from a new veth to its attachment, time from
//! a dropped SYN to `trace`'s verdict, and to the agent's own verdict naming the rule, and pod
//! churn ([`churn`]). Writes `bench/results/latest.json` and the numbers section
//! of `BENCHMARKS.md`.

mod churn;

use std::{
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use netprobe_lab::{
    Lab, in_netns, metrics, ports,
    process::{self, Agent, Running, Signal, Spawn},
};
use serde_json::{Value, json};

use crate::build::{netprobe_bin, repo_root};

mod dns_load;
mod peak;
mod storm;
mod traced;
mod verifier;

/// How long a release netprobe may take to attach (250 veths in the attach-time sample).
const READY_LIMIT: Duration = Duration::from_secs(120);
/// Rounds per comparison; modes alternate within a round so drift hits both sides alike.
const ROUNDS: usize = 5;

pub struct Options {
    /// Seconds per throughput / connection-rate sample.
    pub seconds: u64,
    /// Seconds of the drop storm.
    pub storm_seconds: u64,
    /// Soak: a drop storm of this many seconds with the agent's RSS sampled (0: none).
    pub soak_seconds: u64,
    /// Another netprobe binary whose agent is measured beside this build's.
    pub compare_with: Option<PathBuf>,
    /// Seconds of each run of the DNS load case.
    pub dns_seconds: u64,
    /// Run only these cases, keeping the other results of `bench/results/latest.json`.
    pub only: Vec<Case>,
}

/// Cases that can be run alone (`--only`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Case {
    DnsLoad,
    PeakMemory,
    /// The first dropped SYN to the verdict, in `trace` and in the agent.
    VerdictLatency,
    /// Pod create/delete cycles: what the agent holds before and after.
    PodChurn,
    /// iperf3 through the port a `trace` follows, against without netprobe (#18).
    TracedPort,
    /// The verifier's instruction count per program in each filter configuration (#28).
    Verifier,
}

/// The release agent in `node` on `port`, without Kubernetes (the bench measures the datapath).
fn start_agent(node: &str, port: u16, extra: &[&str]) -> Result<Agent> {
    start_agent_of(&netprobe_bin(true), node, port, extra)
}

/// The agent of `bin` (this build's or the one compared with).
fn start_agent_of(bin: &Path, node: &str, port: u16, extra: &[&str]) -> Result<Agent> {
    Agent::start_on(bin, node, port, |s| {
        s.args(extra)
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(Stdio::null())
            .ready_limit(READY_LIMIT)
    })
}

/// SIGTERM; an agent that does not exit cleanly fails the bench.
fn stop_agent(agent: Agent) -> Result<()> {
    agent.stop()?.ok()?;
    Ok(())
}

fn rss_mib(pid: u32) -> f64 {
    proc_status_kib(pid, "VmRSS:") / 1024.0
}

fn proc_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(") ").map(|x| x.1).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn proc_status_kib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// `program → (runs, seconds)` from the agent's `netprobe_program_*` metrics.
fn program_stats(body: &str) -> std::collections::BTreeMap<String, (u64, f64)> {
    let mut out = std::collections::BTreeMap::<String, (u64, f64)>::new();
    for sample in metrics::parse(body) {
        let Some((_, program)) = sample.labels.iter().find(|(k, _)| k == "program") else {
            continue;
        };
        let e = out.entry(program.clone()).or_default();
        match sample.name.as_str() {
            "netprobe_program_runs_total" => e.0 = sample.value as u64,
            "netprobe_program_run_seconds_total" => e.1 = sample.value,
            _ => {}
        }
    }
    out
}

/// What netprobe's programs cost in the kernel between two scrapes `wall_s` apart (the agent
/// runs with `--program-stats`): per program runs per second and ns per run, and their sum as
/// a share of one core.
fn program_cost(before: &str, after: &str, wall_s: f64) -> Value {
    let (b, a) = (program_stats(before), program_stats(after));
    let mut programs = serde_json::Map::new();
    let mut total_s = 0.0;
    for (name, &(runs, secs)) in &a {
        let (runs0, secs0) = b.get(name).copied().unwrap_or_default();
        let (runs, secs) = (runs.saturating_sub(runs0), (secs - secs0).max(0.0));
        if runs == 0 {
            continue;
        }
        total_s += secs;
        programs.insert(
            name.clone(),
            json!({
                "runs_per_s": (runs as f64 / wall_s).round(),
                "ns_per_run": (secs * 1e9 / runs as f64 * 10.0).round() / 10.0,
            }),
        );
    }
    json!({
        "kernel_cpu_percent": (total_s / wall_s * 1000.0).round() / 10.0,
        "programs": programs,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The three modes compared.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Without,
    Agent,
    AgentAndTrace,
    /// The agent of the binary given with `--compare-with`.
    OtherAgent,
}

struct Bench<'a> {
    lab: &'a mut Lab,
    a: netprobe_lab::Pod,
    b: netprobe_lab::Pod,
    port: u16,
    other: Option<PathBuf>,
}

/// A running `netprobe trace` (release) on a port nobody uses in the measurements, and its
/// NDJSON stdout.
fn start_trace(node: &str, port: u16, extra: &[&str]) -> Result<(Running, BufReader<ChildStdout>)> {
    let mut trace = Spawn::trace(&netprobe_bin(true), node)
        .args(["--port", &port.to_string(), "-o", "json"])
        .args(extra)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .ready_limit(READY_LIMIT)
        .start()?;
    let out = BufReader::new(trace.child().stdout.take().context("piped stdout")?);
    Ok((trace, out))
}

/// Ctrl-C, as a user ends a trace.
fn stop_trace(trace: Running) {
    let _ = trace.stop_with(Signal::Int, process::STOP_LIMIT);
}

impl Bench<'_> {
    fn node(&self) -> String {
        self.lab.node().to_string()
    }

    /// Runs `sample` in `mode` (agent / trace started before and stopped after).
    fn in_mode<T>(&mut self, mode: Mode, sample: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let node = self.node();
        let agent = match (mode, &self.other) {
            (Mode::Without, _) => None,
            (Mode::OtherAgent, Some(bin)) => Some(start_agent_of(bin, &node, self.port, &[])?),
            (Mode::OtherAgent, None) => bail!("no binary to compare with"),
            _ => Some(start_agent(&node, self.port, &[])?),
        };
        let trace = match mode {
            Mode::AgentAndTrace => Some(start_trace(&node, 9977, &["--duration", "10m"])?.0),
            _ => None,
        };
        let events = |a: &Option<Agent>| {
            a.as_ref()
                .and_then(|a| a.metrics().ok())
                .map(|m| metrics::sum(&m, "netprobe_events_total", &[]))
                .unwrap_or(0)
        };
        let before = events(&agent);
        let r = sample(self);
        if agent.is_some() {
            // What healthy traffic costs in events: should be none (failures only).
            println!(
                "bench:   agent received {} events during the sample",
                events(&agent) - before
            );
        }
        if let Some(t) = trace {
            stop_trace(t);
        }
        if let Some(a) = agent {
            stop_agent(a)?;
        }
        r
    }

    fn iperf(&mut self, seconds: u64) -> Result<f64> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.a.netns, "iperf3", "-J", "-c"])
            .arg(self.b.ip.to_string())
            .args(["-p", "5201", "-t", &seconds.to_string()])
            .output()
            .context("iperf3 (package iperf3; `cargo xtask setup` installs it)")?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("iperf3 gave no result: {}", v["error"]))
    }

    /// Short connections per second: connect, read until the server closes, drop.
    fn connect_rate(&mut self, seconds: u64) -> Result<f64> {
        let to: SocketAddr = SocketAddr::new(self.b.ip.into(), 7000);
        let ns = self.a.netns.clone();
        let n = in_netns(&ns, move || -> Result<u64> {
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let mut n = 0u64;
            let mut buf = [0u8; 16];
            while Instant::now() < deadline {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
                let _ = s.read(&mut buf);
                n += 1;
            }
            Ok(n)
        })??;
        Ok(n as f64 / seconds as f64)
    }
}

fn compare(
    bench: &mut Bench,
    what: &str,
    modes: &[Mode],
    sample: &dyn Fn(&mut Bench) -> Result<f64>,
) -> Result<Vec<(Mode, f64)>> {
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 0..ROUNDS {
        // Alternate the order each round.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..modes.len()).collect()
        } else {
            (0..modes.len()).rev().collect()
        };
        for i in order {
            let v = bench.in_mode(modes[i], |b| sample(b))?;
            println!("bench: {what} round {} {:?}: {v:.0}", round + 1, modes[i]);
            samples[i].push(v);
        }
    }
    Ok(modes
        .iter()
        .zip(samples)
        .map(|(m, s)| (*m, median(s)))
        .collect())
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mem_gib = proc_meminfo_kib("MemTotal:") / 1024.0 / 1024.0;
    json!({
        "kernel": kernel,
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_gib * 10.0).round() / 10.0,
    })
}

fn proc_meminfo_kib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// One more sample (iperf3 or short connections) with the agent's program statistics on: the
/// in-kernel cost behind a ratio, measured directly (not in the ratio: the statistics add two
/// clock reads per run). `sample` returns the sample's own figure, stored under `key`.
fn program_cost_of(
    bench: &mut Bench,
    key: &str,
    sample: &dyn Fn(&mut Bench) -> Result<f64>,
) -> Result<Value> {
    let node = bench.node();
    let agent = start_agent(&node, bench.port, &["--program-stats"])?;
    // The statistics are refreshed every second; wait for one refresh on each side.
    std::thread::sleep(Duration::from_millis(1100));
    let before = agent.metrics()?;
    let t0 = Instant::now();
    let figure = sample(bench);
    std::thread::sleep(Duration::from_millis(1100));
    let wall = t0.elapsed().as_secs_f64();
    let after = agent.metrics();
    stop_agent(agent)?;
    let mut v = program_cost(&before, &after?, wall);
    v[key] = json!(figure?);
    Ok(v)
}

/// SYNs into a DROP rule at the highest rate hping3 makes, with the agent on.
fn drop_storm(bench: &mut Bench, seconds: u64, rss_samples: bool) -> Result<Value> {
    drop_storm_of(bench, &netprobe_bin(true), seconds, rss_samples)
}

/// A drop storm watched by the agent of `bin`: what it counted, delivered and lost, and what it
/// cost (CPU, RSS, per-program kernel time).
fn drop_storm_of(bench: &mut Bench, bin: &Path, seconds: u64, rss_samples: bool) -> Result<Value> {
    let node = bench.node();
    storm::add_rule(bench)?;
    let agent = start_agent_of(bin, &node, bench.port, &["--program-stats"])?;
    let before = agent.metrics()?;
    let nf = &[("reason", "NETFILTER_DROP")];
    let kernel0 = metrics::sum(&before, "netprobe_kernel_drops_total", nf);
    let delivered0 = metrics::sum(&before, "netprobe_drops_total", nf);
    let lost0 = metrics::sum(&before, "netprobe_lost_events_total", &[]);
    let cpu0 = proc_cpu(agent.id());
    let rss_start = rss_mib(agent.id());
    let t0 = Instant::now();
    let mut flood = storm::flood(bench)?;
    let mut rss = Vec::new();
    let mut delays_ms = Vec::new();
    while t0.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1).min(Duration::from_secs(seconds)));
        if rss_samples {
            rss.push((t0.elapsed().as_secs(), rss_mib(agent.id())));
        }
        // The agent's longest kernel-to-userspace event delay of the last second.
        if let Ok(m) = agent.metrics()
            && let Some(v) = metrics::value(&m, "netprobe_event_delay_max_seconds", &[])
        {
            delays_ms.push(v * 1000.0);
        }
    }
    storm::stop_flood(&mut flood)?;
    let storm_wall = t0.elapsed().as_secs_f64();
    let cpu = proc_cpu(agent.id()) - cpu0;
    // The program statistics are refreshed every second: the last second of the storm is in
    // the scrape after the next refresh (the flood has stopped, so nothing is added).
    std::thread::sleep(Duration::from_millis(1100));
    let programs = program_cost(&before, &agent.metrics()?, storm_wall);
    // Let the agent drain its ring buffer and refresh the kernel counters (200 ms tick).
    std::thread::sleep(Duration::from_millis(1500));
    let after = agent.metrics()?;
    let counters = bench.lab.sh(&node, "iptables -L NP_BENCH_STORM -v -x -n")?;
    let generated: u64 = counters
        .lines()
        .find(|l| l.contains("DROP"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let counted = metrics::sum(&after, "netprobe_kernel_drops_total", nf) - kernel0;
    let delivered = metrics::sum(&after, "netprobe_drops_total", nf) - delivered0;
    let lost = metrics::sum(&after, "netprobe_lost_events_total", &[]) - lost0;
    let rss_end = rss_mib(agent.id());
    let hwm = proc_status_kib(agent.id(), "VmHWM:") / 1024.0;
    // What the storm made the agent do besides counting: arm flows for a trace (bounded), read
    // rule counters (at most every 200 ms), judge attempts (bounded).
    let armed = |r: &str| metrics::sum(&after, "netprobe_armed_flows_total", &[("result", r)]);
    let verdict_work = json!({
        "flows_armed": armed("armed"),
        "arms_refused_at_bound": armed("refused"),
        "rule_counter_reads": metrics::sum(&after, "netprobe_rule_counter_reads_total", &[]),
        "attempts_judged_early": metrics::sum(
            &after,
            "netprobe_verdict_engine_evicted_total",
            &[("reason", "judged_early")]
        ),
    });
    stop_agent(agent)?;
    storm::del_rule(bench)?;
    let mut v = json!({
        "seconds": (storm_wall * 10.0).round() / 10.0,
        "generated": generated,
        "counted": counted,
        "delivered": delivered,
        "lost": lost,
        "rate_per_s": (generated as f64 / storm_wall).round(),
        "agent_cpu_percent": (cpu / storm_wall * 1000.0).round() / 10.0,
        // Userspace cost of one delivered event (the agent's CPU time, all threads).
        "agent_cpu_us_per_event": if delivered > 0 { (cpu / delivered as f64 * 1e8).round() / 100.0 } else { 0.0 },
        "agent_rss_start_mib": (rss_start * 10.0).round() / 10.0,
        "agent_rss_end_mib": (rss_end * 10.0).round() / 10.0,
        "agent_rss_peak_mib": (hwm * 10.0).round() / 10.0,
        "program_cost": programs,
        "verdict_work": verdict_work,
    });
    delays_ms.sort_by(|a, b| a.total_cmp(b));
    let p99 = delays_ms
        .get((delays_ms.len() * 99 / 100).min(delays_ms.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0);
    v["event_delay_ms"] = json!({
        "p99_of_1s_maxima": (p99 * 100.0).round() / 100.0,
        "max": (delays_ms.last().copied().unwrap_or(0.0) * 100.0).round() / 100.0,
    });
    if rss_samples {
        v["rss_samples_mib"] = json!(rss);
    }
    Ok(v)
}

/// Attach time for 250 veths (agent start to ready, minus the start time with the lab's few
/// veths), and time from a new veth's creation to its attachment.
fn attach(bench: &mut Bench, baseline_start_s: f64) -> Result<(f64, usize, f64)> {
    let node = bench.node();
    let peers = format!("{node}-peers");
    // From here, not from inside `ip netns exec` (whose private mount namespace would keep the
    // new namespace's bind mount to itself).
    let st = Command::new("ip").args(["netns", "add", &peers]).status()?;
    if !st.success() {
        bail!("ip netns add {peers} failed");
    }
    let cleanup = |lab: &Lab| {
        let _ = lab.sh(
            &node,
            "for i in $(seq 0 250); do ip link del npb$i 2>/dev/null; done; true",
        );
        let _ = Command::new("ip").args(["netns", "del", &peers]).status();
    };
    let mut batch = String::new();
    for i in 0..250 {
        batch.push_str(&format!(
            "link add npb{i} type veth peer name npp{i} netns {peers}\nlink set npb{i} up\n"
        ));
    }
    let file = std::env::temp_dir().join(format!("netprobe-bench-veths-{}", std::process::id()));
    std::fs::write(&file, batch)?;
    let made = bench
        .lab
        .sh(&node, &format!("ip -batch {}", file.display()));
    let _ = std::fs::remove_file(&file);
    if let Err(e) = made {
        cleanup(bench.lab);
        return Err(e);
    }
    let result = (|| -> Result<(f64, usize, f64)> {
        let t0 = Instant::now();
        let agent = start_agent(&node, bench.port, &[])?;
        let start_s = t0.elapsed().as_secs_f64();
        let m = agent.metrics()?;
        let attached = metrics::sum(&m, "netprobe_attached_interfaces", &[]) as usize;
        // A new veth: how long until the agent has attached to it.
        let mut lat = Vec::new();
        for k in 0..5 {
            let before = metrics::sum(&agent.metrics()?, "netprobe_attached_interfaces", &[]);
            let t = Instant::now();
            bench.lab.sh(
                &node,
                &format!("ip link add npn{k} type veth peer name npq{k} netns {peers} && ip link set npn{k} up"),
            )?;
            loop {
                let now = metrics::sum(&agent.metrics()?, "netprobe_attached_interfaces", &[]);
                if now > before {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    break;
                }
                if t.elapsed() > Duration::from_secs(5) {
                    bail!("new veth npn{k} not attached within 5 s");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        stop_agent(agent)?;
        for k in 0..5 {
            let _ = bench.lab.sh(&node, &format!("ip link del npn{k}"));
        }
        Ok(((start_s - baseline_start_s).max(0.0), attached, median(lat)))
    })();
    cleanup(bench.lab);
    result
}

/// Time from the first dropped SYN to the verdict `trace` prints.
fn verdict_latency(bench: &mut Bench) -> Result<(f64, String)> {
    let node = bench.node();
    bench
        .lab
        .sh(&node, "iptables -I FORWARD -p tcp --dport 9998 -j DROP")?;
    let r = (|| -> Result<(f64, String)> {
        let (trace, mut out) = start_trace(&node, 9998, &["--count", "1", "--duration", "60s"])?;
        let to: SocketAddr = SocketAddr::new(bench.b.ip.into(), 9998);
        let ns = bench.a.netns.clone();
        let t0 = Instant::now();
        let client = std::thread::spawn(move || {
            let _ = in_netns(&ns, move || {
                TcpStream::connect_timeout(&to, Duration::from_secs(10))
            });
        });
        let mut line = String::new();
        let found = loop {
            line.clear();
            if out.read_line(&mut line)? == 0 {
                break None;
            }
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if v["kind"] == "verdict" {
                break Some((
                    t0.elapsed().as_secs_f64(),
                    v["outcome"].as_str().unwrap_or("").to_string(),
                ));
            }
        };
        stop_trace(trace);
        let _ = client.join();
        found.context("trace ended without a verdict")
    })();
    bench
        .lab
        .sh(&node, "iptables -D FORWARD -p tcp --dport 9998 -j DROP")?;
    r
}

/// One failure the agent alone explains: how long from the client's first SYN to the agent's
/// verdict on stdout, the outcome, the rule it names (empty: none) and the address it says the
/// client dialled (empty: the server's own).
struct AgentVerdict {
    seconds: f64,
    outcome: String,
    rule: String,
    dialed: String,
}

/// The agent's verdicts on its NDJSON stdout, read on a thread: (server port, arrival, verdict).
fn verdict_lines(agent: &mut Agent) -> Result<std::sync::mpsc::Receiver<(u64, Instant, Value)>> {
    let out = agent.proc.child().stdout.take().context("piped stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if v["kind"] == "verdict" {
                let port = v["server"]["port"].as_u64().unwrap_or(0);
                if tx.send((port, Instant::now(), v)).is_err() {
                    break;
                }
            }
        }
    });
    Ok(rx)
}

/// The ClusterIP of the bench's Service, DNAT-ed to bench-b on [`SERVICE_PORT`].
const CLUSTER_IP: &str = "10.43.0.95";
const SERVICE_PORT: u16 = 9995;

/// An agent case: name, server port, the FORWARD rule's target, and whether the client dials
/// the Service's ClusterIP (kube-proxy-style DNAT to bench-b) instead of bench-b itself.
type AgentCase = (&'static str, u16, &'static str, bool);

const AGENT_CASES: [AgentCase; 3] = [
    ("retried_drop", 9997, "DROP", false),
    ("reject", 9996, "REJECT", false),
    ("service_drop", SERVICE_PORT, "DROP", true),
];

/// The rules of the agent cases added (`-I`) or deleted (`-D`) in the node.
fn agent_case_rules(bench: &Bench, op: &str) -> Result<()> {
    let node = bench.node();
    for (_, port, target, _) in AGENT_CASES {
        bench.lab.sh(
            &node,
            &format!("iptables {op} FORWARD -p tcp --dport {port} -j {target}"),
        )?;
    }
    bench.lab.sh(
        &node,
        &format!(
            "iptables -t nat {op} PREROUTING -d {CLUSTER_IP} -p tcp --dport {SERVICE_PORT} -j DNAT --to-destination {}:{SERVICE_PORT}",
            bench.b.ip
        ),
    )?;
    Ok(())
}

/// The API stand-in with the bench's Service and its endpoint (bench-b), so that the agent
/// knows the dropped SYN went to a Service endpoint; its kubeconfig file.
fn bench_kube(bench: &Bench) -> Result<(netprobe_lab::kubeapi::FakeKube, PathBuf)> {
    use netprobe_lab::kubeapi::{FakeKube, Kind, endpoint_slice, service};
    let kube = FakeKube::start(bench.lab.listen(&bench.node(), "127.0.0.1:0".parse()?)?);
    kube.apply(
        Kind::Service,
        service(
            "default",
            "bench-svc",
            CLUSTER_IP,
            &[("tcp", SERVICE_PORT, SERVICE_PORT)],
        ),
    );
    kube.apply(
        Kind::EndpointSlice,
        endpoint_slice(
            "default",
            "bench-svc",
            &[(&bench.b.ip.to_string(), "bench-b")],
            &[("tcp", SERVICE_PORT)],
        ),
    );
    let path = std::env::temp_dir().join(format!("netprobe-bench-kubeconfig-{}", kube.port));
    std::fs::write(&path, kube.kubeconfig())?;
    Ok((kube, path))
}

/// Time from the first SYN to the agent's verdict, with the agent alone, for a SYN dropped by a
/// rule that the client would retry (the rule is named from the counters read at the first
/// drop: the verdict comes before the retransmit, issue #16 item 9), for the same through a
/// Service's ClusterIP (the drop's conntrack entry names the ClusterIP at once), and for a
/// REJECT the client does not retry (named from the rule counters).
fn agent_verdict_latency(bench: &mut Bench) -> Result<Vec<(&'static str, AgentVerdict)>> {
    agent_case_rules(bench, "-I")?;
    let r = (|| -> Result<Vec<(&'static str, AgentVerdict)>> {
        let (_kube, kubeconfig) = bench_kube(bench)?;
        let mut agent = Agent::start_on(&netprobe_bin(true), &bench.node(), bench.port, |s| {
            s.env("KUBECONFIG", &kubeconfig)
                .env("NODE_NAME", "bench-node")
                .env_remove("KUBERNETES_SERVICE_HOST")
                .stdout(Stdio::piped())
                .ready_limit(READY_LIMIT)
        })?;
        let verdicts = verdict_lines(&mut agent);
        let found = verdicts.and_then(|v| {
            AGENT_CASES
                .into_iter()
                .map(|case| Ok((case.0, agent_case(bench, &v, case)?)))
                .collect::<Result<Vec<_>>>()
        });
        stop_agent(agent)?;
        let _ = std::fs::remove_file(&kubeconfig);
        found
    })();
    agent_case_rules(bench, "-D")?;
    r
}

/// One agent case: the client dials, the agent's verdict for its port.
fn agent_case(
    bench: &Bench,
    verdicts: &std::sync::mpsc::Receiver<(u64, Instant, Value)>,
    (name, port, _, via_service): AgentCase,
) -> Result<AgentVerdict> {
    let to = if via_service {
        SocketAddr::new(CLUSTER_IP.parse()?, port)
    } else {
        SocketAddr::new(bench.b.ip.into(), port)
    };
    let ns = bench.a.netns.clone();
    let t0 = Instant::now();
    let client = std::thread::spawn(move || {
        let _ = in_netns(&ns, move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(3))
        });
    });
    let deadline = t0 + Duration::from_secs(10);
    let (at, v) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match verdicts.recv_timeout(left) {
            Ok((p, at, v)) if p == u64::from(port) => break (at, v),
            Ok(_) => continue,
            Err(_) => bail!("no agent verdict for the {name} case within 10 s"),
        }
    };
    let _ = client.join();
    let nf = &v["netfilter"];
    Ok(AgentVerdict {
        seconds: at.duration_since(t0).as_secs_f64(),
        outcome: v["outcome"].as_str().unwrap_or("").to_string(),
        rule: match nf["chain"].as_str() {
            Some(c) => format!(
                "{} {} #{}",
                nf["table"].as_str().unwrap_or(""),
                c,
                nf["position"]
            ),
            None => String::new(),
        },
        dialed: v["dialed"]["addr"].as_str().unwrap_or("").to_string(),
    })
}

pub fn run(skip_setup: bool, opts: &Options) -> Result<()> {
    netprobe_lab::require_root();
    if !skip_setup {
        crate::setup::run()?;
    }
    crate::build::build(true)?;
    Lab::cleanup_stale("np-bench");
    let mut lab = Lab::new("bench")?;
    let a = lab.add_pod("default", "bench-a", "10.42.0.2".parse()?)?;
    let b = lab.add_pod("default", "bench-b", "10.42.0.3".parse()?)?;
    lab.spawn(&b.netns, &["iperf3", "-s", "-p", "5201"])?;
    netprobe_lab::serve(lab.listen(&b.netns, SocketAddr::new(b.ip.into(), 7000))?);
    // Short connections from one client: every ephemeral port, reused quickly.
    lab.sh(
        &a.netns,
        "sysctl -qw net.ipv4.ip_local_port_range='1024 65535' net.ipv4.tcp_tw_reuse=1",
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let port = ports::free_tcp(lab.node())?;
    let mut bench = Bench {
        lab: &mut lab,
        a,
        b,
        port,
        other: opts.compare_with.clone(),
    };
    let machine = machine();
    println!("bench: machine {machine}");
    if !opts.only.is_empty() {
        let mut cases = bounded_cases(&mut bench, opts)?;
        if opts.only.contains(&Case::VerdictLatency) {
            cases.extend(latency_cases(&mut bench)?);
        }
        if opts.only.contains(&Case::PodChurn) {
            cases.push(("pod_churn", churn::pod_churn()?));
        }
        if opts.only.contains(&Case::TracedPort) {
            let mut v = traced::traced_port(&mut bench, opts.seconds)?;
            v["measured"] = json!({"date": now_utc(), "commit": head_commit()});
            cases.push(("traced_port", v));
        }
        drop(bench);
        drop(lab);
        return write_only(cases);
    }

    // Agent start time with the lab's few veths (baseline for the 250-veth attach time).
    let node = bench.node();
    let t = Instant::now();
    stop_agent(start_agent(&node, port, &[])?)?;
    let baseline_start_s = t.elapsed().as_secs_f64();

    let mut modes = vec![Mode::Without, Mode::Agent];
    if opts.compare_with.is_some() {
        modes.push(Mode::OtherAgent);
    }
    let rate_modes = modes.clone();
    modes.push(Mode::AgentAndTrace);
    let secs = opts.seconds;
    let tput = compare(&mut bench, "throughput bit/s", &modes, &|b| b.iperf(secs))?;
    let rate = compare(&mut bench, "connects/s", &rate_modes, &|b| {
        b.connect_rate(secs)
    })?;
    let iperf_cost = program_cost_of(&mut bench, "gbit_s", &|b| {
        Ok((b.iperf(secs)? / 1e7).round() / 100.0)
    })?;
    println!("bench: program cost under iperf3 {iperf_cost}");
    let connect_cost = program_cost_of(&mut bench, "connects_per_s", &|b| {
        Ok(b.connect_rate(secs)?.round())
    })?;
    println!("bench: program cost of short connections {connect_cost}");
    let storm = drop_storm(&mut bench, opts.storm_seconds, false)?;
    println!("bench: storm {storm}");
    let other_storm = match &opts.compare_with {
        Some(bin) => Some(drop_storm_of(&mut bench, bin, opts.storm_seconds, false)?),
        None => None,
    };
    let (attach_250_s, attached, new_veth_ms) = attach(&mut bench, baseline_start_s)?;
    let latencies = latency_cases(&mut bench)?;
    let pod_churn = churn::pod_churn()?;
    println!("bench: pod churn {pod_churn}");
    let soak = if opts.soak_seconds > 0 {
        let s = drop_storm(&mut bench, opts.soak_seconds, true)?;
        Some(s)
    } else {
        None
    };

    let ratio = |v: &[(Mode, f64)], m: Mode| {
        let base = v
            .iter()
            .find(|x| x.0 == Mode::Without)
            .map(|x| x.1)
            .unwrap_or(0.0);
        let with = v.iter().find(|x| x.0 == m).map(|x| x.1).unwrap_or(0.0);
        if base > 0.0 {
            (with / base * 1000.0).round() / 1000.0
        } else {
            0.0
        }
    };
    let get = |v: &[(Mode, f64)], m: Mode| v.iter().find(|x| x.0 == m).map(|x| x.1).unwrap_or(0.0);
    let mut results = json!({
        "date": Command::new("date").arg("-u").arg("+%Y-%m-%dT%H:%M:%SZ").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default(),
        "machine": machine,
        "commit": Command::new("git").args(["rev-parse", "--short", "HEAD"]).current_dir(repo_root()).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default(),
        "sample_seconds": secs,
        "rounds": ROUNDS,
        "throughput_ratio": ratio(&tput, Mode::Agent),
        "throughput_ratio_with_trace": ratio(&tput, Mode::AgentAndTrace),
        "throughput_gbit_s": {
            "without": (get(&tput, Mode::Without) / 1e7).round() / 100.0,
            "agent": (get(&tput, Mode::Agent) / 1e7).round() / 100.0,
            "agent_and_trace": (get(&tput, Mode::AgentAndTrace) / 1e7).round() / 100.0,
        },
        "connect_rate_ratio": ratio(&rate, Mode::Agent),
        "connects_per_s": {
            "without": get(&rate, Mode::Without).round(),
            "agent": get(&rate, Mode::Agent).round(),
        },
        "iperf3_program_cost": iperf_cost,
        "connect_program_cost": connect_cost,
        "storm": storm,
        "agent_rss_mib": storm["agent_rss_peak_mib"],
        "agent_start_s": (baseline_start_s * 1000.0).round() / 1000.0,
        "attach_250_s": (attach_250_s * 1000.0).round() / 1000.0,
        "attached_interfaces": attached,
        "new_veth_attach_ms": (new_veth_ms * 10.0).round() / 10.0,
    });
    for (k, v) in latencies {
        results[k] = v;
    }
    if let (Some(bin), Some(other_storm)) = (&opts.compare_with, other_storm) {
        results["compared_with"] = json!({
            "binary": bin.display().to_string(),
            "throughput_ratio": ratio(&tput, Mode::OtherAgent),
            "throughput_gbit_s": (get(&tput, Mode::OtherAgent) / 1e7).round() / 100.0,
            "connect_rate_ratio": ratio(&rate, Mode::OtherAgent),
            "connects_per_s": get(&rate, Mode::OtherAgent).round(),
            "storm": other_storm,
        });
    }
    results["pod_churn"] = pod_churn;
    if let Some(s) = soak {
        results["soak"] = s;
    } else if let Some(prev) = previous_soak(&repo_root().join("bench/results/latest.json")) {
        // A run without --soak-seconds keeps the last soak, saying where it came from.
        results["soak"] = prev;
    }
    for (k, v) in bounded_cases(&mut bench, opts)? {
        results[k] = v;
    }
    drop(bench);
    drop(lab);
    write_results(&results)
}

/// The verdict latencies (`--only verdict-latency`): `trace`'s, then the agent's cases.
fn latency_cases(bench: &mut Bench) -> Result<Vec<(&'static str, Value)>> {
    let (verdict_s, outcome) = verdict_latency(bench)?;
    println!("bench: trace verdict {verdict_s:.3} s ({outcome})");
    let agent_verdicts = agent_verdict_latency(bench)?;
    let agent: serde_json::Map<_, _> = agent_verdicts
        .iter()
        .map(|(name, v)| {
            println!(
                "bench: agent verdict {name} {:.3} s ({})",
                v.seconds, v.outcome
            );
            let v = json!({
                "seconds": (v.seconds * 1000.0).round() / 1000.0,
                "outcome": v.outcome,
                "rule": v.rule,
                "dialed": v.dialed,
            });
            (name.to_string(), v)
        })
        .collect();
    Ok(vec![
        (
            "verdict_latency_s",
            json!((verdict_s * 1000.0).round() / 1000.0),
        ),
        ("verdict_outcome", json!(outcome)),
        ("agent_verdict", Value::Object(agent)),
    ])
}

/// The DNS load, peak memory and verifier cases (all, or those of `--only`), each stamped with its date
/// and commit (a run with `--only` keeps older figures beside them).
fn bounded_cases(bench: &mut Bench, opts: &Options) -> Result<Vec<(&'static str, Value)>> {
    let wanted = |c: Case| opts.only.is_empty() || opts.only.contains(&c);
    let mut out = Vec::new();
    if wanted(Case::DnsLoad) {
        let v = dns_load::dns_load(bench, opts.dns_seconds, opts.compare_with.as_deref())?;
        out.push(("dns_load", v));
    }
    if wanted(Case::PeakMemory) {
        let other = opts.compare_with.as_deref();
        let v = peak::peak_memory(bench, opts.storm_seconds, other)?;
        out.push(("peak_memory", v));
    }
    if wanted(Case::Verifier) {
        let v = verifier::verifier(bench, opts.compare_with.as_deref())?;
        out.push(("verifier", v));
    }
    for (_, v) in &mut out {
        v["measured"] = json!({"date": now_utc(), "commit": head_commit()});
    }
    Ok(out)
}

fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn head_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(repo_root())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// `--only`: these cases replace theirs in the previous results; the rest is kept.
fn write_only(cases: Vec<(&'static str, Value)>) -> Result<()> {
    let path = repo_root().join("bench/results/latest.json");
    let mut results: Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({}));
    for (k, v) in cases {
        results[k] = v;
    }
    write_results(&results)
}

fn write_results(results: &Value) -> Result<()> {
    let dir = repo_root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("latest.json");
    std::fs::write(&path, serde_json::to_string_pretty(results)? + "\n")?;
    let table = table(results);
    println!("\n{table}");
    println!("bench: wrote {}", path.display());
    update_benchmarks_md(&repo_root().join("BENCHMARKS.md"), &table)?;
    Ok(())
}

/// The soak of the previous results file, tagged with that run's date and commit.
fn previous_soak(path: &Path) -> Option<Value> {
    let prev: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let mut soak = prev.get("soak")?.clone();
    if soak.get("from").is_none() {
        soak["from"] = json!({"date": prev["date"], "commit": prev["commit"]});
    }
    Some(soak)
}

fn table(r: &Value) -> String {
    let s = &r["storm"];
    let m = &r["machine"];
    let mut t = format!(
        "Measured {} on {} ({} cores, {} GiB, kernel {}), commit {}; medians of {} alternating rounds of {} s.\n\n",
        r["date"].as_str().unwrap_or(""),
        m["cpu"].as_str().unwrap_or(""),
        m["cores"],
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or(""),
        r["commit"].as_str().unwrap_or(""),
        r["rounds"],
        r["sample_seconds"],
    );
    t.push_str("| measure | without netprobe | with `netprobe agent` | ratio (goal) |\n|---|---|---|---|\n");
    t.push_str(&format!(
        "| iperf3 TCP over veths, Gbit/s | {} | {} | **{}** (≥ 0.98) |\n",
        r["throughput_gbit_s"]["without"], r["throughput_gbit_s"]["agent"], r["throughput_ratio"]
    ));
    t.push_str(&format!(
        "| … with an active `trace` on another port | {} | {} | **{}** |\n",
        r["throughput_gbit_s"]["without"],
        r["throughput_gbit_s"]["agent_and_trace"],
        r["throughput_ratio_with_trace"]
    ));
    t.push_str(&format!(
        "| short TCP connections per second | {} | {} | **{}** (≥ 0.95) |\n\n",
        r["connects_per_s"]["without"], r["connects_per_s"]["agent"], r["connect_rate_ratio"]
    ));
    if let Some(c) = r.get("compared_with") {
        t.push_str(&compared_table(r, c));
    }
    t.push_str(&program_cost_table(r));
    t.push_str("| drop storm (hping3 --flood SYNs into an iptables DROP) | value |\n|---|---|\n");
    for (k, label) in [
        ("generated", "drops generated (rule counter)"),
        (
            "counted",
            "counted in the kernel by netprobe (must equal generated)",
        ),
        ("delivered", "drop events delivered to the agent"),
        ("lost", "events reported lost (ring buffer full)"),
        ("rate_per_s", "storm rate, drops/s"),
        (
            "agent_cpu_percent",
            "agent CPU during the storm, % of one core",
        ),
        ("agent_rss_peak_mib", "agent peak RSS, MiB"),
    ] {
        t.push_str(&format!("| {label} | {} |\n", s[k]));
    }
    t.push_str(&format!(
        "| kernel-to-agent event delay, max, ms | {} |\n",
        s["event_delay_ms"]["max"]
    ));
    let w = &s["verdict_work"];
    t.push_str(&format!(
        "| flows armed for a rule trace (bound: 32 at once, 4 new a second) / arms refused at a bound | {} / {} |\n| rule counter reads (at most one per 200 ms) | {} |\n| attempts judged early (bound: 4096 open) | {} |\n",
        w["flows_armed"], w["arms_refused_at_bound"], w["rule_counter_reads"], w["attempts_judged_early"]
    ));
    t.push_str("\n| timing | value |\n|---|---|\n");
    t.push_str(&format!(
        "| agent start to ready (lab with 2 veths), s | {} |\n",
        r["agent_start_s"]
    ));
    t.push_str(&format!(
        "| extra start time with 250 more veths (`attach_250_s`), s | {} ({} interfaces attached) |\n",
        r["attach_250_s"], r["attached_interfaces"]
    ));
    t.push_str(&format!(
        "| new veth to attached (median of 5), ms | {} |\n",
        r["new_veth_attach_ms"]
    ));
    t.push_str(&format!(
        "| first dropped SYN to `trace` verdict (`{}`), s | {} (≤ 1: before the first retransmit) |\n",
        r["verdict_outcome"].as_str().unwrap_or(""),
        r["verdict_latency_s"]
    ));
    for (case, label, goal) in [
        (
            "retried_drop",
            "a SYN dropped by a rule, retried",
            "≤ 1: before the first retransmit",
        ),
        ("reject", "a REJECT, not retried", "≤ 0.5"),
        (
            "service_drop",
            "a SYN to a ClusterIP dropped by a rule at its endpoint, retried",
            "≤ 1: before the first retransmit",
        ),
    ] {
        let v = &r["agent_verdict"][case];
        if v.is_null() {
            continue;
        }
        let dialed = v["dialed"]
            .as_str()
            .filter(|d| !d.is_empty())
            .map(|d| format!(", dialled {d}"))
            .unwrap_or_default();
        t.push_str(&format!(
            "| first SYN to the agent's verdict naming the rule: {label} (`{}`, {}{dialed}), s | {} ({goal}) |\n",
            v["outcome"].as_str().unwrap_or(""),
            v["rule"].as_str().filter(|r| !r.is_empty()).unwrap_or("no rule named"),
            v["seconds"]
        ));
    }
    if let Some(soak) = r.get("soak") {
        t.push_str(&format!(
            "\nSoak{}: {} s drop storm, {} drops generated, {} counted, {} delivered, {} lost; agent RSS {} MiB at start, {} MiB at end, peak {} MiB; kernel-to-agent event delay: max {} ms, p99 of the per-second maxima {} ms.\n",
            soak.get("from").map(|f| format!(" (run of {}, commit {})", f["date"].as_str().unwrap_or(""), f["commit"].as_str().unwrap_or(""))).unwrap_or_default(),
            soak["seconds"], soak["generated"], soak["counted"], soak["delivered"], soak["lost"],
            soak["agent_rss_start_mib"], soak["agent_rss_end_mib"], soak["agent_rss_peak_mib"],
            soak["event_delay_ms"]["max"], soak["event_delay_ms"]["p99_of_1s_maxima"]
        ));
    }
    if let Some(c) = r.get("pod_churn") {
        t.push_str(&churn::table(c));
    }
    if let Some(c) = r.get("traced_port") {
        t.push_str(&traced::table(c));
    }
    t.push_str(&bounded_tables(r));
    t
}

/// The DNS load, peak memory and verifier cases, with the run each comes from.
fn bounded_tables(r: &Value) -> String {
    let from = |v: &Value| {
        format!(
            "\n_Measured {}, commit {}:_\n\n",
            v["measured"]["date"].as_str().unwrap_or(""),
            v["measured"]["commit"].as_str().unwrap_or("")
        )
    };
    let mut t = String::new();
    if let Some(d) = r.get("dns_load") {
        t.push_str(&from(d));
        t.push_str(&dns_load::table(d));
    }
    if let Some(p) = r.get("peak_memory") {
        t.push_str(&from(p));
        t.push_str(&peak::table(p));
    }
    if let Some(v) = r.get("verifier") {
        t.push_str(&from(v));
        t.push_str(&verifier::table(v));
    }
    t
}

/// This build beside the binary given with `--compare-with`, measured in the same rounds.
fn compared_table(r: &Value, c: &Value) -> String {
    let (s, o) = (&r["storm"], &c["storm"]);
    let mut t = format!(
        "Side by side with `{}` (same rounds, same lab):\n\n| measure | this build | compared binary |\n|---|---|---|\n",
        c["binary"].as_str().unwrap_or("")
    );
    for (label, this, other) in [
        (
            "iperf3 ratio to without netprobe",
            &r["throughput_ratio"],
            &c["throughput_ratio"],
        ),
        (
            "short-connection ratio to without netprobe",
            &r["connect_rate_ratio"],
            &c["connect_rate_ratio"],
        ),
        ("storm: drops delivered", &s["delivered"], &o["delivered"]),
        ("storm: events lost", &s["lost"], &o["lost"]),
        (
            "storm: agent CPU, % of one core",
            &s["agent_cpu_percent"],
            &o["agent_cpu_percent"],
        ),
        (
            "storm: agent CPU per delivered event, µs",
            &s["agent_cpu_us_per_event"],
            &o["agent_cpu_us_per_event"],
        ),
        (
            "storm: kfree_skb kernel time per run, ns",
            &s["program_cost"]["programs"]["kfree_skb"]["ns_per_run"],
            &o["program_cost"]["programs"]["kfree_skb"]["ns_per_run"],
        ),
        (
            "storm: agent peak RSS, MiB",
            &s["agent_rss_peak_mib"],
            &o["agent_rss_peak_mib"],
        ),
    ] {
        t.push_str(&format!("| {label} | {this} | {other} |\n"));
    }
    t.push('\n');
    t
}

/// The in-kernel cost of each program under iperf3, short connections and the drop storm.
fn program_cost_table(r: &Value) -> String {
    let columns = [
        &r["iperf3_program_cost"],
        &r["connect_program_cost"],
        &r["storm"]["program_cost"],
    ];
    let mut names: Vec<&String> = columns
        .iter()
        .filter_map(|c| c["programs"].as_object())
        .flat_map(|m| m.keys())
        .collect();
    names.sort();
    names.dedup();
    let cell = |v: &Value, name: &str| {
        let p = &v["programs"][name];
        if p.is_null() {
            "–".to_string()
        } else {
            format!("{} ns × {}/s", p["ns_per_run"], p["runs_per_s"])
        }
    };
    let mut t = String::from(
        "| in-kernel cost per program run (kernel run-time statistics, agent `--program-stats`) | iperf3 | short connections | drop storm |\n|---|---|---|---|\n",
    );
    for name in names {
        let cells: Vec<String> = columns.iter().map(|c| cell(c, name)).collect();
        t.push_str(&format!("| `{name}` | {} |\n", cells.join(" | ")));
    }
    let share: Vec<String> = columns
        .iter()
        .map(|c| c["kernel_cpu_percent"].to_string())
        .collect();
    t.push_str(&format!(
        "| all of netprobe's programs, % of one core | {} |\n",
        share.join(" | ")
    ));
    let c = &r["connect_program_cost"];
    if let (Some(pct), Some(rate)) = (
        c["kernel_cpu_percent"].as_f64(),
        c["connects_per_s"].as_f64(),
    ) && rate > 0.0
    {
        t.push_str(&format!(
            "| … per short connection, µs | | {:.2} | |\n",
            pct / 100.0 / rate * 1e6
        ));
    }
    t.push('\n');
    t
}

const BEGIN: &str = "<!-- bench:begin (written by `cargo xtask bench`) -->";
const END: &str = "<!-- bench:end -->";

fn update_benchmarks_md(path: &Path, table: &str) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{table}{END}");
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{block}{}", &text[..b], &text[e + END.len()..]),
        _ => format!("# Benchmarks\n\n{block}\n"),
    };
    std::fs::write(path, new)?;
    println!("bench: updated {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_cost_is_the_difference_of_two_scrapes() {
        let before = "netprobe_program_runs_total{program=\"tc_ingress\"} 1000\n\
                      netprobe_program_run_seconds_total{program=\"tc_ingress\"} 0.000100000\n\
                      netprobe_program_runs_total{program=\"kfree_skb\"} 7\n\
                      netprobe_program_run_seconds_total{program=\"kfree_skb\"} 0.000001000\n";
        let after = "# HELP netprobe_program_runs_total …\n\
                     netprobe_program_runs_total{program=\"tc_ingress\"} 201000\n\
                     netprobe_program_run_seconds_total{program=\"tc_ingress\"} 0.020100000\n\
                     netprobe_program_runs_total{program=\"kfree_skb\"} 7\n\
                     netprobe_program_run_seconds_total{program=\"kfree_skb\"} 0.000001000\n\
                     netprobe_events_total 3\n";
        let v = program_cost(before, after, 2.0);
        assert_eq!(v["programs"]["tc_ingress"]["runs_per_s"], 100000.0);
        assert_eq!(v["programs"]["tc_ingress"]["ns_per_run"], 100.0);
        // Programs that did not run in between are left out.
        assert!(v["programs"].get("kfree_skb").is_none());
        assert_eq!(v["kernel_cpu_percent"], 1.0);
    }
}
