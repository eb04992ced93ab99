//! The `explain:` section of a model's config.yaml, as written there.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// `explain:` in a model's config.yaml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainConfig {
    /// The model output that is explained.
    pub output: String,
    /// Its column; may be left out for a one-column output.
    #[serde(default)]
    pub class: Option<usize>,
    /// Default: `logit` when `class` is given (a probability column), `output` otherwise.
    #[serde(default)]
    pub space: Option<Space>,
    /// The reference row, one value per feature in input order...
    #[serde(default)]
    pub baseline: Option<Vec<f64>>,
    /// ...or a JSON array in a file, relative to the model's folder.
    #[serde(default)]
    pub baseline_file: Option<PathBuf>,
    #[serde(default)]
    pub method: MethodChoice,
    /// Permutations of the sampling method.
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// Reasons returned per row, unless the job asks for another number.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Adverse-action code and text per feature name.
    #[serde(default)]
    pub reasons: BTreeMap<String, ReasonText>,
}

fn default_samples() -> usize {
    64
}

fn default_top_k() -> usize {
    4
}

/// Where contributions are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Space {
    /// The log-odds of the explained probability column.
    Logit,
    /// The output value itself.
    Output,
}

impl Space {
    pub fn as_str(self) -> &'static str {
        match self {
            Space::Logit => "logit",
            Space::Output => "output",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodChoice {
    /// Linear or tree when the graph is recognised, sampling otherwise.
    #[default]
    Auto,
    Linear,
    Tree,
    Sampling,
}

/// The code and text a reason is reported with.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReasonText {
    pub code: Option<String>,
    pub text: Option<String>,
}
