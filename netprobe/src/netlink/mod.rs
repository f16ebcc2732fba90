//! A minimal rtnetlink client: the two questions netprobe asks (which links exist, and which id
//! the current namespace gives another namespace). Raw sockets and a small attribute parser keep
//! the static binary lean; the parser is a pure function, unit-tested and fuzzable.

use std::{io, os::fd::RawFd};

pub mod nftrace;

use crate::error::{Error, Result};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
// IFLA_VXLAN_* and IFLA_IPTUN_* (include/uapi/linux/if_link.h, if_tunnel.h).
const IFLA_VXLAN_ID: u16 = 1;
const IFLA_VXLAN_GROUP: u16 = 2;
const IFLA_VXLAN_LINK: u16 = 3;
const IFLA_VXLAN_LOCAL: u16 = 4;
const IFLA_VXLAN_PORT: u16 = 15;
const IFLA_IPTUN_LINK: u16 = 1;
const IFLA_IPTUN_LOCAL: u16 = 2;
const IFLA_IPTUN_REMOTE: u16 = 3;
const IFLA_LINK_NETNSID: u16 = 37;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;
const IFINFOMSG_LEN: usize = 16;
const RTGENMSG_LEN: usize = 4;
const IFF_UP: u32 = 1;

/// A network interface of the current namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`: "veth", "vxlan", … (`None` for lo and physical devices).
    pub kind: Option<String>,
    /// Peer ifindex for veth (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// Id (in this namespace) of the namespace the peer lives in.
    pub link_netnsid: Option<i32>,
    pub up: bool,
    pub mtu: Option<u32>,
    /// Encapsulation parameters of a VXLAN or IPIP device (the overlay of Flannel and Calico).
    pub tunnel: Option<Tunnel>,
}

/// What an overlay device wraps packets in, and over which underlay device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tunnel {
    /// VXLAN network identifier.
    pub vni: Option<u32>,
    /// VXLAN UDP destination port (Flannel: 8472, Calico: 4789).
    pub port: Option<u16>,
    /// Ifindex of the underlay device the encapsulated packets leave on.
    pub underlay: Option<u32>,
    pub local: Option<std::net::IpAddr>,
    /// A fixed remote endpoint (point-to-point devices; Flannel uses per-peer FDB entries).
    pub remote: Option<std::net::IpAddr>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterates `(type, payload)` over netlink attributes; stops at the first malformed one.
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((ty, payload))
    })
}

/// A NUL-terminated (or not) string attribute.
pub(crate) fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn u32_of(b: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(..4)?.try_into().ok()?))
}

/// An IPv4 (4 bytes) or IPv6 (16 bytes) address attribute; `0.0.0.0` counts as absent.
pub(crate) fn ip_of(b: &[u8]) -> Option<std::net::IpAddr> {
    let ip: std::net::IpAddr = match b.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?).into(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?).into(),
        _ => return None,
    };
    (!ip.is_unspecified()).then_some(ip)
}

/// `IFLA_INFO_DATA` of a "vxlan" or "ipip" link.
fn parse_tunnel(kind: &str, data: &[u8]) -> Option<Tunnel> {
    let mut t = Tunnel::default();
    match kind {
        "vxlan" => {
            for (ty, p) in attrs(data) {
                match ty {
                    IFLA_VXLAN_ID => t.vni = u32_of(p),
                    IFLA_VXLAN_GROUP => t.remote = ip_of(p),
                    IFLA_VXLAN_LINK => t.underlay = u32_of(p).filter(|i| *i != 0),
                    IFLA_VXLAN_LOCAL => t.local = ip_of(p),
                    // Network byte order.
                    IFLA_VXLAN_PORT => {
                        t.port = p.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]))
                    }
                    _ => {}
                }
            }
        }
        "ipip" => {
            for (ty, p) in attrs(data) {
                match ty {
                    IFLA_IPTUN_LINK => t.underlay = u32_of(p).filter(|i| *i != 0),
                    IFLA_IPTUN_LOCAL => t.local = ip_of(p),
                    IFLA_IPTUN_REMOTE => t.remote = ip_of(p),
                    _ => {}
                }
            }
        }
        _ => return None,
    }
    Some(t)
}

