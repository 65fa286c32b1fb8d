//! vllm-bench: time a model through the bare Rust engine.
//!
//!   vllm-bench MODEL [--batch N] [--input-len N] [--output-len N] [--max-model-len N] [--threads N]
//!   vllm-bench MODEL --prefix-cache [--batch N] [--input-len N] [--output-len N]
//!   vllm-bench --scheduler-overhead [--batch N]
//!   vllm-bench --workload w1|w2|w3 MODEL|CONFIG.json [--load-format dummy] [--device cuda] ...
//!
//! Default: the load time, the time to first token and decode speed of one request, and
//! the aggregate output speed of `--batch` concurrent requests (greedy, ignore_eos).
//! --prefix-cache: `--batch` requests sharing an `--input-len` system prompt, submitted
//! at once, TTFT with prefix caching on and then off (same run, same model file).
//! --scheduler-overhead: microseconds per scheduler step with `--batch` running requests
//! decoding, without a model.
//! --workload: a standard workload of ../shared/BENCHMARKS.md (random token ids, seeded),
//! see vllm-bench/workload.rs; with --data-parallel N, over N engine replicas (one GPU
//! each), see vllm-bench/data_parallel.rs; with --tensor-parallel N, each engine split over
//! N GPUs (replica i on cuda:i*N ..).

#[path = "vllm-bench/data_parallel.rs"]
mod data_parallel;
#[path = "vllm-bench/lora.rs"]
mod lora;
#[path = "vllm-bench/sched_overhead.rs"]
mod sched_overhead;
#[path = "vllm-bench/workload.rs"]
mod workload;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use vllm_engine::{
    Engine, EngineArgs, EngineError, EngineRequest, OutputKind, OutputSink, RequestOutput, SamplingParams,
};

struct Options {
    model: String,
    batch: usize,
    input_len: usize,
    output_len: usize,
    max_model_len: Option<usize>,
    threads: Option<usize>,
    workload: Option<String>,
    engine: workload::EngineOptions,
    mode: Mode,
}

#[derive(PartialEq)]
enum Mode {
    Throughput,
    PrefixCache,
    SchedulerOverhead,
}

fn parse() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut o = Options {
        model: String::new(),
        batch: 32,
        input_len: 128,
        output_len: 128,
        max_model_len: None,
        threads: None,
        workload: None,
        engine: workload::EngineOptions::default(),
        mode: Mode::Throughput,
    };
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<usize, String> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            v.parse()
                .map_err(|_| format!("{name} must be a positive integer, got {v:?}"))
        };
        match a.as_str() {
            "--batch" => o.batch = num("--batch")?,
            "--input-len" => o.input_len = num("--input-len")?,
            "--output-len" => o.output_len = num("--output-len")?,
            "--max-model-len" => o.max_model_len = Some(num("--max-model-len")?),
            "--threads" => o.threads = Some(num("--threads")?),
            "--workload" => o.workload = Some(args.next().ok_or("--workload needs a value")?),
            s if s.starts_with("--") && o.engine.accepts(s) => {
                let v = args.next().ok_or(format!("{s} needs a value"))?;
                o.engine.set(s, &v)?;
            }
            "--prefix-cache" => o.mode = Mode::PrefixCache,
            "--scheduler-overhead" => o.mode = Mode::SchedulerOverhead,
            "-h" | "--help" => return Err(String::new()),
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            s => o.model = s.to_string(),
        }
    }
    if o.model.is_empty() && o.mode != Mode::SchedulerOverhead {
        return Err("missing MODEL (a .gguf file or a model directory)".into());
    }
    if o.engine.data_parallel > 1 && o.workload.is_none() {
        return Err("--data-parallel applies to --workload runs".into());
    }
    if o.batch == 0 || o.input_len == 0 || o.output_len == 0 {
        return Err("--batch, --input-len and --output-len must be at least 1".into());
    }
    Ok(o)
}

