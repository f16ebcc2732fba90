//! The agent's log: NDJSON on stdout of what explains failures, under storm control. At most
//! `rate_limit` events per second per (kind, reason, pod) are written; the rest of that second
//! becomes one `suppressed` record with their count, so a log pipeline is never flooded and
//! nothing is lost silently (`/metrics` counts everything).

use std::{collections::HashMap, io};

use super::{Sink, ndjson::Ndjson};
use crate::{events::Event, sinks::Summary, verdict::Verdict};

pub const SUPPRESSED_SCHEMA: &str = "netprobe.suppressed/v1";

/// Written instead of the events a storm suppressed (one per key and second).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Suppressed {
    /// `netprobe.suppressed/v1`.
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
    /// `time_ns` (when it was written), `time` (RFC 3339) and `node`: added by the NDJSON
    /// writer.
    #[serde(flatten)]
    pub written: crate::model::Written,
}

/// (event kind, reason, namespace, pod)
type StormKey = (String, String, String, String);

/// A per-key budget per second; what exceeds it is counted, then reported.
#[derive(Default)]
pub struct Storm {
    /// key → (second, written in that second, suppressed in that second)
    keys: HashMap<StormKey, (u64, u32, u64)>,
}

fn storm_key(e: &Event) -> StormKey {
    let reason = e
        .drop
        .as_ref()
        .map(|d| d.reason.clone())
        .or_else(|| e.error.as_ref().map(|x| x.name.clone()))
        .or_else(|| e.dns_failure.as_ref().map(|f| f.reason.to_string()))
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
                        schema: SUPPRESSED_SCHEMA.into(),
                        kind: "suppressed".into(),
                        event_kind: kind.clone(),
                        reason: reason.clone(),
                        namespace: ns.clone(),
                        pod: pod.clone(),
                        count: slot.2,
                        second: slot.0,
                        written: Default::default(),
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

/// The agent's NDJSON log: failure events (as the session routes them) and `dns_failure`
/// records of failed DNS lookups, storm-controlled.
pub struct StormControlledLog<W: io::Write> {
    out: Ndjson<W>,
    storm: Storm,
    rate_limit: u32,
    /// Also write raw kernel events (by default verdicts only: raw ones are counted).
    raw_events: bool,
}

impl<W: io::Write> StormControlledLog<W> {
    pub fn new(out: W, rate_limit: u32) -> Self {
        Self {
            out: Ndjson::new(out),
            storm: Storm::default(),
            rate_limit,
            raw_events: false,
        }
    }

    /// Records are stamped with `node` (see [`super::ndjson::observing_node`]).
    pub fn on_node(mut self, node: impl Into<String>) -> Self {
        self.out = self.out.on_node(node);
        self
    }

    pub fn with_raw_events(mut self, raw: bool) -> Self {
        self.raw_events = raw;
        self
    }

    fn report_suppressed(&mut self, before: u64) -> io::Result<()> {
        for s in self.storm.flush(before) {
            self.out.write(&s)?;
        }
        Ok(())
    }

    fn admit_and_write(&mut self, e: &Event) -> io::Result<()> {
        if self
            .storm
            .admit(storm_key(e), unix_second(), self.rate_limit)
        {
            self.out.write(e)?;
        }
        Ok(())
    }

    /// A failed connection attempt, under the same storm control as events (keyed by outcome
    /// and server pod).
    fn admit_and_write_verdict(&mut self, v: &Verdict) -> io::Result<()> {
        let server = v.server.peer.as_ref();
        let key = (
            "verdict".to_string(),
            format!("{:?}", v.outcome),
            server.and_then(|p| p.namespace.clone()).unwrap_or_default(),
            server.and_then(|p| p.pod.clone()).unwrap_or_default(),
        );
        if self.storm.admit(key, unix_second(), self.rate_limit) {
            self.out.write(v)?;
        }
        Ok(())
    }
}

impl<W: io::Write> Sink for StormControlledLog<W> {
    fn event(&mut self, e: &Event) -> io::Result<()> {
        self.report_suppressed(unix_second())?;
        if self.raw_events {
            self.admit_and_write(e)?;
        }
        Ok(())
    }

    /// Failed lookups as `dns_failure` records, failed connection attempts as verdicts; what
    /// worked (NXDOMAIN included) is only counted.
    fn verdict(&mut self, v: &Verdict) -> io::Result<()> {
        self.report_suppressed(unix_second())?;
        if v.udp.is_some() {
            return match crate::verdict::dns_failure(v) {
                Some(e) => self.admit_and_write(&e),
                None => Ok(()),
            };
        }
        if v.outcome.is_failure() {
            self.admit_and_write_verdict(v)?;
        }
        Ok(())
    }

    fn tick(&mut self) -> io::Result<()> {
        self.report_suppressed(unix_second())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn finish(&mut self, _summary: &Summary) -> io::Result<()> {
        self.report_suppressed(u64::MAX)?;
        self.out.flush()
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
        assert_eq!(sup[0].schema, SUPPRESSED_SCHEMA);
        assert!(s.flush(12).is_empty(), "reported once");
        assert!(s.admit(key("a-0"), 12, 5), "a new second, a new budget");
    }
}
