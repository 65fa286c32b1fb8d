//! The engine's error type. Each variant is one `Vllm.Error` category on the Elixir side.

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCategory {
    Validation,
    NotFound,
    Unsupported,
    EngineDead,
    Aborted,
    Timeout,
    ResourceExhausted,
    Internal,
}

impl ErrorCategory {
    /// The atom name used by `%Vllm.Error{category: ...}`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCategory::Validation => "validation",
            ErrorCategory::NotFound => "not_found",
            ErrorCategory::Unsupported => "unsupported",
            ErrorCategory::EngineDead => "engine_dead",
            ErrorCategory::Aborted => "aborted",
            ErrorCategory::Timeout => "timeout",
            ErrorCategory::ResourceExhausted => "resource_exhausted",
            ErrorCategory::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, Error)]
#[error("{message}")]
pub struct EngineError {
    pub category: ErrorCategory,
    pub message: String,
}

impl EngineError {
    pub fn new(category: ErrorCategory, message: impl Into<String>) -> Self {
        EngineError {
            category,
            message: message.into(),
        }
    }
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorCategory::Validation, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCategory::NotFound, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorCategory::Unsupported, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCategory::Internal, message)
    }
    pub fn engine_dead(message: impl Into<String>) -> Self {
        Self::new(ErrorCategory::EngineDead, message)
    }
    pub fn resource_exhausted(message: impl Into<String>) -> Self {
        Self::new(ErrorCategory::ResourceExhausted, message)
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::internal(format!("tensor error: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;
