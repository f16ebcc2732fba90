//! What the rule trace and the armed flows share: one blocking reader thread per namespace on
//! its NFNLGRP_NFTRACE netlink group, feeding one channel (messages keyed by namespace inode),
//! and per namespace the collection of a packet's trace messages into a path and its
//! attribution against the namespace's ruleset.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{
    attribution::rules::{PathCollector, attribute, fetch_ruleset, ruleset::Ruleset},
    enrich::Enricher,
    error::{Error, Result},
    events::Interface,
    netlink::nftrace::{TraceMsg, TraceSocket},
    netns::NetnsRef,
};

use crate::attribution::Netfilter;

/// A trace message and the inode of the namespace it came from.
pub type Message = (u64, TraceMsg);

/// Hands a message to the session, or counts it lost when the queue is full (a closed queue:
/// the session is ending, nothing to count).
fn forward(tx: &mpsc::Sender<Message>, lost: &AtomicU64, m: Message) {
    if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(m) {
        lost.fetch_add(1, Ordering::Relaxed);
    }
}

/// Trace messages waiting for the session. The trace netlink group of a namespace carries every
/// traced packet's messages to every listener (another trace's SYN flood included), so a reader
/// that falls behind must not queue them without end: past this, messages are counted as lost
/// with the socket's overruns (~1 KiB each: a few MiB at most).
pub const MAX_QUEUED: usize = 4096;

struct Reader {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// Reader threads, one per namespace; stopped (and joined) on drop.
pub struct TraceReaders {
    tx: mpsc::Sender<Message>,
    readers: HashMap<u64, Reader>,
    /// Trace messages lost: socket overruns (ENOBUFS: the kernel dropped them) and messages
    /// that found the queue full ([`MAX_QUEUED`]).
    overruns: Arc<AtomicU64>,
}

impl TraceReaders {
    pub fn new() -> (Self, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(MAX_QUEUED);
        let readers = Self {
            tx,
            readers: HashMap::new(),
            overruns: Arc::default(),
        };
        (readers, rx)
    }

    /// Starts listening in `ns` (once per namespace).
    pub fn listen(&mut self, ns: &NetnsRef) -> Result<()> {
        if self.readers.contains_key(&ns.inode) {
            return Ok(());
        }
        let sock = ns.run(TraceSocket::open)?.map_err(|e| {
            Error::io(
                format!("opening the nftables trace socket in {}", ns.name),
                e,
            )
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, inode, overruns) = (self.tx.clone(), ns.inode, self.overruns.clone());
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while !flag.load(Ordering::Relaxed) {
                if sock
                    .recv(&mut buf, |m| forward(&tx, &overruns, (inode, m)))
                    .is_err()
                {
                    overruns.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        self.readers.insert(inode, Reader { stop, thread });
        Ok(())
    }

    /// Stops listening in a namespace (its socket would keep a deleted namespace alive). The
    /// thread ends within its socket's read timeout; it is not waited for.
    pub fn forget(&mut self, inode: u64) {
        if let Some(r) = self.readers.remove(&inode) {
            r.stop.store(true, Ordering::Relaxed);
        }
    }

    pub fn overruns(&self) -> u64 {
        self.overruns.load(Ordering::Relaxed)
    }
}

impl Drop for TraceReaders {
    fn drop(&mut self) {
        for r in self.readers.values() {
            r.stop.store(true, Ordering::Relaxed);
        }
        for (_, r) in self.readers.drain() {
            let _ = r.thread.join();
        }
    }
}

/// A ruleset older than this is read again before it names a rule (a long-running agent:
/// policy chains are rewritten around rules that keep their handle).
const RULESET_MAX_AGE: Duration = Duration::from_secs(30);

/// What attribution knows of one traced namespace.
pub struct NsRules {
    pub ns: NetnsRef,
    /// Read when first needed (and when read, for the age); read again when a traced rule is
    /// not in it or it is older than [`RULESET_MAX_AGE`].
    ruleset: Option<(Ruleset, Instant)>,
    collector: PathCollector,
}

impl NsRules {
    /// Attribution in `ns`; its ruleset is read when a first path needs it.
    pub fn new(ns: &NetnsRef) -> Self {
        Self {
            ns: ns.clone(),
            ruleset: None,
            collector: PathCollector::default(),
        }
    }

    /// Attribution in `ns` with its ruleset read now.
    pub fn read_now(ns: &NetnsRef) -> Result<Self> {
        let mut r = Self::new(ns);
        r.reread()?;
        Ok(r)
    }

    pub fn ruleset(&self) -> Option<&Ruleset> {
        self.ruleset.as_ref().map(|(rs, _)| rs)
    }

    fn reread(&mut self) -> Result<&Ruleset> {
        let rs = self.ns.run(fetch_ruleset)?;
        Ok(&self.ruleset.insert((rs, Instant::now())).0)
    }

    /// A trace message; when it ends a dropped packet's path: the path and the rule.
    pub fn push(&mut self, m: TraceMsg) -> Result<Option<(Vec<TraceMsg>, Netfilter)>> {
        let Some(path) = self.collector.push(m) else {
            return Ok(None);
        };
        let mut nf = match &self.ruleset {
            Some((rs, at)) if at.elapsed() < RULESET_MAX_AGE => attribute(&path, rs),
            _ => attribute(&path, self.reread()?),
        };
        if nf
            .as_ref()
            .is_some_and(|n| n.rule.is_none() && n.handle.is_some())
        {
            // The ruleset changed since we read it: read it again once.
            nf = attribute(&path, self.reread()?);
        }
        Ok(nf.map(|nf| (path, nf)))
    }

    /// The interface the dropped packet came in (or went out) on.
    pub fn interface(&self, path: &[TraceMsg], enricher: &Enricher) -> Option<Interface> {
        let last = path.last()?;
        last.iif
            .or(last.oif)
            .map(|ix| enricher.interface(self.ns.inode, ix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::nftrace::TraceType;

    /// A reader that falls behind loses messages past the bound, counted; none is queued
    /// beyond it.
    #[test]
    fn a_full_queue_counts_what_it_lets_go() {
        let (tx, mut rx) = mpsc::channel(2);
        let lost = AtomicU64::new(0);
        for id in 0..5 {
            forward(&tx, &lost, (7, TraceMsg { id, ..msg() }));
        }
        assert_eq!(lost.load(Ordering::Relaxed), 3);
        let kept: Vec<u32> = std::iter::from_fn(|| rx.try_recv().ok().map(|(_, m)| m.id)).collect();
        assert_eq!(kept, vec![0, 1]);
        drop(rx);
        forward(&tx, &lost, (7, TraceMsg { id: 9, ..msg() }));
        assert_eq!(
            lost.load(Ordering::Relaxed),
            3,
            "a closed queue is not a loss"
        );
    }

    fn msg() -> TraceMsg {
        TraceMsg {
            id: 0,
            table_family: 1,
            nfproto: 2,
            table: String::new(),
            chain: String::new(),
            handle: None,
            kind: TraceType::Rule,
            verdict: None,
            policy: None,
            iif: None,
            oif: None,
            tuple: None,
            l4proto: None,
        }
    }
}
