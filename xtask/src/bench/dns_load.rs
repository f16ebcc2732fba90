//! The "dns load" case: a DNS server in a lab pod answering a load generator (many sockets,
//! random ids) as fast as it goes, plus a spoofed random-source UDP/53 flood towards it; run
//! without netprobe, with this build's agent, and with the compared binary's. What it shows: the
//! lookups/s the agent leaves, its CPU, its RSS over the run (flat once the engine's caps are
//! reached), and what the DNS engine let go of (`netprobe_verdict_engine_evicted_total`).

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use netprobe_lab::{
    in_netns, metrics,
    process::{self, Agent, Signal},
};
use serde_json::{Value, json};

use super::{Bench, proc_cpu, proc_status_kib, rss_mib, start_agent_of, stop_agent};

/// Sockets of the generator (each a stub resolver's), and queries in flight on each.
const SOCKETS: usize = 64;
const WINDOW: u32 = 4;
/// A socket is replaced by a new one (a new source port) after this many answers.
const ROTATE: u32 = 256;
/// Queries in flight on a socket that got no answer for this long are counted lost.
const LOST_AFTER: Duration = Duration::from_millis(200);
/// Interval between two flood datagrams (hping3 `-i u…`): at most 25 000/s, so the flood shares
/// the two cores with the lookups rather than taking them.
const FLOOD_INTERVAL_US: u32 = 40;
/// "Flat": over the second half of the run (the caps are reached within the first second), the
/// agent's RSS moves by at most this much.
pub const FLAT_MIB: f64 = 2.0;

/// The server: the lab's DNS stand-in on `addr:53` in `netns`, two threads on one socket.
fn serve(netns: &str, addr: Ipv4Addr) -> Result<()> {
    let sock = in_netns(netns, || UdpSocket::bind((addr, 53)))?.context("bind udp/53")?;
    let second = sock.try_clone()?;
    netprobe_lab::dns::serve(sock, Some(Ipv4Addr::new(10, 43, 7, 7)));
    netprobe_lab::dns::serve(second, Some(Ipv4Addr::new(10, 43, 7, 7)));
    Ok(())
}

/// One stub resolver socket of the generator.
struct Slot {
    sock: UdpSocket,
    inflight: u32,
    answers: u32,
    last_answer: Instant,
}

fn slot(server: SocketAddr) -> std::io::Result<Slot> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.connect(server)?;
    sock.set_nonblocking(true)?;
    Ok(Slot {
        sock,
        inflight: 0,
        answers: 0,
        last_answer: Instant::now(),
    })
}

/// What the generator reached.
struct Load {
    answered: u64,
    lost: u64,
}

