//! No route: a SYN whose route lookup on this node hit an `unreachable`, `prohibit` or
//! `blackhole` route, or found none; or a connect() (or send) inside a pod whose own lookup
//! failed, so that no packet ever existed (a `route_failed` event, see [`lookup_failed`]). The kernel frees it in `ip_error` (IPv6: `ip6_pkt_*`, and
//! `dst_discard*` for a blackhole) and itself sends the ICMP error back, with the quoted SYN's addresses: the ICMP error is
//! this node's, never the client's or the server's. The route itself (type, prefix, table) is
//! looked up in that namespace when the verdict is final (see `session::judge`).

use serde::{Deserialize, Serialize};

use super::{Checkpoint, Outcome, SCHEMA, Verdict, checkpoint, ns_name};
use crate::{
    enrich::route::ErrorRoute,
    events::{Event, Kind, errno_name},
    model::Endpoint,
};

/// Where a route lookup failed and what the client sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NoRoute {
    /// The namespace (node or pod) whose lookup failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// The interface the SYN came in on there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The kernel function that freed the SYN (`ip_error`, `ip6_pkt_discard`, `dst_discard_out`);
    /// empty when the lookup failed in the client's connect() (no SYN existed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub freed_in: String,
    /// The lookup was the client's own connect() (or send) in its namespace: it failed before
    /// any packet existed, and connect() returned `client_sees` at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_connect: bool,
    /// The ICMP error that kernel sent back (`type 3 code 1 (host unreachable)`); none for a
    /// blackhole route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<String>,
    /// `EHOSTUNREACH`, `ENETUNREACH`, `EACCES`, `EINVAL` (a local connect() to a blackhole
    /// route), or `a timeout`.
    pub client_sees: String,
    /// The route the lookup hit, read in that namespace when the verdict was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<ErrorRoute>,
}

/// A SYN freed by an error route's input handler.
pub(super) fn is_route_error(e: &Event) -> bool {
    e.kind == Kind::Drop
        && e.is_syn()
        && e.drop.as_ref().is_some_and(|d| {
            ["ip_error", "ip6_pkt_", "dst_discard"]
                .iter()
                .any(|p| d.location.starts_with(p))
        })
}

/// The ICMP error (its sentence and the errno it gives the client) for an ICMP event.
fn icmp_meaning(e: &Event) -> (String, &'static str) {
    let c = e.icmp.as_ref().expect("icmp");
    let v6 = e.protocol == crate::model::Protocol::Icmpv6;
    let (what, errno) = match (v6, c.icmp_type, c.code) {
        (false, 3, 0) | (true, 1, 0) => ("network unreachable", "ENETUNREACH"),
        (false, 3, 9 | 10 | 13) => ("administratively prohibited", "EHOSTUNREACH"),
        (true, 1, 1) => ("administratively prohibited", "EACCES"),
        _ => ("host unreachable", "EHOSTUNREACH"),
    };
    (
        format!("type {} code {} ({what})", c.icmp_type, c.code),
        errno,
    )
}

/// The engine's view: where the lookup failed and what came back. `icmp`: the ICMP error
/// event of the attempt, if any.
pub(super) fn no_route(drop: &Event, icmp: Option<&Event>) -> NoRoute {
    let meaning = icmp.map(icmp_meaning);
    NoRoute {
        netns: ns_name(drop),
        interface: drop.interface.as_ref().and_then(|i| i.name.clone()),
        freed_in: drop
            .drop
            .as_ref()
            .map(|d| d.location.split('+').next().unwrap_or_default().to_string())
            .unwrap_or_default(),
        in_connect: false,
        client_sees: meaning.as_ref().map_or("a timeout", |m| m.1).to_string(),
        icmp: meaning.map(|m| m.0),
        route: None,
    }
}

