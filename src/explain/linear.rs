//! The linear method: recognises graphs whose explained column is affine in the inputs, or the
//! logistic function of an affine map, by evaluating the graph symbolically, and reads the
//! weights. Shapley values of an affine g against one baseline are exact: wᵢ(xᵢ − bᵢ).
//!
//! Recognised: `Scaler`, `LinearClassifier`, `LinearRegressor` (ONNX-ML); `Sub`, `Add`, `Mul`,
//! `Div` with constants, `MatMul`, `Gemm`, `Sigmoid`, `Concat`, `Identity` and `Cast`. `1 − σ(z)`
//! is read as σ(−z). Anything else makes its outputs unknown.

use std::collections::HashMap;

use super::config::Space;
use super::onnx::{Constant, Graph, Node};

/// g(x) = x · weights + bias, in the explained space.
#[derive(Debug, Clone, PartialEq)]
pub struct Affine {
    pub weights: Vec<f64>,
    pub bias: f64,
}

impl Affine {
    pub fn at(&self, row: &[f32]) -> f64 {
        self.weights.iter().zip(row).map(|(w, &x)| w * x as f64).sum::<f64>() + self.bias
    }

    fn scaled(&self, by: f64) -> Affine {
        Affine { weights: self.weights.iter().map(|w| w * by).collect(), bias: self.bias * by }
    }

    fn plus(&self, other: &Affine) -> Affine {
        let weights = self.weights.iter().zip(&other.weights).map(|(a, b)| a + b).collect();
        Affine { weights, bias: self.bias + other.bias }
    }

    fn shifted(&self, by: f64) -> Affine {
        Affine { weights: self.weights.clone(), bias: self.bias + by }
    }

    /// Σⱼ coefficients[j] · columns[j] + bias.
    fn combine(columns: &[Affine], coefficients: impl Iterator<Item = f64>, bias: f64) -> Affine {
        let n = columns.first().map_or(0, |c| c.weights.len());
        let mut sum = Affine { weights: vec![0.0; n], bias };
        for (column, k) in columns.iter().zip(coefficients) {
            sum = sum.plus(&column.scaled(k));
        }
        sum
    }
}

/// A tensor column as a function of the model input.
#[derive(Debug, Clone)]
enum Column {
    Affine(Affine),
    /// σ(affine): its log-odds are affine.
    Logistic(Affine),
}

/// What is known of a tensor.
#[derive(Debug, Clone)]
enum Value {
    Columns(Vec<Column>),
    Constant(Constant),
}

/// The explained column's affine form, or why the graph is not recognised as linear.
pub fn recognise(graph: &Graph, n_features: usize, output: &str, class: usize, space: Space) -> Result<Affine, String> {
    let mut known: HashMap<&str, Value> = HashMap::new();
    let identity = (0..n_features)
        .map(|j| {
            let mut weights = vec![0.0; n_features];
            weights[j] = 1.0;
            Column::Affine(Affine { weights, bias: 0.0 })
        })
        .collect();
    known.insert(graph.input.as_str(), Value::Columns(identity));
    for (name, constant) in &graph.constants {
        known.insert(name.as_str(), Value::Constant(constant.clone()));
    }
    for node in &graph.nodes {
        let inputs: Vec<Option<&Value>> = node.input.iter().map(|i| known.get(i.as_str())).collect();
        let Some(outputs) = evaluate(node, &inputs) else { continue };
        for (name, value) in node.output.iter().zip(outputs) {
            if let Some(value) = value {
                known.insert(name.as_str(), value);
            }
        }
    }
    let columns = match known.get(output) {
        Some(Value::Columns(columns)) => columns,
        _ => return Err(format!("output {output} is not an affine or logistic function of the input")),
    };
    match (columns.get(class), space) {
        (None, _) => Err(format!("output {output} has {} columns; class {class} is not one of them", columns.len())),
        (Some(Column::Logistic(affine)), Space::Logit) => Ok(affine.clone()),
        (Some(Column::Affine(affine)), Space::Output) => Ok(affine.clone()),
        (Some(Column::Affine(_)), Space::Logit) => {
            Err(format!("column {class} of {output} is affine, not a probability; explain it with space: output"))
        }
        (Some(Column::Logistic(_)), Space::Output) => {
            Err(format!("column {class} of {output} is σ(affine), linear only as log-odds (space: logit)"))
        }
    }
}

