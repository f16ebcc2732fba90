//! The ring buffer and the per-CPU counters.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::bpf_skb_load_bytes,
    },
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
    programs::TcContext,
};
use netprobe_common::{
    DNS_CAPTURE, IPPROTO_TCP, MAX_DROP_REASONS, RING_BYTES, RawDnsEvent, RawEvent, counter, quiet,
};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// When the consumer was last woken (`bpf_ktime_get_ns`), for [`wakeup_flags`].
#[map]
static LAST_WAKEUP: Array<u64> = Array::with_max_entries(1, 0);

/// Wake the consumer at most this often (plus whenever the ring is a quarter full).
const WAKEUP_INTERVAL_NS: u64 = 1_000_000;

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

/// A drop reason that is always routine (whatever the packet): counted, never emitted.
#[inline(always)]
pub fn quiet_always(reason: u32) -> bool {
    QUIET_REASONS.get(reason_slot(reason)) == Some(&quiet::ALWAYS)
}

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

/// Batched wakeups. Waking the consumer is most of an event's cost (an irq_work and an epoll
/// wakeup: ~3.5 µs of the ~4.3 µs of a drop event during a drop storm, measured with the
/// kernel's run-time statistics). An event after a quiet millisecond still wakes it at once;
/// in a burst, one wakeup per millisecond (or per quarter of the ring) carries the rest. A
/// record sent without a wakeup has a timestamp less than 1 ms after that of the record whose
/// forced wakeup wrote `LAST_WAKEUP` (older timestamps wrap to a large difference and force
/// one): the reader keeps looking until 8 ms after that record, and every 100 ms besides
/// (`LookAgain` in netprobe/src/sources/ring.rs). CPUs racing on the slot at worst both force
/// a wakeup, or leave an older time in it (an extra wakeup): never fewer.
#[inline(always)]
fn wakeup_flags(now: u64) -> u64 {
    let Some(last) = LAST_WAKEUP.get_ptr_mut(0) else {
        return 0;
    };
    let avail = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let size = EVENTS.query(BPF_RB_RING_SIZE as u64);
    // SAFETY: the map's single slot; racing CPUs at worst both wake the consumer.
    unsafe {
        if now.wrapping_sub(*last) >= WAKEUP_INTERVAL_NS || avail * 4 >= size {
            *last = now;
            BPF_RB_FORCE_WAKEUP as u64
        } else {
            BPF_RB_NO_WAKEUP as u64
        }
    }
}

/// Fills in the time (and, when `with_task`, pid and comm) and submits; a full ring buffer is
/// counted in `COUNTERS[LOST]` so that userspace can report the loss. Takes the event by
/// reference and copies it straight into the ring: a copy on the stack would not fit beside
/// the callers' own (512 bytes in all).
#[inline(always)]
pub fn submit(ev: &mut RawEvent, with_task: bool) {
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    if with_task {
        ev.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if let Ok(comm) = bpf_get_current_comm() {
            ev.comm = comm;
        }
    }
    match EVENTS.reserve::<RawEvent>(0) {
        Some(mut slot) => {
            // SAFETY: `slot` is reserved ring memory of the event's size.
            unsafe { core::ptr::copy_nonoverlapping(ev as *const RawEvent, slot.as_mut_ptr(), 1) };
            slot.submit(wakeup_flags(ev.ts_ns));
            count(counter::EMITTED);
        }
        None => count(counter::LOST),
    }
}

/// Submits a [`RawDnsEvent`]: `ev` and the first bytes of the DNS message at packet offset `off`,
/// copied straight into the ring buffer (the record does not fit the 512-byte stack twice).
#[inline(always)]
pub fn submit_dns(ctx: &TcContext, mut ev: RawEvent, off: usize) {
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    let avail = (ctx.len() as usize).saturating_sub(off);
    let Some(mut slot) = EVENTS.reserve::<RawDnsEvent>(0) else {
        count(counter::LOST);
        return;
    };
    let p = slot.as_mut_ptr();
    let mut len = 0u16;
    if avail > 0 {
        let n = if avail > DNS_CAPTURE {
            DNS_CAPTURE
        } else {
            avail
        } as u32;
        // The verifier needs a length it can bound to 1..=DNS_CAPTURE (a power of two).
        let n = ((n - 1) & (DNS_CAPTURE as u32 - 1)) + 1;
        // SAFETY: `p` is reserved ring-buffer memory of the record's size; the helper writes at
        // most `n` ≤ DNS_CAPTURE bytes into `payload` and checks the packet bounds itself.
        let r = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                off as u32,
                core::ptr::addr_of_mut!((*p).payload).cast(),
                n,
            )
        };
        if r == 0 {
            len = n as u16;
        }
    }
    // SAFETY: writes into the reserved record through its raw pointer (no reference to
    // uninitialized memory is made).
    unsafe {
        core::ptr::addr_of_mut!((*p).ev).write(ev);
        core::ptr::addr_of_mut!((*p).len).write(len);
        core::ptr::addr_of_mut!((*p)._pad).write([0; 6]);
    }
    slot.submit(wakeup_flags(ev.ts_ns));
    count(counter::EMITTED);
}
