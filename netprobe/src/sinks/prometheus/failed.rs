//! `netprobe_failed_connections_total`: failed connection attempts and DNS lookups, labelled so
//! an operator can alert on them — outcome, who owns the deciding rule, the policy, the dialled
//! Service and both sides' *workloads* (a restarted pod makes no new series). The number of
//! series is bounded (least recently counted evicted first) and series of workloads gone from
//! the inventory expire; both are counted in `netprobe_metric_series_evicted_total`.

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use super::exposition::{Family, Labels};
use crate::{
    model::{Cni, Named, Outcome, OwnerSystem, Peer},
    verdict::Verdict,
};

/// How long a series outlives the last pod of its workloads, or its pod (so the last count is
/// scraped): the default of `--metrics-series-grace`.
pub const EXPIRE_AFTER: Duration = Duration::from_secs(300);

/// Default bound of `netprobe_failed_connections_total` series.
pub const DEFAULT_MAX_SERIES: usize = 5000;

/// What the operator chose for the failed-connections counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsOptions {
    /// Also label by pod (`src_pod`, `dst_pod`): a series per pod, new ones on every restart.
    pub pod_labels: bool,
    /// At most this many series; the least recently counted is evicted for a new one.
    pub max_series: usize,
    /// How long series outlive the pod (or the workload's last pod) they name.
    pub series_grace: Duration,
}

impl Default for MetricsOptions {
    fn default() -> Self {
        Self {
            pod_labels: false,
            max_series: DEFAULT_MAX_SERIES,
            series_grace: EXPIRE_AFTER,
        }
    }
}

/// The labels of one series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FailedKey {
    pub outcome: String,
    pub rule_owner: String,
    pub policy: String,
    pub service: String,
    pub src_namespace: String,
    pub src_workload: String,
    pub dst_namespace: String,
    pub dst_workload: String,
    /// (src_pod, dst_pod), only with `--metrics-pod-labels`.
    pub pods: Option<(String, String)>,
}

impl FailedKey {
    pub fn of(v: &Verdict, pod_labels: bool) -> Self {
        let src = v.client.peer.clone().unwrap_or_default();
        let dst = v.server.peer.clone().unwrap_or_default();
        Self {
            outcome: outcome_name(v.outcome),
            rule_owner: rule_owner(v).into(),
            policy: policy(v),
            service: service(v).unwrap_or_default(),
            src_namespace: src.namespace.clone().unwrap_or_default(),
            src_workload: src.workload.clone().unwrap_or_default(),
            dst_namespace: dst.namespace.clone().unwrap_or_default(),
            dst_workload: dst.workload.clone().unwrap_or_default(),
            pods: pod_labels.then(|| (pod_name(&src), pod_name(&dst))),
        }
    }

    /// `namespace/Kind/name` of the workloads the series names (as [`Inventory::workloads`]).
    ///
    /// [`Inventory::workloads`]: crate::enrich::pods::Inventory::workloads
    fn workloads(&self) -> impl Iterator<Item = String> + '_ {
        [
            (&self.src_namespace, &self.src_workload),
            (&self.dst_namespace, &self.dst_workload),
        ]
        .into_iter()
        .filter(|(_, w)| !w.is_empty())
        .map(|(ns, w)| format!("{ns}/{w}"))
    }

    /// `namespace/name` of the pods the series names (with `--metrics-pod-labels`).
    fn pods(&self) -> impl Iterator<Item = String> + '_ {
        let (src, dst) = self
            .pods
            .as_ref()
            .map_or(("", ""), |(s, d)| (s.as_str(), d.as_str()));
        [(&self.src_namespace, src), (&self.dst_namespace, dst)]
            .into_iter()
            .filter(|(_, p)| !p.is_empty())
            .map(|(ns, p)| super::pods::qualified(ns, p))
    }

    /// The series' labels (an empty value is no label: a pod of another node has no workload).
    fn labels(&self) -> Labels {
        let mut labels = Labels::of([
            ("outcome", &self.outcome),
            ("rule_owner", &self.rule_owner),
            ("policy", &self.policy),
            ("service", &self.service),
            ("src_namespace", &self.src_namespace),
            ("src_workload", &self.src_workload),
            ("dst_namespace", &self.dst_namespace),
            ("dst_workload", &self.dst_workload),
        ]);
        if let Some((src, dst)) = &self.pods {
            labels = labels
                .with("src_pod", src.clone())
                .with("dst_pod", dst.clone());
        }
        labels
    }

    /// `name="value",…` as exposed (tests).
    #[cfg(test)]
    fn render(&self) -> String {
        let labels = self.labels();
        let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        pairs.join(",")
    }
}

