//! What the laptop and the agent say to each other: the trace request (a query string) and the
//! typed frames the agent streams back (NDJSON, one [`Frame`] a line, each with its own schema
//! id; the protocol version is the `/v1` of the ids).

use std::{net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{events::Event, sinks::Summary, verdict::Verdict};

/// The agent's HTTP path for trace requests.
pub const TRACE_PATH: &str = "/v1/trace";
/// The HTTP upgrade a client asks for to get a two-way stream (frames down, [`STOP`] up).
pub const UPGRADE: &str = "netprobe-trace/1";
/// Longest trace an agent runs for a remote client.
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// Default duration of a remote trace when the client gives none.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(60);
/// Label of the agent pods (deploy/).
pub const AGENT_LABEL: &str = "app.kubernetes.io/name=netprobe";
/// Sent by a client on an upgraded trace stream: end the trace now, but send its final verdicts.
pub const STOP: &[u8] = b"stop\n";
/// Where the node-side trace writes its ready mark: the pipe the agent hands it as fd 3.
pub const READY_FD: i32 = 3;

/// What a client asks an agent to trace; the node-side `netprobe trace` flags.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TraceRequest {
    pub port: u16,
    /// UDP (DNS at port 53) instead of TCP.
    pub udp: bool,
    /// NAMESPACE/NAME of the pod to trace.
    pub pod: String,
    pub addr: Option<IpAddr>,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub from_pod: Option<String>,
    pub events: bool,
    pub no_rule_trace: bool,
}

/// One record of the agent → client stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "schema")]
pub enum Frame {
    /// The node-side trace has attached every probe: traffic from now on is seen.
    #[serde(rename = "netprobe.cluster.ready/v1")]
    Ready {},
    #[serde(rename = "netprobe.cluster.verdict/v1")]
    Verdict { verdict: Box<Verdict> },
    /// `--events`: one kernel event.
    #[serde(rename = "netprobe.cluster.event/v1")]
    Event { event: Box<Event> },
    /// The trace's last record: what was delivered and lost.
    #[serde(rename = "netprobe.cluster.summary/v1")]
    Summary { summary: Box<Summary> },
    /// A line the node-side trace wrote for a human (its stderr).
    #[serde(rename = "netprobe.cluster.log/v1")]
    Log { line: String },
    /// Something went wrong on the agent's side of the trace.
    #[serde(rename = "netprobe.cluster.error/v1")]
    Error { message: String },
    /// The node-side trace ended with this exit code; nothing follows.
    #[serde(rename = "netprobe.cluster.exit/v1")]
    Exit { code: i32 },
}

impl Frame {
    /// The frame as one NDJSON line.
    pub fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("frames serialize");
        line.push(b'\n');
        line
    }

    pub fn parse(line: &str) -> serde_json::Result<Self> {
        serde_json::from_str(line.trim_end())
    }

    /// The typed frame of one line of `netprobe trace -o json` (parsed once, here).
    pub fn of_trace_record(line: &str) -> Self {
        Self::try_of_trace_record(line).unwrap_or_else(|e| Self::Error {
            message: format!("unreadable record from the trace ({e}): {line}"),
        })
    }

    fn try_of_trace_record(line: &str) -> serde_json::Result<Self> {
        let record: serde_json::Value = serde_json::from_str(line)?;
        let schema = record["schema"].as_str().unwrap_or_default().to_string();
        Ok(match (schema.as_str(), record["kind"].as_str()) {
            (crate::sinks::SUMMARY_SCHEMA, _) => Self::Summary {
                summary: serde_json::from_value(record)?,
            },
            (crate::verdict::SCHEMA, _) => Self::Verdict {
                verdict: serde_json::from_value(record)?,
            },
            (crate::events::SCHEMA, _) => Self::Event {
                event: serde_json::from_value(record)?,
            },
            _ => Self::Error {
                message: format!("unexpected record from the trace: {line}"),
            },
        })
    }
}

/// DNS-1123: starts and ends alphanumeric, so never read as a flag or a path.
pub(super) fn valid_name(s: &str) -> bool {
    s.len() <= 253
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
}

