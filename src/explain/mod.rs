//! Explanations of scores (reason codes). Owns the `explain:` section of a model's config.yaml,
//! the choice of method for a model version, and each row's [`Explanation`]: the Shapley values
//! of the game v(S) = g(x with the features outside S set to the baseline's values), where g is
//! the explained output column in its explained space, and the top reasons: the features that
//! push g up the most. The linear and tree methods are exact and read the model's graph; they
//! need no further runs of the model. The sampling method scores extra rows with the job's own
//! ([`Request`]), and reads their scores back once the job is scored.

mod config;
mod linear;
mod onnx;
mod sampling;
mod tree;

use std::path::Path;

pub use config::{ExplainConfig, MethodChoice, ReasonText, Space};

/// How a model version's rows are explained.
pub enum Method {
    Linear(linear::Affine),
    Tree(tree::Ensemble),
    /// Permutations per row.
    Sampling(usize),
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Linear(_) => "linear",
            Method::Tree(_) => "tree",
            Method::Sampling(_) => "sampling",
        }
    }
}

/// A model version's explainer, built when the version loads.
pub struct Explainer {
    pub method: Method,
    /// Why this method was chosen, for `batchscore inspect`.
    pub reason: String,
    pub top_k: usize,
    /// The explained output, its column, and the space g is measured in.
    pub output: String,
    class: usize,
    space: Space,
    baseline: Vec<f32>,
    base_value: f64,
    features: Vec<String>,
    texts: Vec<ReasonText>,
    /// Each feature's reason group: features with the same code share one (the levels of a
    /// one-hot attribute), so a row's reasons name each code at most once.
    groups: Vec<usize>,
}

/// A job's request for explanations, made when the job is bound to its model version.
#[derive(Debug)]
pub struct Request {
    pub top_k: usize,
    /// The job's own rows (`rows × n_features`, row-major): what reasons report values from.
    pub inputs: Vec<f32>,
    pub rows: usize,
    /// The sampling method's walks, scored after the job's own rows.
    pub walks: Option<sampling::Plan>,
}

/// Why a job's explanations cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(
        "explaining this job's {rows} row(s) by sampling scores {needed} rows, more than the {limit} a job may \
         have (limits.max_rows_per_job); send fewer rows per job, or lower explain.samples"
    )]
    TooManyRows { rows: usize, needed: usize, limit: usize },
    #[error("the explained output {0} has no numeric value in column {1}")]
    NotNumeric(String, usize),
}

impl std::fmt::Debug for Explainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Explainer({})", self.method.name())
    }
}

/// One row's explanation.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// g(x).
    pub value: f64,
    /// g(baseline).
    pub base_value: f64,
    /// One per feature in input order; they sum to `value − base_value`.
    pub contributions: Vec<f64>,
    /// Features by descending positive contribution, one per reason code, at most the asked
    /// number.
    pub reasons: Vec<usize>,
}

/// A reason as reported: the feature, the row's value, its contribution, and its code and text.
pub struct Reason<'a> {
    pub feature: &'a str,
    pub value: f32,
    pub contribution: f64,
    pub text: &'a ReasonText,
}

impl Explainer {
    /// Reads `config` for a model of `n_features` inputs named `features`, whose ONNX file holds
    /// `model` and whose folder is `folder`. Errors say what to change in config.yaml.
    pub fn build(
        config: &ExplainConfig,
        model: &[u8],
        folder: &Path,
        features: Option<&[String]>,
        n_features: usize,
    ) -> Result<Explainer, String> {
        let features = features.ok_or("explain needs `features`, the names reasons are given by")?.to_vec();
        let baseline = baseline(config, folder, n_features)?;
        let texts = reason_texts(config, &features)?;
        if config.top_k == 0 {
            return Err("explain.top_k must be at least 1".into());
        }
        if config.samples < 2 || !config.samples.is_multiple_of(2) {
            return Err(format!("explain.samples is {}; it must be an even number of at least 2", config.samples));
        }
        let class = config.class.unwrap_or(0);
        let space = config.space.unwrap_or(if config.class.is_some() { Space::Logit } else { Space::Output });
        let (method, reason) = choose(config, model, n_features, class, space)?;
        let base_value = match &method {
            Method::Linear(affine) => affine.at(&baseline),
            Method::Tree(ensemble) => ensemble.at(&baseline),
            // Set from a run of the model once its sessions are up: see `baseline`.
            Method::Sampling(_) => f64::NAN,
        };
        let top_k = config.top_k;
        let output = config.output.clone();
        let groups = reason_groups(&texts);
        Ok(Explainer { method, reason, top_k, output, class, space, baseline, base_value, features, texts, groups })
    }

