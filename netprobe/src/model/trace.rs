//! The `Trace` custom resource (`traces.netprobe.io`, `v1alpha1`): a trace as a Kubernetes
//! object, so that who may trace what is the API server's RBAC and audit.
//!
//! Who writes what: a person (`kubectl netprobe trace`, or `kubectl apply` of a hand-written
//! object) writes `spec` and `metadata`; the agent of the node the pod runs on writes `status`
//! through the status subresource, and nothing else. A spec write never changes status and a
//! status write never changes spec (the API server keeps them apart).
//!
//! The bounds below are those of the object, not of the trace: a trace may see more verdicts
//! and events than a status keeps; [`TraceStatus::push_verdict`] and
//! [`TraceStatus::push_event`] keep the first ones and count the rest.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{events::Event, model::Outcome, sinks::Summary, verdict::Verdict};

/// The API group of netprobe's custom resources.
pub const GROUP: &str = "netprobe.io";
/// The version of the `Trace` resource.
pub const VERSION: &str = "v1alpha1";
/// `spec.duration` when unset.
pub const DEFAULT_DURATION: &str = "30s";
/// The longest `spec.duration`.
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// `spec.ttlSecondsAfterFinished` when unset: a finished Trace is removed after an hour.
pub const DEFAULT_TTL_SECONDS: u32 = 3600;
/// Verdicts a status keeps; the rest are counted in `verdictsDropped`.
pub const MAX_VERDICTS: usize = 100;
/// Raw events a status keeps (when `spec.events`); the rest are counted in `eventsDropped`.
pub const MAX_EVENTS: usize = 1000;

/// The key of the Trace object's schema in `netprobe schema`.
pub const SCHEMA_KEY: &str = "netprobe.io/v1alpha1/Trace";

/// The schema the API server admits a Trace with (the CRD's `openAPIV3Schema`).
pub fn object_schema() -> serde_json::Value {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(Trace::crd()).expect("a CRD is JSON");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// A pod name: a DNS-1123 subdomain (what the API server accepts as a pod's name).
pub const POD_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A duration of 1s to 10m, in the Kubernetes (Go) form: `45s`, `2m`, `1m30s`, `600s`.
pub const DURATION_PATTERN: &str =
    r"^(([1-9]|[1-9][0-9]|[1-5][0-9][0-9]|600)s|([1-9]|10)m|[1-9]m([0-9]|[1-5][0-9])s)$";

/// What to trace: one pod's connections to or from a port, or its DNS lookups.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "netprobe.io",
    version = "v1alpha1",
    kind = "Trace",
    plural = "traces",
    singular = "trace",
    namespaced,
    status = "TraceStatus",
    derive = "PartialEq",
    doc = "A trace of one pod's connections (or DNS lookups), answered by the netprobe agent of the pod's node in the object's status.",
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.pod"}"#,
    printcolumn = r#"{"name":"Port","type":"integer","jsonPath":".spec.port"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Outcome","type":"string","jsonPath":".status.outcome"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = signed_formats)]
pub struct TraceSpec {
    /// The pod to trace, in the Trace's own namespace.
    #[schemars(length(min = 1, max = 253), pattern(POD_NAME_PATTERN))]
    pub pod: String,
    /// The port of the connections to trace (the pod's own or a peer's). Exactly one of
    /// `port` and `dns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// The protocol of `port`.
    #[serde(default, skip_serializing_if = "TraceProtocol::is_tcp")]
    pub protocol: TraceProtocol,
    /// Trace the pod's DNS lookups instead of a port.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dns: bool,
    /// How long to trace: 1s to 10m, e.g. `30s`, `2m`, `1m30s`.
    #[serde(default = "default_duration")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub duration: String,
    /// Keep the raw timeline (`netprobe.event/v1` records) in `status.events`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub events: bool,
    /// Seconds a finished Trace is kept before it is removed.
    #[serde(default = "default_ttl")]
    pub ttl_seconds_after_finished: u32,
}

fn default_duration() -> String {
    DEFAULT_DURATION.into()
}

fn default_ttl() -> u32 {
    DEFAULT_TTL_SECONDS
}

/// The transport protocol of `spec.port`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TraceProtocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl TraceProtocol {
    fn is_tcp(&self) -> bool {
        *self == Self::Tcp
    }
}

