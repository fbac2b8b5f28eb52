//! Misbehaviours shared by the chaos fixtures of both worlds (included with `#[path]`, so
//! neither fixture links the other's exports).
#![allow(dead_code)] // each fixture uses some of these

use std::hint::black_box;

const MIB: usize = 1 << 20;
const WASM_PAGE: usize = 64 << 10;

/// Burns CPU for `duration` of wall clock (the host's monotonic clock, through WASI).
pub fn spin_for(duration: std::time::Duration) {
    let until = std::time::Instant::now() + duration;
    let mut counter: u64 = 0;
    while std::time::Instant::now() < until {
        for _ in 0..1000 {
            counter = black_box(counter.wrapping_add(1));
        }
    }
}

/// Never returns; `black_box` keeps the optimizer from proving the loop side-effect free.
pub fn spin_forever() -> ! {
    let mut counter: u64 = 0;
    loop {
        counter = black_box(counter.wrapping_add(1));
    }
}

/// Grabs 1 MiB chunks, writing into every page so the memory is really committed, until an
/// allocation fails; returns how many MiB it held at that point (then frees them).
pub fn exhaust_memory() -> usize {
    // Reserved up front: growing this list must not be the allocation that fails (that
    // would abort instead of returning). 4096 chunks = 4 GiB, all that wasm32 can address.
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    if chunks.try_reserve_exact(4096).is_err() {
        return 0;
    }
    loop {
        let mut chunk: Vec<u8> = Vec::new();
        if chunk.try_reserve_exact(MIB).is_err() {
            break;
        }
        // One write per 64 KiB wasm page rather than filling the whole MiB: enough to use the
        // memory, and cheap in fuel and page faults, so that the memory limit (not the fuel
        // limit or the deadline) is what stops this mode.
        for page in chunk.spare_capacity_mut().chunks_mut(WASM_PAGE) {
            page[0].write(0xA5);
        }
        chunks.push(black_box(chunk));
    }
    black_box(&chunks);
    chunks.len()
}

/// Recurses without end, with a frame the optimizer cannot drop: the guest's stack
/// overflows, which the host sees as a trap.
#[allow(unconditional_recursion)]
pub fn recurse(depth: u64) -> u64 {
    let frame = black_box([depth; 16]);
    black_box(recurse(black_box(depth + 1))).wrapping_add(frame[depth as usize % 16])
}
