//! `netprobe agent`: always-on mode for a DaemonSet. Loads the probes once for every port,
//! watches the node's namespace and every pod namespace behind its veths (new veths are attached
//! when rtnetlink announces them, with a 200 ms poll as a safety net), writes the events that
//! matter — drops, resets sent, application errors, SYN retransmits, failed DNS lookups — as NDJSON on stdout (schema `netprobe.event/v1`), and
//! serves `/metrics` (Prometheus), `/healthz`, `/readyz` and `/v1/trace` (cluster-mode trace,
//! see [`crate::cluster`]) on a loopback address. SIGTERM/SIGINT: detach and exit.

use std::{
    collections::{BTreeMap, HashSet},
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use netprobe_common::{DNS_PORT, Filter, quiet};

use crate::{
    collectors::EventReader,
    enrich::Enricher,
    enrich::names::{PodContext, pod_context},
    error::{Error, Result},
    events::{Event, Kind},
    netlink,
    netns::{self, NetnsRef},
    probes::{Probes, btf::KernelBtf, require_root},
};

/// Drop reasons of routine socket teardown, by name (numbers differ between kernels), and which
/// of their drops are routine. NOT_SPECIFIED covers a TIME_WAIT socket freeing the late FIN or
/// ACK of a connection that closed normally.
const QUIET_DROP_REASONS: &[(&str, u8)] = &[
    ("QUEUE_PURGE", quiet::ALWAYS),
    ("SOCKET_CLOSE", quiet::ALWAYS),
    ("NOT_SPECIFIED", quiet::TCP_EXCEPT_SYN),
];

pub struct AgentOptions {
    /// Size of the kernel → agent ring buffer in bytes (power of two, ≥ 4096).
    pub ring_bytes: u32,
    pub metrics_addr: SocketAddr,
    /// Events per second per (kind, reason, pod) written to stdout; the rest are counted and
    /// reported as `suppressed` records, so the log pipeline is never flooded and nothing is lost
    /// silently.
    pub rate_limit: u32,
    pub node_name: Option<String>,
    /// Created once probes are attached (tests, scripts).
    pub ready_file: Option<PathBuf>,
    /// Keep the kernel's run-time statistics of BPF programs on while the agent runs, so that
    /// `netprobe_program_run_seconds_total` measures what netprobe's programs cost.
    pub program_stats: bool,
}

/// What `/metrics` reports. Label values come from the kernel's names and the inventory.
#[derive(Default)]
struct Metrics {
    ready: bool,
    /// (reason, namespace, pod, rule owner) → drops
    drops: BTreeMap<(String, String, String, String), u64>,
    resets: u64,
    app_errors: BTreeMap<String, u64>,
    /// By the node of the destination pod (after DNAT; "" when unknown): a node-to-node view.
    syn_retransmits: BTreeMap<String, u64>,
    lost: u64,
    emitted: u64,
    /// Drops in scope counted in the kernel (per-CPU counters), by reason: every drop, also
    /// those whose event was lost or never written.
    kernel_drops: BTreeMap<String, u64>,
    interfaces: usize,
    namespaces: usize,
    /// Longest kernel-to-agent delay of an event in the last second.
    delay_max_s: f64,
    /// Runs and in-kernel run time of each program (while run-time statistics are on).
    programs: Vec<crate::probes::ProgramStats>,
    /// Probes the kernel refused: (program, reason). The agent runs without them.
    degraded: Vec<(String, String)>,
    /// (namespace, pod, reason) of the client → failed DNS lookups.
    dns_failures: BTreeMap<(String, String, String), u64>,
    /// rcode of the answer (`none`: no answer) → DNS lookups judged.
    dns_queries: BTreeMap<String, u64>,
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    fn render(&self) -> String {
        let mut s = String::new();
        s.push_str("# HELP netprobe_drops_total Packets the kernel dropped, by drop reason, pod and owner of the rule.\n# TYPE netprobe_drops_total counter\n");
        for ((reason, ns, pod, owner), n) in &self.drops {
            s.push_str(&format!(
                "netprobe_drops_total{{reason=\"{}\",namespace=\"{}\",pod=\"{}\",rule_owner=\"{}\"}} {n}\n",
                label(reason),
                label(ns),
                label(pod),
                label(owner)
            ));
        }
        s.push_str("# HELP netprobe_resets_sent_total TCP resets sent by the kernel.\n# TYPE netprobe_resets_sent_total counter\n");
        s.push_str(&format!("netprobe_resets_sent_total {}\n", self.resets));
        s.push_str("# HELP netprobe_app_errors_total Errors reported to applications, by errno.\n# TYPE netprobe_app_errors_total counter\n");
        for (errno, n) in &self.app_errors {
            s.push_str(&format!(
                "netprobe_app_errors_total{{errno=\"{}\"}} {n}\n",
                label(errno)
            ));
        }
        s.push_str("# HELP netprobe_syn_retransmits_total SYN retransmissions (silent drops somewhere), by the node of the destination pod (after DNAT, \"\" if unknown).\n# TYPE netprobe_syn_retransmits_total counter\n");
        for (node, n) in &self.syn_retransmits {
            s.push_str(&format!(
                "netprobe_syn_retransmits_total{{dst_node=\"{}\"}} {n}\n",
                label(node)
            ));
        }
        s.push_str("# HELP netprobe_dns_failures_total DNS lookups that failed, by client pod and reason (dropped, rejected, unanswered, servfail, refused).\n# TYPE netprobe_dns_failures_total counter\n");
        for ((ns, pod, reason), n) in &self.dns_failures {
            s.push_str(&format!(
                "netprobe_dns_failures_total{{namespace=\"{}\",pod=\"{}\",reason=\"{}\"}} {n}\n",
                label(ns),
                label(pod),
                label(reason)
            ));
        }
        s.push_str("# HELP netprobe_dns_queries_total DNS lookups seen leaving pods on this node, by the rcode of their answer (none: no answer).\n# TYPE netprobe_dns_queries_total counter\n");
        for (rcode, n) in &self.dns_queries {
            s.push_str(&format!(
                "netprobe_dns_queries_total{{rcode=\"{}\"}} {n}\n",
                label(rcode)
            ));
        }
        s.push_str("# HELP netprobe_lost_events_total Events the kernel could not queue (ring buffer full).\n# TYPE netprobe_lost_events_total counter\n");
        s.push_str(&format!("netprobe_lost_events_total {}\n", self.lost));
        s.push_str("# HELP netprobe_kernel_drops_total Drops in the watched namespaces counted in the kernel, by reason (events lost or not).\n# TYPE netprobe_kernel_drops_total counter\n");
        for (reason, n) in &self.kernel_drops {
            s.push_str(&format!(
                "netprobe_kernel_drops_total{{reason=\"{}\"}} {n}\n",
                label(reason)
            ));
        }
        s.push_str("# HELP netprobe_program_runs_total Runs of each netprobe eBPF program, counted while the kernel's run-time statistics are on (agent --program-stats or sysctl kernel.bpf_stats_enabled=1).\n# TYPE netprobe_program_runs_total counter\n");
        for p in &self.programs {
            s.push_str(&format!(
                "netprobe_program_runs_total{{program=\"{}\"}} {}\n",
                label(&p.program),
                p.runs
            ));
        }
        s.push_str("# HELP netprobe_program_run_seconds_total Time the kernel spent in each netprobe eBPF program, counted while its run-time statistics are on.\n# TYPE netprobe_program_run_seconds_total counter\n");
        for p in &self.programs {
            s.push_str(&format!(
                "netprobe_program_run_seconds_total{{program=\"{}\"}} {:.9}\n",
                label(&p.program),
                p.run_ns as f64 / 1e9
            ));
        }
        s.push_str("# HELP netprobe_events_total Events the kernel queued.\n# TYPE netprobe_events_total counter\n");
        s.push_str(&format!("netprobe_events_total {}\n", self.emitted));
        s.push_str("# HELP netprobe_attached_interfaces Interfaces with tc programs attached.\n# TYPE netprobe_attached_interfaces gauge\n");
        s.push_str(&format!(
            "netprobe_attached_interfaces {}\n",
            self.interfaces
        ));
        s.push_str("# HELP netprobe_watched_namespaces Network namespaces in scope.\n# TYPE netprobe_watched_namespaces gauge\n");
        s.push_str(&format!(
            "netprobe_watched_namespaces {}\n",
            self.namespaces
        ));
        s.push_str(&format!(
            "# HELP netprobe_event_delay_max_seconds Longest time from the kernel's timestamp of an event to the agent reading it, over the last second.\n# TYPE netprobe_event_delay_max_seconds gauge\nnetprobe_event_delay_max_seconds {:.6}\n",
            self.delay_max_s
        ));
        s.push_str(&format!(
            "# TYPE netprobe_ready gauge\nnetprobe_ready {}\n",
            u8::from(self.ready)
        ));
        s.push_str("# HELP netprobe_probe_up Whether each kernel probe is attached (0: refused by this kernel, see /readyz).\n# TYPE netprobe_probe_up gauge\n");
        for (program, _) in crate::probes::always_on_tracepoints() {
            let up = !self.degraded.iter().any(|(p, _)| p == program);
            s.push_str(&format!(
                "netprobe_probe_up{{probe=\"{program}\"}} {}\n",
                u8::from(up)
            ));
        }
        s
    }

    fn count(&mut self, e: &Event) {
        match e.kind {
            Kind::Drop => {
                let d = e.drop.as_ref().expect("drop");
                let peer = e
                    .destination
                    .as_ref()
                    .filter(|p| p.pod.is_some())
                    .or(e.source.as_ref());
                let key = (
                    d.reason.clone(),
                    peer.and_then(|p| p.namespace.clone()).unwrap_or_default(),
                    peer.and_then(|p| p.pod.clone()).unwrap_or_default(),
                    String::new(),
                );
                *self.drops.entry(key).or_default() += 1;
            }
            Kind::SendReset => self.resets += 1,
            Kind::SocketError => {
                let name = e.error.as_ref().map(|x| x.name.clone()).unwrap_or_default();
                *self.app_errors.entry(name).or_default() += 1;
            }
            Kind::Retransmit => {
                let node = e
                    .translated
                    .as_ref()
                    .and_then(|t| t.peer.as_ref())
                    .or(e.destination.as_ref())
                    .and_then(|p| p.node.clone())
                    .unwrap_or_default();
                *self.syn_retransmits.entry(node).or_default() += 1;
            }
            Kind::DnsFailure => {
                let client = e.source.as_ref();
                let key = (
                    client.and_then(|p| p.namespace.clone()).unwrap_or_default(),
                    client.and_then(|p| p.pod.clone()).unwrap_or_default(),
                    e.dns_failure
                        .as_ref()
                        .map(|f| f.reason.clone())
                        .unwrap_or_default(),
                );
                *self.dns_failures.entry(key).or_default() += 1;
            }
            _ => {}
        }
    }
}

/// (event kind, reason, namespace, pod)
type StormKey = (String, String, String, String);

/// Storm control: a per-key budget per second; what exceeds it is counted, then reported.
#[derive(Default)]
struct Storm {
    /// key → (second, written in that second, suppressed in that second)
    keys: std::collections::HashMap<StormKey, (u64, u32, u64)>,
}

/// Written instead of the events a storm suppressed (one per key and second).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Suppressed {
    pub schema: String,
    /// Always `suppressed`.
    pub kind: String,
    /// Kind of the suppressed events (`drop`, `send_reset`, …).
    pub event_kind: String,
    pub reason: String,
    pub namespace: String,
    pub pod: String,
    /// Events not written in that second (all are counted in /metrics).
    pub count: u64,
    /// Unix second the count covers.
    pub second: u64,
}