/// Parses the body of an RTM_NEWLINK message (ifinfomsg + attributes).
pub fn parse_link(body: &[u8]) -> Option<Link> {
    if body.len() < IFINFOMSG_LEN {
        return None;
    }
    let index = u32::from_ne_bytes(body[4..8].try_into().ok()?);
    let flags = u32::from_ne_bytes(body[8..12].try_into().ok()?);
    let mut link = Link {
        index,
        name: String::new(),
        kind: None,
        peer_index: None,
        link_netnsid: None,
        up: flags & IFF_UP != 0,
        mtu: None,
        tunnel: None,
    };
    for (ty, p) in attrs(&body[IFINFOMSG_LEN..]) {
        match ty {
            IFLA_IFNAME => link.name = c_string(p),
            IFLA_MTU => link.mtu = u32_of(p),
            IFLA_LINK => link.peer_index = u32_of(p),
            IFLA_LINK_NETNSID => link.link_netnsid = u32_of(p).map(|v| v as i32),
            IFLA_LINKINFO => {
                let mut data = None;
                for (ity, ip) in attrs(p) {
                    match ity {
                        IFLA_INFO_KIND => link.kind = Some(c_string(ip)),
                        IFLA_INFO_DATA => data = Some(ip),
                        _ => {}
                    }
                }
                if let (Some(kind), Some(data)) = (&link.kind, data) {
                    link.tunnel = parse_tunnel(kind, data);
                }
            }
            _ => {}
        }
    }
    (!link.name.is_empty()).then_some(link)
}

/// Splits a netlink datagram into `(type, body)` messages.
pub fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        let body = &buf[NLMSG_HDRLEN..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((ty, body))
    })
}

pub(crate) struct Socket(RawFd);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

impl Socket {
    pub(crate) fn route() -> io::Result<Self> {
        Self::open(libc::NETLINK_ROUTE)
    }

    pub(crate) fn open(protocol: i32) -> io::Result<Self> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    pub(crate) fn send(&self, ty: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
        let len = NLMSG_HDRLEN + payload.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: kernel assigns
        msg.extend_from_slice(payload);
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: valid buffer and address.
        let n = unsafe {
            libc::sendto(
                self.0,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Receives replies, handing each message to `f` until DONE (dump) or one reply (`single`).
    pub(crate) fn recv_all(&self, single: bool, mut f: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: valid buffer.
            let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for (ty, body) in messages(&buf[..n as usize]) {
                match ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let errno = i32::from_ne_bytes(
                            body.get(..4)
                                .and_then(|b| b.try_into().ok())
                                .unwrap_or([0; 4]),
                        );
                        if errno != 0 {
                            return Err(io::Error::from_raw_os_error(-errno));
                        }
                        return Ok(());
                    }
                    _ => f(ty, body),
                }
            }
            if single {
                return Ok(());
            }
        }
    }
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_REQ_V2_LEN: usize = 56;
const INET_DIAG_MSG_LEN: usize = 72;
const INET_DIAG_SKV6ONLY: u16 = 11;
const TCP_LISTEN: u32 = 10;

/// A listening TCP socket (from sock_diag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSocket {
    pub addr: std::net::IpAddr,
    pub port: u16,
    /// IPv6 socket that does not accept IPv4 (`IPV6_V6ONLY`).
    pub v6only: bool,
    pub inode: u32,
    /// For a listener: connections waiting for accept() (`idiag_rqueue`), and its backlog
    /// (`idiag_wqueue`).
    pub rqueue: u32,
    pub wqueue: u32,
}

/// Parses one `inet_diag_msg` (+ attributes).
pub fn parse_inet_diag(body: &[u8]) -> Option<ListenSocket> {
    if body.len() < INET_DIAG_MSG_LEN {
        return None;
    }
    let family = body[0];
    let port = u16::from_be_bytes([body[4], body[5]]);
    let src = &body[8..24];
    let addr = if family == libc::AF_INET as u8 {
        std::net::IpAddr::from(<[u8; 4]>::try_from(&src[..4]).ok()?)
    } else {
        std::net::IpAddr::from(<[u8; 16]>::try_from(src).ok()?)
    };
    let inode = u32::from_ne_bytes(body[68..72].try_into().ok()?);
    let rqueue = u32::from_ne_bytes(body[56..60].try_into().ok()?);
    let wqueue = u32::from_ne_bytes(body[60..64].try_into().ok()?);
    let mut v6only = false;
    for (ty, p) in attrs(&body[INET_DIAG_MSG_LEN..]) {
        if ty == INET_DIAG_SKV6ONLY {
            v6only = p.first().is_some_and(|b| *b != 0);
        }
    }
    Some(ListenSocket {
        addr,
        port,
        v6only,
        inode,
        rqueue,
        wqueue,
    })
}