/// Records when each output arrives.
struct TimingSink(Sender<(Instant, RequestOutput)>);

impl OutputSink for TimingSink {
    fn send(&mut self, output: RequestOutput) -> bool {
        self.0.send((Instant::now(), output)).is_ok()
    }
    fn fail(&mut self, error: EngineError) {
        eprintln!("request failed: {error}");
    }
}

fn prompt(engine: &Engine, len: usize, variant: usize) -> Result<Vec<u32>, EngineError> {
    let text = "The quick brown fox jumps over the lazy dog while the engine streams tokens. ";
    let base = engine.tokenizer().encode(&text.repeat(len / 8 + 4), false)?;
    Ok(base
        .iter()
        .cycle()
        .skip(variant % base.len().max(1))
        .take(len)
        .copied()
        .collect())
}

fn submit(
    engine: &Engine,
    id: String,
    prompt: Vec<u32>,
    output_len: usize,
) -> Result<Receiver<(Instant, RequestOutput)>, EngineError> {
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(output_len),
        ignore_eos: true,
        output_kind: OutputKind::Delta,
        ..Default::default()
    };
    let (tx, rx) = unbounded();
    engine.add_request(EngineRequest::new(id, prompt, params), Box::new(TimingSink(tx)))?;
    Ok(rx)
}

/// Arrival times of every output of one request, through its final one.
fn drain(rx: &Receiver<(Instant, RequestOutput)>) -> Result<Vec<(Instant, usize)>, String> {
    let mut times = Vec::new();
    loop {
        let (t, out) = rx
            .recv_timeout(Duration::from_secs(600))
            .map_err(|_| "a request never finished".to_string())?;
        times.push((t, out.outputs.first().map_or(0, |c| c.token_ids.len())));
        if out.finished {
            return Ok(times);
        }
    }
}

/// TTFT of `batch` requests sharing a system prompt, all submitted at once.
fn prefix_cache_ttft(o: &Options, caching: bool) -> Result<(), String> {
    let mut args = EngineArgs::new(&o.model);
    args.max_model_len = o.max_model_len;
    args.num_threads = o.threads;
    args.max_num_seqs = Some(o.batch.max(1));
    args.enable_prefix_caching = caching;
    let engine = Engine::new(args).map_err(|e| format!("cannot start the engine: {e}"))?;
    let system = prompt(&engine, o.input_len, 0).map_err(|e| e.to_string())?;
    let questions = engine
        .tokenizer()
        .encode(
            " Question number seven: what comes after the dog? Answer briefly.",
            false,
        )
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut receivers = Vec::new();
    for i in 0..o.batch {
        let mut p = system.clone();
        p.push(questions[i % questions.len()]);
        p.extend(questions.iter().cycle().skip(i).take(15));
        receivers.push(submit(&engine, format!("q{i}"), p, o.output_len).map_err(|e| e.to_string())?);
    }
    let mut ttfts = Vec::new();
    for rx in &receivers {
        let times = drain(rx)?;
        ttfts.push((times[0].0 - start).as_secs_f64() * 1e3);
    }
    let wall = start.elapsed().as_secs_f64();
    ttfts.sort_by(f64::total_cmp);
    let mean = ttfts.iter().sum::<f64>() / ttfts.len() as f64;
    let stats = engine.stats();
    println!(
        "prefix caching {}: {} requests x {} shared + 16 own tokens: TTFT mean {mean:.0} ms, p50 {:.0} ms, max {:.0} ms; \
         all done in {wall:.2} s; prefix-cache hit rate {:.1}%",
        if caching { "on " } else { "off" },
        o.batch,
        o.input_len,
        ttfts[ttfts.len() / 2],
        ttfts[ttfts.len() - 1],
        stats.prefix_cache_hit_rate() * 100.0
    );
    engine.shutdown();
    Ok(())
}

