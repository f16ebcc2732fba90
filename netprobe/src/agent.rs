//! `netprobe agent`: always-on mode for a DaemonSet, as a configuration of the session. Loads
//! the probes once for every port, watches the node's namespace and every pod namespace behind
//! its veths (new veths are attached when rtnetlink announces them, with a 200 ms poll as a
//! safety net), and runs the session with the ring buffer as source, names and conntrack as
//! stages, a DNS judge (failed lookups), and as sinks the storm-controlled NDJSON log on stdout
//! (schema `netprobe.event/v1`), Prometheus `/metrics` and Kubernetes Events. It serves
//! `/metrics`, `/healthz`, `/readyz` and `/v1/trace` (cluster-mode trace, see
//! [`crate::cluster`]) on a loopback address. With an API server and `--node-name` it answers
//! the `Trace` objects of its node's pods in this session ([`crate::sources::traces`]: a sink
//! scoped to the pod's flows, no child process). SIGTERM/SIGINT: running Trace objects marked
//! Failed, detach and exit. What it holds per pod is released when the pod is gone ([`scope`]).

mod scope;

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    rc::Rc,
    time::{Duration, Instant},
};

use futures::future::LocalBoxFuture;
use netprobe_common::{DNS_PORT, Filter, quiet};

use self::scope::{Interfaces, Scope};
use crate::{
    enrich::{
        Enricher,
        listeners::Listener,
        names::{PodContext, pod_context},
        stages,
    },
    error::{Error, Result},
    events::{Event, Kind},
    netlink,
    netns::{self, NetnsRef},
    probes::{Probes, btf::KernelBtf, require_root},
    session::{
        Ended, Housekeeping, Input, Judge, Route, Session, Signals, Source, Stage, Stats, Summary,
    },
    sinks::{
        Sinks,
        kube_events::KubeEventsSink,
        ndjson::observing_node,
        prometheus::{MetricsOptions, PrometheusSink, SharedMetrics},
        storm::StormControlledLog,
        trace_status::TraceStatusSink,
    },
    sources::{
        nftrace::armed::{self, ArmOnDrop, ArmedTrace, Arming},
        ring::{EventReader, RingSource},
        traces::TraceController,
        xtables::{Counted, CounterScope, RuleCounters},
    },
    verdict::{Context, Engine},
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
    /// Also write raw kernel events to stdout (see `--raw-events`).
    pub raw_events: bool,
    /// Labels and bound of `netprobe_failed_connections_total`.
    pub metrics: MetricsOptions,
    /// Namespaces watched at once (the node's and its pods'): the kernel filter map's size.
    pub max_namespaces: u32,
    /// The budget of Kubernetes Event writes.
    pub events: crate::sinks::kube_events::EventsOptions,
    /// Trace objects of this node's pods running at once (the rest stay Pending).
    pub max_traces: usize,
}

/// Which events go where: TCP and DNS to the judge (one verdict per failed attempt), what
/// explains failures to the sinks (counted in /metrics; written with `--raw-events`).
fn route(e: &Event) -> Route {
    Route {
        judge: e.protocol == crate::model::Protocol::Tcp || dns_related(e) || quotes_tcp(e),
        sinks: interesting(e),
    }
}

/// An ICMP error about a TCP segment (it quotes a port other than DNS's): the TCP engine's.
fn quotes_tcp(e: &Event) -> bool {
    e.protocol.is_icmp() && !dns_related(e)
}

/// What the DNS engine takes: UDP to or from port 53, and ICMP errors quoting it.
fn dns_related(e: &Event) -> bool {
    e.protocol != crate::model::Protocol::Tcp && (e.sport == DNS_PORT || e.dport == DNS_PORT)
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
        Kind::Packet => e.has_flag(crate::model::TcpFlag::Rst) || e.protocol.is_icmp(),
        _ => false,
    }
}

/// The agent's metrics state and its inventory's sync, as its HTTP endpoints read them.
struct Status {
    metrics: SharedMetrics,
    /// Set once the inventory is started (an API server is configured).
    inventory: std::sync::Arc<std::sync::OnceLock<crate::enrich::kube::InventorySync>>,
}

impl crate::cluster::server::AgentStatus for Status {
    fn metrics(&self) -> String {
        // Copied under the lock, encoded without it: the sinks do not wait for a scrape.
        let families = self.metrics.lock().expect("metrics lock").families();
        let mut out = crate::sinks::prometheus::exposition::text(families);
        if let Some(sync) = self.inventory.get() {
            out.push_str(&inventory_synced_metric(sync));
        }
        out
    }

