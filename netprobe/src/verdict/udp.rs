//! UDP exchanges (DNS lookups above all): a client datagram and whether anything came back.
//! UDP has no handshake and no reset, so the evidence is the datagram's path (tc checkpoints),
//! a drop (kernel reason, netfilter rule), an ICMP port unreachable or the kernel's NO_SOCKET
//! drop, and a reply — or, after [`UDP_TIMEOUT_NS`], its absence.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{
    Context, Endpoint, Listener, Netfilter, Outcome, SCHEMA, Verdict, app_error,
    kernel_drop_verdict, last_left_via, netfilter_verdict, no_listener, ns_name, timeline,
};
use crate::{
    events::{Event, Kind, dns::Dns},
    model::{Direction, Protocol, drop_reason},
};

/// A query with neither reply nor drop after this long is unanswered (resolvers retry after 5 s:
/// glibc's `timeout:5`, CoreDNS's forwarders less).
pub const UDP_TIMEOUT_NS: u64 = 5_000_000_000;

/// The DNS question of an exchange and the answer, if one came back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DnsLookup {
    pub id: u16,
    /// The name asked (null when the capture ended inside it).
    pub name: Option<String>,
    /// `A`, `AAAA`, `SRV`, `PTR`, …
    #[serde(rename = "type")]
    pub qtype: Option<String>,
    /// Response code of the reply (`NOERROR`, `NXDOMAIN`, `SERVFAIL`, …); null without reply.
    pub rcode: Option<String>,
    /// Records in the reply's answer section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers: Option<u16>,
}

impl DnsLookup {
    /// The query as a DNS message header and question (a `dns_failure` event's `dns`).
    pub fn question(&self) -> Dns {
        Dns {
            id: self.id,
            query: true,
            name: self.name.clone(),
            qtype: self.qtype.clone(),
            rcode: self.rcode.clone(),
            answers: self.answers.unwrap_or(0),
            truncated: false,
        }
    }

    /// `A seldon-scheduler.financial-inference.svc.cluster.local`
    pub fn describe(&self) -> String {
        format!(
            "{} {}",
            self.qtype.as_deref().unwrap_or("?"),
            self.name.as_deref().unwrap_or("(name not captured)")
        )
    }
}

/// What a UDP verdict adds: whether any reply came back, and the DNS question and answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UdpExchange {
    /// Datagrams of the client seen leaving it (the first try and retries).
    pub requests: u32,
    /// Did a reply come back to the client (seen on its way and not dropped)?
    pub replied: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsLookup>,
}

/// The client side of a UDP event: the side whose port is not the traced one.
pub(super) fn client_of(e: &Event, port: u16) -> Option<(IpAddr, u16)> {
    if e.protocol == Protocol::Tcp {
        return None;
    }
    let c = if e.dport == port {
        (e.src, e.sport)
    } else if e.sport == port {
        (e.dst, e.dport)
    } else {
        (e.src, e.sport)
    };
    (c.1 != 0).then_some(c)
}

fn is_reply(e: &Event, client: (IpAddr, u16)) -> bool {
    e.kind == Kind::Packet && e.icmp.is_none() && (e.dst, e.dport) == client
}

/// ICMP port unreachable (IPv4 3/3, IPv6 1/4): nothing listens there.
fn port_unreachable(e: &Event) -> bool {
    e.icmp
        .as_ref()
        .is_some_and(|i| (i.icmp_type, i.code) == (3, 3) || (i.icmp_type, i.code) == (1, 4))
}

/// Decides the exchange: a reply, an ICMP error, a drop of the client's datagram, a rule.
pub(super) fn terminal(e: &Event, client: (IpAddr, u16)) -> bool {
    match e.kind {
        Kind::Packet => e.icmp.is_some() || is_reply(e, client),
        Kind::Drop => {
            (e.src, e.sport) == client
                && e.drop
                    .as_ref()
                    .is_some_and(|d| d.reason != drop_reason::NOT_SPECIFIED)
        }
        Kind::Netfilter => true,
        _ => false,
    }
}

/// What one exchange's events show, gathered once.
struct Evidence<'a> {
    /// The client's datagrams as seen passing checkpoints (each may be seen several times).
    sent: Vec<&'a Event>,
    replies: Vec<&'a Event>,
    answer: Option<&'a Dns>,
    lookup: Option<DnsLookup>,
    dialed: Option<(IpAddr, u16)>,
    server: (IpAddr, u16),
    netfilter: Option<Netfilter>,
    /// A drop of a datagram on its way back to the client (a reply that never arrives).
    reply_dropped: bool,
    drop: Option<&'a Event>,
    no_socket: Option<&'a Event>,
    icmp: Option<&'a Event>,
    /// `The DNS query A name` or `The datagram`: how the explanation names the exchange.
    what: String,
}

