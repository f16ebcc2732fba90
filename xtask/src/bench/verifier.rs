//! The "verifier" case: how much the kernel's verifier went through to accept each program, in
//! every filter configuration the CLI and the agent produce. The filter is a constant the
//! verifier sees, so each configuration is a different program to it (an address filter once
//! took `tcp_receive_reset` past the limit, #28). Read from the running netprobe itself: each
//! program fd's `verified_insns` (fdinfo), against the 1M instructions past which the kernel
//! refuses a program ("BPF program is too large").

use std::{collections::BTreeMap, path::Path, process::Stdio};

use anyhow::{Context, Result, bail};
use netprobe_lab::process::Spawn;
use serde_json::{Value, json};

use super::{Bench, READY_LIMIT, netprobe_bin, start_agent_of, stop_agent, stop_trace};

/// The verifier's complexity limit (`BPF_COMPLEXITY_LIMIT_INSNS`).
const LIMIT: u64 = 1_000_000;

/// (label, `trace` arguments); `None`: the agent (always on, failures only).
const CONFIGS: [(&str, Option<&[&str]>); 7] = [
    ("trace --port", Some(&["--port", "9004"])),
    (
        "--addr IPv4",
        Some(&["--port", "9004", "--addr", "10.43.51.131"]),
    ),
    (
        "--addr IPv6",
        Some(&["--port", "9004", "--addr", "fd00:10:43::51:131"]),
    ),
    ("--proto udp", Some(&["--port", "9004", "--proto", "udp"])),
    ("--dns", Some(&["--dns"])),
    ("--dns --addr", Some(&["--dns", "--addr", "10.43.0.10"])),
    ("agent", None),
];

/// Every configuration of this build (a refusal fails the bench), and of `other` if given (a
/// refusal is a result there: the build before a fix).
pub fn verifier(bench: &mut Bench, other: Option<&Path>) -> Result<Value> {
    let mut v = json!({"limit": LIMIT, "configs": configs_of(bench, &netprobe_bin(true), true)?});
    let (program, config, most) = largest(&v["configs"]);
    println!("bench: verifier: at most {most} insns ({program}, {config})");
    v["largest"] = json!({
        "program": program,
        "config": config,
        "verified_insns": most,
        "headroom": if most > 0 { ((LIMIT as f64 / most as f64) * 10.0).round() / 10.0 } else { 0.0 },
    });
    if let Some(bin) = other {
        v["compared"] = json!({
            "binary": bin.display().to_string(),
            "configs": configs_of(bench, bin, false)?,
        });
    }
    Ok(v)
}

/// `{label: {program: verified_insns}}`, or `{label: {"refused": why}}` where `bin` could not
/// load (an error instead when `strict`).
fn configs_of(bench: &mut Bench, bin: &Path, strict: bool) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for (label, args) in CONFIGS {
        let v = match measure(bench, bin, args) {
            Ok(programs) => json!(programs),
            Err(e) if !strict => json!({"refused": refusal(&e)}),
            Err(e) => return Err(e.context(format!("verifier case, {label}"))),
        };
        println!("bench: verifier {label}: {v}");
        out.insert(label.to_string(), v);
    }
    Ok(Value::Object(out))
}

/// Starts `bin` in the configuration, reads its programs' costs, stops it.
fn measure(bench: &mut Bench, bin: &Path, args: Option<&[&str]>) -> Result<BTreeMap<String, u64>> {
    let node = bench.node();
    match args {
        Some(args) => {
            let trace = Spawn::trace(bin, &node)
                .args(args)
                .args(["--no-rule-trace", "-o", "json"])
                .env_remove("KUBECONFIG")
                .env_remove("KUBERNETES_SERVICE_HOST")
                .stdout(Stdio::null())
                .ready_limit(READY_LIMIT)
                .start()?;
            let costs = verified_insns(trace.id());
            stop_trace(trace);
            costs
        }
        None => {
            let agent = start_agent_of(bin, &node, bench.port, &[])?;
            let costs = verified_insns(agent.id());
            stop_agent(agent)?;
            costs
        }
    }
}

