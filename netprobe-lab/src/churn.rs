//! Pod churn on a lab node, for the churn test and bench: pods (a namespace, a Calico-style
//! veth pair, a Pod object of one Deployment in the API stand-in) created and deleted in
//! batches, each pod of a batch optionally failing a connection (refused on its own loopback,
//! so per-pod series and Event keys are made); and what a process holds, read from the kernel:
//! open fds, bpf links, the entries of its namespace filter map, its RSS.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    Connect, Lab,
    kubeapi::{FakeKube, Kind, of_deployment, pod},
    metrics,
    process::Agent,
};

/// The Kubernetes namespace of the churned pods.
pub const NAMESPACE: &str = "churn";
/// Their Deployment (its ReplicaSet's hash): pod names `churn-7d9f8b6c5-<n>`.
const DEPLOYMENT: &str = "churn";
const HASH: &str = "7d9f8b6c5";
/// Name prefix of every churned pod.
pub const POD_PREFIX: &str = "churn-7d9f8b6c5-";
/// The name netprobe gives its namespace filter map.
const NETNS_MAP: &str = "NETNS_FILTER";

/// A churned pod: its network namespace (a lab name, so a killed run's are cleaned up by
/// [`Lab::cleanup_stale`]) and the node side of its veth.
#[derive(Debug, Clone)]
pub struct ChurnedPod {
    pub name: String,
    pub netns: String,
    pub host_if: String,
}

/// Pods created and deleted on a lab node, mirrored in the API stand-in. Wired with four `ip`
/// runs each (namespace, veth pair into it, links up and addresses), not the full Calico wiring
/// of [`Lab::add_pod`]: the agent only needs a veth whose peer is a namespace with an address,
/// and churn needs speed. Pods still alive are deleted on drop.
pub struct Churn {
    node: String,
    node_name: String,
    alive: Vec<ChurnedPod>,
    /// Pods created so far (each one a create/delete cycle once deleted).
    pub created: usize,
}

impl Churn {
    /// Churn in `lab`'s node, called `node_name` in the API.
    pub fn new(lab: &Lab, node_name: &str) -> Self {
        Self {
            node: lab.node().to_string(),
            node_name: node_name.into(),
            alive: Vec::new(),
            created: 0,
        }
    }

    /// Creates `n` pods (at most 200 alive at once: their addresses are 10.42.1.10 + i).
    pub fn create(&mut self, kube: &FakeKube, n: usize) -> Result<()> {
        for _ in 0..n {
            let slot = self.alive.len();
            if slot >= 200 {
                bail!("at most 200 churned pods alive at once");
            }
            let ip = Ipv4Addr::new(10, 42, 1, 10 + slot as u8);
            let name = format!("{POD_PREFIX}{:05}", self.created);
            let p = self.wire(&name, ip)?;
            let obj = pod(NAMESPACE, &name, &self.node_name, &ip.to_string(), &[]);
            kube.apply(Kind::Pod, of_deployment(obj, DEPLOYMENT, HASH));
            self.alive.push(p);
            self.created += 1;
        }
        Ok(())
    }

    fn wire(&self, name: &str, addr: Ipv4Addr) -> Result<ChurnedPod> {
        let base = self.node.strip_suffix("-node").unwrap_or(&self.node);
        let p = ChurnedPod {
            name: name.into(),
            netns: format!("{base}-c{}", self.created),
            host_if: format!("npc{}", self.created),
        };
        ip(&["netns", "add", &p.netns], None)?;
        let wired = ip(
            &[
                "-n", &self.node, "link", "add", &p.host_if, "type", "veth", "peer", "name",
                "eth0", "netns", &p.netns,
            ],
            None,
        )
        .and_then(|_| ip(&["-n", &self.node, "link", "set", &p.host_if, "up"], None))
        .and_then(|_| {
            let script = format!("link set lo up\nlink set eth0 up\naddr add {addr}/32 dev eth0\n");
            ip(&["-n", &p.netns, "-batch", "-"], Some(&script))
        });
        if let Err(e) = wired {
            let _ = ip(&["netns", "del", &p.netns], None);
            return Err(e);
        }
        Ok(p)
    }

    /// Every alive pod connects to a closed port on its own loopback: refused (a drop of the
    /// SYN, a reset, a failed attempt — per-pod series and an Event key in the agent).
    /// Only the pods `only` accepts (by name).
    pub fn fail_connections(&self, lab: &Lab, only: &dyn Fn(&str) -> bool) -> Result<()> {
        let closed: SocketAddr = "127.0.0.1:9".parse().expect("address");
        for p in self.alive.iter().filter(|p| only(&p.name)) {
            let got = lab.connect(&p.netns, closed, Duration::from_secs(2));
            if got != Connect::Refused {
                bail!(
                    "{}: connect to {closed} gave {got}, expected refused",
                    p.name
                );
            }
        }
        Ok(())
    }

    /// Deletes every alive pod: its API object, then its namespace (the veth pair goes with
    /// it, as when the CNI deletes the pod's network).
    pub fn delete_all(&mut self, kube: &FakeKube) -> Result<()> {
        for p in std::mem::take(&mut self.alive) {
            kube.delete(Kind::Pod, NAMESPACE, &p.name);
            ip(&["netns", "del", &p.netns], None)?;
        }
        Ok(())
    }