impl TraceRequest {
    pub fn to_query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("port", &self.port.to_string());
        q.append_pair("pod", &self.pod);
        if let Some(a) = self.addr {
            q.append_pair("addr", &a.to_string());
        }
        if let Some(d) = self.duration {
            q.append_pair("duration_ms", &d.as_millis().to_string());
        }
        if let Some(c) = self.count {
            q.append_pair("count", &c.to_string());
        }
        if let Some(f) = &self.from_pod {
            q.append_pair("from_pod", f);
        }
        for (flag, name) in [
            (self.events, "events"),
            (self.udp, "udp"),
            (self.no_rule_trace, "no_rule_trace"),
        ] {
            if flag {
                q.append_pair(name, "1");
            }
        }
        q.finish()
    }

    pub fn from_query(query: &str) -> Result<Self, String> {
        let mut r = Self::default();
        let mut port = None;
        let mut seen = std::collections::HashSet::new();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            if !seen.insert(k.clone()) {
                // Which of two values counts is a guess a proxy and the agent could make apart.
                return Err(format!("parameter `{k}` given twice"));
            }
            let bad = |what: &str| format!("invalid {what} `{v}`");
            match &*k {
                "port" => {
                    let p: u16 = v.parse().map_err(|_| bad("port"))?;
                    // Port 0 would mean every port to the kernel filter: never implicit.
                    if p == 0 {
                        return Err(
                            "`port=0` refused: it would trace every port; name the port (1-65535)"
                                .into(),
                        );
                    }
                    port = Some(p);
                }
                "pod" => r.pod = v.to_string(),
                "addr" => r.addr = Some(v.parse().map_err(|_| bad("addr"))?),
                "duration_ms" => {
                    let ms: u64 = v.parse().map_err(|_| bad("duration_ms"))?;
                    r.duration = Some(Duration::from_millis(ms));
                }
                "count" => r.count = Some(v.parse().map_err(|_| bad("count"))?),
                "from_pod" => r.from_pod = Some(v.to_string()),
                "events" => r.events = v == "1",
                "udp" => r.udp = v == "1",
                "no_rule_trace" => r.no_rule_trace = v == "1",
                other => return Err(format!("unknown parameter `{other}`")),
            }
        }
        r.port = port.ok_or("missing parameter `port`")?;
        match r.pod.split_once('/') {
            Some((ns, name)) if valid_name(ns) && valid_name(name) => {}
            _ => return Err(format!("`pod` must be NAMESPACE/NAME, got `{}`", r.pod)),
        }
        if let Some(f) = &r.from_pod
            && !f.split('/').all(valid_name)
        {
            return Err(format!("invalid from_pod `{f}`"));
        }
        Ok(r)
    }

    /// The node-side command line (after the executable): always `-o json`, read back into
    /// [`Frame`]s; readiness is written to [`READY_FD`].
    pub fn argv(&self) -> Vec<String> {
        let (ns, name) = self.pod.split_once('/').unwrap_or(("default", &self.pod));
        let duration = self.duration.unwrap_or(DEFAULT_DURATION).min(MAX_DURATION);
        let mut a: Vec<String> = vec![
            "trace".into(),
            "--port".into(),
            self.port.to_string(),
            "--proto".into(),
            if self.udp { "udp" } else { "tcp" }.into(),
            "--pod".into(),
            name.into(),
            "-n".into(),
            ns.into(),
            "--duration".into(),
            format!("{}ms", duration.as_millis()),
            "-o".into(),
            "json".into(),
            "--ready-file".into(),
            format!("/proc/self/fd/{READY_FD}"),
        ];
        if let Some(x) = self.addr {
            a.extend(["--addr".into(), x.to_string()]);
        }
        if let Some(c) = self.count {
            a.extend(["--count".into(), c.to_string()]);
        }
        if let Some(f) = &self.from_pod {
            a.extend(["--from-pod".into(), f.clone()]);
        }
        if self.events {
            a.push("--events".into());
        }
        if self.no_rule_trace {
            a.push("--no-rule-trace".into());
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_the_query() {
        let r = TraceRequest {
            port: 9500,
            udp: true,
            pod: "financial-ml/mlserver-0".into(),
            addr: Some("10.43.51.131".parse().unwrap()),
            duration: Some(Duration::from_millis(1500)),
            count: Some(1),
            from_pod: Some("financial-inference/client-0".into()),
            events: false,
            no_rule_trace: true,
        };
        assert_eq!(TraceRequest::from_query(&r.to_query()).unwrap(), r);
        let argv = r.argv().join(" ");
        assert!(
            argv.starts_with(
                "trace --port 9500 --proto udp --pod mlserver-0 -n financial-ml --duration 1500ms -o json --ready-file /proc/self/fd/3"
            ),
            "{argv}"
        );
        assert!(
            argv.ends_with("--count 1 --from-pod financial-inference/client-0 --no-rule-trace")
        );
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        assert!(
            TraceRequest::from_query("pod=a/b")
                .unwrap_err()
                .contains("port")
        );
        assert!(
            TraceRequest::from_query("port=1&pod=b")
                .unwrap_err()
                .contains("NAMESPACE/NAME")
        );
        // Names become argv: nothing that could be read as a flag or a path.
        assert!(TraceRequest::from_query("port=1&pod=a/--netns").is_err());
        assert!(TraceRequest::from_query("port=1&pod=a/b&from_pod=..%2Fx%20y").is_err());
        assert!(TraceRequest::from_query("port=1&pod=a/b&shell=1").is_err());
        assert!(TraceRequest::from_query("port=99999&pod=a/b").is_err());
        assert!(
            TraceRequest::from_query("port=0&pod=a/b")
                .unwrap_err()
                .contains("`port=0` refused: it would trace every port")
        );
        assert!(
            TraceRequest::from_query("port=1&pod=a/b&port=2")
                .unwrap_err()
                .contains("twice")
        );
    }

    #[test]
    fn durations_are_capped() {
        let mut r = TraceRequest::from_query("port=1&pod=a/b").unwrap();
        assert!(r.argv().contains(&"60000ms".to_string()));
        r.duration = Some(Duration::from_secs(86400));
        assert!(r.argv().contains(&"600000ms".to_string()));
    }

    fn verdict() -> Verdict {
        crate::verdict::classify(
            &[],
            ("10.42.0.5".parse().unwrap(), 40000),
            &Default::default(),
            &Default::default(),
        )
    }

    #[test]
    fn frames_round_trip_with_their_schema_ids() {
        let frames = [
            (Frame::Ready {}, "netprobe.cluster.ready/v1"),
            (
                Frame::Verdict {
                    verdict: Box::new(verdict()),
                },
                "netprobe.cluster.verdict/v1",
            ),
            (
                Frame::Log {
                    line: "tracing".into(),
                },
                "netprobe.cluster.log/v1",
            ),
            (
                Frame::Error {
                    message: "x".into(),
                },
                "netprobe.cluster.error/v1",
            ),
            (Frame::Exit { code: 1 }, "netprobe.cluster.exit/v1"),
        ];
        for (f, schema) in frames {
            let line = String::from_utf8(f.line()).unwrap();
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["schema"], schema, "{line}");
            assert_eq!(Frame::parse(&line).unwrap(), f);
        }
    }

    #[test]
    fn recorded_events_are_relayed_byte_identical() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/verdict/fixtures");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for line in text.lines() {
                let Frame::Event { event } = Frame::of_trace_record(line) else {
                    panic!("not an event: {line}");
                };
                let framed = String::from_utf8(Frame::Event { event }.line()).unwrap();
                let Ok(Frame::Event { event }) = Frame::parse(&framed) else {
                    panic!("{framed}");
                };
                assert_eq!(serde_json::to_string(&event).unwrap(), line);
                checked += 1;
            }
        }
        assert!(checked > 20);
    }

    #[test]
    fn trace_records_become_typed_frames() {
        let v = verdict();
        let line = serde_json::to_string(&v).unwrap();
        assert_eq!(
            Frame::of_trace_record(&line),
            Frame::Verdict {
                verdict: Box::new(v)
            }
        );
        let summary = r#"{"schema":"netprobe.summary/v1","kind":"summary","events":3,"lost":0,"netfilter_trace_overruns":0,"malformed":0,"warnings":[],"drops_matched":{"NO_SOCKET":1},"interfaces":["eth0"],"attempts":1,"failed":1}"#;
        let Frame::Summary { summary: s } = Frame::of_trace_record(summary) else {
            panic!("not a summary");
        };
        assert_eq!((s.events, s.attempts, s.failed), (3, 1, 1));
        // Relayed unchanged: the laptop prints the same summary the node printed.
        assert_eq!(serde_json::to_string(&s).unwrap(), summary);
        assert!(matches!(
            Frame::of_trace_record("not json"),
            Frame::Error { .. }
        ));
        assert!(matches!(
            Frame::of_trace_record(r#"{"schema":"other/v9"}"#),
            Frame::Error { .. }
        ));
    }
}
