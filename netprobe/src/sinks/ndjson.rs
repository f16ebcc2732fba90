//! NDJSON: one JSON object per line, each carrying its `schema`. The one writer every JSON
//! output goes through (`trace -o json`, `--record`, the agent's log, cluster-mode frames), and
//! the JSON Schemas of what it writes.
//!
//! Every record also says where and when (for log pipelines, which route and index by them):
//! `node`, the node whose netprobe observed it, and `time`, an RFC 3339 timestamp next to
//! `time_ns`. The writer adds them to a record that does not carry them yet; a record relayed
//! from another node (cluster mode) keeps that node's.

use std::io::{self, Write};

use k8s_openapi::chrono::{DateTime, SecondsFormat};
use serde::Serialize;

use super::{Show, Sink};
pub use crate::model::{Observed, Written};
use crate::{events::Event, sinks::Summary, verdict::Verdict};

/// A record the writer can stamp: its own time, if it has one, and what it already carries.
pub trait Record: Serialize {
    /// Nanoseconds since the Unix epoch the record is about; None: when it is written.
    fn time_ns(&self) -> Option<u64>;
    fn observed(&self) -> &Observed;
}

impl Record for Event {
    fn time_ns(&self) -> Option<u64> {
        Some(self.time_ns)
    }
    fn observed(&self) -> &Observed {
        &self.observed
    }
}

impl Record for Verdict {
    fn time_ns(&self) -> Option<u64> {
        self.written.time_ns
    }
    fn observed(&self) -> &Observed {
        &self.written.observed
    }
}

impl Record for Summary {
    fn time_ns(&self) -> Option<u64> {
        self.written.time_ns
    }
    fn observed(&self) -> &Observed {
        &self.written.observed
    }
}

impl Record for super::storm::Suppressed {
    fn time_ns(&self) -> Option<u64> {
        self.written.time_ns
    }
    fn observed(&self) -> &Observed {
        &self.written.observed
    }
}

/// A record with what it lacks of `time_ns`, `time` and `node` (serialized after its own
/// fields, none twice).
#[derive(Serialize)]
struct Stamped<'a, R> {
    #[serde(flatten)]
    record: &'a R,
    #[serde(skip_serializing_if = "Option::is_none")]
    time_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
}