    /// The baseline row, which the sampling method's base value is scored from.
    pub fn baseline(&self) -> &[f32] {
        &self.baseline
    }

    /// Sets g(baseline) from the model's output row for the baseline.
    pub fn set_base_value(&mut self, output_row: &[f64]) -> Result<(), ExplainError> {
        self.base_value = self.g(output_row)?;
        Ok(())
    }

    /// g of one row of the explained output: the value of column `class`, or its log-odds.
    pub fn g(&self, output_row: &[f64]) -> Result<f64, ExplainError> {
        let not_numeric = || ExplainError::NotNumeric(self.output.clone(), self.class);
        let p = *output_row.get(self.class).filter(|v| v.is_finite()).ok_or_else(not_numeric)?;
        Ok(match self.space {
            Space::Output => p,
            // The other columns' sum is 1 − p without the cancellation of computing 1 − p.
            Space::Logit if output_row.len() > 1 => {
                let rest: f64 = output_row.iter().enumerate().filter(|&(j, _)| j != self.class).map(|(_, v)| v).sum();
                p.ln() - rest.ln()
            }
            Space::Logit => p.ln() - (1.0 - p).ln(),
        })
    }

    /// The request of a job with `rows` rows (`inputs`) that asked for `top_k` reasons, and the
    /// rows to score after its own: the sampling method's walk points (none for the others).
    pub fn request(
        &self,
        inputs: &[f32],
        rows: usize,
        top_k: usize,
        max_rows: usize,
    ) -> Result<(Request, Vec<f32>), ExplainError> {
        let mut request = Request { top_k, inputs: inputs.to_vec(), rows, walks: None };
        let Method::Sampling(samples) = self.method else { return Ok((request, Vec::new())) };
        let needed = sampling::Plan::rows_needed(inputs, &self.baseline, samples);
        if needed > max_rows {
            return Err(ExplainError::TooManyRows { rows, needed, limit: max_rows });
        }
        let (plan, points) = sampling::Plan::new(inputs, &self.baseline, samples);
        request.walks = Some(plan);
        Ok((request, points))
    }

    /// Explains the job's rows. `g` holds g of every scored row of the job, the walk points
    /// included; the exact methods need none of it.
    pub fn explain(&self, request: &Request, g: Option<&[f64]>) -> Vec<Explanation> {
        let n = self.features.len();
        let rows = request.inputs.chunks_exact(n.max(1)).enumerate();
        rows.map(|(i, row)| {
            let (value, contributions) = match (&self.method, &request.walks, g) {
                (Method::Linear(affine), ..) => {
                    let phi = affine.weights.iter().zip(row.iter().zip(&self.baseline));
                    (affine.at(row), phi.map(|(w, (&x, &b))| w * (x as f64 - b as f64)).collect())
                }
                (Method::Tree(ensemble), ..) => {
                    let mut phi = vec![0.0; n];
                    ensemble.contributions(row, &self.baseline, &mut phi);
                    (ensemble.at(row), phi)
                }
                (Method::Sampling(_), Some(walks), Some(g)) => (g[i], walks.contributions(i, g, self.base_value, n)),
                // A sampling request always has its walks and scores (result stage invariant).
                (Method::Sampling(_), ..) => (f64::NAN, vec![0.0; n]),
            };
            let reasons = top_reasons(&contributions, &self.groups, request.top_k);
            Explanation { value, base_value: self.base_value, contributions, reasons }
        })
        .collect()
    }

    /// Whether explaining needs g of the job's scored rows (the sampling method).
    pub fn reads_scores(&self) -> bool {
        matches!(self.method, Method::Sampling(_))
    }

    /// The number of features a row has.
    pub fn features(&self) -> usize {
        self.features.len()
    }

    /// What reason `feature` of `row` is reported as.
    pub fn reason<'a>(&'a self, explanation: &Explanation, row: &[f32], feature: usize) -> Reason<'a> {
        Reason {
            feature: &self.features[feature],
            value: row[feature],
            contribution: explanation.contributions[feature],
            text: &self.texts[feature],
        }
    }
}

