//! Resets after the handshake sent by the server's own kernel (issue #18): a real server
//! process in the server pod of [`crate::mtu::pods`] that reads part of what the client sends
//! and then closes (or is killed, or leaves), so that its kernel answers with a reset — the
//! reset reason and the closing process are what `trace` must name.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::mtu::Pods;

/// What the server does once it has read [`READ_FIRST`] bytes of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Closes the connection with the rest unread, then stays alive (its kernel sends
    /// `TCP_ABORT_ON_CLOSE` in the closing process's context).
    CloseUnread,
    /// Holds the connection until the test kills the process.
    Hold,
    /// Reads everything until the client's first pause, closes cleanly (FIN) and exits; its
    /// pod's kernel forgets the closed socket within ~1 s.
    ReadAllAndExit,
}

/// Bytes the server reads before it does [`Then`].
pub const READ_FIRST: usize = 1024;
/// The server process's name as the kernel reports it (`comm`).
pub const SERVER_COMM: &str = "python3";

impl Then {
    fn python(self) -> &'static str {
        match self {
            Self::CloseUnread => "time.sleep(0.5); c.close(); time.sleep(120)",
            Self::Hold => "time.sleep(120)",
            Self::ReadAllAndExit => {
                "c.settimeout(0.5)\ntry:\n  while c.recv(65536): pass\nexcept socket.timeout: pass\nc.close()"
            }
        }
    }
}

/// Starts the server process in the server pod, listening on `addr`; returns its pid once it
/// accepts connections.
pub fn server(p: &mut Pods, addr: SocketAddr, then: Then) -> Result<u32> {
    let script = format!(
        "import socket, time\n\
         l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         l.bind(('{}', {})); l.listen(8)\n\
         c, _ = l.accept(); n = 0\n\
         while n < {READ_FIRST}:\n  d = c.recv({READ_FIRST} - n)\n  if not d: break\n  n += len(d)\n\
         {}\n",
        addr.ip(),
        addr.port(),
        then.python()
    );
    if then == Then::ReadAllAndExit {
        short_fin_timeout(p)?;
    }
    let netns = p.server.netns.clone();
    let pid = p.lab.spawn(&netns, &["/usr/bin/python3", "-c", &script])?;
    wait_listening(p, addr)?;
    Ok(pid)
}

/// Waits until something listens on `addr` in the server pod (`ss`, so that no probe
/// connection is made).
fn wait_listening(p: &Pods, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let filter = format!("ss -Htln 'sport = :{}'", addr.port());
    while Instant::now() < deadline {
        if !p.lab.sh(&p.server.netns, &filter)?.trim().is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the server process never listened on {addr}")
}

/// Connects from the client pod and sends `bytes` (more than the server reads).
pub fn connect_and_send(p: &Pods, addr: SocketAddr, bytes: usize) -> Result<TcpStream> {
    let mut s = crate::mtu::connect(&p.client.netns, addr)?;
    s.write_all(&vec![0x5au8; bytes])?;
    Ok(s)
}

/// Waits for the connection's end as the client sees it: the error of a read (a reset gives
/// ECONNRESET), or Ok at a clean end of stream.
pub fn read_until_end(s: &mut TcpStream, limit: Duration) -> io::Result<()> {
    s.set_read_timeout(Some(limit))?;
    let mut buf = [0u8; 4096];
    while s.read(&mut buf)? > 0 {}
    Ok(())
}

/// Lets the server pod's kernel forget a socket closed cleanly within ~1 s (its FIN_WAIT2
/// timeout), so that a later segment finds no socket at all.
fn short_fin_timeout(p: &Pods) -> Result<()> {
    p.lab
        .sh(&p.server.netns, "sysctl -qw net.ipv4.tcp_fin_timeout=1")?;
    Ok(())
}

/// Waits until the server pod has no socket left on `addr`'s port (not even in TIME-WAIT).
pub fn wait_socket_gone(p: &Pods, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let list = format!("ss -Htan state all 'sport = :{}'", addr.port());
    while Instant::now() < deadline {
        if p.lab.sh(&p.server.netns, &list)?.trim().is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the server pod still has a socket on {addr}")
}
