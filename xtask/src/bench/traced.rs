//! Bench case "traced port" (#18): healthy bulk traffic through the very port a `trace`
//! follows. A trace keeps following established connections on its port (retransmits,
//! resets, errors, state changes, drops) and must cost no event per data packet: iperf3
//! throughput with `trace --port 5201` running, against without netprobe, alternating rounds
//! in one run; the ratio of the medians (target ≥ 0.98).

use anyhow::Result;
use serde_json::{Value, json};

use super::{Bench, ROUNDS, median, start_trace, stop_trace};

/// The iperf3 server's port in the bench lab.
const IPERF_PORT: u16 = 5201;

/// One iperf3 run of `seconds`, with the trace on its port or without netprobe.
fn sample(bench: &mut Bench, seconds: u64, traced: bool) -> Result<f64> {
    let trace = if traced {
        Some(start_trace(&bench.node(), IPERF_PORT, &["--duration", "10m"])?.0)
    } else {
        None
    };
    let r = bench.iperf(seconds);
    if let Some(t) = trace {
        stop_trace(t);
    }
    r
}

pub fn traced_port(bench: &mut Bench, seconds: u64) -> Result<Value> {
    let (mut without, mut traced) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Alternate which goes first.
        for with_trace in [round % 2 == 1, round % 2 == 0] {
            let bps = sample(bench, seconds, with_trace)?;
            println!(
                "bench: traced port round {} {}: {:.2} Gbit/s",
                round + 1,
                if with_trace {
                    "trace --port 5201"
                } else {
                    "without"
                },
                bps / 1e9
            );
            if with_trace {
                &mut traced
            } else {
                &mut without
            }
            .push(bps);
        }
    }
    let (w, t) = (median(without), median(traced));
    let ratio = if w > 0.0 { t / w } else { 0.0 };
    println!("bench: traced port ratio {ratio:.3} (target ≥ 0.98)");
    Ok(json!({
        "without_gbit_s": (w / 1e7).round() / 100.0,
        "traced_gbit_s": (t / 1e7).round() / 100.0,
        "ratio": (ratio * 1000.0).round() / 1000.0,
        "rounds": ROUNDS,
        "seconds": seconds,
    }))
}

/// The BENCHMARKS.md rows of the case, with the run it comes from.
pub fn table(v: &Value) -> String {
    format!(
        "\n_Traced port (`--only traced-port`), measured {}, commit {}; medians of {} alternating rounds of {} s:_\n\n| measure | without netprobe | with `trace --port 5201` | ratio (goal) |\n|---|---|---|---|\n| iperf3 TCP over veths through the traced port, Gbit/s | {} | {} | **{}** (≥ 0.98) |\n",
        v["measured"]["date"].as_str().unwrap_or(""),
        v["measured"]["commit"].as_str().unwrap_or(""),
        v["rounds"],
        v["seconds"],
        v["without_gbit_s"],
        v["traced_gbit_s"],
        v["ratio"],
    )
}