    pub fn alive(&self) -> &[ChurnedPod] {
        &self.alive
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        for p in &self.alive {
            let _ = ip(&["netns", "del", &p.netns], None);
        }
    }
}

/// Runs `ip ARGS` (with `stdin` for `-batch -`).
fn ip(args: &[&str], stdin: Option<&str>) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn ip")?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The targets of `pid`'s open fds (`socket:[…]`, `anon_inode:bpf_link`, …), sorted: what
/// differs between two readings names a leak.
pub fn fd_targets(pid: u32) -> Result<Vec<String>> {
    let dir = format!("/proc/{pid}/fd");
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {dir}"))?
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        // An fd closed between listing and reading is not held.
        .map(|t| t.to_string_lossy().into_owned())
        .collect();
    out.sort();
    Ok(out)
}

/// What a process holds, read from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holdings {
    /// Entries of /proc/PID/fd.
    pub fds: usize,
    /// Of those, sockets (an HTTP client's pool of idle connections varies).
    pub sockets: usize,
    /// Of those, bpf links (a tcx attachment each, or a tracepoint).
    pub bpf_links: usize,
    /// Entries of its `NETNS_FILTER` map (bpftool), None if it holds no such map.
    pub netns_map_entries: Option<usize>,
    pub rss_kib: u64,
}

/// Reads what `pid` holds now.
pub fn holdings(pid: u32) -> Result<Holdings> {
    let targets = fd_targets(pid)?;
    let count = |f: &dyn Fn(&str) -> bool| targets.iter().filter(|t| f(t)).count();
    Ok(Holdings {
        fds: targets.len(),
        sockets: count(&|t| t.starts_with("socket:")),
        bpf_links: count(&|t| t == "anon_inode:bpf_link"),
        netns_map_entries: netns_map_entries(pid)?,
        rss_kib: rss_kib(pid)?,
    })
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/PID/status")
}

/// The entries of the `NETNS_FILTER` map `pid` holds, counted by the kernel (bpftool dumps
/// it by map id, found in the process's fdinfo).
pub fn netns_map_entries(pid: u32) -> Result<Option<usize>> {
    for id in map_ids(pid)? {
        let show = bpftool(&["map", "show", "id", &id.to_string()])?;
        if show["name"] == NETNS_MAP {
            let dump = bpftool(&["map", "dump", "id", &id.to_string()])?;
            return Ok(Some(dump.as_array().map_or(0, Vec::len)));
        }
    }
    Ok(None)
}

/// Ids of the BPF maps `pid` has open (`map_id:` of /proc/PID/fdinfo/*).
fn map_ids(pid: u32) -> Result<Vec<u32>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("read {dir}"))? {
        let Ok(text) = e.and_then(|e| std::fs::read_to_string(e.path())) else {
            continue;
        };
        if let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

fn bpftool(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("run bpftool (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!(
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("bpftool {args:?} output"))
}

/// What an agent holds, from the kernel and from its /metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentLevel {
    pub held: Holdings,
    /// Series in /metrics naming a churned pod (a `pod`, `src_pod` or `dst_pod` label).
    pub churned_series: usize,
    /// `netprobe_kube_event_keys`.
    pub event_keys: u64,
}

impl AgentLevel {
    /// Nothing of the churned pods left: no series, no Event key, only the node's namespace in
    /// the map.
    pub fn settled(&self) -> bool {
        self.churned_series == 0 && self.event_keys == 0 && self.held.netns_map_entries == Some(1)
    }
}

/// The churned pods some series in /metrics names.
pub fn counted_pods(body: &str) -> std::collections::HashSet<String> {
    metrics::parse(body)
        .into_iter()
        .flat_map(|s| s.labels)
        .filter(|(k, v)| k.ends_with("pod") && v.starts_with(POD_PREFIX))
        .map(|(_, v)| v)
        .collect()
}

/// Series in /metrics naming a churned pod.
pub fn churned_series(body: &str) -> usize {
    metrics::parse(body)
        .iter()
        .filter(|s| {
            s.labels
                .iter()
                .any(|(k, v)| k.ends_with("pod") && v.starts_with(POD_PREFIX))
        })
        .count()
}

/// The agent's level now, and the /metrics body it was read from.
pub fn agent_level(agent: &Agent) -> Result<(AgentLevel, String)> {
    let (status, body) = agent.get("/metrics")?;
    if status != 200 {
        bail!("/metrics: {status}: {body}");
    }
    let level = AgentLevel {
        held: holdings(agent.id())?,
        churned_series: churned_series(&body),
        event_keys: metrics::sum(&body, "netprobe_kube_event_keys", &[]),
    };
    Ok((level, body))
}

/// Polls the agent's level until `done` holds, at most `limit`: the last level and body.
pub fn level_within(
    agent: &Agent,
    limit: Duration,
    done: impl Fn(&AgentLevel) -> bool,
) -> Result<(AgentLevel, String)> {
    let t = Instant::now();
    loop {
        let (l, body) = agent_level(agent)?;
        if done(&l) || t.elapsed() > limit {
            return Ok((l, body));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
