//! Bench case "pod churn": the churn test's cycles (`netprobe/tests/churn.rs`) under the bench —
//! pods (namespace, veth pair, Pod object in the API stand-in) created and deleted ten at a
//! time, every fifth batch failing a connection in each pod — without netprobe, then with the
//! release agent (pod labels on, a 1 s series grace so the end state shows within seconds).
//! Reports create/delete cycles per second of each, and what the agent holds before and after
//! (fds, bpf links, namespace map entries read by bpftool, per-pod series, Event keys, RSS),
//! its peak RSS and its CPU time over the cycles.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use netprobe_lab::{
    Lab,
    churn::{self, AgentLevel, Churn},
    kubeapi::FakeKube,
    metrics, ports,
    process::Agent,
};
use serde_json::{Value, json};

use crate::build::netprobe_bin;

const NODE: &str = "bench-node";
const CYCLES: usize = 500;
const BATCH: usize = 10;
const FAIL_EVERY: usize = 5;
/// The agent rescans names every second: a failing batch waits this long before it connects,
/// so its failures are counted by pod.
const SETTLE: Duration = Duration::from_millis(1500);

/// Create/delete work of a run of cycles, and what the agent peaked at meanwhile.
#[derive(Default)]
struct Run {
    cycles: usize,
    /// Seconds spent creating and deleting pods (the settle waits left out).
    work_s: f64,
    peak_series: usize,
    peak_rss_kib: u64,
}

impl Run {
    fn per_s(&self) -> f64 {
        (self.cycles as f64 / self.work_s * 10.0).round() / 10.0
    }
}

/// `batches` batches of cycles; with an agent, its per-pod series and RSS are sampled after
/// each failing batch.
fn cycles(
    lab: &Lab,
    kube: &FakeKube,
    churn: &mut Churn,
    batches: usize,
    agent: Option<&Agent>,
) -> Result<Run> {
    let mut run = Run::default();
    for b in 1..=batches {
        let t = Instant::now();
        churn.create(kube, BATCH)?;
        run.work_s += t.elapsed().as_secs_f64();
        if b % FAIL_EVERY == 0 {
            std::thread::sleep(SETTLE);
            churn.fail_connections(lab, &|_| true)?;
            if let Some(a) = agent {
                std::thread::sleep(Duration::from_millis(500));
                let (l, _) = churn::agent_level(a)?;
                run.peak_series = run.peak_series.max(l.churned_series);
                run.peak_rss_kib = run.peak_rss_kib.max(l.held.rss_kib);
            }
        }
        let t = Instant::now();
        churn.delete_all(kube)?;
        run.work_s += t.elapsed().as_secs_f64();
        run.cycles += BATCH;
    }
    Ok(run)
}

fn start_agent(lab: &Lab, kubeconfig: &std::path::Path) -> Result<Agent> {
    let port = ports::free_tcp(lab.node())?;
    Agent::start_on(&netprobe_bin(true), lab.node(), port, |s| {
        s.args(["--metrics-pod-labels", "--metrics-series-grace", "1"])
            .env("KUBECONFIG", kubeconfig)
            .env("NODE_NAME", NODE)
            .stdout(Stdio::null())
            .ready_limit(Duration::from_secs(120))
    })
}

fn level_json(l: &AgentLevel) -> Value {
    json!({
        "fds": l.held.fds,
        "sockets": l.held.sockets,
        "bpf_links": l.held.bpf_links,
        "netns_map_entries": l.held.netns_map_entries,
        "churned_series": l.churned_series,
        "event_keys": l.event_keys,
        "rss_mib": (l.held.rss_kib as f64 / 1024.0 * 10.0).round() / 10.0,
    })
}

