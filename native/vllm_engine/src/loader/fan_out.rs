//! Loading a tensor-parallel model: one thread per rank runs the ordinary one-GPU loader
//! against a view of the weights that hands it only its shard (models/tensor_parallel.rs),
//! while this thread reads each weight from the real source once, in the order the ranks
//! ask (the one-GPU order: random dummy weights come out the same as on one GPU), and
//! keeps it until every rank has taken its slice. A rank far ahead waits when a few
//! weights are already held, so memory stays a few tensors above the loaded model.

use std::collections::{HashMap, VecDeque};

use candle_core::Tensor;
use crossbeam_channel::{unbounded, Receiver, Sender};

use crate::error::{EngineError, Result};
use crate::loader::WeightSource;
use crate::models::tensor_parallel::{Shard, ShardSpec};

/// Whole weights held at once while ranks catch up.
const MAX_HELD: usize = 4;

enum Request {
    Tensor {
        rank: usize,
        name: String,
        shape: Vec<usize>,
        reply: Sender<Result<Tensor>>,
    },
    Contains {
        name: String,
        reply: Sender<bool>,
    },
    /// The rank's loader returned (done or failed): it takes nothing more.
    Finished {
        rank: usize,
    },
}

/// The source as rank `rank` sees it: shards, fetched from the loading thread.
struct RankView {
    rank: usize,
    spec: ShardSpec,
    requests: Sender<Request>,
}

impl WeightSource for RankView {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (reply, answer) = unbounded();
        let shape = self.spec.whole_shape(name, self.rank, shape);
        let name = name.to_string();
        self.requests
            .send(Request::Tensor {
                rank: self.rank,
                name,
                shape,
                reply,
            })
            .map_err(|_| EngineError::internal("the weight loader stopped"))?;
        answer
            .recv()
            .map_err(|_| EngineError::internal("the weight loader stopped"))?
    }

    fn contains(&self, name: &str) -> bool {
        let (reply, answer) = unbounded();
        let sent = self.requests.send(Request::Contains {
            name: name.to_string(),
            reply,
        });
        sent.is_ok() && answer.recv().unwrap_or(false)
    }
}

impl Drop for RankView {
    fn drop(&mut self) {
        let _ = self.requests.send(Request::Finished { rank: self.rank });
    }
}

/// `spec.size` models, rank r built by `load_rank(r, its view)` on its own thread.
pub fn load_sharded<M: Send>(
    source: &mut dyn WeightSource,
    spec: &ShardSpec,
    load_rank: impl Fn(usize, &mut dyn WeightSource) -> Result<M> + Sync,
) -> Result<Vec<M>> {
    let (requests, incoming) = unbounded();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..spec.size)
            .map(|rank| {
                let mut view = RankView {
                    rank,
                    spec: spec.clone(),
                    requests: requests.clone(),
                };
                let load_rank = &load_rank;
                s.spawn(move || load_rank(rank, &mut view))
            })
            .collect();
        drop(requests);
        serve(source, spec, incoming);
        let mut models = Vec::with_capacity(spec.size);
        for (rank, h) in handles.into_iter().enumerate() {
            let model = h
                .join()
                .map_err(|_| EngineError::internal(format!("tensor-parallel rank {rank} panicked while loading")))?;
            models.push(model.map_err(|e| EngineError::new(e.category, format!("rank {rank}: {}", e.message)))?);
        }
        Ok(models)
    })
}

/// A whole weight and the ranks that have not taken their slice yet.
struct Held {
    tensor: Tensor,
    waiting: Vec<bool>,
}

/// Answers the ranks until all have finished.
fn serve(source: &mut dyn WeightSource, spec: &ShardSpec, incoming: Receiver<Request>) {
    let mut held: HashMap<String, Held> = HashMap::new();
    let mut live = vec![true; spec.size];
    let mut parked: VecDeque<Request> = VecDeque::new();
    for request in incoming {
        match request {
            Request::Contains { name, reply } => {
                let _ = reply.send(source.contains(&name));
            }
            Request::Finished { rank } => {
                live[rank] = false;
                held.retain(|_, h| {
                    h.waiting[rank] = false;
                    h.waiting.iter().any(|&w| w)
                });
            }
            t @ Request::Tensor { .. } => parked.push_back(t),
        }
        // Serve what can be served: a held weight always, a new one while few are held.
        let mut progress = true;
        while progress {
            progress = false;
            for _ in 0..parked.len() {
                let Some(Request::Tensor {
                    rank,
                    name,
                    shape,
                    reply,
                }) = parked.pop_front()
                else {
                    continue;
                };
                if !held.contains_key(&name) && held.len() >= MAX_HELD {
                    parked.push_back(Request::Tensor {
                        rank,
                        name,
                        shape,
                        reply,
                    });
                    continue;
                }
                progress = true;
                let _ = reply.send(take(source, spec, &mut held, &live, rank, &name, &shape));
            }
        }
    }
}

