//! Where a slice's tensors come from: a local GGUF (one file, or every part of a split: see
//! [`crate::gguf`]), or the slice cache a worker filled from the network. Every architecture loads its tensors through [`TensorSource`], checked
//! against the shapes its profile promises.

use candle_core::quantized::GgmlDType;

use crate::error::{EngineError, Result};
use crate::gguf::GgufModel;
use crate::quant::QMatrix;

/// Where a slice's tensors come from: a local GGUF file now, bytes received from the
/// coordinator in the cluster.
pub trait TensorSource {
    /// The tensor's type, its dims as candle reports them (outermost first, e.g.
    /// `[n_out, n_in]`), and its raw bytes in GGUF block format; `None` if absent.
    fn tensor(&mut self, name: &str) -> Result<Option<(GgmlDType, Vec<usize>, Vec<u8>)>>;
}

/// Reads tensors straight out of a model's GGUF, seeking to each one, so a slice reads only
/// its own bytes. A split model's tensors are read from the part that holds each (the
/// offsets [`GgufModel`] gives are absolute in that part's file); every part is opened up
/// front, so a part that cannot be opened fails the load before any tensor is read.
pub struct GgufFileSource<'a> {
    model: &'a GgufModel,
    /// One per part, in [`GgufModel::parts`] order.
    files: Vec<std::fs::File>,
}

impl<'a> GgufFileSource<'a> {
    pub fn new(model: &'a GgufModel) -> Result<Self> {
        let files = model.parts().iter().map(|part| std::fs::File::open(part.path())).collect::<std::io::Result<_>>()?;
        Ok(Self { model, files })
    }
}

impl TensorSource for GgufFileSource<'_> {
    fn tensor(&mut self, name: &str) -> Result<Option<(GgmlDType, Vec<usize>, Vec<u8>)>> {
        use std::io::{Read, Seek, SeekFrom};
        let Some(tensor) = self.model.tensor(name) else {
            return Ok(None);
        };
        let mut bytes = vec![0u8; tensor.bytes() as usize];
        let file = &mut self.files[tensor.part];
        file.seek(SeekFrom::Start(tensor.offset))?;
        file.read_exact(&mut bytes).map_err(|e| {
            let path = self.model.parts()[tensor.part].path();
            EngineError::BadGguf(format!("tensor `{name}` in {} is truncated ({e})", path.display()))
        })?;
        Ok(Some((tensor.dtype, tensor.dims.clone(), bytes)))
    }
}

pub(crate) fn load_matrix(source: &mut dyn TensorSource, name: &str, n_out: usize, n_in: usize) -> Result<QMatrix> {
    let (dtype, dims, bytes) = source.tensor(name)?.ok_or_else(|| EngineError::MissingTensor(name.to_owned()))?;
    if dims != [n_out, n_in] {
        return Err(EngineError::BadTensorShape { name: name.to_owned(), expected: vec![n_out, n_in], actual: dims });
    }
    QMatrix::new(dtype, n_out, n_in, bytes)
}

/// A matrix stored as several stacked by rows (a fused projection: `rows[0]` rows, then
/// `rows[1]`, …), as the separate matrices.
pub(crate) fn load_split_matrix<const N: usize>(
    source: &mut dyn TensorSource,
    name: &str,
    rows: [usize; N],
    n_in: usize,
) -> Result<[QMatrix; N]> {
    let n_out: usize = rows.iter().sum();
    let (dtype, dims, bytes) = source.tensor(name)?.ok_or_else(|| EngineError::MissingTensor(name.to_owned()))?;
    if dims != [n_out, n_in] {
        return Err(EngineError::BadTensorShape { name: name.to_owned(), expected: vec![n_out, n_in], actual: dims });
    }
    let row_bytes = bytes.len() / n_out;
    if row_bytes * n_out != bytes.len() {
        return Err(EngineError::BadQuantizedMatrix {
            dtype: format!("{dtype:?}"),
            n_out,
            n_in,
            reason: format!("{} bytes do not make {n_out} equal rows", bytes.len()),
        });
    }
    let mut parts = Vec::with_capacity(N);
    let mut at = 0;
    for r in rows {
        parts.push(QMatrix::new(dtype, r, n_in, bytes[at..at + r * row_bytes].to_vec())?);
        at += r * row_bytes;
    }
    Ok(parts.try_into().unwrap_or_else(|_| unreachable!("N parts")))
}

/// A 3-D tensor of `count` matrices of `n_out × n_in` (a mixture of experts' `*_exps`: ggml's
/// `ne[2]` is the expert, outermost, so each expert's rows are contiguous), as `count`
/// matrices.
pub(crate) fn load_expert_matrices(
    source: &mut dyn TensorSource,
    name: &str,
    count: usize,
    n_out: usize,
    n_in: usize,
) -> Result<Vec<QMatrix>> {
    let (dtype, dims, bytes) = source.tensor(name)?.ok_or_else(|| EngineError::MissingTensor(name.to_owned()))?;
    if dims != [count, n_out, n_in] {
        return Err(EngineError::BadTensorShape { name: name.to_owned(), expected: vec![count, n_out, n_in], actual: dims });
    }
    let expert_bytes = bytes.len() / count.max(1);
    if expert_bytes * count != bytes.len() {
        return Err(EngineError::BadQuantizedMatrix {
            dtype: format!("{dtype:?}"),
            n_out,
            n_in,
            reason: format!("{} bytes do not make {count} equal experts", bytes.len()),
        });
    }
    bytes.chunks_exact(expert_bytes.max(1)).map(|expert| QMatrix::new(dtype, n_out, n_in, expert.to_vec())).collect()
}

pub(crate) fn load_vector(source: &mut dyn TensorSource, name: &str, len: usize) -> Result<Vec<f32>> {
    let (dtype, dims, bytes) = source.tensor(name)?.ok_or_else(|| EngineError::MissingTensor(name.to_owned()))?;
    if dims.iter().product::<usize>() != len {
        return Err(EngineError::BadTensorShape { name: name.to_owned(), expected: vec![len], actual: dims });
    }
    let matrix = QMatrix::new(dtype, 1, len, bytes)?;
    let mut out = vec![0f32; len];
    matrix.dequantize_row(0, &mut out);
    Ok(out)
}