/// What a valid spec asks to trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceTarget {
    Port { port: u16, protocol: TraceProtocol },
    Dns,
}

/// Why a spec cannot be traced (the agent writes it as a Failed status' message). The CRD's
/// schema rejects most of these at admission; a cluster without the schema still gets them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("spec.port and spec.dns: set exactly one of them")]
    PortOrDns,
    #[error("spec.port: 0 is not a port (1-65535)")]
    PortZero,
    #[error("spec.protocol: only a port's protocol; a DNS trace is UDP")]
    ProtocolWithDns,
    #[error("spec.duration: `{0}` is not a duration (like 30s, 2m, 1m30s)")]
    Duration(String),
    #[error("spec.duration: {0} is longer than the 10m a trace may last")]
    TooLong(String),
    #[error("spec.pod: `{0}` is not a pod name (DNS-1123 subdomain)")]
    PodName(String),
}

impl TraceSpec {
    /// A spec tracing `port` (TCP) of `pod`, with the defaults.
    pub fn port(pod: impl Into<String>, port: u16) -> Self {
        Self {
            pod: pod.into(),
            port: Some(port),
            protocol: TraceProtocol::Tcp,
            dns: false,
            duration: default_duration(),
            events: false,
            ttl_seconds_after_finished: DEFAULT_TTL_SECONDS,
        }
    }

    /// What to trace, or why this spec cannot be traced.
    pub fn target(&self) -> Result<TraceTarget, SpecError> {
        if !valid_pod_name(&self.pod) {
            return Err(SpecError::PodName(self.pod.clone()));
        }
        match (self.port, self.dns) {
            (Some(0), false) => Err(SpecError::PortZero),
            (Some(port), false) => Ok(TraceTarget::Port {
                port,
                protocol: self.protocol,
            }),
            (None, true) if self.protocol == TraceProtocol::Udp => Err(SpecError::ProtocolWithDns),
            (None, true) => Ok(TraceTarget::Dns),
            _ => Err(SpecError::PortOrDns),
        }
    }

    /// How long to trace.
    pub fn duration(&self) -> Result<Duration, SpecError> {
        let d = parse_duration(&self.duration)
            .ok_or_else(|| SpecError::Duration(self.duration.clone()))?;
        if d > MAX_DURATION {
            return Err(SpecError::TooLong(self.duration.clone()));
        }
        Ok(d)
    }
}

/// A Kubernetes (Go `time.ParseDuration`) duration of whole units: `90s`, `2m`, `1h`, `1m30s`,
/// `500ms`. None: not one, or zero.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return None,
        };
        total = total.checked_add(unit.checked_mul(u32::try_from(n).ok()?)?)?;
        rest = &rest[unit_len..];
    }
    (!total.is_zero()).then_some(total)
}

fn valid_pod_name(name: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok)
}

/// Where a Trace is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TracePhase {
    /// Not started yet (no agent has taken it, or the node runs as many as it may).
    #[default]
    Pending,
    Running,
    /// Ran for its duration.
    Completed,
    /// Could not run, or stopped early: `message` says why.
    Failed,
}

impl TracePhase {
    /// Completed or Failed: nothing will change any more.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }
}