/// The case: the same cycles without netprobe and with the agent.
pub fn pod_churn() -> Result<Value> {
    let lab = Lab::new("churnbench")?;
    let kube = FakeKube::start(lab.listen(lab.node(), "127.0.0.1:0".parse()?)?);
    let kubeconfig =
        std::env::temp_dir().join(format!("netprobe-bench-kubeconfig-{}", std::process::id()));
    std::fs::write(&kubeconfig, kube.kubeconfig())?;
    let batches = CYCLES / BATCH;
    let mut churn = Churn::new(&lab, NODE);
    let without = cycles(&lab, &kube, &mut churn, batches, None)?;
    println!(
        "bench: pod churn without netprobe: {} cycles/s",
        without.per_s()
    );

    let agent = start_agent(&lab, &kubeconfig)?;
    // Warm-up: the first failure allocates what the agent keeps for good.
    cycles(&lab, &kube, &mut churn, FAIL_EVERY, Some(&agent))?;
    let (before, body) = churn::level_within(&agent, Duration::from_secs(15), AgentLevel::settled)?;
    if !before.settled() {
        bail!("pod churn: the warm-up was not released: {before:?}\n{body}");
    }
    let cpu0 = super::proc_cpu(agent.id());
    let with = cycles(&lab, &kube, &mut churn, batches, Some(&agent))?;
    let cpu_s = super::proc_cpu(agent.id()) - cpu0;
    let t = Instant::now();
    let (after, body) = churn::level_within(&agent, Duration::from_secs(15), |l| {
        l.settled() && l.held.bpf_links == before.held.bpf_links
    })?;
    let released_s = t.elapsed().as_secs_f64();
    let counter = |name: &str| metrics::sum(&body, name, &[]);
    let result = json!({
        "cycles": with.cycles,
        "pods_alive_at_once": BATCH,
        "cycles_per_s": {"without": without.per_s(), "agent": with.per_s()},
        "agent_cpu_s": (cpu_s * 100.0).round() / 100.0,
        "before": level_json(&before),
        "after": level_json(&after),
        "released_within_s": (released_s * 10.0).round() / 10.0,
        "peak_churned_series": with.peak_series,
        "peak_rss_mib": (with.peak_rss_kib.max(after.held.rss_kib) as f64 / 1024.0 * 10.0).round() / 10.0,
        "released": {
            "netns_filter": counter("netprobe_netns_filter_released_total"),
            "tc_links": counter("netprobe_tc_links_released_total"),
            "series": metrics::sum(&body, "netprobe_metric_series_evicted_total", &[("reason", "expired")]),
            "event_keys": metrics::sum(&body, "netprobe_kube_events_total", &[("result", "released")]),
        },
    });
    super::stop_agent(agent)?;
    drop(churn);
    let _ = std::fs::remove_file(&kubeconfig);
    Ok(result)
}

/// Its rows in BENCHMARKS.md.
pub fn table(c: &Value) -> String {
    let (b, a) = (&c["before"], &c["after"]);
    let mut t = format!(
        "\n**Pod churn** ({} create/delete cycles, {} pods alive at once, every fifth batch failing a connection in each pod; `tests/churn.rs`'s cycles):\n\n",
        c["cycles"], c["pods_alive_at_once"]
    );
    t.push_str("| measure | before | after |\n|---|---|---|\n");
    for (name, key) in [
        ("agent fds (sockets)", "fds"),
        ("agent bpf links", "bpf_links"),
        ("namespace map entries (bpftool)", "netns_map_entries"),
        ("series naming a churned pod", "churned_series"),
        ("Event limiter keys", "event_keys"),
        ("agent RSS, MiB", "rss_mib"),
    ] {
        let show = |v: &Value| match key {
            "fds" => format!("{} ({})", v["fds"], v["sockets"]),
            _ => v[key].to_string(),
        };
        t.push_str(&format!("| {name} | {} | {} |\n", show(b), show(a)));
    }
    t.push_str(&format!(
        "\nCycles/s without netprobe {}, with the agent {}; agent CPU over the cycles {} s; back to its level {} s after the last pod went; peak {} series naming churned pods, peak RSS {} MiB. Released: {} namespace map entries, {} tc links, {} series, {} Event keys.\n",
        c["cycles_per_s"]["without"],
        c["cycles_per_s"]["agent"],
        c["agent_cpu_s"],
        c["released_within_s"],
        c["peak_churned_series"],
        c["peak_rss_mib"],
        c["released"]["netns_filter"],
        c["released"]["tc_links"],
        c["released"]["series"],
        c["released"]["event_keys"],
    ));
    t
}