fn storm_key(e: &Event) -> StormKey {
    let reason = e
        .drop
        .as_ref()
        .map(|d| d.reason.clone())
        .or_else(|| e.error.as_ref().map(|x| x.name.clone()))
        .or_else(|| e.dns_failure.as_ref().map(|f| f.reason.clone()))
        .unwrap_or_default();
    let peer = e
        .destination
        .as_ref()
        .filter(|p| p.pod.is_some())
        .or(e.source.as_ref());
    (
        serde_json::to_value(e.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        reason,
        peer.and_then(|p| p.namespace.clone()).unwrap_or_default(),
        peer.and_then(|p| p.pod.clone()).unwrap_or_default(),
    )
}

impl Storm {
    /// Whether to write this event now.
    fn admit(&mut self, key: StormKey, second: u64, limit: u32) -> bool {
        let slot = self.keys.entry(key).or_insert((second, 0, 0));
        if slot.0 != second {
            // A new second: the previous one's suppressed count is flushed by `flush` first.
            *slot = (second, 0, 0);
        }
        if slot.1 < limit {
            slot.1 += 1;
            true
        } else {
            slot.2 += 1;
            false
        }
    }

    /// Suppressed counts of seconds before `second`, once each.
    fn flush(&mut self, second: u64) -> Vec<Suppressed> {
        let mut out = Vec::new();
        self.keys.retain(|(kind, reason, ns, pod), slot| {
            if slot.0 < second {
                if slot.2 > 0 {
                    out.push(Suppressed {
                        schema: crate::events::SCHEMA.into(),
                        kind: "suppressed".into(),
                        event_kind: kind.clone(),
                        reason: reason.clone(),
                        namespace: ns.clone(),
                        pod: pod.clone(),
                        count: slot.2,
                        second: slot.0,
                    });
                }
                return false;
            }
            true
        });
        out
    }
}

fn unix_second() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Kubernetes Events for drops that hit a known pod: at most one per (pod, reason) per minute,
/// so a storm never turns into an API storm.
#[derive(Default)]
struct EventRateLimit {
    last: std::collections::HashMap<(String, String, String), std::time::Instant>,
}

impl EventRateLimit {
    fn admit(&mut self, key: (String, String, String), now: std::time::Instant) -> bool {
        match self.last.get(&key) {
            Some(t) if now.duration_since(*t) < std::time::Duration::from_secs(60) => false,
            _ => {
                self.last.insert(key, now);
                true
            }
        }
    }
}

/// The Kubernetes Event for a drop that hit a known pod (the destination if known, else the
/// source), with the key it is rate-limited by.
fn pod_event(
    e: &Event,
    inventory: &crate::enrich::pods::Inventory,
    node: Option<&str>,
) -> Option<(
    kube::runtime::events::Event,
    k8s_openapi::api::core::v1::ObjectReference,
    (String, String, String),
)> {
    let d = e.drop.as_ref()?;
    let peer = [&e.destination, &e.source]
        .into_iter()
        .flatten()
        .find(|p| p.pod.is_some())?;
    let (ns, name) = (peer.namespace.clone()?, peer.pod.clone()?);
    let pod = inventory.find_pod(Some(&ns), &name).into_iter().next()?;
    let note = format!(
        "netprobe: {} {}:{} > {}:{} dropped by the kernel: {} at {}{}",
        e.protocol,
        e.src,
        e.sport,
        e.dst,
        e.dport,
        d.reason,
        d.location,
        node.map(|n| format!(" on node {n}")).unwrap_or_default()
    );
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.clone()),
        namespace: Some(ns.clone()),
        uid: Some(pod.uid.clone()),
        ..Default::default()
    };
    let ev = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Warning,
        reason: "PacketDropped".into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Drop".into(),
        secondary: None,
    };
    Some((ev, reference, (ns, name, d.reason.clone())))
}

