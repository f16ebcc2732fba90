//! What was read from the node for a key, reused for a while: a flood of identical drops must
//! not make each one enter a namespace and read it again.

use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

pub struct Recent<K, V> {
    found: HashMap<K, (Instant, V)>,
    reuse_for: Duration,
    /// Keys remembered at most (then all are forgotten).
    max: usize,
}

impl<K: Hash + Eq, V: Clone> Recent<K, V> {
    pub fn new(reuse_for: Duration, max: usize) -> Self {
        Self {
            found: HashMap::new(),
            reuse_for,
            max,
        }
    }

    /// The value read for `key` less than `reuse_for` ago, else `read()` (remembered).
    pub fn get_or(&mut self, key: K, read: impl FnOnce() -> V) -> V {
        let now = Instant::now();
        if let Some((at, v)) = self.found.get(&key)
            && now.duration_since(*at) < self.reuse_for
        {
            return v.clone();
        }
        let v = read();
        if self.found.len() >= self.max {
            self.found.clear();
        }
        self.found.insert(key, (now, v.clone()));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_reused_until_it_is_too_old() {
        let mut r = Recent::new(Duration::from_secs(60), 2);
        assert_eq!(r.get_or(1, || "a"), "a");
        assert_eq!(r.get_or(1, || "b"), "a");
        let mut old = Recent::new(Duration::ZERO, 2);
        assert_eq!(old.get_or(1, || "a"), "a");
        assert_eq!(old.get_or(1, || "b"), "b");
    }
}
