//! Model outputs as typed columns: one entry (scalar, array or class→score map) per batch row.
//! Columns are sliced per job and serialised straight into result JSON without per-row copies.

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// What an output holds per row, read from the model's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputKind {
    /// A tensor `[batch, d1, d2, …]`: `row_shape` is `[d1, d2, …]` (empty for one scalar per row).
    Tensor { element: Element, row_shape: Vec<usize> },
    /// A sequence of maps (scikit-learn's ZipMap): one `{class: score}` per row.
    MapSequence { key: MapKeyType },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    F32,
    F64,
    I64,
    I32,
    Bool,
    Str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKeyType {
    I64,
    Str,
}

/// Values of one output for every row of a batch (or of one job).
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    Maps(Vec<MapRow>),
}

/// One ZipMap row, keys in the model's order.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum MapRow {
    #[default]
    Empty,
    I64(Vec<(i64, f32)>),
    Str(Vec<(String, f32)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    /// Scalars per row (product of `row_shape`); 1 for maps.
    pub row_len: usize,
    pub row_shape: Vec<usize>,
    pub data: ColumnData,
}

impl Column {
    pub fn rows(&self) -> usize {
        let values = match &self.data {
            ColumnData::F32(v) => v.len(),
            ColumnData::F64(v) => v.len(),
            ColumnData::I64(v) => v.len(),
            ColumnData::I32(v) => v.len(),
            ColumnData::Bool(v) => v.len(),
            ColumnData::Str(v) => v.len(),
            ColumnData::Maps(v) => v.len(),
        };
        values / self.row_len.max(1)
    }

    /// Row `row`'s numbers (a map row's scores in class order); empty for strings and booleans.
    pub fn numbers(&self, row: usize) -> Vec<f64> {
        let (from, to) = (row * self.row_len, (row + 1) * self.row_len);
        match &self.data {
            ColumnData::F32(v) => v[from..to].iter().map(|&x| x as f64).collect(),
            ColumnData::F64(v) => v[from..to].to_vec(),
            ColumnData::I64(v) => v[from..to].iter().map(|&x| x as f64).collect(),
            ColumnData::I32(v) => v[from..to].iter().map(|&x| x as f64).collect(),
            ColumnData::Bool(_) | ColumnData::Str(_) => Vec::new(),
            ColumnData::Maps(v) => match &v[row] {
                MapRow::Empty => Vec::new(),
                MapRow::I64(scores) => scores.iter().map(|&(_, p)| p as f64).collect(),
                MapRow::Str(scores) => scores.iter().map(|&(_, p)| p as f64).collect(),
            },
        }
    }

    /// Zeros (empty maps, empty strings) for `rows` rows of an output of `kind`; open dimensions
    /// count as 1. What the no-op engine answers.
    pub fn zeros(name: &str, kind: &OutputKind, rows: usize) -> Column {
        let (row_shape, data) = match kind {
            OutputKind::Tensor { element, row_shape } => {
                let row_shape: Vec<usize> = row_shape.iter().map(|&d| d.max(1)).collect();
                let n = rows * row_shape.iter().product::<usize>();
                let data = match element {
                    Element::F32 => ColumnData::F32(vec![0.0; n]),
                    Element::F64 => ColumnData::F64(vec![0.0; n]),
                    Element::I64 => ColumnData::I64(vec![0; n]),
                    Element::I32 => ColumnData::I32(vec![0; n]),
                    Element::Bool => ColumnData::Bool(vec![false; n]),
                    Element::Str => ColumnData::Str(vec![String::new(); n]),
                };
                (row_shape, data)
            }
            OutputKind::MapSequence { .. } => (Vec::new(), ColumnData::Maps(vec![MapRow::Empty; rows])),
        };
        Column { name: name.to_string(), row_len: row_shape.iter().product::<usize>().max(1), row_shape, data }
    }

    /// An empty column of `rows` rows, shaped like `self`, for reassembling a split job.
    pub fn empty_like(&self, rows: usize) -> Column {
        let n = rows * self.row_len;
        let data = match &self.data {
            ColumnData::F32(_) => ColumnData::F32(vec![0.0; n]),
            ColumnData::F64(_) => ColumnData::F64(vec![0.0; n]),
            ColumnData::I64(_) => ColumnData::I64(vec![0; n]),
            ColumnData::I32(_) => ColumnData::I32(vec![0; n]),
            ColumnData::Bool(_) => ColumnData::Bool(vec![false; n]),
            ColumnData::Str(_) => ColumnData::Str(vec![String::new(); n]),
            ColumnData::Maps(_) => ColumnData::Maps(vec![MapRow::Empty; rows]),
        };
        Column { name: self.name.clone(), row_len: self.row_len, row_shape: self.row_shape.clone(), data }
    }

