//! The exact methods against Shapley values computed by brute force with onnxruntime
//! (`scripts/build_explain_fixtures.py` writes `tests/fixtures/explain/expected/`), and against
//! hand-checked small cases.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use super::*;

const TOLERANCE: f64 = 1e-3;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/explain")
}

/// The explainer of fixture `name` and its expected values.
fn fixture(name: &str) -> (Explainer, Value) {
    let folder = fixtures().join("models").join(name);
    let text = std::fs::read_to_string(folder.join("config.yaml")).expect("fixture config");
    let yaml = ::config::Config::builder()
        .add_source(::config::File::from_str(&text, ::config::FileFormat::Yaml))
        .build()
        .expect("config.yaml is YAML");
    let explain: ExplainConfig = yaml.get("explain").expect("an explain section");
    let features: Vec<String> = yaml.get("features").expect("features");
    let model = std::fs::read(folder.join("1/model.onnx")).expect("fixture model");
    let explainer = Explainer::build(&explain, &model, &folder, Some(&features), features.len()).expect("explainer");
    let expected = fixtures().join(format!("expected/{name}.json"));
    (explainer, serde_json::from_slice(&std::fs::read(expected).expect("expected values")).expect("JSON"))
}

fn number(value: &Value) -> f64 {
    value.as_f64().expect("a number")
}

/// A row of the expected file; `null` is a missing value.
fn row(value: &Value) -> Vec<f32> {
    value.as_array().expect("a row").iter().map(|v| v.as_f64().map_or(f32::NAN, |v| v as f32)).collect()
}

fn check_against_brute_force(name: &str, method: &str) {
    let (explainer, expected) = fixture(name);
    assert_eq!(explainer.method.name(), method, "{name}: {}", explainer.reason);
    let base_value = number(&expected["base_value"]);
    let rows = expected["rows"].as_array().expect("rows");
    assert!(rows.len() >= 10, "{name}: {} rows", rows.len());
    for (i, values) in rows.iter().enumerate() {
        let inputs = row(values);
        let request = Request { top_k: 4, inputs, rows: 1, walks: None };
        let [explanation] = &explainer.explain(&request, None)[..] else { panic!("one explanation per row") };
        let value = number(&expected["value"][i]);
        assert!((explanation.value - value).abs() < TOLERANCE, "{name} row {i}: g(x) {} ≠ {value}", explanation.value);
        assert!(
            (explanation.base_value - base_value).abs() < TOLERANCE,
            "{name}: g(baseline) {}",
            explanation.base_value
        );
        for (j, phi) in explanation.contributions.iter().enumerate() {
            let want = number(&expected["contributions"][i][j]);
            assert!((phi - want).abs() < TOLERANCE, "{name} row {i} feature {j}: {phi} ≠ {want}");
        }
        let sum: f64 = explanation.contributions.iter().sum();
        let gap = sum - (explanation.value - explanation.base_value);
        assert!(gap.abs() < TOLERANCE, "{name} row {i}: contributions miss value − base_value by {gap}");
    }
}

#[test]
fn linear_graphs_of_onnx_ml_operators_match_brute_force() {
    check_against_brute_force("linear", "linear");
}

#[test]
fn linear_graphs_of_standard_operators_match_brute_force() {
    check_against_brute_force("linear_standard", "linear");
}

#[test]
fn scikit_learn_gradient_boosting_with_missing_values_matches_brute_force() {
    check_against_brute_force("gbt_sklearn", "tree");
}

#[test]
fn lightgbm_with_missing_values_matches_brute_force() {
    check_against_brute_force("gbt_lightgbm", "tree");
}

#[test]
fn an_mlp_is_explained_by_sampling_and_says_why() {
    let (explainer, _) = fixture("mlp");
    assert_eq!(explainer.method.name(), "sampling");
    assert!(
        explainer.reason.contains("not linear") && explainer.reason.contains("not a tree ensemble"),
        "{}",
        explainer.reason
    );
}