impl<'a> Evidence<'a> {
    fn gather(events: &'a [Event], client: (IpAddr, u16), port: u16) -> Self {
        let from_client: Vec<&Event> = events
            .iter()
            .filter(|e| {
                (e.src, e.sport) == client
                    && matches!(e.kind, Kind::Packet | Kind::Drop | Kind::Netfilter)
                    && e.icmp.is_none()
            })
            .collect();
        let sent: Vec<&Event> = from_client
            .iter()
            .copied()
            .filter(|e| e.kind == Kind::Packet)
            .collect();
        let replies: Vec<&Event> = events.iter().filter(|e| is_reply(e, client)).collect();
        let answer = replies
            .iter()
            .find_map(|e| e.dns.as_ref().filter(|d| !d.query));
        let lookup = lookup_of(&sent, answer);
        let dialed = sent.first().map(|e| (e.dst, e.dport));
        let drop = from_client
            .iter()
            .copied()
            .find(|e| e.kind == Kind::Drop && terminal(e, client));
        Self {
            server: from_client
                .last()
                .map(|e| (e.dst, e.dport))
                .or(dialed)
                .unwrap_or((client.0, port)),
            netfilter: events.iter().find_map(|e| e.netfilter.clone()),
            reply_dropped: reply_dropped(events, client),
            no_socket: no_socket(events, drop),
            icmp: events.iter().find(|e| e.icmp.is_some()),
            what: lookup.as_ref().map_or_else(
                || "The datagram".to_string(),
                |l| format!("The DNS query {}", l.describe()),
            ),
            sent,
            replies,
            answer,
            lookup,
            dialed,
            drop,
        }
    }

    /// Each datagram passes several checkpoints: count them at the first one.
    fn requests(&self) -> u32 {
        let Some(first) = self.sent.first() else {
            return 0;
        };
        self.sent
            .iter()
            .filter(|e| {
                (&e.interface, &e.direction, &e.netns)
                    == (&first.interface, &first.direction, &first.netns)
            })
            .count() as u32
    }

    /// The first checkpoint the client's datagram passed in `direction`.
    fn first_via(&self, direction: Direction) -> Option<&'a Event> {
        self.sent
            .iter()
            .copied()
            .find(|e| e.direction == Some(direction))
    }

    /// The last checkpoint the client's datagram passed in `direction`.
    fn last_via(&self, direction: Direction) -> Option<&'a Event> {
        self.sent
            .iter()
            .rev()
            .copied()
            .find(|e| e.direction == Some(direction))
    }

    /// What the explanation says before the rule's sentence.
    fn rule_prefix(&self) -> Option<String> {
        let what = &self.what;
        self.netfilter.as_ref().map(|_| {
            if self.reply_dropped {
                format!("{what} was answered, but a rule stopped the reply on its way back. ")
            } else {
                format!("{what} was stopped by a rule. ")
            }
        })
    }
}

/// The DNS question the client asked (or, without it, the one the reply repeats) and the answer.
fn lookup_of(sent: &[&Event], answer: Option<&Dns>) -> Option<DnsLookup> {
    let query = sent.iter().find_map(|e| e.dns.as_ref().filter(|d| d.query));
    query.or(answer).map(|q| DnsLookup {
        id: q.id,
        name: q.name.clone(),
        qtype: q.qtype.clone(),
        rcode: answer.and_then(|a| a.rcode.clone()),
        answers: answer.map(|a| a.answers),
    })
}

fn reply_dropped(events: &[Event], client: (IpAddr, u16)) -> bool {
    events.iter().any(|e| {
        matches!(e.kind, Kind::Drop | Kind::Netfilter)
            && (e.dst, e.dport) == client
            && e.drop
                .as_ref()
                .is_none_or(|d| d.reason != drop_reason::NOT_SPECIFIED)
    })
}

/// The kernel found no socket: a NO_SOCKET drop of the client's datagram, or the ICMP port
/// unreachable it sent.
fn no_socket<'a>(events: &'a [Event], drop: Option<&'a Event>) -> Option<&'a Event> {
    drop.filter(|d| {
        d.drop
            .as_ref()
            .is_some_and(|x| x.reason == drop_reason::NO_SOCKET)
    })
    .or_else(|| events.iter().find(|e| port_unreachable(e)))
}

