//! `--data-parallel N`: N engine replicas in one process, replica i on `cuda:(first + i)`
//! (or all on the CPU), requests sent to the least-loaded one (the prompt and output
//! tokens it still owes), and one throughput figure for all of them.

use vllm_engine::{Engine, EngineArgs};

/// Starts `n` replicas of `args`, loading them concurrently (one GPU each).
pub fn start_engines(args: &EngineArgs, n: usize) -> Result<Vec<Engine>, String> {
    std::thread::scope(|scope| {
        let loading: Vec<_> = (0..n.max(1))
            .map(|rank| {
                let mut replica = args.clone();
                replica.device = args.device.for_data_parallel_rank_of(rank, args.tensor_parallel_size);
                scope.spawn(move || {
                    Engine::new(replica.clone())
                        .map_err(|e| format!("cannot start replica {rank} on {:?}: {e}", replica.device))
                })
            })
            .collect();
        loading
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err("a replica panicked while loading".to_string()))
            })
            .collect()
    })
}

/// Pending tokens per replica; each request goes to the replica with the fewest.
pub struct LeastLoaded {
    pending: Vec<usize>,
}

impl LeastLoaded {
    pub fn new(replicas: usize) -> Self {
        LeastLoaded {
            pending: vec![0; replicas.max(1)],
        }
    }

    /// The replica for a request costing `tokens` (lowest rank on ties), charged with it.
    pub fn route(&mut self, tokens: usize) -> usize {
        let (rank, _) = self
            .pending
            .iter()
            .enumerate()
            .min_by_key(|(rank, load)| (**load, *rank))
            .unwrap_or((0, &0));
        self.pending[rank] += tokens;
        rank
    }

    /// Tokens routed to each replica.
    pub fn pending(&self) -> &[usize] {
        &self.pending
    }
}

#[cfg(test)]
mod tests {
    use super::LeastLoaded;

    #[test]
    fn requests_go_to_the_replica_with_the_fewest_pending_tokens() {
        let mut router = LeastLoaded::new(2);
        assert_eq!(router.route(100), 0);
        assert_eq!(router.route(30), 1);
        assert_eq!(router.route(30), 1);
        assert_eq!(router.route(50), 1);
        assert_eq!(router.route(10), 0);
        assert_eq!(router.pending(), &[110, 110]);
    }
}