    /// Ready once the probes are attached. A refused probe or an inventory not synced (API
    /// server unreachable) is said in the body but still ready (200): the agent still judges
    /// and counts failures, and a readiness that follows the API server would mark every
    /// agent unready in an API outage, stalling DaemonSet rollouts when they are needed most.
    fn readiness(&self) -> std::result::Result<String, String> {
        let m = self.metrics.lock().expect("metrics lock");
        if !m.ready {
            return Err("probes not attached yet\n".into());
        }
        let mut missing: Vec<String> = m
            .degraded
            .iter()
            .map(|(p, why)| format!("probe {p} refused by the kernel ({why})"))
            .collect();
        missing.extend(self.inventory.get().and_then(|i| i.not_synced()));
        if missing.is_empty() {
            return Ok("ready\n".into());
        }
        Ok(format!("ready, degraded: {}\n", missing.join("; ")))
    }
}

/// `netprobe_inventory_synced{kind}`: 1 once the kind's first list is in (what `/readyz` says
/// in words), so an alert can follow it. Absent without an API server.
fn inventory_synced_metric(sync: &crate::enrich::kube::InventorySync) -> String {
    use crate::sinks::prometheus::exposition::{Family, Labels, text};
    text(vec![Family::gauges(
        "netprobe_inventory_synced",
        "Whether the inventory has its first full list of each kind from the API server (0: no names for it yet, retrying in the background).",
        sync.kinds()
            .into_iter()
            .map(|(kind, synced)| (Labels::one("kind", kind), i64::from(synced))),
    )])
}

/// rtnetlink link notifications as a source: a new veth (a new pod) runs the housekeeping now
/// instead of at the next 200 ms tick.
struct LinkChanges(tokio::io::unix::AsyncFd<netlink::LinkMonitor>);

impl LinkChanges {
    fn open() -> Result<Self> {
        // SAFETY: LinkMonitor owns its fd and closes it only when dropped, with the AsyncFd.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(netlink::LinkMonitor::open()?) }
            .map_err(|e| Error::io("watching link notifications", e.into()))?;
        Ok(Self(fd))
    }
}

impl Source for LinkChanges {
    fn next(&mut self) -> LocalBoxFuture<'_, Result<Input>> {
        Box::pin(async move {
            loop {
                let Ok(mut guard) = self.0.readable().await else {
                    return std::future::pending().await;
                };
                let changed = guard.get_inner().drain();
                guard.clear_ready();
                if changed {
                    return Ok(Input::Rescan);
                }
            }
        })
    }
}

/// The agent's scope and gauges, kept current every 200 ms: new veths attached, their
/// namespaces in the filter, pods rescanned, the kernel's counters in /metrics.
struct AgentHousekeeping {
    ticks: u64,
    node: NetnsRef,
    probes: Rc<RefCell<Probes>>,
    enricher: Rc<Enricher>,
    names: Option<Rc<RefCell<PodContext>>>,
    metrics: SharedMetrics,
    scope: Scope,
    /// The namespaces present now, by inode (the judge reads listeners in them).
    present: Namespaces,
    interfaces: Interfaces,
    delay_max_ns: Rc<Cell<u64>>,
    delay_window: Instant,
    tcp_opens: crate::sources::tcp_opens::TcpOpens,
    /// Armed flows expire here; both report to /metrics.
    arming: Arming,
    counted: CounterScope,
}

/// The node's and its pods' namespaces present now, by inode.
type Namespaces = Rc<RefCell<HashMap<u64, NetnsRef>>>;

impl AgentHousekeeping {
    /// New veths (new pods) attached within 200 ms, their namespaces in the filter; what
    /// deleted pods left (links, filter entries, names) released. Returns the interfaces
    /// attached and the pod namespaces present (None when they could not be listed).
    fn sync_pods(&mut self) -> Result<(usize, Option<Vec<NetnsRef>>)> {
        let mut probes = self.probes.borrow_mut();
        let n = self
            .interfaces
            .sync(&mut probes, &self.node, &self.enricher)
            .unwrap_or(self.interfaces.len());
        // Without a complete list of the peers nothing is released.
        let Ok(peers) = netns::veth_peers() else {
            return Ok((n, None));
        };
        for ns in self.scope.sync(&mut probes, &self.enricher, &peers)? {
            // Off the loop: listing its tables runs nft (tens of ms), per new pod.
            let ns = ns.clone();
            std::thread::spawn(move || clean_pod_leftovers(&ns));
        }
        Ok((n, Some(peers)))
    }

