//! nftables trace messages (NFT_MSG_TRACE bodies), then path collection and attribution.
#![no_main]
use libfuzzer_sys::fuzz_target;
use netprobe::attribution::rules::{PathCollector, Ruleset, attribute};

fuzz_target!(|data: &[u8]| {
    let mut c = PathCollector::default();
    let rs = Ruleset::default();
    for chunk in data.split(|b| *b == 0xff) {
        if let Some(m) = netprobe::netlink::nftrace::parse_trace(chunk)
            && let Some(path) = c.push(m)
        {
            let _ = attribute(&path, &rs);
        }
    }
});