/// The node's outputs, where they are affine or logistic columns; `None` for unknown.
fn evaluate(node: &Node, inputs: &[Option<&Value>]) -> Option<Vec<Option<Value>>> {
    let columns = |i: usize| match inputs.get(i).copied().flatten() {
        Some(Value::Columns(c)) => Some(c.as_slice()),
        _ => None,
    };
    let constant = |i: usize| match inputs.get(i).copied().flatten() {
        Some(Value::Constant(c)) => Some(c),
        _ => None,
    };
    let one = |value: Value| Some(vec![Some(value)]);
    match node.op_type.as_str() {
        "Identity" | "Cast" => one(inputs.first().copied().flatten()?.clone()),
        "Scaler" => {
            let (offset, scale) = (node.floats("offset"), node.floats("scale"));
            let affine = affine_columns(columns(0)?)?;
            let out = affine
                .iter()
                .enumerate()
                .map(|(j, a)| Some(Column::Affine(a.shifted(-pick(&offset, j, 0.0)?).scaled(pick(&scale, j, 1.0)?))))
                .collect::<Option<Vec<_>>>()?;
            one(Value::Columns(out))
        }
        "Add" | "Sub" | "Mul" | "Div" => elementwise(&node.op_type, inputs).map(|v| vec![Some(v)]),
        "MatMul" => {
            let (a, w) = (affine_columns(columns(0)?)?, constant(1)?);
            let [rows, cols] = w.dims[..] else { return None };
            (rows == a.len()).then_some(())?;
            let out =
                (0..cols).map(|k| Column::Affine(Affine::combine(&a, (0..rows).map(|j| w.values[j * cols + k]), 0.0)));
            one(Value::Columns(out.collect()))
        }
        "Gemm" => gemm(node, affine_columns(columns(0)?)?, constant(1)?, constant(2)).map(|v| vec![Some(v)]),
        "Sigmoid" => {
            let out = affine_columns(columns(0)?)?.into_iter().map(Column::Logistic).collect();
            one(Value::Columns(out))
        }
        "Concat" => {
            let axis = node.int("axis")?;
            (axis == 1 || axis == -1).then_some(())?;
            let parts = (0..inputs.len()).map(columns).collect::<Option<Vec<_>>>()?;
            one(Value::Columns(parts.concat()))
        }
        "LinearClassifier" => linear_classifier(node, &affine_columns(columns(0)?)?),
        "LinearRegressor" => {
            matches!(node.text("post_transform").as_deref(), None | Some("NONE")).then_some(())?;
            let scores = scores(node, &affine_columns(columns(0)?)?)?;
            one(Value::Columns(scores.into_iter().map(Column::Affine).collect()))
        }
        _ => None,
    }
}

/// The columns when all are affine (operators other than `Sigmoid` read only those).
fn affine_columns(columns: &[Column]) -> Option<Vec<Affine>> {
    columns
        .iter()
        .map(|c| match c {
            Column::Affine(a) => Some(a.clone()),
            Column::Logistic(_) => None,
        })
        .collect()
}

/// Element `j` of a per-column list, a single value broadcast, or `default` when empty.
fn pick(values: &[f64], j: usize, default: f64) -> Option<f64> {
    match values.len() {
        0 => Some(default),
        1 => Some(values[0]),
        _ => values.get(j).copied(),
    }
}

/// A constant broadcast over `n` columns: a scalar, `[1]`, `[n]` or `[1, n]`.
fn per_column(constant: &Constant, n: usize) -> Option<Vec<f64>> {
    let leading_ones = constant.dims.iter().rev().skip(1).all(|&d| d == 1);
    match constant.values.len() {
        1 => Some(vec![constant.values[0]; n]),
        len if len == n && leading_ones => Some(constant.values.clone()),
        _ => None,
    }
}

