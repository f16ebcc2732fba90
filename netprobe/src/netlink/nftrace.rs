//! The nftables trace listener: packets marked `meta nftrace set 1` make nf_tables report every
//! rule they match (table, chain, rule handle, verdict) on the NFNLGRP_NFTRACE netlink group of
//! their namespace. This module owns the socket and the parsing; the parser is a pure function.
//! <https://elixir.bootlin.com/linux/v6.18/source/include/uapi/linux/netfilter/nf_tables.h>

use std::{io, net::IpAddr, os::fd::RawFd};

use crate::netlink::{attrs, c_string as cstr, messages};

const NETLINK_NETFILTER: i32 = 12;
const NFNLGRP_NFTRACE: u32 = 9;
const SOL_NETLINK: i32 = 270;
const NETLINK_ADD_MEMBERSHIP: i32 = 1;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_TRACE: u16 = 17;
const NFGENMSG_LEN: usize = 4;

const NFTA_TRACE_TABLE: u16 = 1;
const NFTA_TRACE_CHAIN: u16 = 2;
const NFTA_TRACE_RULE_HANDLE: u16 = 3;
const NFTA_TRACE_TYPE: u16 = 4;
const NFTA_TRACE_VERDICT: u16 = 5;
const NFTA_TRACE_ID: u16 = 6;
const NFTA_TRACE_NETWORK_HEADER: u16 = 8;
const NFTA_TRACE_TRANSPORT_HEADER: u16 = 9;
const NFTA_TRACE_IIF: u16 = 10;
const NFTA_TRACE_OIF: u16 = 12;
const NFTA_TRACE_NFPROTO: u16 = 15;
const NFTA_TRACE_POLICY: u16 = 16;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// `enum nft_trace_types`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceType {
    Policy,
    Return,
    Rule,
    Other(u32),
}

/// A netfilter verdict (`NF_*` and `NFT_*` codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Drop,
    Accept,
    Stolen,
    Queue,
    Continue,
    Break,
    Jump(String),
    Goto(String),
    Return,
    Other(i32),
}

impl Verdict {
    fn from_code(code: i32, chain: Option<String>) -> Self {
        match code {
            0 => Self::Drop,
            1 => Self::Accept,
            2 => Self::Stolen,
            3 => Self::Queue,
            -1 => Self::Continue,
            -2 => Self::Break,
            -3 => Self::Jump(chain.unwrap_or_default()),
            -4 => Self::Goto(chain.unwrap_or_default()),
            -5 => Self::Return,
            c => Self::Other(c),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Self::Drop => "drop".into(),
            Self::Accept => "accept".into(),
            Self::Stolen => "stolen".into(),
            Self::Queue => "queue".into(),
            Self::Continue => "continue".into(),
            Self::Break => "break".into(),
            Self::Jump(c) => format!("jump {c}"),
            Self::Goto(c) => format!("goto {c}"),
            Self::Return => "return".into(),
            Self::Other(c) => format!("verdict {c}"),
        }
    }
}

/// One NFT_MSG_TRACE message: a packet (by trace `id`) hit a rule or a chain policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceMsg {
    pub id: u32,
    /// `NFPROTO_*` of the table (2 ip, 10 ip6, 1 inet …).
    pub table_family: u8,
    /// `NFPROTO_*` of the packet (2 ipv4, 10 ipv6).
    pub nfproto: u8,
    pub table: String,
    pub chain: String,
    pub handle: Option<u64>,
    pub kind: TraceType,
    pub verdict: Option<Verdict>,
    pub policy: Option<u32>,
    pub iif: Option<u32>,
    pub oif: Option<u32>,
    /// (src, sport, dst, dport) from the traced packet's headers, when present. For an ICMP
    /// error: the ICMP packet's own addresses, its type and code as `sport`.
    pub tuple: Option<(IpAddr, u16, IpAddr, u16)>,
    /// The packet's `IPPROTO_*` (from its network header), when present.
    pub l4proto: Option<u8>,
}

fn be32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

fn be64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

/// The protocol field of an IPv4 header, the next header of an IPv6 one.
fn l4proto_of(net: &[u8]) -> Option<u8> {
    match net.first()? >> 4 {
        4 => net.get(9).copied(),
        6 => net.get(6).copied(),
        _ => None,
    }
}