/// The verdict of a `route_failed` event: a connect() (or send) whose route lookup failed in
/// the client's namespace. No packet existed, so there is no attempt to join (the socket has
/// no port yet): the event alone is the attempt.
pub fn lookup_failed(e: &Event) -> Verdict {
    let errno = e.error.as_ref().map_or(0, |x| x.errno);
    // EAGAIN is one table without a route; connect() gets ENETUNREACH once every table missed.
    let client_sees = if errno == libc::EAGAIN {
        "ENETUNREACH".to_string()
    } else {
        errno_name(errno)
    };
    let mut v = Verdict {
        schema: SCHEMA.into(),
        kind: "verdict".into(),
        outcome: Outcome::Unreachable,
        headline: String::new(),
        client: Endpoint {
            netns: ns_name(e),
            pid: e.process.as_ref().map(|p| p.pid),
            process: e.process.as_ref().map(|p| p.comm.clone()),
            ..Endpoint::at(e.src, e.sport)
        },
        server: Endpoint::at(e.dst, e.dport),
        dialed: None,
        timeline: vec![Checkpoint {
            time_ns: e.time_ns,
            what: checkpoint(e),
            node: None,
        }],
        explanation: String::new(),
        next_steps: Vec::new(),
        drop: None,
        netfilter: None,
        rule_prefix: None,
        listeners: Vec::new(),
        syn_retransmits: 0,
        app_error: Some(client_sees.clone()),
        arrived_via: None,
        left_via: None,
        route: None,
        cross_node: None,
        udp: None,
        written: Default::default(),
        after_handshake: None,
        no_route: Some(NoRoute {
            netns: ns_name(e),
            interface: None,
            freed_in: String::new(),
            in_connect: true,
            icmp: None,
            client_sees,
            route: None,
        }),
        listen_queue: None,
    };
    render(&mut v);
    v
}

/// What a local connect() gets from a lookup that hit `route`.
fn connect_errno(route: &ErrorRoute) -> &'static str {
    match route.kind.as_str() {
        "unreachable" => "EHOSTUNREACH",
        "prohibit" => "EACCES",
        "blackhole" => "EINVAL",
        _ => "ENETUNREACH",
    }
}

/// Outcome, headline, explanation and next steps of a verdict with [`Verdict::no_route`]:
/// rendered by the engine, and again once the route is known.
pub fn render(v: &mut Verdict) {
    if let Some(n) = &mut v.no_route
        && n.in_connect
        && let Some(r) = &n.route
    {
        // The route decides: the event may be an earlier table's miss.
        n.client_sees = connect_errno(r).into();
        v.app_error = Some(n.client_sees.clone());
    }
    let Some(n) = &v.no_route else {
        return;
    };
    let server = v.server.addr;
    let at = n.netns.as_deref().unwrap_or("this namespace");
    let route = n.route.as_ref().map_or_else(
        || "an error route or no route".to_string(),
        ErrorRoute::describe,
    );
    v.outcome = if n.icmp.is_some() || n.in_connect {
        Outcome::Unreachable
    } else {
        Outcome::DroppedByKernel
    };
    v.headline = match &n.route {
        Some(r) if r.kind != "none" => format!("no route: {} route to {server} in {at}", r.kind),
        Some(_) => format!("no route to {server} in {at}"),
        None => format!("no usable route to {server} in {at}"),
    };
    if n.in_connect {
        v.explanation = format!(
            "connect() to {server}:{} in {at} failed before any packet left: the route lookup there hit {route}, so the client gets {} at once.{}",
            v.server.port,
            n.client_sees,
            if n.client_sees == "EINVAL" {
                " (A blackhole route fails a local connect() with EINVAL; forwarded packets it drops silently.)"
            } else {
                ""
            }
        );
        v.next_steps = route_steps(n, (v.client.addr, server), at);
        return;
    }
    let came_in = n
        .interface
        .as_ref()
        .map(|i| format!(" (the SYN came in on {i})"))
        .unwrap_or_default();
    let back = match &n.icmp {
        Some(i) => format!(
            "sent back ICMP {i} itself, so the client gets {}. The ICMP error comes from {at}'s kernel, not from the server",
            n.client_sees
        ),
        None => "sent nothing back, so the client sees a timeout".into(),
    };
    v.explanation = format!(
        "The route lookup for {server} in {at}{came_in} hit {route}: the kernel dropped the SYN there ({}) and {back}.",
        n.freed_in
    );
    v.next_steps = route_steps(n, (v.client.addr, server), at);
}

