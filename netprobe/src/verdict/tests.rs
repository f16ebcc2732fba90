//! Verdicts from event streams recorded in the lab (`netprobe trace --events -o json`), saved in
//! `fixtures/`. Each fixture is the real output of one scenario; the context (listeners) is what
//! the lab had at the time.

use super::*;

pub(super) fn load(name: &str) -> Vec<Event> {
    let path = format!(
        "{}/src/verdict/fixtures/{name}.ndjson",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .filter(|l| !l.contains("\"kind\":\"summary\""))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{path}: {e}: {l}")))
        .collect()
}

fn run(name: &str, ctx: Context) -> Vec<Verdict> {
    let mut engine = Engine::new(ctx);
    let mut out = Vec::new();
    for (i, e) in load(name).into_iter().enumerate() {
        out.extend(engine.push(e, i as u64));
    }
    out.extend(engine.finish());
    out
}

pub(super) fn listener(addr: &str, port: u16) -> Listener {
    Listener {
        addr: addr.parse().unwrap(),
        port,
        v6only: false,
        pid: Some(1),
        comm: Some("mlserver".into()),
        container: None,
    }
}

fn ctx(port: u16, ns: &str, listeners: Vec<Listener>) -> Context {
    Context {
        port,
        udp: false,
        listeners: HashMap::from([(ns.to_string(), listeners)]),
    }
}

#[test]
fn s2_nothing_on_9500_while_the_server_listens_on_9000() {
    let v = run(
        "s2_refused",
        ctx(9500, "pod", vec![listener("127.0.0.1", 9000)]),
    );
    assert_eq!(v.len(), 1, "{v:#?}");
    let v = &v[0];
    assert_eq!(v.outcome, Outcome::RefusedNoListener);
    assert_eq!(v.server.addr.to_string(), "127.0.0.1");
    assert_eq!(v.server.port, 9500);
    assert_eq!(v.server.netns.as_deref(), Some("pod"));
    assert!(
        v.explanation.contains("Nothing listens on 127.0.0.1:9500"),
        "{}",
        v.explanation
    );
    assert!(
        v.explanation.contains("127.0.0.1:9000"),
        "{}",
        v.explanation
    );
    assert_eq!(v.listeners.len(), 1);
    assert_eq!(v.drop.as_ref().unwrap().reason, "NO_SOCKET");
    assert_eq!(v.app_error.as_deref(), Some("ECONNREFUSED"));
    assert!(v.netfilter.is_none(), "never a rule without rule evidence");
}

#[test]
fn s2_server_bound_to_ipv6_loopback_only() {
    let v = run("s2_refused", ctx(9500, "pod", vec![listener("::1", 9500)]));
    assert_eq!(v[0].outcome, Outcome::RefusedNoListener);
    assert!(
        v[0].explanation.contains("bound to [::1]:9500 only"),
        "{}",
        v[0].explanation
    );
}

#[test]
fn s1_calico_end_of_tier_is_a_silent_drop_by_rule_naming_the_policy() {
    let v = run(
        "s1_calico",
        Context {
            port: 9004,
            ..Default::default()
        },
    );
    assert_eq!(v.len(), 1, "{v:#?}");
    let v = &v[0];
    assert_eq!(v.outcome, Outcome::DroppedByRule);
    let nf = v.netfilter.as_ref().unwrap();
    assert_eq!(
        nf.owner.policies,
        vec!["financial-inference/scheduler-allow-xds"]
    );
    assert!(
        v.explanation.contains("none of them admits this flow"),
        "{}",
        v.explanation
    );
    assert!(
        v.explanation.contains("timeout"),
        "never 'refused' for a silent drop: {}",
        v.explanation
    );
    assert_eq!(v.dialed.as_ref().unwrap().addr.to_string(), "10.43.51.131");
    assert_eq!(v.server.addr.to_string(), "10.42.0.30");
    assert_eq!(
        v.client.netns.as_deref(),
        Some("client"),
        "where the client socket lives"
    );
    assert_eq!(v.server.netns, None, "the SYN never reached the server");
}

#[test]
fn kube_proxy_no_endpoints_is_refused_by_rule() {
    let v = run(
        "kube_proxy_reject",
        Context {
            port: 9004,
            ..Default::default()
        },
    );
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].outcome, Outcome::RefusedByRule);
    assert_eq!(
        v[0].netfilter.as_ref().unwrap().owner.object.as_deref(),
        Some("financial-inference/seldon-scheduler:xds")
    );
}

