//! The kernel programs' ring buffer as a source: woken by epoll through tokio, drained in
//! batches, each record enriched into a public event (reason names, code location, namespace,
//! interface).

use std::{cell::Cell, os::fd::AsRawFd, rc::Rc};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use futures::future::LocalBoxFuture;

use crate::{
    enrich::Enricher,
    error::{Error, Result},
    events::{
        Event,
        raw::{self, Record},
    },
    session::{Input, Source},
    sinks::Summary,
};

/// The ring buffer, read as events of the public schema.
pub struct RingSource {
    reader: EventReader,
    decode: Decode,
}

/// Record → event, noting how far behind the kernel the reader runs.
struct Decode {
    enricher: Rc<Enricher>,
    /// Longest kernel-to-userspace delay seen since whoever reads it last reset it.
    delay_max_ns: Rc<Cell<u64>>,
}

impl Decode {
    /// One record as an event (none for records of kinds the public schema does not carry).
    fn push(&self, out: &mut Vec<Event>, rec: Record) {
        let delay = crate::enrich::monotonic_ns().saturating_sub(rec.ev.ts_ns);
        if delay > self.delay_max_ns.get() {
            self.delay_max_ns.set(delay);
        }
        if let Some(e) = self.enricher.enrich_record(&rec) {
            out.push(e);
        }
    }
}

impl RingSource {
    pub fn new(reader: EventReader, enricher: Rc<Enricher>) -> Self {
        Self {
            reader,
            decode: Decode {
                enricher,
                delay_max_ns: Rc::default(),
            },
        }
    }

    /// The worst delay from the kernel's timestamp to this reader, in ns; whoever reads it may
    /// reset it (the agent does, every second).
    pub fn delay_max(&self) -> Rc<Cell<u64>> {
        self.decode.delay_max_ns.clone()
    }
}

impl Source for RingSource {
    fn next(&mut self) -> LocalBoxFuture<'_, Result<Input>> {
        Box::pin(async move {
            let mut events = Vec::new();
            let decode = &self.decode;
            self.reader
                .next_batch(|rec| decode.push(&mut events, rec))
                .await?;
            Ok(Input::Events(events))
        })
    }

    fn drain(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        let decode = &self.decode;
        self.reader.drain(|rec| decode.push(&mut events, rec));
        events
    }

    fn report(&self, summary: &mut Summary) {
        summary.malformed += self.reader.malformed;
    }
}

pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Records that failed to decode (a programming error, counted rather than hidden).
    pub malformed: u64,
    /// After a batch, look again at this time even without a wakeup: the kernel side wakes the
    /// reader at most once a millisecond in a burst, so a burst's last records may come without.
    look_again: Option<tokio::time::Instant>,
}

/// How soon after a batch the reader looks again for records that came without a wakeup.
const LOOK_AGAIN: std::time::Duration = std::time::Duration::from_millis(2);

/// Records per batch. Under a storm the kernel refills the ring while it is read: a batch of
/// every available record held tens of thousands of enriched events (~2 KiB each) at once, and
/// the agent's RSS swung by 100+ MiB with it. The rest is read right after this batch.
const MAX_BATCH: usize = 1024;

impl EventReader {
    pub fn new(ring: RingBuf<MapData>) -> Result<Self> {
        let fd = ring.as_raw_fd();
        // SAFETY: the ring buffer owns its fd and is moved into the AsyncFd, which deregisters
        // it before dropping (and thereby closing) it.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| Error::io(format!("registering ring buffer fd {fd}"), e.into()))?;
        Ok(Self {
            ring,
            malformed: 0,
            look_again: None,
        })
    }

    /// Waits until records are available (woken by the kernel, or shortly after the previous
    /// batch), then hands every available one to `f`.
    pub async fn next_batch(&mut self, mut f: impl FnMut(Record)) -> Result<()> {
        let woken = match self.look_again {
            Some(at) => tokio::select! {
                g = self.ring.readable_mut() => Some(g),
                () = tokio::time::sleep_until(at) => None,
            },
            None => Some(self.ring.readable_mut().await),
        };
        let mut n = 0usize;
        match woken {
            Some(guard) => {
                let mut guard = guard.map_err(|e| Error::io("waiting on the ring buffer", e))?;
                n += drain_into(
                    guard.get_inner_mut(),
                    &mut self.malformed,
                    &mut f,
                    MAX_BATCH,
                );
                if n < MAX_BATCH {
                    guard.clear_ready();
                }
            }
            None => n += drain_into(self.ring.get_mut(), &mut self.malformed, &mut f, MAX_BATCH),
        }
        // A full batch left records behind: look again at once.
        let again = if n >= MAX_BATCH {
            std::time::Duration::ZERO
        } else {
            LOOK_AGAIN
        };
        self.look_again = (n > 0).then(|| tokio::time::Instant::now() + again);
        Ok(())
    }

    /// Drains what is left without waiting (at shutdown).
    pub fn drain(&mut self, mut f: impl FnMut(Record)) {
        drain_into(self.ring.get_mut(), &mut self.malformed, &mut f, usize::MAX);
    }
}

/// Hands the available records to `f`, at most `limit`; returns how many there were.
fn drain_into(
    ring: &mut RingBuf<MapData>,
    malformed: &mut u64,
    f: &mut impl FnMut(Record),
    limit: usize,
) -> usize {
    let mut n = 0;
    while n < limit
        && let Some(item) = ring.next()
    {
        n += 1;
        match raw::decode_record(&item) {
            Ok(ev) => f(ev),
            Err(_) => *malformed += 1,
        }
    }
    n
}
