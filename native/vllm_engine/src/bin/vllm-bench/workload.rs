//! The standard workloads of BENCHMARKS.md through the engine, with random token ids
//! (seeded) and ignore_eos:
//! - w1: 256 requests, prompt and output lengths uniform in 100..=1024 (nano-vllm's benchmark);
//! - w2: 1000 requests, 128 in / 128 out (vLLM's benchmark_throughput);
//! - w3: batch 1, 128 in / 512 out: TTFT and time per output token (TPOT).
//!
//! Prints one result line per workload and, with --json FILE, writes the numbers there.

use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vllm_engine::config::{DType, Device, LoadFormat};
use vllm_engine::lora::LoRARequest;
use vllm_engine::{
    Engine, EngineArgs, EngineError, EngineRequest, OutputKind, OutputSink, RequestOutput, SamplingParams,
};

use crate::data_parallel;

/// Engine options shared by every workload.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub load_format: Option<String>,
    /// "gguf": keep GGUF weights quantized (CPU).
    pub quantization: Option<String>,
    pub tokenizer: Option<String>,
    pub max_num_seqs: Option<usize>,
    pub max_num_batched_tokens: Option<usize>,
    pub gpu_memory_utilization: Option<f64>,
    pub num_requests: Option<usize>,
    pub seed: u64,
    /// The workload's physical ceiling in output tok/s on this card (BENCHMARKS.md).
    pub ceiling: Option<f64>,
    pub json: Option<String>,
    pub runs: usize,
    /// Engine replicas (see data_parallel.rs).
    pub data_parallel: usize,
    /// GPUs each replica is split over (tensor_parallel_size).
    pub tensor_parallel: usize,
    /// `--enforce-eager true`: no CUDA graphs (to compare with the captured decode).
    pub enforce_eager: bool,
    /// `--lora-adapters N`: also run every workload with each request on one of N random
    /// adapters of rank `lora_rank` (see lora.rs).
    pub lora_adapters: usize,
    pub lora_rank: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: None,
            dtype: None,
            load_format: None,
            quantization: None,
            tokenizer: None,
            max_num_seqs: None,
            max_num_batched_tokens: None,
            gpu_memory_utilization: None,
            num_requests: None,
            seed: 0,
            ceiling: None,
            json: None,
            runs: 1,
            data_parallel: 1,
            tensor_parallel: 1,
            enforce_eager: false,
            lora_adapters: 0,
            lora_rank: 16,
        }
    }
}

impl EngineOptions {
    pub const USAGE: &'static str = "[--device cpu|cuda|cuda:N] [--dtype auto|bfloat16|float16|float32] \
[--load-format auto|dummy] [--quantization gguf] [--tokenizer FILE] [--max-num-seqs N] [--max-num-batched-tokens N] \
[--gpu-memory-utilization F] [--num-requests N] [--seed N] [--ceiling TOK_PER_S] [--runs N] [--json FILE] \
[--data-parallel N] [--enforce-eager true|false] [--lora-adapters N] [--lora-rank R]";

    pub fn accepts(&self, flag: &str) -> bool {
        matches!(
            flag,
            "--device"
                | "--dtype"
                | "--load-format"
                | "--quantization"
                | "--tokenizer"
                | "--max-num-seqs"
                | "--max-num-batched-tokens"
                | "--gpu-memory-utilization"
                | "--num-requests"
                | "--seed"
                | "--ceiling"
                | "--json"
                | "--runs"
                | "--data-parallel"
                | "--tensor-parallel"
                | "--enforce-eager"
                | "--lora-adapters"
                | "--lora-rank"
        )
    }

