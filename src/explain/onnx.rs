//! The parts of an ONNX file the exact explainers read: the graph's nodes with their attributes,
//! and its constant tensors. A subset of `onnx.proto` decoded with prost; the fields it does not
//! name are skipped.

use std::collections::HashMap;

#[derive(Clone, PartialEq, prost::Message)]
struct ModelProto {
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<Node>,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<Tensor>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<ValueInfo>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ValueInfo {
    #[prost(string, tag = "1")]
    name: String,
}

/// One operator of the graph.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Node {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<Attribute>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Attribute {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(float, tag = "2")]
    f: f32,
    #[prost(int64, tag = "3")]
    i: i64,
    #[prost(bytes = "vec", tag = "4")]
    s: Vec<u8>,
    #[prost(message, optional, tag = "5")]
    t: Option<Tensor>,
    #[prost(float, repeated, tag = "7")]
    floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    ints: Vec<i64>,
    #[prost(bytes = "vec", repeated, tag = "9")]
    strings: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Tensor {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(float, repeated, tag = "4")]
    float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    int32_data: Vec<i32>,
    #[prost(int64, repeated, tag = "7")]
    int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    name: String,
    #[prost(bytes = "vec", tag = "9")]
    raw_data: Vec<u8>,
    #[prost(double, repeated, tag = "10")]
    double_data: Vec<f64>,
}

// onnx.TensorProto.DataType values the explainers read.
const FLOAT: i32 = 1;
const INT32: i32 = 6;
const INT64: i32 = 7;
const DOUBLE: i32 = 11;

impl Tensor {
    /// The values as f64, or `None` for a type the explainers do not read (or data stored
    /// outside the file).
    fn values(&self) -> Option<Vec<f64>> {
        let raw = |width: usize, read: fn(&[u8]) -> f64| self.raw_data.chunks_exact(width).map(read).collect();
        let from_raw = !self.raw_data.is_empty();
        Some(match self.data_type {
            FLOAT if from_raw => raw(4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
            FLOAT => self.float_data.iter().map(|&v| v as f64).collect(),
            DOUBLE if from_raw => raw(8, |b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
            DOUBLE => self.double_data.clone(),
            INT64 if from_raw => {
                raw(8, |b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64)
            }
            INT64 => self.int64_data.iter().map(|&v| v as f64).collect(),
            INT32 if from_raw => raw(4, |b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
            INT32 => self.int32_data.iter().map(|&v| v as f64).collect(),
            _ => return None,
        })
    }

    fn constant(&self) -> Option<Constant> {
        let dims = self.dims.iter().map(|&d| usize::try_from(d).ok()).collect::<Option<Vec<_>>>()?;
        let values = self.values()?;
        (values.len() == dims.iter().product::<usize>()).then_some(Constant { dims, values })
    }
}

/// A constant tensor: an initializer or a `Constant` node's value.
#[derive(Debug, Clone, PartialEq)]
pub struct Constant {
    pub dims: Vec<usize>,
    pub values: Vec<f64>,
}

impl Node {
    fn attribute(&self, name: &str) -> Option<&Attribute> {
        self.attribute.iter().find(|a| a.name == name)
    }

    pub fn int(&self, name: &str) -> Option<i64> {
        self.attribute(name).map(|a| a.i)
    }

    pub fn float(&self, name: &str) -> Option<f64> {
        self.attribute(name).map(|a| a.f as f64)
    }

    pub fn text(&self, name: &str) -> Option<String> {
        self.attribute(name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }

    /// A list of floats, from `name` or from its double-precision tensor form `name_as_tensor`.
    pub fn floats(&self, name: &str) -> Vec<f64> {
        match self.attribute(name) {
            Some(a) if !a.floats.is_empty() => a.floats.iter().map(|&v| v as f64).collect(),
            _ => self
                .attribute(&format!("{name}_as_tensor"))
                .and_then(|a| a.t.as_ref())
                .and_then(Tensor::values)
                .unwrap_or_default(),
        }
    }

    pub fn ints(&self, name: &str) -> Vec<i64> {
        self.attribute(name).map(|a| a.ints.clone()).unwrap_or_default()
    }

    pub fn texts(&self, name: &str) -> Vec<String> {
        self.attribute(name)
            .map(|a| a.strings.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect())
            .unwrap_or_default()
    }
}

/// A decoded graph: its operators in file order (topological, as ONNX requires), its constants
/// by name, and the name of its one input that is not a constant.
pub struct Graph {
    pub nodes: Vec<Node>,
    pub constants: HashMap<String, Constant>,
    pub input: String,
}

impl Graph {
    pub fn parse(bytes: &[u8]) -> Result<Graph, String> {
        let model = <ModelProto as prost::Message>::decode(bytes).map_err(|e| format!("not an ONNX model: {e}"))?;
        let graph = model.graph.ok_or("the ONNX model has no graph")?;
        let mut constants: HashMap<String, Constant> =
            graph.initializer.iter().filter_map(|t| Some((t.name.clone(), t.constant()?))).collect();
        for node in graph.node.iter().filter(|n| n.op_type == "Constant") {
            let value = node.attribute("value").and_then(|a| a.t.as_ref()).and_then(Tensor::constant);
            if let (Some(value), Some(name)) = (value, node.output.first()) {
                constants.insert(name.clone(), value);
            }
        }
        let inputs: Vec<&ValueInfo> = graph.input.iter().filter(|i| !constants.contains_key(&i.name)).collect();
        let [input] = inputs[..] else {
            return Err(format!("the graph has {} inputs; the explainers read graphs of one", inputs.len()));
        };
        Ok(Graph { input: input.name.clone(), nodes: graph.node, constants })
    }

    /// The node that writes `tensor`, and which of its outputs it is.
    pub fn producer(&self, tensor: &str) -> Option<(&Node, usize)> {
        self.nodes.iter().find_map(|n| n.output.iter().position(|o| o == tensor).map(|i| (n, i)))
    }
}
