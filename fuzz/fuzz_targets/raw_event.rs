//! Kernel ring-buffer records → public events.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ev) = netprobe::events::raw::decode(data)
        && let Some(e) = netprobe::events::base(&ev, 0)
    {
        let _ = serde_json::to_string(&e).unwrap();
    }
});
