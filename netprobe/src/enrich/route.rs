//! What lies beyond this node for a destination: the route (`ip route get`) and its device,
//! with the overlay's encapsulation (VXLAN, IPIP) and the underlay device it rides on; and when
//! a lookup failed, the route that made it fail (`unreachable`, `blackhole`, `prohibit`) or the
//! absence of any.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    error::Result,
    model::{Encap, RouteHint},
    netlink,
};

/// The route the calling thread's namespace uses toward `dst`; `None` when there is none.
pub fn route_hint(dst: IpAddr) -> Result<Option<RouteHint>> {
    let Some(route) = netlink::route_to(dst)? else {
        return Ok(None);
    };
    let links = netlink::links()?;
    let name_of = |i: u32| links.iter().find(|l| l.index == i).map(|l| l.name.clone());
    let Some(link) = route.oif.and_then(|i| links.iter().find(|l| l.index == i)) else {
        return Ok(None);
    };
    let remote = match (&link.tunnel, link.kind.as_deref()) {
        (Some(t), _) if t.remote.is_some() => t.remote,
        (Some(_), Some("vxlan")) => route
            .gateway
            .and_then(|gw| vxlan_remote(link.index, gw).ok().flatten()),
        _ => None,
    };
    Ok(Some(RouteHint {
        dst,
        dev: link.name.clone(),
        kind: link.kind.clone(),
        mtu: link.mtu,
        gateway: route.gateway,
        encap: link.tunnel.as_ref().map(|t| Encap {
            kind: link.kind.clone().unwrap_or_default(),
            vni: t.vni,
            port: t.port,
            underlay: t.underlay.and_then(name_of),
            local: t.local,
            remote,
        }),
    }))
}

/// The remote VTEP a VXLAN device sends a next hop's packets to, the way Flannel programs it:
/// the next hop's MAC (neighbour entry on the device), then that MAC's FDB entry (its `dst`).
fn vxlan_remote(ifindex: u32, gateway: IpAddr) -> Result<Option<IpAddr>> {
    let family = match gateway {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    };
    let Some(mac) = netlink::neighbours(family)?
        .into_iter()
        .find(|n| n.ifindex == ifindex && n.dst == Some(gateway))
        .and_then(|n| n.lladdr)
    else {
        return Ok(None);
    };
    Ok(netlink::neighbours(libc::AF_BRIDGE as u8)?
        .into_iter()
        .find(|n| n.ifindex == ifindex && n.lladdr.as_ref() == Some(&mac))
        .and_then(|n| n.dst))
}

/// The route a failed lookup hit: its type, prefix and table; `kind` "none" when no route of
/// any table covers the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorRoute {
    /// `unreachable`, `blackhole`, `prohibit`, `throw`, or `none`.
    pub kind: String,
    /// `10.42.0.30/32`, `default`; absent for `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// `main`, `local`, `default`, or the table number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
}

impl ErrorRoute {
    /// `the unreachable route 10.42.0.30/32 (table main)`, `no route`
    pub fn describe(&self) -> String {
        match (&self.prefix, &self.table) {
            (Some(p), Some(t)) => format!("the {} route {p} (table {t})", self.kind),
            _ => "no route (no table has one for it, and no default route)".into(),
        }
    }

    /// The `ip route` command that shows it in a namespace (`-n NS` prepended by the caller).
    pub fn show_command(&self, dst: IpAddr) -> String {
        match (&self.prefix, &self.table) {
            (Some(p), Some(t)) => format!("ip route show table {t} type {} {p}", self.kind),
            _ => format!("ip route get {dst}"),
        }
    }
}

/// One entry of a route dump (what the choice of an error route needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub rtype: u8,
    pub table: u32,
    pub dst: Option<IpAddr>,
    pub dst_len: u8,
}

const RTN_BLACKHOLE: u8 = 6;
const RTN_UNREACHABLE: u8 = 7;
const RTN_PROHIBIT: u8 = 8;
const RTN_THROW: u8 = 9;

/// The route the calling thread's namespace's lookup of `dst` hits when that route is an error
/// route, or `kind: none` when no route covers `dst`; `None` when a usable route does (the
/// failure was elsewhere). The longest prefix of every table: policy rules are not followed.
pub fn error_route(dst: IpAddr) -> Result<Option<ErrorRoute>> {
    Ok(pick_error_route(&route_dump(dst)?, dst))
}

