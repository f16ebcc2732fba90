//! Rule counters as a stage, for drops no nftables trace explains: iptables-legacy (x_tables)
//! has no trace at all, and a REJECT or a drop the client never retries is never sent again to
//! be traced. When the ring buffer reports a netfilter drop, the dropping rules whose packet
//! counters moved since the last look are the ones that fired; the `netfilter` event derived
//! from them (`evidence: counters`, no path) follows the drop through the rest of the pipeline.
//!
//! The counters are read only then, and at most once per namespace per [`READ_INTERVAL`] (and
//! a fifth of the time): in a drop storm later drops reuse the last result when they go to the
//! same destination, and are left unattributed (counted) otherwise.

use std::{
    cell::RefCell,
    collections::HashMap,
    net::IpAddr,
    rc::Rc,
    time::{Duration, Instant},
};

pub use crate::model::stats::CounterStats;

use crate::{
    attribution::{
        Netfilter,
        rules::{
            attribute_counted,
            counters::{self, NftCounters},
            fetch_ruleset, legacy,
            ruleset::{RuleRef, Ruleset, parse_nft},
        },
    },
    enrich::Stage,
    error::Result,
    events::{self, Event, Kind},
    netns::NetnsRef,
};

/// At most one counter read per namespace in this interval, and never more than a fifth of the
/// time (a read of a large ruleset takes long, and the session waits for it).
pub const READ_INTERVAL: Duration = Duration::from_millis(200);

/// A cached ruleset older than this is read again before it names a rule.
pub const RULESET_MAX_AGE: Duration = Duration::from_secs(30);

/// Which counters a session reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// iptables-legacy only (`trace`: its nftables trace explains nf_tables drops, with a path).
    Legacy,
    /// iptables-legacy and nf_tables (the agent, which traces only armed, retried flows).
    All,
    /// `trace`: iptables-legacy, and the nf_tables drops its rule trace does not see — data
    /// segments of established connections (the trace marks only SYN, FIN, RST and ICMP
    /// errors; a dropped flow's retransmit is traced once it is armed).
    TraceGaps,
}

/// What the counters stage keeps of one namespace.
struct NsCounters {
    ns: NetnsRef,
    /// Names the rules; read again when a fired rule is not in it or it is older than
    /// [`RULESET_MAX_AGE`] (a policy chain may have been rewritten around the same rule).
    ruleset: Ruleset,
    ruleset_at: Instant,
    legacy: Option<legacy::Counters>,
    nft: Option<NftCounters>,
    /// No read before this.
    next_read: Option<Instant>,
    /// The last attribution and the destination of the packet it explained.
    last: Option<((IpAddr, u16), Netfilter)>,
}

impl NsCounters {
    /// The first snapshot, so the first drop has something to be diffed with. For legacy
    /// counters only, the nf_tables ruleset is read only where legacy rules exist.
    fn snapshot(ns: &NetnsRef, counted: Counted) -> Result<Self> {
        let (ruleset, legacy) = ns.run(|| {
            let legacy = legacy::snapshot();
            let rs = if counted != Counted::Legacy || !legacy.is_empty() {
                fetch_ruleset()
            } else {
                Ruleset::default()
            };
            (rs, (!legacy.is_empty()).then_some(legacy))
        })?;
        let nft = (counted != Counted::Legacy).then(|| counters::nft_counters(&ruleset.tables));
        Ok(Self {
            ns: ns.clone(),
            ruleset,
            ruleset_at: Instant::now(),
            legacy,
            nft,
            next_read: None,
            last: None,
        })
    }

    /// Reads the counters again; the dropping rules that fired since the last read.
    fn fired(&mut self) -> Result<Vec<RuleRef>> {
        let mut fired = Vec::new();
        if let Some(before) = &mut self.legacy {
            let after = self.ns.run(legacy::snapshot)?;
            fired.extend(legacy::fired(before, &after));
            *before = after;
        }
        if let Some(before) = &mut self.nft {
            let after = self.ns.run(read_nft_counters)?;
            let moved = counters::moved(before, &after);
            *before = after;
            if !moved.is_empty() {
                fired.extend(self.nft_fired(&moved)?);
            }
        }
        Ok(fired)
    }

