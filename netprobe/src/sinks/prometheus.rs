//! Prometheus: the agent's `/metrics`. The sink counts what the session delivers (drops,
//! resets, errors, retransmits, DNS lookups, failed connections by workload — [`failed`]); the
//! agent's housekeeping sets the gauges (probes, interfaces, namespaces, kernel counters). Label
//! values come from the kernel's names and the inventory.

pub mod exposition;
pub mod failed;
mod latency;
pub mod pods;
mod process;

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashSet},
    io,
    rc::Rc,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use exposition::{Family, Labels, Samples};
pub use failed::MetricsOptions;

use super::Sink;
use crate::{
    enrich::names::PodContext,
    events::{Event, Kind},
    model::{Named, drop_reason},
    verdict::{Outcome, Verdict},
};

/// What the agent holds per pod namespace and per interface, and what it let go of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScopeStats {
    /// Pod namespaces present but not watched: the filter map was full.
    pub unwatched: usize,
    /// Pod namespaces the full map refused (each once).
    pub refused_total: u64,
    /// Namespaces of deleted pods taken out of the filter map.
    pub released_total: u64,
    /// Entries of the filter map (`--max-namespaces`).
    pub capacity: u32,
    /// tc links held now (tcx: one fd each).
    pub tc_links: usize,
    /// tc links of deleted interfaces released.
    pub tc_links_released_total: u64,
}

/// What `/metrics` reports. Label values come from the kernel's names and the inventory.
#[derive(Default)]
pub struct Metrics {
    pub ready: bool,
    /// (reason, namespace, pod, rule owner) → drops
    pub drops: BTreeMap<(String, String, String, String), u64>,
    pub resets: u64,
    pub app_errors: BTreeMap<String, u64>,
    /// By the node of the destination pod (after DNAT; "" when unknown): a node-to-node view.
    pub syn_retransmits: BTreeMap<String, u64>,
    pub lost: u64,
    pub emitted: u64,
    /// Data retransmits of connections still making progress (counted in the kernel, no event).
    pub retransmits_counted: u64,
    /// Drops in scope counted in the kernel (per-CPU counters), by reason: every drop, also
    /// those whose event was lost or never written.
    pub kernel_drops: BTreeMap<String, u64>,
    pub interfaces: usize,
    pub namespaces: usize,
    /// Longest kernel-to-agent delay of an event in the last second.
    pub delay_max_s: f64,
    /// Runs and in-kernel run time of each program (while run-time statistics are on).
    pub programs: Vec<crate::probes::ProgramStats>,
    /// Probes the kernel refused: (program, reason). The agent runs without them.
    pub degraded: Vec<(String, String)>,
    /// (namespace, pod, reason) of the client → failed DNS lookups.
    pub dns_failures: BTreeMap<(String, String, String), u64>,
    /// rcode of the answer (`none`: no answer) → DNS lookups judged.
    pub dns_queries: BTreeMap<String, u64>,
    /// Failed connection attempts and DNS lookups by outcome, rule owner, policy, Service and
    /// workloads (bounded, expiring).
    pub failed: failed::FailedConnections,
    /// Kubernetes Events by result: created, updated, held (rate limit), failed, evicted and
    /// released (keys of the rate limiter).
    pub kube_events: BTreeMap<&'static str, u64>,
    /// Failures whose Event write waited for the agent's budget, by cause: `rate` (token
    /// bucket), `in_flight` (requests open at once).
    pub kube_events_suppressed: BTreeMap<&'static str, u64>,
    /// Event writes open now.
    pub kube_events_in_flight: usize,
    /// TCP connect() attempts and their failures in the watched namespaces (their TCP MIB).
    pub tcp_attempts: crate::model::stats::TcpMib,
    /// What the verdict engines let go of to stay bounded.
    pub engine: crate::model::stats::EngineStats,
    /// Flows armed for an nftables trace (rule attribution without a trace running).
    pub arming: crate::model::stats::ArmStats,
    /// Rule counter reads after netfilter drops.
    pub rule_counters: crate::model::stats::CounterStats,
    /// Per pod namespace and interface: watched, refused, released.
    pub scope: ScopeStats,
    /// Keys the Kubernetes Event rate limiter remembers now.
    pub kube_event_keys: usize,
    /// Pods named by `drops`/`dns_failures` that left the inventory, waiting out the grace.
    gone_pods: pods::GonePods,
    /// DNS lookup and verdict latency histograms.
    latencies: latency::Latencies,
}

