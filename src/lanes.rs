//! The lane policy in one place: the online lane goes before the bulk lane. Each lane holds at
//! most `limits.max_inflight_rows` decoded rows ([`RowBudget`]); while online jobs keep coming
//! (one arrived within `amqp.bulk_yield_ms`), the bulk lane holds one job at a time, so the
//! machine's cores go to online work first; and a batch is taken from the online rows whenever
//! there are any ([`next_batch`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::budget::RowBudget;
use crate::flow::Lane;

/// Which lane may take the next delivery.
#[derive(Debug)]
pub struct LanePolicy {
    online: Arc<RowBudget>,
    bulk: Arc<RowBudget>,
    yield_window: Duration,
    online_seen: Option<Instant>,
}

impl LanePolicy {
    /// `max_inflight_rows` per lane (`limits.max_inflight_rows`); `yield_window` is
    /// `amqp.bulk_yield_ms`.
    pub fn new(max_inflight_rows: usize, yield_window: Duration) -> Self {
        Self {
            online: RowBudget::new(max_inflight_rows),
            bulk: RowBudget::new(max_inflight_rows),
            yield_window,
            online_seen: None,
        }
    }

    pub fn budget(&self, lane: Lane) -> &Arc<RowBudget> {
        match lane {
            Lane::Online => &self.online,
            Lane::Bulk => &self.bulk,
        }
    }

    /// An online delivery arrived: the bulk lane yields for the next `bulk_yield_ms`.
    pub fn saw_online(&mut self) {
        self.online_seen = Some(Instant::now());
    }

    /// True when `lane` may take another delivery; `decoding` when one of its large bodies is
    /// still being decoded (the lane then takes no other, so decoded rows stay within budget).
    pub fn admits(&self, lane: Lane, decoding: bool) -> bool {
        let held_back = lane == Lane::Bulk && self.bulk_held_back(decoding);
        !(decoding || held_back || self.budget(lane).is_spent())
    }

    /// What holds the lanes back now, taken before the consumer decides which lanes to take from
    /// (budgets only come free meanwhile, never fill: only the consumer charges them).
    pub fn held_back(&self, bulk_decoding: bool) -> HeldBack {
        HeldBack {
            online_spent: self.online.is_spent(),
            bulk_spent: self.bulk.is_spent(),
            bulk_yields_until: self.yield_until().filter(|_| self.bulk_held_back(bulk_decoding)),
        }
    }

    /// Completes when a lane `held` found held back may take again: rows were returned to a spent
    /// budget, or the bulk lane's yield window ended. Pending while no lane was held back. A
    /// return after `held` was taken still wakes it: the budget keeps a permit for it.
    pub async fn reopened(&self, held: HeldBack) {
        let until = held.bulk_yields_until;
        tokio::select! {
            _ = self.online.returned(), if held.online_spent => {}
            _ = self.bulk.returned(), if held.bulk_spent || until.is_some() => {}
            _ = tokio::time::sleep_until(until.unwrap_or_else(Instant::now)), if until.is_some() => {}
            else => std::future::pending().await,
        }
    }

    /// While online jobs keep coming, the bulk lane holds at most one job.
    fn bulk_held_back(&self, bulk_decoding: bool) -> bool {
        self.yield_until().is_some() && (!self.bulk.is_idle() || bulk_decoding)
    }

    fn yield_until(&self) -> Option<Instant> {
        self.online_seen.map(|seen| seen + self.yield_window).filter(|until| *until > Instant::now())
    }
}

/// Why lanes were held back when the consumer last looked.
#[derive(Debug, Clone, Copy)]
pub struct HeldBack {
    online_spent: bool,
    bulk_spent: bool,
    bulk_yields_until: Option<Instant>,
}

/// The lane the next batch is taken from: online whenever it has rows waiting.
pub fn next_batch(online_waiting: bool, bulk_waiting: bool) -> Lane {
    if !online_waiting && bulk_waiting {
        Lane::Bulk
    } else {
        Lane::Online
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_inflight_rows: usize, bulk_yield_ms: u64) -> LanePolicy {
        LanePolicy::new(max_inflight_rows, Duration::from_millis(bulk_yield_ms))
    }

    #[test]
    fn batches_come_from_the_online_lane_whenever_it_has_rows() {
        assert_eq!(next_batch(true, true), Lane::Online);
        assert_eq!(next_batch(true, false), Lane::Online);
        assert_eq!(next_batch(false, true), Lane::Bulk);
    }

    #[test]
    fn a_spent_budget_closes_only_its_own_lane() {
        let policy = policy(10, 0);
        let held = policy.budget(Lane::Bulk).charge(10);
        assert!(!policy.admits(Lane::Bulk, false));
        assert!(policy.admits(Lane::Online, false));
        drop(held);
        assert!(policy.admits(Lane::Bulk, false));
        assert!(!policy.admits(Lane::Bulk, true), "a lane decoding a large body takes no other");
    }

    #[tokio::test]
    async fn rows_returned_between_the_look_and_the_wait_still_reopen_the_lane() {
        let policy = policy(10, 0);
        let held_rows = policy.budget(Lane::Online).charge(10);
        let held = policy.held_back(false);
        // The consumer looked while the budget was spent; the rows come back before it waits.
        drop(held_rows);
        assert!(policy.admits(Lane::Online, false));
        tokio::time::timeout(Duration::from_secs(5), policy.reopened(held))
            .await
            .expect("the return wakes the consumer, which then takes from the lane again");
    }

    #[tokio::test(start_paused = true)]
    async fn bulk_holds_one_job_while_online_jobs_arrive() {
        let mut policy = policy(1_000, 250);
        let bulk_job = policy.budget(Lane::Bulk).charge(1);
        assert!(policy.admits(Lane::Bulk, false), "no online traffic: bulk takes more");
        policy.saw_online();
        assert!(!policy.admits(Lane::Bulk, false), "online traffic: bulk holds its one job");
        drop(bulk_job);
        assert!(policy.admits(Lane::Bulk, false), "an idle bulk lane may take one job");
        let _bulk_job = policy.budget(Lane::Bulk).charge(1);
        assert!(!policy.admits(Lane::Bulk, false));
        // The yield window ends 250 ms after the last online job; the paused clock advances to it.
        // A wake-up may be spurious (a permit left by an earlier return): the consumer looks again.
        let started = Instant::now();
        let reopened = async {
            while !policy.admits(Lane::Bulk, false) {
                policy.reopened(policy.held_back(false)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(1), reopened).await.expect("the window ends");
        assert!(started.elapsed() >= Duration::from_millis(250), "bulk waited out the yield window");
    }
}
