//! The nftables trace as a source: a temporary table marks the traced flow (`meta nftrace set
//! 1`), nf_tables reports every rule the flow's packets match on the NFNLGRP_NFTRACE netlink
//! group of each namespace, and a packet's path that ends in a drop or reject becomes a
//! `netfilter` event naming the rule and its owner. One reader thread per namespace (a blocking
//! netlink socket); the table and the threads go away when the source is dropped.

use std::{
    cell::RefCell,
    net::IpAddr,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use futures::future::LocalBoxFuture;
use tokio::sync::mpsc;

use crate::netlink::nftrace::{TraceMsg, TraceSocket};

use crate::{
    attribution::rules::{
        PathCollector, attribute, fetch_ruleset,
        legacy::{self, Counters},
        path_tuple,
        ruleset::Ruleset,
    },
    enrich::Enricher,
    error::{Error, Result},
    events::{self, Event},
    model::Protocol,
    netns::NetnsRef,
    probes::nft_trace::TraceTable,
    session::{Input, Source},
    sinks::Summary,
};

/// What attribution knows of one traced namespace.
pub struct NsRules {
    pub ns: NetnsRef,
    /// Read at the start; read again when a traced rule is not in it.
    pub ruleset: Ruleset,
    /// iptables-legacy counters at the last look (only where legacy rules exist).
    pub legacy: Option<Counters>,
    collector: PathCollector,
}

/// The rulesets of the traced namespaces, shared with the x_tables counters stage.
pub type SharedRules = Rc<RefCell<Vec<NsRules>>>;

pub struct RuleTrace {
    rules: SharedRules,
    rx: mpsc::UnboundedReceiver<(usize, TraceMsg)>,
    /// The traced flow's protocol (TCP or UDP).
    proto: Protocol,
    enricher: Rc<Enricher>,
    tables: Vec<TraceTable>,
    stop: Arc<AtomicBool>,
    readers: Vec<JoinHandle<()>>,
    /// Socket overruns (ENOBUFS: the kernel dropped trace messages).
    overruns: Arc<AtomicU64>,
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
        let (tx, rx) = mpsc::unbounded_channel();
        let mut trace = Self {
            rules: Rc::default(),
            rx,
            proto,
            enricher,
            tables: Vec::new(),
            stop: Arc::default(),
            readers: Vec::new(),
            overruns: Arc::default(),
        };
        for (i, ns) in namespaces.iter().enumerate() {
            trace.listen(i, ns, tx.clone())?;
            trace
                .tables
                .push(TraceTable::install(ns, &proto.to_string(), port, addr)?);
            let ruleset = ns.run(fetch_ruleset)?;
            let legacy = if ruleset.legacy_rules > 0 {
                Some(ns.run(legacy::snapshot)?)
            } else {
                None
            };
            trace.rules.borrow_mut().push(NsRules {
                ns: ns.clone(),
                ruleset,
                legacy,
                collector: PathCollector::default(),
            });
        }
        Ok(trace)
    }

    fn listen(
        &mut self,
        i: usize,
        ns: &NetnsRef,
        tx: mpsc::UnboundedSender<(usize, TraceMsg)>,
    ) -> Result<()> {
        let sock = ns.run(TraceSocket::open)?.map_err(|e| {
            Error::io(
                format!("opening the nftables trace socket in {}", ns.name),
                e,
            )
        })?;
        let (stop, overruns) = (self.stop.clone(), self.overruns.clone());
        self.readers.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while !stop.load(Ordering::Relaxed) {
                if sock
                    .recv(&mut buf, |m| {
                        let _ = tx.send((i, m));
                    })
                    .is_err()
                {
                    overruns.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        Ok(())
    }

    pub fn rules(&self) -> SharedRules {
        self.rules.clone()
    }

    /// A trace message of namespace `i`; a path that ended in a drop becomes an event.
    fn on_message(&mut self, i: usize, m: TraceMsg) -> Result<Option<Event>> {
        let mut rules = self.rules.borrow_mut();
        let r = &mut rules[i];
        let Some(path) = r.collector.push(m) else {
            return Ok(None);
        };
        let mut nf = attribute(&path, &r.ruleset);
        if nf
            .as_ref()
            .is_some_and(|n| n.rule.is_none() && n.handle.is_some())
        {
            // The ruleset changed since we read it: read it again once.
            r.ruleset = r.ns.run(fetch_ruleset)?;
            nf = attribute(&path, &r.ruleset);
        }
        let Some(nf) = nf else {
            return Ok(None);
        };
        let last = path.last().expect("non-empty path");
        let inode = r.ns.inode;
        let iface = last
            .iif
            .or(last.oif)
            .map(|ix| self.enricher.interface(inode, ix));
        Ok(Some(events::netfilter(
            self.enricher.now_ns(),
            self.proto,
            Some(self.enricher.netns(inode)),
            iface,
            path_tuple(&path),
            nf,
        )))
    }
}

impl Source for RuleTrace {
    fn next(&mut self) -> LocalBoxFuture<'_, Result<Input>> {
        Box::pin(async move {
            let Some((i, m)) = self.rx.recv().await else {
                return std::future::pending().await;
            };
            let events = self.on_message(i, m)?.into_iter().collect();
            Ok(Input::Events(events))
        })
    }

    fn report(&self, summary: &mut Summary) {
        summary.netfilter_trace_overruns += self.overruns.load(Ordering::Relaxed);
        for r in self.rules.borrow().iter() {
            if r.ruleset.mixed_backends() {
                summary.warnings.push(format!(
                    "netns {}: {} iptables-legacy rules next to nf_tables rules; two firewalls run side by side (a known breakage after a CNI migration), and drops in the legacy one are invisible to the nftables trace",
                    r.ns.name, r.ruleset.legacy_rules
                ));
            }
        }
    }
}

impl Drop for RuleTrace {
    /// The tables go first (nothing more is marked), then the reader threads.
    fn drop(&mut self) {
        for t in &mut self.tables {
            t.remove();
        }
        self.stop.store(true, Ordering::Relaxed);
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}
