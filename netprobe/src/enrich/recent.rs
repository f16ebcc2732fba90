//! What was read from the node for a key, reused for a while: a flood of identical drops must
//! not make each one enter a namespace and read it again; and a bounded number of reads per
//! second, so that a flood of different keys (spoofed sources) cannot either.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

/// Every [`Recent`]'s keys forgotten because it was full, and reads not done because a
/// second's reads were spent (process-wide, for /metrics).
static FORGOTTEN: AtomicU64 = AtomicU64::new(0);
static SKIPPED: AtomicU64 = AtomicU64::new(0);

/// (keys forgotten at the bound, reads skipped over the rate), since the start.
pub fn evictions() -> (u64, u64) {
    (FORGOTTEN.load(Relaxed), SKIPPED.load(Relaxed))
}

/// Counts `n` keys another bounded memory of the verdict path forgot at its bound.
pub fn count_forgotten(n: usize) {
    FORGOTTEN.fetch_add(n as u64, Relaxed);
}

pub struct Recent<K, V> {
    found: HashMap<K, (Instant, V)>,
    reuse_for: Duration,
    /// Keys remembered at most (then all are forgotten).
    max: usize,
    /// Reads done in the current second, and when it began.
    reads: (Instant, u32),
}

/// Reads per second at most; the drops beyond it go without the detail.
const READS_PER_SECOND: u32 = 20;

impl<K: Hash + Eq, V: Clone> Recent<K, V> {
    pub fn new(reuse_for: Duration, max: usize) -> Self {
        Self {
            found: HashMap::new(),
            reuse_for,
            max,
            reads: (Instant::now(), 0),
        }
    }

    /// The value read for `key` less than `reuse_for` ago, else `read()` (remembered); None
    /// when this second's reads are spent.
    pub fn get_or(&mut self, key: K, read: impl FnOnce() -> V) -> Option<V> {
        let now = Instant::now();
        if let Some((at, v)) = self.found.get(&key)
            && now.duration_since(*at) < self.reuse_for
        {
            return Some(v.clone());
        }
        if now.duration_since(self.reads.0) >= Duration::from_secs(1) {
            self.reads = (now, 0);
        }
        if self.reads.1 >= READS_PER_SECOND {
            SKIPPED.fetch_add(1, Relaxed);
            return None;
        }
        self.reads.1 += 1;
        let v = read();
        if self.found.len() >= self.max {
            FORGOTTEN.fetch_add(self.found.len() as u64, Relaxed);
            self.found.clear();
        }
        self.found.insert(key, (now, v.clone()));
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_reused_until_it_is_too_old() {
        let mut r = Recent::new(Duration::from_secs(60), 2);
        assert_eq!(r.get_or(1, || "a"), Some("a"));
        assert_eq!(r.get_or(1, || "b"), Some("a"));
        let forgotten = evictions().0;
        assert_eq!(r.get_or(2, || "c"), Some("c"));
        assert_eq!(r.get_or(3, || "d"), Some("d"));
        assert!(
            evictions().0 - forgotten >= 2,
            "both keys dropped at the bound of 2"
        );
        let mut old = Recent::new(Duration::ZERO, 2);
        assert_eq!(old.get_or(1, || "a"), Some("a"));
        assert_eq!(old.get_or(1, || "b"), Some("b"));
    }

    #[test]
    fn a_flood_of_new_keys_is_read_a_bounded_number_of_times_per_second() {
        let mut r = Recent::new(Duration::from_secs(60), 1000);
        let skipped = evictions().1;
        let read = (0..100).filter(|k| r.get_or(*k, || ()).is_some()).count();
        assert_eq!(read, READS_PER_SECOND as usize);
        // Counted process-wide (other tests may add to it meanwhile, never take away).
        assert!(evictions().1 - skipped >= 100 - READS_PER_SECOND as u64);
        // What was read is still answered.
        assert_eq!(r.get_or(0, || ()), Some(()));
    }
}
