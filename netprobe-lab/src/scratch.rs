//! A scratch directory for a test (a HOME, a kubeconfig), removed when dropped, also when the
//! test fails.

use std::path::PathBuf;

pub struct Scratch(pub PathBuf);

impl Scratch {
    /// `$TMPDIR/netprobe-<name>-<pid>`, created.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("netprobe-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
