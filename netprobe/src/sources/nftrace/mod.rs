//! The nftables trace as a source: a temporary table marks the traced flow (`meta nftrace set
//! 1`), nf_tables reports every rule the flow's packets match on the NFNLGRP_NFTRACE netlink
//! group of each namespace, and a packet's path that ends in a drop or reject becomes a
//! `netfilter` event naming the rule and its owner. One reader thread per namespace (a blocking
//! netlink socket); the table and the threads go away when the source is dropped.
//!
//! After the handshake the table marks no data segment (no per-packet cost); what a rule drops
//! then is still named by a trace: an ICMP error about the flow is marked and paired with the
//! flow it quotes ([`icmp`]), and a data segment dropped by a rule arms its sender's flow with
//! the agent's machinery ([`armed`]) so that its retransmit is traced ([`MidStreamDrops`]).

pub mod armed;
pub mod icmp;
pub mod reader;
pub mod worker;

use std::{
    cell::RefCell,
    collections::HashMap,
    net::IpAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use futures::future::LocalBoxFuture;
use tokio::sync::mpsc;

use crate::{
    attribution::rules::path_tuple,
    enrich::{Enricher, Stage},
    error::Result,
    events::{self, Event, Kind},
    model::{Protocol, TcpFlag, drop_reason},
    netlink::nftrace::TraceMsg,
    netns::NetnsRef,
    probes::nft_trace::{TraceTable, armed_table_name},
    session::{Input, Source},
    sinks::Summary,
};
use armed::{ArmedTrace, Arming};
use icmp::{IcmpJoin, TracedError};
pub use reader::NsRules;
use reader::{Message, TraceReaders};

/// How often flows armed for [`armed::DEFAULT_TTL`] are disarmed (their table goes with the
/// last one).
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

pub struct RuleTrace {
    /// By namespace inode.
    rules: HashMap<u64, NsRules>,
    rx: mpsc::Receiver<Message>,
    /// The traced flow's protocol (TCP or UDP) and port.
    proto: Protocol,
    port: u16,
    enricher: Rc<Enricher>,
    tables: Vec<TraceTable>,
    readers: TraceReaders,
    /// Traced ICMP errors waiting for the kernel's drop event that names their flow.
    icmp: Rc<RefCell<IcmpJoin>>,
    /// Flows whose data segments a rule dropped: their retransmits are traced.
    armed: ArmedTrace,
    /// When armed flows are next expired (a deadline, not a timer restarted by each message:
    /// a steady stream of trace messages must not put it off).
    expire_at: tokio::time::Instant,
}

impl RuleTrace {
    /// Listens first, then marks the flow, so no message is missed.
    pub fn start(
        namespaces: &[NetnsRef],
        proto: Protocol,
        port: u16,
        addr: Option<IpAddr>,
        enricher: Rc<Enricher>,
    ) -> Result<Self> {
        let (readers, rx) = TraceReaders::new();
        let armed = ArmedTrace::new(enricher.clone(), armed::DEFAULT_LIMIT, armed::DEFAULT_TTL);
        let mut trace = Self {
            rules: HashMap::new(),
            rx,
            proto,
            port,
            enricher,
            tables: Vec::new(),
            readers,
            icmp: Rc::default(),
            armed,
            expire_at: tokio::time::Instant::now() + EXPIRE_EVERY,
        };
        for ns in namespaces {
            trace.armed.arming().add_netns(ns);
            trace.readers.listen(ns)?;
            trace
                .tables
                .push(TraceTable::install(ns, &proto.to_string(), port, addr)?);
            trace.rules.insert(ns.inode, NsRules::read_now(ns)?);
        }
        Ok(trace)
    }

    /// The stage that feeds this trace what the kernel's drop events tell: the flows ICMP
    /// errors quote, the flows whose data segments a rule dropped.
    pub fn stage(&self) -> MidStreamDrops {
        MidStreamDrops {
            icmp: self.icmp.clone(),
            arming: self.armed.arming(),
            port: self.port,
        }
    }

    /// A trace message of namespace `inode`; a path that ended in a drop becomes an event. An
    /// armed flow's path is [`ArmedTrace`]'s; an ICMP error's waits for the flow it quotes.
    fn on_message(&mut self, inode: u64, m: TraceMsg) -> Result<Option<Event>> {
        let Some(r) = self.rules.get_mut(&inode) else {
            return Ok(None);
        };
        let Some((path, nf)) = r.push(m)? else {
            return Ok(None);
        };
        let armed = armed_table_name();
        if path.iter().any(|m| m.table == armed) {
            return Ok(None);
        }
        let interface = r.interface(&path, &self.enricher);
        let (protocol, tuple, nf, interface) = match icmp::traced_error(inode, &path) {
            Some(key) => {
                let err = TracedError { nf, interface };
                let paired = self.icmp.borrow_mut().traced(key, err, Instant::now());
                let Some((flow, err)) = paired else {
                    return Ok(None);
                };
                (flow.protocol, Some(flow.tuple), err.nf, err.interface)
            }
            None => (self.proto, path_tuple(&path), nf, interface),
        };
        Ok(Some(events::netfilter(
            self.enricher.now_ns(),
            protocol,
            Some(self.enricher.netns(inode)),
            interface,
            tuple,
            nf,
        )))
    }
}

impl Source for RuleTrace {
    fn next(&mut self) -> LocalBoxFuture<'_, Result<Input>> {
        Box::pin(async move {
            loop {
                tokio::select! {
                    m = self.rx.recv() => {
                        let Some((inode, m)) = m else {
                            return std::future::pending().await;
                        };
                        let events = self.on_message(inode, m)?.into_iter().collect();
                        return Ok(Input::Events(events));
                    }
                    armed = self.armed.next() => return armed,
                    _ = tokio::time::sleep_until(self.expire_at) => {
                        self.expire_at = tokio::time::Instant::now() + EXPIRE_EVERY;
                        self.armed.arming().expire(Instant::now());
                    }
                }
            }
        })
    }

    fn report(&self, summary: &mut Summary) {
        summary.netfilter_trace_overruns += self.readers.overruns();
        self.armed.report(summary);
        let forgotten = self.icmp.borrow().evicted();
        if forgotten > 0 {
            summary.warnings.push(format!(
                "{forgotten} ICMP errors dropped by a rule were let go before their trace and their drop event met (at most {} wait on each side): their rules may be unnamed",
                icmp::MAX_WAITING
            ));
        }
        for r in self.rules.values() {
            if let Some(rs) = r.ruleset().filter(|rs| rs.mixed_backends()) {
                summary.warnings.push(format!(
                    "netns {}: {} iptables-legacy rules next to nf_tables rules; two firewalls run side by side (a known breakage after a CNI migration), and drops in the legacy one are invisible to the nftables trace",
                    r.ns.name, rs.legacy_rules
                ));
            }
        }
    }
}

