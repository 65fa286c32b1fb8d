//! Hugging Face model directories: memory-mapped safetensors (one file or shards listed in
//! model.safetensors.index.json), f32/bf16/f16 converted to float32.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use super::{check_shape, WeightSource};
use crate::error::{EngineError, Result};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Where tensor data starts in the file (after the length prefix and JSON header).
    data_start: usize,
    metadata: Metadata,
}

pub struct SafetensorsWeights {
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    index: HashMap<String, usize>,
}

impl SafetensorsWeights {
    pub fn open(dir: &Path) -> Result<Self> {
        let mut shards = Vec::new();
        for path in shard_paths(dir)? {
            shards.push(open_shard(path)?);
        }
        let mut index = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.metadata.tensors().into_keys() {
                index.insert(name, i);
            }
        }
        Ok(SafetensorsWeights { shards, index })
    }
}

fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        let text = std::fs::read_to_string(&index_path)
            .map_err(|e| EngineError::validation(format!("cannot read {}: {e}", index_path.display())))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::validation(format!("{} is not valid JSON: {e}", index_path.display())))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| EngineError::validation(format!("{} has no weight_map", index_path.display())))?;
        let mut files: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        files.sort_unstable();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(EngineError::not_found(format!(
        "{} holds neither model.safetensors nor model.safetensors.index.json",
        dir.display()
    )))
}

fn open_shard(path: PathBuf) -> Result<Shard> {
    let file = File::open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            EngineError::not_found(format!("weights file {} does not exist", path.display()))
        }
        _ => EngineError::validation(format!("cannot open {}: {e}", path.display())),
    })?;
    // SAFETY: the map is read-only and lives as long as the shard; model files are not
    // expected to change under a running engine (the same assumption every mmap loader makes).
    let mmap = unsafe { Mmap::map(&file) }
        .map_err(|e| EngineError::validation(format!("cannot map {}: {e}", path.display())))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
        EngineError::validation(format!(
            "{} is not a valid safetensors file (corrupt or truncated?): {e}",
            path.display()
        ))
    })?;
    Ok(Shard {
        path,
        mmap,
        data_start: 8 + header_len,
        metadata,
    })
}

/// Little-endian bytes of `dtype` to f32 values.
fn to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    };
    Some(out)
}

impl WeightSource for SafetensorsWeights {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let shard = self
            .index
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| EngineError::validation(format!("the model's safetensors lack tensor {name}")))?;
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| EngineError::internal(format!("tensor {name} vanished from its shard index")))?;
        let (start, end) = info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + start..shard.data_start + end];
        let values = to_f32(bytes, info.dtype).ok_or_else(|| {
            EngineError::unsupported(format!(
                "{}: tensor {name} has dtype {:?}; only F32, BF16 and F16 are supported",
                shard.path.display(),
                info.dtype
            ))
        })?;
        let t = Tensor::from_vec(values, info.shape.clone(), &Device::Cpu)?;
        check_shape(t, name, shape, &shard.path)
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}