/// Listening TCP sockets (IPv4 and IPv6) of the calling thread's network namespace.
pub fn tcp_listeners() -> Result<Vec<ListenSocket>> {
    inet_sockets(libc::IPPROTO_TCP as u8, 1 << TCP_LISTEN)
}

/// `TCP_CLOSE`: the state sock_diag reports for an unconnected UDP socket.
const UDP_UNCONNECTED: u32 = 7;

/// UDP sockets bound to a port and not connected (IPv4 and IPv6): the UDP "listeners" of the
/// calling thread's network namespace.
pub fn udp_listeners() -> Result<Vec<ListenSocket>> {
    let mut out = inet_sockets(libc::IPPROTO_UDP as u8, 1 << UDP_UNCONNECTED)?;
    out.retain(|s| s.port != 0);
    Ok(out)
}

/// sock_diag dump of `proto` sockets in the states of the `states` bit mask.
fn inet_sockets(proto: u8, states: u32) -> Result<Vec<ListenSocket>> {
    let err = |source| Error::Netlink {
        what: "sock_diag dump",
        source,
    };
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let sock = Socket::open(libc::NETLINK_SOCK_DIAG).map_err(err)?;
        let mut req = [0u8; INET_DIAG_REQ_V2_LEN];
        req[0] = family;
        req[1] = proto;
        req[4..8].copy_from_slice(&states.to_ne_bytes());
        sock.send(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, &req)
            .map_err(err)?;
        sock.recv_all(false, |ty, body| {
            if ty == SOCK_DIAG_BY_FAMILY
                && let Some(l) = parse_inet_diag(body)
            {
                out.push(l);
            }
        })
        .map_err(err)?;
    }
    Ok(out)
}

const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFADDRMSG_LEN: usize = 8;

/// Parses the body of an RTM_NEWADDR message: the interface's own address.
pub fn parse_addr(body: &[u8]) -> Option<std::net::IpAddr> {
    if body.len() < IFADDRMSG_LEN {
        return None;
    }
    let (mut local, mut address) = (None, None);
    for (ty, p) in attrs(&body[IFADDRMSG_LEN..]) {
        let ip = match p.len() {
            4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(p).ok()?)),
            16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(p).ok()?)),
            _ => None,
        };
        match ty {
            IFA_LOCAL => local = ip,
            IFA_ADDRESS => address = ip,
            _ => {}
        }
    }
    local.or(address)
}

/// Every address of the calling thread's network namespace.
pub fn addresses() -> Result<Vec<std::net::IpAddr>> {
    let err = |source| Error::Netlink {
        what: "RTM_GETADDR dump",
        source,
    };
    let sock = Socket::route().map_err(err)?;
    sock.send(RTM_GETADDR, NLM_F_DUMP, &[0u8; IFADDRMSG_LEN])
        .map_err(err)?;
    let mut out = Vec::new();
    sock.recv_all(false, |ty, body| {
        if ty == RTM_NEWADDR
            && let Some(a) = parse_addr(body)
        {
            out.push(a);
        }
    })
    .map_err(err)?;
    Ok(out)
}

/// Link notifications (RTMGRP_LINK) of the calling thread's network namespace: new, changed and
/// removed interfaces, so new veths are attached when they appear instead of at the next poll.
pub struct LinkMonitor(Socket);

