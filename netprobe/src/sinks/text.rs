//! The human-readable sink: a block per verdict (headline, who → whom, timeline, why, what
//! next), or a line per event with `--events`, and a closing summary line.

use std::io::{self, Write};

use super::{Show, Sink};
use crate::{
    events::{Event, Kind},
    sinks::Summary,
    verdict::Verdict,
};

/// Text for a person at a terminal (or a log file).
pub struct TextSink<W: Write> {
    out: W,
    show: Show,
}

impl<W: Write> TextSink<W> {
    pub fn new(out: W, show: Show) -> Self {
        Self { out, show }
    }
}

impl<W: Write> Sink for TextSink<W> {
    fn event(&mut self, e: &Event) -> io::Result<()> {
        if self.show == Show::Events {
            writeln!(self.out, "{}", text_line(e))?;
            self.out.flush()?;
        }
        Ok(())
    }

    fn verdict(&mut self, v: &Verdict) -> io::Result<()> {
        if self.show == Show::Verdicts {
            write!(self.out, "{}", verdict_text(v))?;
            self.out.flush()?;
        }
        Ok(())
    }

    fn finish(&mut self, s: &Summary) -> io::Result<()> {
        writeln!(self.out, "{}", summary_text(s))?;
        self.out.flush()
    }
}