/// Of the routes covering `dst`, the most specific (local table first on a tie, as the
/// default rules look it up); an error route is the answer, a usable route is none.
pub fn pick_error_route(entries: &[RouteEntry], dst: IpAddr) -> Option<ErrorRoute> {
    let table_rank = |t: u32| match t {
        255 => 0,
        254 => 1,
        253 => 2,
        _ => 3,
    };
    let best = entries
        .iter()
        .filter(|e| covers(e, dst))
        .min_by_key(|e| (std::cmp::Reverse(e.dst_len), table_rank(e.table)));
    let Some(e) = best else {
        return Some(ErrorRoute {
            kind: "none".into(),
            prefix: None,
            table: None,
        });
    };
    let kind = match e.rtype {
        RTN_BLACKHOLE => "blackhole",
        RTN_UNREACHABLE => "unreachable",
        RTN_PROHIBIT => "prohibit",
        RTN_THROW => "throw",
        _ => return None,
    };
    Some(ErrorRoute {
        kind: kind.into(),
        prefix: Some(match e.dst {
            Some(a) if e.dst_len > 0 => format!("{a}/{}", e.dst_len),
            _ => "default".into(),
        }),
        table: Some(match e.table {
            255 => "local".into(),
            254 => "main".into(),
            253 => "default".into(),
            t => t.to_string(),
        }),
    })
}

fn covers(e: &RouteEntry, dst: IpAddr) -> bool {
    let Some(net) = e.dst else {
        return e.dst_len == 0;
    };
    let (a, b, bits) = match (net, dst) {
        (IpAddr::V4(n), IpAddr::V4(d)) => (u32::from(n) as u128, u32::from(d) as u128, 32),
        (IpAddr::V6(n), IpAddr::V6(d)) => (u128::from(n), u128::from(d), 128),
        _ => return false,
    };
    let len = u32::from(e.dst_len).min(bits);
    let shift = bits - len;
    len == 0 || (a >> shift) == (b >> shift)
}

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTMSG_LEN: usize = 12;
const RTA_DST: u16 = 1;
const RTA_TABLE: u16 = 15;
const NLM_F_DUMP: u16 = 0x300;

/// Every route of every table of `dst`'s family (`ip route show table all`).
fn route_dump(dst: IpAddr) -> Result<Vec<RouteEntry>> {
    let err = |source| crate::error::Error::Netlink {
        what: "RTM_GETROUTE dump",
        source,
    };
    let family = match dst {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    };
    let sock = netlink::Socket::route().map_err(err)?;
    let mut req = [0u8; RTMSG_LEN];
    req[0] = family;
    sock.send(RTM_GETROUTE, NLM_F_DUMP, &req).map_err(err)?;
    let mut out = Vec::new();
    sock.recv_all(false, |ty, body| {
        if ty == RTM_NEWROUTE
            && let Some(e) = parse_route_entry(body)
        {
            out.push(e);
        }
    })
    .map_err(err)?;
    Ok(out)
}

/// Parses an RTM_NEWROUTE body: rtmsg (family, dst_len, …, table, protocol, scope, type) and
/// the RTA_DST / RTA_TABLE attributes.
pub fn parse_route_entry(body: &[u8]) -> Option<RouteEntry> {
    let head = body.get(..RTMSG_LEN)?;
    let mut e = RouteEntry {
        rtype: head[7],
        table: u32::from(head[4]),
        dst: None,
        dst_len: head[1],
    };
    for (ty, p) in netlink::attrs(&body[RTMSG_LEN..]) {
        match (ty, p.len()) {
            (RTA_DST, 4) => e.dst = Some(IpAddr::from(<[u8; 4]>::try_from(p).ok()?)),
            (RTA_DST, 16) => e.dst = Some(IpAddr::from(<[u8; 16]>::try_from(p).ok()?)),
            (RTA_TABLE, 4) => e.table = u32::from_ne_bytes(p.try_into().ok()?),
            _ => {}
        }
    }
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(rtype: u8, table: u32, dst: Option<&str>, len: u8) -> RouteEntry {
        RouteEntry {
            rtype,
            table,
            dst: dst.map(|d| d.parse().unwrap()),
            dst_len: len,
        }
    }

    #[test]
    fn the_most_specific_route_decides() {
        let dst: IpAddr = "10.42.0.30".parse().unwrap();
        let routes = [
            r(1, 254, None, 0),
            r(1, 254, Some("10.42.0.0"), 24),
            r(RTN_UNREACHABLE, 254, Some("10.42.0.30"), 32),
            r(RTN_BLACKHOLE, 254, Some("10.43.0.0"), 16),
        ];
        let e = pick_error_route(&routes, dst).unwrap();
        assert_eq!(e.kind, "unreachable");
        assert_eq!(e.prefix.as_deref(), Some("10.42.0.30/32"));
        assert_eq!(e.table.as_deref(), Some("main"));
        assert_eq!(
            e.describe(),
            "the unreachable route 10.42.0.30/32 (table main)"
        );
        assert_eq!(pick_error_route(&routes[..2], dst), None, "usable route");
        let none = pick_error_route(&routes[3..], dst).unwrap();
        assert_eq!(none.kind, "none");
        let bh = pick_error_route(&[r(RTN_BLACKHOLE, 100, None, 0)], dst).unwrap();
        assert_eq!(
            (bh.prefix.as_deref(), bh.table.as_deref()),
            (Some("default"), Some("100"))
        );
    }
}
