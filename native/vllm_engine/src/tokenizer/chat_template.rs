//! Chat templates: the Jinja template a model ships (tokenizer_config.json or GGUF
//! `tokenizer.chat_template`) rendered the way transformers renders it: trim_blocks and
//! lstrip_blocks on, Python string methods, `raise_exception`, and Python-style `tojson`.

use minijinja::{context, Environment, Error, ErrorKind, Value};
use serde::Serialize;

use super::{py_json, Tokenizer};
use crate::error::{EngineError, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

impl Tokenizer {
    /// Renders `messages` into a prompt with the model's chat template, or with
    /// `template_override` when given. `add_generation_prompt` appends the text that opens
    /// the assistant's turn.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        template_override: Option<&str>,
    ) -> Result<String> {
        let source = template_override.or(self.chat_template()).ok_or_else(|| {
            EngineError::validation(
                "this model has no chat template (none in its tokenizer_config.json or GGUF metadata); \
                 pass one explicitly with the chat_template option",
            )
        })?;
        let env = template_environment();
        let template = env
            .template_from_str(source)
            .map_err(|e| EngineError::validation(format!("the chat template is invalid: {}", describe(&e))))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => undefined_if_none(self.bos_token()),
                eos_token => undefined_if_none(self.eos_token()),
            })
            .map_err(|e| EngineError::validation(format!("cannot apply the chat template: {}", describe(&e))))
    }
}

fn template_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_filter("tojson", py_json::tojson);
    env
}

/// transformers leaves out the special tokens a model lacks: undefined renders as "",
/// where `none` would render as "none".
fn undefined_if_none(token: Option<String>) -> Value {
    token.map_or(Value::UNDEFINED, Value::from)
}

/// Templates call `raise_exception("...")` to reject conversations they cannot format.
fn raise_exception(message: String) -> std::result::Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// minijinja's message plus where in the template it happened.
fn describe(error: &Error) -> String {
    let mut text = error.detail().map(str::to_string).unwrap_or_else(|| error.to_string());
    if let Some(line) = error.line() {
        text.push_str(&format!(" (template line {line})"));
    }
    text
}