fn run(o: Options) -> Result<(), String> {
    match o.mode {
        Mode::SchedulerOverhead => return sched_overhead::run(o.batch),
        Mode::PrefixCache => {
            prefix_cache_ttft(&o, true)?;
            return prefix_cache_ttft(&o, false);
        }
        Mode::Throughput => {}
    }
    let mut args = EngineArgs::new(&o.model);
    args.max_model_len = o.max_model_len;
    args.num_threads = o.threads;
    args.max_num_seqs = Some(o.batch.max(1));
    o.engine.apply(&mut args)?;
    let t0 = Instant::now();
    let engine = Engine::new(args).map_err(|e| format!("cannot start the engine: {e}"))?;
    println!("load: {:.2} s", t0.elapsed().as_secs_f64());

    let start = Instant::now();
    let rx = submit(
        &engine,
        "solo".into(),
        prompt(&engine, o.input_len, 0).map_err(|e| e.to_string())?,
        o.output_len,
    )
    .map_err(|e| e.to_string())?;
    let times = drain(&rx)?;
    let first = times.first().map(|t| t.0).unwrap_or(start);
    let last = times.last().map(|t| t.0).unwrap_or(start);
    let decoded: usize = times.iter().skip(1).map(|t| t.1).sum();
    println!(
        "batch 1, {} in: TTFT {:.1} ms",
        o.input_len,
        (first - start).as_secs_f64() * 1e3
    );
    if decoded > 0 {
        println!(
            "batch 1 decode: {:.1} tok/s",
            decoded as f64 / (last - first).as_secs_f64()
        );
    }

    let start = Instant::now();
    let mut receivers = Vec::new();
    for i in 0..o.batch {
        let p = prompt(&engine, o.input_len, 7 * i + 1).map_err(|e| e.to_string())?;
        receivers.push(submit(&engine, format!("b{i}"), p, o.output_len).map_err(|e| e.to_string())?);
    }
    let mut all = Vec::new();
    for rx in &receivers {
        all.push(drain(rx)?);
    }
    let wall = start.elapsed().as_secs_f64();
    let total: usize = all.iter().flatten().map(|t| t.1).sum();
    println!(
        "batch {}, {} in / {} out: {total} tokens in {wall:.2} s = {:.1} output tok/s",
        o.batch,
        o.input_len,
        o.output_len,
        total as f64 / wall
    );
    // Decode alone (what llama-batched-bench calls S_TG): tokens that arrived after every
    // request had its first one, over that stretch.
    let all_started = all.iter().filter_map(|t| t.first().map(|f| f.0)).max();
    let end = all.iter().filter_map(|t| t.last().map(|l| l.0)).max();
    if let (Some(from), Some(to)) = (all_started, end) {
        let after: usize = all.iter().flatten().filter(|t| t.0 > from).map(|t| t.1).sum();
        if to > from {
            println!(
                "batch {} decode after the last first token: {:.1} tok/s ({} tokens in {:.2} s)",
                o.batch,
                after as f64 / (to - from).as_secs_f64(),
                after,
                (to - from).as_secs_f64()
            );
        }
    }
    engine.shutdown();
    Ok(())
}

fn main() -> ExitCode {
    let result = parse().and_then(|o| match o.workload.clone() {
        Some(w) => workload::run(&w, &o.model, o.max_model_len, &o.engine),
        None => run(o),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("vllm-bench: {e}");
            }
            eprintln!("usage: vllm-bench MODEL [--batch N] [--input-len N] [--output-len N] [--max-model-len N] [--threads N]");
            eprintln!(
                "       vllm-bench --workload w1|w2|w3 MODEL|CONFIG.json {}",
                workload::EngineOptions::USAGE
            );
            eprintln!("       vllm-bench MODEL --prefix-cache [--batch N] [--input-len N] [--output-len N]");
            eprintln!("       vllm-bench --scheduler-overhead [--batch N]");
            ExitCode::FAILURE
        }
    }
}