/// A reply came back: what its rcode means, and the headline that names it.
fn answered(ev: &Evidence, next_steps: &mut Vec<String>) -> (String, Option<String>) {
    let what = &ev.what;
    let rcode = ev.answer.and_then(|a| a.rcode.as_deref());
    let why = match rcode {
        Some("NOERROR") => format!(
            "{what} was answered: NOERROR, {} answer record(s).",
            ev.answer.map_or(0, |a| a.answers)
        ),
        Some("NXDOMAIN") => {
            next_steps.push("check the name: the Service or pod does not exist under it (namespace, search domains, ndots)".into());
            format!(
                "{what} was answered: NXDOMAIN, the name does not exist. That is the DNS server's answer, not a network failure."
            )
        }
        Some(rcode @ ("SERVFAIL" | "REFUSED")) => return failed_answer(ev, rcode, next_steps),
        Some(rcode) => {
            next_steps.push(format!(
                "look at the DNS server's logs ({COREDNS_LOGS}) and its upstreams"
            ));
            format!(
                "{what} was answered with {rcode}: the DNS server was reached but could not answer."
            )
        }
        None => "A reply came back.".to_string(),
    };
    (why, rcode.map(|r| format!("answered: {r}")))
}

/// Stands for the client pod in a next step until the judge names it (`-n ns pod`).
pub const CLIENT_POD: &str = "<client pod>";

/// CoreDNS's recent log lines (its pods carry `k8s-app=kube-dns` in every mainstream install).
const COREDNS_LOGS: &str = "kubectl -n kube-system logs -l k8s-app=kube-dns --tail=200";

/// SERVFAIL or REFUSED: the server was reached and answered, but the application's lookup
/// failed (getaddrinfo gives EAI_AGAIN or EAI_FAIL). A failure like a drop: the verdict says
/// so in its headline and the trace counts it.
fn failed_answer(
    ev: &Evidence,
    rcode: &str,
    next_steps: &mut Vec<String>,
) -> (String, Option<String>) {
    let server = super::endpoint_str(ev.server.0, ev.server.1);
    let dialled = ev
        .dialed
        .filter(|d| *d != ev.server)
        .map(|d| format!(" (dialled as {})", super::endpoint_str(d.0, d.1)))
        .unwrap_or_default();
    let name = ev
        .lookup
        .as_ref()
        .and_then(|l| l.name.clone())
        .unwrap_or_else(|| "<name>".into());
    let meaning = if rcode == "SERVFAIL" {
        next_steps.push(format!("{COREDNS_LOGS} | grep -iE 'SERVFAIL|error|timeout'  # why it failed (an upstream that times out, a plugin error)"));
        next_steps.push("kubectl -n kube-system get configmap coredns -o yaml  # the forward (upstream) servers this name goes to".into());
        "it could not resolve the name: most often its upstream (the forward target in the Corefile) failed or timed out, or the zone is broken"
    } else {
        next_steps.push("kubectl -n kube-system get configmap coredns -o yaml  # the zones it serves, acl and forward rules".into());
        next_steps.push(format!("{COREDNS_LOGS}  # the refused queries"));
        "it will not answer this query for this client: not a zone it serves and no recursion for it, or an acl"
    };
    next_steps.push(format!(
        "kubectl exec {CLIENT_POD} -- nslookup {name} {}  # ask the same server again",
        ev.server.0
    ));
    let why = format!(
        "{} reached the DNS server {server}{dialled}, which answered {rcode}: {meaning}. The network path works; the application sees a failed lookup.",
        ev.what
    );
    (
        why,
        Some(format!("DNS lookup failed: the server answered {rcode}")),
    )
}

fn unanswered(ev: &Evidence, next_steps: &mut Vec<String>) -> String {
    let via = ev
        .last_via(Direction::Egress)
        .map(|e| last_left_via("It", e))
        .unwrap_or_default();
    next_steps.push(if ev.lookup.is_some() {
        "check the DNS server pods (kubectl -n kube-system get pods -l k8s-app=kube-dns) and that they are healthy; then the path to their node".into()
    } else {
        "check that the server reads its socket and answers; then the path to its node".into()
    });
    format!(
        "{} left {} time(s), no reply came back and nothing on this node dropped it.{via}",
        ev.what,
        ev.sent.len()
    )
}

