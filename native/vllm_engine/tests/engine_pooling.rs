//! The pooling engine end to end: MiniLM embeddings through Engine::encode (batched by the
//! pooling core) against sentence-transformers references, batch == solo, tasks and errors.

mod common;

use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use vllm_engine::pooling::cosine;
use vllm_engine::{
    Engine, EngineArgs, EngineError, ErrorCategory, PoolingOutput, PoolingParams, PoolingRequest, PoolingSink,
    PoolingTask, SamplingParams,
};

struct ChannelSink(Sender<Result<PoolingOutput, EngineError>>);

impl PoolingSink for ChannelSink {
    fn send(&mut self, output: PoolingOutput) -> bool {
        self.0.send(Ok(output)).is_ok()
    }
    fn fail(&mut self, error: EngineError) {
        let _ = self.0.send(Err(error));
    }
}

fn engine() -> Engine {
    Engine::new(EngineArgs::new(common::minilm_dir())).expect("MiniLM pooling engine")
}

fn request(id: &str, ids: Vec<u32>, task: PoolingTask, params: PoolingParams) -> PoolingRequest {
    PoolingRequest {
        request_id: id.to_string(),
        prompt_token_ids: ids,
        token_type_ids: None,
        task,
        params,
    }
}

fn submit(engine: &Engine, req: PoolingRequest) -> Receiver<Result<PoolingOutput, EngineError>> {
    let (tx, rx) = unbounded();
    engine.encode(req, Box::new(ChannelSink(tx))).expect("queued");
    rx
}

fn wait(rx: &Receiver<Result<PoolingOutput, EngineError>>) -> PoolingOutput {
    rx.recv_timeout(Duration::from_secs(120))
        .expect("an output")
        .expect("no failure")
}

