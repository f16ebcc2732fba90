//! Decoding of the kernel's `RawEvent` records. Kept apart from the public schema: the wire
//! layout may change with the programs, the JSON may not.

use netprobe_common::{DNS_CAPTURE, RawDnsEvent, RawEvent};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {got} bytes, expected {want}")]
    Size { got: usize, want: usize },
    #[error("unknown event kind {0}")]
    Kind(u8),
}

/// Copies a ring-buffer record into a `RawEvent`, validating size and kind. Never trusts the
/// alignment of the input.
pub fn decode(bytes: &[u8]) -> Result<RawEvent, DecodeError> {
    let want = std::mem::size_of::<RawEvent>();
    if bytes.len() != want {
        return Err(DecodeError::Size {
            got: bytes.len(),
            want,
        });
    }
    // SAFETY: size checked; RawEvent is plain data for which every bit pattern is valid;
    // read_unaligned copies without requiring alignment.
    let ev: RawEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    if ev.kind == 0 || ev.kind > netprobe_common::kind::MAX {
        return Err(DecodeError::Kind(ev.kind));
    }
    Ok(ev)
}

/// One ring-buffer record: an event, and for DNS datagrams the start of their DNS message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub ev: RawEvent,
    /// Captured DNS bytes (`dns_len` of them are meaningful).
    pub dns: Option<([u8; DNS_CAPTURE], usize)>,
}

impl Record {
    pub fn dns_bytes(&self) -> Option<&[u8]> {
        self.dns.as_ref().map(|(b, n)| &b[..*n])
    }
}

/// Decodes either record type the kernel writes, told apart by length.
pub fn decode_record(bytes: &[u8]) -> Result<Record, DecodeError> {
    let want = std::mem::size_of::<RawDnsEvent>();
    if bytes.len() != want {
        return decode(bytes).map(|ev| Record { ev, dns: None });
    }
    // SAFETY: size checked; plain data, every bit pattern valid; unaligned read.
    let d: RawDnsEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let ev = decode(&encode(&d.ev))?;
    Ok(Record {
        ev,
        dns: Some((d.payload, usize::from(d.len).min(DNS_CAPTURE))),
    })
}

/// The bytes of a `RawEvent` as the kernel writes them (for fixtures and tests).
pub fn encode(ev: &RawEvent) -> Vec<u8> {
    let p: *const RawEvent = ev;
    // SAFETY: RawEvent has no padding (size asserted in netprobe-common), so all bytes are initialized.
    unsafe { std::slice::from_raw_parts(p.cast::<u8>(), std::mem::size_of::<RawEvent>()) }.to_vec()
}

#[cfg(test)]
mod tests {
    use netprobe_common::{AF_INET, IPPROTO_TCP, kind, tcp_flags};

    use super::*;

    #[test]
    fn decodes_what_the_kernel_layout_holds() {
        let mut bytes = vec![0u8; std::mem::size_of::<RawEvent>()];
        bytes[32..36].copy_from_slice(&4026532000u32.to_ne_bytes()); // netns
        bytes[40..44].copy_from_slice(&3u32.to_ne_bytes()); // reason
        bytes[56..58].copy_from_slice(&40000u16.to_ne_bytes()); // sport
        bytes[58..60].copy_from_slice(&9500u16.to_ne_bytes()); // dport
        bytes[60] = kind::DROP;
        bytes[61] = AF_INET;
        bytes[62] = IPPROTO_TCP;
        bytes[63] = tcp_flags::SYN;
        bytes[64..68].copy_from_slice(&[127, 0, 0, 1]);
        let ev = decode(&bytes).unwrap();
        assert_eq!(ev.netns, 4026532000);
        assert_eq!(ev.reason, 3);
        assert_eq!((ev.sport, ev.dport), (40000, 9500));
        assert_eq!(ev.kind, kind::DROP);
        assert_eq!(&ev.saddr[..4], &[127, 0, 0, 1]);
        assert_eq!(encode(&ev), bytes);
    }

    #[test]
    fn rejects_wrong_sizes_and_kinds() {
        assert!(matches!(
            decode(&[0u8; 10]),
            Err(DecodeError::Size { got: 10, .. })
        ));
        let zero = vec![0u8; std::mem::size_of::<RawEvent>()];
        assert_eq!(decode(&zero), Err(DecodeError::Kind(0)));
        let mut bad = zero.clone();
        bad[60] = 200;
        assert_eq!(decode(&bad), Err(DecodeError::Kind(200)));
    }

    #[test]
    fn dns_records_are_told_apart_by_length() {
        let ev = RawEvent {
            kind: kind::TC_EGRESS,
            sport: 40000,
            dport: 53,
            ..Default::default()
        };
        let mut bytes = encode(&ev);
        bytes.extend_from_slice(&5u16.to_ne_bytes());
        bytes.extend_from_slice(&[0; 6]);
        let mut payload = [0u8; DNS_CAPTURE];
        payload[..5].copy_from_slice(b"hello");
        bytes.extend_from_slice(&payload);
        let r = decode_record(&bytes).unwrap();
        assert_eq!(r.ev, ev);
        assert_eq!(r.dns_bytes(), Some(&b"hello"[..]));
        // A length beyond the buffer is clamped, never trusted.
        bytes[136..138].copy_from_slice(&u16::MAX.to_ne_bytes());
        assert_eq!(
            decode_record(&bytes).unwrap().dns_bytes().unwrap().len(),
            DNS_CAPTURE
        );
        assert_eq!(decode_record(&encode(&ev)).unwrap().dns, None);
        assert!(decode_record(&bytes[..200]).is_err());
    }

    #[test]
    fn unaligned_input_decodes() {
        let ev = RawEvent {
            kind: kind::TC_INGRESS,
            sport: 1,
            dport: 2,
            ..Default::default()
        };
        let mut buf = vec![0u8];
        buf.extend(encode(&ev));
        assert_eq!(decode(&buf[1..]).unwrap(), ev);
    }
}
