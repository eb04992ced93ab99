//! Memory of the metrics recorder when nothing scrapes `/metrics`: recorded histogram samples
//! are released by the recorder's upkeep, so a worker that is never scraped does not grow.
//!
//! Its own test binary, with one test, because it counts every live heap byte of the process
//! through a counting global allocator (the only `unsafe` code here: implementing
//! `GlobalAlloc` by delegating to the system allocator). Heap bytes are exact, where the RSS
//! would hide frees the allocator keeps for reuse.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use batchscore::telemetry;

/// Bytes allocated and not yet freed, across all threads.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is passed unchanged to the system allocator, which upholds the contract;
// the counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        unsafe { System.dealloc(pointer, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Samples recorded in one burst: about 8.4 MB while retained (8 bytes each, in blocks of 64).
const BURST: usize = 1_000_000;
/// What may stay above the baseline once the burst is released: the trickle recorded while
/// waiting, and blocks the recorder frees a little later.
const SLACK: isize = 2 << 20;

#[test]
fn histogram_samples_are_released_without_a_scrape() {
    telemetry::recorder();
    // The first sample creates the histogram, its label set and its buckets: fixed costs.
    telemetry::record_publish(Duration::from_millis(1));
    let baseline = live_bytes();

    let mut peak = baseline;
    for i in 0..BURST {
        telemetry::record_publish(Duration::from_micros(i as u64 % 5_000));
        if i % 10_000 == 0 {
            peak = peak.max(live_bytes());
        }
    }
    peak = peak.max(live_bytes());
    // However often the upkeep ran during the burst, some samples were held at once: proof that
    // the measure sees them.
    assert!(peak - baseline > 1 << 20, "the burst should hold megabytes of samples: grew {} bytes", peak - baseline);

    // Nothing scrapes. A trickle of samples keeps the recorder's deferred frees moving, as a
    // worker's traffic would; it adds far less than SLACK per upkeep interval.
    let patience = telemetry::UPKEEP_INTERVAL * 6;
    let started = Instant::now();
    loop {
        let retained = live_bytes() - baseline;
        if retained < SLACK {
            eprintln!(
                "burst held {} bytes at its peak; {retained} bytes above the baseline {:?} after it",
                peak - baseline,
                started.elapsed()
            );
            break;
        }
        assert!(
            started.elapsed() < patience,
            "{retained} bytes of histogram samples still held {patience:?} after the burst (peak {} above the \
             baseline): nothing released them without a scrape",
            peak - baseline
        );
        for _ in 0..20 {
            telemetry::record_publish(Duration::from_micros(250));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
