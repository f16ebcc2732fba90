//! A SYN scan from inside a lab namespace: bare TCP SYNs, each from its own source address
//! (spoofed: nobody answers for them) to a range of ports, written through a raw socket so the
//! kernel of the sending namespace keeps no connection. Only ever to addresses of namespaces a
//! test built.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Result, bail};

/// The Internet checksum of `data` (RFC 1071), starting from `sum`.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet carrying a TCP SYN from `src` to `dst`.
pub fn syn_packet(src: SocketAddrV4, dst: SocketAddrV4, seq: u32) -> Vec<u8> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend(src.ip().octets());
    pseudo.extend(dst.ip().octets());
    pseudo.extend([0, 6, 0, 20]);
    let pseudo_sum = u32::from(!checksum(&pseudo, 0));
    let c = checksum(&tcp, pseudo_sum);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut p = ip.to_vec();
    p.extend(tcp);
    p
}

/// Sends one SYN per (source, port) pair of `syns` to `dst` from namespace `netns`; returns
/// how many were sent.
pub fn syn_scan(
    netns: &str,
    dst: Ipv4Addr,
    syns: impl Iterator<Item = (Ipv4Addr, u16)> + Send,
) -> Result<usize> {
    crate::in_netns(netns, || -> Result<usize> {
        // SAFETY: a plain socket(2) call; the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            bail!("raw socket: {}", std::io::Error::last_os_error());
        }
        let mut sent = 0;
        let mut result = Ok(());
        for (i, (src, port)) in syns.enumerate() {
            let packet = syn_packet(
                SocketAddrV4::new(src, 40000 + (i % 20000) as u16),
                SocketAddrV4::new(dst, port),
                0x1000_0000 + i as u32,
            );
            let to = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(dst).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: `packet` and `to` outlive the call; the lengths are theirs.
            let n = unsafe {
                libc::sendto(
                    fd,
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const to).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if n < 0 {
                result = Err(anyhow::anyhow!(
                    "sendto {dst}:{port}: {}",
                    std::io::Error::last_os_error()
                ));
                break;
            }
            sent += 1;
        }
        // SAFETY: fd is ours and open.
        unsafe { libc::close(fd) };
        result.map(|()| sent)
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syn_packets_checksums_verify() {
        let p = syn_packet(
            "198.51.100.7:40001".parse().unwrap(),
            "10.42.0.30:22".parse().unwrap(),
            7,
        );
        assert_eq!(p.len(), 40);
        assert_eq!(checksum(&p[..20], 0), 0, "the IP header sums to zero");
        let mut pseudo = p[12..20].to_vec();
        pseudo.extend([0, 6, 0, 20]);
        let sum = u32::from(!checksum(&pseudo, 0));
        assert_eq!(checksum(&p[20..], sum), 0, "the TCP segment sums to zero");
        assert_eq!((p[33], u16::from_be_bytes([p[22], p[23]])), (0x02, 22));
    }
}
