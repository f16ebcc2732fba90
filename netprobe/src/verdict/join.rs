//! Joining what two nodes saw of one attempt (cluster-mode trace across nodes): the client's
//! node knows where the SYN (or the DNS query, the datagram) left, the server's node whether it
//! arrived and what happened there. Pure logic, like the rest of the verdict engine.

use super::{CrossNode, Hop, Outcome, RouteHint, Verdict};

impl RouteHint {
    /// "dev flannel.1 (vxlan VNI 1, UDP 8472 over eth0, mtu 1450)", "via 192.168.77.2 dev eth0
    /// (mtu 1500)".
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(e) = &self.encap {
            let mut p = e.kind.clone();
            if let Some(v) = e.vni {
                p.push_str(&format!(" VNI {v}"));
            }
            if let Some(port) = e.port {
                p.push_str(&format!(", UDP {port}"));
            }
            if let Some(u) = &e.underlay {
                p.push_str(&format!(" over {u}"));
            }
            if let Some(r) = e.remote {
                p.push_str(&format!(" to {r}"));
            }
            parts.push(p);
        } else if let Some(k) = &self.kind {
            parts.push(k.clone());
        }
        if let Some(m) = self.mtu {
            parts.push(format!("mtu {m}"));
        }
        format!(
            "{}dev {}{}",
            self.gateway
                .map(|g| format!("via {g} "))
                .unwrap_or_default(),
            self.dev,
            if parts.is_empty() {
                String::new()
            } else {
                format!(" ({})", parts.join(", "))
            }
        )
    }

    /// What must let the traffic through between the nodes.
    fn underlay_needs(&self) -> String {
        match &self.encap {
            Some(e) if e.kind == "vxlan" => format!(
                "VXLAN (UDP {}) between the nodes' underlay addresses{}",
                e.port.unwrap_or(4789),
                e.remote
                    .map(|r| format!(" (here to {r})"))
                    .unwrap_or_default()
            ),
            Some(e) if e.kind == "ipip" => "IP-in-IP (IP protocol 4) between the nodes".into(),
            _ => format!("routed pod traffic to {}", self.dst),
        }
    }
}

fn hop_str(h: &Option<Hop>) -> String {
    match h {
        Some(Hop {
            interface,
            netns: Some(ns),
        }) => format!("{interface} (in {ns})"),
        Some(Hop { interface, .. }) => interface.clone(),
        None => "an interface netprobe does not watch".into(),
    }
}

/// How the explanation names what the client sent: "The SYN", "The DNS query A name", "The
/// datagram".
fn sent_str(v: &Verdict) -> String {
    match &v.udp {
        None => "The SYN".into(),
        Some(u) => u.dns.as_ref().map_or_else(
            || "The datagram".into(),
            |d| format!("The DNS query {}", d.describe()),
        ),
    }
}

