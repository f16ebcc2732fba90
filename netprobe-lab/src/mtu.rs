//! Connections past their handshake: a node with a client and a server pod, a path MTU black
//! hole (the server pod's node-side veth has a smaller MTU than both pods believe, and the
//! node's ICMP "fragmentation needed" is dropped by a rule), and the clients that show how a
//! connection dies after `connected`: a bulk sender that gives up after a user timeout, and a
//! sink server that reads until the client closes.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::Result;

use crate::{Lab, Pod, in_netns};

/// The MTU of the narrow hop (the server pod's node-side veth); the pods keep 1500.
pub const PATH_MTU: u32 = 1400;
/// The rule that eats the node's ICMP "fragmentation needed" (iptables, filter OUTPUT).
pub const ICMP_RULE: &str =
    "-A OUTPUT -p icmp -m icmp --icmp-type 3/4 -m comment --comment frag-needed-eater -j DROP";

/// The same rule in native nftables, without a `counter`: no counter moves when it drops, only
/// a trace names it (`inet frag_eater`, chain `out` on the output hook).
pub const NFT_ICMP_RULE: &str = "table inet frag_eater {
  chain out {
    type filter hook output priority filter; policy accept;
    icmp type destination-unreachable icmp code frag-needed drop comment \"frag-needed-eater-nft\"
  }
}";

/// A node with `default/client` (10.42.0.20) and `default/server` (10.42.0.30).
pub struct Pods {
    pub lab: Lab,
    pub client: Pod,
    pub server: Pod,
}

/// The two pods on one node, full MTU everywhere.
pub fn pods(tag: &str) -> Result<Pods> {
    let mut lab = Lab::new(tag)?;
    let client = lab.add_pod("default", "client", "10.42.0.20".parse()?)?;
    let server = lab.add_pod("default", "server", "10.42.0.30".parse()?)?;
    // One MSS per packet (no TSO super-packets): the sizes dropped are the segments' own.
    lab.sh(&client.netns, "ip link set eth0 gso_max_size 1500 || true")?;
    Ok(Pods {
        lab,
        client,
        server,
    })
}

/// The black hole: the node's veth toward the server carries [`PATH_MTU`], the pods think 1500,
/// and [`ICMP_RULE`] drops the node's "fragmentation needed" on its way back to the client.
pub fn black_hole(tag: &str) -> Result<Pods> {
    narrow_path(tag, &format!("iptables {ICMP_RULE}"))
}

/// The IPv6 rule that eats the node's ICMPv6 "packet too big" (ip6tables, filter OUTPUT).
pub const ICMPV6_RULE: &str = "-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type packet-too-big -m comment --comment frag-needed-eater -j DROP";

/// The black hole for IPv6 (the pods' `fd00::` addresses): [`ICMPV6_RULE`] eats the ICMPv6.
pub fn black_hole_v6(tag: &str) -> Result<Pods> {
    narrow_path(tag, &format!("ip6tables {ICMPV6_RULE}"))
}

/// [`NFT_ICMP_RULE`] for IPv6: the ICMPv6 "packet too big", native nftables, no counter.
pub const NFT_ICMPV6_RULE: &str = "table inet frag_eater {
  chain out {
    type filter hook output priority filter; policy accept;
    icmpv6 type packet-too-big drop comment \"frag-needed-eater-nft\"
  }
}";

/// The IPv6 black hole with [`NFT_ICMPV6_RULE`] eating the ICMPv6.
pub fn black_hole_nft_v6(tag: &str) -> Result<Pods> {
    narrow_path(tag, &format!("nft -f - <<'EOF'\n{NFT_ICMPV6_RULE}\nEOF"))
}

/// The black hole with [`NFT_ICMP_RULE`] (native nftables, no counter) eating the ICMP.
pub fn black_hole_nft(tag: &str) -> Result<Pods> {
    narrow_path(tag, &format!("nft -f - <<'EOF'\n{NFT_ICMP_RULE}\nEOF"))
}

/// The pods with [`PATH_MTU`] toward the server, and `eater` run on the node.
fn narrow_path(tag: &str, eater: &str) -> Result<Pods> {
    let p = pods(tag)?;
    let narrow = format!("ip link set {} mtu {PATH_MTU}", p.server.host_if);
    p.lab.sh(p.lab.node(), &format!("{narrow}\n{eater}"))?;
    Ok(p)
}

/// A server that reads each connection until the client closes it (or it breaks), then closes.
pub fn sink(listener: TcpListener) {
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 65536];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
}

/// `TCP_USER_TIMEOUT`: unacknowledged data older than this aborts the connection (ETIMEDOUT),
/// as applications with a request deadline do.
pub fn user_timeout(s: &TcpStream, timeout: Duration) -> io::Result<()> {
    let ms = timeout.as_millis() as libc::c_uint;
    // SAFETY: a valid socket fd and a c_uint option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A connected client inside `netns` (the socket keeps its namespace).
pub fn connect(netns: &str, addr: SocketAddr) -> Result<TcpStream> {
    Ok(in_netns(netns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    })??)
}

/// Writes `bytes` and then waits for the server to close: Ok when it did, the error the
/// application gets otherwise (ETIMEDOUT after `timeout` of unacknowledged data, ECONNRESET).
pub fn send_and_wait(s: &mut TcpStream, bytes: usize, timeout: Duration) -> io::Result<()> {
    user_timeout(s, timeout)?;
    let chunk = vec![0x5au8; 65536];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n])?;
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    s.set_read_timeout(Some(timeout * 4))?;
    let mut buf = [0u8; 16];
    // The server sends nothing: the read ends at its FIN (Ok) or with the connection's error.
    while s.read(&mut buf)? > 0 {}
    Ok(())
}