    /// Copies `rows` rows starting at `from` in `source` to row `to` of `self` (same output).
    pub fn copy_rows(&mut self, to: usize, source: &Column, from: usize, rows: usize) {
        let (a, b, n) = (to * self.row_len, from * self.row_len, rows * self.row_len);
        match (&mut self.data, &source.data) {
            (ColumnData::F32(d), ColumnData::F32(s)) => d[a..a + n].copy_from_slice(&s[b..b + n]),
            (ColumnData::F64(d), ColumnData::F64(s)) => d[a..a + n].copy_from_slice(&s[b..b + n]),
            (ColumnData::I64(d), ColumnData::I64(s)) => d[a..a + n].copy_from_slice(&s[b..b + n]),
            (ColumnData::I32(d), ColumnData::I32(s)) => d[a..a + n].copy_from_slice(&s[b..b + n]),
            (ColumnData::Bool(d), ColumnData::Bool(s)) => d[a..a + n].copy_from_slice(&s[b..b + n]),
            (ColumnData::Str(d), ColumnData::Str(s)) => d[a..a + n].clone_from_slice(&s[b..b + n]),
            (ColumnData::Maps(d), ColumnData::Maps(s)) => d[to..to + rows].clone_from_slice(&s[from..from + rows]),
            // Invariant: both columns come from the same model output, so their kinds match.
            _ => unreachable!("column {} changed type between batches", self.name),
        }
    }

    /// A serialisable view of rows `start..start + rows`: a JSON array with one entry per row.
    pub fn view(&self, start: usize, rows: usize) -> ColumnView<'_> {
        ColumnView { column: self, start, rows }
    }
}

pub struct ColumnView<'a> {
    column: &'a Column,
    start: usize,
    rows: usize,
}

impl Serialize for ColumnView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let column = self.column;
        let mut seq = serializer.serialize_seq(Some(self.rows))?;
        for row in self.start..self.start + self.rows {
            let at = row * column.row_len;
            match &column.data {
                ColumnData::F32(v) => seq.serialize_element(&Nested(&column.row_shape, &v[at..at + column.row_len]))?,
                ColumnData::F64(v) => seq.serialize_element(&Nested(&column.row_shape, &v[at..at + column.row_len]))?,
                ColumnData::I64(v) => seq.serialize_element(&Nested(&column.row_shape, &v[at..at + column.row_len]))?,
                ColumnData::I32(v) => seq.serialize_element(&Nested(&column.row_shape, &v[at..at + column.row_len]))?,
                ColumnData::Bool(v) => {
                    seq.serialize_element(&Nested(&column.row_shape, &v[at..at + column.row_len]))?
                }
                ColumnData::Str(v) => seq.serialize_element(&Nested(&column.row_shape, &v[at..at + column.row_len]))?,
                ColumnData::Maps(v) => seq.serialize_element(&v[row])?,
            }
        }
        seq.end()
    }
}

/// One row's values laid out by `shape`: a scalar for `[]`, nested arrays otherwise.
struct Nested<'a, T>(&'a [usize], &'a [T]);

impl<T: Serialize> Serialize for Nested<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Nested(shape, values) = *self;
        match shape.split_first() {
            None => values[0].serialize(serializer),
            Some((&outer, inner)) => {
                let stride = inner.iter().product::<usize>();
                let mut seq = serializer.serialize_seq(Some(outer))?;
                for chunk in values.chunks(stride.max(1)).take(outer) {
                    seq.serialize_element(&Nested(inner, chunk))?;
                }
                seq.end()
            }
        }
    }
}

impl Serialize for MapRow {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            MapRow::Empty => serializer.serialize_map(Some(0))?.end(),
            MapRow::I64(pairs) => {
                let mut map = serializer.serialize_map(Some(pairs.len()))?;
                for (k, v) in pairs {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
            MapRow::Str(pairs) => {
                let mut map = serializer.serialize_map(Some(pairs.len()))?;
                for (k, v) in pairs {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(row_shape: Vec<usize>, data: ColumnData) -> Column {
        let row_len = row_shape.iter().product::<usize>().max(1);
        Column { name: "c".into(), row_len, row_shape, data }
    }

    #[test]
    fn scalar_rows_encode_as_values_and_matrices_as_arrays() {
        let labels = column(vec![], ColumnData::I64(vec![0, 1, 1]));
        assert_eq!(serde_json::to_string(&labels.view(1, 2)).unwrap(), "[1,1]");
        let probs = column(vec![2], ColumnData::F32(vec![0.25, 0.75, 0.5, 0.5]));
        assert_eq!(serde_json::to_string(&probs.view(0, 2)).unwrap(), "[[0.25,0.75],[0.5,0.5]]");
        let cube = column(vec![2, 2], ColumnData::I32(vec![1, 2, 3, 4]));
        assert_eq!(serde_json::to_string(&cube.view(0, 1)).unwrap(), "[[[1,2],[3,4]]]");
    }

    #[test]
    fn maps_encode_with_string_keys_and_non_finite_as_null() {
        let maps = column(vec![], ColumnData::Maps(vec![MapRow::I64(vec![(0, 0.25), (1, f32::NAN)])]));
        assert_eq!(serde_json::to_string(&maps.view(0, 1)).unwrap(), r#"[{"0":0.25,"1":null}]"#);
    }

    #[test]
    fn copy_rows_reassembles_split_jobs() {
        let part = column(vec![2], ColumnData::F32(vec![1.0, 2.0, 3.0, 4.0]));
        let mut whole = part.empty_like(3);
        whole.copy_rows(1, &part, 0, 2);
        assert_eq!(whole.data, ColumnData::F32(vec![0.0, 0.0, 1.0, 2.0, 3.0, 4.0]));
        assert_eq!(whole.rows(), 3);
    }
}