    pub fn set(&mut self, flag: &str, value: &str) -> Result<(), String> {
        let int = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("{flag} must be a non-negative integer, got {value:?}"))
        };
        let float = || {
            value
                .parse::<f64>()
                .map_err(|_| format!("{flag} must be a number, got {value:?}"))
        };
        match flag {
            "--device" => self.device = Some(value.into()),
            "--dtype" => self.dtype = Some(value.into()),
            "--load-format" => self.load_format = Some(value.into()),
            "--quantization" => self.quantization = Some(value.into()),
            "--tokenizer" => self.tokenizer = Some(value.into()),
            "--max-num-seqs" => self.max_num_seqs = Some(int()?),
            "--max-num-batched-tokens" => self.max_num_batched_tokens = Some(int()?),
            "--gpu-memory-utilization" => self.gpu_memory_utilization = Some(float()?),
            "--num-requests" => self.num_requests = Some(int()?),
            "--seed" => self.seed = int()? as u64,
            "--ceiling" => self.ceiling = Some(float()?),
            "--json" => self.json = Some(value.into()),
            "--runs" => self.runs = int()?.max(1),
            "--data-parallel" => self.data_parallel = int()?.max(1),
            "--lora-adapters" => self.lora_adapters = int()?,
            "--lora-rank" => self.lora_rank = int()?.max(1),
            "--tensor-parallel" => self.tensor_parallel = int()?,
            "--enforce-eager" => {
                self.enforce_eager = match value {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(format!("{flag} takes true or false, got {value:?}")),
                }
            }
            _ => return Err(format!("unknown option {flag}")),
        }
        Ok(())
    }

    pub fn apply(&self, args: &mut EngineArgs) -> Result<(), String> {
        let e = |e: EngineError| e.to_string();
        if let Some(d) = &self.device {
            args.device = Device::parse(d).map_err(e)?;
        }
        if let Some(d) = &self.dtype {
            args.dtype = DType::parse(d).map_err(e)?;
        }
        if let Some(f) = &self.load_format {
            args.load_format = LoadFormat::parse(f).map_err(e)?;
        }
        if let Some(q) = &self.quantization {
            args.quantization = Some(q.clone());
        }
        if let Some(t) = &self.tokenizer {
            args.tokenizer = Some(t.into());
        }
        if let Some(n) = self.max_num_seqs {
            args.max_num_seqs = Some(n);
        }
        if self.max_num_batched_tokens.is_some() {
            args.max_num_batched_tokens = self.max_num_batched_tokens;
        }
        if let Some(u) = self.gpu_memory_utilization {
            args.gpu_memory_utilization = u;
        }
        args.seed = self.seed;
        args.enforce_eager = self.enforce_eager;
        if self.lora_adapters > 0 {
            args.enable_lora = true;
            args.max_loras = self.lora_adapters;
            args.max_lora_rank = self.lora_rank;
        }
        args.tensor_parallel_size = self.tensor_parallel;
        Ok(())
    }
}

struct TimingSink(Sender<(Instant, RequestOutput)>);

impl OutputSink for TimingSink {
    fn send(&mut self, output: RequestOutput) -> bool {
        self.0.send((Instant::now(), output)).is_ok()
    }
    fn fail(&mut self, error: EngineError) {
        eprintln!("request failed: {error}");
    }
}

/// One request of a workload.
struct Spec {
    prompt: Vec<u32>,
    output_len: usize,
}

fn random_prompt(rng: &mut ChaCha8Rng, len: usize, vocab: usize) -> Vec<u32> {
    // Ids below 10_000 stay clear of special tokens at the top of real vocabularies.
    let top = vocab.clamp(2, 10_000) as u32;
    (0..len).map(|_| rng.random_range(1..top)).collect()
}

/// Draws one request's (prompt length, output length).
type LengthDraw = Box<dyn Fn(&mut ChaCha8Rng) -> (usize, usize)>;

fn specs(workload: &str, vocab: usize, o: &EngineOptions) -> Result<Vec<Spec>, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);
    let (n, lens): (usize, LengthDraw) = match workload {
        "w1" => (
            256,
            Box::new(|r| (r.random_range(100..=1024), r.random_range(100..=1024))),
        ),
        "w2" => (1000, Box::new(|_| (128, 128))),
        "w3" => (1, Box::new(|_| (128, 512))),
        other => return Err(format!("unknown workload {other:?} (w1, w2, w3)")),
    };
    let n = o.num_requests.unwrap_or(n);
    Ok((0..n)
        .map(|_| {
            let (input, output) = lens(&mut rng);
            Spec {
                prompt: random_prompt(&mut rng, input, vocab),
                output_len: output,
            }
        })
        .collect())
}

/// Arrival time of the first and last output and the number of output tokens.
struct Finished {
    first: Instant,
    last: Instant,
    tokens: usize,
}

fn submit(
    engine: &Engine,
    id: String,
    spec: &Spec,
    lora: Option<LoRARequest>,
) -> Result<Receiver<(Instant, RequestOutput)>, String> {
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(spec.output_len),
        min_tokens: spec.output_len,
        ignore_eos: true,
        detokenize: false,
        output_kind: OutputKind::Delta,
        ..Default::default()
    };
    let (tx, rx) = unbounded();
    let mut request = EngineRequest::new(id, spec.prompt.clone(), params);
    request.lora = lora;
    engine
        .add_request(request, Box::new(TimingSink(tx)))
        .map_err(|e| e.to_string())?;
    Ok(rx)
}

