//! all-MiniLM-L6-v2 (BERT) sentence embeddings against sentence-transformers references
//! (smollm2_reference.json `embeddings`), one sentence at a time and batched.

mod common;

use std::time::Instant;

use common::read_json;
use vllm_engine::loader::{detect_runner, load_encoder};
use vllm_engine::models::{EncoderBatch, EncoderModel, PoolingType, Runner};
use vllm_engine::pooling::{self, cosine, PoolingParams};
use vllm_engine::tokenizer::Tokenizer;
use vllm_engine::EngineArgs;

struct Case {
    text: String,
    token_ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn cases() -> Vec<Case> {
    let reference = read_json(common::fixtures_dir().join("smollm2_reference.json"));
    reference["embeddings"]["cases"]
        .as_array()
        .expect("embeddings.cases")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_string(),
            token_ids: common::u32s(&c["token_ids"]),
            embedding: c["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect(),
        })
        .collect()
}

/// The model's tokenizer.json pads to 128 for sentence-transformers; we never pad.
fn unpadded_tokenizer() -> tokenizers::Tokenizer {
    let tokenizer = Tokenizer::from_file(&common::minilm_dir()).unwrap();
    let mut inner = tokenizer.inner().clone();
    inner.with_padding(None);
    inner
}

fn encode(tokenizer: &tokenizers::Tokenizer, text: &str) -> Vec<u32> {
    tokenizer.encode(text, true).unwrap().get_ids().to_vec()
}

fn load() -> Box<dyn EncoderModel> {
    let (model, config) = load_encoder(&EngineArgs::new(common::minilm_dir())).unwrap();
    assert_eq!(config.pooling, PoolingType::Mean, "1_Pooling/config.json says mean");
    assert!(config.normalize, "modules.json has a Normalize module");
    assert_eq!(config.supported_tasks(), vec!["encode", "embed"]);
    model
}

#[test]
fn minilm_is_detected_as_a_pooling_model() {
    assert_eq!(detect_runner(&common::minilm_dir()).unwrap(), Runner::Pooling);
    assert_eq!(detect_runner(&common::smollm2_gguf()).unwrap(), Runner::Generate);
    assert_eq!(
        detect_runner(&common::fixtures_dir().join("tiny/tiny_opt")).unwrap(),
        Runner::Generate
    );
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let model = load();
    let tokenizer = unpadded_tokenizer();
    let cases = cases();
    let mut embeddings = Vec::new();
    for case in &cases {
        let ids = encode(&tokenizer, &case.text);
        assert_eq!(ids, case.token_ids, "{:?}: token ids", case.text);
        let mut batch = EncoderBatch::default();
        batch.push(&ids);
        let e = pooling::embed(model.as_ref(), &batch, &PoolingParams::default())
            .unwrap()
            .remove(0);
        let cos = cosine(&e, &case.embedding);
        eprintln!("{:?}: cosine to reference {cos:.7}", case.text);
        assert!(cos >= 0.9999, "{:?}: cosine {cos}", case.text);
        let norm: f32 = e.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "normalised, got norm {norm}");
        embeddings.push(e);
    }
    // The fixture's own pairwise similarities (eating vs eating: ~0.755, eating vs stocks: ~0.009).
    for (i, j) in [(0, 1), (0, 2), (1, 2)] {
        let expected = cosine(&cases[i].embedding, &cases[j].embedding);
        let got = cosine(&embeddings[i], &embeddings[j]);
        eprintln!("cos({i}, {j}) = {got:.4} (reference {expected:.4})");
        assert!((got - expected).abs() < 1e-3, "cos({i}, {j}) = {got} vs {expected}");
    }
    let ab = cosine(&embeddings[0], &embeddings[1]);
    let ac = cosine(&embeddings[0], &embeddings[2]);
    assert!(
        (ab - 0.755).abs() < 0.005 && ac.abs() < 0.02,
        "cos(a,b) {ab}, cos(a,c) {ac}"
    );

    // All sentences in one batch give what each gives alone.
    let mut batch = EncoderBatch::default();
    for case in &cases {
        batch.push(&case.token_ids);
    }
    let batched = pooling::embed(model.as_ref(), &batch, &PoolingParams::default()).unwrap();
    for (alone, together) in embeddings.iter().zip(&batched) {
        let diff = alone
            .iter()
            .zip(together)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "batched embedding differs by {diff}");
    }
}

#[test]
fn minilm_matryoshka_dimensions_and_cls_pooling() {
    let model = load();
    let case = &cases()[0];
    let mut batch = EncoderBatch::default();
    batch.push(&case.token_ids);
    let full = pooling::embed(
        model.as_ref(),
        &batch,
        &PoolingParams {
            normalize: Some(false),
            ..Default::default()
        },
    )
    .unwrap()
    .remove(0);
    let params = PoolingParams {
        dimensions: Some(64),
        ..Default::default()
    };
    let short = pooling::embed(model.as_ref(), &batch, &params).unwrap().remove(0);
    assert_eq!(short.len(), 64);
    let mut expected = full[..64].to_vec();
    pooling::normalize(&mut expected);
    assert!(short.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-6));
    let too_many = PoolingParams {
        dimensions: Some(385),
        ..Default::default()
    };
    assert!(pooling::embed(model.as_ref(), &batch, &too_many).is_err());

    let hidden = model.hidden_states(&batch).unwrap();
    let cls = pooling::pool(&hidden, &batch, PoolingType::Cls).unwrap().remove(0);
    assert_eq!(cls, hidden.get(0).unwrap().to_vec1::<f32>().unwrap());
    assert!(model.classify(&batch).is_err(), "MiniLM has no classification head");
}

#[test]
fn minilm_rejects_bad_input() {
    let model = load();
    let mut batch = EncoderBatch::default();
    batch.push(&[101, 30522, 102]);
    assert!(model.hidden_states(&batch).is_err(), "token outside the vocabulary");
    let mut batch = EncoderBatch::default();
    batch.push(&vec![1000; 513]);
    assert!(model.hidden_states(&batch).is_err(), "longer than 512 positions");
    let mut batch = EncoderBatch::default();
    batch.push(&[]);
    assert!(model.hidden_states(&batch).is_err(), "empty sequence");
}

#[test]
#[ignore = "timing report, not a check"]
fn minilm_embedding_throughput() {
    let model = load();
    let tokenizer = unpadded_tokenizer();
    // 64 sentences of exactly 32 tokens ([CLS] + 30 words + [SEP]).
    let words = encode(&tokenizer, "the quick brown fox jumps over the lazy dog while a man is eating food and the stock market crashed today in the city of london near the river thames after rain");
    assert!(words.len() >= 32);
    let mut batch = EncoderBatch::default();
    for i in 0..64u32 {
        let mut ids = vec![101];
        ids.extend(words[1..31].iter().map(|&w| if w > 999 { w + (i % 7) } else { w }));
        ids.push(102);
        batch.push(&ids);
    }
    pooling::embed(model.as_ref(), &batch, &PoolingParams::default()).unwrap();
    let rounds = 5;
    let t = Instant::now();
    for _ in 0..rounds {
        pooling::embed(model.as_ref(), &batch, &PoolingParams::default()).unwrap();
    }
    let secs = t.elapsed().as_secs_f64() / rounds as f64;
    println!(
        "MiniLM-L6 embed, batch 64 x 32 tokens: {:.1} ms/batch, {:.0} sentences/s ({} threads)",
        secs * 1e3,
        64.0 / secs,
        rayon::current_num_threads()
    );
}
