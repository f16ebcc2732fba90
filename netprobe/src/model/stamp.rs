//! Where and when a record was observed: the fields every NDJSON record carries besides its
//! own (`sinks::ndjson` adds them when it writes a record).

use serde::{Deserialize, Serialize};

/// Where and when a record was observed: RFC 3339 time and node. Absent in a record made here
/// until the NDJSON writer adds them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Observed {
    /// `time_ns` as an RFC 3339 timestamp (UTC, nanoseconds), e.g.
    /// `2026-12-02T09:50:13.123456789Z`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// The node whose netprobe observed it: the agent's `NODE_NAME`; a trace's
    /// `--node-name`/`NODE_NAME`, else the host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// [`Observed`] of a record without a time of its own (verdicts, summaries, suppressed
/// counts): `time_ns` is when it was written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Written {
    /// Nanoseconds since the Unix epoch when the record was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ns: Option<u64>,
    #[serde(flatten)]
    pub observed: Observed,
}
