//! Multi-LoRA on the GPU: the resident adapter slots on the device and the launcher of
//! kernels/lora.cu (one launch per fused projection over a whole batch, each row on its own
//! slot: the shrink and the expand of a row in one block).
//!
//! The engine core decides which adapter sits in which slot (lora/slots.rs, LRU with pins)
//! and hands each change to the model; here a slot change uploads the adapter's pairs in
//! the model dtype and rewrites the device table of (A, Bt, rank) per (layer, target, slot)
//! that the kernels read. Host memory keeps every adapter (the registry): a slot swap is a
//! fresh upload, an eviction frees the device copy.
//!
//! CUDA graphs: with LoRA enabled, the decode graphs are captured twice (graphs.rs): once
//! plain, once with these kernels after every projection, reading each row's slot from a
//! fixed buffer (`upload_graph_rows` before the launch) and each slot's weights through the
//! fixed table, so a slot swap never invalidates a graph. A decode step with any LoRA row
//! replays the second set, a base-only step the first (it pays nothing for LoRA); prefill
//! and mixed steps run eagerly (`apply`), as without LoRA.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    result as driver, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::{DType, Device, Tensor};

use super::device_ptr;
use crate::error::{EngineError, Result};
use crate::lora::{LoraAdapter, LoraTarget};
use crate::models::ForwardBatch;

/// Must match LORA_THREADS and LORA_RANK_TILE in lora.cu.
const THREADS: u32 = 256;
const RANK_TILE: usize = 16;
const TARGETS: usize = 7;

/// An adapter's rank on the device: padded with zero rows of A and Bt to a multiple of the
/// kernel's rank tile, so the kernel's rank loops need no per-rank guard.
pub fn device_rank(rank: usize) -> usize {
    rank.div_ceil(RANK_TILE) * RANK_TILE
}

/// The parts of one fused projection (lora.cu's LoraParts), passed by value.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LoraParts {
    target: [i32; 3],
    offset: [i32; 3],
    out_features: [i32; 3],
}

// SAFETY: plain #[repr(C)] integers, laid out as lora.cu's struct.
unsafe impl DeviceRepr for LoraParts {}

/// One part of a fused projection: (target, column offset in the output, width).
pub type Part = (LoraTarget, usize, usize);

/// Where each target's columns sit in the decoder's fused projection outputs.
pub struct FusedParts {
    pub qkv: [Part; 3],
    pub o: [Part; 1],
    pub gate_up: [Part; 2],
    pub down: [Part; 1],
}

impl FusedParts {
    pub fn new(hidden: usize, q_width: usize, kv_width: usize, intermediate: usize) -> Self {
        let (q, kv, i) = (q_width, kv_width, intermediate);
        FusedParts {
            qkv: [
                (LoraTarget::Q, 0, q),
                (LoraTarget::K, q, kv),
                (LoraTarget::V, q + kv, kv),
            ],
            o: [(LoraTarget::O, 0, hidden)],
            gate_up: [(LoraTarget::Gate, 0, i), (LoraTarget::Up, i, i)],
            down: [(LoraTarget::Down, 0, hidden)],
        }
    }
}

/// One adapter's pairs on the device, and its table entries per (layer, target).
struct ResidentAdapter {
    /// Keeps the device copies alive: A and Bt of every pair.
    _tensors: Vec<Tensor>,
    /// (A address, Bt address, rank) per layer * 7 + target; rank 0 where absent.
    entries: Vec<[u64; 3]>,
    max_rank: usize,
}

/// The fixed buffers the captured decode graphs read.
struct GraphBuffers {
    /// u32 [max_rows]: each row's slot (u32::MAX: base model).
    rows: Tensor,
    max_rows: usize,
}

pub struct DeviceLora {
    device: Device,
    dtype: DType,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    /// lora_apply per dtype (f32, bf16, f16).
    kernels: [CudaFunction; 3],
    num_layers: usize,
    slots: Vec<Option<ResidentAdapter>>,
    /// u64 [layers, 7, slots, 3] as u32 pairs, written in place on every slot change (its
    /// address is baked into the captured graphs).
    table: Tensor,
    /// max_lora_rank: sizes the kernel's shared memory.
    max_rank: usize,
    graph: Option<GraphBuffers>,
    /// `VLLM_LORA_NOOP=1` (a measurement knob): every launch sees no slots, so its blocks
    /// return at once; what is left of the LoRA cost is the launches themselves.
    noop: bool,
}