/// One label's samples, from a map keyed by its value.
fn by_one<'a, K: AsRef<str>>(
    name: &'static str,
    map: &'a BTreeMap<K, u64>,
) -> impl Iterator<Item = (Labels, u64)> + 'a {
    map.iter()
        .map(move |(v, n)| (Labels::one(name, v.as_ref().to_string()), *n))
}

impl Metrics {
    /// `/metrics`: the Prometheus text exposition ([`exposition::CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        exposition::text(self.families())
    }

    /// Every family the agent's state reports, with the agent's build and process cost.
    pub fn families(&self) -> Vec<Family> {
        let mut out = self.traffic_families();
        out.extend(self.failed.families());
        out.push(Family::counters(
            "netprobe_kube_events_total",
            "Kubernetes Events about failed connections, by result: created, updated (series count of repeats), held (per-key interval: counted into the next update), failed (the API refused or did not answer in 10 s), evicted (keys the bounded rate limiter forgot), lost (failures those keys had not written yet), released (keys of pods deleted from the inventory).",
            self.kube_events.iter().map(|(r, n)| (Labels::one("result", *r), *n)),
        ));
        out.push(Family::counters(
            "netprobe_kube_events_suppressed_total",
            "Failures whose Kubernetes Event write waited for the agent's budget, by cause: rate (the token bucket of --events-rate/--events-burst), in_flight (--events-in-flight requests open). Each is counted in its Event's series.count, written once the budget allows.",
            ["rate", "in_flight"].into_iter().map(|c| {
                let n = self.kube_events_suppressed.get(c).copied().unwrap_or_default();
                (Labels::one("cause", c), n)
            }),
        ));
        out.extend(self.engine_families());
        out.extend(self.attribution_families());
        out.extend(self.scope_families());
        out.extend(self.kernel_families());
        out.extend(self.state_families());
        out.extend(self.latencies.families());
        out.push(process::build_info());
        out.extend(process::cost());
        out
    }

    /// What the session delivered: drops, resets, errors, retransmits, DNS lookups.
    fn traffic_families(&self) -> Vec<Family> {
        vec![
            Family::counters(
                "netprobe_drops_total",
                "Packets the kernel dropped, by drop reason, pod and owner of the rule.",
                self.drops.iter().map(|((reason, ns, pod, owner), n)| {
                    let l = [("reason", reason), ("namespace", ns), ("pod", pod)];
                    (Labels::of(l).with("rule_owner", owner.clone()), *n)
                }),
            ),
            Family::counter(
                "netprobe_resets_sent_total",
                "TCP resets sent by the kernel.",
                self.resets,
            ),
            Family::counters(
                "netprobe_app_errors_total",
                "Errors reported to applications, by errno.",
                by_one("errno", &self.app_errors),
            ),
            Family::counters(
                "netprobe_syn_retransmits_total",
                "SYN retransmissions (silent drops somewhere), by the node of the destination pod (after DNAT; no dst_node label if unknown).",
                by_one("dst_node", &self.syn_retransmits),
            ),
            Family::counters(
                "netprobe_dns_failures_total",
                "DNS lookups that failed, by client pod and reason (dropped, rejected, unanswered, servfail, refused).",
                self.dns_failures.iter().map(|((ns, pod, reason), n)| {
                    (
                        Labels::of([("namespace", ns), ("pod", pod), ("reason", reason)]),
                        *n,
                    )
                }),
            ),
            Family::counters(
                "netprobe_dns_queries_total",
                "DNS lookups seen leaving pods on this node, by the rcode of their answer (none: no answer).",
                by_one("rcode", &self.dns_queries),
            ),
        ]
    }

    /// The kernel side: lost events, in-kernel drop counts, program costs, events queued.
    fn kernel_families(&self) -> Vec<Family> {
        let program = |p: &crate::probes::ProgramStats| Labels::one("program", p.program.clone());
        vec![
            Family::counter(
                "netprobe_lost_events_total",
                "Events the kernel could not queue (ring buffer full).",
                self.lost,
            ),
            Family::counters(
                "netprobe_kernel_drops_total",
                "Drops in the watched namespaces counted in the kernel, by reason (events lost or not).",
                by_one("reason", &self.kernel_drops),
            ),
            Family::counters(
                "netprobe_program_runs_total",
                "Runs of each netprobe eBPF program, counted while the kernel's run-time statistics are on (agent --program-stats or sysctl kernel.bpf_stats_enabled=1).",
                self.programs.iter().map(|p| (program(p), p.runs)),
            ),
            Family::new(
                "netprobe_program_run_seconds_total",
                "Time the kernel spent in each netprobe eBPF program, counted while its run-time statistics are on.",
                Samples::CounterF64(
                    self.programs
                        .iter()
                        .map(|p| (program(p), p.run_ns as f64 / 1e9))
                        .collect(),
                ),
            ),
            Family::counter(
                "netprobe_events_total",
                "Events the kernel queued.",
                self.emitted,
            ),
            Family::counter(
                "netprobe_retransmits_counted_total",
                "TCP data retransmits of connections still making progress (fast retransmits, loss probes, retransmits after a partial acknowledgement), node-wide: counted in the kernel, not events; only a retransmission timeout is an event.",
                self.retransmits_counted,
            ),
        ]
    }

    /// Interfaces, namespaces, delay, readiness and each probe.
    fn state_families(&self) -> Vec<Family> {
        let probes = crate::probes::always_on_tracepoints()
            .into_iter()
            .map(|(program, _)| {
                let up = !self.degraded.iter().any(|(p, _)| p == program);
                (Labels::one("probe", program), i64::from(up))
            });
        vec![
            Family::gauge(
                "netprobe_attached_interfaces",
                "Interfaces with tc programs attached.",
                self.interfaces as i64,
            ),
            Family::gauge(
                "netprobe_watched_namespaces",
                "Network namespaces in scope.",
                self.namespaces as i64,
            ),
            Family::new(
                "netprobe_event_delay_max_seconds",
                "Longest time from the kernel's timestamp of an event to the agent reading it, over the last second.",
                Samples::GaugeF64(vec![(Labels::new(), self.delay_max_s)]),
            ),
            Family::gauge(
                "netprobe_ready",
                "1 once the agent's probes are attached (what /readyz answers).",
                i64::from(self.ready),
            ),
            Family::gauges(
                "netprobe_probe_up",
                "Whether each kernel probe is attached (0: refused by this kernel, see /readyz).",
                probes,
            ),
        ]
    }

    /// Attempts counted without events, and what the verdict engine let go of.
    fn engine_families(&self) -> Vec<Family> {
        let engines = [("tcp", &self.engine.tcp), ("dns", &self.engine.dns)];
        let evicted = engines.into_iter().flat_map(|(engine, ev)| {
            ev.by_reason()
                .into_iter()
                .map(move |(reason, n)| (Labels::one("engine", engine).with("reason", reason), n))
        });
        let (forgotten, skipped) = crate::enrich::recent::evictions();
        vec![
            Family::counter(
                "netprobe_connection_attempts_total",
                "TCP connection attempts (connect() calls that sent a SYN) in the watched namespaces, from their TCP MIB (ActiveOpens): healthy attempts are only counted, at no event cost.",
                self.tcp_attempts.active_opens,
            ),
            Family::counter(
                "netprobe_tcp_attempt_fails_total",
                "TCP attempts the kernel counted as failed in the watched namespaces (TCP MIB AttemptFails).",
                self.tcp_attempts.attempt_fails,
            ),
            Family::counters(
                "netprobe_verdict_engine_evicted_total",
                "What the always-on verdict engines (engine: tcp on every port, dns) let go of to stay bounded: judged_early (too many open at once: the oldest with a result judged with what it had), dropped (dns: too many open at once and none with a result: the oldest unanswered query forgotten without a verdict), forgotten_early (too many decided ones remembered), events_dropped (events beyond the bound of one attempt), followed_evicted (tcp: connections followed past their handshake from a failure signal, too many at once: the quietest judged with what it had, or let go without a drop).",
                evicted.collect::<Vec<_>>(),
            ),
            Family::counters(
                "netprobe_verdict_detail_evicted_total",
                "Details a verdict reads from the node (tc programs at a drop, rp_filter and the route back, a full accept queue, other pods serving a refused localhost port) that were not read to stay bounded: forgotten (a remembered read dropped at the bound), skipped (over the reads per second; the verdict goes without that detail).",
                [
                    (Labels::one("reason", "forgotten"), forgotten),
                    (Labels::one("reason", "skipped"), skipped),
                ],
            ),
        ]
    }

    /// What the agent holds per pod namespace, interface and pod.
    fn scope_families(&self) -> Vec<Family> {
        let c = &self.scope;
        vec![
            Family::gauge(
                "netprobe_kube_event_keys",
                "Keys (pod, reason, peer workload, port) the Kubernetes Event rate limiter remembers now; a deleted pod's are released.",
                self.kube_event_keys as i64,
            ),
            Family::gauge(
                "netprobe_kube_events_in_flight",
                "Kubernetes Event writes sent and not answered yet (at most --events-in-flight).",
                self.kube_events_in_flight as i64,
            ),
            Family::gauge(
                "netprobe_netns_filter_capacity",
                "Namespaces the kernel's filter map holds (--max-namespaces).",
                c.capacity.into(),
            ),
            Family::gauge(
                "netprobe_unwatched_namespaces",
                "Pod namespaces present but not watched because the filter map is full (retried every 200 ms).",
                c.unwatched as i64,
            ),
            Family::counter(
                "netprobe_netns_filter_refused_total",
                "Pod namespaces the full filter map refused (each counted once).",
                c.refused_total,
            ),
            Family::counter(
                "netprobe_netns_filter_released_total",
                "Namespaces of deleted pods taken out of the filter map.",
                c.released_total,
            ),
            Family::gauge(
                "netprobe_tc_links",
                "tc program links held (tcx: one file descriptor each; two per attached interface).",
                c.tc_links as i64,
            ),
            Family::counter(
                "netprobe_tc_links_released_total",
                "tc links of deleted interfaces (pods' veths) released.",
                c.tc_links_released_total,
            ),
        ]
    }

    /// Removes the `drops` and `dns_failures` series of pods gone from the inventory (`known`:
    /// `namespace/name`) for `grace`.
    pub fn release_gone_pods(&mut self, known: &HashSet<String>, now: Instant, grace: Duration) {
        let named: HashSet<pods::PodName> = self
            .drops
            .keys()
            .map(|(_, ns, pod, _)| (ns.clone(), pod.clone()))
            .chain(
                self.dns_failures
                    .keys()
                    .map(|(ns, pod, _)| (ns.clone(), pod.clone())),
            )
            .collect();
        let gone = self.gone_pods.expired(named, known, now, grace);
        if gone.is_empty() {
            return;
        }
        let before = self.drops.len() + self.dns_failures.len();
        let is_gone = |ns: &String, pod: &String| gone.contains(&(ns.clone(), pod.clone()));
        self.drops.retain(|(_, ns, pod, _), _| !is_gone(ns, pod));
        self.dns_failures
            .retain(|(ns, pod, _), _| !is_gone(ns, pod));
        let removed = before - self.drops.len() - self.dns_failures.len();
        self.failed.count_expired(removed as u64);
    }

    /// How the agent names rules without a trace: armed flows and rule counter reads.
    fn attribution_families(&self) -> Vec<Family> {
        let (a, c) = (&self.arming, &self.rule_counters);
        let result = |r: &'static str, n: u64| (Labels::one("result", r), n);
        vec![
            Family::gauge(
                "netprobe_armed_flows",
                "Flows armed now for an nftables trace of their next packet (a dropped SYN or DNS query whose retry names the rule).",
                a.armed_now as i64,
            ),
            Family::counters(
                "netprobe_armed_flows_total",
                "Flows armed (armed), refused because the bound of flows armed at once (32) or of new flows armed per second (4) was reached (refused), disarmed unused after their TTL (expired), traced to the dropping rule (traced), not armed because nft or the trace socket failed (errors).",
                [
                    result("armed", a.armed_total),
                    result("refused", a.refused),
                    result("expired", a.expired),
                    result("traced", a.traced),
                    result("errors", a.errors),
                ],
            ),
            Family::counter(
                "netprobe_nftrace_overruns_total",
                "Trace messages lost: dropped by the kernel (armed-flow trace socket full) or by netprobe (its queue of 4096 full).",
                a.trace_overruns,
            ),
            Family::counter(
                "netprobe_rule_counter_reads_total",
                "Reads of the ruleset's counters after a netfilter drop (at most one per namespace per 200 ms).",
                c.reads,
            ),
            Family::counters(
                "netprobe_rule_counter_drops_total",
                "Netfilter drops by how the counters named their rule: attributed, reused (the previous read, same destination), skipped (not attributed: within 200 ms of a read, another destination).",
                [
                    result("attributed", c.attributed),
                    result("reused", c.reused),
                    result("skipped", c.skipped),
                ],
            ),
        ]
    }

    pub fn count(&mut self, e: &Event) {
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
                    drop_owner(e),
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
                        .map(|f| f.reason.to_string())
                        .unwrap_or_default(),
                );
                *self.dns_failures.entry(key).or_default() += 1;
            }
            _ => {}
        }
    }
}