/// What the agent found, written only by the agent (status subresource).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = signed_formats)]
pub struct TraceStatus {
    #[serde(default)]
    pub phase: TracePhase,
    /// The node whose agent runs the trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Why it is Pending or Failed, or a note about a finished trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "date_time")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "date_time")]
    pub completion_time: Option<Time>,
    /// The outcome of the latest failed verdict, else of the latest verdict (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "outcome_name")]
    pub outcome: Option<Outcome>,
    /// The first verdicts (`netprobe.verdict/v1`, as `netprobe trace -o json` prints them), in
    /// the order they were reached; at most [`MAX_VERDICTS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "verdict_records")]
    pub verdicts: Vec<Verdict>,
    /// Verdicts reached after `verdicts` was full.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub verdicts_dropped: u64,
    /// What was delivered and lost (`netprobe.summary/v1`), once the trace ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "summary_record")]
    pub summary: Option<Summary>,
    /// The raw timeline (`netprobe.event/v1`) when `spec.events`; at most [`MAX_EVENTS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "event_records")]
    pub events: Vec<Event>,
    /// Events seen after `events` was full.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub events_dropped: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl TraceStatus {
    /// Keeps `v` if fewer than [`MAX_VERDICTS`] are kept, else counts it in
    /// `verdicts_dropped`; either way `outcome` follows it. True if kept.
    pub fn push_verdict(&mut self, v: Verdict) -> bool {
        let failed = self
            .outcome
            .is_some_and(|o| o.is_failure() && !v.outcome.is_failure());
        if !failed {
            self.outcome = Some(v.outcome);
        }
        push_bounded(
            &mut self.verdicts,
            &mut self.verdicts_dropped,
            MAX_VERDICTS,
            v,
        )
    }

    /// Keeps `e` if fewer than [`MAX_EVENTS`] are kept, else counts it in `events_dropped`.
    /// True if kept.
    pub fn push_event(&mut self, e: Event) -> bool {
        push_bounded(&mut self.events, &mut self.events_dropped, MAX_EVENTS, e)
    }
}

fn push_bounded<T>(kept: &mut Vec<T>, dropped: &mut u64, bound: usize, item: T) -> bool {
    if kept.len() < bound {
        kept.push(item);
        true
    } else {
        *dropped += 1;
        false
    }
}

impl Trace {
    /// The phase (Pending when no agent wrote a status yet).
    pub fn phase(&self) -> TracePhase {
        self.status
            .as_ref()
            .map_or_else(TracePhase::default, |s| s.phase)
    }
}

// Schemas of the status' nested records. The API server needs a structural schema, which the
// verdict's (untagged variants, flattened stamps) is not; they are objects it keeps as they
// are, and `netprobe schema` publishes their own schemas.

/// Integer formats as the API server knows them (`int32`, `int64`; it warns "unrecognized
/// format" on Rust's `uint16`, `uint32`, `uint64`), the unsigned bounds kept as bounds.
fn signed_formats(schema: &mut schemars::Schema) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    let (format, max) = match obj.get("format").and_then(|f| f.as_str()) {
        Some("uint8") => ("int32", u64::from(u8::MAX)),
        Some("uint16") => ("int32", u64::from(u16::MAX)),
        Some("uint32") => ("int64", u64::from(u32::MAX)),
        // int64 bounds it already.
        Some("uint64" | "uint") => ("int64", 0),
        _ => ("", 0),
    };
    if !format.is_empty() {
        obj.insert("format".into(), format.into());
        obj.entry("minimum").or_insert(0.into());
        if max > 0 {
            obj.entry("maximum").or_insert(max.into());
        }
    }
    for key in ["properties", "items"] {
        match obj.get_mut(key) {
            Some(serde_json::Value::Object(m)) if key == "properties" => {
                for v in m.values_mut() {
                    if let Ok(s) = <&mut schemars::Schema>::try_from(v) {
                        signed_formats(s);
                    }
                }
            }
            Some(v) if key == "items" => {
                if let Ok(s) = <&mut schemars::Schema>::try_from(v) {
                    signed_formats(s);
                }
            }
            _ => {}
        }
    }
}

fn date_time(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "format": "date-time", "nullable": true})
}

fn outcome_name(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "nullable": true,
        "description": "A verdict's outcome (netprobe.verdict/v1 `outcome`): the latest failed one, else the latest.",
    })
}

fn records(description: &str) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "description": description,
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
    })
}

fn verdict_records(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    records("netprobe.verdict/v1 records (see `netprobe schema`).")
}

