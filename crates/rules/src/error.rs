//! Typed errors: [`RuleError`] (compiling) and [`EvalError`] (evaluating).

use crate::syntax::Pos;

/// A rule that does not compile: where, and what to change.
///
/// Displayed as `<message> at <line>:<column>[ — <hint>]`, e.g.
/// "unknown function `avgg` at 1:8 — did you mean `avg`?".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at {line}:{column}{}", hint.as_ref().map(|h| format!(" — {h}")).unwrap_or_default())]
pub struct RuleError {
    /// Line of the offending token, from 1.
    pub line: u32,
    /// Column of the offending token, from 1 (characters).
    pub column: u32,
    /// What is wrong and what to change, without the position.
    pub message: String,
    /// A suggestion, when there is one (e.g. the function name that was probably meant).
    pub hint: Option<String>,
}

impl RuleError {
    pub(crate) fn new(pos: Pos, message: impl Into<String>) -> RuleError {
        RuleError {
            line: pos.line,
            column: pos.column,
            message: message.into(),
            hint: None,
        }
    }

    pub(crate) fn with_hint(mut self, hint: impl Into<String>) -> RuleError {
        self.hint = Some(hint.into());
        self
    }
}

/// A failure while evaluating a compiled rule against one message.
///
/// Type mismatches are not errors (they yield `Undefined`, as in AWS IoT SQL); these are the
/// few cases where the rule cannot produce a meaningful result at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    /// A rule with windows or per-key state was evaluated without its state.
    #[error(
        "the rule keeps state (WINDOW, lag, delta, ewma_zscore, rate_of_change): evaluate it through a RuleRunner"
    )]
    NeedsState,
    /// The output would not be valid JSON.
    #[error("the rule's output is not representable as JSON: {0}")]
    Output(String),
}