/// Joins the client node's verdict with the server node's verdict of the same attempt (`None`:
/// the server's node never saw it).
pub fn join(
    mut client: Verdict,
    client_node: &str,
    server: Option<&Verdict>,
    server_node: &str,
) -> Verdict {
    let left = hop_str(&client.left_via);
    let sent = sent_str(&client);
    let arrived_via = server.and_then(|s| s.arrived_via.clone());
    client.cross_node = Some(CrossNode {
        client_node: client_node.into(),
        server_node: server_node.into(),
        left_via: client.left_via.clone(),
        arrived: server.is_some(),
        arrived_via: arrived_via.clone(),
        server_node_outcome: server.map(|s| s.outcome),
    });
    // Only what the client's node could not explain by itself is explained by the other node.
    let undecided = matches!(
        client.outcome,
        Outcome::TimedOut
            | Outcome::Unanswered
            | Outcome::Unknown
            | Outcome::ResetByPeer
            | Outcome::Unreachable
    );
    if !undecided {
        return client;
    }
    let mark = |node: &str, v: &mut Verdict| {
        for c in &mut v.timeline {
            c.node = Some(node.to_string());
        }
    };
    mark(client_node, &mut client);
    match server {
        Some(s) if s.outcome.is_failure() && !nothing_came_back(s.outcome) => {
            let mut s = s.clone();
            mark(server_node, &mut s);
            client.outcome = s.outcome;
            client.headline = s.headline.clone();
            client.explanation = format!(
                "{sent} left node {client_node} via {left} and arrived at node {server_node} via {}. {}",
                hop_str(&arrived_via),
                there(&s, &sent)
            );
            client.next_steps = s.next_steps.clone();
            client.netfilter = s.netfilter.clone();
            client.drop = s.drop.clone();
            client.listeners = s.listeners.clone();
            // The server's node names the server's namespace and pod.
            client.server = s.server.clone();
            client.timeline.extend(s.timeline);
        }
        Some(s) => {
            let mut s = s.clone();
            mark(server_node, &mut s);
            let answered = matches!(s.outcome, Outcome::Connected | Outcome::Answered);
            let answer = if client.udp.is_some() {
                ""
            } else {
                " (SYN-ACK)"
            };
            client.explanation = format!(
                "{sent} left node {client_node} via {left} and arrived at node {server_node} via {}, where nothing dropped it. {}",
                hop_str(&arrived_via),
                if answered {
                    format!(
                        "The server answered{answer}{}, but the answer never reached the client: look at the way back ({server_node} → {client_node}), e.g. asymmetric routing or a firewall on the return path.",
                        s.left_via
                            .as_ref()
                            .map(|h| format!(" and it left {server_node} via {}", h.interface))
                            .unwrap_or_default()
                    )
                } else {
                    format!("Nothing answered it there ({}).", s.explanation)
                }
            );
            if s.server.netns.is_some() {
                client.server.netns = s.server.netns.clone();
            }
            client.timeline.extend(s.timeline);
        }
        None if nothing_came_back(client.outcome) => {
            lost_between(
                &mut client,
                client_node,
                server_node,
                &format!("{sent} left node {client_node} via {left}"),
            );
        }
        None => {}
    }
    client
}

/// Nothing on the server's node saw what `left` the client's node ("The SYN left node a via
/// flannel.1"): lost between the nodes; names what lies between and what the underlay must let through.
fn lost_between(client: &mut Verdict, client_node: &str, server_node: &str, left: &str) {
    client.outcome = Outcome::LostBetweenNodes;
    client.headline = Outcome::LostBetweenNodes.headline().into();
    let between = client
        .route
        .as_ref()
        .map(|r| {
            format!(
                " What lies between: {client_node} routes {} {}.",
                r.dst,
                r.describe()
            )
        })
        .unwrap_or_default();
    client.explanation = format!(
        "{left} toward node {server_node} and never arrived there: nothing on {server_node} saw it, nothing on {client_node} dropped it.{between}"
    );
    client.next_steps = vec![match &client.route {
        Some(r) => format!(
            "check the underlay between {client_node} and {server_node}: firewalls and security groups must allow {}",
            r.underlay_needs()
        ),
        None => format!(
            "check the underlay between {client_node} and {server_node} (firewalls, routes)"
        ),
    }];
    if let Some(r) = &client.route {
        if r.encap.is_some() {
            client.next_steps.push(format!(
                "compare MTUs along the path ({} mtu {}): encapsulation adds 50 bytes (VXLAN) or 20 (IPIP)",
                r.dev,
                r.mtu.map_or_else(|| "?".to_string(), |m| m.to_string())
            ));
        }
        client.next_steps.push(format!(
            "on {client_node}: ip route get {}; ip -d link show {}",
            r.dst, r.dev
        ));
    }
}

/// What the server's node says happened there, without naming the query a second time ("The
/// DNS query A x was stopped by a rule. …" → "There it was stopped by a rule. …").
fn there(s: &Verdict, sent: &str) -> String {
    match s.explanation.strip_prefix(&format!("{sent} ")) {
        Some(rest) => format!("There it {rest}"),
        None => format!("There: {}", s.explanation),
    }
}

