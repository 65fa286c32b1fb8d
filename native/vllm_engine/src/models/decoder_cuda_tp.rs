//! Tensor parallelism on the GPUs of one host: the decoder split over N ranks, rank r on
//! `cuda:first + r`, each an ordinary CudaDecoderLM over its shard (models/tensor_parallel.rs:
//! its heads, its MLP columns, its KV heads) whose o_proj and down_proj partial sums an
//! NCCL all-reduce completes (two per layer). lm_head stays whole on every rank (no
//! gather: each rank's logits are already complete; rank 0's are returned).
//!
//! One scheduler and block table: the engine's PagedKvCache holds rank 0's device cache,
//! this model the other ranks' (same blocks, their own heads). Each step runs every rank
//! on a thread of its own (rank 0 on the caller's), so the launches of the ranks overlap
//! and NCCL pairs their collectives on the GPUs. Steps run eagerly: no CUDA graphs yet.

use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::CudaContext;
use candle_core::{DType, Device, Tensor};

use crate::backend::cuda::nccl;
use crate::batch_size::BatchSize;
use crate::config::{EngineArgs, ModelConfig};
use crate::error::{EngineError, Result};
use crate::kv_cache::PagedKvCache;
use crate::loader::fan_out::load_sharded;
use crate::loader::WeightSource;
use crate::models::decoder_cuda::CudaDecoderLM;
use crate::models::tensor_parallel::ShardSpec;
use crate::models::{CausalLM, DecodeCaptureLimits, ForwardBatch};

pub struct TpDecoderLM {
    /// The whole model's config (the ranks hold per-rank head counts).
    config: ModelConfig,
    devices: Vec<Device>,
    ranks: Vec<CudaDecoderLM>,
    /// KV caches of ranks 1.. (rank 0's is the engine's).
    other_caches: Mutex<Vec<PagedKvCache>>,
}

/// Makes `device`'s context current on this thread (cuBLAS and NCCL calls need it).
fn bind(device: &Device) -> Result<()> {
    device
        .as_cuda_device()?
        .cuda_stream()
        .context()
        .bind_to_thread()
        .map_err(|e| EngineError::internal(format!("cannot bind the CUDA context: {e}")))
}

/// A rank's weights: those made on another GPU (dummy weights on the first) come through
/// host memory, which waits for them to be written there; a device-to-device copy on
/// this rank's stream would not.
struct ViaHost<'a> {
    inner: &'a mut dyn WeightSource,
    device: &'a Device,
}

impl WeightSource for ViaHost<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.inner.tensor(name, shape)?;
        if t.device().is_cuda() && !t.device().same_device(self.device) {
            return Ok(t.to_device(&Device::Cpu)?);
        }
        Ok(t)
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
}

impl TpDecoderLM {
    /// Splits the model over `size` GPUs from `first` (already open: the device the
    /// weights source may live on) and joins them in one NCCL group.
    pub fn load(
        config: ModelConfig,
        weights: &mut dyn WeightSource,
        first: &Device,
        size: usize,
        dtype: DType,
    ) -> Result<Self> {
        let spec = ShardSpec::new(&config, size)?;
        let ordinal = first.as_cuda_device()?.cuda_stream().context().ordinal();
        let present = CudaContext::device_count()
            .map_err(|e| EngineError::unsupported(format!("cannot count the CUDA devices: {e}")))?
            as usize;
        if ordinal + size > present {
            return Err(EngineError::validation(format!(
                "tensor_parallel_size {size} from cuda:{ordinal} needs cuda:{ordinal}..cuda:{}; {present} GPUs present",
                ordinal + size - 1
            )));
        }
        let mut devices = vec![first.clone()];
        for r in 1..size {
            devices.push(crate::backend::cuda::open_device(ordinal + r)?);
        }
        let rank_config = spec.rank_config(&config);
        let mut ranks = load_sharded(weights, &spec, |rank, view| {
            bind(&devices[rank])?;
            let mut view = ViaHost {
                inner: view,
                device: &devices[rank],
            };
            CudaDecoderLM::load(rank_config.clone(), &mut view, &devices[rank], dtype)
        })?;
        bind(first)?;
        for (comm, rank) in nccl::init_group(&devices)?.into_iter().zip(ranks.iter_mut()) {
            rank.set_all_reduce(Box::new(move |t: &Tensor| comm.all_reduce_in_place(t)));
        }
        tracing::info!(
            "tensor parallel over {size} GPUs from cuda:{ordinal} (NCCL {})",
            nccl::version().unwrap_or(0)
        );
        Ok(TpDecoderLM {
            config,
            devices,
            ranks,
            other_caches: Mutex::new(Vec::new()),
        })
    }

