//! Turns raw kernel events into public events: names for drop and reset reasons (from the
//! running kernel's BTF), code locations, namespaces and interfaces. Pods, rules and conntrack
//! come in later stages of this module.

pub mod backlog;
pub mod conntrack;
pub mod kallsyms;
pub mod kube;
pub mod listeners;
pub mod names;
pub mod pods;
pub mod recent;
pub mod route;
pub mod rpfilter;
pub mod served;
pub mod stages;
pub mod tc_programs;

use std::collections::HashMap;

use netprobe_common::{RawEvent, kind};

use crate::model::drop_reason;
use crate::{
    error::Result,
    events::{self, DropInfo, Event, Interface, Netns, ResetInfo},
    probes::{TcAttachment, btf::KernelBtf},
};
use kallsyms::Kallsyms;

/// Enrichment that runs inside the session on every routed event, in order: names, conntrack,
/// rule counters (see `stages` here and `sources/xtables.rs`).
pub trait Stage {
    /// Adds what this stage knows to `e`; events it derives (a rule found by counter
    /// difference) go to `derived` and pass the stages after it.
    fn enrich(&mut self, e: &mut Event, derived: &mut Vec<Event>);
}

pub struct Enricher {
    drop_reasons: HashMap<u32, String>,
    rst_reasons: HashMap<u32, String>,
    kallsyms: Kallsyms,
    /// Grows during a trace (new pods), hence shared mutability.
    netns_names: std::cell::RefCell<HashMap<u64, String>>,
    /// ifindex → attachments with that index (lo is 1 in every namespace).
    tc: std::cell::RefCell<HashMap<u32, Vec<TcAttachment>>>,
    /// (netns, ifindex) → name, for interfaces seen by tracepoints.
    ifnames: std::cell::RefCell<HashMap<(u64, u32), String>>,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC, to report wall-clock times.
    realtime_offset_ns: i128,
}

impl Enricher {
    pub fn new(kbtf: &KernelBtf) -> Result<Self> {
        Ok(Self {
            drop_reasons: kbtf.enum_names("skb_drop_reason", "SKB_DROP_REASON_")?,
            // Absent before 6.10; resets then carry no reason.
            rst_reasons: kbtf
                .enum_names("sk_rst_reason", "SK_RST_REASON_")
                .unwrap_or_default(),
            kallsyms: Kallsyms::load(),
            netns_names: Default::default(),
            tc: Default::default(),
            ifnames: Default::default(),
            realtime_offset_ns: realtime_offset_ns(),
        })
    }

    pub fn drop_reason_name(&self, code: u32) -> String {
        self.drop_reasons
            .get(&code)
            .cloned()
            .unwrap_or_else(|| format!("REASON_{code}"))
    }

    pub fn add_netns(&self, inode: u64, name: &str) {
        self.netns_names
            .borrow_mut()
            .insert(inode, name.to_string());
    }

    pub fn add_interface(&self, netns: u64, ifindex: u32, name: &str) {
        self.ifnames
            .borrow_mut()
            .insert((netns, ifindex), name.to_string());
    }

    /// A pod namespace that is gone: its name is forgotten (the agent's names stay bounded).
    pub fn remove_netns(&self, inode: u64) {
        self.netns_names.borrow_mut().remove(&inode);
    }

    /// An interface that is gone (a deleted veth): its name and attachment are forgotten.
    pub fn remove_interface(&self, netns: u64, ifindex: u32) {
        self.ifnames.borrow_mut().remove(&(netns, ifindex));
        let mut tc = self.tc.borrow_mut();
        if let Some(list) = tc.get_mut(&ifindex) {
            list.retain(|x| x.netns != netns);
            if list.is_empty() {
                tc.remove(&ifindex);
            }
        }
    }

    pub fn add_tc(&self, a: &TcAttachment) {
        self.add_interface(a.netns, a.ifindex, &a.ifname);
        let mut tc = self.tc.borrow_mut();
        let list = tc.entry(a.ifindex).or_default();
        // Re-attachment after a veth was recreated with the same index replaces the old entry.
        list.retain(|x| x.netns != a.netns);
        list.push(a.clone());
    }

    pub fn interface(&self, netns: u64, ifindex: u32) -> Interface {
        Interface {
            ifindex,
            name: self.ifnames.borrow().get(&(netns, ifindex)).cloned(),
        }
    }

