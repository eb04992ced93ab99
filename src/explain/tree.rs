//! The tree method: reads a `TreeEnsembleClassifier` or `TreeEnsembleRegressor` (ONNX-ML; what
//! scikit-learn, LightGBM and XGBoost exports produce) from the graph and computes exact Shapley
//! values against the single baseline (interventional TreeSHAP with one reference point).
//!
//! Per tree, a leaf reached by a mix of x and the baseline contributes its value v to v(S)
//! exactly when S holds every feature whose splits on the path had to follow x (the set A) and
//! none that had to follow the baseline (the set B). That game's Shapley values are
//! v·(|A|−1)!|B|!/(|A|+|B|)! for each feature of A and −v·|A|!(|B|−1)!/(|A|+|B|)! for each of B,
//! so one walk over the paths x and the baseline can take gives the exact values: polynomial
//! per tree, no sampling.

use std::collections::HashMap;

use super::config::Space;
use super::onnx::{Graph, Node};

/// Deeper trees are refused: the walk recurses once per level.
const MAX_DEPTH: usize = 256;

/// The explained column of an ensemble: `bias + scale · Σ trees`.
#[derive(Debug)]
pub struct Ensemble {
    trees: Vec<Tree>,
    bias: f64,
    scale: f64,
}

#[derive(Debug)]
struct Tree {
    nodes: Vec<TreeNode>,
    root: usize,
}

#[derive(Debug, Clone, Copy)]
enum TreeNode {
    Branch { feature: usize, threshold: f64, rule: Rule, if_true: usize, if_false: usize, missing_true: bool },
    Leaf(f64),
}

#[derive(Debug, Clone, Copy)]
enum Rule {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
}

/// Which value a feature takes on the path being walked.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Either,
    Row,
    Baseline,
}

impl TreeNode {
    /// The child a value goes to, as ONNX Runtime decides it: a missing value (NaN) follows the
    /// true branch where the node says so, and otherwise fails every comparison but `!=`.
    fn next(&self, value: f32) -> Option<usize> {
        let TreeNode::Branch { threshold, rule, if_true, if_false, missing_true, .. } = *self else { return None };
        let v = value as f64;
        let holds = (missing_true && v.is_nan())
            || match rule {
                Rule::Leq => v <= threshold,
                Rule::Lt => v < threshold,
                Rule::Gte => v >= threshold,
                Rule::Gt => v > threshold,
                Rule::Eq => v == threshold,
                Rule::Neq => v != threshold,
            };
        Some(if holds { if_true } else { if_false })
    }
}

impl Ensemble {
    /// g(row).
    pub fn at(&self, row: &[f32]) -> f64 {
        let sum: f64 = self.trees.iter().map(|tree| tree.leaf(row)).sum();
        self.bias + self.scale * sum
    }

    /// Adds the Shapley value of every feature for `row` against `baseline` to `phi`.
    pub fn contributions(&self, row: &[f32], baseline: &[f32], phi: &mut [f64]) {
        let mut walk =
            Walk { row, baseline, sides: vec![Side::Either; row.len()], from_row: vec![], from_baseline: vec![] };
        for tree in &self.trees {
            walk.visit(tree, tree.root, self.scale, phi);
        }
    }
}

impl Tree {
    fn leaf(&self, row: &[f32]) -> f64 {
        let mut at = self.root;
        loop {
            match self.nodes[at] {
                TreeNode::Leaf(value) => return value,
                TreeNode::Branch { feature, .. } => match self.nodes[at].next(row[feature]) {
                    Some(next) => at = next,
                    None => return 0.0,
                },
            }
        }
    }
}

struct Walk<'a> {
    row: &'a [f32],
    baseline: &'a [f32],
    sides: Vec<Side>,
    from_row: Vec<usize>,
    from_baseline: Vec<usize>,
}

