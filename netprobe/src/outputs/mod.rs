//! Printers: human text, or NDJSON (one object per line, see [`crate::events::SCHEMA`]).

use std::{collections::BTreeMap, io::Write};

use serde::{Deserialize, Serialize};

use crate::{
    events::{Event, Kind},
    verdict::Verdict,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Printed once when a trace ends: what was delivered and what was lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Summary {
    #[serde(deserialize_with = "summary_tag")]
    pub schema: Tag,
    #[serde(deserialize_with = "summary_tag")]
    pub kind: Tag,
    pub events: u64,
    /// Events the kernel could not queue (ring buffer full): counted, never silent.
    pub lost: u64,
    /// Times the nftables trace socket overflowed (rule attributions may be missing).
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
}

/// A constant tag. (Named: serde borrows a field spelled `&str` from its input; this one is read
/// by [`summary_tag`].)
pub type Tag = &'static str;

/// A summary's constant tags, read back (cluster mode relays a node's summary).
fn summary_tag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    let tag = String::deserialize(d)?;
    [crate::events::SCHEMA, "summary"]
        .into_iter()
        .find(|t| *t == tag)
        .ok_or_else(|| serde::de::Error::custom(format!("not a summary tag: `{tag}`")))
}

pub struct Printer<W: Write> {
    out: W,
    format: Format,
}

impl<W: Write> Printer<W> {
    pub fn new(out: W, format: Format) -> Self {
        Self { out, format }
    }

    pub fn event(&mut self, e: &Event) -> std::io::Result<()> {
        match self.format {
            Format::Json => {
                serde_json::to_writer(&mut self.out, e)?;
                writeln!(self.out)?;
            }
            Format::Text => writeln!(self.out, "{}", text_line(e))?,
        }
        self.out.flush()
    }

    pub fn verdict(&mut self, v: &Verdict) -> std::io::Result<()> {
        match self.format {
            Format::Json => {
                serde_json::to_writer(&mut self.out, v)?;
                writeln!(self.out)?;
            }
            Format::Text => write!(self.out, "{}", verdict_text(v))?,
        }
        self.out.flush()
    }

    /// A line as it is (a record relayed from another node's trace).
    pub fn raw_line(&mut self, line: &str) -> std::io::Result<()> {
        writeln!(self.out, "{line}")?;
        self.out.flush()
    }

    pub fn summary(&mut self, s: &Summary) -> std::io::Result<()> {
        match self.format {
            Format::Json => {
                serde_json::to_writer(&mut self.out, s)?;
                writeln!(self.out)?;
            }
            Format::Text => {
                write!(
                    self.out,
                    "-- {} events, {} attempts ({} failed)",
                    s.events, s.attempts, s.failed
                )?;
                if s.lost > 0 {
                    write!(self.out, ", {} LOST (ring buffer full)", s.lost)?;
                }
                if s.malformed > 0 {
                    write!(self.out, ", {} malformed", s.malformed)?;
                }
                if !s.drops_matched.is_empty() {
                    let d: Vec<String> = s
                        .drops_matched
                        .iter()
                        .map(|(r, n)| format!("{r}={n}"))
                        .collect();
                    write!(self.out, "; drops: {}", d.join(" "))?;
                }
                writeln!(self.out)?;
                for w in &s.warnings {
                    writeln!(self.out, "-- WARNING: {w}")?;
                }
            }
        }
        self.out.flush()
    }
}

/// JSON Schemas of everything `-o json` prints, keyed by the `schema` value each object carries
/// (summaries carry the event schema and `"kind": "summary"`).
pub fn json_schemas() -> serde_json::Value {
    serde_json::json!({
        crate::events::SCHEMA: schemars::schema_for!(Event),
        crate::verdict::SCHEMA: schemars::schema_for!(Verdict),
        "summary": schemars::schema_for!(Summary),
        "suppressed": schemars::schema_for!(crate::agent::Suppressed),
    })
}