fn tuple_of(net: &[u8], transport: Option<&[u8]>) -> Option<(IpAddr, u16, IpAddr, u16)> {
    let (src, dst, l4_in_net): (IpAddr, IpAddr, Option<&[u8]>) = match net.first()? >> 4 {
        4 if net.len() >= 20 => {
            let ihl = (net[0] & 0x0f) as usize * 4;
            (
                IpAddr::from(<[u8; 4]>::try_from(&net[12..16]).ok()?),
                IpAddr::from(<[u8; 4]>::try_from(&net[16..20]).ok()?),
                net.get(ihl..),
            )
        }
        6 if net.len() >= 40 => (
            IpAddr::from(<[u8; 16]>::try_from(&net[8..24]).ok()?),
            IpAddr::from(<[u8; 16]>::try_from(&net[24..40]).ok()?),
            net.get(40..),
        ),
        _ => return None,
    };
    let l4 = transport.or(l4_in_net).filter(|t| t.len() >= 4);
    let (sport, dport) = l4.map_or((0, 0), |t| {
        (
            u16::from_be_bytes([t[0], t[1]]),
            u16::from_be_bytes([t[2], t[3]]),
        )
    });
    Some((src, sport, dst, dport))
}

/// Parses one netlink message body of type `(NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_TRACE`.
pub fn parse_trace(body: &[u8]) -> Option<TraceMsg> {
    if body.len() < NFGENMSG_LEN {
        return None;
    }
    let mut m = TraceMsg {
        id: 0,
        table_family: body[0],
        nfproto: 0,
        table: String::new(),
        chain: String::new(),
        handle: None,
        kind: TraceType::Other(0),
        verdict: None,
        policy: None,
        iif: None,
        oif: None,
        tuple: None,
        l4proto: None,
    };
    let mut net = None;
    let mut transport = None;
    for (ty, p) in attrs(&body[NFGENMSG_LEN..]) {
        match ty {
            NFTA_TRACE_TABLE => m.table = cstr(p),
            NFTA_TRACE_CHAIN => m.chain = cstr(p),
            NFTA_TRACE_RULE_HANDLE => m.handle = be64(p),
            NFTA_TRACE_TYPE => {
                m.kind = match be32(p)? {
                    1 => TraceType::Policy,
                    2 => TraceType::Return,
                    3 => TraceType::Rule,
                    o => TraceType::Other(o),
                }
            }
            NFTA_TRACE_VERDICT => {
                let mut code = None;
                let mut chain = None;
                for (vt, vp) in attrs(p) {
                    match vt {
                        NFTA_VERDICT_CODE => code = be32(vp).map(|c| c as i32),
                        NFTA_VERDICT_CHAIN => chain = Some(cstr(vp)),
                        _ => {}
                    }
                }
                m.verdict = code.map(|c| Verdict::from_code(c, chain));
            }
            NFTA_TRACE_ID => m.id = be32(p)?,
            NFTA_TRACE_NETWORK_HEADER => net = Some(p),
            NFTA_TRACE_TRANSPORT_HEADER => transport = Some(p),
            NFTA_TRACE_IIF => m.iif = be32(p),
            NFTA_TRACE_OIF => m.oif = be32(p),
            NFTA_TRACE_NFPROTO => m.nfproto = be32(p)? as u8,
            NFTA_TRACE_POLICY => m.policy = be32(p),
            _ => {}
        }
    }
    if m.kind == TraceType::Policy && m.verdict.is_none() {
        m.verdict = m.policy.map(|p| Verdict::from_code(p as i32, None));
    }
    m.tuple = net.and_then(|n| tuple_of(n, transport));
    m.l4proto = net.and_then(l4proto_of);
    Some(m)
}

/// A socket subscribed to the nftables trace group of the namespace it was created in.
pub struct TraceSocket(RawFd);