/// The outcome as `netprobe.verdict/v1` spells it (`dropped_by_rule`, …).
fn outcome_name(o: Outcome) -> String {
    serde_json::to_value(o)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Who decided: the owner of the rule (`calico`, `kube-proxy`, `user`, …); `kernel` when the
/// kernel refused or dropped it without a rule; `unknown` for netfilter without the rule named;
/// `none` when nothing on this node decided (timeouts, resets and ICMP errors from elsewhere).
pub fn rule_owner(v: &Verdict) -> std::borrow::Cow<'static, str> {
    if let Some(nf) = &v.netfilter {
        return nf.owner.system.name();
    }
    std::borrow::Cow::Borrowed(match v.outcome {
        Outcome::RefusedNoListener | Outcome::DroppedByKernel | Outcome::MtuBlackhole => "kernel",
        Outcome::DroppedInNetfilter | Outcome::DroppedByRule | Outcome::RefusedByRule => "unknown",
        _ => "none",
    })
}

/// The policies in force, joined; the kind of rule when it is no policy's (e.g.
/// `calico-end-of-tier-deny`, `kube-proxy-no-endpoints`); empty without a rule.
fn policy(v: &Verdict) -> String {
    v.netfilter.as_ref().map_or_else(String::new, |nf| {
        if nf.owner.policies.is_empty() {
            nf.owner.kind.clone()
        } else {
            nf.owner.policies.join(",")
        }
    })
}

/// `namespace/name` of the Service dialled (its ClusterIP), else of the Service the rule names
/// (kube-proxy's "has no endpoints").
pub fn service(v: &Verdict) -> Option<String> {
    let dialled = [
        &v.dialed.as_ref().and_then(|d| d.peer.clone()),
        &v.server.peer,
    ]
    .into_iter()
    .flatten()
    .find_map(|p| p.service.clone());
    let by_rule = || {
        v.netfilter
            .as_ref()
            .filter(|nf| nf.owner.system == OwnerSystem::Cni(Cni::KubeProxy))
            .and_then(|nf| nf.owner.object.clone())
    };
    dialled
        .or_else(by_rule)
        .map(|s| s.split(':').next().unwrap_or_default().to_string())
}

fn pod_name(p: &Peer) -> String {
    p.pod.clone().unwrap_or_default()
}

/// One series' count, and when it was last counted and last had all its workloads.
#[derive(Debug)]
struct Series {
    count: u64,
    counted: Instant,
    present: Instant,
}

/// The counter's series, bounded, with the evictions counted by reason.
#[derive(Debug, Default)]
pub struct FailedConnections {
    series: BTreeMap<FailedKey, Series>,
    /// `limit` (the bound) / `expired` (workload gone) → series evicted.
    evicted: BTreeMap<&'static str, u64>,
}

impl FailedConnections {
    /// Counts one failure; a new series beyond `max_series` evicts the least recently counted.
    pub fn add(&mut self, key: FailedKey, now: Instant, max_series: usize) {
        if let Some(s) = self.series.get_mut(&key) {
            s.count += 1;
            s.counted = now;
            return;
        }
        while self.series.len() >= max_series.max(1) {
            self.evict_oldest();
        }
        let s = Series {
            count: 1,
            counted: now,
            present: now,
        };
        self.series.insert(key, s);
    }