    pub fn netns(&self, inode: u64) -> Netns {
        Netns {
            inode,
            name: self.netns_names.borrow().get(&inode).cloned(),
        }
    }

    /// [`Self::enrich`], plus the DNS header and question of a DNS datagram.
    pub fn enrich_record(&self, r: &crate::events::raw::Record) -> Option<Event> {
        let mut e = self.enrich(&r.ev)?;
        e.dns = r.dns_bytes().and_then(events::dns::parse);
        Some(e)
    }

    /// Now, in the events' time base (kernel time made wall time, with the offset taken once:
    /// comparable with the events' times to the nanosecond).
    pub fn now_ns(&self) -> u64 {
        (monotonic_ns() as i128 + self.realtime_offset_ns).max(0) as u64
    }

    /// Namespace and interface of a tc event. An ifindex is only unique within a namespace (a
    /// pod's eth0 and a node interface can share one): the device's namespace, which the program
    /// reads, picks the interface. Without it (an older program), the attachment decides only
    /// when one namespace has that ifindex; otherwise the interface stays unnamed rather than
    /// named after another namespace's.
    fn place_tc(&self, ev: &RawEvent, out: &mut Event) {
        let tc = self.tc.borrow();
        let atts = tc.get(&ev.ifindex).map(Vec::as_slice).unwrap_or_default();
        let netns = match (ev.netns, atts) {
            (0, [a]) => Some(a.netns),
            (0, _) => None,
            (ns, _) => Some(ns as u64),
        };
        out.netns = netns.map(|n| self.netns(n));
        let name = netns.and_then(|n| {
            atts.iter()
                .find(|a| a.netns == n)
                .map(|a| a.ifname.clone())
                .or_else(|| self.ifnames.borrow().get(&(n, ev.ifindex)).cloned())
        });
        out.interface = Some(Interface {
            ifindex: ev.ifindex,
            name,
        });
    }

    pub fn enrich(&self, ev: &RawEvent) -> Option<Event> {
        let time = (ev.ts_ns as i128 + self.realtime_offset_ns).max(0) as u64;
        let mut out = events::base(ev, time)?;
        match ev.kind {
            kind::TC_INGRESS | kind::TC_EGRESS => self.place_tc(ev, &mut out),
            _ => {
                if ev.netns != 0 {
                    out.netns = Some(self.netns(ev.netns as u64));
                }
                if ev.ifindex != 0 {
                    out.interface = Some(Interface {
                        ifindex: ev.ifindex,
                        name: self
                            .ifnames
                            .borrow()
                            .get(&(ev.netns as u64, ev.ifindex))
                            .cloned(),
                    });
                }
            }
        }
        match ev.kind {
            kind::DROP => {
                let mut info = DropInfo {
                    reason: self.drop_reason_name(ev.reason),
                    reason_code: ev.reason,
                    location: self.kallsyms.symbolize(ev.location),
                    ..Default::default()
                };
                at_the_drop(ev, &out, &mut info);
                out.drop = Some(info);
            }
            kind::SEND_RESET => {
                out.reset = Some(ResetInfo {
                    reason: self.rst_reasons.get(&ev.reason).cloned(),
                })
            }
            _ => {}
        }
        Some(out)
    }
}

/// What only the node knows about a drop, read now (programs get replaced, sysctls and routes
/// edited): the tc programs on the hook that dropped, the rp_filter that applied.
fn at_the_drop(ev: &RawEvent, out: &Event, info: &mut DropInfo) {
    let Some(netns) = out.netns.as_ref().map(|n| n.inode) else {
        return;
    };
    if ev.ifindex == 0 {
        return;
    }
    match info.reason.as_str() {
        drop_reason::TC_INGRESS | drop_reason::TC_EGRESS => {
            let ingress = info.reason == drop_reason::TC_INGRESS;
            info.tc_programs = tc_programs::at_drop(netns, ev.ifindex, ingress);
        }
        drop_reason::IP_RPFILTER => {
            info.rp_filter = rpfilter::at_drop(netns, ev.ifindex, out.src);
        }
        _ => {}
    }
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn realtime_offset_ns() -> i128 {
    let get = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid pointer.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    get(libc::CLOCK_REALTIME) - get(libc::CLOCK_MONOTONIC)
}