fn dtype_index(dtype: DType) -> Result<usize> {
    match dtype {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        other => Err(EngineError::internal(format!("no LoRA kernels for {other:?}"))),
    }
}

fn launch_err(name: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::internal(format!("CUDA kernel {name} failed to launch: {e}"))
}

impl DeviceLora {
    /// `num_slots` adapters of rank up to `max_rank` for a model of `num_layers` layers.
    pub fn new(device: &Device, dtype: DType, num_layers: usize, num_slots: usize, max_rank: usize) -> Result<Self> {
        dtype_index(dtype)?;
        let stream = device.as_cuda_device()?.cuda_stream();
        let context = stream.context().clone();
        let module = super::load_embedded(&context, super::embedded::LORA_CUBIN, super::embedded::LORA_PTX)
            .map_err(|e| EngineError::internal(format!("cannot load the LoRA kernels: {e}")))?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| EngineError::internal(format!("kernel {name} is missing: {e}")))
        };
        let num_slots = num_slots.max(1);
        Ok(DeviceLora {
            device: device.clone(),
            dtype,
            kernels: [
                load("lora_apply_f32")?,
                load("lora_apply_bf16")?,
                load("lora_apply_f16")?,
            ],
            stream,
            _module: module,
            num_layers,
            slots: (0..num_slots).map(|_| None).collect(),
            table: Tensor::zeros(num_layers * TARGETS * num_slots * 6, DType::U32, device)?,
            max_rank: max_rank.max(1),
            graph: None,
            noop: std::env::var_os("VLLM_LORA_NOOP").is_some(),
        })
    }

    pub fn num_slots(&self) -> usize {
        self.slots.len()
    }

    /// Puts `adapter` into `slot` (None frees it) and rewrites the device table.
    pub fn set_slot(&mut self, slot: usize, adapter: Option<&LoraAdapter>) -> Result<()> {
        if slot >= self.slots.len() {
            return Err(EngineError::internal(format!(
                "LoRA slot {slot} is beyond the {} slots on the device",
                self.slots.len()
            )));
        }
        if let Some(a) = adapter {
            if a.rank > self.max_rank {
                return Err(EngineError::internal(format!(
                    "LoRA rank {} is above the device's max_lora_rank {}",
                    a.rank, self.max_rank
                )));
            }
        }
        // Free first: a swap then never holds two adapters' copies in one slot.
        self.slots[slot] = None;
        if let Some(a) = adapter {
            self.slots[slot] = Some(self.upload(a)?);
        }
        self.write_table()
    }

    fn upload(&self, adapter: &LoraAdapter) -> Result<ResidentAdapter> {
        let mut tensors = Vec::new();
        let mut entries = vec![[0u64; 3]; self.num_layers * TARGETS];
        let mut max_rank = 0;
        for layer in 0..self.num_layers {
            for (t, target) in LoraTarget::ALL.into_iter().enumerate() {
                let Some(pair) = adapter.pair(layer, target) else {
                    continue;
                };
                let rank = device_rank(pair.rank);
                // [pair.rank, cols] padded with zero rows to [rank, cols].
                let to_device = |v: &[f32], cols: usize| -> Result<Tensor> {
                    let mut padded = v.to_vec();
                    padded.resize(rank * cols, 0.0);
                    Ok(Tensor::from_vec(padded, (rank, cols), &self.device)?
                        .to_dtype(self.dtype)?
                        .contiguous()?)
                };
                let a = to_device(&pair.a, pair.in_features)?;
                let bt = to_device(&pair.b_t, pair.out_features)?;
                entries[layer * TARGETS + t] = [device_ptr(&a)?, device_ptr(&bt)?, rank as u64];
                max_rank = max_rank.max(pair.rank);
                tensors.push(a);
                tensors.push(bt);
            }
        }
        Ok(ResidentAdapter {
            _tensors: tensors,
            entries,
            max_rank,
        })
    }

    /// Rewrites the whole table in place (a few KiB; only on slot changes).
    fn write_table(&mut self) -> Result<()> {
        let num_slots = self.slots.len();
        let mut host = vec![0u32; self.num_layers * TARGETS * num_slots * 6];
        for (slot, resident) in self.slots.iter().enumerate() {
            let Some(r) = resident else { continue };
            debug_assert!(r.max_rank <= self.max_rank);
            for (lt, entry) in r.entries.iter().enumerate() {
                let at = (lt * num_slots + slot) * 6;
                for (k, &v) in entry.iter().enumerate() {
                    host[at + 2 * k] = v as u32;
                    host[at + 2 * k + 1] = (v >> 32) as u32;
                }
            }
        }
        self.copy_to(&self.table, &host, "LoRA table upload")
    }

    /// Copies `host` into the start of `dst` on the stream (ordered with every launch).
    fn copy_to(&self, dst: &Tensor, host: &[u32], what: &str) -> Result<()> {
        if host.len() > dst.elem_count() {
            return Err(EngineError::internal(format!("{what}: buffer too small")));
        }
        let dst = device_ptr(dst)?;
        let err = |e: &dyn std::fmt::Display| EngineError::internal(format!("{what}: {e}"));
        self.stream.context().bind_to_thread().map_err(|e| err(&e))?;
        // SAFETY: `dst` holds at least host.len() u32; from pageable memory the call returns
        // once the host slice is staged, so it may be dropped afterwards.
        unsafe { driver::memcpy_htod_async(dst, host, self.stream.cu_stream()) }.map_err(|e| err(&e))
    }

    /// Each token's slot (u32; u32::MAX: the base model), or None when no sequence of the
    /// batch has an adapter.
    fn host_rows(&self, batch: &ForwardBatch, len: usize) -> Result<Option<Vec<u32>>> {
        if batch.seqs.iter().all(|s| s.lora_slot.is_none()) {
            return Ok(None);
        }
        let mut rows = vec![u32::MAX; len.max(batch.token_ids.len())];
        for seq in &batch.seqs {
            let Some(slot) = seq.lora_slot else { continue };
            if self.slots.get(slot).is_none_or(Option::is_none) {
                return Err(EngineError::internal(format!(
                    "forward batch names empty LoRA slot {slot}"
                )));
            }
            let end = seq.query_start + seq.query_len;
            let span = rows
                .get_mut(seq.query_start..end)
                .ok_or_else(|| EngineError::internal("forward batch: a sequence's tokens are out of range"))?;
            span.fill(slot as u32);
        }
        Ok(Some(rows))
    }

    /// The batch's per-token slots on the device for `apply`; None without LoRA rows.
    pub fn row_slots(&self, batch: &ForwardBatch) -> Result<Option<Tensor>> {
        match self.host_rows(batch, 0)? {
            Some(rows) => {
                let n = rows.len();
                Ok(Some(Tensor::from_vec(rows, n, &self.device)?))
            }
            None => Ok(None),
        }
    }

    /// Allocates the fixed buffers of the captured decode (`max_rows`: its largest batch).
    pub fn reserve_graph_buffers(&mut self, max_rows: usize) -> Result<()> {
        let max_rows = max_rows.max(1);
        let rows = Tensor::from_vec(vec![u32::MAX; max_rows], max_rows, &self.device)?;
        self.graph = Some(GraphBuffers { rows, max_rows });
        Ok(())
    }

    /// Before replaying a LoRA graph of `padded` rows: the batch's slots into the fixed
    /// buffer, padding rows on the base model. False when the batch has no LoRA row.
    pub fn upload_graph_rows(&self, batch: &ForwardBatch, padded: usize) -> Result<bool> {
        let Some(rows) = self.host_rows(batch, padded)? else {
            return Ok(false);
        };
        let g = self
            .graph
            .as_ref()
            .ok_or_else(|| EngineError::internal("LoRA graph buffers were not reserved"))?;
        if rows.len() > g.max_rows {
            return Err(EngineError::internal("LoRA graph rows: batch larger than captured"));
        }
        self.copy_to(&g.rows, &rows, "LoRA graph rows upload")?;
        Ok(true)
    }

    pub fn has_graph_buffers(&self) -> bool {
        self.graph.is_some()
    }

    /// Records the deltas of `parts` on the fixed buffers for a captured step of `b` rows:
    /// `x`, `y` are device addresses of [b, in] and [b, width] activations.
    #[allow(clippy::too_many_arguments)] // the same operands as `launch`
    pub fn record(
        &self,
        layer: usize,
        parts: &[Part],
        x: u64,
        y: u64,
        b: usize,
        in_features: usize,
        y_width: usize,
    ) -> Result<()> {
        let g = self
            .graph
            .as_ref()
            .ok_or_else(|| EngineError::internal("LoRA graph buffers were not reserved"))?;
        if b > g.max_rows {
            return Err(EngineError::internal("LoRA graph: batch larger than reserved"));
        }
        self.launch(device_ptr(&g.rows)?, layer, parts, x, y, b, in_features, y_width)
    }

    /// Adds the deltas of `parts` of layer `layer` onto the rows of `y` [rows, width] whose
    /// slot `row_slots` names; `x` [rows, in] is the projection input. Every part must
    /// share `x` (a fused projection).
    pub fn apply(&self, row_slots: &Tensor, layer: usize, parts: &[Part], x: &Tensor, y: &Tensor) -> Result<()> {
        let (rows, in_features) = x.dims2()?;
        let (y_rows, y_width) = y.dims2()?;
        if rows == 0 {
            return Ok(());
        }
        if y_rows != rows || row_slots.elem_count() != rows {
            return Err(EngineError::internal("LoRA apply: operands do not match"));
        }
        if x.dtype() != self.dtype || y.dtype() != self.dtype {
            return Err(EngineError::internal(
                "LoRA apply: activations are not in the adapters' dtype",
            ));
        }
        self.launch(
            device_ptr(row_slots)?,
            layer,
            parts,
            device_ptr(x)?,
            device_ptr(y)?,
            rows,
            in_features,
            y_width,
        )
    }

    /// One lora_apply launch: grid (rows, parts), the max rank's floats of shared memory.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        slots_p: u64,
        layer: usize,
        parts: &[Part],
        x_p: u64,
        y_p: u64,
        rows: usize,
        in_features: usize,
        y_width: usize,
    ) -> Result<()> {
        if parts.is_empty() || parts.len() > 3 || layer >= self.num_layers {
            return Err(EngineError::internal("LoRA launch: bad parts or layer"));
        }
        let mut p = LoraParts::default();
        for (i, &(target, offset, out_features)) in parts.iter().enumerate() {
            if offset + out_features > y_width {
                return Err(EngineError::internal("LoRA launch: a part lies outside the output"));
            }
            p.target[i] = target as i32;
            p.offset[i] = offset as i32;
            p.out_features[i] = out_features as i32;
        }
        let d = dtype_index(self.dtype)?;
        let table_p = device_ptr(&self.table)?;
        let num_slots = if self.noop { 0 } else { self.slots.len() as i32 };
        let layer = layer as i32;
        let (in_i, width_i) = (in_features as i32, y_width as i32);
        let mut b = self.stream.launch_builder(&self.kernels[d]);
        b.arg(&y_p)
            .arg(&x_p)
            .arg(&slots_p)
            .arg(&table_p)
            .arg(&num_slots)
            .arg(&layer)
            .arg(&p)
            .arg(&in_i)
            .arg(&width_i);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, parts.len() as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: (self.max_rank.div_ceil(RANK_TILE) * RANK_TILE * 4) as u32,
        };
        // SAFETY: the arguments match lora_apply's signature; x, y and the slots are live
        // device buffers of `rows` rows (x [rows, in], y [rows, y_width]); the table holds
        // live adapter copies of rank <= max_rank, which the shared memory covers.
        unsafe { b.launch(cfg) }.map_err(|e| launch_err("lora_apply", e))?;
        Ok(())
    }
}