#[test]
fn reasons_are_the_largest_positive_contributions_first() {
    let own = |n: usize| (0..n).collect::<Vec<_>>();
    assert_eq!(top_reasons(&[0.5, -2.0, 0.0, 1.5, 0.5, 3.0], &own(6), 4), [5, 3, 0, 4], "ties in input order");
    assert_eq!(top_reasons(&[-1.0, 0.0], &own(2), 4), Vec::<usize>::new(), "fewer when fewer are positive");
    assert_eq!(top_reasons(&[1.0, 2.0, 3.0], &own(3), 2), [2, 1]);
}

#[test]
fn reasons_name_each_code_once() {
    let text = |code: Option<&str>| ReasonText { code: code.map(String::from), text: None };
    let texts = [text(Some("R01")), text(None), text(Some("R01")), text(Some("R02")), text(None)];
    let groups = reason_groups(&texts);
    assert_eq!(groups, [0, 1, 0, 3, 4], "features 0 and 2 share code R01; features without a code stand alone");
    // Feature 2 outweighs 0, both R01: only 2 is a reason, and the next code takes the free place.
    assert_eq!(top_reasons(&[0.9, 0.1, 1.0, 0.5, 0.2], &groups, 3), [2, 3, 4]);
}

#[test]
fn sampling_walks_telescope_to_the_difference_from_the_baseline() {
    // g(z) = z0·z1 + z2 (not additive): any walk's steps sum to g(x) − g(b).
    let g = |z: &[f32]| (z[0] * z[1] + z[2]) as f64;
    let (baseline, row) = ([0.0f32, 0.0, 0.0], [2.0f32, 3.0, 1.0]);
    let (plan, points) = sampling::Plan::new(&row, &baseline, 8);
    assert_eq!(points.len() / 3, 8 * 2, "two intermediate points per permutation of three features");
    let scores: Vec<f64> = std::iter::once(g(&row)).chain(points.chunks_exact(3).map(g)).collect();
    let phi = plan.contributions(0, &scores, g(&baseline), 3);
    let total: f64 = phi.iter().sum();
    assert!((total - 7.0).abs() < 1e-12, "{phi:?}");
    // The interaction 6 is shared evenly by features 0 and 1 in expectation; feature 2 gets 1
    // in every permutation.
    assert!((phi[2] - 1.0).abs() < 1e-12, "{phi:?}");
}

#[test]
fn config_errors_name_the_setting_to_change() {
    let folder = fixtures().join("models/linear");
    let model = std::fs::read(folder.join("1/model.onnx")).expect("fixture model");
    let features: Vec<String> = (0..62).map(|i| format!("f{i}")).collect();
    let base = ExplainConfig {
        output: "probabilities".into(),
        class: Some(1),
        space: None,
        baseline: Some(vec![0.0; 62]),
        baseline_file: None,
        method: MethodChoice::Auto,
        samples: 64,
        top_k: 4,
        reasons: BTreeMap::new(),
    };
    let error = |config: ExplainConfig| match Explainer::build(&config, &model, &folder, Some(&features), 62) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };
    assert!(error(ExplainConfig { baseline: Some(vec![0.0; 3]), ..base.clone() }).contains("3 values"));
    assert!(error(ExplainConfig { baseline: None, ..base.clone() }).contains("baseline_file"));
    assert!(error(ExplainConfig { samples: 3, ..base.clone() }).contains("explain.samples"));
    assert!(error(ExplainConfig { method: MethodChoice::Tree, ..base.clone() }).contains("explain.method tree"));
    let reasons = BTreeMap::from([("nope".to_string(), ReasonText::default())]);
    assert!(error(ExplainConfig { reasons, ..base.clone() }).contains("\"nope\""));
    assert!(error(ExplainConfig { space: Some(Space::Output), method: MethodChoice::Linear, ..base.clone() })
        .contains("space: logit"));
    match Explainer::build(&base, &model, &folder, None, 62) {
        Ok(_) => panic!("accepted without feature names"),
        Err(e) => assert!(e.contains("features"), "{e}"),
    }
}