/// No answer and no drop: what a node sees of an attempt that was lost elsewhere.
fn nothing_came_back(o: Outcome) -> bool {
    matches!(o, Outcome::TimedOut | Outcome::Unanswered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::{Checkpoint, Encap, Endpoint, SCHEMA};

    fn verdict(outcome: Outcome) -> Verdict {
        Verdict {
            schema: SCHEMA.into(),
            kind: "verdict".into(),
            outcome,
            headline: outcome.headline().into(),
            client: Endpoint::at("10.42.0.5".parse().unwrap(), 40000),
            server: Endpoint::at("10.42.1.7".parse().unwrap(), 9004),
            dialed: None,
            timeline: vec![Checkpoint {
                time_ns: 1,
                what: "SYN egress".into(),
                node: None,
            }],
            explanation: "x".into(),
            next_steps: vec![],
            drop: None,
            netfilter: None,
            rule_prefix: None,
            listeners: vec![],
            syn_retransmits: 2,
            app_error: None,
            arrived_via: None,
            left_via: Some(Hop {
                interface: "flannel.1".into(),
                netns: Some("node-a".into()),
            }),
            route: Some(RouteHint {
                dst: "10.42.1.7".parse().unwrap(),
                dev: "flannel.1".into(),
                kind: Some("vxlan".into()),
                mtu: Some(1450),
                gateway: Some("10.42.1.0".parse().unwrap()),
                encap: Some(Encap {
                    kind: "vxlan".into(),
                    vni: Some(1),
                    port: Some(8472),
                    underlay: Some("eth0".into()),
                    local: None,
                    remote: None,
                }),
            }),
            cross_node: None,
            no_route: None,
            listen_queue: None,
            written: Default::default(),
            after_handshake: None,
            udp: None,
        }
    }

    /// The server node's verdict of a datagram or SYN that arrived via `iface` and met a rule.
    fn dropped_there(mut b: Verdict, iface: &str, netns: Option<&str>) -> Verdict {
        b.explanation = "Calico policy financial-inference/deny dropped it.".into();
        b.next_steps = vec!["check the policy".into()];
        b.arrived_via = Some(Hop {
            interface: iface.into(),
            netns: netns.map(Into::into),
        });
        b
    }

    /// The server node's drop decided the joined verdict: its outcome, texts and next steps.
    fn assert_decided_there(j: &Verdict, why: &str) {
        assert_eq!(j.outcome, Outcome::DroppedByRule);
        assert!(j.explanation.starts_with(why), "{}", j.explanation);
        assert_eq!(j.next_steps, ["check the policy"]);
    }

    #[test]
    fn a_drop_on_the_server_node_decides_and_names_both_nodes() {
        let b = dropped_there(verdict(Outcome::DroppedByRule), "eth0", Some("node-b"));
        let j = join(verdict(Outcome::TimedOut), "a", Some(&b), "b");
        assert_decided_there(
            &j,
            "The SYN left node a via flannel.1 (in node-a) and arrived at node b via eth0 (in node-b). There: Calico policy",
        );
        let x = j.cross_node.unwrap();
        assert!(x.arrived);
        assert_eq!(x.server_node_outcome, Some(Outcome::DroppedByRule));
        assert!(j.timeline.iter().any(|c| c.node.as_deref() == Some("b")));
        assert!(j.timeline.iter().any(|c| c.node.as_deref() == Some("a")));
        assert!(j.timeline.iter().all(|c| c.what == "SYN egress"));
    }

    #[test]
    fn never_arriving_is_lost_between_the_nodes_with_the_underlay_named() {
        let j = join(verdict(Outcome::TimedOut), "node-a", None, "node-b");
        assert_eq!(j.outcome, Outcome::LostBetweenNodes);
        assert!(
            j.explanation.contains("never arrived there")
                && j.explanation.contains(
                    "via 10.42.1.0 dev flannel.1 (vxlan VNI 1, UDP 8472 over eth0, mtu 1450)"
                ),
            "{}",
            j.explanation
        );
        assert!(
            j.next_steps[0].contains("VXLAN (UDP 8472)"),
            "{:?}",
            j.next_steps
        );
        assert!(!j.cross_node.unwrap().arrived);
    }

    #[test]
    fn what_the_client_node_decided_stays() {
        let mut a = verdict(Outcome::DroppedByRule);
        a.explanation = "local rule".into();
        let j = join(a, "a", None, "b");
        assert_eq!(j.outcome, Outcome::DroppedByRule);
        assert_eq!(j.explanation, "local rule");
        assert!(!j.cross_node.unwrap().arrived);
        // A connected attempt that the server node did not see is still connected.
        let j = join(verdict(Outcome::Connected), "a", None, "b");
        assert_eq!(j.outcome, Outcome::Connected);
    }

    #[test]
    fn an_answer_lost_on_the_way_back_is_a_timeout_that_says_so() {
        let mut b = verdict(Outcome::Connected);
        b.left_via = Some(Hop {
            interface: "eth0".into(),
            netns: None,
        });
        let j = join(verdict(Outcome::TimedOut), "a", Some(&b), "b");
        assert_eq!(j.outcome, Outcome::TimedOut);
        assert!(
            j.explanation.contains("never reached the client")
                && j.explanation.contains("left b via eth0"),
            "{}",
            j.explanation
        );
    }
    /// A DNS lookup as the client's node judges it when no reply came back.
    fn lookup(outcome: Outcome) -> Verdict {
        let mut v = verdict(outcome);
        v.server.port = 53;
        v.udp = Some(crate::verdict::udp::UdpExchange {
            requests: 2,
            replied: false,
            dns: Some(crate::verdict::udp::DnsLookup {
                id: 7,
                name: Some("kube-dns.kube-system.svc.cluster.local".into()),
                qtype: Some("A".into()),
                rcode: None,
                answers: None,
            }),
        });
        v
    }

    #[test]
    fn an_unanswered_lookup_that_never_arrived_is_lost_between_the_nodes() {
        let j = join(lookup(Outcome::Unanswered), "node-a", None, "node-b");
        assert_eq!(j.outcome, Outcome::LostBetweenNodes);
        let lost = "The DNS query A kube-dns.kube-system.svc.cluster.local left node node-a via flannel.1 (in node-a) toward node node-b and never arrived there";
        assert!(j.explanation.starts_with(lost), "{}", j.explanation);
        let (step, steps) = (&j.next_steps[0], &j.next_steps);
        assert!(step.contains("VXLAN (UDP 8472)"), "{steps:?}");
        assert!(j.udp.unwrap().dns.is_some());
    }

    #[test]
    fn a_lookup_dropped_on_the_server_node_names_that_rule() {
        let mut b = dropped_there(lookup(Outcome::DroppedByRule), "flannel.1", None);
        b.explanation = format!("{} was stopped by a rule. {}", sent_str(&b), b.explanation);
        let j = join(lookup(Outcome::Unanswered), "a", Some(&b), "b");
        assert_decided_there(
            &j,
            "The DNS query A kube-dns.kube-system.svc.cluster.local left node a via flannel.1 (in node-a) and arrived at node b via flannel.1. There it was stopped by a rule. Calico policy",
        );
        // Answered there, lost on the way back: no SYN-ACK in a DNS text.
        let j = join(
            lookup(Outcome::Unanswered),
            "a",
            Some(&lookup(Outcome::Answered)),
            "b",
        );
        assert_eq!(j.outcome, Outcome::Unanswered);
        assert!(
            j.explanation.contains(
                "The server answered and it left b via flannel.1, but the answer never reached the client"
            ),
            "{}",
            j.explanation
        );
    }
}