#[test]
fn rp_filter_drop_is_a_kernel_drop_not_a_policy() {
    let v = run(
        "rp_filter",
        Context {
            port: 9004,
            ..Default::default()
        },
    );
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].outcome, Outcome::DroppedByKernel);
    assert_eq!(v[0].drop.as_ref().unwrap().reason, "IP_RPFILTER");
    assert!(v[0].netfilter.is_none());
    assert!(
        !v[0].explanation.to_lowercase().contains("policy"),
        "{}",
        v[0].explanation
    );
}

#[test]
fn plain_success_is_connected() {
    let v = run(
        "success",
        Context {
            port: 9005,
            ..Default::default()
        },
    );
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].outcome, Outcome::Connected);
    assert!(!v[0].outcome.is_failure());
}

#[test]
fn an_attempt_that_began_before_the_trace_is_not_judged() {
    // The same recording without the client's CLOSE → SYN_SENT: its connect() came before the
    // probes, so the first SYN and its path were missed.
    let mut engine = Engine::new(ctx(9005, "client", vec![]));
    let mut out = Vec::new();
    for (i, e) in load("success")
        .into_iter()
        .filter(|e| e.state.as_ref().is_none_or(|s| s.new != TcpState::SynSent))
        .enumerate()
    {
        out.extend(engine.push(e, i as u64));
    }
    out.extend(engine.finish());
    assert!(out.is_empty(), "{out:#?}");
}

#[test]
fn verdicts_wait_for_the_settle_time_then_come_once() {
    let events = load("s2_refused");
    let mut engine = Engine::new(ctx(9500, "pod", vec![]));
    let mut early = Vec::new();
    for e in events {
        early.extend(engine.push(e, 0));
    }
    assert!(early.is_empty(), "nothing before the settle time");
    assert_eq!(engine.poll(SETTLE_NS).len(), 1);
    assert!(engine.poll(10 * SETTLE_NS).is_empty());
    assert!(engine.finish().is_empty());
}

fn udp_ctx(port: u16, listeners: Vec<(&str, Vec<Listener>)>) -> Context {
    Context {
        port,
        udp: true,
        listeners: listeners
            .into_iter()
            .map(|(ns, l)| (ns.to_string(), l))
            .collect(),
    }
}

const DNS_NAME: &str = "seldon-scheduler.financial-inference.svc.cluster.local";

fn lookup(v: &Verdict) -> &udp::DnsLookup {
    v.udp.as_ref().and_then(|u| u.dns.as_ref()).expect("dns")
}

#[test]
fn dns_blocked_by_calico_egress_names_query_rule_and_policy() {
    let v = run("dns_calico_egress", udp_ctx(53, vec![]));
    assert_eq!(v.len(), 1, "{v:#?}");
    let v = &v[0];
    assert_eq!(v.outcome, Outcome::DroppedByRule);
    let d = lookup(v);
    assert_eq!(
        (d.name.as_deref(), d.qtype.as_deref(), d.id),
        (Some(DNS_NAME), Some("A"), 0x4242)
    );
    assert!(!v.udp.as_ref().unwrap().replied);
    let nf = v.netfilter.as_ref().unwrap();
    assert!(nf.chain.starts_with("cali-fw-cali"), "{nf:?}");
    assert_eq!(nf.owner.policies, vec!["financial-inference/client-egress"]);
    assert_eq!(v.dialed.as_ref().unwrap().addr.to_string(), "10.43.0.10");
    assert_eq!(v.server.addr.to_string(), "10.42.0.3");
    assert!(
        v.explanation
            .starts_with(&format!("The DNS query A {DNS_NAME} was stopped by a rule")),
        "{}",
        v.explanation
    );
    assert!(
        v.next_steps
            .iter()
            .any(|s| s.contains("selecting the source pod")),
        "egress policies are the client's: {:?}",
        v.next_steps
    );
}