    /// Gauges from the kernel's counters and the ring source's worst delay.
    fn update_metrics(&mut self, interfaces: usize) -> Result<()> {
        let probes = self.probes.borrow();
        let c = probes.counters()?;
        let mut m = self.metrics.lock().expect("metrics lock");
        if self.delay_window.elapsed() >= Duration::from_secs(1) {
            m.delay_max_s = self.delay_max_ns.take() as f64 / 1e9;
            self.delay_window = Instant::now();
        }
        if self.ticks.is_multiple_of(5) {
            m.programs = probes.program_stats();
        }
        m.interfaces = interfaces;
        m.namespaces = self.scope.len();
        m.scope = self.scope.stats(&self.interfaces, &probes);
        m.arming = self.arming.stats();
        m.rule_counters = self.counted.stats();
        m.lost = c.lost;
        m.emitted = c.emitted;
        m.retransmits_counted = c.retransmits_counted;
        m.kernel_drops = c
            .drops_matched
            .iter()
            .map(|(r, n)| (self.enricher.drop_reason_name(*r), *n))
            .collect();
        Ok(())
    }
}

impl Housekeeping for AgentHousekeeping {
    fn tick(&mut self, stats: &Stats) -> Result<Option<Error>> {
        self.ticks += 1;
        self.metrics.lock().expect("metrics lock").engine = stats.engine;
        let (n, peers) = self.sync_pods()?;
        if let Some(peers) = peers {
            let mut present = self.present.borrow_mut();
            present.retain(|inode, _| *inode == self.node.inode);
            present.extend(peers.into_iter().map(|ns| (ns.inode, ns)));
        }
        if self.ticks.is_multiple_of(5)
            && let Some(names) = &self.names
        {
            names.borrow_mut().rescan(&self.node);
        }
        if self.ticks.is_multiple_of(25) {
            // Healthy attempts: counted from the namespaces' TCP MIB every 5 s.
            self.tcp_opens.update(self.present.borrow().values());
            self.metrics.lock().expect("metrics lock").tcp_attempts = self.tcp_opens.total;
        }
        self.arming.expire(Instant::now());
        self.update_metrics(n)?;
        Ok(None)
    }
}