/// A SYN retransmitted or a socket error toward a Service: where the connection really went,
/// from this node's conntrack (the socket only knows the ClusterIP). Names the backend pod and
/// its node — across nodes, "SYNs to pods on node-b go unanswered" shows up here.
fn translate(e: &mut Event, inventory: &crate::enrich::pods::Inventory) {
    use crate::enrich::conntrack;
    let to_service = e.destination.as_ref().is_some_and(|d| d.service.is_some());
    if !to_service || e.protocol != "tcp" || !matches!(e.kind, Kind::Retransmit | Kind::SocketError)
    {
        return;
    }
    let tuple = conntrack::Tuple {
        src: e.src,
        sport: e.sport,
        dst: e.dst,
        dport: e.dport,
    };
    // The agent runs in the node's namespace, where kube-proxy's DNAT keeps its entries.
    if let Ok(Some(entry)) = conntrack::lookup(libc::IPPROTO_TCP as u8, &tuple)
        && let Some((dst, dport)) = entry.translated_destination()
    {
        e.translated = Some(crate::events::Translated {
            dst,
            dport,
            peer: Some(inventory.peer(dst, dport, None, None)),
        });
    }
}

/// What the DNS engine takes: UDP to or from port 53, and ICMP errors quoting it.
fn dns_related(e: &Event) -> bool {
    e.protocol != "tcp" && (e.sport == DNS_PORT || e.dport == DNS_PORT)
}