/// `(client, server)`: the lookup to repeat is the forwarded SYN's.
fn route_steps(
    n: &NoRoute,
    (client, server): (std::net::IpAddr, std::net::IpAddr),
    at: &str,
) -> Vec<String> {
    let client_lookup = format!(
        "ip route get {server}{}",
        n.interface
            .as_ref()
            .map(|i| format!(" from {client} iif {i}"))
            .unwrap_or_default()
    );
    let mut steps = vec![format!("in {at}, see the lookup: `{client_lookup}`")];
    match &n.route {
        Some(r) if r.kind != "none" => {
            steps.push(format!("in {at}, show the route: `{}`", r.show_command(server)));
            steps.push(format!(
                "find who installed it (CNI, a routing daemon, a manual `ip route add {} …`) and remove it if it is stale: `ip route del {} {} table {}`",
                r.kind,
                r.kind,
                r.prefix.as_deref().unwrap_or_default(),
                r.table.as_deref().unwrap_or("main")
            ));
        }
        _ => steps.push(format!(
            "in {at}, add the missing route to {server} (the CNI's pod route, or a default route): `ip route show table all`"
        )),
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{DropInfo, Icmp, Interface, Netns};

    fn drop_at(location: &str) -> Event {
        let mut e = crate::events::derived(
            1,
            Kind::Drop,
            crate::model::Protocol::Tcp,
            (
                "10.42.0.20".parse().unwrap(),
                40000,
                "10.42.0.30".parse().unwrap(),
                9100,
            ),
        );
        e.tcp_flags = vec![crate::model::TcpFlag::Syn];
        e.drop = Some(DropInfo {
            reason: "NOT_SPECIFIED".into(),
            reason_code: 2,
            location: location.into(),
            ..Default::default()
        });
        e.netns = Some(Netns {
            inode: 1,
            name: Some("node".into()),
        });
        e.interface = Some(Interface {
            ifindex: 5,
            name: Some("cali1".into()),
        });
        e
    }

    #[test]
    fn the_icmp_error_is_the_nodes_own() {
        let d = drop_at("ip_error+0x94");
        assert!(is_route_error(&d));
        assert!(!is_route_error(&drop_at("tcp_v4_rcv+0x1")));
        let mut icmp = d.clone();
        icmp.kind = Kind::Packet;
        icmp.icmp = Some(Icmp {
            icmp_type: 3,
            code: 1,
        });
        let n = no_route(&d, Some(&icmp));
        assert_eq!(n.client_sees, "EHOSTUNREACH");
        assert_eq!(n.icmp.as_deref(), Some("type 3 code 1 (host unreachable)"));
        assert_eq!(no_route(&d, None).client_sees, "a timeout");
        assert_eq!(n.freed_in, "ip_error");
        assert!(
            is_route_error(&drop_at("dst_discard_out+0x14")),
            "IPv6 blackhole"
        );
    }

    /// A connect() in a pod whose lookup met an unreachable route: no SYN, no port; the route
    /// (read later in that namespace) decides what the client got, whatever table the event
    /// came from.
    #[test]
    fn a_failed_lookup_in_connect_is_its_own_verdict() {
        let mut e = drop_at("");
        e.kind = Kind::RouteFailed;
        e.drop = None;
        e.interface = None;
        e.sport = 0;
        e.src = "0.0.0.0".parse().unwrap();
        e.netns.as_mut().unwrap().name = Some("client-ns".into());
        e.error = Some(crate::events::ErrorInfo {
            errno: libc::EAGAIN,
            name: "EAGAIN".into(),
        });
        let mut v = lookup_failed(&e);
        assert_eq!(v.outcome, Outcome::Unreachable);
        assert_eq!(v.no_route.as_ref().unwrap().client_sees, "ENETUNREACH");
        assert!(
            v.headline.contains("10.42.0.30 in client-ns"),
            "{}",
            v.headline
        );
        v.no_route.as_mut().unwrap().route = Some(ErrorRoute {
            kind: "unreachable".into(),
            prefix: Some("10.42.0.30/32".into()),
            table: Some("main".into()),
        });
        render(&mut v);
        assert_eq!(v.no_route.as_ref().unwrap().client_sees, "EHOSTUNREACH");
        assert_eq!(v.app_error.as_deref(), Some("EHOSTUNREACH"));
        assert_eq!(
            v.headline,
            "no route: unreachable route to 10.42.0.30 in client-ns"
        );
        assert!(
            v.explanation.starts_with("connect() to 10.42.0.30:9100 in client-ns failed before any packet left: the route lookup there hit the unreachable route 10.42.0.30/32 (table main), so the client gets EHOSTUNREACH"),
            "{}",
            v.explanation
        );
        assert_eq!(
            v.next_steps[0],
            "in client-ns, see the lookup: `ip route get 10.42.0.30`"
        );
        let json = serde_json::to_value(&v).unwrap();
        assert!(json["no_route"].get("freed_in").is_none(), "{json:#}");
        assert_eq!(json["no_route"]["in_connect"], true);
    }
}
