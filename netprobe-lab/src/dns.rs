//! A CoreDNS stand-in for labs: a UDP socket (bound inside a pod namespace) answering every A
//! query with one address — or, for the "unanswered" scenario, reading and never replying.

use std::net::{Ipv4Addr, UdpSocket};

/// The end of the question section of `msg` (header and one question), if well-formed.
fn question_end(msg: &[u8]) -> Option<usize> {
    let mut off = 12;
    loop {
        let len = usize::from(*msg.get(off)?);
        if len == 0 {
            return (off + 5 <= msg.len()).then_some(off + 5);
        }
        if len > 63 {
            return None;
        }
        off += 1 + len;
    }
}

/// An A query as a stub resolver sends it: id, RD, one question, class IN.
pub fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

/// The response to an A query: the question echoed, QR/RA set, NOERROR, one A record `addr`.
pub fn answer_a(query: &[u8], addr: Ipv4Addr) -> Option<Vec<u8>> {
    let end = question_end(query)?;
    let mut r = query[..end].to_vec();
    r[2] = 0x81; // QR, RD
    r[3] = 0x80; // RA, NOERROR
    r[6..8].copy_from_slice(&1u16.to_be_bytes()); // ANCOUNT
    r[8..12].fill(0); // NSCOUNT, ARCOUNT
    r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
    r.extend_from_slice(&addr.octets());
    Some(r)
}

/// The response to a query with no record and response code `rcode` (2 SERVFAIL, 3 NXDOMAIN,
/// 5 REFUSED): the question echoed, QR/RA set.
pub fn answer_rcode(query: &[u8], rcode: u8) -> Option<Vec<u8>> {
    let end = question_end(query)?;
    let mut r = query[..end].to_vec();
    r[2] = 0x81; // QR, RD
    r[3] = 0x80 | (rcode & 0x0f); // RA, rcode
    r[6..12].fill(0); // ANCOUNT, NSCOUNT, ARCOUNT
    Some(r)
}

/// Serves `socket` on a background thread: answers A queries with `answer`, or stays silent
/// when `answer` is None.
pub fn serve(socket: UdpSocket, answer: Option<Ipv4Addr>) {
    serve_with(socket, move |q| answer.and_then(|a| answer_a(q, a)));
}

/// Serves `socket` on a background thread, answering every query with response code `rcode`
/// (a CoreDNS whose upstream fails answers SERVFAIL; one asked outside its zones, REFUSED).
pub fn serve_rcode(socket: UdpSocket, rcode: u8) {
    serve_with(socket, move |q| answer_rcode(q, rcode));
}

fn serve_with(socket: UdpSocket, reply: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if let Some(r) = reply(&buf[..n]) {
                let _ = socket.send_to(&r, from);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_echo_the_question() {
        let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(&[1, b'a', 0, 0, 1, 0, 1]);
        let r = answer_a(&q, Ipv4Addr::new(10, 43, 0, 1)).unwrap();
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[2] & 0x80, 0x80);
        assert_eq!(&r[r.len() - 4..], &[10, 43, 0, 1]);
        assert_eq!(answer_a(&q[..14], Ipv4Addr::LOCALHOST), None);
        let f = answer_rcode(&q, 2).unwrap();
        assert_eq!((f[3] & 0x0f, &f[6..8]), (2, &[0u8, 0][..]));
    }
}
