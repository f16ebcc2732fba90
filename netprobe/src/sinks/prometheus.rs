//! Prometheus: the agent's `/metrics`. The sink counts what the session delivers (drops,
//! resets, errors, retransmits, DNS lookups, failed connections by workload — [`failed`]); the
//! agent's housekeeping sets the gauges (probes, interfaces, namespaces, kernel counters). Label
//! values come from the kernel's names and the inventory.

pub mod failed;
pub mod pods;

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashSet},
    io,
    rc::Rc,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

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
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn render(&self) -> String {
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
        self.failed.render(&mut s);
        s.push_str("# HELP netprobe_kube_events_total Kubernetes Events about failed connections, by result: created, updated (series count of repeats), held (rate limit: counted into the next update), failed (the API refused), evicted (keys the bounded rate limiter forgot), released (keys of pods deleted from the inventory).\n# TYPE netprobe_kube_events_total counter\n");
        for (result, n) in &self.kube_events {
            s.push_str(&format!(
                "netprobe_kube_events_total{{result=\"{result}\"}} {n}\n"
            ));
        }
        self.render_engine(&mut s);
        self.render_attribution(&mut s);
        self.render_scope(&mut s);
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

    /// Attempts counted without events, and what the verdict engine let go of.
    fn render_engine(&self, s: &mut String) {
        s.push_str("# HELP netprobe_connection_attempts_total TCP connection attempts (connect() calls that sent a SYN) in the watched namespaces, from their TCP MIB (ActiveOpens): healthy attempts are only counted, at no event cost.\n# TYPE netprobe_connection_attempts_total counter\n");
        s.push_str(&format!(
            "netprobe_connection_attempts_total {}\n",
            self.tcp_attempts.active_opens
        ));
        s.push_str("# HELP netprobe_tcp_attempt_fails_total TCP attempts the kernel counted as failed in the watched namespaces (TCP MIB AttemptFails).\n# TYPE netprobe_tcp_attempt_fails_total counter\n");
        s.push_str(&format!(
            "netprobe_tcp_attempt_fails_total {}\n",
            self.tcp_attempts.attempt_fails
        ));
        s.push_str("# HELP netprobe_verdict_engine_evicted_total What the always-on verdict engines (engine: tcp on every port, dns) let go of to stay bounded: judged_early (too many open at once: the oldest with a result judged with what it had), dropped (dns: too many open at once and none with a result: the oldest unanswered query forgotten without a verdict), forgotten_early (too many decided ones remembered), events_dropped (events beyond the bound of one attempt).\n# TYPE netprobe_verdict_engine_evicted_total counter\n");
        for (engine, ev) in [("tcp", &self.engine.tcp), ("dns", &self.engine.dns)] {
            for (reason, n) in ev.by_reason() {
                s.push_str(&format!(
                    "netprobe_verdict_engine_evicted_total{{engine=\"{engine}\",reason=\"{reason}\"}} {n}\n"
                ));
            }
        }
        let (forgotten, skipped) = crate::enrich::recent::evictions();
        s.push_str("# HELP netprobe_verdict_detail_evicted_total Details a verdict reads from the node (tc programs at a drop, rp_filter and the route back, a full accept queue, other pods serving a refused localhost port) that were not read to stay bounded: forgotten (a remembered read dropped at the bound), skipped (over the reads per second; the verdict goes without that detail).\n# TYPE netprobe_verdict_detail_evicted_total counter\n");
        s.push_str(&format!(
            "netprobe_verdict_detail_evicted_total{{reason=\"forgotten\"}} {forgotten}\nnetprobe_verdict_detail_evicted_total{{reason=\"skipped\"}} {skipped}\n"
        ));
    }

    /// What the agent holds per pod namespace, interface and pod.
    fn render_scope(&self, s: &mut String) {
        let c = &self.scope;
        let scalars: [(&str, &str, &str, u64); 7] = [
            (
                "netprobe_kube_event_keys",
                "gauge",
                "Keys (pod, reason, peer, port) the Kubernetes Event rate limiter remembers now; a deleted pod's are released.",
                self.kube_event_keys as u64,
            ),
            (
                "netprobe_netns_filter_capacity",
                "gauge",
                "Namespaces the kernel's filter map holds (--max-namespaces).",
                c.capacity.into(),
            ),
            (
                "netprobe_unwatched_namespaces",
                "gauge",
                "Pod namespaces present but not watched because the filter map is full (retried every 200 ms).",
                c.unwatched as u64,
            ),
            (
                "netprobe_netns_filter_refused_total",
                "counter",
                "Pod namespaces the full filter map refused (each counted once).",
                c.refused_total,
            ),
            (
                "netprobe_netns_filter_released_total",
                "counter",
                "Namespaces of deleted pods taken out of the filter map.",
                c.released_total,
            ),
            (
                "netprobe_tc_links",
                "gauge",
                "tc program links held (tcx: one file descriptor each; two per attached interface).",
                c.tc_links as u64,
            ),
            (
                "netprobe_tc_links_released_total",
                "counter",
                "tc links of deleted interfaces (pods' veths) released.",
                c.tc_links_released_total,
            ),
        ];
        for (name, kind, help, value) in scalars {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
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
    fn render_attribution(&self, s: &mut String) {
        let a = &self.arming;
        s.push_str(&format!(
            "# HELP netprobe_armed_flows Flows armed now for an nftables trace of their next packet (a dropped SYN or DNS query whose retry names the rule).\n# TYPE netprobe_armed_flows gauge\nnetprobe_armed_flows {}\n",
            a.armed_now
        ));
        s.push_str("# HELP netprobe_armed_flows_total Flows armed (armed), refused because the bound of flows armed at once (32) or of new flows armed per second (4) was reached (refused), disarmed unused after their TTL (expired), traced to the dropping rule (traced), not armed because nft or the trace socket failed (errors).\n# TYPE netprobe_armed_flows_total counter\n");
        for (result, n) in [
            ("armed", a.armed_total),
            ("refused", a.refused),
            ("expired", a.expired),
            ("traced", a.traced),
            ("errors", a.errors),
        ] {
            s.push_str(&format!(
                "netprobe_armed_flows_total{{result=\"{result}\"}} {n}\n"
            ));
        }
        s.push_str(&format!(
            "# HELP netprobe_nftrace_overruns_total Trace messages the kernel dropped (armed-flow trace socket full).\n# TYPE netprobe_nftrace_overruns_total counter\nnetprobe_nftrace_overruns_total {}\n",
            a.trace_overruns
        ));
        let c = &self.rule_counters;
        s.push_str(&format!(
            "# HELP netprobe_rule_counter_reads_total Reads of the ruleset's counters after a netfilter drop (at most one per namespace per 200 ms).\n# TYPE netprobe_rule_counter_reads_total counter\nnetprobe_rule_counter_reads_total {}\n",
            c.reads
        ));
        s.push_str("# HELP netprobe_rule_counter_drops_total Netfilter drops by how the counters named their rule: attributed, reused (the previous read, same destination), skipped (not attributed: within 200 ms of a read, another destination).\n# TYPE netprobe_rule_counter_drops_total counter\n");
        for (result, n) in [
            ("attributed", c.attributed),
            ("reused", c.reused),
            ("skipped", c.skipped),
        ] {
            s.push_str(&format!(
                "netprobe_rule_counter_drops_total{{result=\"{result}\"}} {n}\n"
            ));
        }
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