/// The rule trace (netlink) can arrive before the datagram (ring buffer) that it traced: the
/// exchange it opened is the lookup's, not a nameless one decided first (a CI failure).
#[test]
fn dns_rule_evidence_arriving_before_the_query_joins_the_lookup() {
    let (rules, packets): (Vec<Event>, Vec<Event>) = load("dns_calico_egress")
        .into_iter()
        .partition(|e| e.kind == Kind::Netfilter);
    assert!(!rules.is_empty() && packets.iter().any(|e| e.dns.is_some()));
    let mut engine = Engine::new(udp_ctx(53, vec![]));
    let mut v = Vec::new();
    for (i, e) in rules.into_iter().chain(packets).enumerate() {
        v.extend(engine.push(e, i as u64));
    }
    v.extend(engine.finish());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].outcome, Outcome::DroppedByRule);
    assert_eq!(lookup(&v[0]).name.as_deref(), Some(DNS_NAME));
}

#[test]
fn dns_answered_is_not_a_failure_and_says_the_rcode() {
    let v = run("dns_answered", udp_ctx(53, vec![]));
    assert_eq!(v.len(), 1, "{v:#?}");
    let v = &v[0];
    assert_eq!(v.outcome, Outcome::Answered);
    assert!(!v.outcome.is_failure());
    assert_eq!(v.headline, "answered: NOERROR");
    assert_eq!(lookup(v).rcode.as_deref(), Some("NOERROR"));
    let u = v.udp.as_ref().unwrap();
    assert!(u.replied);
    assert_eq!(u.requests, 1, "one datagram, seen at several checkpoints");
}

/// The recorded NOERROR lookup, its reply's rcode replaced.
fn answered_with(rcode: &str) -> Verdict {
    let mut engine = Engine::new(udp_ctx(53, vec![]));
    let mut out = Vec::new();
    for (i, mut e) in load("dns_answered").into_iter().enumerate() {
        if let Some(d) = e.dns.as_mut().filter(|d| !d.query) {
            d.rcode = Some(rcode.into());
            d.answers = 0;
        }
        out.extend(engine.push(e, i as u64));
    }
    out.extend(engine.finish());
    assert_eq!(out.len(), 1, "{out:#?}");
    out.remove(0)
}

/// Issue #16 item 6: SERVFAIL and REFUSED are failed lookups (as the agent counts them), with
/// the server, the rcode and where to look; NXDOMAIN stays an answer.
#[test]
fn dns_servfail_and_refused_are_failures_nxdomain_is_an_answer() {
    for rcode in ["SERVFAIL", "REFUSED"] {
        let v = answered_with(rcode);
        assert_eq!(v.outcome, Outcome::Answered);
        assert!(v.is_failure(), "{rcode}");
        assert_eq!(
            v.headline,
            format!("DNS lookup failed: the server answered {rcode}")
        );
        assert!(
            v.explanation.contains(&format!(
                "reached the DNS server 10.42.0.3:53 (dialled as 10.43.0.10:53), which answered {rcode}"
            )),
            "{}",
            v.explanation
        );
        assert!(
            v.next_steps
                .iter()
                .any(|n| n.contains(&format!("nslookup {DNS_NAME} 10.42.0.3"))),
            "{:#?}",
            v.next_steps
        );
        let text = crate::sinks::text::verdict_text(&v);
        assert!(text.starts_with("✗ DNS lookup failed"), "{text}");
    }
    let nx = answered_with("NXDOMAIN");
    assert!(!nx.is_failure());
    assert_eq!(nx.headline, "answered: NXDOMAIN");
    assert!(!answered_with("NOERROR").is_failure());
}

#[test]
fn dns_unanswered_names_the_query_and_the_way_out() {
    let v = run("dns_unanswered", udp_ctx(53, vec![]));
    assert_eq!(v.len(), 1, "{v:#?}");
    let v = &v[0];
    assert_eq!(v.outcome, Outcome::Unanswered);
    assert_eq!(lookup(v).id, 0x5151);
    assert!(v.drop.is_none() && v.netfilter.is_none());
    assert!(
        v.explanation.contains("It last left via cali"),
        "{}",
        v.explanation
    );
}

#[test]
fn dns_unanswered_is_decided_after_the_timeout_not_before() {
    let mut engine = Engine::new(udp_ctx(53, vec![]));
    let mut out = Vec::new();
    for e in load("dns_unanswered") {
        out.extend(engine.push(e, 0));
    }
    assert!(out.is_empty());
    assert!(engine.poll(udp::UDP_TIMEOUT_NS - 1).is_empty());
    let v = engine.poll(udp::UDP_TIMEOUT_NS);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].outcome, Outcome::Unanswered);
}