/// What the verdict says: outcome, explanation, and a headline when it is not the outcome's.
struct Decision {
    outcome: Outcome,
    explanation: String,
    headline: Option<String>,
}

impl From<(Outcome, String)> for Decision {
    fn from((outcome, explanation): (Outcome, String)) -> Self {
        Self {
            outcome,
            explanation,
            headline: None,
        }
    }
}

/// The outcome the evidence supports, strongest evidence first.
fn decide(
    ev: &Evidence,
    ctx: &Context,
    listeners: &mut Vec<Listener>,
    next_steps: &mut Vec<String>,
) -> Decision {
    let what = &ev.what;
    if let (Some(nf), Some(prefix)) = (&ev.netfilter, ev.rule_prefix()) {
        let (o, why) = netfilter_verdict(nf, next_steps);
        (o, format!("{prefix}{why}")).into()
    } else if !ev.replies.is_empty() && !ev.sent.is_empty() {
        let (explanation, headline) = answered(ev, next_steps);
        Decision {
            outcome: Outcome::Answered,
            explanation,
            headline,
        }
    } else if let Some(ns_ev) = ev.no_socket {
        // The ICMP error quotes the client's datagram: its destination is the server.
        let why = no_listener(
            ns_ev,
            ctx,
            "UDP",
            "the kernel answered with ICMP port unreachable (NO_SOCKET) and the client gets ECONNREFUSED or a failed lookup",
            listeners,
            next_steps,
        );
        (
            Outcome::RefusedNoListener,
            format!("{what} reached no socket. {why}"),
        )
            .into()
    } else if let Some(d) = ev.drop {
        let mut dec: Decision = kernel_drop_verdict(d, "datagram", next_steps).into();
        dec.headline = d.drop.as_ref().and_then(super::drop_detail::headline);
        dec
    } else if let Some(i) = ev.icmp {
        let c = i.icmp.as_ref().expect("icmp");
        let why = format!(
            "{what} got an ICMP error (type {} code {}) from {} without a rule on this node rejecting it.",
            c.icmp_type, c.code, i.src
        );
        (Outcome::Unreachable, why).into()
    } else if !ev.sent.is_empty() {
        (Outcome::Unanswered, unanswered(ev, next_steps)).into()
    } else {
        let why = "The trace ended before the exchange showed a result.";
        (Outcome::Unknown, why.to_string()).into()
    }
}

/// Classifies one UDP exchange's events (sorted by time).
pub(super) fn classify(events: &[Event], client: (IpAddr, u16), ctx: &Context) -> Verdict {
    let ev = Evidence::gather(events, client, ctx.port);
    let mut listeners = Vec::new();
    let mut next_steps = Vec::new();
    let d = decide(&ev, ctx, &mut listeners, &mut next_steps);
    let plain = |(addr, port): (IpAddr, u16), netns| Endpoint {
        netns,
        ..Endpoint::at(addr, port)
    };
    // The client's own namespace: where its datagram was first seen leaving.
    let client_ns = ev.sent.first().and_then(|e| ns_name(e));
    Verdict {
        schema: SCHEMA.into(),
        kind: "verdict".into(),
        outcome: d.outcome,
        headline: d.headline.unwrap_or_else(|| d.outcome.headline().into()),
        client: plain(client, client_ns),
        server: plain(ev.server, ev.no_socket.and_then(ns_name)),
        dialed: ev
            .dialed
            .filter(|x| *x != ev.server)
            .map(|x| plain(x, None)),
        timeline: timeline(events),
        explanation: d.explanation,
        next_steps,
        drop: ev.drop.and_then(|e| e.drop.clone()),
        rule_prefix: ev.rule_prefix(),
        netfilter: ev.netfilter.clone(),
        listeners,
        syn_retransmits: 0,
        // A connected UDP socket reports the ICMP error it got (ECONNREFUSED).
        app_error: app_error(events),
        // Where the client's datagram arrived and last left: what a cross-node join names.
        arrived_via: ev.first_via(Direction::Ingress).and_then(super::hop),
        left_via: ev.last_via(Direction::Egress).and_then(super::hop),
        route: None,
        cross_node: None,
        no_route: None,
        listen_queue: None,
        written: Default::default(),
        after_handshake: None,
        udp: Some(UdpExchange {
            requests: ev.requests(),
            replied: !ev.replies.is_empty() && !ev.reply_dropped,
            dns: ev.lookup,
        }),
    }
}
