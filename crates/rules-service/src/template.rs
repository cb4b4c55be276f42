//! Substitution templates in AWS IoT style: `alerts/${topic(2)}/${upper(kind)}`. Each `${expr}`
//! is any rule expression, evaluated against the input message (topic, payload, client id);
//! strings are inserted as they are, other values as JSON, Undefined as nothing.

use std::sync::Arc;

use ferrohub_rules::{CompiledRule, Lookup, MessageContext, Rule};
use serde_json::Value as Json;

use crate::error::{Result, RulesError};

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    Expr(Arc<CompiledRule>),
}

/// A parsed template.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses `text`; every `${…}` must compile as an expression.
    pub fn parse(text: &str) -> Result<Template> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Literal(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = closing_brace(after).ok_or_else(|| {
                RulesError::Invalid(format!("template `{text}`: `${{` without a closing `}}`"))
            })?;
            let expr = after[..end].trim();
            if expr.is_empty() {
                return Err(RulesError::Invalid(format!(
                    "template `{text}`: empty `${{}}`"
                )));
            }
            let compiled = compile_expression(expr).map_err(|e| {
                RulesError::Invalid(format!("template `{text}`: in `${{{expr}}}`: {e}"))
            })?;
            parts.push(Part::Expr(compiled));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// Whether the template has no substitutions.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }

    /// The text with every substitution evaluated against `msg`. An expression that fails
    /// (it uses per-key state) inserts nothing.
    pub fn render(&self, msg: &MessageContext<'_>, lookup: &dyn Lookup) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(s) => out.push_str(s),
                Part::Expr(rule) => match rule.evaluate(msg, lookup) {
                    Ok(Some(Json::String(s))) => out.push_str(&s),
                    Ok(Some(v)) => out.push_str(&v.to_string()),
                    Ok(None) | Err(_) => {}
                },
            }
        }
        out
    }
}

/// One rule expression evaluated on its own (`metrics`, `raise_when`): the value, not text.
#[derive(Debug, Clone)]
pub struct Expression(Arc<CompiledRule>);

impl Expression {
    /// Compiles `text` (any expression of the rule language).
    pub fn parse(text: &str) -> Result<Expression> {
        compile_expression(text.trim())
            .map(Expression)
            .map_err(|e| RulesError::Invalid(format!("expression `{text}`: {e}")))
    }

    /// The value against `msg`; `None` for Undefined or an evaluation error.
    pub fn eval(&self, msg: &MessageContext<'_>, lookup: &dyn Lookup) -> Option<Json> {
        self.0.evaluate(msg, lookup).ok().flatten()
    }
}

/// An expression compiled as a one-value rule (FROM is never consulted); the error as text.
fn compile_expression(expr: &str) -> std::result::Result<Arc<CompiledRule>, String> {
    if expr.is_empty() {
        return Err("empty expression".into());
    }
    let rule = Rule::compile(&format!("SELECT VALUE {expr} FROM '#'")).map_err(|e| {
        format!(
            "{}{}",
            e.message,
            e.hint.map(|h| format!(" — {h}")).unwrap_or_default()
        )
    })?;
    if rule.is_stateful() {
        return Err("stateful functions (lag, delta, windows…) belong in the rule's SELECT, not in an action".into());
    }
    Ok(Arc::new(rule))
}

/// Index of the `}` closing an expression (skipping quoted strings).
fn closing_brace(s: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '}') => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrohub_rules::NoLookup;

    #[test]
    fn substitutes_expressions() {
        let payload = serde_json::json!({"kind": "hot", "n": 3, "o": {"a": 1}});
        let msg = MessageContext::new("t", "devices/d1/telemetry", &payload);
        let t = Template::parse("alerts/${topic(2)}/${upper(kind)}/${n + 1}/${o}/${missing}")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.render(&msg, &NoLookup), r#"alerts/d1/HOT/4/{"a":1}/"#);
        let lit = Template::parse("plain").unwrap_or_else(|e| panic!("{e}"));
        assert!(lit.is_literal());
        assert_eq!(lit.render(&msg, &NoLookup), "plain");
        let quoted = Template::parse("${'}' || kind}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(quoted.render(&msg, &NoLookup), "}hot");
    }

    #[test]
    fn bad_templates_are_refused() {
        assert!(Template::parse("a/${topic(2)").is_err());
        assert!(Template::parse("a/${}").is_err());
        assert!(Template::parse("a/${nosuchfn(1)}").is_err());
    }
}
