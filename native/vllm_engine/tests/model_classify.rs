//! A BertForSequenceClassification checkpoint (MiniLM's encoder and pooler under the
//! `bert.` prefix plus a known classifier) against the same computation done by hand.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use vllm_engine::loader::{detect_runner, load_encoder};
use vllm_engine::models::{EncoderBatch, Runner};
use vllm_engine::pooling::{self, PoolingParams};
use vllm_engine::tokenizer::Tokenizer;
use vllm_engine::EngineArgs;

const HIDDEN: usize = 384;

fn classifier_weight(label: usize, i: usize) -> f32 {
    ((label * 131 + i * 17) % 23) as f32 / 23.0 - 0.5
}

/// The classification checkpoint, written once per test process.
fn classifier_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(write_classifier_dir).clone()
}

fn write_classifier_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vllm_model_classify_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = common::minilm_dir();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    config["id2label"] = serde_json::json!({"0": "negative", "1": "positive"});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut views: HashMap<String, TensorView> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (format!("bert.{name}"), view))
        .collect();
    let weight: Vec<u8> = (0..2 * HIDDEN)
        .flat_map(|k| classifier_weight(k / HIDDEN, k % HIDDEN).to_le_bytes())
        .collect();
    let bias: Vec<u8> = [0.25f32, -0.25].iter().flat_map(|x| x.to_le_bytes()).collect();
    views.insert(
        "classifier.weight".into(),
        TensorView::new(Dtype::F32, vec![2, HIDDEN], &weight).unwrap(),
    );
    views.insert(
        "classifier.bias".into(),
        TensorView::new(Dtype::F32, vec![2], &bias).unwrap(),
    );
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    dir
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn classification_head_matches_pooler_and_classifier_by_hand() {
    let dir = classifier_dir();
    assert_eq!(detect_runner(&dir).unwrap(), Runner::Pooling);
    let (model, config) = load_encoder(&EngineArgs::new(&dir)).unwrap();
    assert_eq!(
        config.id2label,
        Some(vec!["negative".to_string(), "positive".to_string()])
    );
    assert_eq!(config.supported_tasks(), vec!["encode", "classify", "score"]);
    let (plain, _) = load_encoder(&EngineArgs::new(common::minilm_dir())).unwrap();

    let mut batch = EncoderBatch::default();
    batch.push(&[101, 1037, 2158, 2003, 5983, 2833, 1012, 102]);
    batch.push(&[101, 1996, 4518, 3006, 8007, 2651, 1012, 102]);
    // The `bert.` prefix spelling loads the same encoder.
    let hidden = model.hidden_states(&batch).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(hidden, plain.hidden_states(&batch).unwrap().to_vec2::<f32>().unwrap());

    let bytes = std::fs::read(common::minilm_dir().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (pooler_w, pooler_b) = (f32s(&st, "pooler.dense.weight"), f32s(&st, "pooler.dense.bias"));
    let logits = model.classify(&batch).unwrap().to_vec2::<f32>().unwrap();
    for (s, cls_row) in [0, 8].into_iter().enumerate() {
        let cls = &hidden[cls_row];
        let pooled: Vec<f32> = (0..HIDDEN)
            .map(|o| {
                let z: f32 = (0..HIDDEN).map(|i| pooler_w[o * HIDDEN + i] * cls[i]).sum::<f32>() + pooler_b[o];
                z.tanh()
            })
            .collect();
        for (label, bias) in [0.25f32, -0.25].into_iter().enumerate() {
            let expected: f32 = (0..HIDDEN)
                .map(|i| classifier_weight(label, i) * pooled[i])
                .sum::<f32>()
                + bias;
            let got = logits[s][label];
            assert!(
                (got - expected).abs() < 1e-4,
                "seq {s} label {label}: {got} vs {expected}"
            );
        }
    }
    let probs = pooling::classify(model.as_ref(), &batch, &PoolingParams::default()).unwrap();
    for p in &probs {
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6, "softmax sums to 1: {p:?}");
    }
    let raw = pooling::classify(
        model.as_ref(),
        &batch,
        &PoolingParams {
            use_activation: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(raw, logits);
}

#[test]
fn score_pairs_use_token_type_ids() {
    let dir = classifier_dir();
    let (model, _) = load_encoder(&EngineArgs::new(&dir)).unwrap();
    let tokenizer = Tokenizer::from_file(&common::minilm_dir()).unwrap();
    let mut inner = tokenizer.inner().clone();
    inner.with_padding(None);
    let pair = inner.encode(("A man is eating food.", "A man eats."), true).unwrap();
    let (ids, types) = (pair.get_ids().to_vec(), pair.get_type_ids().to_vec());
    assert_eq!(types.first(), Some(&0));
    assert_eq!(types.last(), Some(&1), "second text is segment 1");

    let mut with_types = EncoderBatch::default();
    with_types.push_with_types(&ids, Some(&types));
    let mut without = EncoderBatch::default();
    without.push(&ids);
    let a = model.classify(&with_types).unwrap().to_vec2::<f32>().unwrap();
    let b = model.classify(&without).unwrap().to_vec2::<f32>().unwrap();
    assert_ne!(a, b, "segment ids must reach the embeddings");

    // A pair batched with a single text gives what it gives alone.
    let mut mixed = EncoderBatch::default();
    mixed.push(&[101, 1996, 4518, 102]);
    mixed.push_with_types(&ids, Some(&types));
    let m = model.classify(&mixed).unwrap().to_vec2::<f32>().unwrap();
    assert!(
        m[1].iter().zip(&a[0]).all(|(x, y)| (x - y).abs() < 1e-5),
        "{:?} vs {:?}",
        m[1],
        a[0]
    );
    let bad = {
        let mut batch = EncoderBatch::default();
        batch.push_with_types(&ids, Some(&vec![2; ids.len()]));
        batch
    };
    assert!(
        model.classify(&bad).is_err(),
        "segment id 2 is outside type_vocab_size 2"
    );
}
