//! GGUF files (llama.cpp): metadata and tensors, dequantized to float32 and renamed and
//! re-laid-out to Hugging Face conventions.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::{check_shape, WeightSource};
use crate::error::{EngineError, Result};

pub struct GgufWeights {
    path: PathBuf,
    reader: BufReader<File>,
    file_len: u64,
    content: gguf_file::Content,
    /// llama.cpp stores Llama's q/k rows interleaved for its rotary; undo it for HF's.
    unpermute_qk: bool,
    num_heads: usize,
    num_kv_heads: usize,
    /// Hand out quantized matrices as GGML blocks (`quantization: "gguf"`).
    keep_quantized: bool,
}

impl GgufWeights {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                EngineError::not_found(format!("model file {} does not exist", path.display()))
            }
            _ => EngineError::validation(format!("cannot open model file {}: {e}", path.display())),
        })?;
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut reader = BufReader::new(file);
        super::gguf_header::check(&mut reader, file_len)
            .map_err(|e| EngineError::validation(format!("{} is not a valid GGUF file: {e}", path.display())))?;
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| EngineError::validation(format!("cannot read {}: {e}", path.display())))?;
        // candle's parser trusts the lengths it reads; a corrupt file must not take us down.
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gguf_file::Content::read(&mut reader)));
        let content = match parsed {
            Ok(Ok(content)) => content,
            Ok(Err(e)) => {
                return Err(EngineError::validation(format!(
                    "{} is not a readable GGUF file (corrupt or truncated?): {e}",
                    path.display()
                )))
            }
            Err(_) => {
                return Err(EngineError::validation(format!(
                    "{} is not a readable GGUF file",
                    path.display()
                )))
            }
        };
        let arch = match content.metadata.get("general.architecture") {
            Some(gguf_file::Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let count = |key: &str| match content.metadata.get(&format!("{arch}.{key}")) {
            Some(v) => v.to_u32().map(|x| x as usize).unwrap_or(0),
            None => 0,
        };
        let num_heads = count("attention.head_count");
        let num_kv_heads = match count("attention.head_count_kv") {
            0 => num_heads,
            n => n,
        };
        Ok(GgufWeights {
            path: path.to_path_buf(),
            reader,
            file_len,
            // llama.cpp permutes for its NORM rotary (Llama, Mistral), not for NEOX (Qwen).
            unpermute_qk: matches!(arch.as_str(), "llama" | "mistral"),
            num_heads,
            num_kv_heads,
            content,
            keep_quantized: false,
        })
    }

    pub fn content(&self) -> &gguf_file::Content {
        &self.content
    }

    /// true: `quantized()` returns quantized matrices as they are stored.
    pub fn keep_quantized(&mut self, keep: bool) {
        self.keep_quantized = keep;
    }

    fn read_f32(&mut self, gguf_name: &str) -> Result<Tensor> {
        let qtensor = self.read_qtensor(gguf_name)?;
        qtensor.dequantize(&Device::Cpu).map_err(|e| {
            EngineError::unsupported(format!(
                "{}: cannot dequantize tensor {gguf_name} ({:?}): {e}",
                self.path.display(),
                qtensor.dtype()
            ))
        })
    }

    fn read_qtensor(&mut self, gguf_name: &str) -> Result<QTensor> {
        let info = self.content.tensor_infos.get(gguf_name).ok_or_else(|| {
            EngineError::validation(format!("{}: tensor {gguf_name} is missing", self.path.display()))
        })?;
        let elems = info.shape.elem_count() as u64;
        let bytes = elems / info.ggml_dtype.block_size() as u64 * info.ggml_dtype.type_size() as u64;
        let end = self
            .content
            .tensor_data_offset
            .saturating_add(info.offset)
            .saturating_add(bytes);
        if end > self.file_len {
            return Err(EngineError::validation(format!(
                "{}: tensor {gguf_name} ends at byte {end} but the file has {} (truncated?)",
                self.path.display(),
                self.file_len
            )));
        }
        info.read(&mut self.reader, self.content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| {
                EngineError::validation(format!("{}: cannot read tensor {gguf_name}: {e}", self.path.display()))
            })
    }
}

/// Maps an HF tensor name to llama.cpp's.
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

/// Inverse of llama.cpp's q/k permutation: within each head, rows were ordered as
/// interleaved (re, im) pairs; HF keeps the two halves apart.
fn unpermute(w: Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    if heads == 0 || !out.is_multiple_of(2 * heads) {
        return Err(EngineError::validation(format!(
            "cannot split {out} rows into {heads} rotary heads"
        )));
    }
    let rest: usize = dims[1..].iter().product();
    let t = w
        .reshape((heads, out / heads / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(t)
}

/// The source row of each HF-layout row under llama.cpp's q/k permutation (see `unpermute`).
fn unpermuted_row_order(rows: usize, heads: usize) -> Result<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(EngineError::validation(format!(
            "cannot split {rows} rows into {heads} rotary heads"
        )));
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    Ok((0..rows)
        .map(|r| {
            let (h, i) = (r / head_dim, r % head_dim);
            // HF row (half-index `i / half`, pair `i % half`) was stored at 2 * pair + half-index.
            h * head_dim + 2 * (i % half) + i / half
        })
        .collect())
}

/// Reorders whole rows of a quantized [rows, cols] matrix (each row is whole GGML blocks).
fn gather_rows(q: &QTensor, order: &[usize]) -> Result<QTensor> {
    let dims = q.shape().dims().to_vec();
    let data = q.data()?;
    let row_bytes = data.len() / dims[0];
    let mut out = Vec::with_capacity(data.len());
    for &r in order {
        out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
        q.dtype(),
        &out,
        dims,
        &Device::Cpu,
    )?)
}

impl WeightSource for GgufWeights {
    fn quantized(&mut self, name: &str, shape: &[usize]) -> Result<Option<QTensor>> {
        if !self.keep_quantized {
            return Ok(None);
        }
        let Some(gguf) = gguf_name(name) else { return Ok(None) };
        let Some(info) = self.content.tensor_infos.get(&gguf) else {
            return Ok(None);
        };
        // Rows must be whole blocks to be gathered and multiplied row by row (a 256-wide
        // K-quant over 576 columns is not): such tensors are dequantized instead.
        let dims = info.shape.dims();
        if matches!(info.ggml_dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
            || dims.len() != 2
            || !dims[1].is_multiple_of(info.ggml_dtype.block_size())
        {
            return Ok(None);
        }
        let mut q = self.read_qtensor(&gguf)?;
        if q.shape().dims() != shape {
            return Err(EngineError::validation(format!(
                "{}: tensor {name} has shape {:?}, the config implies {:?}",
                self.path.display(),
                q.shape().dims(),
                shape
            )));
        }
        if self.unpermute_qk {
            let heads = if gguf.contains(".attn_q.") {
                Some(self.num_heads)
            } else if gguf.contains(".attn_k.") {
                Some(self.num_kv_heads)
            } else {
                None
            };
            if let Some(heads) = heads {
                q = gather_rows(&q, &unpermuted_row_order(shape[0], heads)?)?;
            }
        }
        Ok(Some(q))
    }

    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let gguf = gguf_name(name).ok_or_else(|| EngineError::internal(format!("no GGUF name for tensor {name}")))?;
        let mut t = self.read_f32(&gguf)?;
        if self.unpermute_qk {
            if gguf.contains(".attn_q.") {
                t = unpermute(t, self.num_heads)?;
            } else if gguf.contains(".attn_k.") {
                t = unpermute(t, self.num_kv_heads)?;
            }
        }
        check_shape(t, name, shape, &self.path)
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }
}