    /// The rule that fired for a drop to `dst`, from the counters read now.
    fn read_and_attribute(&mut self, dst: (IpAddr, u16)) -> Option<Netfilter> {
        let mut fired = self.fired().ok()?;
        counters::prefer_destination(&mut fired, Some(dst));
        attribute_counted(&fired, &self.ruleset, Some(dst))
    }

    fn nft_fired(&mut self, moved: &[(String, String, String, u64)]) -> Result<Vec<RuleRef>> {
        if self.ruleset_at.elapsed() < RULESET_MAX_AGE
            && let Some(f) = counters::fired(moved, &self.ruleset)
        {
            return Ok(f);
        }
        // A rule added since the ruleset was read, or an old read: read it again once.
        self.ruleset = self.ns.run(fetch_ruleset)?;
        self.ruleset_at = Instant::now();
        Ok(counters::fired(moved, &self.ruleset).unwrap_or_default())
    }
}

/// `nft -a list ruleset`'s counters in the calling thread's namespace.
fn read_nft_counters() -> NftCounters {
    let out = std::process::Command::new("nft")
        .args(["-a", "list", "ruleset"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    counters::nft_counters(&parse_nft(&out))
}

struct Scope {
    namespaces: HashMap<u64, NsCounters>,
    stats: CounterStats,
    counted: Counted,
}

/// The namespaces whose counters are read: the front-end adds them (the agent as it finds
/// them). Cloneable; shared with the stage.
#[derive(Clone)]
pub struct CounterScope(Rc<RefCell<Scope>>);

impl CounterScope {
    /// Takes the namespace's first snapshot (once per namespace).
    pub fn add_netns(&self, ns: &NetnsRef) -> Result<()> {
        if self.0.borrow().namespaces.contains_key(&ns.inode) {
            return Ok(());
        }
        let counted = self.0.borrow().counted;
        let snapshot = NsCounters::snapshot(ns, counted)?;
        self.0.borrow_mut().namespaces.insert(ns.inode, snapshot);
        Ok(())
    }

    /// Forgets a namespace (gone).
    pub fn remove_netns(&self, inode: u64) {
        self.0.borrow_mut().namespaces.remove(&inode);
    }

    pub fn stats(&self) -> CounterStats {
        self.0.borrow().stats
    }
}

/// The stage: a netfilter drop → the rule whose counter moved, as a derived `netfilter` event.
pub struct RuleCounters {
    scope: CounterScope,
}

impl RuleCounters {
    pub fn new(counted: Counted) -> Self {
        Self {
            scope: CounterScope(Rc::new(RefCell::new(Scope {
                namespaces: HashMap::new(),
                stats: CounterStats::default(),
                counted,
            }))),
        }
    }

    /// The handle the front-end adds namespaces with and reads the stats from.
    pub fn scope(&self) -> CounterScope {
        self.scope.clone()
    }
}

/// A drop inside netfilter: reason NETFILTER_DROP (nf_tables or x_tables), or any drop at
/// `nf_hook_slow` (x_tables on kernels that report no reason there).
fn in_netfilter(e: &Event) -> bool {
    e.kind == Kind::Drop
        && e.drop.as_ref().is_some_and(|d| {
            d.reason == crate::model::drop_reason::NETFILTER_DROP
                || d.location.starts_with("nf_hook_slow")
        })
}

impl Scope {
    /// The rule behind a drop to `dst` in `inode`, within the read budget.
    fn attribute(&mut self, inode: u64, dst: (IpAddr, u16), now: Instant) -> Option<Netfilter> {
        let r = self.namespaces.get_mut(&inode)?;
        if r.next_read.is_some_and(|t| now < t) {
            return match &r.last {
                Some((d, nf)) if *d == dst => {
                    self.stats.reused += 1;
                    Some(nf.clone())
                }
                _ => {
                    self.stats.skipped += 1;
                    None
                }
            };
        }
        self.stats.reads += 1;
        let started = Instant::now();
        let nf = r.read_and_attribute(dst);
        r.next_read = Some(now + READ_INTERVAL.max(started.elapsed() * 4));
        r.last = nf.clone().map(|nf| (dst, nf));
        nf
    }
}

/// An nf_tables drop of a packet the trace table marks (UDP, TCP with SYN, FIN or RST, an
/// ICMP error about the flow): its rule comes from the trace, with a path.
fn traced_by_nft(e: &Event) -> bool {
    use crate::model::{Protocol, TcpFlag};
    let nft = e
        .drop
        .as_ref()
        .is_some_and(|d| d.location.starts_with("nft_do_chain"));
    let marked = e.protocol == Protocol::Udp
        || (e.protocol.is_icmp() && e.icmp.is_some() && e.sport != 0)
        || [TcpFlag::Syn, TcpFlag::Fin, TcpFlag::Rst]
            .iter()
            .any(|f| e.has_flag(*f));
    nft && marked
}

impl Stage for RuleCounters {
    fn enrich(&mut self, e: &mut Event, derived: &mut Vec<Event>) {
        if !in_netfilter(e) {
            return;
        }
        if self.scope.0.borrow().counted == Counted::TraceGaps && traced_by_nft(e) {
            return;
        }
        let Some(inode) = e.netns.as_ref().map(|n| n.inode) else {
            return;
        };
        let mut scope = self.scope.0.borrow_mut();
        let Some(nf) = scope.attribute(inode, (e.dst, e.dport), Instant::now()) else {
            return;
        };
        scope.stats.attributed += 1;
        derived.push(events::netfilter(
            e.time_ns,
            e.protocol,
            e.netns.clone(),
            e.interface.clone(),
            Some((e.src, e.sport, e.dst, e.dport)),
            nf,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::rules::attribute_counted;

    /// A namespace whose counters were just read and named a rule for a drop to `dst`.
    fn just_read(dst: (IpAddr, u16), now: Instant) -> NsCounters {
        let rule = legacy::fired(
            &legacy::Counters::new(),
            &legacy::parse_counters(
                "ip",
                "*filter\n[1:60] -A FORWARD -p tcp -m tcp --dport 9004 -j DROP\nCOMMIT\n",
            ),
        );
        let nf = attribute_counted(&rule, &Ruleset::default(), Some(dst)).unwrap();
        NsCounters {
            ns: NetnsRef {
                name: "node".into(),
                path: "/nonexistent".into(),
                inode: 7,
            },
            ruleset: Ruleset::default(),
            ruleset_at: now,
            legacy: None,
            nft: None,
            next_read: Some(now + READ_INTERVAL),
            last: Some((dst, nf)),
        }
    }

    #[test]
    fn within_the_read_interval_drops_reuse_or_are_skipped_and_counted() {
        let now = Instant::now();
        let dst = ("10.42.0.30".parse().unwrap(), 9004);
        let mut scope = Scope {
            namespaces: HashMap::from([(7, just_read(dst, now))]),
            stats: CounterStats::default(),
            counted: Counted::All,
        };
        let later = now + READ_INTERVAL / 2;
        let nf = scope.attribute(7, dst, later).expect("same destination");
        assert_eq!(nf.chain, "FORWARD");
        assert_eq!(nf.evidence, crate::attribution::Evidence::Counters);
        assert!(nf.path.is_empty());
        let other = ("10.42.0.31".parse().unwrap(), 9004);
        assert!(scope.attribute(7, other, later).is_none());
        assert!(
            scope.attribute(8, dst, later).is_none(),
            "not a watched netns"
        );
        assert_eq!(
            scope.stats,
            CounterStats {
                reads: 0,
                attributed: 0,
                reused: 1,
                skipped: 1
            }
        );
    }
}