impl Drop for RuleTrace {
    /// The tables go first (nothing more is marked), then the reader threads (their own drop).
    fn drop(&mut self) {
        for t in &mut self.tables {
            t.remove();
        }
    }
}

/// The stage of a [`RuleTrace`]: the kernel's drop event of an ICMP error at a rule gives the
/// flow it quotes (paired with its trace: a `netfilter` event when the trace came first), and
/// a data segment of an established flow dropped by an nf_tables rule arms its sender's flow.
pub struct MidStreamDrops {
    icmp: Rc<RefCell<IcmpJoin>>,
    arming: Arming,
    /// The traced port: its side's segments do not arm.
    port: u16,
}

/// The client that sent a TCP segment without SYN, FIN or RST that an nf_tables rule dropped,
/// and the namespace (inode) it was dropped in. A segment from the traced `port` does not arm:
/// the armed set matches a sender's address and port, and a server's are all its connections'
/// (every segment of them would be traced); counters name that rule.
fn dropped_data_segment(e: &Event, port: u16) -> Option<(u64, (IpAddr, u16))> {
    let by_nft = e.drop.as_ref().is_some_and(|d| {
        d.reason == drop_reason::NETFILTER_DROP && d.location.starts_with("nft_do_chain")
    });
    let data = e.protocol == Protocol::Tcp
        && ![TcpFlag::Syn, TcpFlag::Fin, TcpFlag::Rst]
            .iter()
            .any(|f| e.has_flag(*f));
    (e.kind == Kind::Drop && by_nft && data && e.sport != port)
        .then(|| Some((e.netns.as_ref()?.inode, (e.src, e.sport))))
        .flatten()
}

impl Stage for MidStreamDrops {
    fn enrich(&mut self, e: &mut Event, derived: &mut Vec<Event>) {
        if let Some((key, flow)) = icmp::dropped_error(e) {
            let traced = self.icmp.borrow_mut().dropped(key, flow, Instant::now());
            if let Some(t) = traced {
                derived.push(events::netfilter(
                    e.time_ns,
                    flow.protocol,
                    e.netns.clone(),
                    t.interface,
                    Some(flow.tuple),
                    t.nf,
                ));
            }
        } else if let Some((inode, sender)) = dropped_data_segment(e, self.port) {
            // Refused at the bound (counted): the drop is then named by counters only.
            self.arming.arm(inode, Protocol::Tcp, sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{DropInfo, Netns, derived};

    fn dropped(flags: &[TcpFlag], location: &str) -> Event {
        let tuple = (
            "10.42.0.20".parse().unwrap(),
            40000,
            "10.42.0.30".parse().unwrap(),
            9500,
        );
        let mut e = derived(1, Kind::Drop, Protocol::Tcp, tuple);
        e.tcp_flags = flags.to_vec();
        e.netns = Some(Netns {
            inode: 7,
            name: None,
        });
        e.drop = Some(DropInfo {
            reason: drop_reason::NETFILTER_DROP.into(),
            location: location.into(),
            ..Default::default()
        });
        e
    }

    #[test]
    fn a_data_segment_dropped_by_an_nft_rule_names_its_sender() {
        let sender = ("10.42.0.20".parse().unwrap(), 40000);
        let data = dropped(&[TcpFlag::Ack, TcpFlag::Psh], "nft_do_chain+0x46f");
        assert_eq!(dropped_data_segment(&data, 9500), Some((7, sender)));
        let mut from_server = data.clone();
        (from_server.sport, from_server.dport) = (9500, 40000);
        assert_eq!(dropped_data_segment(&from_server, 9500), None);
        for not_data in [
            dropped(&[TcpFlag::Syn], "nft_do_chain+0x46f"),
            dropped(&[TcpFlag::Fin, TcpFlag::Ack], "nft_do_chain+0x46f"),
            // iptables-legacy: no trace would see its retransmit; counters name it.
            dropped(&[TcpFlag::Ack], "nf_hook_slow+0x9a"),
        ] {
            assert_eq!(dropped_data_segment(&not_data, 9500), None, "{not_data:?}");
        }
    }
}
