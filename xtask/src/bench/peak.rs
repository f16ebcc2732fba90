//! The "peak memory" case: the agent during a drop storm with four node-side traces beside it
//! (the agent's `/v1/trace` allows four at once, each a `netprobe trace` child in the agent's
//! container): the peak of each process (VmHWM), and the peak of their sum sampled every
//! 100 ms, which is what the container's memory limit must hold.

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Result;
use netprobe_lab::process::{Running, Spawn};
use serde_json::{Value, json};

use super::{
    Bench, READY_LIMIT, netprobe_bin, proc_status_kib, rss_mib, start_agent_of, stop_agent,
    stop_trace, storm,
};

/// The four traces: two on the storm's port (every SYN a dropped attempt, the worst case), the
/// DNS lookups of the node, and a quiet port.
const TRACES: [&[&str]; 4] = [
    &["--port", "9999"],
    &["--port", "9999", "--events"],
    &["--dns"],
    &["--port", "7000"],
];

fn start_traces(bin: &Path, node: &str) -> Result<Vec<Running>> {
    TRACES
        .iter()
        .map(|args| {
            Spawn::trace(bin, node)
                .args(*args)
                .args(["-o", "json", "--duration", "10m"])
                .env_remove("KUBECONFIG")
                .env_remove("KUBERNETES_SERVICE_HOST")
                .stdout(Stdio::null())
                .ready_limit(READY_LIMIT)
                .start()
        })
        .collect()
}

fn mib(kib: f64) -> f64 {
    (kib / 1024.0 * 10.0).round() / 10.0
}

/// This build's agent and traces, and `other`'s if given.
pub fn peak_memory(bench: &mut Bench, seconds: u64, other: Option<&Path>) -> Result<Value> {
    let mut v = peak_of(bench, &netprobe_bin(true), seconds)?;
    if let Some(bin) = other {
        v["compared"] = peak_of(bench, bin, seconds)?;
    }
    Ok(v)
}

/// The storm for `seconds` with the agent and four traces of `bin`; RSS summed every 100 ms.
fn peak_of(bench: &mut Bench, bin: &Path, seconds: u64) -> Result<Value> {
    let node = bench.node();
    storm::add_rule(bench)?;
    let r = (|| -> Result<Value> {
        let agent = start_agent_of(bin, &node, bench.port, &[])?;
        let traces = start_traces(bin, &node)?;
        let pids: Vec<u32> = std::iter::once(agent.id())
            .chain(traces.iter().map(Running::id))
            .collect();
        let idle_sum: f64 = pids.iter().map(|p| rss_mib(*p)).sum();
        let mut hping = storm::flood(bench)?;
        let t0 = Instant::now();
        let mut peak_sum = 0f64;
        while t0.elapsed() < Duration::from_secs(seconds) {
            std::thread::sleep(Duration::from_millis(100));
            peak_sum = peak_sum.max(pids.iter().map(|p| rss_mib(*p)).sum());
        }
        storm::stop_flood(&mut hping)?;
        let hwm: Vec<f64> = pids
            .iter()
            .map(|p| mib(proc_status_kib(*p, "VmHWM:")))
            .collect();
        let v = json!({
            "seconds": seconds,
            "traces": TRACES.iter().map(|a| a.join(" ")).collect::<Vec<_>>(),
            "agent_hwm_mib": hwm[0],
            "trace_hwm_mib": &hwm[1..],
            "sum_of_hwm_mib": (hwm.iter().sum::<f64>() * 10.0).round() / 10.0,
            "sum_rss_before_storm_mib": (idle_sum * 10.0).round() / 10.0,
            "sum_rss_peak_sampled_mib": (peak_sum * 10.0).round() / 10.0,
        });
        for t in traces {
            stop_trace(t);
        }
        stop_agent(agent)?;
        Ok(v)
    })();
    storm::del_rule(bench)?;
    println!("bench: peak memory {r:?}");
    r
}

pub fn table(v: &Value) -> String {
    let mut t = sentence(v);
    if let Some(c) = v.get("compared") {
        t.push_str("The compared binary, same case. ");
        t.push_str(&sentence(c));
    }
    t
}

fn sentence(v: &Value) -> String {
    format!(
        "Peak memory, agent + four node-side traces ({}) during a {} s drop storm: agent VmHWM {} MiB, traces {} MiB; sum of the peaks {} MiB (sampled sum of RSS: {} MiB before the storm, {} MiB at most).\n\n",
        v["traces"]
            .as_array()
            .map(|a| a
                .iter()
                .map(|t| format!("`{}`", t.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
        v["seconds"],
        v["agent_hwm_mib"],
        v["trace_hwm_mib"]
            .as_array()
            .map(|a| a
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
        v["sum_of_hwm_mib"],
        v["sum_rss_before_storm_mib"],
        v["sum_rss_peak_sampled_mib"],
    )
}