fn embed_cases() -> Vec<(String, Vec<u32>, Vec<f32>)> {
    let reference = common::read_json(common::fixtures_dir().join("smollm2_reference.json"));
    reference["embeddings"]["cases"]
        .as_array()
        .expect("embeddings.cases")
        .iter()
        .map(|c| {
            (
                c["text"].as_str().unwrap().to_string(),
                common::u32s(&c["token_ids"]),
                c["embedding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn engine_embeds_fixture_sentences_like_sentence_transformers() {
    let engine = engine();
    assert_eq!(engine.supported_tasks(), vec!["encode", "embed"]);
    let cases = embed_cases();
    let mut got = Vec::new();
    for (i, (text, ref_ids, reference)) in cases.iter().enumerate() {
        let ids = engine.tokenizer().encode(text, true).unwrap();
        assert_eq!(&ids, ref_ids, "{text:?}: token ids (no padding)");
        let out = wait(&submit(
            &engine,
            request(&format!("e{i}"), ids.clone(), PoolingTask::Embed, Default::default()),
        ));
        assert!(out.finished);
        assert_eq!(out.prompt_token_ids, ids);
        let cos = cosine(&out.data, reference);
        eprintln!("{text:?}: cosine {cos:.7}");
        assert!(cos >= 0.9999, "{text:?}: cosine {cos}");
        got.push(out.data);
    }
    let ab = cosine(&got[0], &got[1]);
    let ac = cosine(&got[0], &got[2]);
    let ref_ab = cosine(&cases[0].2, &cases[1].2);
    let ref_ac = cosine(&cases[0].2, &cases[2].2);
    eprintln!("cos(a,b) {ab:.4} (ref {ref_ab:.4}), cos(a,c) {ac:.4} (ref {ref_ac:.4})");
    assert!((ab - ref_ab).abs() < 1e-3 && (ac - ref_ac).abs() < 1e-3);
    assert!((ab - 0.755).abs() < 0.005 && ac.abs() < 0.02);
}

#[test]
fn a_batch_of_64_equals_each_alone() {
    let engine = engine();
    let cases = embed_cases();
    let solo: Vec<Vec<f32>> = cases
        .iter()
        .map(|(_, ids, _)| {
            wait(&submit(
                &engine,
                request("solo", ids.clone(), PoolingTask::Embed, Default::default()),
            ))
            .data
        })
        .collect();
    // 64 requests queued at once: the core takes them in as few batches as the limits allow.
    let receivers: Vec<_> = (0..64)
        .map(|i| {
            let ids = cases[i % cases.len()].1.clone();
            submit(
                &engine,
                request(&format!("b{i}"), ids, PoolingTask::Embed, Default::default()),
            )
        })
        .collect();
    for (i, rx) in receivers.iter().enumerate() {
        let out = wait(rx);
        assert_eq!(out.request_id, format!("b{i}"));
        let diff = out
            .data
            .iter()
            .zip(&solo[i % cases.len()])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "request {i}: batched differs from solo by {diff}");
    }
}

#[test]
fn dimensions_encode_and_errors() {
    let engine = engine();
    let ids = embed_cases()[0].1.clone();
    let params = PoolingParams {
        dimensions: Some(64),
        ..Default::default()
    };
    let short = wait(&submit(&engine, request("d", ids.clone(), PoolingTask::Embed, params))).data;
    assert_eq!(short.len(), 64);
    let norm: f32 = short.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
    // encode: the pooler's raw output (not normalised by default).
    let raw = wait(&submit(
        &engine,
        request("r", ids.clone(), PoolingTask::Encode, Default::default()),
    ))
    .data;
    assert_eq!(raw.len(), 384);
    let raw_norm: f32 = raw.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((raw_norm - 1.0).abs() > 1e-3, "encode is unnormalised, norm {raw_norm}");

    let (tx, _rx) = unbounded();
    let err = engine
        .encode(
            request("c", ids.clone(), PoolingTask::Classify, Default::default()),
            Box::new(ChannelSink(tx.clone())),
        )
        .unwrap_err();
    assert_eq!(err.category, ErrorCategory::Unsupported, "{err}");
    let err = engine
        .encode(
            request(
                "big",
                ids.clone(),
                PoolingTask::Embed,
                PoolingParams {
                    dimensions: Some(385),
                    ..Default::default()
                },
            ),
            Box::new(ChannelSink(tx.clone())),
        )
        .unwrap_err();
    assert_eq!(err.category, ErrorCategory::Validation, "{err}");
    let err = engine
        .encode(
            request("oov", vec![101, 30522, 102], PoolingTask::Embed, Default::default()),
            Box::new(ChannelSink(tx.clone())),
        )
        .unwrap_err();
    assert_eq!(err.category, ErrorCategory::Validation, "{err}");
    let err = engine
        .encode(
            request("long", vec![1000; 513], PoolingTask::Embed, Default::default()),
            Box::new(ChannelSink(tx)),
        )
        .unwrap_err();
    assert_eq!(err.category, ErrorCategory::Validation, "{err}");

    // Generation on a pooling model is refused, naming the task.
    struct NoSink;
    impl vllm_engine::OutputSink for NoSink {
        fn send(&mut self, _: vllm_engine::RequestOutput) -> bool {
            true
        }
        fn fail(&mut self, _: EngineError) {}
    }
    let gen = vllm_engine::EngineRequest::new("g", ids, SamplingParams::default());
    let err = engine.add_request(gen, Box::new(NoSink)).unwrap_err();
    assert_eq!(err.category, ErrorCategory::Unsupported);
    assert!(err.to_string().contains("generate"), "{err}");
}

#[test]
fn long_text_is_truncated_to_the_context() {
    let engine = engine();
    let text = "word ".repeat(2000);
    let ids = engine.tokenizer().encode(&text, true).unwrap();
    assert_eq!(ids.len(), 512);
    assert_eq!(ids.last(), Some(&102), "[SEP] kept at the end");
}

#[test]
#[ignore = "timing report, not a check"]
fn engine_embedding_throughput() {
    // VLLM_BENCH_MAX_NUM_SEQS: the pooling core's batch cap (default 256: one batch of 64).
    let mut args = EngineArgs::new(common::minilm_dir());
    if let Some(n) = std::env::var("VLLM_BENCH_MAX_NUM_SEQS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        args.max_num_seqs = Some(n);
    }
    let engine = Engine::new(args).expect("MiniLM pooling engine");
    let words = engine
        .tokenizer()
        .encode("the quick brown fox jumps over the lazy dog while a man is eating food and the stock market crashed today in the city of london near the river thames after rain", true)
        .unwrap();
    let sentence = |i: u32| -> Vec<u32> {
        let mut ids = vec![101];
        ids.extend(words[1..31].iter().map(|&w| if w > 999 { w + (i % 7) } else { w }));
        ids.push(102);
        ids
    };
    let run = |n: u32| {
        let rxs: Vec<_> = (0..n)
            .map(|i| {
                submit(
                    &engine,
                    request(&format!("t{i}"), sentence(i), PoolingTask::Embed, Default::default()),
                )
            })
            .collect();
        for rx in &rxs {
            wait(rx);
        }
    };
    run(64);
    let rounds = 5;
    let t = Instant::now();
    for _ in 0..rounds {
        run(64);
    }
    let secs = t.elapsed().as_secs_f64() / rounds as f64;
    println!(
        "engine embed, 64 requests x 32 tokens: {:.1} ms per 64, {:.0} sentences/s ({} threads)",
        secs * 1e3,
        64.0 / secs,
        rayon::current_num_threads()
    );
}

/// MiniLM with a 2-label classification head (weights made up, as in model_classify.rs).
fn classifier_dir() -> std::path::PathBuf {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = std::env::temp_dir().join(format!("vllm_engine_pooling_cls_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = common::minilm_dir();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    config["id2label"] = serde_json::json!({"0": "negative", "1": "positive"});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views: std::collections::HashMap<String, TensorView> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (format!("bert.{name}"), view))
        .collect();
    let weight: Vec<u8> = (0..2 * 384)
        .flat_map(|k| (((k * 17) % 23) as f32 / 23.0 - 0.5).to_le_bytes())
        .collect();
    let bias: Vec<u8> = [0.25f32, -0.25].iter().flat_map(|x| x.to_le_bytes()).collect();
    views.insert(
        "classifier.weight".into(),
        TensorView::new(Dtype::F32, vec![2, 384], &weight).unwrap(),
    );
    views.insert(
        "classifier.bias".into(),
        TensorView::new(Dtype::F32, vec![2], &bias).unwrap(),
    );
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    dir
}

#[test]
fn classify_and_score_through_the_engine_match_the_model() {
    use vllm_engine::models::EncoderBatch;
    let dir = classifier_dir();
    let engine = Engine::new(EngineArgs::new(&dir)).expect("classifier engine");
    assert_eq!(engine.supported_tasks(), vec!["encode", "classify", "score"]);
    let (model, _) = vllm_engine::loader::load_encoder(&EngineArgs::new(&dir)).unwrap();

    let ids = engine.tokenizer().encode("a man is eating food", true).unwrap();
    let out = wait(&submit(
        &engine,
        request("c", ids.clone(), PoolingTask::Classify, Default::default()),
    ));
    let mut batch = EncoderBatch::default();
    batch.push(&ids);
    let expected = vllm_engine::pooling::classify(model.as_ref(), &batch, &PoolingParams::default()).unwrap();
    assert_eq!(out.data.len(), 2);
    assert!((out.data.iter().sum::<f32>() - 1.0).abs() < 1e-5, "probabilities");
    assert!(out.data.iter().zip(&expected[0]).all(|(a, b)| (a - b).abs() < 1e-5));

    // score: the pair with segment ids 0 then 1, one forward pass like classify.
    let (pair, types) = engine.tokenize_pair("a man is eating food", "someone eats").unwrap();
    assert_eq!(pair.iter().filter(|&&t| t == 102).count(), 2, "[CLS] a [SEP] b [SEP]");
    assert!(types.contains(&1) && types[0] == 0);
    let mut req = request("s", pair.clone(), PoolingTask::Score, Default::default());
    req.token_type_ids = Some(types.clone());
    let scored = wait(&submit(&engine, req));
    let mut batch = EncoderBatch::default();
    batch.push_with_types(&pair, Some(&types));
    let expected = vllm_engine::pooling::classify(model.as_ref(), &batch, &PoolingParams::default()).unwrap();
    assert!(scored.data.iter().zip(&expected[0]).all(|(a, b)| (a - b).abs() < 1e-5));
    let _ = std::fs::remove_dir_all(&dir);
}
