//! The Open Inference Protocol (KServe V2) request form: `inputs` tensors are decoded straight
//! into f32 buffers, checked on their own, and then laid out as the model's input matrix, either
//! from one `[rows, features]` tensor or from one `[rows]` tensor per named feature.
//!
//! The result side of the protocol is encoded in [`crate::encode`].

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::engine::ModelVersion;
use crate::flow::Rejection;

/// AMQP header naming the model of a job whose body has no `model_name`. It also marks the
/// message as an Open Inference Protocol job, so that even a body that cannot be read is
/// answered in that form.
pub const MODEL_HEADER: &str = "x-model";

/// Input datatypes accepted, as the protocol spells them.
const ACCEPTED_DATATYPES: &str = "FP32, FP64, INT32 or INT64";

/// Most feature names quoted in one error message; the rest are counted.
const MAX_NAMES_LISTED: usize = 5;

/// One input tensor of a job: checked, its values converted to f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    /// `[rows]` or `[rows, columns]`; the product equals the number of values.
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl Tensor {
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Datatype {
    Fp32,
    Fp64,
    Int32,
    Int64,
}

impl Datatype {
    fn parse(name: &str) -> Option<Self> {
        [("FP32", Self::Fp32), ("FP64", Self::Fp64), ("INT32", Self::Int32), ("INT64", Self::Int64)]
            .into_iter()
            .find(|(spelling, _)| name.eq_ignore_ascii_case(spelling))
            .map(|(_, datatype)| datatype)
    }

    fn is_integer(self) -> bool {
        matches!(self, Self::Int32 | Self::Int64)
    }
}

/// Checks each decoded input on its own and against the others: everything that does not need
/// the model.
pub(crate) fn tensors(inputs: InputsField) -> Result<Vec<Tensor>, Rejection> {
    checked_tensors(inputs).map_err(Rejection::InvalidInput)
}

fn checked_tensors(inputs: InputsField) -> Result<Vec<Tensor>, String> {
    if inputs.0.is_empty() {
        return Err("job has no inputs; send at least one tensor".into());
    }
    let mut tensors: Vec<Tensor> = Vec::with_capacity(inputs.0.len());
    for (i, input) in inputs.0.into_iter().enumerate() {
        let name = input.name.ok_or_else(|| format!("inputs[{i}] has no name"))?;
        let at = format!("inputs[{i}] ({name:?})");
        let shape = input.shape.ok_or_else(|| format!("{at} has no shape"))?;
        let datatype = input.datatype.ok_or_else(|| format!("{at} has no datatype; send {ACCEPTED_DATATYPES}"))?;
        let Some(parsed) = Datatype::parse(&datatype) else {
            return Err(format!(
                "{at} has datatype {datatype:?}; batchscore accepts {ACCEPTED_DATATYPES}, converted to the \
                 model's float32 input"
            ));
        };
        let data = input.data.ok_or_else(|| format!("{at} has no data"))?;
        if let Some((j, kind)) = data.first_non_number {
            return Err(format!("{at} data[{j}] is {kind}, not a number"));
        }
        if let Some((j, value)) = data.first_beyond_f32 {
            return Err(format!("{at} data[{j}] = {value:e} is outside the float32 range (the model's input type)"));
        }
        if let Some((j, value)) = data.first_fraction.filter(|_| parsed.is_integer()) {
            return Err(format!("{at} has datatype {datatype} but data[{j}] = {value} is not an integer"));
        }
        let shape = shape
            .into_iter()
            .map(usize::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| format!("{at} has a shape dimension too large for this machine"))?;
        if !(1..=2).contains(&shape.len()) {
            return Err(format!(
                "{at} has shape {shape:?}; inputs have shape [rows, columns], or [rows] for one feature"
            ));
        }
        let capacity = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if capacity != Some(data.values.len()) {
            let holds = capacity.map_or_else(|| "more values than fit in memory".into(), |n| format!("{n} values"));
            return Err(format!("{at} has shape {shape:?}, which holds {holds}, but data has {}", data.values.len()));
        }
        if let Some(first) = tensors.first() {
            if first.rows() != shape[0] {
                return Err(format!(
                    "{at} has {} rows but inputs[0] ({:?}) has {}; every input carries the same rows",
                    shape[0],
                    first.name,
                    first.rows()
                ));
            }
        }
        tensors.push(Tensor { name, shape, values: data.values });
    }
    let mut names = HashSet::with_capacity(tensors.len());
    if let Some(twice) = tensors.iter().find(|t| !names.insert(t.name.as_str())) {
        return Err(format!("inputs has two tensors named {:?}; name each input once", twice.name));
    }
    Ok(tensors)
}

/// Lays the job's input tensors out as the model's input matrix (row-major, `rows × n_features`).
pub fn lay_out(tensors: Vec<Tensor>, model: &ModelVersion) -> Result<Vec<f32>, Rejection> {
    let layout = Layout {
        model: &model.name,
        input_name: &model.signature.input_name,
        n_features: model.signature.n_features,
        feature_names: model.feature_names.as_deref(),
        feature_index: &model.feature_index,
    };
    assemble(tensors, &layout).map_err(Rejection::InvalidInput)
}

/// What laying out inputs needs to know about the model.
struct Layout<'a> {
    model: &'a str,
    input_name: &'a str,
    n_features: usize,
    feature_names: Option<&'a [String]>,
    feature_index: &'a HashMap<String, usize>,
}

