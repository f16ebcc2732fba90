//! Bench case "traced port" (#18): healthy bulk traffic through the very port a `trace`
//! follows. A trace keeps following established connections on its port (retransmits,
//! resets, errors, state changes, drops) and must cost no event per data packet: iperf3
//! throughput with `trace --port 5201` running, against without netprobe, alternating rounds
//! in one run (target ≥ 0.98).
//!
//! This VM's throughput swings by ±30 % between rounds with the host's steal time, far more
//! than the effect measured. So besides the ratio of the medians the case reports the median of
//! the paired ratios (each traced round against the round just before or after it) and the
//! machine's CPU time per gigabyte moved (user + system + softirq from `/proc/stat`, which
//! steal does not inflate): what the transfer would reach if it were CPU-bound, and the number
//! the goal is checked against when the throughput is steal-bound.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::{Bench, median, start_trace, stop_trace};

/// The iperf3 server's port in the bench lab.
const IPERF_PORT: u16 = 5201;
/// Alternating pairs of rounds (more than the other cases: the effect is a few percent).
const PAIRS: usize = 9;

/// The machine's CPU time counters (`cpu` line of `/proc/stat`), in clock ticks.
#[derive(Clone, Copy, Default)]
struct CpuTicks {
    busy: u64,
    steal: u64,
    total: u64,
}

fn cpu_ticks() -> Result<CpuTicks> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let f: Vec<u64> = stat
        .lines()
        .next()
        .context("/proc/stat is empty")?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    Ok(CpuTicks {
        busy: at(0) + at(1) + at(2) + at(5) + at(6),
        steal: at(7),
        total: (0..8).map(at).sum(),
    })
}

/// utime + stime of a process, in clock ticks (0 once it is gone).
fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"))
        .unwrap_or_default();
    // Fields after the `(comm)`, which may hold spaces: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// One iperf3 run.
struct Sample {
    bits_per_s: f64,
    /// Machine CPU seconds (not steal) per gigabyte moved.
    cpu_s_per_gb: f64,
    steal_share: f64,
    /// The trace's own CPU over the run, % of one core.
    trace_cpu_percent: f64,
}

/// One iperf3 run of `seconds`, with the trace on its port or without netprobe.
fn sample(bench: &mut Bench, seconds: u64, traced: bool) -> Result<Sample> {
    let mut trace = if traced {
        Some(start_trace(&bench.node(), IPERF_PORT, &["--duration", "10m"])?.0)
    } else {
        None
    };
    // `ip netns exec` execs netprobe in place: the child's pid is the trace's.
    let pid = trace.as_mut().map(|t| t.child().id());
    let t0 = pid.map(process_ticks).unwrap_or(0);
    let c0 = cpu_ticks()?;
    let r = bench.iperf(seconds);
    let c1 = cpu_ticks()?;
    let t1 = pid.map(process_ticks).unwrap_or(0);
    if let Some(t) = trace {
        stop_trace(t);
    }
    let bits_per_s = r?;
    let hz = clock_ticks_per_s();
    let gb = bits_per_s * seconds as f64 / 8e9;
    let total = (c1.total - c0.total).max(1) as f64;
    Ok(Sample {
        bits_per_s,
        cpu_s_per_gb: (c1.busy - c0.busy) as f64 / hz / gb.max(1e-9),
        steal_share: (c1.steal - c0.steal) as f64 / total,
        trace_cpu_percent: (t1 - t0) as f64 / hz / seconds as f64 * 100.0,
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn traced_port(bench: &mut Bench, seconds: u64) -> Result<Value> {
    let (mut without, mut traced) = (Vec::new(), Vec::new());
    for pair in 0..PAIRS {
        // Alternate which goes first.
        for with_trace in [pair % 2 == 1, pair % 2 == 0] {
            let s = sample(bench, seconds, with_trace)?;
            println!(
                "bench: traced port pair {} {}: {:.2} Gbit/s, {:.3} CPU s/GB, steal {:.0} %{}",
                pair + 1,
                if with_trace {
                    "trace --port 5201"
                } else {
                    "without"
                },
                s.bits_per_s / 1e9,
                s.cpu_s_per_gb,
                s.steal_share * 100.0,
                if with_trace {
                    format!(", trace CPU {:.2} % of a core", s.trace_cpu_percent)
                } else {
                    String::new()
                }
            );
            if with_trace {
                &mut traced
            } else {
                &mut without
            }
            .push(s);
        }
    }
    let med = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
    let (w, t) = (
        med(&without, |s| s.bits_per_s),
        med(&traced, |s| s.bits_per_s),
    );
    let ratio = if w > 0.0 { t / w } else { 0.0 };
    let paired = median(
        without
            .iter()
            .zip(&traced)
            .map(|(w, t)| t.bits_per_s / w.bits_per_s.max(1.0))
            .collect(),
    );
    let (cw, ct) = (
        med(&without, |s| s.cpu_s_per_gb),
        med(&traced, |s| s.cpu_s_per_gb),
    );
    let cpu_ratio = if ct > 0.0 { cw / ct } else { 0.0 };
    println!(
        "bench: traced port ratio {ratio:.3} (medians), {paired:.3} (paired rounds), CPU-bound ratio {cpu_ratio:.3} (CPU per GB without / with); target ≥ 0.98"
    );
    Ok(json!({
        "without_gbit_s": (w / 1e7).round() / 100.0,
        "traced_gbit_s": (t / 1e7).round() / 100.0,
        "ratio": round3(ratio),
        "paired_ratio": round3(paired),
        "without_cpu_s_per_gb": round3(cw),
        "traced_cpu_s_per_gb": round3(ct),
        "cpu_ratio": round3(cpu_ratio),
        "steal_percent": (med(&without, |s| s.steal_share) * 1000.0).round() / 10.0,
        "trace_cpu_percent": (med(&traced, |s| s.trace_cpu_percent) * 100.0).round() / 100.0,
        "rounds": PAIRS,
        "seconds": seconds,
    }))
}

/// The BENCHMARKS.md rows of the case, with the run it comes from.
pub fn table(v: &Value) -> String {
    format!(
        "\n_Traced port (`--only traced-port`), measured {}, commit {}; {} alternating pairs of {} s rounds, medians; the host's steal time was {} % of the CPU (median without netprobe):_\n\n| measure | without netprobe | with `trace --port 5201` | ratio (goal ≥ 0.98) |\n|---|---|---|---|\n| iperf3 TCP over veths through the traced port, Gbit/s | {} | {} | {} (medians), {} (paired rounds) |\n| machine CPU (user + system + softirq, not steal) per GB moved, s | {} | {} | **{}** (CPU-bound ratio: without / with) |\n| the trace's own CPU, % of one core | – | {} | |\n",
        v["measured"]["date"].as_str().unwrap_or(""),
        v["measured"]["commit"].as_str().unwrap_or(""),
        v["rounds"],
        v["seconds"],
        v["steal_percent"],
        v["without_gbit_s"],
        v["traced_gbit_s"],
        v["ratio"],
        v["paired_ratio"],
        v["without_cpu_s_per_gb"],
        v["traced_cpu_s_per_gb"],
        v["cpu_ratio"],
        v["trace_cpu_percent"],
    )
}
