//! netprobe's kernel programs. One module per probe; all share the filter, the kernel-structure
//! readers and the event emitter.
//!
//! Every entry point is a thin wrapper that calls a `try_…` function and ignores its error: an
//! observer must never change what happens to a packet, so tc programs always return
//! `TC_ACT_UNSPEC` (= tcx "next"), letting later programs and the stack decide.
#![no_std]
#![no_main]

mod emit;
mod filter;
mod kernel;

mod fib;
mod kfree_skb;
mod sock_error;
mod sock_state;
mod tc;
mod tcp_reset;
mod tcp_retransmit;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// `bpf_probe_read_kernel` is GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
