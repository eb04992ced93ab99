//! The sampling method, for graphs no exact method reads (an MLP): permutation sampling with
//! antithetic pairs. For each row, every permutation of the features that differ from the
//! baseline walks from the baseline to the row one feature at a time; the change in g at each
//! step is that feature's marginal contribution, and the contributions are averaged over the
//! permutations. Each permutation comes with its reverse, which cancels much of the variance.
//!
//! The points of the walks are ordinary rows: they are appended to the job's own rows and scored
//! in the same batches by the same sessions. A walk's steps telescope to g(row) − g(baseline),
//! so local accuracy is exact by construction whatever the number of samples.

/// The walks planned for one job: per row, its differing features and their orders.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    rows: Vec<RowPlan>,
}

#[derive(Debug, Clone, PartialEq)]
struct RowPlan {
    /// Features where the row differs from the baseline.
    differing: Vec<usize>,
    /// Each a permutation of `0..differing.len()`.
    orders: Vec<Vec<usize>>,
    /// Index of the row's first walk point among the job's scored rows.
    first: usize,
}

impl Plan {
    /// Plans the walks for `rows` rows (`inputs`, row-major) against `baseline` with `samples`
    /// permutations per row (an even number), and returns the walk points to score after the
    /// job's own rows.
    pub fn new(inputs: &[f32], baseline: &[f32], samples: usize) -> (Plan, Vec<f32>) {
        let n = baseline.len();
        let rows = inputs.len() / n.max(1);
        let mut points = Vec::new();
        let mut plans = Vec::with_capacity(rows);
        for row in inputs.chunks_exact(n.max(1)) {
            let differing: Vec<usize> = (0..n).filter(|&i| row[i].to_bits() != baseline[i].to_bits()).collect();
            let mut random = SplitMix(seed(row));
            let mut orders = Vec::with_capacity(samples);
            for _ in 0..samples / 2 {
                let order = random.permutation(differing.len());
                let reversed = order.iter().rev().copied().collect();
                orders.extend([order, reversed]);
            }
            let first = rows + points.len() / n.max(1);
            for order in &orders {
                let mut point = baseline.to_vec();
                // The walk's last point is the row itself, scored already.
                for &step in order.iter().take(differing.len().saturating_sub(1)) {
                    point[differing[step]] = row[differing[step]];
                    points.extend_from_slice(&point);
                }
            }
            plans.push(RowPlan { differing, orders, first });
        }
        (Plan { rows: plans }, points)
    }

    /// The rows to score for `rows` rows of `n` features and `samples` permutations, without
    /// planning them.
    pub fn rows_needed(inputs: &[f32], baseline: &[f32], samples: usize) -> usize {
        let n = baseline.len().max(1);
        inputs
            .chunks_exact(n)
            .map(|row| {
                let differing = row.iter().zip(baseline).filter(|(x, b)| x.to_bits() != b.to_bits()).count();
                1 + samples * differing.saturating_sub(1)
            })
            .sum()
    }

    /// Row `row`'s contributions, from g of every scored row of the job (`g[row]` is g of the
    /// row itself) and g of the baseline.
    pub fn contributions(&self, row: usize, g: &[f64], base_value: f64, n_features: usize) -> Vec<f64> {
        let plan = &self.rows[row];
        let mut phi = vec![0.0; n_features];
        let steps = plan.differing.len();
        for (o, order) in plan.orders.iter().enumerate() {
            let mut before = base_value;
            for (j, &step) in order.iter().enumerate() {
                let after = if j + 1 == steps { g[row] } else { g[plan.first + o * (steps - 1) + j] };
                phi[plan.differing[step]] += after - before;
                before = after;
            }
        }
        let orders = plan.orders.len().max(1) as f64;
        phi.iter_mut().for_each(|p| *p /= orders);
        phi
    }
}

/// A seed from the row's values: the same row always gets the same permutations, so a rescored
/// job gets the same explanation.
fn seed(row: &[f32]) -> u64 {
    row.iter().fold(0xcbf2_9ce4_8422_2325, |hash, v| (hash ^ v.to_bits() as u64).wrapping_mul(0x0100_0000_01b3))
}

/// SplitMix64: small, fast, and good enough to shuffle feature orders.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniformly random permutation of `0..n` (Fisher–Yates).
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }
}
