//! Where a slice's tensors come from: a local GGUF file, or the slice cache a worker filled
//! from the network. Every architecture loads its tensors through [`TensorSource`], checked
//! against the shapes its profile promises.

use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;

use crate::error::{EngineError, Result};
use crate::profile::tensor_size_in_bytes;
use crate::quant::QMatrix;

/// Where a slice's tensors come from: a local GGUF file now, bytes received from the
/// coordinator in the cluster.
pub trait TensorSource {
    /// The tensor's type, its dims as candle reports them (outermost first, e.g.
    /// `[n_out, n_in]`), and its raw bytes in GGUF block format; `None` if absent.
    fn tensor(&mut self, name: &str) -> Result<Option<(GgmlDType, Vec<usize>, Vec<u8>)>>;
}

/// Reads tensors straight out of a GGUF file, seeking to each one, so a slice reads only
/// its own bytes.
pub struct GgufFileSource<'a> {
    content: &'a Content,
    file: std::fs::File,
}

impl<'a> GgufFileSource<'a> {
    pub fn new(content: &'a Content, path: &Path) -> Result<Self> {
        Ok(Self { content, file: std::fs::File::open(path)? })
    }
}

impl TensorSource for GgufFileSource<'_> {
    fn tensor(&mut self, name: &str) -> Result<Option<(GgmlDType, Vec<usize>, Vec<u8>)>> {
        use std::io::{Read, Seek, SeekFrom};
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Ok(None);
        };
        let size = tensor_size_in_bytes(info.ggml_dtype, info.shape.elem_count());
        let mut bytes = vec![0u8; size as usize];
        self.file
            .seek(SeekFrom::Start(self.content.tensor_data_offset + info.offset))?;
        self.file.read_exact(&mut bytes).map_err(|e| {
            EngineError::BadGguf(format!("tensor `{name}` is truncated ({e})"))
        })?;
        Ok(Some((info.ggml_dtype, info.shape.dims().to_vec(), bytes)))
    }
}

pub(crate) fn load_matrix(source: &mut dyn TensorSource, name: &str, n_out: usize, n_in: usize) -> Result<QMatrix> {
    let (dtype, dims, bytes) = source.tensor(name)?.ok_or_else(|| EngineError::MissingTensor(name.to_owned()))?;
    if dims != [n_out, n_in] {
        return Err(EngineError::BadTensorShape { name: name.to_owned(), expected: vec![n_out, n_in], actual: dims });
    }
    QMatrix::new(dtype, n_out, n_in, bytes)
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