#[test]
fn udp_without_socket_is_no_listener_with_the_udp_listeners() {
    let v = run(
        "udp_no_listener",
        udp_ctx(9999, vec![("server", vec![listener("0.0.0.0", 9001)])]),
    );
    assert_eq!(v.len(), 1, "{v:#?}");
    let v = &v[0];
    assert_eq!(v.outcome, Outcome::RefusedNoListener);
    assert!(
        v.explanation
            .contains("Nothing listens on udp 10.42.0.10:9999 in server"),
        "{}",
        v.explanation
    );
    assert!(v.explanation.contains("0.0.0.0:9001"), "{}", v.explanation);
    assert_eq!(v.listeners.len(), 1);
    assert_eq!(v.app_error.as_deref(), Some("ECONNREFUSED"));
    let u = v.udp.as_ref().unwrap();
    assert!(!u.replied && u.dns.is_none());
}

#[test]
fn dns_verdicts_become_agent_failure_events_only_when_they_failed() {
    let blocked = &run("dns_calico_egress", udp_ctx(53, vec![]))[0];
    let e = dns_failure(blocked).expect("a failure");
    assert_eq!(e.kind, Kind::DnsFailure);
    let f = e.dns_failure.as_ref().unwrap();
    assert_eq!((f.reason, f.replied), (DnsFailureReason::Dropped, false));
    assert_eq!(
        f.backend.as_ref().map(|b| b.addr.to_string()).as_deref(),
        Some("10.42.0.3")
    );
    let d = e.dns.as_ref().unwrap();
    assert_eq!((d.name.as_deref(), d.id), (Some(DNS_NAME), 0x4242));
    assert_eq!(
        (e.src.to_string(), e.dst.to_string(), e.dport),
        ("10.42.0.20".into(), "10.43.0.10".into(), 53)
    );
    assert_eq!(e.time_ns, blocked.timeline[0].time_ns, "timed at the query");
    let unanswered = &run("dns_unanswered", udp_ctx(53, vec![]))[0];
    assert_eq!(
        dns_failure(unanswered).unwrap().dns_failure.unwrap().reason,
        DnsFailureReason::Unanswered
    );
    let mut answered = run("dns_answered", udp_ctx(53, vec![])).remove(0);
    assert_eq!(dns_failure(&answered), None);
    // Answered, but SERVFAIL: the server was reached and failed.
    if let Some(d) = answered.udp.as_mut().and_then(|u| u.dns.as_mut()) {
        d.rcode = Some("SERVFAIL".into());
    }
    assert_eq!(
        dns_failure(&answered).unwrap().dns_failure.unwrap().reason,
        DnsFailureReason::Servfail
    );
    // Not DNS: no DNS failure.
    let udp = &run(
        "udp_no_listener",
        udp_ctx(9999, vec![("server", vec![listener("0.0.0.0", 9001)])]),
    )[0];
    assert_eq!(dns_failure(udp), None);
}

#[test]
fn dns_verdict_text_names_the_query_and_the_reply() {
    let v = &run("dns_calico_egress", udp_ctx(53, vec![]))[0];
    let text = crate::sinks::text::verdict_text(v);
    assert!(
        text.contains(&format!(
            "DNS A {DNS_NAME} (id 16962), 1 datagram(s), no reply came back"
        )),
        "{text}"
    );
    let v = &run("dns_answered", udp_ctx(53, vec![]))[0];
    let text = crate::sinks::text::verdict_text(v);
    assert!(text.starts_with("✓ answered: NOERROR"), "{text}");
    assert!(text.contains("reply NOERROR"), "{text}");
}

/// An attempt that began while the trace was still attaching (its first event is older than
/// the moment every probe was in place) is not judged; one that began after is.
#[test]
fn attempts_begun_before_the_probes_were_armed_are_not_judged() {
    let events = load("s1_calico");
    // The attempt's first event (the SYN_SENT before it reports port 0 and joins no attempt).
    let first = events
        .iter()
        .filter(|e| e.sport != 0)
        .map(|e| e.time_ns)
        .min()
        .unwrap();
    let judged = |armed_at: u64| {
        let mut engine = Engine::new(Context {
            port: 9004,
            ..Context::default()
        });
        engine.armed_at(armed_at);
        let mut v = Vec::new();
        for (i, e) in events.iter().cloned().enumerate() {
            v.extend(engine.push(e, i as u64));
        }
        v.extend(engine.finish());
        v.len()
    };
    assert_eq!(judged(first), 1);
    assert_eq!(judged(first + 1), 0);
}