fn event_records(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    records("netprobe.event/v1 records (see `netprobe schema`).")
}

fn summary_record(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "description": "A netprobe.summary/v1 record (see `netprobe schema`).",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

#[cfg(test)]
mod tests {
    use kube::{CustomResourceExt, Resource};

    use super::*;

    fn verdict(outcome: Outcome) -> Verdict {
        let mut v = crate::verdict::classify(
            &[],
            ("10.42.0.5".parse().unwrap(), 40000),
            &Default::default(),
            &Default::default(),
        );
        v.outcome = outcome;
        v
    }

    #[test]
    fn verdicts_past_the_bound_are_counted_not_kept() {
        let mut s = TraceStatus::default();
        for i in 0..MAX_VERDICTS + 7 {
            let kept = s.push_verdict(verdict(Outcome::Connected));
            assert_eq!(kept, i < MAX_VERDICTS);
        }
        assert_eq!(s.verdicts.len(), MAX_VERDICTS);
        assert_eq!(s.verdicts_dropped, 7);
        assert_eq!(s.outcome, Some(Outcome::Connected));
        // A failure past the bound still shows in the outcome, and a later success does not
        // hide it.
        s.push_verdict(verdict(Outcome::DroppedByRule));
        s.push_verdict(verdict(Outcome::Connected));
        assert_eq!(s.outcome, Some(Outcome::DroppedByRule));
        assert_eq!(s.verdicts_dropped, 9);
    }

    #[test]
    fn events_past_the_bound_are_counted_not_kept() {
        let raw = netprobe_common::RawEvent {
            kind: netprobe_common::kind::DROP,
            family: netprobe_common::AF_INET,
            proto: netprobe_common::IPPROTO_TCP,
            ..Default::default()
        };
        let e = crate::events::base(&raw, 1).unwrap();
        let mut s = TraceStatus::default();
        for _ in 0..MAX_EVENTS + 3 {
            s.push_event(e.clone());
        }
        assert_eq!((s.events.len(), s.events_dropped), (MAX_EVENTS, 3));
    }

    #[test]
    fn a_minimal_object_gets_the_defaults_and_a_valid_target() {
        let t: Trace = serde_json::from_value(serde_json::json!({
            "apiVersion": "netprobe.io/v1alpha1", "kind": "Trace",
            "metadata": {"name": "t", "namespace": "team-a"},
            "spec": {"pod": "web-0", "port": 8080},
        }))
        .unwrap();
        assert_eq!(t.spec, TraceSpec::port("web-0", 8080));
        assert_eq!(t.spec.duration(), Ok(Duration::from_secs(30)));
        assert_eq!(t.spec.ttl_seconds_after_finished, 3600);
        assert_eq!(t.phase(), TracePhase::Pending);
        assert_eq!(
            t.spec.target(),
            Ok(TraceTarget::Port {
                port: 8080,
                protocol: TraceProtocol::Tcp
            })
        );
        let out = serde_json::to_value(&t).unwrap();
        assert_eq!(
            out["spec"],
            serde_json::json!({"pod": "web-0", "port": 8080, "duration": "30s", "ttlSecondsAfterFinished": 3600})
        );
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let mut s = TraceSpec::port("web-0", 53);
        s.dns = true;
        assert_eq!(s.target(), Err(SpecError::PortOrDns));
        s.port = None;
        assert_eq!(s.target(), Ok(TraceTarget::Dns));
        s.dns = false;
        assert_eq!(s.target(), Err(SpecError::PortOrDns));
        let s = TraceSpec::port("Web_0", 80);
        assert_eq!(s.target(), Err(SpecError::PodName("Web_0".into())));
        let mut s = TraceSpec::port("web-0", 80);
        s.duration = "11m".into();
        assert_eq!(s.duration(), Err(SpecError::TooLong("11m".into())));
        s.duration = "soon".into();
        assert_eq!(s.duration(), Err(SpecError::Duration("soon".into())));
    }

    #[test]
    fn durations_parse_as_kubernetes_writes_them() {
        let secs = |s: &str| parse_duration(s).map(|d| d.as_secs_f64());
        assert_eq!(secs("30s"), Some(30.0));
        assert_eq!(secs("2m"), Some(120.0));
        assert_eq!(secs("1m30s"), Some(90.0));
        assert_eq!(secs("1h"), Some(3600.0));
        assert_eq!(secs("500ms"), Some(0.5));
        for bad in ["", "0s", "30", "s", "1.5m", "-1s", "1d", "1m 30s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    /// The admission pattern accepts exactly the durations from 1s to 10m in the forms it
    /// lists, and what it accepts parses to the same duration.
    #[test]
    fn the_duration_pattern_is_the_ten_minute_bound() {
        let re = regex_lite(DURATION_PATTERN);
        for ok in [
            "1s", "30s", "59s", "60s", "600s", "1m", "2m", "10m", "1m30s", "9m59s",
        ] {
            assert!(re(ok), "{ok}");
            assert!(parse_duration(ok).unwrap() <= MAX_DURATION, "{ok}");
        }
        for bad in [
            "0s", "601s", "11m", "10m1s", "1h", "030s", "1m60s", "30", "1m5",
        ] {
            assert!(!re(bad), "{bad}");
        }
    }

    /// Matches `pattern` the way the API server does (RE2; this one is plain enough for the
    /// jsonschema crate's ECMA engine).
    fn regex_lite(pattern: &str) -> impl Fn(&str) -> bool {
        let v =
            jsonschema::validator_for(&serde_json::json!({"type": "string", "pattern": pattern}))
                .unwrap();
        move |s| v.is_valid(&serde_json::json!(s))
    }

    #[test]
    fn the_crd_is_namespaced_with_a_status_subresource_and_printer_columns() {
        let crd = serde_json::to_value(Trace::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "traces.netprobe.io");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["name"], VERSION);
        assert_eq!(v["subresources"]["status"], serde_json::json!({}));
        let columns: Vec<&str> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Pod", "Port", "Phase", "Outcome", "Age"]);
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(spec["port"]["minimum"].as_f64(), Some(1.0));
        assert_eq!(spec["port"]["maximum"].as_f64(), Some(65535.0));
        assert_eq!(spec["duration"]["pattern"], DURATION_PATTERN);
        assert_eq!(spec["duration"]["default"], DEFAULT_DURATION);
        assert_eq!(spec["pod"]["pattern"], POD_NAME_PATTERN);
        assert_eq!(Trace::group(&()), GROUP);
        structural(&v["schema"]["openAPIV3Schema"], "");
        // `netprobe schema` publishes it.
        assert_eq!(
            crate::json_schemas()[SCHEMA_KEY],
            v["schema"]["openAPIV3Schema"]
        );
    }

    /// The API server refuses a CRD whose schema is not structural: every node typed (or kept
    /// as unknown fields), no `$ref`, no types under `anyOf`/`oneOf`/`allOf` (none used here),
    /// no `additionalProperties` beside `properties`.
    fn structural(s: &serde_json::Value, at: &str) {
        for k in [
            "$ref",
            "anyOf",
            "oneOf",
            "allOf",
            "not",
            "definitions",
            "$defs",
        ] {
            assert!(s.get(k).is_none(), "{k} at {at:?}: {s}");
        }
        let known = ["int32", "int64", "date-time"];
        assert!(
            s.get("format").is_none_or(|f| known.iter().any(|k| f == k)),
            "a format the API server does not know at {at:?}: {s}"
        );
        let open = s["x-kubernetes-preserve-unknown-fields"] == true;
        assert!(s["type"].is_string() || open, "untyped at {at:?}: {s}");
        assert!(
            s.get("properties").is_none() || s.get("additionalProperties").is_none(),
            "properties and additionalProperties at {at:?}"
        );
        for (k, p) in s["properties"].as_object().into_iter().flatten() {
            structural(p, &format!("{at}.{k}"));
        }
        if let Some(items) = s.get("items") {
            structural(items, &format!("{at}[]"));
        }
    }
}
