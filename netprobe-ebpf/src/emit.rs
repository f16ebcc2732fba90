//! The ring buffer and the per-CPU counters.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use netprobe_common::{IPPROTO_TCP, MAX_DROP_REASONS, RING_BYTES, RawEvent, counter, quiet};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// See [`netprobe_common::counter`].
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::MAX, 0);

/// Every drop the kernel reports, by reason, before any filter: the always-on view.
#[map]
static DROPS_ALL: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_DROP_REASONS, 0);

/// Drops that matched the active filter, by reason: equals what the trace should have received.
#[map]
static DROPS_MATCHED: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_DROP_REASONS, 0);

/// Drop reasons that are routine teardown, not failures (set by userspace from BTF names).
/// Counted, but in always-on mode not emitted. Values: see [`netprobe_common::quiet`].
#[map]
static QUIET_REASONS: Array<u8> = Array::with_max_entries(MAX_DROP_REASONS, 0);

/// A routine drop the always-on agent counts but does not emit.
#[inline(always)]
pub fn quiet_drop(reason: u32, ev: &RawEvent) -> bool {
    match QUIET_REASONS.get(reason_slot(reason)) {
        Some(&quiet::ALWAYS) => true,
        // A TIME_WAIT socket consuming a late FIN or ACK frees it as NOT_SPECIFIED; a SYN
        // dropped there (port reuse) is a failed connect and still goes out.
        Some(&quiet::TCP_EXCEPT_SYN) => {
            ev.proto == IPPROTO_TCP && ev.tcp_flags & netprobe_common::tcp_flags::SYN == 0
        }
        _ => false,
    }
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn count(index: u32) {
    bump(&COUNTERS, index);
}

#[inline(always)]
fn reason_slot(reason: u32) -> u32 {
    if reason < MAX_DROP_REASONS {
        reason
    } else {
        MAX_DROP_REASONS - 1
    }
}

#[inline(always)]
pub fn count_drop(reason: u32) {
    bump(&DROPS_ALL, reason_slot(reason));
}

#[inline(always)]
pub fn count_matched_drop(reason: u32) {
    bump(&DROPS_MATCHED, reason_slot(reason));
}

/// Fills in the time (and, when `with_task`, pid and comm) and submits; a full ring buffer is
/// counted in `COUNTERS[LOST]` so that userspace can report the loss.
#[inline(always)]
pub fn submit(mut ev: RawEvent, with_task: bool) {
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    if with_task {
        ev.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if let Ok(comm) = bpf_get_current_comm() {
            ev.comm = comm;
        }
    }
    match EVENTS.reserve::<RawEvent>(0) {
        Some(mut slot) => {
            slot.write(ev);
            slot.submit(0);
            count(counter::EMITTED);
        }
        None => count(counter::LOST),
    }
}