/// Packets of a connection that began before the trace (no SYN, no SYN state) are not an
/// attempt: the engine gives them no verdict (the trace used to filter them by their text).
#[test]
fn leftovers_without_a_syn_get_no_verdict() {
    let mut engine = Engine::new(ctx(9005, "client", vec![]));
    let mut out = Vec::new();
    use crate::model::TcpFlag;
    let leftovers: Vec<Event> = load("success")
        .into_iter()
        .filter(|e| e.kind == Kind::Packet)
        .map(|mut e| {
            e.tcp_flags = vec![TcpFlag::Ack, TcpFlag::Fin];
            e
        })
        .collect();
    assert!(!leftovers.is_empty());
    for (i, e) in leftovers.into_iter().enumerate() {
        out.extend(engine.push(e, i as u64));
    }
    out.extend(engine.finish());
    assert!(out.is_empty(), "{out:#?}");
}

/// What the always-on agent's kernel side emits of a recorded trace: failure signals only (no
/// SYN packets, no state changes), and the routine teardown drops kept in the kernel.
fn as_the_agent_sees_it(events: Vec<Event>) -> Vec<Event> {
    events
        .into_iter()
        .filter(|e| match e.kind {
            Kind::Packet => e.has_flag(TcpFlag::Rst) || e.icmp.is_some(),
            Kind::StateChange => false,
            Kind::Drop => e.drop.as_ref().is_some_and(|d| {
                !["QUEUE_PURGE", "SOCKET_CLOSE"].contains(&d.reason.as_str())
                    && (d.reason != drop_reason::NOT_SPECIFIED || e.is_syn())
            }),
            _ => true,
        })
        .collect()
}

/// Every TCP fixture, judged on every port from what the agent sees, gets the outcome (and the
/// rule, the dialled address) the trace got for its port; the healthy one gets no verdict.
#[test]
fn an_engine_on_every_port_judges_what_the_agent_sees_as_the_trace_did() {
    type Case = (&'static str, u16, Vec<(&'static str, Listener)>);
    let cases: [Case; 6] = [
        ("s1_calico", 9004, vec![]),
        ("kube_proxy_reject", 9004, vec![]),
        ("rp_filter", 9004, vec![]),
        (
            "s2_refused",
            9500,
            vec![("pod", listener("127.0.0.1", 9000))],
        ),
        ("s2_v6only", 9500, vec![("pod", listener("::1", 9500))]),
        ("success", 9005, vec![]),
    ];
    for (name, port, listeners) in cases {
        let listeners: HashMap<String, Vec<Listener>> = listeners
            .into_iter()
            .map(|(ns, l)| (ns.to_string(), vec![l]))
            .collect();
        let traced = run(
            name,
            Context {
                port,
                udp: false,
                listeners: listeners.clone(),
            },
        );
        let mut engine = Engine::new(Context {
            port: ANY_PORT,
            udp: false,
            listeners,
        });
        let mut always_on = Vec::new();
        for (i, e) in as_the_agent_sees_it(load(name)).into_iter().enumerate() {
            always_on.extend(engine.push(e, i as u64 * 100_000_000));
        }
        always_on.extend(engine.finish());
        let failed: Vec<&Verdict> = always_on
            .iter()
            .filter(|v| v.outcome.is_failure())
            .collect();
        let traced_failed: Vec<&Verdict> =
            traced.iter().filter(|v| v.outcome.is_failure()).collect();
        assert_eq!(failed.len(), traced_failed.len(), "{name}: {always_on:#?}");
        for (a, t) in failed.iter().zip(&traced_failed) {
            assert_eq!(a.outcome, t.outcome, "{name}");
            assert_eq!(
                (a.client.addr, a.client.port),
                (t.client.addr, t.client.port),
                "{name}"
            );
            assert_eq!(a.server.port, t.server.port, "{name}");
            assert_eq!(
                a.dialed.as_ref().map(|d| (d.addr, d.port)),
                t.dialed.as_ref().map(|d| (d.addr, d.port)),
                "{name}: the dialled address"
            );
            assert_eq!(
                a.netfilter.as_ref().map(|n| (&n.chain, n.position)),
                t.netfilter.as_ref().map(|n| (&n.chain, n.position)),
                "{name}"
            );
            assert_eq!(a.listeners, t.listeners, "{name}");
        }
    }
}

