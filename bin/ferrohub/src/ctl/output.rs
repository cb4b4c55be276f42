//! Output of `ferrohub ctl`: aligned tables and key/value views for people, the API's JSON for
//! scripts. Everything is written to stdout at once; a closed pipe (`| head`) is not an error.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::ValueEnum;
use serde_json::Value;

/// The output format.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// Aligned columns (lists) or key/value lines (single objects).
    Table,
    /// The API's JSON, pretty-printed.
    Json,
}

/// Writes text to stdout; a reader that went away (`| head`) ends the output quietly.
pub(crate) fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to standard output"),
    }
}

/// Prints a JSON document, pretty.
pub(crate) fn emit_json(v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).context("rendering JSON")?;
    s.push('\n');
    emit(&s)
}

/// Replaces control characters (terminal escapes in names, say) by `?`.
pub(crate) fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A field as text: strings as they are, numbers and booleans printed, absent/null as `-`.
pub(crate) fn text(v: &Value, key: &str) -> String {
    scalar(v.get(key))
}

fn scalar(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if s.is_empty() => "-".into(),
        Some(Value::String(s)) => clean(s),
        Some(other) => clean(&other.to_string()),
    }
}

/// `k=v,k2=v2` of a JSON object of strings.
pub(crate) fn pairs(v: Option<&Value>) -> String {
    match v.and_then(Value::as_object) {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    clean(k),
                    v.as_str().map_or_else(|| clean(&v.to_string()), clean)
                )
            })
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}

/// `a,b,c` of a JSON array of strings.
pub(crate) fn list(v: Option<&Value>) -> String {
    match v.and_then(Value::as_array) {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|x| x.as_str().map_or_else(|| clean(&x.to_string()), clean))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}

fn system_time(ms: i64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_millis(u64::try_from(ms).ok()?))
}

/// A time field (ms since the epoch) as RFC 3339 UTC, `-` when absent.
pub(crate) fn time(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_i64)
        .and_then(system_time)
        .map_or_else(
            || "-".into(),
            |t| humantime::format_rfc3339_seconds(t).to_string(),
        )
}

/// A time field as an age: `42s ago`, `5m ago`, `3h ago`, `12d ago`; `never` when absent.
pub(crate) fn ago(v: Option<&Value>) -> String {
    let Some(ms) = v.and_then(Value::as_i64) else {
        return "never".into();
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let secs = (now - ms).max(0) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86_400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// An aligned table.
pub(crate) struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub(crate) fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (cells are cleaned of control characters).
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.iter().map(|c| clean(c)).collect());
    }

    /// Number of rows.
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// The table as text, two spaces between columns.
    pub(crate) fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        let mut out = String::new();
        let mut line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut l = String::new();
            for (i, c) in cells.enumerate() {
                if i > 0 {
                    l.push_str("  ");
                }
                l.push_str(c);
                let pad = widths
                    .get(i)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(c.chars().count());
                l.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(&mut self.header.iter().copied());
        for r in &self.rows {
            line(&mut r.iter().map(String::as_str));
        }
        out
    }

    /// Prints the table, or `none` on stderr when it has no rows.
    pub(crate) fn emit(&self, none: &str) -> Result<()> {
        if self.rows.is_empty() {
            eprintln!("{none}");
            Ok(())
        } else {
            emit(&self.render())
        }
    }
}

/// Key/value lines, keys aligned.
pub(crate) fn key_values(items: &[(&str, String)]) -> String {
    let width = items.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in items {
        out.push_str(&format!(
            "{:width$}  {}\n",
            format!("{k}:"),
            clean(v),
            width = width + 1
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["ID", "NAME"]);
        t.row(vec!["a".into(), "first".into()]);
        t.row(vec!["longer-id".into(), "x\u{1b}[31m".into()]);
        assert_eq!(
            t.render(),
            "ID         NAME\na          first\nlonger-id  x?[31m\n"
        );
    }

    #[test]
    fn fields() {
        let v = serde_json::json!({"s": "x", "n": 3, "z": null, "tags": {"a": "1", "b": "2"}, "g": ["p", "q"]});
        assert_eq!(text(&v, "s"), "x");
        assert_eq!(text(&v, "n"), "3");
        assert_eq!(text(&v, "z"), "-");
        assert_eq!(text(&v, "missing"), "-");
        assert_eq!(pairs(v.get("tags")), "a=1,b=2");
        assert_eq!(list(v.get("g")), "p,q");
        assert_eq!(
            time(&serde_json::json!({"t": 1000}), "t"),
            "1970-01-01T00:00:01Z"
        );
        assert_eq!(ago(None), "never");
    }
}
