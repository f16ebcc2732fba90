//! Where a connection really went: the conntrack entry of a tuple (ctnetlink `IPCTNL_MSG_CT_GET`,
//! as `conntrack -G`). A socket knows the ClusterIP it dialled; after kube-proxy's DNAT the reply
//! tuple names the backend, and with it the backend's pod and node. The parser is a pure
//! function (fuzzed); the query runs in the calling thread's namespace.

use std::net::IpAddr;

use crate::{
    error::{Error, Result},
    netlink::{Socket, attrs, encode_attr as attr, ip_of},
};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NFGENMSG_LEN: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// One direction of a conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

/// A conntrack entry: what the client sent and what the server answers from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub original: Tuple,
    pub reply: Tuple,
}

impl Entry {
    /// The destination after DNAT (the reply's source), when it differs from the original.
    pub fn translated_destination(&self) -> Option<(IpAddr, u16)> {
        let real = (self.reply.src, self.reply.sport);
        (real != (self.original.dst, self.original.dport)).then_some(real)
    }
}

/// The `IPCTNL_MSG_CT_GET` request body for `t` (original direction).
pub fn request(proto: u8, t: &Tuple) -> Vec<u8> {
    let (family, src_ty, dst_ty, src, dst) = match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (
            libc::AF_INET as u8,
            CTA_IP_V4_SRC,
            CTA_IP_V4_DST,
            s.octets().to_vec(),
            d.octets().to_vec(),
        ),
        (s, d) => (
            libc::AF_INET6 as u8,
            CTA_IP_V6_SRC,
            CTA_IP_V6_DST,
            v6(s).to_vec(),
            v6(d).to_vec(),
        ),
    };
    let mut ip = attr(src_ty, &src);
    ip.extend(attr(dst_ty, &dst));
    let mut l4 = attr(CTA_PROTO_NUM, &[proto]);
    l4.extend(attr(CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes()));
    l4.extend(attr(CTA_PROTO_DST_PORT, &t.dport.to_be_bytes()));
    let mut tuple = attr(CTA_TUPLE_IP | NLA_F_NESTED, &ip);
    tuple.extend(attr(CTA_TUPLE_PROTO | NLA_F_NESTED, &l4));
    // nfgenmsg: family, version 0, res_id 0.
    let mut body = vec![family, 0, 0, 0];
    body.extend(attr(CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple));
    body
}

fn v6(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn parse_tuple(b: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst, mut sport, mut dport) = (None, None, None, None);
    for (ty, p) in attrs(b) {
        match ty {
            CTA_TUPLE_IP => {
                for (ity, ip) in attrs(p) {
                    match ity {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = ip_of(ip),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = ip_of(ip),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (pty, pp) in attrs(p) {
                    let port = pp.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
                    match pty {
                        CTA_PROTO_SRC_PORT => sport = port,
                        CTA_PROTO_DST_PORT => dport = port,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple {
        src: src?,
        sport: sport?,
        dst: dst?,
        dport: dport?,
    })
}

/// Parses the body of a ctnetlink `IPCTNL_MSG_CT_NEW` message (nfgenmsg + attributes).
pub fn parse_entry(body: &[u8]) -> Option<Entry> {
    let (mut original, mut reply) = (None, None);
    for (ty, p) in attrs(body.get(NFGENMSG_LEN..)?) {
        match ty {
            CTA_TUPLE_ORIG => original = parse_tuple(p),
            CTA_TUPLE_REPLY => reply = parse_tuple(p),
            _ => {}
        }
    }
    Some(Entry {
        original: original?,
        reply: reply?,
    })
}

/// The conntrack entry of `t` (protocol `proto`) in the calling thread's namespace; `None`
/// when there is none (never confirmed: e.g. dropped before the end of netfilter).
pub fn lookup(proto: u8, t: &Tuple) -> Result<Option<Entry>> {
    let err = |source| Error::Netlink {
        what: "conntrack IPCTNL_MSG_CT_GET",
        source,
    };
    let sock = Socket::open(libc::NETLINK_NETFILTER).map_err(err)?;
    sock.send(
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
        0,
        &request(proto, t),
    )
    .map_err(err)?;
    let mut entry = None;
    match sock.recv_all(true, |ty, body| {
        if ty == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW {
            entry = parse_entry(body);
        }
    }) {
        Ok(()) => Ok(entry),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_tuple_names_the_backend_after_dnat() {
        let original = Tuple {
            src: "10.42.0.5".parse().unwrap(),
            sport: 40000,
            dst: "10.43.51.131".parse().unwrap(),
            dport: 9004,
        };
        let reply = Tuple {
            src: "10.42.1.7".parse().unwrap(),
            sport: 9004,
            dst: "10.42.0.5".parse().unwrap(),
            dport: 40000,
        };
        // The kernel's answer has the request's shape: build it with the request encoder.
        let mut body = request(libc::IPPROTO_TCP as u8, &original);
        let reply_req = request(libc::IPPROTO_TCP as u8, &reply);
        let mut reply_attr = reply_req[NFGENMSG_LEN..].to_vec();
        reply_attr[2..4].copy_from_slice(&(CTA_TUPLE_REPLY | NLA_F_NESTED).to_ne_bytes());
        body.extend(reply_attr);
        body.extend(attr(3, &0x0000_018eu32.to_be_bytes())); // CTA_STATUS: ignored
        let e = parse_entry(&body).unwrap();
        assert_eq!(e.original, original);
        assert_eq!(e.reply, reply);
        assert_eq!(
            e.translated_destination(),
            Some(("10.42.1.7".parse().unwrap(), 9004))
        );
        // Truncated or foreign input: None, never a panic.
        assert!(parse_entry(&body[..body.len() / 2]).is_none());
        assert!(parse_entry(&[1, 2]).is_none());
    }
}
