//! The row budget of a lane: how many decoded rows may be in the worker, not yet answered. The
//! consumer stops taking deliveries from a lane whose budget is spent, so memory stays flat
//! however deep the backlog; every job's charge is returned when its last holder drops it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

#[derive(Debug)]
pub struct RowBudget {
    limit: usize,
    used: AtomicUsize,
    returned: Notify,
}

impl RowBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, used: AtomicUsize::new(0), returned: Notify::new() })
    }

    /// True while the rows in flight reach the limit. A lane below it may take one more job of any
    /// size, so the limit can be exceeded by at most one job.
    pub fn is_spent(&self) -> bool {
        self.used.load(Ordering::Acquire) >= self.limit
    }

    /// True while no job of the lane is in flight.
    pub fn is_idle(&self) -> bool {
        self.used.load(Ordering::Acquire) == 0
    }

    /// Completes after some rows were returned (at once if some were since the last call).
    pub async fn returned(&self) {
        self.returned.notified().await;
    }

    pub fn charge(self: &Arc<Self>, rows: usize) -> Charge {
        self.used.fetch_add(rows, Ordering::AcqRel);
        Charge { budget: Arc::clone(self), rows }
    }
}

/// Rows taken from a budget, returned on drop.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<RowBudget>,
    rows: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.rows, Ordering::AcqRel);
        // notify_one keeps a permit when nobody waits yet, so a return is never missed.
        self.budget.returned.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spent_until_rows_are_returned() {
        let budget = RowBudget::new(10);
        let first = budget.charge(6);
        assert!(!budget.is_spent());
        let second = budget.charge(6);
        assert!(budget.is_spent(), "12 of 10 rows in flight");
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(1), budget.returned()).await.expect("return noticed");
        assert!(!budget.is_spent());
        drop(second);
        assert_eq!(budget.used.load(Ordering::Acquire), 0);
    }
}