/// Loads the programs for every port, failure signals only, with routine teardown drops
/// counted in the kernel but not sent.
pub fn load_probes(kbtf: &KernelBtf, ring_bytes: u32, max_namespaces: u32) -> Result<Probes> {
    let mut probes = Probes::load_sized(
        kbtf,
        Filter {
            netns_enabled: 1,
            // Healthy handshakes cost no event: only failure signals reach userspace.
            failures_only: 1,
            ..Default::default()
        },
        ring_bytes,
        max_namespaces,
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
    Ok(probes)
}

/// The node's probes, loaded and attached: tracepoints (degradable), tc on the node's links.
struct Attached {
    probes: Probes,
    enricher: Enricher,
    scope: Scope,
    interfaces: Interfaces,
    /// Probes the kernel refused: (program, reason).
    missing: Vec<(String, String)>,
}

/// Leftovers of a killed `trace --pod` in a pod's namespace: its `netprobe_<pid>` table and,
/// in clsact mode, its tc filters. A pod namespace may vanish meanwhile: said, not fatal.
fn clean_pod_leftovers(ns: &NetnsRef) {
    let cleaned = crate::probes::nft_trace::remove_stale_in(ns)
        .and_then(|()| crate::probes::leftovers::remove_orphans_in(ns));
    if let Err(e) = cleaned {
        eprintln!(
            "netprobe agent: cannot clean leftovers in netns {}: {e}",
            ns.name
        );
    }
}

fn attach(node: &NetnsRef, ring_bytes: u32, max_namespaces: u32) -> Result<Attached> {
    let kbtf = KernelBtf::load()?;
    // Leftovers of traces whose process was killed (the agent's own remote traces included),
    // in the node's namespace and in every pod's (a `trace --pod` installs in both).
    crate::probes::nft_trace::remove_stale_in(node)?;
    crate::probes::leftovers::remove_orphans_in(node)?;
    let pods = netns::veth_peers()?;
    pods.iter().for_each(clean_pod_leftovers);
    let enricher = Enricher::new(&kbtf)?;
    // Every port; the namespace filter keeps the host's other namespaces out.
    let mut probes = load_probes(&kbtf, ring_bytes, max_namespaces)?;
    let mut scope = Scope::new(&mut probes, node, &enricher, max_namespaces)?;
    // Their leftovers were cleaned above.
    scope.sync(&mut probes, &enricher, &pods)?;
    let missing = probes
        .attach_tracepoints_degradable(kbtf.aya(), &crate::probes::always_on_tracepoints())?
        .into_iter()
        .map(|(p, why)| (p.to_string(), why))
        .collect::<Vec<_>>();
    for (program, why) in &missing {
        eprintln!("netprobe agent: DEGRADED: probe {program} refused, running without it: {why}");
    }
    // The kernel BTF (its file, ~5 MiB, and an index) was only needed to load and attach.
    drop(kbtf);
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe { libc::malloc_trim(0) };
    let mut interfaces = Interfaces::default();
    interfaces.sync(&mut probes, node, &enricher)?;
    Ok(Attached {
        probes,
        enricher,
        scope,
        interfaces,
        missing,
    })
}

pub async fn run(opts: AgentOptions, out: impl Write) -> Result<()> {
    require_root()?;
    let signals = Signals::install()?;
    let metrics = SharedMetrics::default();
    let listener = tokio::net::TcpListener::bind(opts.metrics_addr)
        .await
        .map_err(|e| Error::io(format!("listening on {}", opts.metrics_addr), e))?;
    // The memory of recent failures, fed by a sink, served on /v1/failures.
    let failures = crate::cluster::memory::Failures::shared(crate::cluster::memory::this_node(
        opts.node_name.as_deref(),
    ));
    let inventory = std::sync::Arc::new(std::sync::OnceLock::new());
    let traces = crate::cluster::server::TraceServer::new()?.with_failures(failures.clone());
    tokio::spawn(crate::cluster::server::serve(
        listener,
        std::sync::Arc::new(Status {
            metrics: metrics.clone(),
            inventory: inventory.clone(),
        }),
        traces.clone(),
    ));
    // Held until the agent exits; the kernel turns the statistics off when it is closed.
    let _run_time_stats = opts
        .program_stats
        .then(crate::probes::enable_run_time_stats)
        .transpose()?;
    let node = NetnsRef::current()?;
    let Attached {
        mut probes,
        enricher,
        scope,
        interfaces,
        missing,
    } = attach(&node, opts.ring_bytes, opts.max_namespaces)?;
    let enricher = Rc::new(enricher);
    let ring = RingSource::new(EventReader::new(probes.take_events()?)?, enricher.clone());
    let delay_max_ns = ring.delay_max();
    let names = names(opts.node_name.as_deref(), &node, &inventory).await?;
    // Before ready: the first drop after it is diffed against these counters, and the first
    // connection after it is counted.
    let attribution = RuleAttribution::start(&node, enricher.clone())?;
    let present: Namespaces = Rc::new(RefCell::new(
        std::iter::once(node.clone())
            .chain(netns::veth_peers()?)
            .map(|ns| (ns.inode, ns))
            .collect(),
    ));
    let mut tcp_opens = crate::sources::tcp_opens::TcpOpens::default();
    tcp_opens.update(present.borrow().values());
    mark_ready(&metrics, &missing, interfaces.len(), scope.len());
    if let Some(path) = &opts.ready_file {
        std::fs::write(path, b"ready\n")
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    }
    eprintln!(
        "netprobe agent: {} interfaces, {} namespaces; metrics on {}",
        interfaces.len(),
        scope.len(),
        opts.metrics_addr
    );
    let probes = Rc::new(RefCell::new(probes));
    let arming = attribution.armed.arming();
    let counted = attribution.counters.scope();
    let mut sources: Vec<Box<dyn Source>> = vec![
        Box::new(ring),
        Box::new(LinkChanges::open()?),
        Box::new(attribution.armed),
    ];
    let mut sinks = agent_sinks(&opts, out, &metrics, names.as_ref())
        .with(crate::cluster::memory::FailuresSink::new(failures))
        .with(Disarm(arming.clone()));
    // Trace objects of this node's pods, answered in this session.
    let trace_objects = match (&names, opts.node_name.as_deref()) {
        (Some(n), Some(node)) => {
            let client = n.borrow().kube.client();
            let (subs, stops, handle) =
                TraceController::start(client, node.to_string(), opts.max_traces, arming.clone());
            sources.push(Box::new(stops));
            sinks = sinks.with(TraceStatusSink::new(subs, node));
            Some(handle)
        }
        _ => None,
    };
    let mut session = Session {
        sources,
        route,
        stages: enrichment(names.as_ref(), attribution.counters, arming.clone()),
        judge: Some(judge(names.clone(), present.clone(), enricher.clone())),
        sinks,
        housekeeping: Box::new(AgentHousekeeping {
            ticks: 0,
            node,
            probes: probes.clone(),
            enricher,
            names,
            metrics: metrics.clone(),
            scope,
            present,
            interfaces,
            delay_max_ns,
            delay_window: Instant::now(),
            tcp_opens,
            arming,
            counted,
        }),
        tick: Duration::from_millis(200),
        deadline: None,
        count: None,
        signals,
        stats: Stats::default(),
    };
    let ended = session.run().await?;
    metrics.lock().expect("metrics lock").ready = false;
    // The remote traces remove their tables (in pod namespaces too) before the agent exits.
    traces.shutdown().await;
    // Running Trace objects are marked Failed: the agent stopped mid-trace.
    if let Some(t) = trace_objects {
        t.shutdown(Duration::from_secs(5)).await;
    }
    let finished = crate::sinks::Sink::finish(&mut session.into_sinks(), &Summary::new());
    probes.borrow_mut().detach_tc();
    match ended {
        Ended::OutputGone(e) => Err(Error::io("writing events to stdout", e)),
        Ended::Scope(e) => Err(e),
        _ => finished.map_err(|e| Error::io("writing events to stdout", e)),
    }
}

/// The inventory, when an API server is configured; its sync state goes to `/readyz`. With the
/// API server down this goes on after a few seconds without names: the inventory keeps trying
/// in the background and names appear once it is listed.
async fn names(
    node_name: Option<&str>,
    node: &NetnsRef,
    sync: &std::sync::OnceLock<crate::enrich::kube::InventorySync>,
) -> Result<Option<Rc<RefCell<PodContext>>>> {
    let names = pod_context(false, node_name, None, node).await?;
    if let Some(n) = &names {
        let _ = sync.set(n.kube.sync());
    }
    Ok(names.map(|p| Rc::new(RefCell::new(p))))
}

fn mark_ready(
    metrics: &SharedMetrics,
    missing: &[(String, String)],
    interfaces: usize,
    namespaces: usize,
) {
    let mut m = metrics.lock().expect("metrics lock");
    m.ready = true;
    m.degraded = missing.to_vec();
    m.interfaces = interfaces;
    m.namespaces = namespaces;
}

/// Names (when an API server is configured), then conntrack for connections to Services.
/// Names (when an API server is configured), then conntrack for connections to Services, then
/// the rule behind a netfilter drop: the rule counters name it at once, and the flow is armed so
/// that its retransmit (or the lookup's retry) is traced through every chain.
fn enrichment(
    names: Option<&Rc<RefCell<PodContext>>>,
    counters: RuleCounters,
    arming: Arming,
) -> Vec<Box<dyn Stage>> {
    let mut stages: Vec<Box<dyn Stage>> = Vec::new();
    if let Some(n) = names {
        stages.push(Box::new(stages::Names(n.clone())));
        stages.push(Box::new(stages::Conntrack(n.clone())));
    }
    stages.push(Box::new(counters));
    stages.push(Box::new(ArmOnDrop(arming)));
    stages
}

/// Rule attribution without a trace, in the node's namespace (where kube-proxy, Calico and
/// kube-router keep their rules): the counters stage, the armed-flow trace source, and the
/// handles the housekeeping and the sinks use.
struct RuleAttribution {
    counters: RuleCounters,
    armed: ArmedTrace,
}

impl RuleAttribution {
    fn start(node: &NetnsRef, enricher: Rc<Enricher>) -> Result<Self> {
        let counters = RuleCounters::new(Counted::All);
        counters.scope().add_netns(node)?;
        let armed = ArmedTrace::new(enricher, armed::DEFAULT_LIMIT, armed::DEFAULT_TTL);
        armed.arming().add_netns(node);
        Ok(Self { counters, armed })
    }
}

/// After a verdict its flow needs no trace any more.
struct Disarm(Arming);

impl crate::sinks::Sink for Disarm {
    fn verdict(&mut self, v: &crate::verdict::Verdict) -> std::io::Result<()> {
        // Only a drop in netfilter arms a flow: other verdicts (every healthy lookup) have
        // nothing to disarm.
        let in_netfilter = v.netfilter.is_some()
            || v.drop
                .as_ref()
                .is_some_and(|d| d.reason == crate::model::drop_reason::NETFILTER_DROP);
        if !in_netfilter {
            return Ok(());
        }
        let proto = if v.udp.is_some() {
            crate::model::Protocol::Udp
        } else {
            crate::model::Protocol::Tcp
        };
        self.0.disarm(proto, (v.client.addr, v.client.port));
        Ok(())
    }
}

/// The verdict engine on every TCP port (one verdict per failed connection attempt, as `trace`
/// gives it), and on DNS lookups: queries paired with replies, drops and ICMP errors (UDP has
/// no handshake to tell failure from success). Only failures get names; refusals get the
/// listeners of their namespace as they are then.
fn judge(
    names: Option<Rc<RefCell<PodContext>>>,
    present: Namespaces,
    enricher: Rc<Enricher>,
) -> Judge {
    // Connections past their handshake are followed from their first failure signal.
    let tcp = Engine::new(Context {
        port: crate::verdict::ANY_PORT,
        udp: false,
        listeners: Default::default(),
    })
    .judge_midstream();
    let dns = Engine::new(Context {
        port: DNS_PORT,
        udp: true,
        listeners: Default::default(),
    });
    let all = present.clone();
    // Read at most once a second per namespace: a client retrying a closed port in a loop
    // must not cost a namespace switch and a /proc read per refusal.
    let mut recent: HashMap<u64, (Instant, String, Vec<Listener>)> = HashMap::new();
    let lookup = move |inode: u64| {
        recent.retain(|_, (at, _, _)| at.elapsed() < Duration::from_secs(1));
        if let Some((_, name, found)) = recent.get(&inode) {
            return Some((name.clone(), found.clone()));
        }
        let (name, found) = read_listeners(&present, &enricher, inode)?;
        recent.insert(inode, (Instant::now(), name.clone(), found.clone()));
        Some((name, found))
    };
    Judge::new(tcp)
        .and(dns)
        .with_names(names)
        .name_failures_only()
        .with_route_hints()
        .with_namespaces(Box::new(move || all.borrow().values().cloned().collect()))
        .with_listener_lookup(Box::new(lookup))
}

/// Who listens in namespace `inode` now, and its name as the events carry it.
fn read_listeners(
    present: &Namespaces,
    enricher: &Enricher,
    inode: u64,
) -> Option<(String, Vec<Listener>)> {
    // A pod that came up since the last tick is looked for at once.
    let known = present.borrow().get(&inode).cloned();
    let ns = known.or_else(|| {
        let ns = netns::veth_peers()
            .ok()?
            .into_iter()
            .find(|n| n.inode == inode)?;
        present.borrow_mut().insert(inode, ns.clone());
        Some(ns)
    })?;
    let listeners = crate::enrich::listeners::listeners_in(&ns).ok()?;
    // Named as the events' namespaces are, so the engine finds them.
    let name = enricher
        .netns(inode)
        .name
        .unwrap_or_else(|| inode.to_string());
    Some((name, listeners))
}

/// The NDJSON log on stdout (storm-controlled), /metrics, and Kubernetes Events when an API
/// server is configured.
fn agent_sinks<'a>(
    opts: &AgentOptions,
    out: impl Write + 'a,
    metrics: &SharedMetrics,
    names: Option<&Rc<RefCell<PodContext>>>,
) -> Sinks<'a> {
    let sinks = Sinks::default()
        .with(
            PrometheusSink::new(metrics.clone())
                .with_options(opts.metrics)
                .with_inventory(names.cloned()),
        )
        .with(
            StormControlledLog::new(out, opts.rate_limit)
                .with_raw_events(opts.raw_events)
                .on_node(observing_node(opts.node_name.as_deref())),
        );
    match names {
        Some(n) => sinks.with(
            KubeEventsSink::new(n.clone(), opts.node_name.clone())
                .with_options(opts.events)
                .with_metrics(metrics.clone()),
        ),
        None => sinks,
    }
}