fn assemble(tensors: Vec<Tensor>, layout: &Layout<'_>) -> Result<Vec<f32>, String> {
    // One input is the whole matrix unless it is named after a feature; naming it after the
    // model's input settles a feature of the same name.
    let tensors = match <[Tensor; 1]>::try_from(tensors) {
        Ok([only]) if only.name == layout.input_name || !layout.feature_index.contains_key(&only.name) => {
            return match only.shape[..] {
                [_, width] if width == layout.n_features => Ok(only.values),
                _ => Err(format!(
                    "input {:?} has shape {:?}; model {} takes one input of shape [rows, {}], or one input per \
                     feature named as in its config.yaml features",
                    only.name, only.shape, layout.model, layout.n_features
                )),
            };
        }
        Ok(one) => Vec::from(one),
        Err(several) => several,
    };
    let Some(names) = layout.feature_names else {
        return Err(format!(
            "model {} has no feature names (config.yaml features), so its inputs cannot be sent per feature; \
             send one input of shape [rows, {}]",
            layout.model, layout.n_features
        ));
    };
    let columns: Vec<Option<usize>> = tensors.iter().map(|t| layout.feature_index.get(&t.name).copied()).collect();
    let unknown: Vec<&str> =
        tensors.iter().zip(&columns).filter(|(_, column)| column.is_none()).map(|(t, _)| t.name.as_str()).collect();
    match unknown.len() {
        0 => {}
        1 => return Err(format!("input {:?} is not a feature of model {}", unknown[0], layout.model)),
        _ => return Err(format!("inputs {} are not features of model {}", quoted(&unknown), layout.model)),
    }
    if let Some(tensor) = tensors.iter().find(|t| !matches!(t.shape[..], [_] | [_, 1])) {
        return Err(format!(
            "input {:?} has shape {:?}; an input per feature has shape [rows] or [rows, 1]",
            tensor.name, tensor.shape
        ));
    }
    let given: HashSet<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    let missing: Vec<&str> = names.iter().map(String::as_str).filter(|n| !given.contains(n)).collect();
    match missing.len() {
        0 => {}
        1 => return Err(format!("model {} needs one input per feature; {:?} is missing", layout.model, missing[0])),
        _ => {
            return Err(format!("model {} needs one input per feature; {} are missing", layout.model, quoted(&missing)))
        }
    }
    let (rows, width) = (tensors.first().map_or(0, Tensor::rows), layout.n_features);
    let mut matrix = vec![0.0; rows * width];
    for (tensor, column) in tensors.iter().zip(columns) {
        let Some(column) = column else { continue };
        for (row, value) in tensor.values.iter().enumerate() {
            matrix[row * width + column] = *value;
        }
    }
    Ok(matrix)
}

/// `"a", "b", "c"`, or `"a", "b", "c", "d", "e" and 3 more`.
fn quoted(names: &[&str]) -> String {
    let listed: Vec<String> = names.iter().take(MAX_NAMES_LISTED).map(|n| format!("{n:?}")).collect();
    match names.len().saturating_sub(MAX_NAMES_LISTED) {
        0 => listed.join(", "),
        rest => format!("{} and {rest} more", listed.join(", ")),
    }
}

/// `inputs` as sent, each tensor decoded but not yet checked.
pub(crate) struct InputsField(Vec<RawInput>);

#[derive(Default)]
struct RawInput {
    name: Option<String>,
    shape: Option<Vec<u64>>,
    datatype: Option<String>,
    data: Option<Data>,
}

/// Tensor data flattened to f32 as it is read, with the first problem of each kind noted: the
/// datatype may come after the data, so judging them waits until the whole input is read.
#[derive(Default)]
struct Data {
    values: Vec<f32>,
    /// Elements read, numbers or not.
    len: usize,
    first_non_number: Option<(usize, &'static str)>,
    first_beyond_f32: Option<(usize, f64)>,
    first_fraction: Option<(usize, f64)>,
}

impl Data {
    fn number(&mut self, value: f32) {
        self.values.push(value);
        self.len += 1;
    }

    fn non_number(&mut self, kind: &'static str) {
        self.first_non_number = self.first_non_number.or(Some((self.len, kind)));
        self.len += 1;
    }
}

impl<'de> Deserialize<'de> for InputsField {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InputsVisitor;
        impl<'de> Visitor<'de> for InputsVisitor {
            type Value = InputsField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("inputs as an array of tensors, each {name, shape, datatype, data}")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<InputsField, A::Error> {
                let mut inputs = Vec::new();
                while let Some(input) = seq.next_element_seed(InputSeed { index: inputs.len() })? {
                    inputs.push(input);
                }
                Ok(InputsField(inputs))
            }
        }
        deserializer.deserialize_seq(InputsVisitor)
    }
}