fn elementwise(op: &str, inputs: &[Option<&Value>]) -> Option<Value> {
    let (left, right) = (inputs.first().copied().flatten()?, inputs.get(1).copied().flatten()?);
    let out = match (left, right) {
        (Value::Columns(a), Value::Constant(c)) => {
            let c = per_column(c, a.len())?;
            let a = affine_columns(a)?;
            a.iter()
                .zip(c)
                .map(|(a, c)| match op {
                    "Add" => Some(a.shifted(c)),
                    "Sub" => Some(a.shifted(-c)),
                    "Mul" => Some(a.scaled(c)),
                    "Div" if c != 0.0 => Some(a.scaled(1.0 / c)),
                    _ => None,
                })
                .map(|a| a.map(Column::Affine))
                .collect::<Option<Vec<_>>>()?
        }
        (Value::Constant(c), Value::Columns(a)) => {
            let c = per_column(c, a.len())?;
            a.iter()
                .zip(c)
                .map(|(column, c)| match (op, column) {
                    ("Add", Column::Affine(a)) => Some(Column::Affine(a.shifted(c))),
                    ("Mul", Column::Affine(a)) => Some(Column::Affine(a.scaled(c))),
                    ("Sub", Column::Affine(a)) => Some(Column::Affine(a.scaled(-1.0).shifted(c))),
                    // 1 − σ(z) = σ(−z).
                    ("Sub", Column::Logistic(z)) if c == 1.0 => Some(Column::Logistic(z.scaled(-1.0))),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?
        }
        (Value::Columns(a), Value::Columns(b)) if a.len() == b.len() && matches!(op, "Add" | "Sub") => {
            let sign = if op == "Add" { 1.0 } else { -1.0 };
            let (a, b) = (affine_columns(a)?, affine_columns(b)?);
            a.iter().zip(&b).map(|(a, b)| Column::Affine(a.plus(&b.scaled(sign)))).collect()
        }
        _ => return None,
    };
    Some(Value::Columns(out))
}

/// `alpha · A · B + beta · C` with A the input columns (`transA` unsupported).
fn gemm(node: &Node, a: Vec<Affine>, b: &Constant, c: Option<&Constant>) -> Option<Value> {
    (node.int("transA").unwrap_or(0) == 0).then_some(())?;
    let alpha = node.float("alpha").unwrap_or(1.0);
    let beta = node.float("beta").unwrap_or(1.0);
    let [d0, d1] = b.dims[..] else { return None };
    let transposed = node.int("transB").unwrap_or(0) != 0;
    let (inner, outer) = if transposed { (d1, d0) } else { (d0, d1) };
    (inner == a.len()).then_some(())?;
    let bias = match c {
        Some(c) => per_column(c, outer)?,
        None => vec![0.0; outer],
    };
    let weight = |j: usize, k: usize| if transposed { b.values[k * d1 + j] } else { b.values[j * d1 + k] };
    let out = (0..outer)
        .map(|k| Column::Affine(Affine::combine(&a, (0..inner).map(|j| alpha * weight(j, k)), beta * bias[k])))
        .collect();
    Some(Value::Columns(out))
}

/// One affine score per row of `coefficients` (rows × inputs) plus its intercept.
fn scores(node: &Node, a: &[Affine]) -> Option<Vec<Affine>> {
    let coefficients = node.floats("coefficients");
    let intercepts = node.floats("intercepts");
    let n = a.len();
    (n > 0 && !coefficients.is_empty() && coefficients.len().is_multiple_of(n)).then_some(())?;
    let rows = coefficients.len() / n;
    (0..rows)
        .map(|k| Some(Affine::combine(a, coefficients[k * n..(k + 1) * n].iter().copied(), pick(&intercepts, k, 0.0)?)))
        .collect()
}

/// `LinearClassifier` with one coefficient row per class: output 1 holds σ(zₖ) under `LOGISTIC`,
/// σ(zₖ − z₁₋ₖ) under `SOFTMAX` with two classes, and zₖ under `NONE`.
fn linear_classifier(node: &Node, a: &[Affine]) -> Option<Vec<Option<Value>>> {
    let scores = scores(node, a)?;
    let classes = node.ints("classlabels_ints").len().max(node.texts("classlabels_strings").len());
    (scores.len() == classes).then_some(())?;
    let columns = match node.text("post_transform").as_deref().unwrap_or("NONE") {
        "NONE" => scores.into_iter().map(Column::Affine).collect(),
        "LOGISTIC" => scores.into_iter().map(Column::Logistic).collect(),
        "SOFTMAX" if classes == 2 => {
            let (z0, z1) = (&scores[0], &scores[1]);
            vec![Column::Logistic(z0.plus(&z1.scaled(-1.0))), Column::Logistic(z1.plus(&z0.scaled(-1.0)))]
        }
        _ => return None,
    };
    Some(vec![None, Some(Value::Columns(columns))])
}