/// An always-on engine stays bounded: beyond MAX_OPEN attempts the oldest is judged early
/// (counted), and a SYN dropped once and never retried is judged after IDLE_NS.
#[test]
fn an_engine_on_every_port_is_bounded_and_judges_idle_attempts() {
    let s1 = load("s1_calico");
    let drop = s1
        .iter()
        .find(|e| e.kind == Kind::Drop && e.is_syn())
        .expect("the S1 fixture has a dropped SYN")
        .clone();
    let mut engine = Engine::new(Context {
        port: ANY_PORT,
        ..Context::default()
    });
    let mut verdicts = Vec::new();
    for i in 0..(MAX_OPEN as u16 + 10) {
        let mut e = drop.clone();
        e.sport = 1000 + i;
        verdicts.extend(engine.push(e, 1));
    }
    assert_eq!(engine.stats.tcp.judged_early, 10);
    assert_eq!(verdicts.len(), 10);
    assert!(
        verdicts
            .iter()
            .all(|v| v.outcome == Outcome::DroppedInNetfilter)
    );
    assert!(engine.poll(IDLE_NS).is_empty(), "not idle long enough yet");
    let idle = engine.poll(IDLE_NS + 2 + SCAN_EVERY_NS);
    assert_eq!(idle.len(), MAX_OPEN, "every idle attempt judged");
    assert!(engine.finish().is_empty());
    // Decided attempts are remembered (late retransmits open nothing), then forgotten.
    let mut late = drop.clone();
    late.sport = 1000;
    assert!(
        engine
            .push(late.clone(), IDLE_NS + 3 + SCAN_EVERY_NS)
            .is_empty()
    );
    assert!(
        engine.attempts.is_empty(),
        "a decided attempt is not opened again"
    );
    engine.poll(IDLE_NS + DONE_KEEP_NS + 3 * SCAN_EVERY_NS);
    assert!(engine.done.is_empty() && engine.sock_key.is_empty());
}

/// The recorded Calico drop, each event pushed at its own time, polled just before the client's
/// first retransmit: what the engine has said by then.
fn judged_before_the_first_retransmit(events: Vec<Event>) -> (Vec<Verdict>, Engine) {
    let retransmit = events
        .iter()
        .find(|e| e.kind == Kind::Retransmit)
        .expect("the recording has a retransmit")
        .time_ns;
    let mut engine = Engine::new(ctx(9004, "client", vec![]));
    let mut out = Vec::new();
    for e in events.into_iter().take_while(|e| e.time_ns < retransmit) {
        let now = e.time_ns;
        out.extend(engine.push(e, now));
    }
    out.extend(engine.poll(retransmit - 1));
    (out, engine)
}

#[test]
fn a_syn_dropped_by_a_known_rule_is_judged_before_the_first_retransmit() {
    let (v, mut engine) = judged_before_the_first_retransmit(load("s1_calico"));
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].outcome, Outcome::DroppedByRule);
    assert_eq!(
        v[0].netfilter.as_ref().unwrap().owner.policies,
        vec!["financial-inference/scheduler-allow-xds"]
    );
    assert!(engine.finish().is_empty(), "judged once");
}

#[test]
fn a_syn_drop_whose_rule_is_not_known_yet_waits_for_it() {
    let without_rule = load("s1_calico")
        .into_iter()
        .filter(|e| e.kind != Kind::Netfilter)
        .collect();
    let (v, _) = judged_before_the_first_retransmit(without_rule);
    assert!(v.is_empty(), "{v:#?}");
}

/// The Calico drop as the agent sees it at the first SYN: its rule from the counters (no path),
/// the dropped SYN to a Service endpoint or not.
fn counted_drop(to_service_endpoint: bool) -> Vec<Event> {
    let mut events = load("s1_calico");
    for e in &mut events {
        if let Some(nf) = &mut e.netfilter {
            nf.evidence = crate::attribution::Evidence::Counters;
            nf.path.clear();
        }
        e.to_service_endpoint = to_service_endpoint && e.kind == Kind::Drop;
    }
    events
}

#[test]
fn a_counted_rule_is_enough_unless_the_armed_trace_may_still_name_a_cluster_ip() {
    let (v, _) = judged_before_the_first_retransmit(counted_drop(false));
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].outcome, Outcome::DroppedByRule);
    let (v, _) = judged_before_the_first_retransmit(counted_drop(true));
    assert!(v.is_empty(), "{v:#?}");
}
