//! DNS header and question parsing of captured (cut, untrusted) messages.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(d) = netprobe::events::dns::parse(data) {
        let _ = serde_json::to_string(&d).unwrap();
    }
});