/// The features with a positive contribution, largest first (ties in input order), at most `k`,
/// and at most one of each reason group: a second level of the same attribute adds no reason.
/// One pass over the features, keeping the best `k` so far in order.
fn top_reasons(contributions: &[f64], groups: &[usize], k: usize) -> Vec<usize> {
    let mut top: Vec<usize> = Vec::with_capacity(k + 1);
    for (i, &c) in contributions.iter().enumerate() {
        let beats_last = top.len() < k || top.last().is_some_and(|&last| c > contributions[last]);
        if c <= 0.0 || !beats_last {
            continue;
        }
        if let Some(same) = top.iter().position(|&t| groups[t] == groups[i]) {
            if c <= contributions[top[same]] {
                continue;
            }
            top.remove(same);
        }
        // After every feature that is at least as large: ties keep input order.
        let at = top.iter().position(|&t| c > contributions[t]).unwrap_or(top.len());
        top.insert(at, i);
        top.truncate(k);
    }
    top
}

/// Each feature's reason group: the first feature with the same code, else the feature itself.
fn reason_groups(texts: &[ReasonText]) -> Vec<usize> {
    (0..texts.len())
        .map(|i| match &texts[i].code {
            Some(code) => texts.iter().position(|t| t.code.as_ref() == Some(code)).unwrap_or(i),
            None => i,
        })
        .collect()
}

fn baseline(config: &ExplainConfig, folder: &Path, n_features: usize) -> Result<Vec<f32>, String> {
    let values = match (&config.baseline, &config.baseline_file) {
        (Some(values), None) => values.clone(),
        (None, Some(file)) => {
            let path = folder.join(file);
            let text = std::fs::read(&path).map_err(|e| format!("explain.baseline_file {}: {e}", path.display()))?;
            serde_json::from_slice::<Vec<f64>>(&text)
                .map_err(|e| format!("explain.baseline_file {} is not a JSON array of numbers: {e}", path.display()))?
        }
        (None, None) => {
            return Err("explain needs a baseline: `baseline: [...]` or `baseline_file: baseline.json`".into())
        }
        (Some(_), Some(_)) => return Err("explain has both baseline and baseline_file; keep one".into()),
    };
    if values.len() != n_features {
        return Err(format!("the explain baseline has {} values; the model has {n_features} features", values.len()));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let narrowed = v as f32;
            narrowed
                .is_finite()
                .then_some(narrowed)
                .ok_or(format!("explain baseline value {i} ({v}) is not a finite float32"))
        })
        .collect()
}

fn reason_texts(config: &ExplainConfig, features: &[String]) -> Result<Vec<ReasonText>, String> {
    let mut texts = vec![ReasonText::default(); features.len()];
    for (name, text) in &config.reasons {
        let index = features
            .iter()
            .position(|f| f == name)
            .ok_or(format!("explain.reasons names {name:?}, which is not one of the model's features"))?;
        texts[index] = text.clone();
    }
    Ok(texts)
}

/// The method `config` asks for and why; an explicit choice the graph does not allow is an error.
fn choose(
    config: &ExplainConfig,
    model: &[u8],
    n_features: usize,
    class: usize,
    space: Space,
) -> Result<(Method, String), String> {
    let output = config.output.as_str();
    let graph = onnx::Graph::parse(model);
    let linear = || {
        let graph = graph.as_ref().map_err(Clone::clone)?;
        linear::recognise(graph, n_features, output, class, space).map(Method::Linear)
    };
    let tree = || {
        let graph = graph.as_ref().map_err(Clone::clone)?;
        tree::recognise(graph, n_features, output, class, space).map(Method::Tree)
    };
    let chosen = "chosen in config.yaml".to_string();
    let sampling = Method::Sampling(config.samples);
    match config.method {
        MethodChoice::Linear => linear().map(|m| (m, chosen)).map_err(|e| format!("explain.method linear: {e}")),
        MethodChoice::Tree => tree().map(|m| (m, chosen)).map_err(|e| format!("explain.method tree: {e}")),
        MethodChoice::Sampling => Ok((sampling, chosen)),
        MethodChoice::Auto => match (linear(), tree()) {
            (Ok(method), _) => {
                Ok((method, format!("column {class} of {output} is linear in the inputs in {} space", space.as_str())))
            }
            (_, Ok(method)) => Ok((method, format!("{output} is the score of a tree ensemble"))),
            (Err(not_linear), Err(not_tree)) => Ok((
                sampling,
                format!("no exact method reads the graph: not linear ({not_linear}); not a tree ensemble ({not_tree})"),
            )),
        },
    }
}

#[cfg(test)]
mod tests;
