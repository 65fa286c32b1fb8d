//! The pooling-model interface: encoders (BERT) run whole sequences with bidirectional
//! attention and no KV cache; poolers (crate::pooling) turn their hidden states into
//! embeddings, and a classification head, when the checkpoint has one, into label logits.

use std::ops::Range;
use std::path::Path;

use candle_core::Tensor;

use crate::error::{EngineError, Result};

/// How a model is run, decided from its config (vLLM's `runner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// Causal LM: generate tokens over the paged KV cache.
    Generate,
    /// Encoder: embed / encode / classify / score, prefill only.
    Pooling,
}

/// Which token(s) become a sequence's pooled vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingType {
    /// Mean over the sequence's tokens (= over the attention mask, we never pad).
    Mean,
    /// The first token ([CLS]).
    Cls,
    /// The last token.
    Last,
}

/// A flattened batch of whole sequences (no padding).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncoderBatch {
    /// Tokens of every sequence, concatenated in order.
    pub token_ids: Vec<u32>,
    /// BERT segment ids, one per token (0: first text, 1: second of a pair); empty: all 0.
    pub token_type_ids: Vec<u32>,
    /// Length of each sequence.
    pub seq_lens: Vec<usize>,
}

impl EncoderBatch {
    /// Appends one sequence (segment ids all 0).
    pub fn push(&mut self, token_ids: &[u32]) {
        self.push_with_types(token_ids, None);
    }

    /// Appends one sequence with explicit segment ids (a text pair for `score`).
    pub fn push_with_types(&mut self, token_ids: &[u32], token_type_ids: Option<&[u32]>) {
        let had_types = !self.token_type_ids.is_empty();
        if had_types || token_type_ids.is_some() {
            // Earlier sequences without types get zeros so the two stay aligned.
            self.token_type_ids.resize(self.token_ids.len(), 0);
            match token_type_ids {
                Some(types) => self.token_type_ids.extend_from_slice(types),
                None => self.token_type_ids.extend(std::iter::repeat_n(0, token_ids.len())),
            }
        }
        self.token_ids.extend_from_slice(token_ids);
        self.seq_lens.push(token_ids.len());
    }

    /// Each sequence's token range in `token_ids`.
    pub fn seq_ranges(&self) -> Vec<Range<usize>> {
        let mut start = 0;
        self.seq_lens
            .iter()
            .map(|&len| {
                let r = start..start + len;
                start += len;
                r
            })
            .collect()
    }

    /// Rejects empty sequences and inconsistent lengths before any indexing.
    pub fn check(&self) -> Result<()> {
        let total: usize = self.seq_lens.iter().sum();
        if total != self.token_ids.len() {
            return Err(EngineError::internal(format!(
                "encoder batch: sequence lengths sum to {total} but there are {} tokens",
                self.token_ids.len()
            )));
        }
        if !self.token_type_ids.is_empty() && self.token_type_ids.len() != self.token_ids.len() {
            return Err(EngineError::internal(
                "encoder batch: token_type_ids and token_ids differ in length",
            ));
        }
        if self.seq_lens.contains(&0) {
            return Err(EngineError::validation("cannot encode an empty sequence"));
        }
        Ok(())
    }
}

/// The shape and pooling setup of an encoder, from config.json and sentence-transformers'
/// files beside it (1_Pooling/config.json, modules.json).
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    /// The `architectures` entry, e.g. "BertModel" or "BertForSequenceClassification".
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    /// The model's default pooler (1_Pooling/config.json; CLS without one, as vLLM).
    pub pooling: PoolingType,
    /// Whether embeddings are L2-normalised by default (a sentence-transformers Normalize module).
    pub normalize: bool,
    /// Label names of a sequence-classification head, by index; None: no head.
    pub id2label: Option<Vec<String>>,
}

impl EncoderConfig {
    pub fn num_labels(&self) -> Option<usize> {
        self.id2label.as_ref().map(Vec::len)
    }

