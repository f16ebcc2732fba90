//! NDJSON: one JSON object per line, each carrying its `schema`. The one writer every JSON
//! output goes through (`trace -o json`, `--record`, the agent's log, cluster-mode frames), and
//! the JSON Schemas of what it writes.

use std::io::{self, Write};

use serde::Serialize;

use super::{Show, Sink};
use crate::{events::Event, sinks::Summary, verdict::Verdict};

/// Writes records, one per line. Flushing is the caller's choice (per record for a person
/// watching, per batch for the agent).
pub struct Ndjson<W: Write> {
    out: W,
}

impl<W: Write> Ndjson<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }

    pub fn write(&mut self, record: &impl Serialize) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, record).map_err(io::Error::from)?;
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
/// record carries.
pub fn json_schemas() -> serde_json::Value {
    serde_json::json!({
        crate::events::SCHEMA: schemars::schema_for!(Event),
        crate::verdict::SCHEMA: schemars::schema_for!(Verdict),
        super::SUMMARY_SCHEMA: schemars::schema_for!(Summary),
        super::storm::SUPPRESSED_SCHEMA: schemars::schema_for!(super::storm::Suppressed),
    })
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
        assert_eq!(back, e);
    }
}