impl LinkMonitor {
    pub fn open() -> Result<Self> {
        let err = |source| Error::Netlink {
            what: "RTMGRP_LINK subscription",
            source,
        };
        let sock = Socket::route().map_err(err)?;
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: valid address of the right size.
        let rc = unsafe {
            libc::bind(
                sock.0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        // SAFETY: plain fcntl on our fd.
        if rc != 0 || unsafe { libc::fcntl(sock.0, libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(Self(sock))
    }

    /// Reads every pending notification; true if there was any (or the socket overflowed,
    /// which means "something changed, look again" too).
    pub fn drain(&self) -> bool {
        let mut buf = vec![0u8; 16 * 1024];
        let mut any = false;
        loop {
            // SAFETY: valid buffer.
            let n = unsafe { libc::recv(self.0.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                any = true;
                continue;
            }
            if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
                any = true;
                continue;
            }
            return any;
        }
    }
}

impl std::os::fd::AsRawFd for LinkMonitor {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0
    }
}

/// Every link of the calling thread's network namespace.
pub fn links() -> Result<Vec<Link>> {
    let err = |source| Error::Netlink {
        what: "RTM_GETLINK dump",
        source,
    };
    let sock = Socket::route().map_err(err)?;
    sock.send(RTM_GETLINK, NLM_F_DUMP, &[0u8; IFINFOMSG_LEN])
        .map_err(err)?;
    let mut out = Vec::new();
    sock.recv_all(false, |ty, body| {
        if ty == RTM_NEWLINK
            && let Some(l) = parse_link(body)
        {
            out.push(l);
        }
    })
    .map_err(err)?;
    Ok(out)
}

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTMSG_LEN: usize = 12;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;

/// Where the calling thread's namespace sends packets for an address (`ip route get`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub oif: Option<u32>,
    pub gateway: Option<std::net::IpAddr>,
    pub prefsrc: Option<std::net::IpAddr>,
}

/// Parses the body of an RTM_NEWROUTE answer (rtmsg + attributes).
pub fn parse_route(body: &[u8]) -> Option<Route> {
    let attrs_at = body.get(RTMSG_LEN..)?;
    let mut r = Route {
        oif: None,
        gateway: None,
        prefsrc: None,
    };
    for (ty, p) in attrs(attrs_at) {
        match ty {
            RTA_OIF => r.oif = u32_of(p),
            RTA_GATEWAY => r.gateway = ip_of(p),
            RTA_PREFSRC => r.prefsrc = ip_of(p),
            _ => {}
        }
    }
    Some(r)
}

/// The route the calling thread's namespace uses toward `dst` (RTM_GETROUTE, as `ip route get`).
pub fn route_to(dst: std::net::IpAddr) -> Result<Option<Route>> {
    let err = |source| Error::Netlink {
        what: "RTM_GETROUTE",
        source,
    };
    let sock = Socket::route().map_err(err)?;
    let (family, bytes, bits) = match dst {
        std::net::IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec(), 32u8),
        std::net::IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec(), 128u8),
    };
    let mut payload = vec![0u8; RTMSG_LEN];
    payload[0] = family;
    payload[1] = bits;
    payload.extend_from_slice(&((4 + bytes.len()) as u16).to_ne_bytes());
    payload.extend_from_slice(&RTA_DST.to_ne_bytes());
    payload.extend_from_slice(&bytes);
    sock.send(RTM_GETROUTE, 0, &payload).map_err(err)?;
    let mut route = None;
    match sock.recv_all(true, |ty, body| {
        if ty == RTM_NEWROUTE {
            route = parse_route(body);
        }
    }) {
        Ok(()) => Ok(route),
        // No route at all (ENETUNREACH) is an answer, not a failure.
        Err(e) if e.raw_os_error() == Some(libc::ENETUNREACH) => Ok(None),
        Err(e) => Err(err(e)),
    }
}

const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const NDMSG_LEN: usize = 12;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;

/// A neighbour entry (ARP/NDP), or with `AF_BRIDGE` a forwarding-database entry (a VXLAN
/// device's FDB: MAC → remote VTEP address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub dst: Option<std::net::IpAddr>,
    pub lladdr: Option<Vec<u8>>,
}

/// Parses the body of an RTM_NEWNEIGH message (ndmsg + attributes).
pub fn parse_neighbour(body: &[u8]) -> Option<Neighbour> {
    let ifindex = u32::from_ne_bytes(body.get(4..8)?.try_into().ok()?);
    let mut n = Neighbour {
        ifindex,
        dst: None,
        lladdr: None,
    };
    for (ty, p) in attrs(body.get(NDMSG_LEN..)?) {
        match ty {
            NDA_DST => n.dst = ip_of(p),
            NDA_LLADDR => n.lladdr = Some(p.to_vec()),
            _ => {}
        }
    }
    Some(n)
}

