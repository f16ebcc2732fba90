//! The drop storm's pieces: SYNs to port 9999 of pod b into an iptables DROP, at the highest
//! rate hping3 makes (the drop-storm and peak-memory cases).

use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use netprobe_lab::process::{self, Signal};

use super::Bench;

pub fn add_rule(bench: &Bench) -> Result<()> {
    bench.lab.sh(
        &bench.node(),
        "iptables -N NP_BENCH_STORM 2>/dev/null; iptables -F NP_BENCH_STORM; \
         iptables -A NP_BENCH_STORM -j DROP; \
         iptables -C FORWARD -p tcp --dport 9999 -j NP_BENCH_STORM 2>/dev/null || \
         iptables -I FORWARD -p tcp --dport 9999 -j NP_BENCH_STORM",
    )?;
    Ok(())
}

pub fn del_rule(bench: &Bench) -> Result<()> {
    bench.lab.sh(
        &bench.node(),
        "iptables -D FORWARD -p tcp --dport 9999 -j NP_BENCH_STORM; iptables -F NP_BENCH_STORM; iptables -X NP_BENCH_STORM",
    )?;
    Ok(())
}

pub fn flood(bench: &Bench) -> Result<Child> {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &bench.a.netns,
            "hping3",
            "--flood",
            "-q",
            "-S",
        ])
        .args(["-p", "9999"])
        .arg(bench.b.ip.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("hping3 (package hping3)")
}

pub fn stop_flood(flood: &mut Child) -> Result<()> {
    process::signal(flood.id(), Signal::Int)?;
    let _ = flood.wait();
    Ok(())
}
