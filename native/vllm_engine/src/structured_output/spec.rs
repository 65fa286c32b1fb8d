//! What a request asks its output to be, and its translation to an llguidance grammar.

use llguidance::api::TopLevelGrammar;

use crate::error::{EngineError, Result};

/// vLLM's StructuredOutputsParams, one constraint per request.
#[derive(Debug, Clone, PartialEq)]
pub enum StructuredOutputs {
    /// A JSON schema, as JSON text.
    Json(String),
    /// Any JSON object.
    JsonObject,
    /// The whole output matches this regex.
    Regex(String),
    /// The output is exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect) or llguidance's JSON grammar list.
    Grammar(String),
}

impl StructuredOutputs {
    /// The field name, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            StructuredOutputs::Json(_) => "json",
            StructuredOutputs::JsonObject => "json_object",
            StructuredOutputs::Regex(_) => "regex",
            StructuredOutputs::Choice(_) => "choice",
            StructuredOutputs::Grammar(_) => "grammar",
        }
    }

    /// The llguidance grammar; malformed JSON or an empty choice list fail here, the
    /// rest (bad regex, bad schema, bad grammar) when the parser is created.
    pub fn to_grammar(&self) -> Result<TopLevelGrammar> {
        let invalid = |m: String| EngineError::validation(format!("invalid structured_outputs {}: {m}", self.kind()));
        Ok(match self {
            StructuredOutputs::Json(schema) => {
                let value: serde_json::Value =
                    serde_json::from_str(schema).map_err(|e| invalid(format!("schema is not JSON: {e}")))?;
                if !(value.is_object() || value.is_boolean()) {
                    return Err(invalid("a JSON schema must be an object".into()));
                }
                TopLevelGrammar::from_json_schema(with_bounded_whitespace(value))
            }
            StructuredOutputs::JsonObject => {
                TopLevelGrammar::from_json_schema(with_bounded_whitespace(serde_json::json!({"type": "object"})))
            }
            StructuredOutputs::Regex(rx) => TopLevelGrammar::from_regex(rx),
            StructuredOutputs::Choice(choices) => {
                if choices.is_empty() {
                    return Err(invalid("choice must not be empty".into()));
                }
                let alternatives: Vec<String> = choices.iter().map(|c| format!("({})", escape_regex(c))).collect();
                TopLevelGrammar::from_regex(&alternatives.join("|"))
            }
            StructuredOutputs::Grammar(text) => {
                if text.trim().is_empty() {
                    return Err(invalid("grammar must not be empty".into()));
                }
                TopLevelGrammar::from_lark_or_grammar_list(text).map_err(|e| invalid(e.to_string()))?
            }
        })
    }
}

/// JSON may be pretty-printed, but each run of whitespace between tokens is bounded:
/// with unbounded runs a small model at temperature > 0 can fall into emitting newlines
/// until max_tokens, leaving invalid JSON. A schema's own `x-guidance` options win.
const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,16}";

fn with_bounded_whitespace(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_pattern": JSON_WHITESPACE}));
    }
    schema
}

/// `text` as a regex matching exactly itself.
fn escape_regex(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