impl Walk<'_> {
    fn visit(&mut self, tree: &Tree, at: usize, scale: f64, phi: &mut [f64]) {
        match tree.nodes[at] {
            TreeNode::Leaf(value) => self.credit(value * scale, phi),
            TreeNode::Branch { feature, .. } => {
                let node = &tree.nodes[at];
                let (Some(by_row), Some(by_baseline)) =
                    (node.next(self.row[feature]), node.next(self.baseline[feature]))
                else {
                    return;
                };
                if by_row == by_baseline {
                    return self.visit(tree, by_row, scale, phi);
                }
                match self.sides[feature] {
                    Side::Row => self.visit(tree, by_row, scale, phi),
                    Side::Baseline => self.visit(tree, by_baseline, scale, phi),
                    Side::Either => {
                        self.sides[feature] = Side::Row;
                        self.from_row.push(feature);
                        self.visit(tree, by_row, scale, phi);
                        self.from_row.pop();
                        self.sides[feature] = Side::Baseline;
                        self.from_baseline.push(feature);
                        self.visit(tree, by_baseline, scale, phi);
                        self.from_baseline.pop();
                        self.sides[feature] = Side::Either;
                    }
                }
            }
        }
    }

    /// Shares a leaf's value among the features its path depends on.
    fn credit(&self, value: f64, phi: &mut [f64]) {
        let (a, b) = (self.from_row.len(), self.from_baseline.len());
        if a + b == 0 || value == 0.0 {
            return;
        }
        if a > 0 {
            let share = value / (a as f64 * binomial(a + b, a));
            self.from_row.iter().for_each(|&i| phi[i] += share);
        }
        if b > 0 {
            let share = value / (b as f64 * binomial(a + b, b));
            self.from_baseline.iter().for_each(|&j| phi[j] -= share);
        }
    }
}

fn binomial(n: usize, k: usize) -> f64 {
    (0..k.min(n - k)).fold(1.0, |c, i| c * (n - i) as f64 / (i + 1) as f64)
}

/// The ensemble behind column `class` of `output`, or why there is none.
pub fn recognise(
    graph: &Graph,
    n_features: usize,
    output: &str,
    class: usize,
    space: Space,
) -> Result<Ensemble, String> {
    let (node, index) = source(graph, output)?;
    let read = match (node.op_type.as_str(), index) {
        ("TreeEnsembleClassifier", 1) => classifier,
        ("TreeEnsembleRegressor", 0) => regressor,
        _ => return Err(format!("output {output} is not the scores of a tree ensemble")),
    };
    let fed_by_input = passthrough(graph, node.input.first().map(String::as_str).unwrap_or_default());
    if fed_by_input != graph.input {
        return Err(format!("the {} does not read the model input directly", node.op_type));
    }
    read(node, n_features, class, space)
}

/// The node writing `output`, looking through the operators that leave values as they are.
fn source<'g>(graph: &'g Graph, output: &str) -> Result<(&'g Node, usize), String> {
    let mut name = output.to_string();
    loop {
        let (node, index) = graph.producer(&name).ok_or_else(|| format!("no node writes output {output}"))?;
        match unchanged_input(graph, node) {
            Some(input) => name = input.to_string(),
            None => return Ok((node, index)),
        }
    }
}

/// The input a node passes on unchanged: `Identity`, `Cast`, `ZipMap` (which keeps the columns
/// in class order), and a `Mul` or `Div` by a constant 1 (onnxmltools ends LightGBM graphs so).
fn unchanged_input<'g>(graph: &'g Graph, node: &'g Node) -> Option<&'g str> {
    let is_one = |name: &str| graph.constants.get(name).is_some_and(|c| c.values.iter().all(|&v| v == 1.0));
    match (node.op_type.as_str(), &node.input[..]) {
        ("Identity" | "Cast" | "ZipMap", [input, ..]) => Some(input),
        ("Mul", [a, b]) if is_one(b) => Some(a),
        ("Mul", [a, b]) if is_one(a) => Some(b),
        ("Div", [a, b]) if is_one(b) => Some(a),
        _ => None,
    }
}