impl TraceSocket {
    /// Must be called on a thread inside the namespace to listen to.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain syscalls with valid arguments; the fd is owned by the returned value.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let s = Self(fd);
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            if libc::bind(
                fd,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            let group = NFNLGRP_NFTRACE;
            if libc::setsockopt(
                fd,
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                (&group as *const u32).cast(),
                4,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // Big receive buffer: a traced SYN storm produces many messages per packet.
            let size: i32 = 8 << 20;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const i32).cast(),
                4,
            );
            // A read timeout lets the reader thread notice it should stop.
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            Ok(s)
        }
    }

    /// Receives one datagram and hands its trace messages to `f`. `Ok(false)` on timeout.
    /// ENOBUFS (messages lost because the socket overflowed) is reported as an error the caller counts.
    pub fn recv(&self, buf: &mut [u8], mut f: impl FnMut(TraceMsg)) -> io::Result<bool> {
        // SAFETY: valid buffer.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(false),
                _ => Err(e),
            };
        }
        for (ty, body) in messages(&buf[..n as usize]) {
            if ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_TRACE
                && let Some(m) = parse_trace(body)
            {
                f(m);
            }
        }
        Ok(true)
    }
}

impl Drop for TraceSocket {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::netlink::encode_attr as attr;

    #[test]
    fn parses_a_rule_drop_with_headers() {
        let mut body = vec![2u8, 0, 0, 0];
        body.extend(attr(NFTA_TRACE_TABLE, b"filter\0"));
        body.extend(attr(NFTA_TRACE_CHAIN, b"cali-tw-cali1a2b3c4d5e6\0"));
        body.extend(attr(NFTA_TRACE_RULE_HANDLE, &42u64.to_be_bytes()));
        body.extend(attr(NFTA_TRACE_TYPE, &3u32.to_be_bytes()));
        body.extend(attr(
            NFTA_TRACE_VERDICT | 0x8000,
            &attr(NFTA_VERDICT_CODE, &0u32.to_be_bytes()),
        ));
        body.extend(attr(NFTA_TRACE_ID, &0xdeadbeefu32.to_be_bytes()));
        body.extend(attr(NFTA_TRACE_NFPROTO, &2u32.to_be_bytes()));
        body.extend(attr(NFTA_TRACE_IIF, &7u32.to_be_bytes()));
        let mut ip = vec![
            0x45u8, 0, 0, 60, 0, 0, 0, 0, 64, 6, 0, 0, 10, 42, 0, 20, 10, 42, 0, 30,
        ];
        ip.extend_from_slice(&[0xa0, 0x00, 0x23, 0x2c]); // 40960 -> 9004
        body.extend(attr(NFTA_TRACE_NETWORK_HEADER, &ip[..20]));
        body.extend(attr(NFTA_TRACE_TRANSPORT_HEADER, &ip[20..]));
        let m = parse_trace(&body).unwrap();
        assert_eq!(m.id, 0xdeadbeef);
        assert_eq!(m.table, "filter");
        assert_eq!(m.chain, "cali-tw-cali1a2b3c4d5e6");
        assert_eq!(m.handle, Some(42));
        assert_eq!(m.kind, TraceType::Rule);
        assert_eq!(m.verdict, Some(Verdict::Drop));
        assert_eq!(m.iif, Some(7));
        assert_eq!(m.l4proto, Some(6));
        assert_eq!(
            m.tuple,
            Some((
                "10.42.0.20".parse().unwrap(),
                40960,
                "10.42.0.30".parse().unwrap(),
                9004
            ))
        );
    }

    #[test]
    fn jump_verdict_carries_the_chain_and_policy_falls_back() {
        let mut body = vec![1u8, 0, 0, 0];
        let mut v = attr(NFTA_VERDICT_CODE, &(-3i32 as u32).to_be_bytes());
        v.extend(attr(NFTA_VERDICT_CHAIN, b"cali-pi-_abc\0"));
        body.extend(attr(NFTA_TRACE_VERDICT, &v));
        body.extend(attr(NFTA_TRACE_TYPE, &3u32.to_be_bytes()));
        assert_eq!(
            parse_trace(&body).unwrap().verdict,
            Some(Verdict::Jump("cali-pi-_abc".into()))
        );
        let mut pol = vec![2u8, 0, 0, 0];
        pol.extend(attr(NFTA_TRACE_TYPE, &1u32.to_be_bytes()));
        pol.extend(attr(NFTA_TRACE_POLICY, &0u32.to_be_bytes()));
        assert_eq!(parse_trace(&pol).unwrap().verdict, Some(Verdict::Drop));
        assert!(parse_trace(&[1, 2]).is_none());
    }
}