/// Rank `rank`'s slice of `name`, reading it from the source the first time.
fn take(
    source: &mut dyn WeightSource,
    spec: &ShardSpec,
    held: &mut HashMap<String, Held>,
    live: &[bool],
    rank: usize,
    name: &str,
    shape: &[usize],
) -> Result<Tensor> {
    if !held.contains_key(name) {
        let tensor = source.tensor(name, shape)?;
        held.insert(
            name.to_string(),
            Held {
                tensor,
                waiting: live.to_vec(),
            },
        );
    }
    let entry = held
        .get_mut(name)
        .ok_or_else(|| EngineError::internal("a held weight vanished"))?;
    let slice = match spec.shard(name, rank) {
        Shard::Whole => entry.tensor.clone(),
        Shard::Slice { dim, start, len } => entry.tensor.narrow(dim, start, len)?.contiguous()?,
    };
    entry.waiting[rank] = false;
    if !entry.waiting.iter().any(|&w| w) {
        held.remove(name);
    }
    Ok(slice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Architecture, ModelConfig};
    use candle_core::Device;
    use std::sync::Mutex;

    /// Each tensor is filled with its read number, so a second read would show.
    struct Counting {
        reads: Vec<String>,
    }

    impl WeightSource for Counting {
        fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
            self.reads.push(name.to_string());
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
            Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
        }
        fn contains(&self, name: &str) -> bool {
            name != "lm_head.weight"
        }
    }

    fn spec(size: usize) -> ShardSpec {
        let config = ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 8,
            hidden_size: 4,
            intermediate_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 1,
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            max_position_embeddings: 16,
            sliding_window: None,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
        };
        ShardSpec::new(&config, size).expect("divides")
    }

    const NAMES: [(&str, [usize; 2]); 40] = {
        let mut names = [("model.layers.0.mlp.down_proj.weight", [4, 8]); 40];
        names[0] = ("model.embed_tokens.weight", [8, 4]);
        names[1] = ("model.layers.0.self_attn.q_proj.weight", [4, 4]);
        names[2] = ("model.layers.0.self_attn.k_proj.weight", [2, 4]);
        names
    };

    /// Every rank gets exactly its slice of every weight; each weight is read once, in
    /// the order the ranks ask, however far apart the ranks run.
    #[test]
    fn each_rank_gets_its_slice_and_the_source_is_read_once_per_weight() {
        for size in [1, 2, 4] {
            let spec = spec(size);
            // 40 requests (37 of one name: the held weights must drain, not pile up).
            let mut source = Counting { reads: Vec::new() };
            let seen = Mutex::new(Vec::new());
            let models = load_sharded(&mut source, &spec, |rank, view| {
                assert!(!view.contains("lm_head.weight"));
                for (i, (name, whole)) in NAMES.iter().enumerate() {
                    let name = if i >= 3 {
                        format!("{name}.{i}")
                    } else {
                        name.to_string()
                    };
                    let shape = spec.shard_shape(&name, rank, whole);
                    let t = view.tensor(&name, &shape)?;
                    assert_eq!(t.dims(), shape.as_slice(), "{name} rank {rank}");
                    if i == 1 {
                        // q rows of this rank: whole rows rank*q.. of a [4, 4] arange.
                        let first = t.flatten_all()?.to_vec1::<f32>()?[0];
                        assert_eq!(first, (rank * (4 / size) * 4) as f32, "q of rank {rank}/{size}");
                    }
                    if i == 2 {
                        let first = t.flatten_all()?.to_vec1::<f32>()?[0];
                        assert_eq!(first, (spec.first_kv_head(rank) * 4) as f32, "k of rank {rank}/{size}");
                    }
                }
                seen.lock().map_err(|_| EngineError::internal("poisoned"))?.push(rank);
                Ok(rank)
            })
            .expect("loads");
            assert_eq!(models, (0..size).collect::<Vec<_>>());
            assert_eq!(source.reads.len(), NAMES.len(), "one read per weight at size {size}");
            assert_eq!(source.reads[1], "model.layers.0.self_attn.q_proj.weight");
        }
    }

    #[test]
    fn a_failing_rank_fails_the_load_without_hanging_the_others() {
        let spec = spec(2);
        let mut source = Counting { reads: Vec::new() };
        let err = load_sharded(&mut source, &spec, |rank, view| {
            if rank == 1 {
                return Err(EngineError::validation("no room on this GPU"));
            }
            for i in 0..20 {
                view.tensor(&format!("model.layers.0.mlp.up_proj.weight.{i}"), &[4, 4])?;
            }
            Ok(())
        })
        .expect_err("rank 1 fails");
        assert!(err.message.contains("rank 1: no room"), "{}", err.message);
    }
}
