//! Kubelet cgroup paths (cgroupfs and systemd drivers).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = netprobe::enrich::pods::container_of_cgroup(&String::from_utf8_lossy(data));
});
