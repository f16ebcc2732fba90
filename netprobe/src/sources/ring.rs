//! The kernel programs' ring buffer as a source: woken by epoll through tokio, drained in
//! batches, each record enriched into a public event (reason names, code location, namespace,
//! interface).

use std::{cell::Cell, os::fd::AsRawFd, rc::Rc, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, time::Instant};

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
    /// When to look at the ring without a wake-up.
    look_again: LookAgain,
}

/// Records per batch. Under a storm the kernel refills the ring while it is read: a batch of
/// every available record held tens of thousands of enriched events (~2 KiB each) at once, and
/// the agent's RSS swung by 100+ MiB with it. The rest is read right after this batch.
const MAX_BATCH: usize = 1024;

/// How often the reader looks while a burst may still be coming in.
const LOOK_AGAIN: Duration = Duration::from_millis(2);

/// How long the ring must stay quiet before the reader stops looking every [`LOOK_AGAIN`]: eight
/// times the kernel's batching window (`WAKEUP_INTERVAL_NS`, 1 ms, in netprobe-ebpf's emit.rs).
const QUIET: Duration = Duration::from_millis(8);

/// The slowest look, when all is quiet: a bound on how long a record can wait whatever the timing.
const BACKSTOP: Duration = Duration::from_millis(100);

/// When the reader looks at the ring without being woken.
///
/// The kernel side wakes the reader for a record unless the last forced wake-up F is less than
/// 1 ms older than it (`wakeup_flags`): such a record R has `F.ts <= R.ts < F.ts + 1 ms` and
/// comes without a wake-up of its own, possibly after F's wake-up was handled (another CPU,
/// or a later SYN of the same burst). F's commit precedes F's wake-up, so some look at a time
/// `>= F.ts` either finds F (records) or was woken by F's wake-up (possibly with nothing: F
/// was already taken, or sits behind a record still being written). Every such look restarts
/// [`QUIET`]; looks go on every [`LOOK_AGAIN`] until one finds nothing after the quiet period
/// ended, so there is a look later than `F.ts + 8 ms`, after R's commit unless R's program
/// was held up for 7 ms between its timestamp and its commit. For that case (a preempted
/// program) the reader still looks every [`BACKSTOP`]: a record never waits for later traffic.
///
/// The races this replaces: an empty look when woken cancelled the look-again planned by the
/// previous batch (F had been taken by that look-again; R came after), and readiness was
/// cleared after the drain rather than before it.
#[derive(Debug)]
struct LookAgain {
    /// Look every [`LOOK_AGAIN`] until this has passed; None: quiet, look every [`BACKSTOP`].
    until: Option<Instant>,
    next: Instant,
}

impl LookAgain {
    fn new(now: Instant) -> Self {
        Self {
            until: None,
            next: now + BACKSTOP,
        }
    }

    /// After a look at `now` that handed over `n` records, `woken` by the kernel (rather than
    /// by [`Self::next`]): when to look next.
    fn after(&mut self, now: Instant, n: usize, woken: bool) {
        if n > 0 || woken {
            self.until = Some(now + QUIET);
        }
        self.next = if n >= MAX_BATCH {
            // A full batch left records behind.
            now
        } else if self.until.is_some_and(|until| now < until) {
            now + LOOK_AGAIN
        } else {
            self.until = None;
            now + BACKSTOP
        };
    }
}

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
            look_again: LookAgain::new(Instant::now()),
        })
    }

    /// Waits until records may be available (woken by the kernel, or on [`LookAgain`]'s
    /// schedule), then hands at most [`MAX_BATCH`] available ones to `f`. May hand none.
    pub async fn next_batch(&mut self, mut f: impl FnMut(Record)) -> Result<()> {
        let woken = tokio::select! {
            biased;
            g = self.ring.readable_mut() => {
                // Cleared before the drain: a wake-up for a record the drain misses sets it again.
                g.map_err(|e| Error::io("waiting on the ring buffer", e))?.clear_ready();
                true
            }
            () = tokio::time::sleep_until(self.look_again.next) => false,
        };
        let n = drain_into(self.ring.get_mut(), &mut self.malformed, &mut f, MAX_BATCH);
        self.look_again.after(Instant::now(), n, woken);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Looks without records from `at` on, as the reader's timer makes them; the time of the
    /// last fast look (the first one that ends the schedule).
    fn last_fast_look(s: &mut LookAgain) -> Instant {
        loop {
            let at = s.next;
            s.after(at, 0, false);
            if s.next - at == BACKSTOP {
                return at;
            }
            assert_eq!(s.next - at, LOOK_AGAIN);
        }
    }

    #[test]
    fn quiet_reader_looks_at_the_backstop_pace() {
        let t0 = Instant::now();
        let mut s = LookAgain::new(t0);
        assert_eq!(s.next, t0 + BACKSTOP);
        s.after(s.next, 0, false);
        assert_eq!(s.next, t0 + 2 * BACKSTOP);
    }

    #[test]
    fn looks_go_on_until_a_quiet_period_has_passed() {
        let t0 = Instant::now();
        let mut s = LookAgain::new(t0);
        s.after(t0, 3, true);
        assert_eq!(s.next, t0 + LOOK_AGAIN);
        let last = last_fast_look(&mut s);
        assert!(last >= t0 + QUIET, "{:?}", last - t0);
        assert!(last < t0 + QUIET + LOOK_AGAIN, "{:?}", last - t0);
    }

    /// The race behind issue 28 item 5: the look-again takes the record that forced a wake-up,
    /// then that wake-up finds nothing. The schedule must go on (it was cancelled).
    #[test]
    fn an_empty_wake_up_does_not_cancel_the_schedule() {
        let t0 = Instant::now();
        let mut s = LookAgain::new(t0);
        s.after(t0, 1, true);
        let look = s.next;
        s.after(look, 1, false);
        let woken = look + Duration::from_micros(50);
        s.after(woken, 0, true);
        assert_eq!(s.next, woken + LOOK_AGAIN);
        assert!(last_fast_look(&mut s) >= woken + QUIET);
    }

    #[test]
    fn a_wake_up_with_nothing_yet_starts_a_schedule() {
        // A record still being written hides the one behind it that forced the wake-up.
        let t0 = Instant::now();
        let mut s = LookAgain::new(t0);
        s.after(t0, 0, true);
        assert!(last_fast_look(&mut s) >= t0 + QUIET);
    }

    #[test]
    fn a_full_batch_is_followed_at_once() {
        let t0 = Instant::now();
        let mut s = LookAgain::new(t0);
        s.after(t0, MAX_BATCH, true);
        assert_eq!(s.next, t0);
    }
}