    /// Runs `step` on every rank at once (rank 0 here, the others on threads of their own)
    /// and returns rank 0's answer; any rank's error fails the step.
    fn on_all_ranks<T: Send>(
        &self,
        kv: &mut PagedKvCache,
        step: impl Fn(&CudaDecoderLM, &mut PagedKvCache) -> Result<T> + Sync,
    ) -> Result<T> {
        let mut others = self
            .other_caches
            .lock()
            .map_err(|_| EngineError::internal("the tensor-parallel caches were poisoned by a panic"))?;
        if others.len() + 1 != self.ranks.len() {
            return Err(EngineError::internal("the tensor-parallel KV caches were not made"));
        }
        let step = &step;
        std::thread::scope(|s| {
            let handles: Vec<_> = self.ranks[1..]
                .iter()
                .zip(&self.devices[1..])
                .zip(others.iter_mut())
                .map(|((rank, device), cache)| {
                    s.spawn(move || {
                        bind(device)?;
                        step(rank, cache).map(|_| ())
                    })
                })
                .collect();
            let first = bind(&self.devices[0]).and_then(|_| step(&self.ranks[0], kv));
            for (i, h) in handles.into_iter().enumerate() {
                match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(EngineError::new(e.category, format!("rank {}: {}", i + 1, e.message))),
                    Err(_) => {
                        return Err(EngineError::internal(format!(
                            "tensor-parallel rank {} panicked",
                            i + 1
                        )))
                    }
                }
            }
            first
        })
    }
}

impl CausalLM for TpDecoderLM {
    fn forward(&self, batch: &ForwardBatch, kv: &mut PagedKvCache) -> Result<Tensor> {
        self.on_all_ranks(kv, |rank, cache| rank.forward(batch, cache))
    }

    fn forward_greedy(&self, batch: &ForwardBatch, kv: &mut PagedKvCache) -> Result<Option<(Vec<u32>, Vec<f32>)>> {
        self.on_all_ranks(kv, |rank, cache| rank.forward_greedy(batch, cache))
    }

    /// Eager: the ranks' captured graphs would hold no all-reduce.
    fn prepare_decode_graphs(&mut self, _limits: &DecodeCaptureLimits, _kv: &PagedKvCache) -> Result<()> {
        Ok(())
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn weight_bytes(&self) -> usize {
        self.ranks.iter().map(|r| r.weight_bytes()).sum()
    }

    /// One block's bytes on each GPU (every rank holds the same share of the heads).
    fn kv_bytes_per_block(&self, block_size: usize) -> usize {
        self.ranks[0].kv_bytes_per_block(block_size)
    }

    fn new_kv_cache(&self, num_blocks: usize, block_size: usize) -> Result<PagedKvCache> {
        let mut others = Vec::with_capacity(self.ranks.len() - 1);
        for (rank, device) in self.ranks[1..].iter().zip(&self.devices[1..]) {
            bind(device)?;
            others.push(rank.new_kv_cache(num_blocks, block_size)?);
        }
        bind(&self.devices[0])?;
        *self
            .other_caches
            .lock()
            .map_err(|_| EngineError::internal("the tensor-parallel caches were poisoned by a panic"))? = others;
        self.ranks[0].new_kv_cache(num_blocks, block_size)
    }

    /// The smallest of the ranks' budgets: every GPU holds the same number of blocks.
    fn kv_cache_budget(&self, args: &EngineArgs, batch: BatchSize) -> Result<Option<usize>> {
        let mut eager = args.clone();
        eager.enforce_eager = true;
        let mut budget: Option<usize> = None;
        for (rank, device) in self.ranks.iter().zip(&self.devices) {
            bind(device)?;
            if let Some(b) = rank.kv_cache_budget(&eager, batch)? {
                budget = Some(budget.map_or(b, |m| m.min(b)));
            }
        }
        bind(&self.devices[0])?;
        Ok(budget)
    }

    /// The ranks' cards are alike: the first answers.
    fn batch_defaults(&self) -> Result<BatchSize> {
        self.ranks[0].batch_defaults()
    }
}