/// Who a drop event is owed to: the owner of the rule when the event names it; `unknown` for a
/// netfilter drop whose rule is not named; `kernel` for every other drop reason.
fn drop_owner(e: &Event) -> String {
    match (&e.netfilter, &e.drop) {
        (Some(nf), _) => nf.owner.system.name().into_owned(),
        (None, Some(d)) if d.reason == drop_reason::NETFILTER_DROP => "unknown".into(),
        _ => "kernel".into(),
    }
}

/// The metrics state, shared with the HTTP endpoint and the agent's housekeeping.
pub type SharedMetrics = Arc<Mutex<Metrics>>;

/// How often series of workloads and pods gone from the inventory are looked for (more often
/// when the grace period is shorter).
const EXPIRY_EVERY: Duration = Duration::from_secs(5);

/// Counts every event and verdict the session delivers.
pub struct PrometheusSink {
    metrics: SharedMetrics,
    options: MetricsOptions,
    /// The inventory, to expire series of workloads that are gone.
    names: Option<Rc<RefCell<PodContext>>>,
    expired_at: Instant,
}

impl PrometheusSink {
    pub fn new(metrics: SharedMetrics) -> Self {
        Self {
            metrics,
            options: MetricsOptions::default(),
            names: None,
            expired_at: Instant::now(),
        }
    }