/// `ns` since the Unix epoch as RFC 3339 in UTC with nanoseconds.
pub fn rfc3339(ns: u64) -> String {
    DateTime::from_timestamp_nanos(i64::try_from(ns).unwrap_or(i64::MAX))
        .to_rfc3339_opts(SecondsFormat::Nanos, true)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The name records are stamped with: `configured` (`--node-name`/`NODE_NAME`), else the
/// host name (a trace run by hand on a node), else `unknown`.
pub fn observing_node(configured: Option<&str>) -> String {
    if let Some(n) = configured.filter(|n| !n.is_empty()) {
        return n.to_string();
    }
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its length; gethostname NUL-terminates within it
    // when the name fits (HOST_NAME_MAX is 64 on Linux).
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let len = buf.iter().position(|&b| b == 0).unwrap_or(0);
    match std::str::from_utf8(&buf[..len]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "unknown".to_string(),
    }
}

/// Writes records, one per line, each stamped with where and when. Flushing is the caller's
/// choice (per record for a person watching, per batch for the agent).
pub struct Ndjson<W: Write> {
    out: W,
    /// The observing node, for records that do not name one (None: relay records as they are).
    node: Option<String>,
}

impl<W: Write> Ndjson<W> {
    pub fn new(out: W) -> Self {
        Self { out, node: None }
    }

    /// Records written here were observed on `node`.
    pub fn on_node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    pub fn write(&mut self, record: &impl Record) -> io::Result<()> {
        let own = record.time_ns();
        let at = own.unwrap_or_else(now_ns);
        let has = record.observed();
        let stamped = Stamped {
            record,
            time_ns: own.is_none().then_some(at),
            time: has.time.is_none().then(|| rfc3339(at)),
            node: self.node.as_deref().filter(|_| has.node.is_none()),
        };
        serde_json::to_writer(&mut self.out, &stamped).map_err(io::Error::from)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// `trace -o json` (events or verdicts, then the summary) and `trace --record FILE` (every
/// event, no summary).
pub struct NdjsonSink<W: Write> {
    out: Ndjson<W>,
    show: Show,
    with_summary: bool,
    /// Flush after every record: a person or a pipe reads along.
    eager: bool,
}

impl<W: Write> NdjsonSink<W> {
    /// What `trace -o json` prints on stdout.
    pub fn output(out: W, show: Show) -> Self {
        Self {
            out: Ndjson::new(out),
            show,
            with_summary: true,
            eager: true,
        }
    }

    /// Every event, for replay or a bug report (`--record`).
    pub fn recording(out: W) -> Self {
        Self {
            out: Ndjson::new(out),
            show: Show::Events,
            with_summary: false,
            eager: false,
        }
    }

    /// Records are stamped with `node` (see [`observing_node`]).
    pub fn on_node(mut self, node: impl Into<String>) -> Self {
        self.out = self.out.on_node(node);
        self
    }

    fn written(&mut self) -> io::Result<()> {
        if self.eager { self.out.flush() } else { Ok(()) }
    }
}

impl<W: Write> Sink for NdjsonSink<W> {
    fn event(&mut self, e: &Event) -> io::Result<()> {
        if self.show == Show::Events {
            self.out.write(e)?;
            self.written()?;
        }
        Ok(())
    }

    fn verdict(&mut self, v: &Verdict) -> io::Result<()> {
        if self.show == Show::Verdicts {
            self.out.write(v)?;
            self.written()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn finish(&mut self, s: &Summary) -> io::Result<()> {
        if self.with_summary {
            self.out.write(s)?;
        }
        self.out.flush()
    }
}

/// JSON Schemas of everything netprobe writes as NDJSON, keyed by the `schema` value each
/// record carries. Every record has `time_ns`, `time` and `node` (the writer adds them).
pub fn json_schemas() -> serde_json::Value {
    let mut all = serde_json::json!({
        crate::events::SCHEMA: schemars::schema_for!(Event),
        crate::verdict::SCHEMA: schemars::schema_for!(Verdict),
        super::SUMMARY_SCHEMA: schemars::schema_for!(Summary),
        super::storm::SUPPRESSED_SCHEMA: schemars::schema_for!(super::storm::Suppressed),
    });
    for schema in all.as_object_mut().expect("an object").values_mut() {
        require_where_and_when(schema);
    }
    all
}

/// What the writer guarantees, in the schema: `time_ns`, `time` (RFC 3339) and `node` present
/// and not null. (The types keep them optional: records relayed from older agents lack them.)
fn require_where_and_when(schema: &mut serde_json::Value) {
    let stamp = [
        (
            "time_ns",
            serde_json::json!({"type": "integer", "minimum": 0, "description":
                "Nanoseconds since the Unix epoch: when the kernel saw it (events), else when the record was written."}),
        ),
        (
            "time",
            serde_json::json!({"type": "string", "format": "date-time", "description":
                "`time_ns` as an RFC 3339 timestamp (UTC, nanoseconds)."}),
        ),
        (
            "node",
            serde_json::json!({"type": "string", "minLength": 1, "description":
                "The node whose netprobe observed it: the agent's NODE_NAME; a trace's --node-name/NODE_NAME, else the host name."}),
        ),
    ];
    for (name, def) in stamp {
        schema["properties"][name] = def;
        let required = schema
            .as_object_mut()
            .expect("an object schema")
            .entry("required")
            .or_insert_with(|| serde_json::json!([]))
            .as_array_mut()
            .expect("a list");
        if !required.iter().any(|r| r == name) {
            required.push(name.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use netprobe_common::{AF_INET, IPPROTO_TCP, RawEvent, kind};

    use super::*;
    use crate::events;

    /// The published schema describes every field the recorded lab streams contain.
    #[test]
    fn schema_covers_every_field_of_recorded_events() {
        let schemas = json_schemas();
        let props = |key: &str| -> Vec<String> {
            schemas[key]["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        };
        let event_props = props(crate::events::SCHEMA);
        for f in [
            "schema",
            "kind",
            "src",
            "dport",
            "drop",
            "netfilter",
            "source",
            "destination",
        ] {
            assert!(
                event_props.contains(&f.to_string()),
                "{f} in {event_props:?}"
            );
        }
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/verdict/fixtures");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                for k in v.as_object().unwrap().keys() {
                    assert!(event_props.contains(k), "field {k} missing from the schema");
                }
                checked += 1;
            }
        }
        assert!(checked > 20);
        let verdict_props = props(crate::verdict::SCHEMA);
        for f in [
            "outcome",
            "client",
            "server",
            "timeline",
            "explanation",
            "netfilter",
            "listeners",
        ] {
            assert!(
                verdict_props.contains(&f.to_string()),
                "{f} in {verdict_props:?}"
            );
        }
    }

    #[test]
    fn json_is_one_line_per_event() {
        let raw = RawEvent {
            kind: kind::TC_EGRESS,
            family: AF_INET,
            proto: IPPROTO_TCP,
            ..Default::default()
        };
        let e = events::base(&raw, 0).unwrap();
        let mut buf = Vec::new();
        NdjsonSink::output(&mut buf, Show::Events)
            .event(&e)
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text.lines().count(), 1);
        let back: events::Event = serde_json::from_str(text.trim()).unwrap();
        // As written, with the time the writer adds (#17).
        let stamped = Event {
            observed: Observed {
                time: Some(rfc3339(0)),
                node: None,
            },
            ..e
        };
        assert_eq!(back, stamped);
    }

    fn drop_event(time_ns: u64) -> Event {
        let raw = RawEvent {
            kind: kind::DROP,
            family: AF_INET,
            proto: IPPROTO_TCP,
            ..Default::default()
        };
        events::base(&raw, time_ns).unwrap()
    }

    fn lines(buf: &[u8]) -> Vec<serde_json::Value> {
        std::str::from_utf8(buf)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Every record kind a log pipeline sees (event, verdict, summary, suppressed count) has
    /// its own schema id, `node`, `time_ns` and `time` = `time_ns` in RFC 3339, and matches
    /// the published schema (which requires the three).
    #[test]
    fn every_record_says_where_and_when_and_matches_its_own_schema() {
        let mut buf = Vec::new();
        let mut sink = NdjsonSink::output(&mut buf, Show::Verdicts).on_node("node-a");
        let v = crate::verdict::classify(
            &[],
            ("10.42.0.5".parse().unwrap(), 40000),
            &Default::default(),
            &Default::default(),
        );
        sink.verdict(&v).unwrap();
        sink.finish(&Summary::new()).unwrap();
        let mut log = super::super::storm::StormControlledLog::new(&mut buf, 1)
            .with_raw_events(true)
            .on_node("node-a");
        log.event(&drop_event(1_764_669_013_123_456_789)).unwrap();
        log.event(&drop_event(1_764_669_013_223_456_789)).unwrap();
        log.finish(&Summary::new()).unwrap();

        let records = lines(&buf);
        let ids: Vec<&str> = records
            .iter()
            .map(|r| r["schema"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            [
                crate::verdict::SCHEMA,
                super::super::SUMMARY_SCHEMA,
                crate::events::SCHEMA,
                super::super::storm::SUPPRESSED_SCHEMA
            ]
        );
        let schemas = json_schemas();
        for r in &records {
            assert_eq!(r["node"], "node-a", "{r}");
            let ns = r["time_ns"].as_u64().unwrap();
            assert_eq!(r["time"].as_str().unwrap(), rfc3339(ns), "{r}");
            let parsed = DateTime::parse_from_rfc3339(r["time"].as_str().unwrap()).unwrap();
            assert_eq!(parsed.timestamp_nanos_opt(), Some(ns as i64));
            let schema = &schemas[r["schema"].as_str().unwrap()];
            let validator = jsonschema::validator_for(schema).unwrap();
            let errors: Vec<String> = validator.iter_errors(r).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{r}: {errors:?}");
            let mut without = r.clone();
            without.as_object_mut().unwrap().remove("node");
            assert!(!validator.is_valid(&without), "node is required: {r}");
        }
        // An event's time is the kernel's, not the write's.
        assert_eq!(records[2]["time"], "2025-12-02T09:50:13.123456789Z");
    }

    /// A record relayed from another node (cluster mode: parsed into its type, printed on the
    /// laptop) keeps that node's name and time; the writer adds nothing twice.
    #[test]
    fn a_relayed_record_keeps_the_node_that_observed_it() {
        let mut buf = Vec::new();
        let mut node_side = Ndjson::new(&mut buf).on_node("node-b");
        node_side.write(&drop_event(5_000_000_000)).unwrap();
        let line = String::from_utf8(buf).unwrap();
        let relayed: Event = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(relayed.observed.node.as_deref(), Some("node-b"));

        let mut buf = Vec::new();
        let mut laptop = Ndjson::new(&mut buf).on_node("laptop");
        laptop.write(&relayed).unwrap();
        let printed = String::from_utf8(buf).unwrap();
        assert_eq!(printed, line, "printed as the node wrote it");
        assert_eq!(printed.matches("\"node\"").count(), 1);
        assert_eq!(printed.matches("\"time\"").count(), 1);
        let v: serde_json::Value = serde_json::from_str(printed.trim()).unwrap();
        assert_eq!(v["time"], "1970-01-01T00:00:05.000000000Z");
    }

    #[test]
    fn a_trace_without_a_node_name_is_stamped_with_the_host_name() {
        assert_eq!(observing_node(Some("node-a")), "node-a");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(observing_node(None), host.trim());
        assert_eq!(observing_node(Some("")), host.trim());
    }
}
