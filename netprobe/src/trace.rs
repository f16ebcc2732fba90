//! The `trace` command as a configuration of the session: resolve the scope (a pod, given
//! namespaces, or this node and its pods), load and attach the probes, then run the session with
//! the ring buffer and the nftables trace as sources, names and rule counters as stages, the
//! verdict engine as judge, and the printer (plus `--record`) as sinks, until the deadline,
//! `--count`, a signal, or a traced namespace vanishing.

use std::{cell::RefCell, io::Write, net::IpAddr, path::PathBuf, rc::Rc, time::Duration};

use netprobe_common::{AF_INET, AF_INET6, Filter, IPPROTO_UDP};

use crate::{
    enrich::{
        Enricher,
        listeners::{listeners_in, udp_listeners_in},
        names::{PodContext, pod_context},
        stages,
    },
    error::{Error, Result},
    model::Protocol,
    netlink,
    netns::{self, NetnsRef},
    probes::{Probes, btf::KernelBtf, require_root},
    session::{Ended, Housekeeping, Judge, Route, Session, Signals, Source, Stage, Stats, Summary},
    sinks::{
        Format, Show, Sinks,
        ndjson::{NdjsonSink, observing_node},
        text::TextSink,
    },
    sources::{
        nftrace::RuleTrace,
        ring::{EventReader, RingSource},
        xtables::{Counted, RuleCounters},
    },
    verdict::{Context, Engine},
};

pub struct TraceOptions {
    /// Size of the kernel → netprobe ring buffer in bytes (power of two, ≥ 4096).
    pub ring_bytes: u32,
    pub port: u16,
    /// Follow UDP exchanges (DNS lookups when the port is 53) instead of TCP connections.
    pub udp: bool,
    pub addr: Option<IpAddr>,
    /// Restrict to these namespaces (names in /run/netns or paths); empty = this namespace and
    /// the pod namespaces its veths lead to.
    pub netns: Vec<String>,
    pub duration: Option<Duration>,
    pub format: Format,
    /// Install a temporary nftables trace table to name the netfilter rule behind drops.
    pub rule_trace: bool,
    /// Print every event instead of one verdict per connection attempt.
    pub events: bool,
    /// Stop after this many verdicts.
    pub count: Option<u64>,
    /// Also write every event to this file (NDJSON), e.g. to replay or attach to a bug report.
    pub record: Option<PathBuf>,
    /// Created once every probe is attached (lets scripts and tests start traffic then).
    pub ready_file: Option<PathBuf>,
    /// Trace connections to or from this pod (resolved through the Kubernetes API).
    pub pod: Option<String>,
    /// Namespace of `pod`.
    pub namespace: Option<String>,
    /// This node's name (NODE_NAME): the inventory then holds only its pods.
    pub node_name: Option<String>,
    /// Only attempts made by this client pod (`name` or `namespace/name`).
    pub from_pod: Option<String>,
}

/// The namespaces a trace watches (`all`: the netns filter) and those it attaches tc programs
/// and the rule trace in (`attach_in`).
struct Scope {
    all: Vec<NetnsRef>,
    attach_in: Vec<NetnsRef>,
}

