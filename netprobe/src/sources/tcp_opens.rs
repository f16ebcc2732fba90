//! Healthy connection attempts cost the always-on agent no event: it counts them from each
//! watched namespace's TCP MIB (`/proc/net/snmp`: `ActiveOpens`, every connect() that sent a
//! SYN; `AttemptFails`, those that failed), read every few seconds. Counters of namespaces that
//! vanish (a deleted pod) stay in the totals: only the differences are added. What namespaces
//! counted before the first reading is not counted; a namespace that appears later is new (a
//! new pod) and counts from zero.

use std::collections::HashMap;

pub use crate::model::stats::TcpMib;

use crate::netns::NetnsRef;

/// `Tcp:` header and value lines of /proc/net/snmp → the counters, None if absent.
pub fn parse_snmp(text: &str) -> Option<TcpMib> {
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let field = |name: &str| {
        let i = names.split_whitespace().position(|n| n == name)?;
        values.split_whitespace().nth(i)?.parse::<u64>().ok()
    };
    Some(TcpMib {
        active_opens: field("ActiveOpens")?,
        attempt_fails: field("AttemptFails")?,
    })
}

/// Totals over every namespace watched so far.
#[derive(Default)]
pub struct TcpOpens {
    last: HashMap<u64, TcpMib>,
    /// The first reading was taken: later namespaces are new.
    started: bool,
    pub total: TcpMib,
}

impl TcpOpens {
    /// Reads the namespaces present now (one thread each enters its namespace); those gone are
    /// forgotten, their counts kept in the totals.
    pub fn update<'a>(&mut self, present: impl IntoIterator<Item = &'a NetnsRef>) {
        let mut seen = HashMap::new();
        for ns in present {
            let read = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"));
            if let Ok(Ok(text)) = read
                && let Some(now) = parse_snmp(&text)
            {
                seen.insert(ns.inode, now);
            }
        }
        for (inode, now) in &seen {
            let before = match self.last.get(inode) {
                Some(b) => *b,
                None if self.started => TcpMib::default(),
                // Before the first reading: the past is not ours.
                None => *now,
            };
            self.total.active_opens += now.active_opens.saturating_sub(before.active_opens);
            self.total.attempt_fails += now.attempt_fails.saturating_sub(before.attempt_fails);
        }
        self.last = seen;
        self.started = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tcp_mib_is_read_by_column_name() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets\n\
            Tcp: 1 200 120000 -1 42 7 3 0\nUdp: InDatagrams\nUdp: 5\n";
        assert_eq!(
            parse_snmp(text),
            Some(TcpMib {
                active_opens: 42,
                attempt_fails: 3
            })
        );
        assert_eq!(parse_snmp("Ip: a\nIp: 1\n"), None);
    }

    #[test]
    fn differences_are_added_and_the_past_is_not_counted() {
        let ns = NetnsRef::current().expect("this process's namespace");
        let mut opens = TcpOpens::default();
        opens.update([&ns]);
        assert_eq!(opens.total, TcpMib::default(), "the past is not counted");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        opens.update([&ns]);
        // Other tests of this binary may connect at the same time: at least ours.
        assert!(opens.total.active_opens >= 1, "{:?}", opens.total);
        let after = opens.total;
        opens.update(std::iter::empty());
        assert_eq!(opens.total, after, "a vanished namespace keeps its count");
    }
}
