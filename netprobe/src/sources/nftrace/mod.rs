//! The nftables trace as a source: a temporary table marks the traced flow (`meta nftrace set
//! 1`), nf_tables reports every rule the flow's packets match on the NFNLGRP_NFTRACE netlink
//! group of each namespace, and a packet's path that ends in a drop or reject becomes a
//! `netfilter` event naming the rule and its owner. One reader thread per namespace (a blocking
//! netlink socket); the table and the threads go away when the source is dropped.

pub mod armed;
pub mod reader;
pub mod worker;

use std::{collections::HashMap, net::IpAddr, rc::Rc};

use futures::future::LocalBoxFuture;
use tokio::sync::mpsc;

use crate::{
    attribution::rules::path_tuple,
    enrich::Enricher,
    error::Result,
    events::{self, Event},
    model::Protocol,
    netlink::nftrace::TraceMsg,
    netns::NetnsRef,
    probes::nft_trace::TraceTable,
    session::{Input, Source},
    sinks::Summary,
};
pub use reader::NsRules;
use reader::{Message, TraceReaders};

pub struct RuleTrace {
    /// By namespace inode.
    rules: HashMap<u64, NsRules>,
    rx: mpsc::UnboundedReceiver<Message>,
    /// The traced flow's protocol (TCP or UDP).
    proto: Protocol,
    enricher: Rc<Enricher>,
    tables: Vec<TraceTable>,
    readers: TraceReaders,
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
        let mut trace = Self {
            rules: HashMap::new(),
            rx,
            proto,
            enricher,
            tables: Vec::new(),
            readers,
        };
        for ns in namespaces {
            trace.readers.listen(ns)?;
            trace
                .tables
                .push(TraceTable::install(ns, &proto.to_string(), port, addr)?);
            trace.rules.insert(ns.inode, NsRules::read_now(ns)?);
        }
        Ok(trace)
    }

    /// A trace message of namespace `inode`; a path that ended in a drop becomes an event.
    fn on_message(&mut self, inode: u64, m: TraceMsg) -> Result<Option<Event>> {
        let Some(r) = self.rules.get_mut(&inode) else {
            return Ok(None);
        };
        let Some((path, nf)) = r.push(m)? else {
            return Ok(None);
        };
        Ok(Some(events::netfilter(
            self.enricher.now_ns(),
            self.proto,
            Some(self.enricher.netns(inode)),
            r.interface(&path, &self.enricher),
            path_tuple(&path),
            nf,
        )))
    }
}

impl Source for RuleTrace {
    fn next(&mut self) -> LocalBoxFuture<'_, Result<Input>> {
        Box::pin(async move {
            let Some((inode, m)) = self.rx.recv().await else {
                return std::future::pending().await;
            };
            let events = self.on_message(inode, m)?.into_iter().collect();
            Ok(Input::Events(events))
        })
    }

    fn report(&self, summary: &mut Summary) {
        summary.netfilter_trace_overruns += self.readers.overruns();
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
