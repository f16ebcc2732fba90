//! Latency histograms: how long answered DNS lookups take, and how long after an attempt
//! started its verdict came out (the settle and timeout waits of the verdict engine included).

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::histogram::Histogram;

use super::exposition::{Family, Samples, seconds_histogram};
use crate::verdict::{Outcome, Verdict};

/// The agent's latency histograms.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// First query datagram to the last event of the lookup (the reply back at the client), for
    /// answered lookups: 0.25 ms … ~4 s.
    dns: Histogram,
    /// Attempt start (its first event) to the verdict reaching the sinks: 10 ms … ~41 s.
    verdict: Histogram,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            dns: seconds_histogram(0.000_25, 2.0, 15),
            verdict: seconds_histogram(0.01, 2.0, 13),
        }
    }
}

impl Latencies {
    /// Observes one verdict as it reaches the sinks (`now_ns`: wall clock, ns since the epoch,
    /// the clock of the timeline).
    pub fn observe(&self, v: &Verdict, now_ns: u64) {
        let (Some(first), Some(last)) = (v.timeline.first(), v.timeline.last()) else {
            return;
        };
        if let Some(ns) = now_ns.checked_sub(first.time_ns) {
            self.verdict.observe(ns as f64 / 1e9);
        }
        let answered = v
            .udp
            .as_ref()
            .and_then(|u| u.dns.as_ref())
            .is_some_and(|d| d.rcode.is_some());
        if answered && v.outcome == Outcome::Answered {
            self.dns
                .observe(last.time_ns.saturating_sub(first.time_ns) as f64 / 1e9);
        }
    }

    pub fn families(&self) -> Vec<Family> {
        vec![
            Family::new(
                "netprobe_dns_lookup_duration_seconds",
                "Answered DNS lookups (any rcode) of pods on this node: first query datagram seen to the reply back at the client, retries included.",
                Samples::Histogram(self.dns.clone()),
            ),
            Family::new(
                "netprobe_verdict_latency_seconds",
                "Time from the first event of a connection attempt or DNS lookup to its verdict (includes the settle time and the 5 s timeout of unanswered attempts).",
                Samples::Histogram(self.verdict.clone()),
            ),
        ]
    }
}

/// Now, on the timeline's clock.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::prometheus::{exposition::text, failed::testing::golden};

    #[test]
    fn an_answered_lookup_is_timed_from_query_to_reply_and_every_verdict_from_its_start() {
        let l = Latencies::default();
        let answered = golden(include_str!(
            "../../verdict/golden/dns_answered.verdicts.json"
        ));
        let start = answered.timeline[0].time_ns;
        l.observe(&answered, start + 2_000_000_000);
        l.observe(
            &golden(include_str!(
                "../../verdict/golden/dns_unanswered.verdicts.json"
            )),
            u64::MAX,
        );
        let out = text(l.families());
        // 772127203 → 772581596: 454 µs.
        assert!(
            out.contains("netprobe_dns_lookup_duration_seconds_bucket{le=\"0.0005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("netprobe_dns_lookup_duration_seconds_count 1\n"),
            "{out}"
        );
        assert!(
            out.contains("netprobe_verdict_latency_seconds_count 2\n"),
            "{out}"
        );
        assert!(
            out.contains("netprobe_verdict_latency_seconds_bucket{le=\"2.56\"} 1\n"),
            "{out}"
        );
    }
}