    /// Labels and bound of `netprobe_failed_connections_total`.
    pub fn with_options(mut self, options: MetricsOptions) -> Self {
        self.options = options;
        self
    }

    /// Series of workloads that leave this inventory expire.
    pub fn with_inventory(mut self, names: Option<Rc<RefCell<PodContext>>>) -> Self {
        self.names = names;
        self
    }

    /// Counts a failed attempt or lookup (answered lookups, SERVFAIL included, are DNS's own).
    fn count_failure(&self, v: &Verdict) {
        if v.outcome.is_failure() {
            let key = failed::FailedKey::of(v, self.options.pod_labels);
            self.lock()
                .failed
                .add(key, Instant::now(), self.options.max_series);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Metrics> {
        self.metrics.lock().expect("metrics lock")
    }
}

impl Sink for PrometheusSink {
    fn event(&mut self, e: &Event) -> io::Result<()> {
        self.lock().count(e);
        Ok(())
    }

    /// Failed attempts and lookups by workload; DNS lookups: every one by the rcode of its
    /// answer (`none`: no answer), failures by client pod and reason.
    fn verdict(&mut self, v: &Verdict) -> io::Result<()> {
        self.count_failure(v);
        self.lock().latencies.observe(v, latency::now_ns());
        let Some(rcode) = v
            .udp
            .as_ref()
            .and_then(|u| u.dns.as_ref())
            .filter(|_| v.outcome != Outcome::Unknown)
            .map(|d| d.rcode.clone().unwrap_or_else(|| "none".into()))
        else {
            return Ok(());
        };
        let mut m = self.lock();
        *m.dns_queries.entry(rcode).or_default() += 1;
        if let Some(e) = crate::verdict::dns_failure(v) {
            m.count(&e);
        }
        Ok(())
    }

    /// Every few seconds: series of workloads without a pod in the inventory, and of pods
    /// gone from it, expire after the grace period.
    fn tick(&mut self) -> io::Result<()> {
        let Some(names) = &self.names else {
            return Ok(());
        };
        let grace = self.options.series_grace;
        if self.expired_at.elapsed() >= EXPIRY_EVERY.min(grace / 2) {
            self.expired_at = Instant::now();
            let (workloads, pods) = {
                let names = names.borrow();
                (names.inventory.workloads(), names.inventory.pod_names())
            };
            let mut m = self.lock();
            m.failed.expire(&workloads, &pods, self.expired_at, grace);
            m.release_gone_pods(&pods, self.expired_at, grace);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_drop(fixture: &str) -> Event {
        let line = fixture
            .lines()
            .find(|l| l.contains(r#""kind":"drop""#))
            .expect("a drop");
        serde_json::from_str(line).expect("an event")
    }

    fn owners(m: &Metrics) -> Vec<(&str, &str)> {
        m.drops
            .keys()
            .map(|(reason, _, _, owner)| (reason.as_str(), owner.as_str()))
            .collect()
    }

    #[test]
    fn a_drop_always_has_a_rule_owner() {
        let mut m = Metrics::default();
        let mut netfilter = first_drop(include_str!("../verdict/fixtures/s1_calico.ndjson"));
        m.count(&netfilter);
        assert_eq!(owners(&m), [("NETFILTER_DROP", "unknown")]);
        netfilter.netfilter = failed::testing::s1_calico().netfilter;
        netfilter.dport += 1;
        let mut m = Metrics::default();
        m.count(&netfilter);
        m.count(&first_drop(include_str!(
            "../verdict/fixtures/rp_filter.ndjson"
        )));
        assert_eq!(
            owners(&m),
            [("IP_RPFILTER", "kernel"), ("NETFILTER_DROP", "calico")]
        );
    }

    #[test]
    fn drop_and_dns_series_of_a_deleted_pod_go_after_the_grace_period() {
        let mut m = Metrics::default();
        m.count(&first_drop(include_str!(
            "../verdict/fixtures/s1_calico.ndjson"
        )));
        let key = |pod: &str| {
            (
                "NETFILTER_DROP".to_string(),
                "fi".to_string(),
                pod.to_string(),
                "unknown".to_string(),
            )
        };
        m.drops.insert(key("client-0"), 3);
        m.drops.insert(key("server-0"), 1);
        m.dns_failures
            .insert(("fi".into(), "client-0".into(), "unanswered".into()), 2);
        let before = m.drops.len();
        let t0 = Instant::now();
        let grace = Duration::from_secs(300);
        let server: HashSet<String> = ["fi/server-0".to_string()].into();
        m.release_gone_pods(&server, t0, grace);
        m.release_gone_pods(&server, t0 + grace / 2, grace);
        assert_eq!(m.drops.len(), before, "scraped during the grace period");
        m.release_gone_pods(&server, t0 + grace, grace);
        assert!(!m.drops.contains_key(&key("client-0")));
        assert!(m.drops.contains_key(&key("server-0")));
        assert!(m.dns_failures.is_empty());
        assert!(
            m.render()
                .contains("netprobe_metric_series_evicted_total{reason=\"expired\"} 2\n")
        );
    }

    #[test]
    fn failed_verdicts_are_counted_by_workload_and_healthy_ones_are_not() {
        let metrics = SharedMetrics::default();
        let mut sink = PrometheusSink::new(metrics.clone()).with_options(MetricsOptions {
            pod_labels: false,
            max_series: 10,
            ..Default::default()
        });
        sink.verdict(&failed::testing::s1_calico()).unwrap();
        let mut ok = failed::testing::s1_calico();
        ok.outcome = Outcome::Connected;
        sink.verdict(&ok).unwrap();
        let text = metrics.lock().unwrap().render();
        let failed: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("netprobe_failed_connections_total{"))
            .collect();
        assert_eq!(failed.len(), 1, "{text}");
        assert!(
            failed[0].contains(r#"src_workload="Deployment/baseline-predictor""#)
                && failed[0].ends_with(" 1"),
            "{text}"
        );
    }
}
