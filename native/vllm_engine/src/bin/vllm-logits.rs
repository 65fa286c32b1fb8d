//! vllm-logits: teacher-forced logits of a model, for comparing devices and dtypes with a
//! reference (bench/gpu/check_*.py).
//!
//!   vllm-logits MODEL --tokens IDS.json --out LOGITS.f32 [--device cuda] [--dtype bfloat16]
//!                     [--load-format dummy] [--block-size N] [--chunk N]
//!
//! IDS.json holds {"prompt": [...], "continuation": [...]}. The prompt is prefilled (in
//! chunks of --chunk tokens when given), then each continuation token but the last is fed
//! as one decode step. Writes [continuation.len(), vocab] float32 little-endian rows: row i
//! is the distribution that predicts continuation[i].

use std::io::Write;
use std::process::ExitCode;

use vllm_engine::config::{DType, Device, LoadFormat};
use vllm_engine::models::{ForwardBatch, SeqSlice};
use vllm_engine::EngineArgs;

struct Options {
    model: String,
    tokens: String,
    out: String,
    device: String,
    dtype: String,
    load_format: String,
    block_size: usize,
    chunk: Option<usize>,
}

fn parse() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut o = Options {
        model: String::new(),
        tokens: String::new(),
        out: String::new(),
        device: "cpu".into(),
        dtype: "auto".into(),
        load_format: "auto".into(),
        block_size: 16,
        chunk: None,
    };
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--tokens" => o.tokens = value()?,
            "--out" => o.out = value()?,
            "--device" => o.device = value()?,
            "--dtype" => o.dtype = value()?,
            "--load-format" => o.load_format = value()?,
            "--block-size" => o.block_size = value()?.parse().map_err(|_| "--block-size must be an integer")?,
            "--chunk" => o.chunk = Some(value()?.parse().map_err(|_| "--chunk must be an integer")?),
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            s => o.model = s.to_string(),
        }
    }
    if o.model.is_empty() || o.tokens.is_empty() || o.out.is_empty() {
        return Err("MODEL, --tokens and --out are required".into());
    }
    Ok(o)
}

fn ids(v: &serde_json::Value, key: &str) -> Result<Vec<u32>, String> {
    v.get(key)
        .and_then(|a| a.as_array())
        .ok_or(format!("tokens file: {key} must be an array"))?
        .iter()
        .map(|x| {
            x.as_u64()
                .map(|x| x as u32)
                .ok_or(format!("tokens file: {key} holds a non-integer"))
        })
        .collect()
}

fn run(o: Options) -> Result<(), String> {
    let text = std::fs::read_to_string(&o.tokens).map_err(|e| format!("cannot read {}: {e}", o.tokens))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", o.tokens))?;
    let prompt = ids(&json, "prompt")?;
    let continuation = ids(&json, "continuation")?;
    if prompt.is_empty() || continuation.is_empty() {
        return Err("prompt and continuation must not be empty".into());
    }
    let mut args = EngineArgs::new(&o.model);
    let e = |e: vllm_engine::EngineError| e.to_string();
    args.device = Device::parse(&o.device).map_err(e)?;
    args.dtype = DType::parse(&o.dtype).map_err(e)?;
    args.load_format = LoadFormat::parse(&o.load_format).map_err(e)?;
    args.validate().map_err(e)?;
    let (model, config) = vllm_engine::loader::load_causal_lm(&args).map_err(e)?;

    let total = prompt.len() + continuation.len();
    let num_blocks = total.div_ceil(o.block_size) + 1;
    // Blocks in reverse order, so a kernel that ignored the block table would read garbage.
    let block_table: Vec<u32> = (0..num_blocks as u32).rev().collect();
    let mut kv = model.new_kv_cache(num_blocks, o.block_size).map_err(e)?;
    let mut out = std::fs::File::create(&o.out).map_err(|e| format!("cannot create {}: {e}", o.out))?;
    let mut step = |tokens: &[u32], start: usize, want_logits: bool| -> Result<Option<Vec<f32>>, String> {
        let batch = ForwardBatch {
            token_ids: tokens.to_vec(),
            positions: (start..start + tokens.len()).collect(),
            seqs: vec![SeqSlice {
                query_start: 0,
                query_len: tokens.len(),
                context_len: start + tokens.len(),
                block_table: block_table.clone(),
                want_logits,
                ..Default::default()
            }],
            lookahead: false,
        };
        let logits = model.forward(&batch, &mut kv).map_err(e)?;
        if !want_logits {
            return Ok(None);
        }
        Ok(Some(
            logits
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| e.to_string())?,
        ))
    };
    let chunk = o.chunk.unwrap_or(prompt.len()).max(1);
    let mut done = 0;
    let mut rows: Vec<Vec<f32>> = Vec::new();
    while done < prompt.len() {
        let end = (done + chunk).min(prompt.len());
        if let Some(row) = step(&prompt[done..end], done, end == prompt.len())? {
            rows.push(row);
        }
        done = end;
    }
    for (i, &t) in continuation[..continuation.len() - 1].iter().enumerate() {
        rows.extend(step(&[t], prompt.len() + i, true)?);
    }
    for row in &rows {
        if row.len() != config.vocab_size {
            return Err(format!(
                "a logits row has {} values, vocab is {}",
                row.len(),
                config.vocab_size
            ));
        }
        let bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
        out.write_all(&bytes)
            .map_err(|e| format!("cannot write {}: {e}", o.out))?;
    }
    println!(
        "{} rows of {} logits written to {}",
        rows.len(),
        config.vocab_size,
        o.out
    );
    Ok(())
}

fn main() -> ExitCode {
    match parse().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vllm-logits: {e}");
            eprintln!("usage: vllm-logits MODEL --tokens IDS.json --out LOGITS.f32 [--device cuda] [--dtype bfloat16] [--load-format dummy] [--block-size N] [--chunk N]");
            ExitCode::FAILURE
        }
    }
}