    fn evict_oldest(&mut self) {
        let Some(oldest) = self
            .series
            .iter()
            .min_by_key(|(_, s)| s.counted)
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        self.series.remove(&oldest);
        *self.evicted.entry("limit").or_default() += 1;
    }

    /// Removes series naming a workload that has had no pod in the inventory (`workloads`:
    /// `namespace/Kind/name`), or a pod that is not in it (`pods`: `namespace/name`), for
    /// `grace`.
    pub fn expire(
        &mut self,
        workloads: &HashSet<String>,
        pods: &HashSet<String>,
        now: Instant,
        grace: Duration,
    ) {
        let before = self.series.len();
        self.series.retain(|k, s| {
            if k.workloads().all(|w| workloads.contains(&w)) && k.pods().all(|p| pods.contains(&p))
            {
                s.present = now;
            }
            now.duration_since(s.present) < grace
        });
        self.count_expired((before - self.series.len()) as u64);
    }

    /// Series of other metrics removed with their pod count here too (one counter for every
    /// per-pod series an operator sees disappear).
    pub fn count_expired(&mut self, n: u64) {
        if n > 0 {
            *self.evicted.entry("expired").or_default() += n;
        }
    }

    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// The count of the series with these labels (tests, diagnostics).
    pub fn count(&self, key: &FailedKey) -> Option<u64> {
        self.series.get(key).map(|s| s.count)
    }

    /// `netprobe_failed_connections_total` and `netprobe_metric_series_evicted_total`.
    pub fn families(&self) -> Vec<Family> {
        let evicted = ["limit", "expired"].map(|r| {
            (
                Labels::one("reason", r),
                self.evicted.get(r).copied().unwrap_or(0),
            )
        });
        vec![
            Family::counters(
                "netprobe_failed_connections_total",
                "Failed connection attempts and DNS lookups, by outcome, owner of the deciding rule (kernel: no rule; none: nothing on this node decided), policy (or kind of rule), dialled Service and source/destination workload.",
                self.series.iter().map(|(k, s)| (k.labels(), s.count)),
            ),
            Family::counters(
                "netprobe_metric_series_evicted_total",
                "Series removed: limit (netprobe_failed_connections_total's bound, least recently counted first), expired (series of netprobe_failed_connections_total, netprobe_drops_total or netprobe_dns_failures_total whose workload or pod left the inventory, after the grace period).",
                evicted,
            ),
        ]
    }

    /// The exposition of [`Self::families`] appended to `out` (tests).
    #[cfg(test)]
    pub fn render(&self, out: &mut String) {
        out.push_str(&super::exposition::text(self.families()));
    }
}

/// Verdicts of the golden fixtures (`verdict/golden/`), named as the agent names them.
#[cfg(test)]
pub(crate) mod testing {
    use crate::{model::Peer, verdict::Verdict};

    pub fn golden(json: &str) -> Verdict {
        serde_json::from_str(json.lines().next().expect("a verdict")).expect("a verdict")
    }

    pub fn pod(ns: &str, name: &str, workload: &str) -> Option<Peer> {
        Some(Peer {
            namespace: Some(ns.into()),
            pod: Some(name.into()),
            workload: Some(workload.into()),
            ..Default::default()
        })
    }

    /// S1: baseline-predictor (a Deployment's pod) dials the seldon-scheduler Service; Calico's
    /// end-of-tier deny drops the SYN at the scheduler pod (a StatefulSet's).
    pub fn s1_calico() -> Verdict {
        let mut v = golden(include_str!("../../verdict/golden/s1_calico.verdicts.json"));
        v.client.peer = pod(
            "financial-inference",
            "baseline-predictor-7d9f8b6c5-x2x9z",
            "Deployment/baseline-predictor",
        );
        v.server.peer = pod(
            "financial-inference",
            "seldon-scheduler-0",
            "StatefulSet/seldon-scheduler",
        );
        v.dialed.as_mut().expect("dialled the ClusterIP").peer = Some(Peer {
            namespace: Some("financial-inference".into()),
            service: Some("financial-inference/seldon-scheduler:xds".into()),
            ..Default::default()
        });
        v
    }