/// DNS verdicts of the always-on engine: every lookup counted by the rcode of its answer;
/// failures written as `dns_failure` events (storm-controlled like every event) and counted by
/// client pod and reason.
fn report_dns(
    verdicts: Vec<crate::verdict::Verdict>,
    pods: Option<&PodContext>,
    metrics: &Mutex<Metrics>,
    storm: &mut Storm,
    rate_limit: u32,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    for mut v in verdicts {
        let Some(rcode) = v
            .udp
            .as_ref()
            .and_then(|u| u.dns.as_ref())
            .filter(|_| v.outcome != crate::verdict::Outcome::Unknown)
            .map(|d| d.rcode.clone().unwrap_or_else(|| "none".into()))
        else {
            continue;
        };
        *metrics
            .lock()
            .expect("metrics lock")
            .dns_queries
            .entry(rcode)
            .or_default() += 1;
        if crate::events::dns_failure(&v).is_none() {
            // Healthy lookups (NXDOMAIN included) are only counted: no name lookup either.
            continue;
        }
        if let Some(p) = pods {
            p.annotate_verdict(&mut v);
        }
        let Some(e) = crate::events::dns_failure(&v) else {
            continue;
        };
        metrics.lock().expect("metrics lock").count(&e);
        if storm.admit(storm_key(&e), unix_second(), rate_limit) {
            serde_json::to_writer(&mut *out, &e).map_err(std::io::Error::from)?;
            out.write_all(b"\n")?;
        }
    }
    Ok(())
}