fn drain(rx: &Receiver<(Instant, RequestOutput)>) -> Result<Finished, String> {
    let mut first = None;
    let mut tokens = 0;
    loop {
        let (t, out) = rx
            .recv_timeout(Duration::from_secs(900))
            .map_err(|_| "a request never finished".to_string())?;
        first.get_or_insert(t);
        tokens += out.outputs.first().map_or(0, |c| c.token_ids.len());
        if out.finished {
            return Ok(Finished {
                first: first.unwrap_or(t),
                last: t,
                tokens,
            });
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

pub fn run(workload: &str, model: &str, max_model_len: Option<usize>, o: &EngineOptions) -> Result<(), String> {
    let mut args = EngineArgs::new(model);
    args.max_model_len = max_model_len;
    o.apply(&mut args)?;
    let t0 = Instant::now();
    let engines = data_parallel::start_engines(&args, o.data_parallel)?;
    let load_s = t0.elapsed().as_secs_f64();
    let limits = engines[0].limits();
    println!(
        "load {load_s:.2} s; {} engine(s) from {:?}; KV cache {} blocks of {} tokens each; max_num_seqs {}, max_num_batched_tokens {}",
        engines.len(),
        args.device,
        limits.num_blocks,
        limits.block_size,
        limits.max_num_seqs,
        limits.max_num_batched_tokens
    );
    let specs = specs(workload, limits.vocab_size, o)?;
    // VLLM_BENCH_DUMP_REQUESTS=FILE: the requests, one line each ("output_len id id ..."),
    // so bench/elixir_w1.exs drives the very same workload through Elixir.
    if let Some(path) = std::env::var_os("VLLM_BENCH_DUMP_REQUESTS") {
        let text: String = specs
            .iter()
            .map(|s| {
                let ids: Vec<String> = s.prompt.iter().map(u32::to_string).collect();
                format!("{} {}\n", s.output_len, ids.join(" "))
            })
            .collect();
        std::fs::write(&path, text).map_err(|e| format!("cannot write {path:?}: {e}"))?;
    }
    // Warm-up: one short request per engine, so lazy initialisation stays out of the numbers.
    let warm = Spec {
        prompt: specs[0].prompt.iter().copied().take(16).collect(),
        output_len: 4,
    };
    for (rank, engine) in engines.iter().enumerate() {
        drain(&submit(engine, format!("warmup-{rank}"), &warm, None)?)?;
    }
    // --lora-adapters: the adapters, added (and warmed) on every engine; every run then
    // goes on the base model and again on the adapters.
    let (lora_root, adapters) = if o.lora_adapters > 0 {
        let config = engines[0]
            .model_config()
            .ok_or("--lora-adapters needs a generative model")?;
        crate::lora::random_adapters(config, o.lora_adapters, o.lora_rank)?
    } else {
        (std::path::PathBuf::new(), Vec::new())
    };
    for (rank, engine) in engines.iter().enumerate() {
        for a in &adapters {
            engine
                .add_lora(a.clone())
                .map_err(|e| format!("adapter {}: {e}", a.lora_name))?;
            drain(&submit(
                engine,
                format!("warmup-{rank}-{}", a.lora_int_id),
                &warm,
                Some(a.clone()),
            )?)?;
        }
    }
    let passes: &[bool] = if adapters.is_empty() { &[false] } else { &[false, true] };
    let mut lora_tputs = Vec::new();

    let mut lines = Vec::new();
    let mut tputs = Vec::new();
    let mut tpots = Vec::new();
    let mut ttfts = Vec::new();
    let mut walls = Vec::new();
    // Each run on the base model, then (with --lora-adapters) on the adapters.
    let schedule = (0..o.runs).flat_map(|run| passes.iter().map(move |&with_lora| (run, with_lora)));
    for (run, with_lora) in schedule {
        // Every run starts cold: the same prompts would otherwise hit the prefix cache.
        for engine in &engines {
            engine
                .reset_prefix_cache(false)
                .map_err(|e| format!("cannot reset the prefix cache: {e}"))?;
        }
        let mut router = data_parallel::LeastLoaded::new(engines.len());
        let start = Instant::now();
        let receivers = specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let rank = router.route(s.prompt.len() + s.output_len);
                let lora = with_lora.then(|| adapters[i % adapters.len()].clone());
                submit(&engines[rank], format!("{workload}-{run}-{with_lora}-{i}"), s, lora)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let done = receivers.iter().map(drain).collect::<Result<Vec<_>, _>>()?;
        let wall = start.elapsed().as_secs_f64();
        let out_tokens: usize = done.iter().map(|d| d.tokens).sum();
        let in_tokens: usize = specs.iter().map(|s| s.prompt.len()).sum();
        let expected: usize = specs.iter().map(|s| s.output_len).sum();
        if out_tokens != expected {
            return Err(format!("{out_tokens} output tokens, expected {expected}"));
        }
        if with_lora {
            lora_tputs.push(out_tokens as f64 / wall);
            lines.push(format!(
                "run {run} with {} adapters of rank {}: {:.0} output tok/s ({wall:.2} s)",
                adapters.len(),
                o.lora_rank,
                out_tokens as f64 / wall
            ));
            continue;
        }
        walls.push(wall);
        tputs.push(out_tokens as f64 / wall);
        if workload == "w3" {
            let d = &done[0];
            let ttft = (d.first - start).as_secs_f64();
            let tpot = (d.last - d.first).as_secs_f64() / (d.tokens.max(2) - 1) as f64;
            ttfts.push(ttft);
            tpots.push(tpot);
            lines.push(format!(
                "run {run}: TTFT {:.2} ms, TPOT {:.3} ms ({:.0} tok/s)",
                ttft * 1e3,
                tpot * 1e3,
                1.0 / tpot
            ));
        } else {
            lines.push(format!(
                "run {run}: {} requests, {in_tokens} in / {out_tokens} out tokens in {wall:.2} s: {:.0} output tok/s, {:.0} total tok/s{}",
                specs.len(),
                out_tokens as f64 / wall,
                (in_tokens + out_tokens) as f64 / wall,
                if engines.len() > 1 {
                    format!(" (tokens per engine {:?})", router.pending())
                } else {
                    String::new()
                }
            ));
        }
    }
    for l in &lines {
        println!("{workload} {l}");
    }
    let (value, unit) = if workload == "w3" {
        (1.0 / median(tpots.clone()), "tok/s (1/TPOT)")
    } else {
        (median(tputs.clone()), "output tok/s")
    };
    let fraction = o.ceiling.map(|c| value / c);
    let mut summary = format!("{workload} median: {value:.0} {unit}");
    if workload == "w3" {
        summary += &format!(
            ", TPOT {:.3} ms, TTFT {:.2} ms",
            median(tpots.clone()) * 1e3,
            median(ttfts.clone()) * 1e3
        );
    } else {
        summary += &format!(", {:.2} s", median(walls.clone()));
    }
    if let (Some(f), Some(c)) = (fraction, o.ceiling) {
        summary += &format!(" = {:.1}% of the {c:.0} tok/s ceiling", f * 100.0);
    }
    println!("{summary}");
    let lora_ratio = (!lora_tputs.is_empty()).then(|| {
        let ratios: Vec<f64> = lora_tputs.iter().zip(&tputs).map(|(l, b)| l / b).collect();
        let line = format!(
            "{workload} lora: {} adapters of rank {}: median {:.0} output tok/s vs base {:.0}: ratio {:.3} (median of per-run ratios {:?})",
            adapters.len(),
            o.lora_rank,
            median(lora_tputs.clone()),
            median(tputs.clone()),
            median(ratios.clone()),
            ratios.iter().map(|r| (r * 1000.0).round() / 1000.0).collect::<Vec<_>>()
        );
        println!("{line}");
        median(ratios)
    });
    if !adapters.is_empty() {
        let _ = std::fs::remove_dir_all(&lora_root);
    }
    if let Some(path) = &o.json {
        let json = serde_json::json!({
            "workload": workload,
            "load_s": load_s,
            "num_blocks": limits.num_blocks,
            "value": value,
            "unit": unit,
            "ceiling": o.ceiling,
            "fraction_of_ceiling": fraction,
            "throughputs": tputs,
            "walls_s": walls,
            "tpot_s": tpots,
            "ttft_s": ttfts,
            "data_parallel": engines.len(),
            "lora_adapters": adapters.len(),
            "lora_throughputs": lora_tputs,
            "lora_ratio": lora_ratio,
            "tensor_parallel": args.tensor_parallel_size,
        });
        std::fs::write(path, json.to_string()).map_err(|e| format!("cannot write {path}: {e}"))?;
    }
    for engine in &engines {
        engine.shutdown();
    }
    Ok(())
}
