//! The armed-flows table changes, run off the session's thread: each is one `nft` run in a
//! namespace (10–40 ms; deleting base chains waits for an RCU grace period), which the session
//! must not wait for. One thread runs them in the order they were asked for, so a flow is
//! never added before its table exists nor after the table is gone.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{netns::NetnsRef, probes::nft_trace::ArmedOp};

enum Job {
    Apply(NetnsRef, ArmedOp),
    /// Answered when every job before it ran.
    Flush(mpsc::Sender<()>),
}

#[derive(Default)]
struct Counts {
    errors: AtomicU64,
    us_max: AtomicU64,
}

/// The thread and its queue; on drop, the queued changes still run (the tables are removed),
/// then the thread ends.
pub struct NftWorker {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    counts: Arc<Counts>,
}

impl NftWorker {
    /// Flows added by this worker are kept by the kernel for `ttl` at most.
    pub fn start(ttl: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        let thread = std::thread::spawn(move || {
            for job in rx {
                match job {
                    Job::Apply(ns, op) => run(&c, &ns, op, ttl),
                    Job::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Self {
            tx: Some(tx),
            thread: Some(thread),
            counts,
        }
    }

    pub fn submit(&self, ns: &NetnsRef, op: ArmedOp) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Job::Apply(ns.clone(), op));
        }
    }

    /// Waits until every change asked for so far is in the kernel.
    pub fn flush(&self) {
        let (done, wait) = mpsc::channel();
        if let Some(tx) = &self.tx
            && tx.send(Job::Flush(done)).is_ok()
        {
            let _ = wait.recv();
        }
    }

    /// Changes nft refused (a flow not armed).
    pub fn errors(&self) -> u64 {
        self.counts.errors.load(Ordering::Relaxed)
    }

    /// The longest one change took, in µs.
    pub fn us_max(&self) -> u64 {
        self.counts.us_max.load(Ordering::Relaxed)
    }
}

fn run(counts: &Counts, ns: &NetnsRef, op: ArmedOp, ttl: Duration) {
    let started = Instant::now();
    if op.apply(ns, ttl).is_err() {
        counts.errors.fetch_add(1, Ordering::Relaxed);
    }
    let us = started.elapsed().as_micros() as u64;
    counts.us_max.fetch_max(us, Ordering::Relaxed);
}

impl Drop for NftWorker {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