/// The tensor `name` stands for once `Identity` and `Cast` are looked through.
fn passthrough(graph: &Graph, name: &str) -> String {
    let mut name = name.to_string();
    while let Some((node, _)) = graph.producer(&name).filter(|(n, _)| matches!(n.op_type.as_str(), "Identity" | "Cast"))
    {
        name = node.input.first().cloned().unwrap_or_default();
    }
    name
}

fn classifier(node: &Node, n_features: usize, class: usize, space: Space) -> Result<Ensemble, String> {
    let classes = node.ints("classlabels_int64s").len().max(node.texts("classlabels_strings").len());
    let class_ids = node.ints("class_ids");
    let base_values = node.floats("base_values");
    let post = node.text("post_transform").unwrap_or_else(|| "NONE".into());
    // Two classes scored by one sum: ONNX Runtime reports column 1 as post_transform(sum).
    let one_score = classes == 2 && class_ids.iter().all(|&id| id == 0);
    let target = if one_score {
        if class != 1 {
            return Err("this binary ensemble scores class 1 only; explain class: 1".into());
        }
        if base_values.len() > 1 {
            return Err(format!("a binary ensemble with {} base values is not read", base_values.len()));
        }
        0
    } else {
        class
    };
    if class >= classes {
        return Err(format!("the ensemble has {classes} classes; class {class} is not one of them"));
    }
    match (post.as_str(), space) {
        ("LOGISTIC", Space::Logit) | ("NONE", Space::Output) => {}
        ("LOGISTIC", Space::Output) => {
            return Err("a logistic ensemble is additive only as log-odds (space: logit)".into());
        }
        (other, _) => return Err(format!("post_transform {other} is not additive in {} space", space.as_str())),
    }
    let bias = base_values.get(target).copied().unwrap_or(0.0);
    let weights = leaf_weights(node, "class", target as i64);
    build(node, n_features, &weights, bias, 1.0)
}

fn regressor(node: &Node, n_features: usize, target: usize, space: Space) -> Result<Ensemble, String> {
    if space != Space::Output {
        return Err("a regression ensemble is explained in its own units (space: output)".into());
    }
    if !matches!(node.text("post_transform").as_deref(), None | Some("NONE")) {
        return Err("only regression ensembles without post_transform are additive".into());
    }
    let targets = node.int("n_targets").unwrap_or(1).max(1) as usize;
    if target >= targets {
        return Err(format!("the ensemble has {targets} targets; column {target} is not one of them"));
    }
    let bias = node.floats("base_values").get(target).copied().unwrap_or(0.0);
    let weights = leaf_weights(node, "target", target as i64);
    let trees = distinct(&node.ints("nodes_treeids")).max(1);
    let scale = match node.text("aggregate_function").as_deref().unwrap_or("SUM") {
        "SUM" => 1.0,
        "AVERAGE" => 1.0 / trees as f64,
        other => return Err(format!("aggregate_function {other} is not additive")),
    };
    build(node, n_features, &weights, bias, scale)
}

fn distinct(ids: &[i64]) -> usize {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids.len()
}

/// Σ weights per (tree, node) for one class or target; `prefix` is `class` or `target`.
fn leaf_weights(node: &Node, prefix: &str, target: i64) -> HashMap<(i64, i64), f64> {
    let trees = node.ints(&format!("{prefix}_treeids"));
    let nodes = node.ints(&format!("{prefix}_nodeids"));
    let ids = node.ints(&format!("{prefix}_ids"));
    let weights = node.floats(&format!("{prefix}_weights"));
    let mut sums = HashMap::new();
    for i in 0..weights.len().min(trees.len()).min(nodes.len()).min(ids.len()) {
        if ids[i] == target {
            *sums.entry((trees[i], nodes[i])).or_insert(0.0) += weights[i];
        }
    }
    sums
}