    /// The pooling tasks this model serves (vLLM's get_supported_tasks).
    pub fn supported_tasks(&self) -> Vec<&'static str> {
        if self.id2label.is_some() {
            vec!["encode", "classify", "score"]
        } else {
            vec!["encode", "embed"]
        }
    }

    /// Reads `dir`/config.json and the sentence-transformers files beside it.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let v = read_json(&config_path)?;
        let mut config = Self::from_hf_json(&v).map_err(|e| in_file(e, &config_path))?;
        let pooling_path = dir.join("1_Pooling/config.json");
        if pooling_path.exists() {
            config.pooling =
                sentence_transformers_pooling(&read_json(&pooling_path)?).map_err(|e| in_file(e, &pooling_path))?;
        }
        let modules_path = dir.join("modules.json");
        if modules_path.exists() {
            let modules = read_json(&modules_path)?;
            config.normalize = modules.as_array().is_some_and(|m| {
                m.iter()
                    .filter_map(|x| x.get("type").and_then(|t| t.as_str()))
                    .any(|t| t.ends_with("Normalize"))
            });
        }
        Ok(config)
    }

    fn from_hf_json(v: &serde_json::Value) -> Result<Self> {
        let architecture = v
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| "BertModel".into());
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        if !architecture.starts_with("Bert") && model_type != "bert" {
            return Err(EngineError::unsupported(format!(
                "encoder architecture {architecture} is not supported (supported: BERT)"
            )));
        }
        let usize_key = |key: &str| -> Result<usize> {
            v.get(key)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .filter(|&x| x > 0)
                .ok_or_else(|| EngineError::validation(format!("{key} is missing or not a positive integer")))
        };
        let hidden_size = usize_key("hidden_size")?;
        let num_attention_heads = usize_key("num_attention_heads")?;
        if !hidden_size.is_multiple_of(num_attention_heads) {
            return Err(EngineError::validation(format!(
                "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
            )));
        }
        if let Some(act) = v.get("hidden_act").and_then(|x| x.as_str()) {
            if act != "gelu" {
                return Err(EngineError::unsupported(format!(
                    "BERT hidden_act {act:?} is not supported (gelu)"
                )));
            }
        }
        if let Some(p) = v.get("position_embedding_type").and_then(|x| x.as_str()) {
            if p != "absolute" {
                return Err(EngineError::unsupported(format!(
                    "BERT position_embedding_type {p:?} is not supported"
                )));
            }
        }
        let is_classifier = architecture.ends_with("ForSequenceClassification");
        let id2label = if is_classifier { Some(id2label(v)?) } else { None };
        Ok(EncoderConfig {
            vocab_size: usize_key("vocab_size")?,
            hidden_size,
            intermediate_size: usize_key("intermediate_size")?,
            num_hidden_layers: usize_key("num_hidden_layers")?,
            num_attention_heads,
            max_position_embeddings: usize_key("max_position_embeddings")?,
            type_vocab_size: v
                .get("type_vocab_size")
                .and_then(|x| x.as_u64())
                .map_or(2, |x| x as usize),
            layer_norm_eps: v.get("layer_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-12),
            pooling: PoolingType::Cls,
            normalize: false,
            id2label,
            architecture,
        })
    }
}

/// Labels by index from `id2label` ({"0": "NEGATIVE", ...}) or `num_labels`.
fn id2label(v: &serde_json::Value) -> Result<Vec<String>> {
    if let Some(map) = v.get("id2label").and_then(|m| m.as_object()) {
        let mut labels = vec![None; map.len()];
        for (k, name) in map {
            let i: usize = k.parse().ok().filter(|&i| i < map.len()).ok_or_else(|| {
                EngineError::validation(format!("id2label key {k:?} is not an index below {}", map.len()))
            })?;
            labels[i] = Some(name.as_str().unwrap_or_default().to_string());
        }
        return labels
            .into_iter()
            .map(|l| l.ok_or_else(|| EngineError::validation("id2label skips an index")))
            .collect();
    }
    let n = v.get("num_labels").and_then(|x| x.as_u64()).unwrap_or(2) as usize;
    Ok((0..n).map(|i| format!("LABEL_{i}")).collect())
}

fn sentence_transformers_pooling(v: &serde_json::Value) -> Result<PoolingType> {
    let flag = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
    if flag("pooling_mode_mean_tokens") {
        Ok(PoolingType::Mean)
    } else if flag("pooling_mode_cls_token") {
        Ok(PoolingType::Cls)
    } else if flag("pooling_mode_lasttoken") {
        Ok(PoolingType::Last)
    } else {
        Err(EngineError::unsupported(
            "only mean, CLS and last-token pooling are supported (max / mean_sqrt_len are not)",
        ))
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => EngineError::not_found(format!("{} does not exist", path.display())),
        _ => EngineError::validation(format!("cannot read {}: {e}", path.display())),
    })?;
    serde_json::from_str(&text)
        .map_err(|e| EngineError::validation(format!("{} is not valid JSON: {e}", path.display())))
}

fn in_file(e: EngineError, file: &Path) -> EngineError {
    EngineError::new(e.category, format!("{}: {}", file.display(), e.message))
}

/// A pooling model: hidden states of whole sequences, plus an optional classifier.
pub trait EncoderModel: Send {
    /// Final hidden states, float32 [total tokens, hidden_size], tokens in batch order.
    /// Attention is bidirectional within each sequence and never crosses sequences.
    fn hidden_states(&self, batch: &EncoderBatch) -> Result<Tensor>;
    /// Raw classification logits [sequences, num_labels] (no softmax/sigmoid);
    /// `:unsupported` for models without a classification head.
    fn classify(&self, batch: &EncoderBatch) -> Result<Tensor>;
    fn config(&self) -> &EncoderConfig;
    /// Resident bytes of the weights.
    fn weight_bytes(&self) -> usize;
}