/// `verified_insns` of each BPF program process `pid` holds, by name (ids named by bpftool).
fn verified_insns(pid: u32) -> Result<BTreeMap<String, u64>> {
    let names = program_names()?;
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        if std::fs::read_link(entry.path()).ok().as_deref()
            != Some(Path::new("anon_inode:bpf-prog"))
        {
            continue;
        }
        let fd = entry.file_name();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy()))?;
        let field = |key: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(n)) = (field("prog_id:"), field("verified_insns:")) else {
            bail!("no prog_id/verified_insns in the fdinfo of a BPF program (kernel < 5.16?)");
        };
        let name = names
            .get(&id)
            .with_context(|| format!("BPF program {id} not listed by bpftool"))?;
        out.insert(name.clone(), n);
    }
    if out.is_empty() {
        bail!("process {pid} holds no BPF program");
    }
    Ok(out)
}

/// id → name of every loaded BPF program (bpftool names them in full, from their BTF).
fn program_names() -> Result<BTreeMap<u64, String>> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("bpftool (package bpftool)")?;
    if !out.status.success() {
        bail!(
            "bpftool prog show: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    Ok(list
        .iter()
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
        .collect())
}

/// What the kernel refused, in a few words (netprobe's message carries the whole verifier log).
fn refusal(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let program = text
        .split("failed to load eBPF program `")
        .nth(1)
        .and_then(|rest| rest.split('`').next());
    match program {
        Some(p) if text.contains("BPF program is too large") => {
            format!("`{p}` too large (1M insns)")
        }
        Some(p) => format!("`{p}` refused"),
        None => text
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(160)
            .collect(),
    }
}

/// (program, config, insns) of the costliest program of any configuration.
fn largest(configs: &Value) -> (String, String, u64) {
    let mut best = (String::new(), String::new(), 0);
    for (config, programs) in configs.as_object().into_iter().flatten() {
        for (program, n) in programs.as_object().into_iter().flatten() {
            if let Some(n) = n.as_u64()
                && n > best.2
            {
                best = (program.clone(), config.clone(), n);
            }
        }
    }
    best
}

/// A row per program, a column per configuration; the compared binary's refusals below.
pub fn table(v: &Value) -> String {
    let configs = &v["configs"];
    let labels: Vec<&str> = CONFIGS
        .iter()
        .map(|(l, _)| *l)
        .filter(|l| !configs[*l].is_null())
        .collect();
    let mut programs: Vec<&String> = configs
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, p)| p.as_object())
        .flat_map(|p| p.keys())
        .collect();
    programs.sort();
    programs.dedup();
    let mut t = format!(
        "| instructions the verifier processed to accept each program (`verified_insns`; refused at {LIMIT}) | {} |\n|---|{}\n",
        labels
            .iter()
            .map(|l| format!("`{l}`"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(labels.len())
    );
    for program in programs {
        let cells: Vec<String> = labels
            .iter()
            .map(|l| match configs[*l][program.as_str()].as_u64() {
                Some(n) => n.to_string(),
                None => "–".to_string(),
            })
            .collect();
        t.push_str(&format!("| `{program}` | {} |\n", cells.join(" | ")));
    }
    let l = &v["largest"];
    t.push_str(&format!(
        "\nThe costliest: `{}` with `{}`, {} instructions, {} times below the limit.\n",
        l["program"].as_str().unwrap_or(""),
        l["config"].as_str().unwrap_or(""),
        l["verified_insns"],
        l["headroom"]
    ));
    if let Some(c) = v.get("compared") {
        let cells: Vec<String> = labels
            .iter()
            .map(|l| {
                let p = &c["configs"][*l];
                match p["refused"].as_str() {
                    Some(why) => format!("**refused**: {why}"),
                    None => {
                        let most = p
                            .as_object()
                            .into_iter()
                            .flatten()
                            .filter_map(|(_, n)| n.as_u64())
                            .max();
                        most.map(|n| format!("at most {n}")).unwrap_or_default()
                    }
                }
            })
            .collect();
        t.push_str(&format!(
            "\n| compared binary `{}` | {} |\n|---|{}\n| loads? | {} |\n",
            c["binary"].as_str().unwrap_or(""),
            labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(labels.len()),
            cells.join(" | ")
        ));
    }
    t
}