    /// kube-proxy's "has no endpoints" REJECT of a ClusterIP with no backend (no DNAT: the
    /// server is the ClusterIP itself, not named).
    pub fn kube_proxy_reject() -> Verdict {
        let mut v = golden(include_str!(
            "../../verdict/golden/kube_proxy_reject.verdicts.json"
        ));
        v.client.peer = pod(
            "financial-inference",
            "baseline-predictor-7d9f8b6c5-x2x9z",
            "Deployment/baseline-predictor",
        );
        v
    }

    pub fn refused_no_listener() -> Verdict {
        let mut v = golden(include_str!(
            "../../verdict/golden/s2_refused.verdicts.json"
        ));
        v.server.peer = pod("financial-ml", "mlserver-0", "StatefulSet/mlserver");
        v.client.peer = v.server.peer.clone();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::*, *};

    fn key(v: &Verdict) -> FailedKey {
        FailedKey::of(v, false)
    }

    #[test]
    fn a_calico_drop_is_labelled_by_owner_policy_service_and_workloads() {
        let k = key(&s1_calico());
        assert_eq!(
            k,
            FailedKey {
                outcome: "dropped_by_rule".into(),
                rule_owner: "calico".into(),
                policy: "financial-inference/scheduler-allow-xds".into(),
                service: "financial-inference/seldon-scheduler".into(),
                src_namespace: "financial-inference".into(),
                src_workload: "Deployment/baseline-predictor".into(),
                dst_namespace: "financial-inference".into(),
                dst_workload: "StatefulSet/seldon-scheduler".into(),
                pods: None,
            }
        );
        let with_pods = FailedKey::of(&s1_calico(), true);
        assert_eq!(
            with_pods.pods,
            Some((
                "baseline-predictor-7d9f8b6c5-x2x9z".into(),
                "seldon-scheduler-0".into()
            ))
        );
        assert!(
            with_pods.render().ends_with(
                "src_pod=\"baseline-predictor-7d9f8b6c5-x2x9z\",dst_pod=\"seldon-scheduler-0\""
            ),
            "{}",
            with_pods.render()
        );
    }

    #[test]
    fn a_kube_proxy_reject_names_the_service_of_its_rule_and_the_kernel_owns_a_refusal() {
        let k = key(&kube_proxy_reject());
        assert_eq!(
            (k.outcome.as_str(), k.rule_owner.as_str(), k.policy.as_str()),
            ("refused_by_rule", "kube-proxy", "kube-proxy-no-endpoints")
        );
        assert_eq!(k.service, "financial-inference/seldon-scheduler");
        let k = key(&refused_no_listener());
        assert_eq!(
            (k.outcome.as_str(), k.rule_owner.as_str(), k.policy.as_str()),
            ("refused_no_listener", "kernel", "")
        );
        let mut timeout = refused_no_listener();
        timeout.outcome = Outcome::TimedOut;
        assert_eq!(key(&timeout).rule_owner, "none");
        timeout.outcome = Outcome::DroppedInNetfilter;
        assert_eq!(key(&timeout).rule_owner, "unknown");
    }

