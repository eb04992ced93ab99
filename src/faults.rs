//! Fault injection points for the supervision tests: a test arms a point, and the next passes
//! through it panic, as a bug in that stage would. Nothing arms them outside tests; an unarmed
//! point costs one atomic load.

use std::sync::atomic::{AtomicU32, Ordering};

/// A place in a stage that can be made to panic.
#[derive(Debug)]
pub struct FaultPoint(AtomicU32);

/// The result stage, as it takes a scored batch.
pub static RESULT_STAGE: FaultPoint = FaultPoint(AtomicU32::new(0));
/// An inference run, after its batch has been scored.
pub static INFER_RUN: FaultPoint = FaultPoint(AtomicU32::new(0));

impl FaultPoint {
    /// The next `times` passes through this point panic.
    pub fn arm(&self, times: u32) {
        self.0.store(times, Ordering::SeqCst);
    }

    /// True (once per arming) when this pass must panic.
    pub fn trip(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
            && self.0.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1)).is_ok()
    }

    /// Passes still armed to panic.
    pub fn armed(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
}