struct InputSeed {
    index: usize,
}

impl<'de> DeserializeSeed<'de> for InputSeed {
    type Value = RawInput;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<RawInput, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for InputSeed {
    type Value = RawInput;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "inputs[{}] to be an object with name, shape, datatype and data", self.index)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawInput, A::Error> {
        let mut input = RawInput::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "name" => input.name = Some(map.next_value()?),
                "shape" => input.shape = Some(map.next_value()?),
                "datatype" => input.datatype = Some(map.next_value()?),
                "data" => {
                    let mut data = Data::default();
                    map.next_value_seed(Flatten { input: self.index, data: &mut data })?;
                    input.data = Some(data);
                }
                // `parameters` and anything else the protocol may add carry nothing to score.
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(input)
    }
}

/// Appends a flat or nested array of values to `data`, in row-major order.
struct Flatten<'a> {
    input: usize,
    data: &'a mut Data,
}

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

/// One element of `data`: a value, or a nested array of them.
struct Element<'a>(Flatten<'a>);

impl<'de> DeserializeSeed<'de> for Element<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self.0)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "inputs[{}].data to be an array of numbers (flat or nested)", self.input)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Element(Flatten { input: self.input, data: &mut *self.data }))?.is_some() {}
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.data.number(v as f32);
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.data.number(v as f32);
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        let narrowed = v as f32;
        let index = self.data.len;
        if !narrowed.is_finite() {
            self.data.first_beyond_f32 = self.data.first_beyond_f32.or(Some((index, v)));
        }
        if v.fract() != 0.0 {
            self.data.first_fraction = self.data.first_fraction.or(Some((index, v)));
        }
        self.data.number(narrowed);
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.data.non_number("a boolean");
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.data.non_number("a string");
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.data.non_number("null");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout<'a>(names: Option<&'a [String]>, index: &'a HashMap<String, usize>) -> Layout<'a> {
        Layout { model: "m", input_name: "input", n_features: 3, feature_names: names, feature_index: index }
    }

    fn tensor(name: &str, shape: &[usize], values: &[f32]) -> Tensor {
        Tensor { name: name.into(), shape: shape.to_vec(), values: values.to_vec() }
    }

    fn features() -> (Vec<String>, HashMap<String, usize>) {
        let names: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let index = names.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
        (names, index)
    }

    #[test]
    fn one_matrix_input_is_the_model_input() {
        let (names, index) = features();
        let values = [1., 2., 3., 4., 5., 6.];
        for name in ["input", "anything"] {
            let laid = assemble(vec![tensor(name, &[2, 3], &values)], &layout(Some(&names), &index));
            assert_eq!(laid.unwrap(), values.to_vec());
        }
        let laid = assemble(vec![tensor("x", &[3, 2], &values)], &layout(None, &HashMap::new()));
        let text = laid.unwrap_err();
        assert!(text.contains(r#"input "x" has shape [3, 2]; model m takes one input of shape [rows, 3]"#), "{text}");
    }

    #[test]
    fn per_feature_inputs_are_laid_out_in_feature_order() {
        let (names, index) = features();
        let sent = vec![tensor("c", &[2, 1], &[3., 6.]), tensor("a", &[2], &[1., 4.]), tensor("b", &[2], &[2., 5.])];
        let laid = assemble(sent, &layout(Some(&names), &index)).unwrap();
        assert_eq!(laid, vec![1., 2., 3., 4., 5., 6.]);
    }

    #[test]
    fn per_feature_errors_name_the_features() {
        let (names, index) = features();
        let check = |sent: Vec<Tensor>, needle: &str| {
            let text = assemble(sent, &layout(Some(&names), &index)).unwrap_err();
            assert!(text.contains(needle), "{text:?} should contain {needle:?}");
        };
        check(vec![tensor("a", &[1], &[1.]), tensor("z", &[1], &[1.])], r#"input "z" is not a feature of model m"#);
        check(
            vec![tensor("a", &[1], &[1.]), tensor("y", &[1], &[1.]), tensor("z", &[1], &[1.])],
            r#"inputs "y", "z" are not features of model m"#,
        );
        check(vec![tensor("a", &[1], &[1.]), tensor("b", &[1], &[1.])], r#"per feature; "c" is missing"#);
        check(vec![tensor("a", &[1], &[1.])], r#""b", "c" are missing"#);
        check(vec![tensor("a", &[1, 2], &[1., 2.]), tensor("b", &[1], &[1.])], "shape [rows] or [rows, 1]");
        let text = assemble(vec![tensor("a", &[1], &[1.]), tensor("b", &[1], &[1.])], &layout(None, &HashMap::new()));
        assert!(text.unwrap_err().contains("has no feature names"));
    }

    #[test]
    fn long_name_lists_are_cut() {
        let names = ["a", "b", "c", "d", "e", "f", "g"];
        assert_eq!(quoted(&names), r#""a", "b", "c", "d", "e" and 2 more"#);
    }
}
