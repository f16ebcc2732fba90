//! The `trace` command, as a library function: scope → load → attach → read → enrich → print.

use std::{collections::BTreeMap, io::Write, net::IpAddr, path::PathBuf, time::Duration};

use netprobe_common::{AF_INET, AF_INET6, Filter, IPPROTO_UDP};

use crate::{
    collectors::{
        EventReader,
        nftrace::{TraceMsg, TraceSocket},
    },
    enrich::{
        Enricher,
        listeners::{listeners_in, udp_listeners_in},
        names::{PodContext, pod_context},
        rules::{PathCollector, attribute, attribute_legacy, fetch_ruleset, legacy, path_tuple},
    },
    error::{Error, Result},
    netlink,
    netns::{self, NetnsRef},
    outputs::{Format, Printer, Summary},
    probes::{Probes, btf::KernelBtf, nft_trace::TraceTable, require_root},
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

/// Prints verdicts and counts them; false when the output is gone.
fn print_verdicts<W: Write>(
    verdicts: Vec<crate::verdict::Verdict>,
    printer: &mut Printer<W>,
    attempts: &std::cell::Cell<u64>,
    failed: &std::cell::Cell<u64>,
    pods: Option<&PodContext>,
) -> bool {
    for mut v in verdicts {
        if let Some(p) = pods {
            p.annotate_verdict(&mut v);
            if !p.wanted(&v) {
                continue;
            }
        }
        if matches!(
            v.outcome,
            crate::verdict::Outcome::TimedOut | crate::verdict::Outcome::Unanswered
        ) && v.route.is_none()
            && let Ok(Some(r)) = crate::enrich::route::route_hint(v.server.addr)
        {
            // The trace runs in the node's namespace: this is the node's own route.
            v.explanation
                .push_str(&format!(" This node routes {} {}.", r.dst, r.describe()));
            v.route = Some(r);
        }
        attempts.set(attempts.get() + 1);
        if v.outcome.is_failure() {
            failed.set(failed.get() + 1);
        }
        if printer.verdict(&v).is_err() {
            return false;
        }
    }
    true
}

fn filter_for(opts: &TraceOptions) -> Filter {
    let mut f = Filter {
        port: opts.port,
        netns_enabled: 1,
        proto: if opts.udp { IPPROTO_UDP } else { 0 },
        ..Default::default()
    };
    match opts.addr {
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

/// Runs a trace until `duration`, Ctrl-C or SIGTERM; prints events to `out` as they arrive and
/// a summary at the end.
pub async fn run(opts: TraceOptions, out: impl Write) -> Result<Summary> {
    require_root()?;
    let kbtf = KernelBtf::load()?;
    let btf = kbtf.aya();

    let current = NetnsRef::current()?;
    let mut pods = pod_context(
        opts.pod.is_some() || opts.from_pod.is_some(),
        opts.node_name.as_deref(),
        opts.from_pod.as_deref(),
        &current,
    )
    .await?;
    let (scope, attach_in): (Vec<NetnsRef>, Vec<NetnsRef>) = if let Some(name) = &opts.pod {
        let p = pods.as_ref().expect("a pod trace has an inventory");
        let found = p.inventory.find_pod(opts.namespace.as_deref(), name);
        let pod = match found.as_slice() {
            [] => {
                return Err(Error::UnknownPod {
                    namespace: opts.namespace.clone(),
                    name: name.clone(),
                });
            }
            [one] => *one,
            many => {
                return Err(Error::AmbiguousPod {
                    name: name.clone(),
                    namespaces: many
                        .iter()
                        .map(|p| p.namespace.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        };
        if pod.host_network {
            (vec![current.clone()], vec![current])
        } else {
            let ino = p.inventory.netns_of(pod).ok_or_else(|| Error::PodNotHere {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
            })?;
            let pod_ns = netns::veth_peers()?
                .into_iter()
                .find(|n| n.inode == ino)
                .ok_or_else(|| Error::PodNotHere {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                })?;
            (vec![current.clone(), pod_ns.clone()], vec![current, pod_ns])
        }
    } else if opts.netns.is_empty() {
        let mut scope = vec![current.clone()];
        scope.extend(netns::veth_peers()?);
        (scope, vec![current])
    } else {
        let targets = opts
            .netns
            .iter()
            .map(|n| NetnsRef::resolve(n))
            .collect::<Result<Vec<_>>>()?;
        (targets.clone(), targets)
    };

    let enricher = Enricher::new(&kbtf)?;
    let mut probes = Probes::load_with_ring(&kbtf, filter_for(&opts), opts.ring_bytes)?;
    probes.set_netns_filter(&scope.iter().map(|n| n.inode).collect::<Vec<_>>())?;
    for ns in &scope {
        enricher.add_netns(ns.inode, &ns.name);
        for link in ns.run(netlink::links)?? {
            enricher.add_interface(ns.inode, link.index, &link.name);
        }
    }
    for ns in &attach_in {
        // Pre-6.6 kernels: filters of a netprobe killed earlier would run on beside ours.
        crate::probes::leftovers::remove_orphans_in(ns)?;
    }
    for (i, ns) in attach_in.iter().enumerate() {
        // lo has ifindex 1 in every namespace: with a pod's namespace attached too, the node's lo
        // is left out so that tc events on lo name their namespace unambiguously.
        let skip_lo = opts.pod.is_some() && attach_in.len() > 1 && i == 0;
        for a in probes.attach_tc(ns, |l| {
            (l.up || l.name == "lo") && !(skip_lo && l.name == "lo")
        })? {
            enricher.add_tc(&a);
        }
    }
    let proto = if opts.udp { "udp" } else { "tcp" };
    // Netfilter attribution: listen first, then mark the flow, so no message is missed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (nf_tx, mut nf_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, TraceMsg)>();
    let mut nf_lost = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tables = Vec::new();
    let mut rulesets = Vec::new();
    let mut legacy_before = Vec::new();
    let mut collectors = Vec::new();
    let mut readers = Vec::new();
    if opts.rule_trace {
        for (i, ns) in attach_in.iter().enumerate() {
            let sock = ns.run(TraceSocket::open)?.map_err(|e| {
                Error::io(
                    format!("opening the nftables trace socket in {}", ns.name),
                    e,
                )
            })?;
            let (tx, stop, lost) = (nf_tx.clone(), stop.clone(), nf_lost.clone());
            readers.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if sock
                        .recv(&mut buf, |m| {
                            let _ = tx.send((i, m));
                        })
                        .is_err()
                    {
                        // ENOBUFS: the kernel dropped trace messages for this socket.
                        lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }));
            tables.push(TraceTable::install(ns, proto, opts.port, opts.addr)?);
            let rs = ns.run(fetch_ruleset)?;
            legacy_before.push(if rs.legacy_rules > 0 {
                Some(ns.run(legacy::snapshot)?)
            } else {
                None
            });
            rulesets.push(rs);
            collectors.push(PathCollector::default());
        }
    }
    drop(nf_tx);
    // The tracepoints last: an attempt whose connect() (SYN_SENT) they see began after the tc
    // programs and the rule trace were in place, so nothing of it was missed. Attempts already
    // under way are not judged (see verdict::began_before_the_trace).
    probes.attach_tracepoints(btf)?;
    let armed_at = enricher.now_ns();
    let mut listeners = std::collections::HashMap::new();
    for ns in &scope {
        // A namespace that cannot be read just has no listener evidence.
        let found = if opts.udp {
            udp_listeners_in(ns)
        } else {
            listeners_in(ns)
        };
        if let Ok(l) = found {
            listeners.insert(ns.name.clone(), l);
        }
    }
    let mut engine = Engine::new(Context {
        port: opts.port,
        udp: opts.udp,
        listeners,
    });
    engine.armed_at(armed_at);
    let engine = std::cell::RefCell::new(engine);
    let attempts = std::cell::Cell::new(0u64);
    let failed = std::cell::Cell::new(0u64);
    let started = std::time::Instant::now();
    let now = move || started.elapsed().as_nanos() as u64;
    let mut reader = EventReader::new(probes.take_events()?)?;
    let interfaces: Vec<String> = probes
        .attachments
        .iter()
        .map(|a| a.ifname.clone())
        .collect();

    if let Some(path) = &opts.ready_file {
        std::fs::write(path, b"ready\n")
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    }
    let names: Vec<&str> = scope.iter().map(|n| n.name.as_str()).collect();
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

    let mut printer = Printer::new(out, opts.format);
    let events = std::cell::Cell::new(0u64);
    // Set when stdout is closed (e.g. piped into `head`): the trace then stops quietly.
    let write_failed = std::cell::Cell::new(false);
    let legacy_before = std::cell::RefCell::new(legacy_before);
    let rulesets = std::cell::RefCell::new(rulesets);
    // One place for every event, whatever its source: printed (--events) or judged.
    let record = match &opts.record {
        Some(p) => Some(std::cell::RefCell::new(std::io::BufWriter::new(
            std::fs::File::create(p)
                .map_err(|e| Error::io(format!("creating {}", p.display()), e))?,
        ))),
        None => None,
    };
    let pods = std::cell::RefCell::new(pods.take());
    let deliver = |mut e: crate::events::Event, printer: &mut Printer<_>| {
        events.set(events.get() + 1);
        if let Some(p) = pods.borrow().as_ref() {
            p.annotate_event(&mut e);
        }
        if let Some(r) = &record {
            let mut r = r.borrow_mut();
            let _ = serde_json::to_writer(&mut *r, &e);
            let _ = r.write_all(b"\n");
        }
        let ok = if opts.events {
            printer.event(&e).is_ok()
        } else {
            let verdicts = engine.borrow_mut().push(e, now());
            print_verdicts(
                verdicts,
                printer,
                &attempts,
                &failed,
                pods.borrow().as_ref(),
            )
        };
        if !ok {
            write_failed.set(true);
        }
    };
    let emit = |rec: crate::events::raw::Record, printer: &mut Printer<_>| {
        let raw = rec.ev;
        let Some(e) = enricher.enrich_record(&rec) else {
            return;
        };
        let legacy_drop = e
            .drop
            .as_ref()
            .is_some_and(|d| d.location.starts_with("nf_hook_slow"));
        let (dst, dport, src, sport, time_ns) = (e.dst, e.dport, e.src, e.sport, e.time_ns);
        let (netns, interface) = (e.netns.clone(), e.interface.clone());
        deliver(e, printer);
        // A drop inside x_tables (iptables-legacy): attribute it by counter difference.
        if legacy_drop
            && let Some(i) = attach_in.iter().position(|n| n.inode == raw.netns as u64)
            && let Some(Some(before)) = legacy_before.borrow_mut().get_mut(i)
            && let Ok(after) = attach_in[i].run(legacy::snapshot)
        {
            let fired = legacy::fired(before, &after);
            *before = after;
            if let Some(nf) = attribute_legacy(&fired, &rulesets.borrow()[i], Some((dst, dport))) {
                let ev = crate::events::netfilter(
                    time_ns,
                    proto,
                    netns,
                    interface,
                    Some((src, sport, dst, dport)),
                    nf,
                );
                deliver(ev, printer);
            }
        }
    };
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    let mut ticks = 0u64;
    // A live progress line, only for a person watching a terminal.
    let progress = opts.format == Format::Text
        && !opts.events
        && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("installing SIGTERM handler", e))?;
    // A traced namespace that is deleted (pod gone, `ip netns del`) ends the trace with an error.
    let mut vanished: Option<&NetnsRef> = None;
    loop {
        tokio::select! {
            r = reader.next_batch(|raw| emit(raw, &mut printer)) => r?,
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => {
                ticks += 1;
                if ticks.is_multiple_of(5) {
                    vanished = attach_in.iter().find(|ns| !ns.exists());
                    if vanished.is_some() {
                        break;
                    }
                }
                if progress && ticks.is_multiple_of(10) {
                    eprint!("\r\x1b[Kwaiting for {waiting_for} to port {} … {}s, {} attempts", opts.port, ticks / 10, attempts.get());
                }
                if ticks.is_multiple_of(10) && opts.netns.is_empty() && opts.pod.is_none()
                    && let Some(p) = pods.borrow_mut().as_mut()
                {
                    // Pods come and go (a recreated pod has a new namespace and IP): follow them.
                    let fresh = p.rescan(&scope[0]);
                    for ns in &fresh {
                        enricher.add_netns(ns.inode, &ns.name);
                    }
                    if !fresh.is_empty() {
                        probes.set_netns_filter(&fresh.iter().map(|n| n.inode).collect::<Vec<_>>())?;
                    }
                } else if ticks.is_multiple_of(10) && let Some(p) = pods.borrow_mut().as_mut() {
                    p.refresh();
                }
                let verdicts = engine.borrow_mut().poll(now());
                if !print_verdicts(verdicts, &mut printer, &attempts, &failed, pods.borrow().as_ref()) {
                    write_failed.set(true);
                }
            }
            Some((i, m)) = nf_rx.recv() => {
                if let Some(path) = collectors[i].push(m) {
                    let ns = &attach_in[i];
                    let mut nf = attribute(&path, &rulesets.borrow()[i]);
                    if nf.as_ref().is_some_and(|n| n.rule.is_none() && n.handle.is_some()) {
                        // The ruleset changed since we read it: read it again once.
                        rulesets.borrow_mut()[i] = ns.run(fetch_ruleset)?;
                        nf = attribute(&path, &rulesets.borrow()[i]);
                    }
                    if let Some(nf) = nf {
                        let last = path.last().expect("non-empty path");
                        let iface = last.iif.or(last.oif).map(|ix| enricher.interface(ns.inode, ix));
                        let e = crate::events::netfilter(enricher.now_ns(), proto, Some(enricher.netns(ns.inode)), iface, path_tuple(&path), nf);
                        deliver(e, &mut printer);
                    }
                }
            }
        }
        if write_failed.get() || opts.count.is_some_and(|n| attempts.get() >= n) {
            break;
        }
    }
    reader.drain(|raw| emit(raw, &mut printer));
    if !opts.events && opts.count.is_none_or(|n| attempts.get() < n) {
        let verdicts = engine.borrow_mut().finish();
        if !print_verdicts(
            verdicts,
            &mut printer,
            &attempts,
            &failed,
            pods.borrow().as_ref(),
        ) {
            write_failed.set(true);
        }
    }
    if let Some(r) = &record {
        let _ = r.borrow_mut().flush();
    }
    let counters = probes.counters()?;
    probes.detach_tc();
    for mut t in tables {
        t.remove();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        let _ = r.join();
    }
    if let Some(ns) = vanished {
        return Err(Error::NetnsVanished {
            name: ns.name.clone(),
            path: ns.path.clone(),
        });
    }
    let mut warnings = Vec::new();
    for (ns, rs) in attach_in.iter().zip(rulesets.borrow().iter()) {
        if rs.mixed_backends() {
            warnings.push(format!(
                "netns {}: {} iptables-legacy rules next to nf_tables rules; two firewalls run side by side (a known breakage after a CNI migration), and drops in the legacy one are invisible to the nftables trace",
                ns.name, rs.legacy_rules
            ));
        }
    }
    let nf_lost = std::mem::take(
        std::sync::Arc::get_mut(&mut nf_lost)
            .map(|a| a.get_mut())
            .unwrap_or(&mut 0),
    );
    let summary = Summary {
        schema: crate::events::SCHEMA,
        kind: "summary",
        events: events.get(),
        lost: counters.lost,
        netfilter_trace_overruns: nf_lost,
        malformed: reader.malformed,
        warnings,
        drops_matched: counters
            .drops_matched
            .iter()
            .map(|(r, n)| (enricher.drop_reason_name(*r), *n))
            .collect::<BTreeMap<_, _>>(),
        interfaces,
        attempts: attempts.get(),
        failed: failed.get(),
    };
    if !write_failed.get() {
        let _ = printer.summary(&summary);
    }
    if summary.lost > 0 {
        eprintln!(
            "netprobe: WARNING: {} events lost (ring buffer full)",
            summary.lost
        );
    }
    Ok(summary)
}
