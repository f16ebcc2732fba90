//! The start of a DNS message (RFC 1035 §4.1) as the kernel captured it: header and question.
//! Pure and total: these are untrusted bytes from the network, cut at an arbitrary length, so
//! every read is checked and nothing here panics or loops (fuzzed: `fuzz/fuzz_targets/dns.rs`).

use serde::{Deserialize, Serialize};

/// Header and question of one DNS message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Dns {
    /// Message id: a reply carries the id of its query.
    pub id: u16,
    /// true for a query, false for a response (the QR bit).
    pub query: bool,
    /// Question name, dotted, without the trailing dot (`.` for the root); bytes outside
    /// printable ASCII as `\DDD`. Null when the capture ended inside it.
    pub name: Option<String>,
    /// Question type: `A`, `AAAA`, `SRV`, `PTR`, … or `TYPE<n>`. Null when not captured.
    #[serde(rename = "type")]
    pub qtype: Option<String>,
    /// Response code of a response: `NOERROR`, `NXDOMAIN`, `SERVFAIL`, `REFUSED`, … (null for
    /// queries).
    pub rcode: Option<String>,
    /// Records in the answer section (responses).
    pub answers: u16,
    /// The capture ended before the question did (name or type missing).
    pub truncated: bool,
}

impl Dns {
    /// `query A seldon-scheduler.…` / `reply A seldon-scheduler.… NXDOMAIN`
    pub fn summary(&self) -> String {
        format!(
            "{} {} {}{}",
            if self.query { "query" } else { "reply" },
            self.qtype.as_deref().unwrap_or("?"),
            self.name.as_deref().unwrap_or("?"),
            self.rcode
                .as_deref()
                .map(|r| format!(" {r}"))
                .unwrap_or_default()
        )
    }
}

const HEADER: usize = 12;
/// Compression pointers followed at most (a question name has none in practice; a loop must
/// end).
const MAX_POINTERS: usize = 8;
/// RFC 1035: a name is at most 255 bytes.
const MAX_NAME: usize = 255;

pub fn type_name(t: u16) -> String {
    match t {
        1 => "A".into(),
        2 => "NS".into(),
        5 => "CNAME".into(),
        6 => "SOA".into(),
        12 => "PTR".into(),
        15 => "MX".into(),
        16 => "TXT".into(),
        28 => "AAAA".into(),
        33 => "SRV".into(),
        35 => "NAPTR".into(),
        41 => "OPT".into(),
        64 => "SVCB".into(),
        65 => "HTTPS".into(),
        255 => "ANY".into(),
        n => format!("TYPE{n}"),
    }
}

pub fn rcode_name(r: u8) -> String {
    match r {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}"),
    }
}

/// Reads the name at `off`; returns it and the offset after it in the message (None when the
/// bytes end first or the name is malformed).
fn read_name(msg: &[u8], mut off: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut after = None;
    let mut pointers = 0;
    let mut wire_len = 0;
    loop {
        let len = *msg.get(off)?;
        match len >> 6 {
            0 if len == 0 => {
                let end = after.unwrap_or(off + 1);
                if name.is_empty() {
                    name.push('.');
                }
                return Some((name, end));
            }
            0 => {
                let label = msg.get(off + 1..off + 1 + usize::from(len))?;
                wire_len += 1 + label.len();
                if wire_len > MAX_NAME {
                    return None;
                }
                if !name.is_empty() {
                    name.push('.');
                }
                for &b in label {
                    match b {
                        b'.' | b'\\' => {
                            name.push('\\');
                            name.push(b as char);
                        }
                        0x21..=0x7e => name.push(b as char),
                        _ => name.push_str(&format!("\\{b:03}")),
                    }
                }
                off += 1 + label.len();
            }
            3 => {
                let lo = *msg.get(off + 1)?;
                pointers += 1;
                if pointers > MAX_POINTERS {
                    return None;
                }
                after.get_or_insert(off + 2);
                off = (usize::from(len & 0x3f) << 8) | usize::from(lo);
            }
            // 0b01 / 0b10: extended label types, not used.
            _ => return None,
        }
    }
}

/// Parses header and first question; None when not even the header was captured.
pub fn parse(msg: &[u8]) -> Option<Dns> {
    let h = msg.get(..HEADER)?;
    let id = u16::from_be_bytes([h[0], h[1]]);
    let query = h[2] & 0x80 == 0;
    let rcode = h[3] & 0x0f;
    let qdcount = u16::from_be_bytes([h[4], h[5]]);
    let answers = u16::from_be_bytes([h[6], h[7]]);
    let mut d = Dns {
        id,
        query,
        name: None,
        qtype: None,
        rcode: (!query).then(|| rcode_name(rcode)),
        answers,
        truncated: false,
    };
    if qdcount == 0 {
        return Some(d);
    }
    match read_name(msg, HEADER) {
        Some((name, end)) => {
            d.name = Some(name);
            match msg.get(end..end + 2) {
                Some(t) => d.qtype = Some(type_name(u16::from_be_bytes([t[0], t[1]]))),
                None => d.truncated = true,
            }
        }
        None => d.truncated = true,
    }
    Some(d)
}

/// A query for `name` and type `qtype` (number) with `id`, as a resolver sends it (RD set, no
/// EDNS): for tests and fixtures.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER + name.len() + 6);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        m.push(label.len().min(63) as u8);
        m.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "seldon-scheduler.financial-inference.svc.cluster.local";

    #[test]
    fn a_query_reads_back() {
        let d = parse(&query(0x1234, NAME, 1)).unwrap();
        assert_eq!(d.id, 0x1234);
        assert!(d.query);
        assert_eq!(d.name.as_deref(), Some(NAME));
        assert_eq!(d.qtype.as_deref(), Some("A"));
        assert_eq!(d.rcode, None);
        assert!(!d.truncated);
    }

    #[test]
    fn a_response_has_its_rcode() {
        let mut m = query(7, "nope.cluster.local", 28);
        m[2] |= 0x80;
        m[3] = 0x83;
        let d = parse(&m).unwrap();
        assert!(!d.query);
        assert_eq!(d.rcode.as_deref(), Some("NXDOMAIN"));
        assert_eq!(d.qtype.as_deref(), Some("AAAA"));
    }

    #[test]
    fn every_cut_of_a_message_parses_without_panic() {
        let m = query(1, NAME, 33);
        assert_eq!(parse(&m[..11]), None);
        for n in 12..m.len() {
            let d = parse(&m[..n]).unwrap();
            // The class (last 2 bytes) is not reported.
            assert_eq!(d.truncated, n < m.len() - 2, "cut at {n}");
            assert_eq!(d.id, 1);
        }
    }

    #[test]
    fn pointer_loops_and_odd_bytes_end() {
        let mut m = query(1, "a", 1)[..HEADER].to_vec();
        m.extend_from_slice(&[0xc0, 12]); // points at itself
        let d = parse(&m).unwrap();
        assert!(d.truncated && d.name.is_none());
        let mut m = query(1, "", 12)[..HEADER].to_vec();
        m.extend_from_slice(&[3, b'a', 0, 0xff, 0, 0, 12]);
        let d = parse(&m).unwrap();
        assert_eq!(d.name.as_deref(), Some("a\\000\\255"));
        assert_eq!(d.qtype.as_deref(), Some("PTR"));
        assert_eq!(parse(&query(1, "", 1)).unwrap().name.as_deref(), Some("."));
    }
}