fn hms(time_ns: u64) -> String {
    let secs = time_ns / 1_000_000_000;
    let micros = (time_ns % 1_000_000_000) / 1000;
    format!(
        "{:02}:{:02}:{:02}.{micros:06}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

fn endpoint(ip: &std::net::IpAddr, port: u16) -> String {
    match ip {
        std::net::IpAddr::V4(a) => format!("{a}:{port}"),
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// A verdict for a human: headline, who → whom, timeline, why, what next.
pub fn verdict_text(v: &Verdict) -> String {
    let mark = if v.outcome.is_failure() { "✗" } else { "✓" };
    let ep = |e: &crate::verdict::Endpoint| {
        let mut s = endpoint(&e.addr, e.port);
        if let Some(ns) = &e.netns {
            s.push_str(&format!(" [netns {ns}]"));
        }
        if let Some(p) = &e.process {
            s.push_str(&format!(" {p}"));
        }
        if let Some(peer) = e.peer.as_ref().filter(|p| p.is_known()) {
            s = format!("{} {s}", peer.describe());
        }
        s
    };
    let mut s = format!(
        "{mark} {}
  {} → {}",
        v.headline,
        ep(&v.client),
        ep(&v.server)
    );
    if let Some(d) = &v.dialed {
        s.push_str(&format!(" (dialled {})", endpoint(&d.addr, d.port)));
    }
    s.push('\n');
    if let Some(u) = &v.udp {
        let reply = match (u.replied, u.dns.as_ref().and_then(|d| d.rcode.as_deref())) {
            (true, Some(rcode)) => format!("reply {rcode}"),
            (true, None) => "a reply came back".to_string(),
            (false, _) => "no reply came back".to_string(),
        };
        match &u.dns {
            Some(d) => s.push_str(&format!(
                "  DNS {} (id {}), {} datagram(s), {reply}\n",
                d.describe(),
                d.id,
                u.requests
            )),
            None => s.push_str(&format!("  UDP, {} datagram(s), {reply}\n", u.requests)),
        }
    }
    // A joined cross-node timeline has one clock per node (the checkpoints' `node`).
    let mut t0 = std::collections::HashMap::new();
    for c in &v.timeline {
        let t0 = *t0.entry(c.node.as_deref()).or_insert(c.time_ns);
        let node = c
            .node
            .as_ref()
            .map(|n| format!("[{n}] "))
            .unwrap_or_default();
        s.push_str(&format!(
            "    +{:>9.3} ms  {node}{}\n",
            (c.time_ns.saturating_sub(t0)) as f64 / 1e6,
            c.what
        ));
    }
    s.push_str(&format!("  why: {}\n", v.explanation));
    if let Some(x) = &v.cross_node {
        let hop = |h: &Option<crate::verdict::Hop>| {
            h.as_ref()
                .map_or_else(|| "?".to_string(), |h| h.interface.clone())
        };
        s.push_str(&format!(
            "  path: {} (left via {}) → {}\n",
            x.client_node,
            hop(&x.left_via),
            if x.arrived {
                format!("{} (arrived via {})", x.server_node, hop(&x.arrived_via))
            } else {
                format!("never reached {}", x.server_node)
            }
        ));
    }
    if let Some(r) = &v.route {
        s.push_str(&format!("  route: {} {}\n", r.dst, r.describe()));
    }
    if let Some(nf) = &v.netfilter {
        s.push_str(&format!(
            "  rule: {} {} {} chain {} #{}: {}\n",
            nf.backend,
            nf.family,
            nf.table,
            nf.chain,
            nf.position
                .map_or_else(|| "policy".into(), |p| p.to_string()),
            nf.rule.as_deref().unwrap_or("(chain policy)")
        ));
    }
    if !v.listeners.is_empty() {
        let l: Vec<String> = v
            .listeners
            .iter()
            .map(crate::enrich::listeners::Listener::describe)
            .collect();
        s.push_str(&format!("  listening there: {}\n", l.join(", ")));
    }
    for n in &v.next_steps {
        s.push_str(&format!("  next: {n}\n"));
    }
    s
}

/// One line per event: time, what, where, the tuple, then the kind's details.
pub fn text_line(e: &Event) -> String {
    let what = match e.kind {
        Kind::Packet => format!("PKT {}", e.direction.as_deref().unwrap_or("?")),
        Kind::Drop => "DROP".into(),
        Kind::SendReset => "RST sent".into(),
        Kind::ReceiveReset => "RST recv".into(),
        Kind::Retransmit => "RETRANS".into(),
        Kind::StateChange => "STATE".into(),
        Kind::SocketError => "SOCK ERR".into(),
        Kind::Netfilter => "NETFILTER".into(),
        Kind::DnsFailure => "DNS FAIL".into(),
    };
    let mut s = format!("{} {what:<12}", hms(e.time_ns));
    let ns = e
        .netns
        .as_ref()
        .map(|n| n.name.clone().unwrap_or_else(|| n.inode.to_string()));
    s.push_str(&format!(" netns={}", ns.as_deref().unwrap_or("?")));
    if let Some(i) = &e.interface {
        s.push_str(&format!(
            " if={}",
            i.name.clone().unwrap_or_else(|| i.ifindex.to_string())
        ));
    }
    s.push_str(&format!(
        " {} {} > {}",
        e.protocol,
        endpoint(&e.src, e.sport),
        endpoint(&e.dst, e.dport)
    ));
    if !e.tcp_flags.is_empty() {
        s.push_str(&format!(" [{}]", e.tcp_flags.join(",")));
    }
    if let Some(d) = &e.drop {
        s.push_str(&format!(" reason={} at {}", d.reason, d.location));
    }
    if let Some(r) = &e.reset
        && let Some(reason) = &r.reason
    {
        s.push_str(&format!(" reason={reason}"));
    }
    if let Some(st) = &e.state {
        s.push_str(&format!(" {} -> {}", st.old, st.new));
    }
    if let Some(err) = &e.error {
        s.push_str(&format!(" {}", err.name));
    }
    if let Some(i) = &e.icmp {
        s.push_str(&format!(" icmp type={} code={}", i.icmp_type, i.code));
    }
    if let Some(d) = &e.dns {
        s.push_str(&format!(" dns id={} {}", d.id, d.summary()));
    }
    if let Some(f) = &e.dns_failure {
        s.push_str(&format!(" {}: {}", f.reason, f.explanation));
    }
    if let Some(nf) = &e.netfilter {
        s.push_str(&format!(
            " {} by {} {} {} chain {} rule {}: {} [{}] -> client sees {}; {}",
            nf.action,
            nf.backend,
            nf.family,
            nf.table,
            nf.chain,
            nf.position
                .map_or_else(|| "policy".to_string(), |p| p.to_string()),
            nf.rule.as_deref().unwrap_or("(chain policy)"),
            nf.comments.join("; "),
            nf.client_sees,
            nf.owner.explanation
        ));
    }
    if let Some(p) = &e.process {
        s.push_str(&format!(" pid={} comm={}", p.pid, p.comm));
    }
    for (label, peer) in [("src", &e.source), ("dst", &e.destination)] {
        if let Some(p) = peer.as_ref().filter(|p| p.is_known()) {
            s.push_str(&format!(" {label}={}", p.describe()));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use netprobe_common::{AF_INET, IPPROTO_TCP, RawEvent, kind, tcp_flags};

    use super::*;
    use crate::events::{self, DropInfo, Netns};

    #[test]
    fn text_line_names_reason_location_and_tuple() {
        let mut raw = RawEvent {
            kind: kind::DROP,
            family: AF_INET,
            proto: IPPROTO_TCP,
            sport: 40000,
            dport: 9500,
            tcp_flags: tcp_flags::SYN,
            ..Default::default()
        };
        raw.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        raw.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let mut e = events::base(&raw, 3_723_000_001_000).unwrap();
        e.netns = Some(Netns {
            inode: 1,
            name: Some("pod".into()),
        });
        e.drop = Some(DropInfo {
            reason: "NO_SOCKET".into(),
            reason_code: 3,
            location: "tcp_v4_rcv+0x99".into(),
        });
        let line = text_line(&e);
        assert!(line.starts_with("01:02:03.000001 DROP"), "{line}");
        assert!(line.contains("netns=pod tcp 127.0.0.1:40000 > 127.0.0.1:9500 [SYN] reason=NO_SOCKET at tcp_v4_rcv+0x99"), "{line}");
    }

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
        Printer::new(&mut buf, Format::Json).event(&e).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text.lines().count(), 1);
        let back: events::Event = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(back, e);
    }
}
