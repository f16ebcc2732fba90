//! Decoding of the kernel's `RawEvent` records. Kept apart from the public schema: the wire
//! layout may change with the programs, the JSON may not.

use netprobe_common::RawEvent;

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