    #[test]
    fn a_restarted_pod_counts_into_the_same_series() {
        let mut m = FailedConnections::default();
        let now = Instant::now();
        let v = s1_calico();
        m.add(key(&v), now, 10);
        let mut again = s1_calico();
        again.client.peer = pod(
            "financial-inference",
            "baseline-predictor-7d9f8b6c5-q8w7e",
            "Deployment/baseline-predictor",
        );
        m.add(key(&again), now, 10);
        assert_eq!((m.len(), m.count(&key(&v))), (1, Some(2)));
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("netprobe_failed_connections_total{outcome=\"dropped_by_rule\",rule_owner=\"calico\",policy=\"financial-inference/scheduler-allow-xds\",service=\"financial-inference/seldon-scheduler\",src_namespace=\"financial-inference\",src_workload=\"Deployment/baseline-predictor\",dst_namespace=\"financial-inference\",dst_workload=\"StatefulSet/seldon-scheduler\"} 2\n"), "{out}");
    }

    #[test]
    fn series_are_bounded_and_the_least_recently_counted_goes_first() {
        let mut m = FailedConnections::default();
        let t0 = Instant::now();
        let keys: Vec<FailedKey> = (0..4)
            .map(|i| FailedKey {
                src_workload: format!("Deployment/client-{i}"),
                ..key(&s1_calico())
            })
            .collect();
        m.add(keys[0].clone(), t0, 3);
        m.add(keys[1].clone(), t0 + Duration::from_secs(1), 3);
        m.add(keys[2].clone(), t0 + Duration::from_secs(2), 3);
        m.add(keys[0].clone(), t0 + Duration::from_secs(3), 3);
        m.add(keys[3].clone(), t0 + Duration::from_secs(4), 3);
        assert_eq!(m.len(), 3);
        assert_eq!(m.count(&keys[1]), None, "the least recently counted");
        assert_eq!(m.count(&keys[0]), Some(2));
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("netprobe_metric_series_evicted_total{reason=\"limit\"} 1\n"));
        assert!(out.contains("netprobe_metric_series_evicted_total{reason=\"expired\"} 0\n"));
    }

    #[test]
    fn series_of_a_deleted_workload_expire_after_a_grace_period() {
        let mut m = FailedConnections::default();
        let t0 = Instant::now();
        let k = key(&s1_calico());
        m.add(k.clone(), t0, 10);
        let both: HashSet<String> = [
            "financial-inference/Deployment/baseline-predictor".to_string(),
            "financial-inference/StatefulSet/seldon-scheduler".to_string(),
        ]
        .into();
        let no_pods = HashSet::new();
        m.expire(&both, &no_pods, t0 + Duration::from_secs(60), EXPIRE_AFTER);
        let client_gone: HashSet<String> =
            ["financial-inference/StatefulSet/seldon-scheduler".to_string()].into();
        m.expire(
            &client_gone,
            &no_pods,
            t0 + Duration::from_secs(61),
            EXPIRE_AFTER,
        );
        assert_eq!(
            m.count(&k),
            Some(1),
            "kept while the last count may be scraped"
        );
        m.expire(
            &client_gone,
            &no_pods,
            t0 + Duration::from_secs(60) + EXPIRE_AFTER,
            EXPIRE_AFTER,
        );
        assert!(m.is_empty());
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("netprobe_metric_series_evicted_total{reason=\"expired\"} 1\n"));
        // A series without workloads (a pod of another node) never expires by workload.
        let mut other_node = k.clone();
        other_node.src_workload.clear();
        other_node.dst_workload.clear();
        m.add(other_node.clone(), t0, 10);
        m.expire(
            &HashSet::new(),
            &no_pods,
            t0 + EXPIRE_AFTER * 2,
            EXPIRE_AFTER,
        );
        assert_eq!(m.count(&other_node), Some(1));
    }

    #[test]
    fn series_labelled_by_a_deleted_pod_expire_while_its_workload_lives_on() {
        let mut m = FailedConnections::default();
        let t0 = Instant::now();
        let k = FailedKey::of(&s1_calico(), true);
        m.add(k.clone(), t0, 10);
        let workloads: HashSet<String> = [
            "financial-inference/Deployment/baseline-predictor".to_string(),
            "financial-inference/StatefulSet/seldon-scheduler".to_string(),
        ]
        .into();
        let server_only: HashSet<String> =
            ["financial-inference/seldon-scheduler-0".to_string()].into();
        let grace = Duration::from_secs(2);
        m.expire(&workloads, &server_only, t0, grace);
        m.expire(&workloads, &server_only, t0 + Duration::from_secs(1), grace);
        assert_eq!(m.count(&k), Some(1), "within the grace period");
        m.expire(&workloads, &server_only, t0 + grace, grace);
        assert!(m.is_empty(), "the client pod was replaced: its series goes");
    }
}