/// Neighbour entries of one family (`AF_INET`, `AF_INET6`, or `AF_BRIDGE` for FDB entries).
pub fn neighbours(family: u8) -> Result<Vec<Neighbour>> {
    let err = |source| Error::Netlink {
        what: "RTM_GETNEIGH dump",
        source,
    };
    let sock = Socket::route().map_err(err)?;
    let mut req = [0u8; NDMSG_LEN];
    req[0] = family;
    sock.send(RTM_GETNEIGH, NLM_F_DUMP, &req).map_err(err)?;
    let mut out = Vec::new();
    sock.recv_all(false, |ty, body| {
        if ty == RTM_NEWNEIGH
            && let Some(n) = parse_neighbour(body)
        {
            out.push(n);
        }
    })
    .map_err(err)?;
    Ok(out)
}

/// The id the calling thread's namespace gives the namespace behind `fd`; `None` if it has none.
pub fn nsid_of(fd: RawFd) -> Result<Option<i32>> {
    let err = |source| Error::Netlink {
        what: "RTM_GETNSID",
        source,
    };
    let sock = Socket::route().map_err(err)?;
    let mut payload = vec![0u8; RTGENMSG_LEN];
    payload.extend_from_slice(&8u16.to_ne_bytes());
    payload.extend_from_slice(&NETNSA_FD.to_ne_bytes());
    payload.extend_from_slice(&(fd as u32).to_ne_bytes());
    sock.send(RTM_GETNSID, 0, &payload).map_err(err)?;
    let mut id = None;
    sock.recv_all(true, |ty, body| {
        if ty == RTM_NEWNSID && body.len() >= RTGENMSG_LEN {
            for (aty, p) in attrs(&body[RTGENMSG_LEN..]) {
                if aty == NETNSA_NSID {
                    id = u32_of(p).map(|v| v as i32).filter(|v| *v >= 0);
                }
            }
        }
    })
    .map_err(err)?;
    Ok(id)
}