/// Always-on keeps what explains failures; handshakes that work are not news.
fn interesting(e: &Event) -> bool {
    match e.kind {
        Kind::Drop => true,
        Kind::SendReset | Kind::ReceiveReset => true,
        Kind::SocketError => e.error.as_ref().is_some_and(|x| x.errno != 0),
        Kind::Retransmit => !e.tcp_flags.is_empty(),
        // What the tc programs see in always-on mode (the kernel emits nothing else there): a
        // reset or an ICMP unreachable crossing a veth, e.g. from another node's firewall.
        Kind::Packet => e.tcp_flags.iter().any(|f| f == "RST") || e.protocol.starts_with("icmp"),
        _ => false,
    }
}

/// The agent's metrics state as its HTTP endpoints read it.
struct Status(Arc<Mutex<Metrics>>);

impl crate::cluster::server::AgentStatus for Status {
    fn metrics(&self) -> String {
        self.0.lock().expect("metrics lock").render()
    }

    fn readiness(&self) -> std::result::Result<String, String> {
        let m = self.0.lock().expect("metrics lock");
        match (m.ready, m.degraded.is_empty()) {
            (true, true) => Ok("ready\n".into()),
            // Still useful (drops or resets are still seen): ready, and says what is missing.
            (true, false) => Ok(format!(
                "ready, degraded: {}\n",
                m.degraded
                    .iter()
                    .map(|(p, why)| format!("probe {p} refused by the kernel ({why})"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
            (false, _) => Err("probes not attached yet\n".into()),
        }
    }
}

/// Attaches tc to links of the node namespace not attached yet; returns how many are attached.
fn attach_new(
    probes: &mut Probes,
    node: &NetnsRef,
    enricher: &Enricher,
    attached: &mut HashSet<(u32, String)>,
) -> Result<usize> {
    let links = netlink::links()?;
    let fresh: Vec<(u32, String)> = links
        .iter()
        .filter(|l| l.up && l.name != "lo" && !attached.contains(&(l.index, l.name.clone())))
        .map(|l| (l.index, l.name.clone()))
        .collect();
    if !fresh.is_empty() {
        for (ix, name) in &fresh {
            enricher.add_interface(node.inode, *ix, name);
        }
        let names: HashSet<&str> = fresh.iter().map(|(_, n)| n.as_str()).collect();
        // One pass for all new links (one link dump, one namespace entry). A link that vanished
        // between listing and attaching is not an error.
        let atts = probes
            .attach_tc(node, |l| names.contains(l.name.as_str()))
            .unwrap_or_else(|_| {
                // One link failed (gone meanwhile): the others one by one.
                names
                    .iter()
                    .filter_map(|n| probes.attach_tc(node, |l| l.name == *n).ok())
                    .flatten()
                    .collect()
            });
        for a in atts {
            enricher.add_tc(&a);
        }
        attached.extend(fresh);
    }
    let present: HashSet<(u32, String)> = links.iter().map(|l| (l.index, l.name.clone())).collect();
    attached.retain(|k| present.contains(k));
    Ok(attached.len())
}

pub async fn run(opts: AgentOptions, mut out: impl Write) -> Result<()> {
    require_root()?;
    let metrics = Arc::new(Mutex::new(Metrics::default()));
    let listener = tokio::net::TcpListener::bind(opts.metrics_addr)
        .await
        .map_err(|e| Error::io(format!("listening on {}", opts.metrics_addr), e))?;
    tokio::spawn(crate::cluster::server::serve(
        listener,
        Arc::new(Status(metrics.clone())),
        crate::cluster::server::TraceServer::new()?,
    ));

    // Held until the agent exits; the kernel turns the statistics off when it is closed.
    let _run_time_stats = opts
        .program_stats
        .then(crate::probes::enable_run_time_stats)
        .transpose()?;
    let kbtf = KernelBtf::load()?;
    let btf = kbtf.aya();
    let node = NetnsRef::current()?;
    // Leftovers of traces whose process was killed (the agent's own remote traces included).
    crate::probes::nft_trace::remove_stale_in(&node)?;
    crate::probes::leftovers::remove_orphans_in(&node)?;
    let enricher = Enricher::new(&kbtf)?;
    // Every port; the namespace filter keeps the host's other namespaces out.
    let mut probes = Probes::load_with_ring(
        &kbtf,
        Filter {
            netns_enabled: 1,
            // Healthy handshakes cost no event: only failure signals reach userspace.
            failures_only: 1,
            ..Default::default()
        },
        opts.ring_bytes,
    )?;
    // Routine socket teardown (a closing socket purging a queued FIN) is counted in
    // netprobe_kernel_drops_total but is not an event: it would cost one per connection.
    let quiet: Vec<(u32, u8)> = kbtf
        .enum_names("skb_drop_reason", "SKB_DROP_REASON_")?
        .into_iter()
        .filter_map(|(code, name)| {
            QUIET_DROP_REASONS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|&(_, mode)| (code, mode))
        })
        .collect();
    probes.set_quiet_reasons(&quiet)?;
    let mut scope: HashSet<u64> = HashSet::new();
    let add_scope = |probes: &mut Probes, ns: &NetnsRef, scope: &mut HashSet<u64>| -> Result<()> {
        if scope.insert(ns.inode) {
            probes.set_netns_filter(&[ns.inode])?;
            enricher.add_netns(ns.inode, &ns.name);
        }
        Ok(())
    };
    add_scope(&mut probes, &node, &mut scope)?;
    for ns in netns::veth_peers()? {
        add_scope(&mut probes, &ns, &mut scope)?;
    }
    let missing =
        probes.attach_tracepoints_degradable(btf, &crate::probes::always_on_tracepoints())?;
    for (program, why) in &missing {
        eprintln!("netprobe agent: DEGRADED: probe {program} refused, running without it: {why}");
    }
    // The parsed kernel BTF (tens of MiB) was only needed to load and attach: give it back.
    drop(kbtf);
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe { libc::malloc_trim(0) };
    let mut attached = HashSet::new();
    let interfaces = attach_new(&mut probes, &node, &enricher, &mut attached)?;
    let mut reader = EventReader::new(probes.take_events()?)?;
    let mut pods = pod_context(false, opts.node_name.as_deref(), None, &node).await?;
    {
        let mut m = metrics.lock().expect("metrics lock");
        m.ready = true;
        m.degraded = missing
            .iter()
            .map(|(p, why)| (p.to_string(), why.clone()))
            .collect();
        m.interfaces = interfaces;
        m.namespaces = scope.len();
    }
    if let Some(path) = &opts.ready_file {
        std::fs::write(path, b"ready\n")
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    }
    eprintln!(
        "netprobe agent: {} interfaces, {} namespaces; metrics on {}",
        interfaces,
        scope.len(),
        opts.metrics_addr
    );

    // New veths are attached as soon as the kernel announces them; the 200 ms poll stays as a
    // safety net (and for the pod namespaces behind them).
    // SAFETY: LinkMonitor owns its fd and closes it only when dropped, with the AsyncFd.
    let links = unsafe { tokio::io::unix::AsyncFd::register(netlink::LinkMonitor::open()?) }
        .map_err(|e| Error::io("watching link notifications", e.into()))?;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    let mut ticks = 0u64;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("installing SIGTERM handler", e))?;
    let mut write_err = None;
    let mut delay_max_ns = 0u64;
    let mut delay_window = std::time::Instant::now();
    let mut storm = Storm::default();
    let mut event_limit = EventRateLimit::default();
    let recorder = pods
        .as_ref()
        .map(|p| p.kube.recorder(opts.node_name.as_deref()));
    // DNS lookups: queries paired with replies, drops and ICMP errors (UDP has no handshake to
    // tell failure from success, so the agent judges them as a trace does).
    let mut dns = crate::verdict::Engine::new(crate::verdict::Context {
        port: DNS_PORT,
        udp: true,
        listeners: Default::default(),
    });
    let started = std::time::Instant::now();
    let dns_now = move || started.elapsed().as_nanos() as u64;
    let write_line = |out: &mut dyn Write, v: &dyn erased::Json| -> std::io::Result<()> {
        v.write_json(out)?;
        out.write_all(b"\n")
    };
    loop {
        tokio::select! {
            r = reader.next_batch(|rec| {
                // Kernel timestamp (CLOCK_MONOTONIC) to now: how far behind the agent runs.
                delay_max_ns = delay_max_ns.max(crate::enrich::monotonic_ns().saturating_sub(rec.ev.ts_ns));
                let Some(mut e) = enricher.enrich_record(&rec) else { return };
                if !interesting(&e) && !dns_related(&e) {
                    return;
                }
                if let Some(p) = &pods {
                    p.annotate_event(&mut e);
                    translate(&mut e, &p.inventory);
                }
                if dns_related(&e) {
                    let verdicts = dns.push(e.clone(), dns_now());
                    if let Err(err) = report_dns(verdicts, pods.as_ref(), &metrics, &mut storm, opts.rate_limit, &mut out) {
                        write_err.get_or_insert(err);
                    }
                }
                if !interesting(&e) {
                    return;
                }
                metrics.lock().expect("metrics lock").count(&e);
                if let (Some(rec), Some(p)) = (&recorder, &pods)
                    && let Some((ev, reference, key)) = pod_event(&e, &p.inventory, opts.node_name.as_deref())
                    && event_limit.admit(key, std::time::Instant::now())
                {
                    let rec = rec.clone();
                    tokio::spawn(async move {
                        if let Err(err) = rec.publish(&ev, &reference).await {
                            log::warn!("publishing a Kubernetes Event failed: {err}");
                        }
                    });
                }
                let second = unix_second();
                for s in storm.flush(second) {
                    if let Err(err) = write_line(&mut out, &s) {
                        write_err.get_or_insert(err);
                    }
                }
                if storm.admit(storm_key(&e), second, opts.rate_limit)
                    && let Err(err) = write_line(&mut out, &e)
                {
                    write_err.get_or_insert(err);
                }
            }) => r?,
            r = links.readable() => {
                if let Ok(mut guard) = r {
                    let changed = guard.get_inner().drain();
                    guard.clear_ready();
                    if changed {
                        // The tick does the attaching: run it now.
                        tick.reset_immediately();
                    }
                }
            }
            _ = tick.tick() => {
                ticks += 1;
                for s in storm.flush(unix_second()) {
                    if let Err(err) = write_line(&mut out, &s) {
                        write_err.get_or_insert(err);
                    }
                }
                // Lookups decided meanwhile: settled, or unanswered for 5 s.
                let verdicts = dns.poll(dns_now());
                if let Err(err) = report_dns(verdicts, pods.as_ref(), &metrics, &mut storm, opts.rate_limit, &mut out) {
                    write_err.get_or_insert(err);
                }
                // New veths (new pods) within 200 ms; their namespaces join the filter.
                let n = attach_new(&mut probes, &node, &enricher, &mut attached).unwrap_or(attached.len());
                for ns in netns::veth_peers().unwrap_or_default() {
                    add_scope(&mut probes, &ns, &mut scope)?;
                }
                if ticks.is_multiple_of(5) && let Some(p) = pods.as_mut() {
                    p.rescan(&node);
                }
                let c = probes.counters()?;
                let mut m = metrics.lock().expect("metrics lock");
                if delay_window.elapsed() >= std::time::Duration::from_secs(1) {
                    m.delay_max_s = delay_max_ns as f64 / 1e9;
                    delay_max_ns = 0;
                    delay_window = std::time::Instant::now();
                }
                if ticks.is_multiple_of(5) {
                    m.programs = probes.program_stats();
                }
                m.interfaces = n;
                m.namespaces = scope.len();
                m.lost = c.lost;
                m.emitted = c.emitted;
                m.kernel_drops = c
                    .drops_matched
                    .iter()
                    .map(|(r, n)| (enricher.drop_reason_name(*r), *n))
                    .collect();
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
        // One flush per batch, not per event.
        if let Err(e) = out.flush() {
            write_err.get_or_insert(e);
        }
        if let Some(e) = write_err.take() {
            return Err(Error::io("writing events to stdout", e));
        }
    }
    metrics.lock().expect("metrics lock").ready = false;
    for s in storm.flush(u64::MAX) {
        let _ = write_line(&mut out, &s);
    }
    let _ = out.flush();
    probes.detach_tc();
    Ok(())
}

/// Serializing events and suppression records through one writer.
mod erased {
    pub trait Json {
        fn write_json(&self, out: &mut dyn std::io::Write) -> std::io::Result<()>;
    }

    impl<T: serde::Serialize> Json for T {
        fn write_json(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
            serde_json::to_writer(out, self).map_err(std::io::Error::from)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pod: &str) -> StormKey {
        (
            "drop".into(),
            "NETFILTER_DROP".into(),
            "default".into(),
            pod.into(),
        )
    }

    #[test]
    fn storm_control_writes_the_budget_and_counts_the_rest_once() {
        let mut s = Storm::default();
        let written = (0..100).filter(|_| s.admit(key("a-0"), 10, 5)).count();
        assert_eq!(written, 5);
        assert!(s.admit(key("b-0"), 10, 5), "budgets are per key");
        assert!(s.flush(10).is_empty(), "the current second is still open");
        let sup = s.flush(11);
        assert_eq!(sup.len(), 1);
        assert_eq!(
            (sup[0].pod.as_str(), sup[0].count, sup[0].second),
            ("a-0", 95, 10)
        );
        assert!(s.flush(12).is_empty(), "reported once");
        assert!(s.admit(key("a-0"), 12, 5), "a new second, a new budget");
    }
}
