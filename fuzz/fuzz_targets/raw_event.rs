//! Kernel ring-buffer records (plain events and DNS records with their message bytes) → public
//! events.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = netprobe::events::raw::decode_record(data)
        && let Some(mut e) = netprobe::events::base(&r.ev, 0)
    {
        e.dns = r.dns_bytes().and_then(netprobe::events::dns::parse);
        let _ = serde_json::to_string(&e).unwrap();
    }
});
