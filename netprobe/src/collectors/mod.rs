//! Reading what the kernel programs produce: the event ring buffer (woken by epoll through
//! tokio, drained in batches, no allocation per record) and the per-CPU counters.

pub mod nftrace;

use std::os::fd::AsRawFd;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::{
    error::{Error, Result},
    events::raw::{self, Record},
};

pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Records that failed to decode (a programming error, counted rather than hidden).
    pub malformed: u64,
}

impl EventReader {
    pub fn new(ring: RingBuf<MapData>) -> Result<Self> {
        let fd = ring.as_raw_fd();
        // SAFETY: the ring buffer owns its fd and is moved into the AsyncFd, which deregisters
        // it before dropping (and thereby closing) it.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| Error::io(format!("registering ring buffer fd {fd}"), e.into()))?;
        Ok(Self { ring, malformed: 0 })
    }

    /// Waits until records are available, then hands every available one to `f`.
    pub async fn next_batch(&mut self, mut f: impl FnMut(Record)) -> Result<()> {
        let mut guard = self
            .ring
            .readable_mut()
            .await
            .map_err(|e| Error::io("waiting on the ring buffer", e))?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match raw::decode_record(&item) {
                Ok(ev) => f(ev),
                Err(_) => self.malformed += 1,
            }
        }
        guard.clear_ready();
        Ok(())
    }

    /// Drains what is left without waiting (at shutdown).
    pub fn drain(&mut self, mut f: impl FnMut(Record)) {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            match raw::decode_record(&item) {
                Ok(ev) => f(ev),
                Err(_) => self.malformed += 1,
            }
        }
    }
}