fn build(
    node: &Node,
    n_features: usize,
    weights: &HashMap<(i64, i64), f64>,
    bias: f64,
    scale: f64,
) -> Result<Ensemble, String> {
    let tree_ids = node.ints("nodes_treeids");
    let node_ids = node.ints("nodes_nodeids");
    let features = node.ints("nodes_featureids");
    let thresholds = node.floats("nodes_values");
    let modes = node.texts("nodes_modes");
    let if_true = node.ints("nodes_truenodeids");
    let if_false = node.ints("nodes_falsenodeids");
    let missing = node.ints("nodes_missing_value_tracks_true");
    let n = tree_ids.len();
    if [node_ids.len(), features.len(), thresholds.len(), modes.len(), if_true.len(), if_false.len()]
        .iter()
        .any(|&l| l != n)
        || !(missing.is_empty() || missing.len() == n)
    {
        return Err("the ensemble's node attributes differ in length".into());
    }
    // Nodes of each tree, in first-seen tree order; node ids are local to their tree.
    let mut order: Vec<i64> = Vec::new();
    let mut members: HashMap<i64, Vec<usize>> = HashMap::new();
    for (i, &tree) in tree_ids.iter().enumerate() {
        if !members.contains_key(&tree) {
            order.push(tree);
        }
        members.entry(tree).or_default().push(i);
    }
    let mut trees = Vec::with_capacity(order.len());
    for tree_id in order {
        let entries = &members[&tree_id];
        let local: HashMap<i64, usize> = entries.iter().enumerate().map(|(k, &i)| (node_ids[i], k)).collect();
        let child =
            |id: i64| local.get(&id).copied().ok_or(format!("tree {tree_id} names a node {id} it does not have"));
        let mut nodes = Vec::with_capacity(entries.len());
        let mut is_child = vec![false; entries.len()];
        for &i in entries {
            let rule = match modes[i].as_str() {
                "LEAF" => {
                    nodes.push(TreeNode::Leaf(weights.get(&(tree_id, node_ids[i])).copied().unwrap_or(0.0)));
                    continue;
                }
                "BRANCH_LEQ" => Rule::Leq,
                "BRANCH_LT" => Rule::Lt,
                "BRANCH_GTE" => Rule::Gte,
                "BRANCH_GT" => Rule::Gt,
                "BRANCH_EQ" => Rule::Eq,
                "BRANCH_NEQ" => Rule::Neq,
                other => return Err(format!("tree {tree_id} has a node of unknown mode {other}")),
            };
            let feature = usize::try_from(features[i])
                .ok()
                .filter(|&f| f < n_features)
                .ok_or(format!("tree {tree_id} splits on feature {}, outside the {n_features} inputs", features[i]))?;
            let (t, f) = (child(if_true[i])?, child(if_false[i])?);
            is_child[t] = true;
            is_child[f] = true;
            nodes.push(TreeNode::Branch {
                feature,
                threshold: thresholds[i],
                rule,
                if_true: t,
                if_false: f,
                missing_true: missing.get(i).is_some_and(|&m| m != 0),
            });
        }
        let root = is_child.iter().position(|&c| !c).ok_or(format!("tree {tree_id} has no root"))?;
        let tree = Tree { nodes, root };
        check_depth(&tree, tree_id)?;
        trees.push(tree);
    }
    Ok(Ensemble { trees, bias, scale })
}

/// Refuses trees deeper than [`MAX_DEPTH`], cycles included.
fn check_depth(tree: &Tree, tree_id: i64) -> Result<(), String> {
    let mut stack = vec![(tree.root, 0usize)];
    while let Some((at, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Err(format!("tree {tree_id} is deeper than {MAX_DEPTH} levels, or loops"));
        }
        if let TreeNode::Branch { if_true, if_false, .. } = tree.nodes[at] {
            stack.extend([(if_true, depth + 1), (if_false, depth + 1)]);
        }
    }
    Ok(())
}