/// Encodes one attribute (requests, and tests of the parsers built on [`attrs`]).
pub(crate) fn encode_attr(ty: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    v.extend_from_slice(&ty.to_ne_bytes());
    v.extend_from_slice(payload);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    use encode_attr as attr;

    #[test]
    fn parses_a_veth_link_message() {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body[4..8].copy_from_slice(&7u32.to_ne_bytes());
        body[8..12].copy_from_slice(&IFF_UP.to_ne_bytes());
        body.extend(attr(IFLA_IFNAME, b"cali1234567890a\0"));
        body.extend(attr(IFLA_LINK, &3u32.to_ne_bytes()));
        body.extend(attr(IFLA_LINK_NETNSID, &5u32.to_ne_bytes()));
        body.extend(attr(
            IFLA_LINKINFO | 0x8000,
            &attr(IFLA_INFO_KIND, b"veth\0"),
        ));
        let link = parse_link(&body).unwrap();
        assert_eq!(link.index, 7);
        assert_eq!(link.name, "cali1234567890a");
        assert_eq!(link.kind.as_deref(), Some("veth"));
        assert_eq!(link.peer_index, Some(3));
        assert_eq!(link.link_netnsid, Some(5));
        assert!(link.up);
    }

    #[test]
    fn parses_vxlan_and_ipip_parameters_and_the_mtu() {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body.extend(attr(IFLA_IFNAME, b"flannel.1\0"));
        body.extend(attr(IFLA_MTU, &1450u32.to_ne_bytes()));
        let mut data = attr(IFLA_VXLAN_ID, &1u32.to_ne_bytes());
        data.extend(attr(IFLA_VXLAN_LINK, &2u32.to_ne_bytes()));
        data.extend(attr(IFLA_VXLAN_LOCAL, &[192, 168, 77, 1]));
        data.extend(attr(IFLA_VXLAN_GROUP, &[0, 0, 0, 0]));
        data.extend(attr(IFLA_VXLAN_PORT, &8472u16.to_be_bytes()));
        let mut info = attr(IFLA_INFO_KIND, b"vxlan\0");
        info.extend(attr(IFLA_INFO_DATA, &data));
        body.extend(attr(IFLA_LINKINFO, &info));
        let link = parse_link(&body).unwrap();
        assert_eq!(link.mtu, Some(1450));
        let t = link.tunnel.unwrap();
        assert_eq!((t.vni, t.port, t.underlay), (Some(1), Some(8472), Some(2)));
        assert_eq!(t.local, Some("192.168.77.1".parse().unwrap()));
        assert_eq!(t.remote, None, "0.0.0.0 is no remote");

        let mut body = vec![0u8; IFINFOMSG_LEN];
        body.extend(attr(IFLA_IFNAME, b"tunl0\0"));
        let mut info = attr(IFLA_INFO_KIND, b"ipip\0");
        info.extend(attr(
            IFLA_INFO_DATA,
            &attr(IFLA_IPTUN_REMOTE, &[10, 0, 0, 2]),
        ));
        body.extend(attr(IFLA_LINKINFO, &info));
        let t = parse_link(&body).unwrap().tunnel.unwrap();
        assert_eq!(t.remote, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(t.vni, None);
    }

    #[test]
    fn parses_a_route_answer() {
        let mut body = vec![0u8; RTMSG_LEN];
        body.extend(attr(RTA_DST, &[10, 42, 1, 5]));
        body.extend(attr(RTA_OIF, &3u32.to_ne_bytes()));
        body.extend(attr(RTA_GATEWAY, &[192, 168, 77, 2]));
        let r = parse_route(&body).unwrap();
        assert_eq!(r.oif, Some(3));
        assert_eq!(r.gateway, Some("192.168.77.2".parse().unwrap()));
        assert!(parse_route(&[0u8; 3]).is_none());
    }

    #[test]
    fn parses_neighbour_and_fdb_entries() {
        let mut body = vec![0u8; NDMSG_LEN];
        body[4..8].copy_from_slice(&9u32.to_ne_bytes());
        body.extend(attr(NDA_LLADDR, &[2, 0, 0, 0x77, 0, 2]));
        body.extend(attr(NDA_DST, &[192, 168, 77, 2]));
        let n = parse_neighbour(&body).unwrap();
        assert_eq!(n.ifindex, 9);
        assert_eq!(n.dst, Some("192.168.77.2".parse().unwrap()));
        assert_eq!(n.lladdr.as_deref(), Some(&[2, 0, 0, 0x77, 0, 2][..]));
        assert!(parse_neighbour(&[0u8; 7]).is_none());
    }

    #[test]
    fn looks_up_the_route_to_loopback() {
        // The real kernel (no root needed): 127.0.0.1 goes out on lo.
        let r = route_to("127.0.0.1".parse().unwrap()).unwrap().unwrap();
        let lo = links()
            .unwrap()
            .into_iter()
            .find(|l| l.name == "lo")
            .unwrap();
        assert_eq!(r.oif, Some(lo.index));
        assert_eq!(r.gateway, None);
    }

    #[test]
    fn malformed_attributes_stop_parsing_without_panicking() {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body.extend(attr(IFLA_IFNAME, b"lo\0"));
        body.extend_from_slice(&[200, 0, 3, 0, 1, 2]); // claims 200 bytes, has 6
        let link = parse_link(&body).unwrap();
        assert_eq!(link.name, "lo");
        assert!(parse_link(&[1, 2, 3]).is_none());
        assert_eq!(messages(&[0u8; 15]).count(), 0);
    }

    #[test]
    fn lists_listeners_of_this_namespace() {
        // A real listener on an ephemeral port must show up, with its address.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let found = tcp_listeners().expect("sock_diag");
        assert!(
            found
                .iter()
                .any(|s| s.port == port && s.addr.to_string() == "127.0.0.1" && s.inode != 0),
            "{found:?}"
        );
    }

    #[test]
    fn finds_a_bound_udp_socket() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = s.local_addr().unwrap().port();
        let found = udp_listeners().expect("sock_diag");
        assert!(
            found
                .iter()
                .any(|s| s.port == port && s.addr.to_string() == "127.0.0.1"),
            "{found:?}"
        );
    }

    #[test]
    fn lists_addresses_of_this_namespace() {
        let addrs = addresses().expect("RTM_GETADDR");
        assert!(addrs.contains(&"127.0.0.1".parse().unwrap()), "{addrs:?}");
    }

    #[test]
    fn lists_links_of_this_namespace() {
        // Every namespace has lo; this reads the real kernel (no root needed).
        let links = links().expect("RTM_GETLINK");
        assert!(links.iter().any(|l| l.name == "lo"));
    }
}