impl Scope {
    fn resolve(opts: &TraceOptions, names: Option<&PodContext>, current: NetnsRef) -> Result<Self> {
        if let Some(name) = &opts.pod {
            let names = names.expect("a pod trace has an inventory");
            return Self::of_pod(names, opts.namespace.as_deref(), name, current);
        }
        if opts.netns.is_empty() {
            let mut all = vec![current.clone()];
            all.extend(netns::veth_peers()?);
            return Ok(Self {
                all,
                attach_in: vec![current],
            });
        }
        let targets = opts
            .netns
            .iter()
            .map(|n| NetnsRef::resolve(n))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            all: targets.clone(),
            attach_in: targets,
        })
    }

    /// The node and the pod's own namespace (only the node for a hostNetwork pod).
    fn of_pod(
        names: &PodContext,
        namespace: Option<&str>,
        name: &str,
        current: NetnsRef,
    ) -> Result<Self> {
        let found = names.inventory.find_pod(namespace, name);
        let pod = match found.as_slice() {
            [] => {
                return Err(Error::UnknownPod {
                    namespace: namespace.map(str::to_string),
                    name: name.to_string(),
                });
            }
            [one] => *one,
            many => {
                return Err(Error::AmbiguousPod {
                    name: name.to_string(),
                    namespaces: many
                        .iter()
                        .map(|p| p.namespace.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        };
        if pod.host_network {
            return Ok(Self {
                all: vec![current.clone()],
                attach_in: vec![current],
            });
        }
        let not_here = || Error::PodNotHere {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        };
        let ino = names.inventory.netns_of(pod).ok_or_else(not_here)?;
        let pod_ns = netns::veth_peers()?
            .into_iter()
            .find(|n| n.inode == ino)
            .ok_or_else(not_here)?;
        Ok(Self {
            all: vec![current.clone(), pod_ns.clone()],
            attach_in: vec![current, pod_ns],
        })
    }
}

/// The in-kernel filter of a trace of `port` (UDP or TCP), from or to `addr` if given, in the
/// namespaces of the trace's scope.
pub fn kernel_filter(port: u16, udp: bool, addr: Option<IpAddr>) -> Filter {
    let mut f = Filter {
        port,
        netns_enabled: 1,
        proto: if udp { IPPROTO_UDP } else { 0 },
        ..Default::default()
    };
    match addr {
        Some(IpAddr::V4(a)) => {
            f.addr_family = AF_INET;
            f.addr[..4].copy_from_slice(&a.octets());
        }
        Some(IpAddr::V6(a)) => {
            f.addr_family = AF_INET6;
            f.addr = a.octets();
        }
        None => {}
    }
    f
}

/// Names the scope's namespaces and interfaces, removes orphaned filters and attaches the tc
/// programs; returns the attached interfaces' names.
fn attach_tc(
    opts: &TraceOptions,
    scope: &Scope,
    probes: &mut Probes,
    enricher: &Enricher,
    signals: &Signals,
) -> Result<Vec<String>> {
    probes.set_netns_filter(&scope.all.iter().map(|n| n.inode).collect::<Vec<_>>())?;
    for ns in &scope.all {
        enricher.add_netns(ns.inode, &ns.name);
        for link in ns.run(netlink::links)?? {
            enricher.add_interface(ns.inode, link.index, &link.name);
        }
    }
    for ns in &scope.attach_in {
        // Pre-6.6 kernels: filters of a netprobe killed earlier would run on beside ours.
        crate::probes::leftovers::remove_orphans_in(ns)?;
    }
    for (i, ns) in scope.attach_in.iter().enumerate() {
        signals.check()?;
        // lo has ifindex 1 in every namespace: with a pod's namespace attached too, the node's lo
        // is left out so that tc events on lo name their namespace unambiguously.
        let skip_lo = opts.pod.is_some() && scope.attach_in.len() > 1 && i == 0;
        for a in probes.attach_tc(ns, |l| {
            (l.up || l.name == "lo") && !(skip_lo && l.name == "lo")
        })? {
            enricher.add_tc(&a);
        }
    }
    Ok(probes
        .attachments
        .iter()
        .map(|a| a.ifname.clone())
        .collect())
}

/// Who listens in each namespace of the scope, read once at the start (for refusals).
fn listeners(
    scope: &Scope,
    udp: bool,
) -> std::collections::HashMap<String, Vec<crate::enrich::listeners::Listener>> {
    let mut found = std::collections::HashMap::new();
    for ns in &scope.all {
        // A namespace that cannot be read just has no listener evidence.
        let l = if udp {
            udp_listeners_in(ns)
        } else {
            listeners_in(ns)
        };
        if let Ok(l) = l {
            found.insert(ns.name.clone(), l);
        }
    }
    found
}

/// The printer on stdout and, with `--record`, every event to a file.
fn sinks<'a>(opts: &TraceOptions, out: impl Write + 'a) -> Result<Sinks<'a>> {
    let show = if opts.events {
        Show::Events
    } else {
        Show::Verdicts
    };
    let node = observing_node(opts.node_name.as_deref());
    let mut sinks = match opts.format {
        Format::Text => Sinks::default().with(TextSink::new(out, show)),
        Format::Json => Sinks::default().with(NdjsonSink::output(out, show).on_node(&node)),
    };
    if let Some(p) = &opts.record {
        let file = std::fs::File::create(p)
            .map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
        sinks = sinks.with(NdjsonSink::recording(std::io::BufWriter::new(file)).on_node(node));
    }
    Ok(sinks)
}

/// What a trace does on each tick (100 ms): end when a traced namespace vanished, follow pods
/// that come and go, keep a person at a terminal informed.
struct TraceHousekeeping {
    ticks: u64,
    attach_in: Vec<NetnsRef>,
    /// Follow new pod namespaces (a whole-node trace): (the node's namespace, the probes).
    follow: Option<(NetnsRef, Rc<RefCell<Probes>>)>,
    names: Option<Rc<RefCell<PodContext>>>,
    enricher: Rc<Enricher>,
    /// `waiting for connections to port 9500`, on a terminal only.
    progress: Option<String>,
}

impl Housekeeping for TraceHousekeeping {
    fn tick(&mut self, stats: &Stats) -> Result<Option<Error>> {
        self.ticks += 1;
        if self.ticks.is_multiple_of(5)
            && let Some(ns) = self.attach_in.iter().find(|ns| !ns.exists())
        {
            // A traced namespace was deleted (pod gone, `ip netns del`): the trace ends with an error.
            return Ok(Some(Error::NetnsVanished {
                name: ns.name.clone(),
                path: ns.path.clone(),
            }));
        }
        if let Some(p) = &self.progress
            && self.ticks.is_multiple_of(10)
        {
            eprint!(
                "\r\x1b[K{p} … {}s, {} attempts",
                self.ticks / 10,
                stats.attempts
            );
        }
        if self.ticks.is_multiple_of(10)
            && let Some(names) = &self.names
        {
            let mut names = names.borrow_mut();
            match &mut self.follow {
                // Pods come and go (a recreated pod has a new namespace and IP): follow them.
                Some((node, probes)) => {
                    let fresh = names.rescan(node);
                    for ns in &fresh {
                        self.enricher.add_netns(ns.inode, &ns.name);
                    }
                    if !fresh.is_empty() {
                        probes
                            .borrow_mut()
                            .set_netns_filter(&fresh.iter().map(|n| n.inode).collect::<Vec<_>>())?;
                    }
                }
                None => names.refresh(),
            }
        }
        Ok(None)
    }
}

/// What a trace installed, ready to run: everything in it is removed when it is dropped (tc
/// filters with the probes, the rule-trace tables with their source).
struct Installed {
    names: Option<Rc<RefCell<PodContext>>>,
    scope: Scope,
    enricher: Rc<Enricher>,
    probes: Probes,
    interfaces: Vec<String>,
    sources: Vec<Box<dyn Source>>,
    stages: Vec<Box<dyn Stage>>,
    engine: Engine,
}

/// The kernel BTF (its file, ~5 MiB, and an index) is only needed to load and attach: a trace
/// gives it back (four may run beside the agent, in its container).
fn give_back(kbtf: KernelBtf) {
    drop(kbtf);
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe { libc::malloc_trim(0) };
}

/// Resolves the scope, loads and attaches the probes and installs the rule trace. A signal
/// stops it at the next step (`Interrupted`), what was installed by then going with the drops.
async fn install(opts: &TraceOptions, signals: &mut Signals) -> Result<Installed> {
    let kbtf = signals.step(KernelBtf::load())?;
    let current = NetnsRef::current()?;
    // The one step that waits on someone else (up to 15 s for an API server that does not
    // answer): a signal ends the wait.
    let names = signals
        .interruptible(pod_context(
            opts.pod.is_some() || opts.from_pod.is_some(),
            opts.node_name.as_deref(),
            opts.from_pod.as_deref(),
            &current,
        ))
        .await?
        .map(|p| Rc::new(RefCell::new(p)));
    let scope = signals.step(Scope::resolve(
        opts,
        names.as_ref().map(|n| n.borrow()).as_deref(),
        current,
    ))?;
    let enricher = Rc::new(Enricher::new(&kbtf)?);
    let mut probes = signals.step(Probes::load_with_ring(
        &kbtf,
        kernel_filter(opts.port, opts.udp, opts.addr),
        opts.ring_bytes,
    ))?;
    let interfaces = signals.step(attach_tc(opts, &scope, &mut probes, &enricher, signals))?;
    let mut sources: Vec<Box<dyn Source>> = Vec::new();
    let mut stages: Vec<Box<dyn Stage>> = Vec::new();
    if let Some(n) = &names {
        stages.push(Box::new(stages::Names(n.clone())));
    }
    if opts.rule_trace {
        let proto = if opts.udp {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        let (rt, counters) = signals.step(rule_trace(opts, &scope, proto, enricher.clone()))?;
        stages.push(Box::new(counters));
        stages.push(Box::new(rt.stage()));
        sources.push(Box::new(rt));
    }
    // The tracepoints last: an attempt whose connect() (SYN_SENT) they see began after the tc
    // programs and the rule trace were in place, so nothing of it was missed. Attempts already
    // under way are not judged (see verdict::began_before_the_trace).
    for (program, why) in signals.step(probes.attach_tracepoints(kbtf.aya()))? {
        eprintln!("netprobe: WARNING: optional probe {program} refused, running without it: {why}");
    }
    give_back(kbtf);
    let mut engine = Engine::new(Context {
        port: opts.port,
        udp: opts.udp,
        listeners: listeners(&scope, opts.udp),
    })
    .follow_established();
    engine.armed_at(enricher.now_ns());
    let ring = RingSource::new(EventReader::new(probes.take_events()?)?, enricher.clone());
    sources.insert(0, Box::new(ring));
    Ok(Installed {
        names,
        scope,
        enricher,
        probes,
        interfaces,
        sources,
        stages,
        engine,
    })
}

/// Runs a trace until `duration`, Ctrl-C or SIGTERM; prints events to `out` as they arrive and
/// a summary at the end. A signal before everything is in place: `Interrupted`, nothing left.
pub async fn run(opts: TraceOptions, out: impl Write) -> Result<Summary> {
    require_root()?;
    let mut signals = Signals::install()?;
    let installed = install(&opts, &mut signals).await?;
    let (names, scope, enricher) = (installed.names, installed.scope, installed.enricher);
    if let Some(path) = &opts.ready_file {
        std::fs::write(path, b"ready\n")
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    }
    let waiting = announce(&opts, &scope, &installed.interfaces);
    let judge = (!opts.events).then(|| {
        let all = scope.all.clone();
        Judge::new(installed.engine)
            .with_names(names.clone())
            .with_route_hints()
            .with_namespaces(Box::new(move || all.clone()))
    });
    let probes = Rc::new(RefCell::new(installed.probes));
    let follow = (opts.netns.is_empty() && opts.pod.is_none())
        .then(|| (scope.all[0].clone(), probes.clone()));
    let progress = (opts.format == Format::Text
        && !opts.events
        && std::io::IsTerminal::is_terminal(&std::io::stderr()))
    .then_some(waiting);
    let mut session = Session {
        sources: installed.sources,
        route: |_| Route::ALL,
        stages: installed.stages,
        judge,
        sinks: sinks(&opts, out)?,
        housekeeping: Box::new(TraceHousekeeping {
            ticks: 0,
            attach_in: scope.attach_in.clone(),
            follow,
            names,
            enricher: enricher.clone(),
            progress,
        }),
        tick: Duration::from_millis(100),
        deadline: opts.duration,
        count: opts.count,
        signals,
        stats: Stats::default(),
    };
    let ended = session.run().await?;
    let mut summary = Summary::new();
    summary.interfaces = installed.interfaces;
    session.summarize(&mut summary);
    // Drops the sources (the rule-trace table goes) and the housekeeping's hold on the probes.
    let mut sinks = session.into_sinks();
    finish(
        ended,
        &mut sinks,
        summary,
        &mut probes.borrow_mut(),
        &enricher,
    )
}

/// The kernel's counts into the summary, the tc programs detached, the summary written
/// (unless the output is gone or the scope ended the trace with an error).
fn finish(
    ended: Ended,
    sinks: &mut Sinks<'_>,
    mut summary: Summary,
    probes: &mut Probes,
    enricher: &Enricher,
) -> Result<Summary> {
    let counters = probes.counters()?;
    probes.detach_tc();
    summary.lost = counters.lost;
    summary.drops_matched = counters
        .drops_matched
        .iter()
        .map(|(r, n)| (enricher.drop_reason_name(*r), *n))
        .collect();
    match ended {
        Ended::Scope(e) => return Err(e),
        Ended::OutputGone(_) => {}
        _ => {
            let _ = crate::sinks::Sink::finish(sinks, &summary);
        }
    }
    if summary.lost > 0 {
        eprintln!(
            "netprobe: WARNING: {} events lost (ring buffer full)",
            summary.lost
        );
    }
    Ok(summary)
}

/// The nftables trace of the traced port in the scope's namespaces, and the rule counters for
/// what it cannot trace: iptables-legacy rules, and nf_tables drops of data segments of
/// established connections (the trace marks only SYN, FIN, RST and ICMP errors: no per-packet
/// cost) until the flow's retransmit is traced.
fn rule_trace(
    opts: &TraceOptions,
    scope: &Scope,
    proto: Protocol,
    enricher: Rc<Enricher>,
) -> Result<(RuleTrace, RuleCounters)> {
    let rt = RuleTrace::start(&scope.attach_in, proto, opts.port, opts.addr, enricher)?;
    let counters = RuleCounters::new(Counted::TraceGaps);
    for ns in &scope.attach_in {
        counters.scope().add_netns(ns)?;
    }
    Ok((rt, counters))
}

/// Says on stderr what the trace waits for; returns the progress line's prefix.
fn announce(opts: &TraceOptions, scope: &Scope, interfaces: &[String]) -> String {
    let names: Vec<&str> = scope.all.iter().map(|n| n.name.as_str()).collect();
    let waiting_for = match (opts.udp, opts.port) {
        (true, 53) => "DNS lookups",
        (true, _) => "UDP datagrams",
        (false, _) => "connections",
    };
    eprintln!(
        "netprobe: waiting for {waiting_for} to port {}{} in netns {} ({} interfaces: {}); Ctrl-C to stop",
        opts.port,
        opts.addr.map(|a| format!(" addr {a}")).unwrap_or_default(),
        names.join(", "),
        interfaces.len(),
        interfaces.join(" "),
    );
    format!("waiting for {waiting_for} to port {}", opts.port)
}