/// xorshift64: random ids and names, no dependency.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Keeps [`WINDOW`] queries in flight on each of [`SOCKETS`] sockets for `seconds`.
fn generate(server: SocketAddr, seconds: f64) -> std::io::Result<Load> {
    let mut slots = (0..SOCKETS)
        .map(|_| slot(server))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let (mut answered, mut lost) = (0u64, 0u64);
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        for s in &mut slots {
            if s.answers >= ROTATE && s.inflight == 0 {
                *s = slot(server)?;
            }
            while s.answers < ROTATE && s.inflight < WINDOW {
                let r = next(&mut rng);
                let name = format!("svc-{}.bench.svc.cluster.local", r % 1000);
                match s
                    .sock
                    .send(&netprobe_lab::dns::a_query((r >> 16) as u16, &name))
                {
                    Ok(_) => s.inflight += 1,
                    Err(_) => break,
                }
            }
            loop {
                match s.sock.recv(&mut buf) {
                    Ok(_) => {
                        s.inflight = s.inflight.saturating_sub(1);
                        s.answers += 1;
                        s.last_answer = Instant::now();
                        answered += 1;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
            if s.inflight > 0 && s.last_answer.elapsed() > LOST_AFTER {
                lost += u64::from(s.inflight);
                s.inflight = 0;
                s.last_answer = Instant::now();
            }
        }
    }
    Ok(Load { answered, lost })
}

/// hping3 from `netns`: UDP/53 datagrams with random source addresses (and source ports
/// counting up) towards `to`.
fn flood(netns: &str, to: Ipv4Addr) -> Result<Child> {
    Command::new("ip")
        .args(["netns", "exec", netns, "hping3", "--udp", "-p", "53"])
        .args(["--rand-source", "-d", "40", "-q"])
        .args(["-i", &format!("u{FLOOD_INTERVAL_US}")])
        .arg(to.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("hping3 (package hping3)")
}

/// Datagrams the server's interface received.
fn rx_packets(bench: &Bench) -> Result<u64> {
    let out = bench.lab.sh(
        &bench.b.netns,
        "cat /sys/class/net/eth0/statistics/rx_packets",
    )?;
    Ok(out.trim().parse().unwrap_or(0))
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// The agent's side of one run: CPU, RSS samples, and the DNS engine's evictions.
struct Watch<'a> {
    agent: &'a Agent,
    cpu0: f64,
    rss_start: f64,
    rss: Vec<(f64, f64)>,
}

impl<'a> Watch<'a> {
    fn start(agent: &'a Agent) -> Self {
        Self {
            agent,
            cpu0: proc_cpu(agent.id()),
            rss_start: rss_mib(agent.id()),
            rss: Vec::new(),
        }
    }

    fn sample(&mut self, t: f64) {
        self.rss.push((round1(t), round1(rss_mib(self.agent.id()))));
    }

    fn report(&self, wall: f64) -> Result<Value> {
        let pid = self.agent.id();
        let cpu = proc_cpu(pid) - self.cpu0;
        let m = self.agent.metrics()?;
        let evicted = |reason: &str| {
            metrics::sum(
                &m,
                "netprobe_verdict_engine_evicted_total",
                &[("engine", "dns"), ("reason", reason)],
            )
        };
        let half: Vec<f64> = self.rss[self.rss.len() / 2..].iter().map(|x| x.1).collect();
        let spread = half.iter().copied().fold(f64::MIN, f64::max)
            - half.iter().copied().fold(f64::MAX, f64::min);
        Ok(json!({
            "cpu_seconds": (cpu * 100.0).round() / 100.0,
            "cpu_percent": round1(cpu / wall * 100.0),
            "rss_start_mib": round1(self.rss_start),
            "rss_end_mib": round1(rss_mib(pid)),
            "rss_peak_mib": round1(proc_status_kib(pid, "VmHWM:") / 1024.0),
            "rss_second_half_spread_mib": round1(spread.max(0.0)),
            "rss_flat": spread <= FLAT_MIB,
            "rss_samples_mib": self.rss,
            "dns_queries_seen": metrics::sum(&m, "netprobe_dns_queries_total", &[]),
            "events_lost": metrics::sum(&m, "netprobe_lost_events_total", &[]),
            "evicted": {
                "judged_early": evicted("judged_early"),
                "dropped": evicted("dropped"),
                "forgotten_early": evicted("forgotten_early"),
                "events_dropped": evicted("events_dropped"),
            },
        }))
    }
}

/// One run of `seconds`: the generator and the flood, watched by the agent of `bin` (None:
/// without netprobe).
fn run_once(bench: &mut Bench, bin: Option<&Path>, seconds: u64) -> Result<Value> {
    let node = bench.node();
    let agent = match bin {
        Some(b) => Some(start_agent_of(b, &node, bench.port, &[])?),
        None => None,
    };
    let mut watch = agent.as_ref().map(Watch::start);
    let rx0 = rx_packets(bench)?;
    let server = SocketAddr::new(bench.b.ip.into(), 53);
    let ns = bench.a.netns.clone();
    let mut hping = flood(&bench.a.netns, bench.b.ip)?;
    let t0 = Instant::now();
    let generator = std::thread::spawn(move || in_netns(&ns, || generate(server, seconds as f64)));
    while !generator.is_finished() {
        std::thread::sleep(Duration::from_millis(500));
        if let Some(w) = &mut watch {
            w.sample(t0.elapsed().as_secs_f64());
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    process::signal(hping.id(), Signal::Int)?;
    let _ = hping.wait();
    let load = generator.join().expect("generator thread")??;
    let datagrams = rx_packets(bench)?.saturating_sub(rx0);
    let mut v = json!({
        "seconds": round1(wall),
        "lookups_per_s": (load.answered as f64 / wall).round(),
        "lookups_lost": load.lost,
        "flood_per_s": (datagrams.saturating_sub(load.answered) as f64 / wall).round(),
    });
    if let Some(w) = watch {
        v["agent"] = w.report(wall)?;
    }
    if let Some(a) = agent {
        stop_agent(a)?;
    }
    Ok(v)
}

/// The case: without netprobe, with this build's agent, and with `other`'s if given.
pub fn dns_load(bench: &mut Bench, seconds: u64, other: Option<&Path>) -> Result<Value> {
    serve(&bench.b.netns, bench.b.ip)?;
    let this = super::netprobe_bin(true);
    let mut v = json!({
        "flat_means": format!("RSS moves by at most {FLAT_MIB} MiB over the second half of the run"),
        "without": run_once(bench, None, seconds)?,
        "agent": run_once(bench, Some(&this), seconds)?,
    });
    if let Some(bin) = other {
        v["compared"] = run_once(bench, Some(bin), seconds)?;
    }
    println!("bench: dns load {v}");
    Ok(v)
}

/// The BENCHMARKS.md rows of the case.
pub fn table(v: &Value) -> String {
    let mut t = String::from(
        "| dns load (64 stub sockets, random ids, + hping3 random-source UDP/53 flood) | without netprobe | with `netprobe agent` | compared binary |\n|---|---|---|---|\n",
    );
    let cols = [&v["without"], &v["agent"], &v["compared"]];
    let row = |label: &str, f: &dyn Fn(&Value) -> Value| {
        let cells: Vec<String> = cols
            .iter()
            .map(|c| match f(c) {
                Value::Null => "–".to_string(),
                Value::String(s) => s,
                v => v.to_string(),
            })
            .collect();
        format!("| {label} | {} |\n", cells.join(" | "))
    };
    t.push_str(&row("lookups answered per second", &|c| {
        c["lookups_per_s"].clone()
    }));
    t.push_str(&row("flood datagrams per second", &|c| {
        c["flood_per_s"].clone()
    }));
    t.push_str(&row("agent CPU, % of one core (utime+stime)", &|c| {
        c["agent"]["cpu_percent"].clone()
    }));
    t.push_str(&row("agent RSS start → end (peak), MiB", &|c| {
        let a = &c["agent"];
        if a.is_null() {
            return Value::Null;
        }
        json!(format!(
            "{} → {} ({})",
            a["rss_start_mib"], a["rss_end_mib"], a["rss_peak_mib"]
        ))
    }));
    t.push_str(&row(
        &format!("agent RSS spread over the second half, MiB (flat: ≤ {FLAT_MIB})"),
        &|c| c["agent"]["rss_second_half_spread_mib"].clone(),
    ));
    t.push_str(&row(
        "DNS engine evictions: judged early / dropped / forgotten early / events dropped",
        &|c| {
            let e = &c["agent"]["evicted"];
            if e.is_null() {
                return Value::Null;
            }
            json!(format!(
                "{} / {} / {} / {}",
                e["judged_early"], e["dropped"], e["forgotten_early"], e["events_dropped"]
            ))
        },
    ));
    t.push('\n');
    t
}
