//! Series labelled by pod (`netprobe_drops_total`, `netprobe_dns_failures_total`) name pods
//! that come and go; a pod's series are removed once it has been gone from the inventory for a
//! grace period. A grace period, not "once scraped": with several scrapers (an HA pair of
//! Prometheus) one scrape is not every scrape, and without any scraper the series would stay
//! forever. Prometheus handles a counter that disappears: the series goes stale, and its last
//! sample, scraped within the grace period, still counts in `increase()`.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

/// (namespace, pod) as the series label them.
pub type PodName = (String, String);

/// `namespace/name`, as [`crate::enrich::pods::Inventory::pod_names`] lists pods.
pub fn qualified(namespace: &str, pod: &str) -> String {
    format!("{namespace}/{pod}")
}

/// Since when each pod named by a series has been missing from the inventory.
#[derive(Debug, Default)]
pub struct GonePods {
    since: HashMap<PodName, Instant>,
}

impl GonePods {
    /// The pods of `named` missing from `known` for at least `grace`. A pod present again is
    /// forgotten, and so is one no series names any more.
    pub fn expired(
        &mut self,
        named: HashSet<PodName>,
        known: &HashSet<String>,
        now: Instant,
        grace: Duration,
    ) -> HashSet<PodName> {
        let missing: HashSet<PodName> = named
            .into_iter()
            .filter(|(ns, pod)| !pod.is_empty() && !known.contains(&qualified(ns, pod)))
            .collect();
        self.since.retain(|p, _| missing.contains(p));
        missing
            .into_iter()
            .filter(|p| now.duration_since(*self.since.entry(p.clone()).or_insert(now)) >= grace)
            .collect()
    }

    /// Pods waiting out their grace period.
    pub fn len(&self) -> usize {
        self.since.len()
    }

    pub fn is_empty(&self) -> bool {
        self.since.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodName {
        ("ns".into(), name.into())
    }

    #[test]
    fn a_pod_gone_for_the_grace_period_expires_and_one_back_in_time_does_not() {
        let mut g = GonePods::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let named: HashSet<PodName> = [pod("a"), pod("b"), pod("")].into();
        let only_b: HashSet<String> = ["ns/b".to_string()].into();
        assert!(g.expired(named.clone(), &only_b, t0, grace).is_empty());
        assert_eq!(
            g.len(),
            1,
            "a is waiting; b is present; no pod name is no pod"
        );
        let later = t0 + Duration::from_secs(5);
        let both: HashSet<String> = ["ns/a".to_string(), "ns/b".to_string()].into();
        assert!(g.expired(named.clone(), &both, later, grace).is_empty());
        assert!(g.is_empty(), "a came back (a StatefulSet's pod)");
        assert!(g.expired(named.clone(), &only_b, later, grace).is_empty());
        assert_eq!(
            g.expired(named, &only_b, later + grace, grace),
            [pod("a")].into()
        );
    }
}
