//! Sinks: where a session's results go. Every sink sees every event and every verdict and keeps
//! what it is for: the text printer, NDJSON (trace `-o json`, `--record`, the agent's log with
//! storm control), Prometheus counters, Kubernetes Events. A new sink is one new module that
//! implements [`Sink`]; the session and the other sinks do not change.

pub mod kube_events;
pub mod ndjson;
pub mod prometheus;
pub mod storm;
pub mod text;
pub mod trace_status;

use std::io;

use std::collections::BTreeMap;

use crate::{events::Event, verdict::Verdict};

/// One consumer of a session's output. Every method has a default that ignores its input, so a
/// sink implements only what it uses. An `Err` is an output that is gone (e.g. stdout closed):
/// the session stops.
pub trait Sink {
    /// An event that passed the sources and the enrichment.
    fn event(&mut self, _e: &Event) -> io::Result<()> {
        Ok(())
    }

    /// A verdict, already annotated with names.
    fn verdict(&mut self, _v: &Verdict) -> io::Result<()> {
        Ok(())
    }

    /// Called on every housekeeping tick (e.g. to report what a storm suppressed).
    fn tick(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// After each batch of input: flush what is buffered.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// The end of the session.
    fn finish(&mut self, _summary: &Summary) -> io::Result<()> {
        Ok(())
    }
}

/// Every sink of a session, fed in order.
#[derive(Default)]
pub struct Sinks<'a> {
    sinks: Vec<Box<dyn Sink + 'a>>,
}

impl<'a> Sinks<'a> {
    pub fn with(mut self, sink: impl Sink + 'a) -> Self {
        self.sinks.push(Box::new(sink));
        self
    }

    fn each(&mut self, mut f: impl FnMut(&mut dyn Sink) -> io::Result<()>) -> io::Result<()> {
        // Every sink gets its input even when an earlier one failed; the first error is kept.
        let mut first = Ok(());
        for s in &mut self.sinks {
            if let Err(e) = f(s.as_mut())
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }
}

impl Sink for Sinks<'_> {
    fn event(&mut self, e: &Event) -> io::Result<()> {
        self.each(|s| s.event(e))
    }

    fn verdict(&mut self, v: &Verdict) -> io::Result<()> {
        self.each(|s| s.verdict(v))
    }

    fn tick(&mut self) -> io::Result<()> {
        self.each(|s| s.tick())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.each(|s| s.flush())
    }

    fn finish(&mut self, summary: &Summary) -> io::Result<()> {
        self.each(|s| s.finish(summary))
    }
}

pub const SUMMARY_SCHEMA: &str = "netprobe.summary/v1";

/// Printed once when a trace ends: what was delivered and what was lost.
#[derive(
    Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct Summary {
    /// `netprobe.summary/v1`.
    #[serde(deserialize_with = "summary_tag")]
    pub schema: Tag,
    /// Always `summary`.
    #[serde(deserialize_with = "summary_tag")]
    pub kind: Tag,
    pub events: u64,
    /// Events the kernel could not queue (ring buffer full): counted, never silent.
    pub lost: u64,
    /// nftables trace messages lost: the socket overflowed, or netprobe's queue was full (rule
    /// attributions may be missing).
    pub netfilter_trace_overruns: u64,
    pub malformed: u64,
    /// Things the operator should know about the node (e.g. mixed iptables backends).
    pub warnings: Vec<String>,
    /// Drops that matched the filter, by reason, counted in the kernel.
    pub drops_matched: BTreeMap<String, u64>,
    pub interfaces: Vec<String>,
    /// Connection attempts judged, and how many of them failed.
    pub attempts: u64,
    pub failed: u64,
    /// `time_ns` (when it was written), `time` (RFC 3339) and `node`: added by the NDJSON
    /// writer.
    #[serde(flatten)]
    pub written: crate::model::Written,
}

impl Summary {
    pub fn new() -> Self {
        Self {
            schema: SUMMARY_SCHEMA,
            kind: "summary",
            ..Self::default()
        }
    }
}

/// A constant tag. (Named: serde borrows a field spelled `&str` from its input; this one is read
/// by [`summary_tag`].)
pub type Tag = &'static str;

/// A summary's constant tags, read back (cluster mode relays a node's summary).
fn summary_tag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    let tag = <String as serde::Deserialize>::deserialize(d)?;
    [SUMMARY_SCHEMA, "summary"]
        .into_iter()
        .find(|t| *t == tag)
        .ok_or_else(|| serde::de::Error::custom(format!("not a summary tag: `{tag}`")))
}

/// How a person asked to see the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// What a printing sink shows: every event, or one verdict per attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Events,
    Verdicts,
}

/// Records that arrive already made (cluster mode relays them from the nodes' traces), printed
/// as the local sinks would print them.
pub struct Printer<W: io::Write> {
    out: W,
    format: Format,
}

impl<W: io::Write> Printer<W> {
    pub fn new(out: W, format: Format) -> Self {
        Self { out, format }
    }

    pub fn verdict(&mut self, v: &Verdict) -> io::Result<()> {
        match self.format {
            Format::Json => ndjson::Ndjson::new(&mut self.out).write(v)?,
            Format::Text => write!(self.out, "{}", text::verdict_text(v))?,
        }
        self.out.flush()
    }

    pub fn event(&mut self, e: &Event) -> io::Result<()> {
        match self.format {
            Format::Json => ndjson::Ndjson::new(&mut self.out).write(e)?,
            Format::Text => writeln!(self.out, "{}", text::text_line(e))?,
        }
        self.out.flush()
    }

    pub fn summary(&mut self, s: &Summary) -> io::Result<()> {
        match self.format {
            Format::Json => ndjson::Ndjson::new(&mut self.out).write(s)?,
            Format::Text => writeln!(self.out, "{}", text::summary_text(s))?,
        }
        self.out.flush()
    }

    /// A line as it is (a record relayed from another node's trace).
    pub fn raw_line(&mut self, line: &str) -> io::Result<()> {
        writeln!(self.out, "{line}")?;
        self.out.flush()
    }
}
