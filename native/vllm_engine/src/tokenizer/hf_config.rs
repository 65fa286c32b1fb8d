//! `tokenizer_config.json`, the file beside a tokenizer.json that names the BOS/EOS
//! tokens and holds the chat template.

use std::path::Path;

use serde_json::Value;

use crate::error::{EngineError, Result};

#[derive(Debug, Default)]
pub(super) struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
}

impl TokenizerConfig {
    /// Reads the file when it exists; a missing file is an empty config.
    pub fn read(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| EngineError::validation(format!("cannot read {}: {e}", path.display())))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::validation(format!("{} is not valid JSON: {e}", path.display())))?;
        Self::from_json(&json).map_err(|e| EngineError::validation(format!("{}: {}", path.display(), e.message)))
    }

    pub fn from_json(json: &Value) -> Result<Self> {
        Ok(TokenizerConfig {
            bos_token: token_content(json.get("bos_token")),
            eos_token: token_content(json.get("eos_token")),
            chat_template: chat_template(json.get("chat_template"))?,
        })
    }
}

/// A special token is written either as its text or as `{"content": text, ...}`.
fn token_content(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Either one template, or a list of `{"name", "template"}` of which "default" is the chat one.
fn chat_template(value: Option<&Value>) -> Result<Option<String>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(named)) => Ok(named.iter().find_map(|entry| {
            (entry.get("name")?.as_str()? == "default").then(|| entry.get("template")?.as_str().map(str::to_string))?
        })),
        Some(_) => Err(EngineError::validation(
            "chat_template should be a string or a list of named templates",
        )),
    }
}