/// `-- 12 events, 1 attempts (1 failed); drops: …` and a line per warning.
pub fn summary_text(s: &Summary) -> String {
    let mut t = format!(
        "-- {} events, {} attempts ({} failed)",
        s.events, s.attempts, s.failed
    );
    if s.lost > 0 {
        t.push_str(&format!(", {} LOST (ring buffer full)", s.lost));
    }
    if s.malformed > 0 {
        t.push_str(&format!(", {} malformed", s.malformed));
    }
    if !s.drops_matched.is_empty() {
        let d: Vec<String> = s
            .drops_matched
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        t.push_str(&format!("; drops: {}", d.join(" ")));
    }
    for w in &s.warnings {
        t.push_str(&format!("\n-- WARNING: {w}"));
    }
    t
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
    let mark = if v.is_failure() { "✗" } else { "✓" };
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
    if let Some(a) = &v.after_handshake {
        s.push_str(&after_handshake_lines(a));
    }
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

/// What a connection showed after its handshake: the MSS announced, the segments sent again,
/// the drops, who reset it, the device of an MTU black hole.
fn after_handshake_lines(a: &crate::verdict::established::AfterHandshake) -> String {
    let mss = |m: Option<u16>| m.map_or_else(|| "?".to_string(), |m| m.to_string());
    let mut s = format!(
        "  handshake MSS: client {}, server {}\n",
        mss(a.mss.client),
        mss(a.mss.server)
    );
    if !a.retransmits.is_empty() {
        let r: Vec<String> = a
            .retransmits
            .iter()
            .map(|r| format!("seq {} ({} B)", r.seq, r.bytes))
            .collect();
        s.push_str(&format!(
            "  retransmitted after a timeout: {}\n",
            r.join(", ")
        ));
    }
    if let Some(n) = a.resent_total {
        s.push_str(&format!(
            "  segments resent over the connection's life (fast retransmits included): {n}\n"
        ));
    }
    for d in &a.drops {
        s.push_str(&format!(
            "  dropped: {} at {}{}{}\n",
            d.reason,
            d.location,
            d.bytes.map(|b| format!(", {b} bytes")).unwrap_or_default(),
            d.at.as_ref()
                .map(|h| format!(
                    " on {}{}",
                    h.interface,
                    h.netns
                        .as_ref()
                        .map(|n| format!(" in {n}"))
                        .unwrap_or_default()
                ))
                .unwrap_or_default()
        ));
    }
    if let Some(r) = a.reset_by {
        let by = match r {
            crate::verdict::established::ResetBy::Peer => "the peer",
            crate::verdict::established::ResetBy::Rule => "a netfilter rule on this node",
            crate::verdict::established::ResetBy::Kernel => "this node's kernel",
            crate::verdict::established::ResetBy::Client => "the client itself",
        };
        s.push_str(&format!("  reset sent by: {by}\n"));
    }
    s.push_str(&reset_lines(a));
    if let Some(m) = &a.mtu {
        s.push_str(&format!(
            "  MTU black hole: {} MTU {}, dropped sizes {:?}, ICMP frag-needed {}\n",
            m.device.as_deref().unwrap_or("?"),
            m.mtu.map_or_else(|| "?".to_string(), |m| m.to_string()),
            m.dropped_sizes,
            if m.icmp.dropped {
                "dropped on this node"
            } else if m.icmp.went_back_via.is_some() {
                "went back"
            } else {
                "not seen"
            }
        ));
    }
    s
}

/// The kernel's reason for a reset sent on this node, and the socket and process that sent it.
fn reset_lines(a: &crate::verdict::established::AfterHandshake) -> String {
    let mut s = String::new();
    if let Some(r) = &a.reset_reason {
        s.push_str(&format!("  reset reason: {r}\n"));
    }
    if let Some(x) = &a.reset_sender {
        let process = x
            .process
            .as_ref()
            .map(|p| format!("{} (pid {})", p.comm, p.pid))
            .unwrap_or_else(|| "?".into());
        let place = x
            .pod
            .as_ref()
            .map(crate::model::Peer::describe)
            .or_else(|| x.netns.clone())
            .unwrap_or_else(|| "?".into());
        s.push_str(&format!("  reset sender: {process} in {place}\n"));
    }
    s
}

/// One line per event: time, what, where, the tuple, then the kind's details.
pub fn text_line(e: &Event) -> String {
    let what = match e.kind {
        Kind::Packet => format!("PKT {}", e.direction.as_ref().map_or("?", |d| d.as_str())),
        Kind::Drop => "DROP".into(),
        Kind::SendReset => "RST sent".into(),
        Kind::ReceiveReset => "RST recv".into(),
        Kind::Retransmit => "RETRANS".into(),
        Kind::StateChange => "STATE".into(),
        Kind::SocketError => "SOCK ERR".into(),
        Kind::Netfilter => "NETFILTER".into(),
        Kind::DnsFailure => "DNS FAIL".into(),
        Kind::RouteFailed => "NO ROUTE".into(),
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
        s.push_str(&format!(" [{}]", e.flag_names().join(",")));
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
            ..Default::default()
        });
        let line = text_line(&e);
        assert!(line.starts_with("01:02:03.000001 DROP"), "{line}");
        assert!(line.contains("netns=pod tcp 127.0.0.1:40000 > 127.0.0.1:9500 [SYN] reason=NO_SOCKET at tcp_v4_rcv+0x99"), "{line}");
    }

    #[test]
    fn a_reset_sent_on_this_node_is_printed_with_its_reason_and_sender() {
        use crate::verdict::{
            established::{AfterHandshake, ResetBy},
            resets::{ResetSender, Side},
        };
        let a = AfterHandshake {
            reset_by: Some(ResetBy::Peer),
            reset_reason: Some("TCP_ABORT_ON_CLOSE".into()),
            reset_sender: Some(ResetSender {
                side: Side::Server,
                netns: Some("srv".into()),
                pod: Some(crate::model::Peer {
                    namespace: Some("default".into()),
                    pod: Some("server".into()),
                    ..Default::default()
                }),
                process: Some(events::Process {
                    pid: 7,
                    comm: "iperf3".into(),
                }),
            }),
            ..Default::default()
        };
        let s = after_handshake_lines(&a);
        assert!(
            s.contains("  reset sent by: the peer\n  reset reason: TCP_ABORT_ON_CLOSE\n  reset sender: iperf3 (pid 7) in default/server\n"),
            "{s}"
        );
    }
}
