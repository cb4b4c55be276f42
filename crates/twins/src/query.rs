//! Fleet queries: a small filter language over device twins, compiled to an SQLite condition.
//!
//! Operators type a filter in the `where=` query parameter of the twin-query API and in the CLI:
//!
//! ```text
//! reported.firmware != desired.firmware
//! tags.site IN ('berlin', 'paris') AND reported.health.battery < 20
//! startsWith(deviceId, 'pump-') AND name = 'default' AND NOT exists(reported.sensors[0])
//! (version > 3 OR updatedAt >= 1735689600000) AND reported.online = true
//! ```
//!
//! In a URL the filter is percent-encoded like any query parameter value:
//! `?where=reported.firmware%20!%3D%20desired.firmware`.
//!
//! # Fields
//!
//! | Field | Value | Type |
//! |---|---|---|
//! | `deviceId` | the device's id | text |
//! | `name` | the twin's name; the default twin is named `'default'` | text |
//! | `version` | the twin's version | integer |
//! | `updatedAt` | the last change, in milliseconds since the Unix epoch | integer |
//! | `desired.…`, `reported.…`, `tags.…` | a value inside that section of the twin | any JSON |
//!
//! Field names are case-sensitive (`deviceId`, not `deviceid`). A section path names at least
//! one key: `desired.fw`, `reported.health.battery`, `tags.site`. Each key after a `.` is either
//! plain (letters, digits, `_` and `-`: `reported.battery-level`, `reported.0`) or quoted with
//! backticks for any other key: ``reported.`battery level` ``, ``tags.`$owner` ``. Keys that
//! contain `"`, `.` or a backtick cannot be queried. `[n]` selects element `n` (from 0) of an
//! array: `reported.sensors[0].kind`, `desired.matrix[1][2]`. Keys are case-sensitive.
//!
//! # Values
//!
//! - Text in single quotes, `'pump 7'`, or double quotes, `"pump 7"`; the quote is doubled
//!   inside: `'it''s'`, `"say ""hi"""`. There are no backslash escapes: `'C:\dir'` is those six
//!   characters.
//! - Numbers: `42`, `-7`, `2.5`, `-1.5e3`. Integers beyond 64 bits are read as floating point.
//!   Text that merely looks like a number must be quoted: `reported.fw = '1.2.3'`.
//! - `true`, `false` and `null`.
//!
//! # Conditions
//!
//! | Condition | Meaning |
//! |---|---|
//! | `a = b`, `a != b` (also `<>`, `==`) | equal, not equal; `a` and `b` are fields or values |
//! | `a < b`, `a <= b`, `a > b`, `a >= b` | ordering |
//! | `f IN ('a', 'b', …)`, `f NOT IN (…)` | equal to one of the values (at most 1000) |
//! | `f IS NULL`, `f IS NOT NULL` | missing or JSON `null` / anything else |
//! | `exists(path)`, `NOT exists(path)` | the key is present, even if its value is `null` |
//! | `startsWith(f, 'prefix')` | `f` is text that starts with `prefix` (`%` and `_` are literal) |
//! | `c AND c`, `c OR c`, `NOT c`, `( c )` | boolean logic |
//!
//! `NOT` binds tighter than `AND`, which binds tighter than `OR`: `NOT a OR b AND c` means
//! `(NOT a) OR (b AND c)`. Keywords and function names are case-insensitive (`and`, `Is Not
//! Null`, `EXISTS(…)`). At least one side of a comparison is a field; the two sides may both be
//! fields, which is the way to find twins whose device has not caught up:
//! `reported.firmware != desired.firmware`.
//!
//! # Semantics
//!
//! - Section values compare as SQLite's `json_extract` returns them: text as text, numbers
//!   numerically (`2 = 2.0`; an integer and a real compare fine), `true`/`false` as `1`/`0` (so
//!   `reported.online = true` works, and so does `= 1`), objects and arrays as their compact JSON
//!   text (`tags.config = '{"a":1}'`). Text never equals a number: `reported.fw = 2` does not
//!   match `"fw": "2"`. Ordering puts numbers before text.
//! - `=` and `!=` are null-safe: a missing key and JSON `null` are both null, null equals null
//!   and differs from every other value. So `reported.fw != desired.fw` is true when `reported`
//!   lacks `fw` but `desired` has it (or the other way round), and false when both lack it. Add
//!   `exists(desired.fw) AND …` to only look at twins that want a firmware. `f = null` is
//!   `f IS NULL`.
//! - An ordering comparison with a null (missing) side is false, and so is `IN` on a missing
//!   value (unless the list contains `null`) and `startsWith` on a missing value or a non-text
//!   value. `NOT` is the exact complement of what it negates: `NOT reported.battery < 20` is true
//!   for twins without a battery value, `f NOT IN (…)` is true for a missing `f`.
//! - `f IS NULL` is true for a missing key and for a key whose value is `null`; `exists(f)` is
//!   true for a present key, including one whose value is `null`.
//! - `version` and `updatedAt` compare with numbers only, `deviceId` and `name` with text only
//!   (a value of the wrong type is an error, not an empty result). `name` is `'default'` for the
//!   default twin everywhere, including ordering, `startsWith` and grouping.
//!
//! # Limits
//!
//! A query is at most 4096 bytes, nests parentheses and `NOT` at most 32 deep, has at most 64
//! conditions and at most 1000 values per `IN` list.
//!
//! # Errors
//!
//! A [`QueryError`] names the 1-based column (byte offset + 1 in the query text) and what to
//! change. For `reported.fw =` that is ``at column 14: expected a value after '=', found end
//! of query (write e.g. reported.fw = '1.2')``; for `foo = 1` it is ``at column 1: unknown
//! field 'foo': fields are deviceId, name, version, updatedAt, desired.…, reported.…, tags.…``.
//!
//! # SQL
//!
//! [`Filter::to_sql`] yields a parenthesised condition over the `twins` table's columns (`device`,
//! `name`, `version`, `updated_at`, `desired`, `reported`, `tags`) with `?` placeholders; every
//! value is a bound parameter and every JSON path is validated and emitted as a quoted SQLite
//! JSON path (`json_extract(reported, '$."health"."battery"')`), so no query text reaches the
//! SQL unescaped. The caller adds the tenant condition and pagination. [`GroupKey`] is the field
//! of a grouped count (`?by=reported.fw_version`): `name` or a section path.

use std::fmt::Write as _;
use std::str::FromStr;

use rusqlite::types::Value;

/// The longest accepted query text, in bytes.
pub const MAX_QUERY_BYTES: usize = 4096;
/// The deepest accepted nesting of parentheses and `NOT`.
pub const MAX_NESTING: usize = 32;
/// The most conditions (comparisons, `IN`, `IS NULL`, `exists`, `startsWith`) in one query.
pub const MAX_CONDITIONS: usize = 64;
/// The most values in one `IN` list.
pub const MAX_IN_VALUES: usize = 1000;

const FIELD_LIST: &str = "deviceId, name, version, updatedAt, desired.…, reported.…, tags.…";

/// Why a query (or a group key) was rejected. Every variant carries the 1-based column (byte
/// offset + 1) where the problem is; the message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The text is not a well-formed query, or a value does not suit its field.
    #[error("at column {column}: {message}")]
    Syntax {
        /// 1-based column of the problem.
        column: usize,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A name that is not a field.
    #[error("at column {column}: unknown field '{field}': fields are {FIELD_LIST}{hint}")]
    UnknownField {
        /// 1-based column of the name.
        column: usize,
        /// The name as written.
        field: String,
        /// Empty, or a parenthesised suggestion starting with a space.
        hint: String,
    },
    /// The query text is longer than [`MAX_QUERY_BYTES`].
    #[error(
        "at column {column}: the query is {len} bytes long, the limit is {limit} (shorten it, \
         e.g. turn several '=' on one field joined by OR into one IN list)"
    )]
    TooLong {
        /// 1-based column of the first byte over the limit.
        column: usize,
        /// Length of the query in bytes.
        len: usize,
        /// The limit, [`MAX_QUERY_BYTES`].
        limit: usize,
    },
    /// Parentheses and `NOT` are nested deeper than [`MAX_NESTING`].
    #[error(
        "at column {column}: parentheses and NOT are nested more than {limit} deep (remove \
         redundant parentheses or double NOTs)"
    )]
    TooDeep {
        /// 1-based column of the `(` or `NOT` over the limit.
        column: usize,
        /// The limit, [`MAX_NESTING`].
        limit: usize,
    },
    /// More conditions than [`MAX_CONDITIONS`].
    #[error(
        "at column {column}: more than {limit} conditions (turn several '=' on one field into \
         one IN list, or split the query)"
    )]
    TooManyConditions {
        /// 1-based column of the first condition over the limit.
        column: usize,
        /// The limit, [`MAX_CONDITIONS`].
        limit: usize,
    },
    /// An `IN` list with more values than [`MAX_IN_VALUES`].
    #[error(
        "at column {column}: more than {limit} values in one IN list (split the query, or tag \
         the devices and filter on the tag)"
    )]
    InListTooLong {
        /// 1-based column of the first value over the limit.
        column: usize,
        /// The limit, [`MAX_IN_VALUES`].
        limit: usize,
    },
}

impl QueryError {
    /// The 1-based column (byte offset + 1) where the problem is.
    pub fn column(&self) -> usize {
        match self {
            QueryError::Syntax { column, .. }
            | QueryError::UnknownField { column, .. }
            | QueryError::TooLong { column, .. }
            | QueryError::TooDeep { column, .. }
            | QueryError::TooManyConditions { column, .. }
            | QueryError::InListTooLong { column, .. } => *column,
        }
    }
}

/// A parsed fleet filter; see the [module documentation](self) for the language.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    expr: Expr,
}

/// A filter as an SQL condition: `sql` is parenthesised and uses `?` placeholders, bound in
/// order to `params`.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledFilter {
    /// The condition, e.g.
    /// `(json_extract(reported, '$."fw"') IS NOT json_extract(desired, '$."fw"'))`.
    pub sql: String,
    /// The values of the `?` placeholders, in order.
    pub params: Vec<Value>,
}

impl Filter {
    /// Parses a filter.
    pub fn parse(text: &str) -> Result<Filter, QueryError> {
        check_length(text)?;
        let mut parser = Parser::new(text);
        let expr = parser.query()?;
        Ok(Filter { expr })
    }

    /// Compiles the filter to an SQL condition over the `twins` table.
    pub fn to_sql(&self) -> CompiledFilter {
        let mut w = SqlWriter::default();
        w.sql.push('(');
        w.expr(&self.expr);
        w.sql.push(')');
        CompiledFilter {
            sql: w.sql,
            params: w.params,
        }
    }
}

impl FromStr for Filter {
    type Err = QueryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Filter::parse(s)
    }
}

/// A field usable to group counts (`?by=reported.fw_version`): only `name` or a section path.
///
/// Grouped values are what `json_extract` returns: text, numbers, `1`/`0` for booleans, compact
/// JSON text for objects and arrays, and NULL for a missing key or a JSON `null`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupKey {
    field: Field,
}

impl GroupKey {
    /// Parses a group key: `name`, or a section path such as `reported.fw_version`.
    pub fn parse(text: &str) -> Result<GroupKey, QueryError> {
        check_length(text)?;
        let mut lexer = Lexer::new(text);
        let tok = lexer.next_token()?;
        let field = match &tok.kind {
            TokKind::Ident { .. } if tok.keyword().is_none() => resolve_field(text, &tok, false)?,
            _ => {
                return Err(syntax(
                    tok.start,
                    format!(
                        "expected a field to group by, found {} (write e.g. reported.fw_version \
                         or name)",
                        describe(text, &tok)
                    ),
                ));
            }
        };
        if !matches!(field, Field::Name | Field::Json(_)) {
            return Err(syntax(
                tok.start,
                format!(
                    "cannot group by '{}': group by name or a desired./reported./tags. path, \
                     e.g. reported.fw_version",
                    &text[tok.start..tok.end]
                ),
            ));
        }
        let next = lexer.next_token()?;
        if next.kind != TokKind::Eof {
            return Err(syntax(
                next.start,
                format!(
                    "expected end of the group key after '{}', found {} (group by one field)",
                    &text[tok.start..tok.end],
                    describe(text, &next)
                ),
            ));
        }
        Ok(GroupKey { field })
    }

    /// The SQL expression of the key, e.g. `json_extract(reported, '$."fw_version"')`; it
    /// contains no placeholders.
    pub fn to_sql(&self) -> String {
        self.field.sql()
    }
}

impl FromStr for GroupKey {
    type Err = QueryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GroupKey::parse(s)
    }
}

fn check_length(text: &str) -> Result<(), QueryError> {
    if text.len() > MAX_QUERY_BYTES {
        return Err(QueryError::TooLong {
            column: MAX_QUERY_BYTES + 1,
            len: text.len(),
            limit: MAX_QUERY_BYTES,
        });
    }
    Ok(())
}

/// A syntax error at byte offset `at`.
fn syntax(at: usize, message: impl Into<String>) -> QueryError {
    QueryError::Syntax {
        column: at + 1,
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// AST
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Desired,
    Reported,
    Tags,
}

impl Section {
    fn column(self) -> &'static str {
        match self {
            Section::Desired => "desired",
            Section::Reported => "reported",
            Section::Tags => "tags",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct JsonPath {
    section: Section,
    /// Never empty; the first step is a key.
    steps: Vec<Step>,
}

impl JsonPath {
    /// The path as an SQL string literal holding an SQLite JSON path: `'$."a"."b"[0]'`.
    fn sql_literal(&self) -> String {
        let mut path = String::from("$");
        for step in &self.steps {
            match step {
                Step::Key(key) => {
                    path.push('.');
                    push_json_string(&mut path, key);
                }
                Step::Index(i) => {
                    let _ = write!(path, "[{i}]");
                }
            }
        }
        format!("'{}'", path.replace('\'', "''"))
    }
}

/// Appends `s` as a JSON string (SQLite decodes JSON escapes in quoted path labels).
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    DeviceId,
    Name,
    Version,
    UpdatedAt,
    Json(JsonPath),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Number,
    Json,
}

impl Field {
    fn kind(&self) -> Kind {
        match self {
            Field::DeviceId | Field::Name => Kind::Text,
            Field::Version | Field::UpdatedAt => Kind::Number,
            Field::Json(_) => Kind::Json,
        }
    }

    /// Whether the field's SQL expression can be NULL (the columns are NOT NULL).
    fn nullable(&self) -> bool {
        matches!(self, Field::Json(_))
    }

    fn sql(&self) -> String {
        match self {
            Field::DeviceId => "device".to_owned(),
            Field::Name => "(CASE name WHEN '' THEN 'default' ELSE name END)".to_owned(),
            Field::Version => "version".to_owned(),
            Field::UpdatedAt => "updated_at".to_owned(),
            Field::Json(path) => {
                format!(
                    "json_extract({}, {})",
                    path.section.column(),
                    path.sql_literal()
                )
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Null,
    Bool(bool),
    Int(i64),
    Real(f64),
    Text(String),
}

impl Literal {
    fn to_value(&self) -> Value {
        match self {
            Literal::Null => Value::Null,
            Literal::Bool(b) => Value::Integer(i64::from(*b)),
            Literal::Int(i) => Value::Integer(*i),
            Literal::Real(r) => Value::Real(*r),
            Literal::Text(s) => Value::Text(s.clone()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    /// The operator with its operands swapped: `a < b` is `b > a`.
    fn flip(self) -> CmpOp {
        match self {
            CmpOp::Eq => CmpOp::Eq,
            CmpOp::Ne => CmpOp::Ne,
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
        }
    }

    fn is_ordering(self) -> bool {
        !matches!(self, CmpOp::Eq | CmpOp::Ne)
    }

    /// Null-safe equality, plain ordering.
    fn sql(self) -> &'static str {
        match self {
            CmpOp::Eq => "IS",
            CmpOp::Ne => "IS NOT",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Rhs {
    Field(Field),
    /// Never [`Literal::Null`] (`= null` becomes [`Expr::IsNull`]).
    Value(Literal),
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Or(Vec<Expr>),
    And(Vec<Expr>),
    Not(Box<Expr>),
    Compare { field: Field, op: CmpOp, rhs: Rhs },
    In { field: Field, values: Vec<Literal> },
    IsNull { field: Field, negated: bool },
    Exists(JsonPath),
    StartsWith { field: Field, prefix: String },
}

impl Expr {
    /// Whether the SQL of this expression can evaluate to NULL (SQL's "unknown"). Under a
    /// `WHERE`, NULL acts as false through AND and OR; only NOT needs it made false first.
    fn may_be_null(&self) -> bool {
        match self {
            Expr::Or(items) | Expr::And(items) => items.iter().any(Expr::may_be_null),
            Expr::Not(_) | Expr::IsNull { .. } | Expr::Exists(_) => false,
            Expr::Compare { field, op, rhs } => {
                op.is_ordering()
                    && (field.nullable() || matches!(rhs, Rhs::Field(g) if g.nullable()))
            }
            Expr::In { field, values } => {
                field.nullable() && !values.iter().any(|v| matches!(v, Literal::Null))
            }
            Expr::StartsWith { field, .. } => field.nullable(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SQL generation
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct SqlWriter {
    sql: String,
    params: Vec<Value>,
}

impl SqlWriter {
    fn param(&mut self, value: Value) {
        self.sql.push('?');
        self.params.push(value);
    }

    fn expr(&mut self, e: &Expr) {
        match e {
            Expr::Or(items) => self.join(items, " OR "),
            Expr::And(items) => self.join(items, " AND "),
            Expr::Not(inner) => {
                if inner.may_be_null() {
                    self.sql.push_str("NOT coalesce(");
                    self.expr(inner);
                    self.sql.push_str(", 0)");
                } else {
                    self.sql.push_str("NOT (");
                    self.expr(inner);
                    self.sql.push(')');
                }
            }
            Expr::Compare { field, op, rhs } => {
                self.sql.push_str(&field.sql());
                self.sql.push(' ');
                self.sql.push_str(op.sql());
                self.sql.push(' ');
                match rhs {
                    Rhs::Field(g) => self.sql.push_str(&g.sql()),
                    Rhs::Value(v) => self.param(v.to_value()),
                }
            }
            Expr::In { field, values } => {
                let f = field.sql();
                let has_null = values.iter().any(|v| matches!(v, Literal::Null));
                let mut non_null = values.iter().filter(|v| !matches!(v, Literal::Null));
                let Some(first) = non_null.next() else {
                    let _ = write!(self.sql, "{f} IS NULL");
                    return;
                };
                if has_null {
                    self.sql.push('(');
                }
                let _ = write!(self.sql, "{f} IN (");
                self.param(first.to_value());
                for v in non_null {
                    self.sql.push_str(", ");
                    self.param(v.to_value());
                }
                self.sql.push(')');
                if has_null {
                    let _ = write!(self.sql, " OR {f} IS NULL)");
                }
            }
            Expr::IsNull { field, negated } => {
                let not = if *negated { "NOT " } else { "" };
                let _ = write!(self.sql, "{} IS {not}NULL", field.sql());
            }
            Expr::Exists(path) => {
                let _ = write!(
                    self.sql,
                    "json_type({}, {}) IS NOT NULL",
                    path.section.column(),
                    path.sql_literal()
                );
            }
            Expr::StartsWith { field, prefix } => {
                // A range on the binary collation (UTF-8 byte order = code point order), so
                // `%` and `_` need no escaping and an index on the field can serve it. Numbers
                // sort before all text, so only text values can match.
                let f = field.sql();
                match prefix_upper_bound(prefix) {
                    Some(upper) => {
                        let _ = write!(self.sql, "({f} >= ");
                        self.param(Value::Text(prefix.clone()));
                        let _ = write!(self.sql, " AND {f} < ");
                        self.param(Value::Text(upper));
                        self.sql.push(')');
                    }
                    None => {
                        let _ = write!(self.sql, "{f} >= ");
                        self.param(Value::Text(prefix.clone()));
                    }
                }
            }
        }
    }

    fn join(&mut self, items: &[Expr], sep: &str) {
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.sql.push_str(sep);
            }
            if matches!(item, Expr::Or(_) | Expr::And(_)) {
                self.sql.push('(');
                self.expr(item);
                self.sql.push(')');
            } else {
                self.expr(item);
            }
        }
    }
}

/// The least string greater than every string starting with `prefix`, if any: the prefix with
/// its last character incremented (dropping trailing U+10FFFF, which cannot be incremented).
fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = last as u32 + 1;
        if next == 0xD800 {
            next = 0xE000;
        }
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum TokKind {
    /// A name with optional `.key`/`[n]` steps: a keyword (no steps), a field or a path.
    Ident {
        head: String,
        steps: Vec<Step>,
    },
    Str(String),
    Int(i64),
    Real(f64),
    Op(CmpOp),
    LParen,
    RParen,
    Comma,
    Eof,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kw {
    And,
    Or,
    Not,
    In,
    Is,
    Null,
    True,
    False,
    Exists,
    StartsWith,
}

#[derive(Debug, Clone, PartialEq)]
struct Token {
    kind: TokKind,
    /// Byte offsets into the query.
    start: usize,
    end: usize,
}

impl Token {
    fn keyword(&self) -> Option<Kw> {
        let TokKind::Ident { head, steps } = &self.kind else {
            return None;
        };
        if !steps.is_empty() {
            return None;
        }
        Some(match head.to_ascii_lowercase().as_str() {
            "and" => Kw::And,
            "or" => Kw::Or,
            "not" => Kw::Not,
            "in" => Kw::In,
            "is" => Kw::Is,
            "null" => Kw::Null,
            "true" => Kw::True,
            "false" => Kw::False,
            "exists" => Kw::Exists,
            "startswith" => Kw::StartsWith,
            _ => return None,
        })
    }
}

/// How a token is named in an error message.
fn describe(src: &str, tok: &Token) -> String {
    if tok.kind == TokKind::Eof {
        return "end of query".to_owned();
    }
    let text = &src[tok.start..tok.end];
    let shown: String = if text.chars().count() > 30 {
        text.chars().take(30).chain(std::iter::once('…')).collect()
    } else {
        text.to_owned()
    };
    match tok.kind {
        TokKind::Str(_) => format!("the text {shown}"),
        _ => format!("'{shown}'"),
    }
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        Lexer { src, pos: 0 }
    }

    fn byte(&self, at: usize) -> Option<u8> {
        self.src.as_bytes().get(at).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(c) = self.src[self.pos..].chars().next()
            && c.is_whitespace()
        {
            self.pos += c.len_utf8();
        }
    }

    fn next_token(&mut self) -> Result<Token, QueryError> {
        self.skip_whitespace();
        let start = self.pos;
        let Some(b) = self.byte(start) else {
            return Ok(Token {
                kind: TokKind::Eof,
                start,
                end: start,
            });
        };
        let next = self.byte(start + 1);
        let (kind, len) = match b {
            b'(' => (TokKind::LParen, 1),
            b')' => (TokKind::RParen, 1),
            b',' => (TokKind::Comma, 1),
            b'=' if next == Some(b'=') => (TokKind::Op(CmpOp::Eq), 2),
            b'=' => (TokKind::Op(CmpOp::Eq), 1),
            b'!' if next == Some(b'=') => (TokKind::Op(CmpOp::Ne), 2),
            b'<' if next == Some(b'>') => (TokKind::Op(CmpOp::Ne), 2),
            b'<' if next == Some(b'=') => (TokKind::Op(CmpOp::Le), 2),
            b'<' => (TokKind::Op(CmpOp::Lt), 1),
            b'>' if next == Some(b'=') => (TokKind::Op(CmpOp::Ge), 2),
            b'>' => (TokKind::Op(CmpOp::Gt), 1),
            b'!' => {
                return Err(syntax(
                    start,
                    "write NOT instead of '!' (or != for not equal)",
                ));
            }
            b'&' => return Err(syntax(start, "write AND instead of '&'")),
            b'|' => return Err(syntax(start, "write OR instead of '|'")),
            b'\'' | b'"' => return self.string(b),
            b'-' | b'0'..=b'9' => return self.number(),
            b if b.is_ascii_alphabetic() || b == b'_' => return self.ident(),
            b'`' => {
                return Err(syntax(
                    start,
                    "a backtick-quoted key must follow a section and a dot, e.g. \
                     reported.`battery level`",
                ));
            }
            _ => {
                let c = self.src[start..].chars().next().unwrap_or('?');
                return Err(syntax(
                    start,
                    format!(
                        "unexpected character '{}' (quote text values: 'like this')",
                        c.escape_debug()
                    ),
                ));
            }
        };
        self.pos = start + len;
        Ok(Token {
            kind,
            start,
            end: self.pos,
        })
    }

    fn string(&mut self, quote: u8) -> Result<Token, QueryError> {
        let start = self.pos;
        let bytes = self.src.as_bytes();
        let mut out = String::new();
        let mut pos = start + 1;
        loop {
            let Some(off) = bytes[pos..].iter().position(|&b| b == quote) else {
                let q = quote as char;
                return Err(syntax(
                    start,
                    format!(
                        "unterminated text value: add the closing {q} (write a {q} inside the \
                         value as {q}{q})"
                    ),
                ));
            };
            let at = pos + off;
            out.push_str(&self.src[pos..at]);
            if bytes.get(at + 1) == Some(&quote) {
                out.push(quote as char);
                pos = at + 2;
            } else {
                self.pos = at + 1;
                return Ok(Token {
                    kind: TokKind::Str(out),
                    start,
                    end: self.pos,
                });
            }
        }
    }

    fn number(&mut self) -> Result<Token, QueryError> {
        let start = self.pos;
        let mut pos = start;
        let digits = |pos: &mut usize| {
            let from = *pos;
            while self.byte(*pos).is_some_and(|b| b.is_ascii_digit()) {
                *pos += 1;
            }
            *pos > from
        };
        if self.byte(pos) == Some(b'-') {
            pos += 1;
            if !self.byte(pos).is_some_and(|b| b.is_ascii_digit()) {
                return Err(syntax(
                    start,
                    "expected a number after '-' (write negative numbers as -5)",
                ));
            }
        }
        digits(&mut pos);
        let mut integer = true;
        if self.byte(pos) == Some(b'.') && self.byte(pos + 1).is_some_and(|b| b.is_ascii_digit()) {
            pos += 1;
            digits(&mut pos);
            integer = false;
        }
        if matches!(self.byte(pos), Some(b'e' | b'E')) {
            let mut exp = pos + 1;
            if matches!(self.byte(exp), Some(b'+' | b'-')) {
                exp += 1;
            }
            if digits(&mut exp) {
                pos = exp;
                integer = false;
            }
        }
        if self
            .byte(pos)
            .is_some_and(|b| is_key_byte(b) || b == b'.' || b == b'`' || b == b'[')
        {
            // Something like 1.2.3 or 12ab: most likely text that should be quoted.
            while self.byte(pos).is_some_and(|b| is_key_byte(b) || b == b'.') {
                pos += 1;
            }
            let text = &self.src[start..pos];
            return Err(syntax(
                start,
                format!("invalid number '{text}' (quote text values: '{text}')"),
            ));
        }
        let text = &self.src[start..pos];
        let parsed_int = if integer {
            text.parse::<i64>().ok()
        } else {
            None
        };
        let kind = match parsed_int {
            Some(i) => TokKind::Int(i),
            None => match text.parse::<f64>() {
                Ok(r) if r.is_finite() => TokKind::Real(r),
                _ => {
                    return Err(syntax(start, format!("number '{text}' is out of range")));
                }
            },
        };
        self.pos = pos;
        Ok(Token {
            kind,
            start,
            end: pos,
        })
    }

    fn ident(&mut self) -> Result<Token, QueryError> {
        let start = self.pos;
        let mut pos = start;
        while self.byte(pos).is_some_and(is_key_byte) {
            pos += 1;
        }
        let head = self.src[start..pos].to_owned();
        let mut steps = Vec::new();
        loop {
            match self.byte(pos) {
                Some(b'.') => {
                    pos += 1;
                    match self.byte(pos) {
                        Some(b'`') => {
                            let open = pos;
                            let Some(len) = self.src[open + 1..].find('`') else {
                                return Err(syntax(
                                    open,
                                    "unterminated key: add the closing backtick",
                                ));
                            };
                            let key = &self.src[open + 1..open + 1 + len];
                            if key.is_empty() {
                                return Err(syntax(
                                    open,
                                    "empty key ``: write a key between the backticks",
                                ));
                            }
                            if let Some(bad) = key.find(['"', '.']) {
                                return Err(syntax(
                                    open + 1 + bad,
                                    "keys containing '\"' or '.' cannot be queried",
                                ));
                            }
                            steps.push(Step::Key(key.to_owned()));
                            pos = open + 1 + len + 1;
                        }
                        Some(b) if is_key_byte(b) => {
                            let from = pos;
                            while self.byte(pos).is_some_and(is_key_byte) {
                                pos += 1;
                            }
                            steps.push(Step::Key(self.src[from..pos].to_owned()));
                        }
                        _ => {
                            return Err(syntax(
                                pos,
                                "expected a key after '.' (keys are letters, digits, '_' and \
                                 '-'; quote other keys with backticks: reported.`my key`)",
                            ));
                        }
                    }
                }
                Some(b'[') => {
                    let open = pos;
                    pos += 1;
                    let from = pos;
                    while self.byte(pos).is_some_and(|b| b.is_ascii_digit()) {
                        pos += 1;
                    }
                    if pos == from || self.byte(pos) != Some(b']') {
                        return Err(syntax(
                            open,
                            "expected an array index like [0] (quote keys with backticks: \
                             reported.`my key`)",
                        ));
                    }
                    let Ok(index) = self.src[from..pos].parse::<u32>() else {
                        return Err(syntax(from, "array index too large"));
                    };
                    steps.push(Step::Index(index));
                    pos += 1;
                }
                _ => break,
            }
        }
        self.pos = pos;
        Ok(Token {
            kind: TokKind::Ident { head, steps },
            start,
            end: pos,
        })
    }
}

/// Resolves an identifier token to a field; `value_side` adds a hint to quote text values.
fn resolve_field(src: &str, tok: &Token, value_side: bool) -> Result<Field, QueryError> {
    let TokKind::Ident { head, steps } = &tok.kind else {
        return Err(syntax(tok.start, "expected a field"));
    };
    let written = &src[tok.start..tok.end];
    let plain = match head.as_str() {
        "deviceId" => Some(Field::DeviceId),
        "name" => Some(Field::Name),
        "version" => Some(Field::Version),
        "updatedAt" => Some(Field::UpdatedAt),
        _ => None,
    };
    if let Some(field) = plain {
        if !steps.is_empty() {
            return Err(syntax(
                tok.start + head.len(),
                format!(
                    "'{head}' has no keys: paths into the twin start with desired., reported. \
                     or tags."
                ),
            ));
        }
        return Ok(field);
    }
    let section = match head.as_str() {
        "desired" => Section::Desired,
        "reported" => Section::Reported,
        "tags" => Section::Tags,
        _ => {
            let hint = if value_side {
                format!(
                    " (to compare with text, quote it: '{}')",
                    written.replace('\'', "''")
                )
            } else {
                match suggest_field(head) {
                    Some(s) => format!(" (did you mean {s}?)"),
                    None => String::new(),
                }
            };
            return Err(QueryError::UnknownField {
                column: tok.start + 1,
                field: written.to_owned(),
                hint,
            });
        }
    };
    match steps.first() {
        Some(Step::Key(_)) => Ok(Field::Json(JsonPath {
            section,
            steps: steps.clone(),
        })),
        Some(Step::Index(_)) => Err(syntax(
            tok.start + head.len(),
            format!("'{head}' is an object: write a key first, e.g. {head}.sensors[0]"),
        )),
        None => Err(syntax(
            tok.end,
            format!("write a key after '{head}', e.g. {head}.fw"),
        )),
    }
}

fn suggest_field(head: &str) -> Option<&'static str> {
    let lower = head.to_ascii_lowercase().replace(['_', '-'], "");
    Some(match lower.as_str() {
        "deviceid" | "device" | "id" => "deviceId",
        "name" | "twin" | "twinname" => "name",
        "version" | "ver" => "version",
        "updatedat" | "updated" | "lastupdated" | "timestamp" => "updatedAt",
        "desired" => "desired.…",
        "reported" => "reported.…",
        "tags" | "tag" => "tags.…",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------------

enum Operand {
    Field(Field),
    Value(Literal),
}

struct Parser<'a> {
    src: &'a str,
    lexer: Lexer<'a>,
    peeked: Option<Token>,
    depth: usize,
    conditions: usize,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Self {
        Parser {
            src,
            lexer: Lexer::new(src),
            peeked: None,
            depth: 0,
            conditions: 0,
        }
    }

    fn peek(&mut self) -> Result<&Token, QueryError> {
        if self.peeked.is_none() {
            self.peeked = Some(self.lexer.next_token()?);
        }
        match &self.peeked {
            Some(tok) => Ok(tok),
            None => Err(syntax(self.lexer.pos, "internal error: no token")),
        }
    }

    fn bump(&mut self) -> Result<Token, QueryError> {
        match self.peeked.take() {
            Some(tok) => Ok(tok),
            None => self.lexer.next_token(),
        }
    }

    fn peek_keyword(&mut self) -> Result<Option<Kw>, QueryError> {
        Ok(self.peek()?.keyword())
    }

    fn text(&self, tok: &Token) -> &'a str {
        &self.src[tok.start..tok.end]
    }

    fn describe(&self, tok: &Token) -> String {
        describe(self.src, tok)
    }

    fn query(&mut self) -> Result<Expr, QueryError> {
        if self.peek()?.kind == TokKind::Eof {
            return Err(syntax(
                0,
                "the query is empty (write e.g. reported.fw != desired.fw)",
            ));
        }
        let expr = self.or()?;
        let tok = self.bump()?;
        match tok.kind {
            TokKind::Eof => Ok(expr),
            TokKind::RParen => Err(syntax(
                tok.start,
                "unmatched ')': remove it or add the '(' it closes",
            )),
            _ => Err(syntax(
                tok.start,
                format!(
                    "expected AND, OR or end of query, found {}",
                    self.describe(&tok)
                ),
            )),
        }
    }

    fn or(&mut self) -> Result<Expr, QueryError> {
        let mut items = vec![self.and()?];
        while self.peek_keyword()? == Some(Kw::Or) {
            self.bump()?;
            items.push(self.and()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Expr::Or(items)
        })
    }

    fn and(&mut self) -> Result<Expr, QueryError> {
        let mut items = vec![self.not()?];
        while self.peek_keyword()? == Some(Kw::And) {
            self.bump()?;
            items.push(self.not()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Expr::And(items)
        })
    }

    fn enter(&mut self, at: usize) -> Result<(), QueryError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(QueryError::TooDeep {
                column: at + 1,
                limit: MAX_NESTING,
            });
        }
        Ok(())
    }

    fn not(&mut self) -> Result<Expr, QueryError> {
        if self.peek_keyword()? == Some(Kw::Not) {
            let tok = self.bump()?;
            self.enter(tok.start)?;
            let inner = self.not()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(inner)));
        }
        self.primary()
    }

    fn count_condition(&mut self, at: usize) -> Result<(), QueryError> {
        self.conditions += 1;
        if self.conditions > MAX_CONDITIONS {
            return Err(QueryError::TooManyConditions {
                column: at + 1,
                limit: MAX_CONDITIONS,
            });
        }
        Ok(())
    }

    fn primary(&mut self) -> Result<Expr, QueryError> {
        let tok = self.bump()?;
        match (&tok.kind, tok.keyword()) {
            (TokKind::LParen, _) => {
                self.enter(tok.start)?;
                let inner = self.or()?;
                let close = self.bump()?;
                if close.kind != TokKind::RParen {
                    return Err(syntax(
                        close.start,
                        format!(
                            "expected AND, OR or ')' closing the '(' at column {}, found {}",
                            tok.start + 1,
                            self.describe(&close)
                        ),
                    ));
                }
                self.depth -= 1;
                Ok(inner)
            }
            (_, Some(Kw::Exists)) => self.exists(tok),
            (_, Some(Kw::StartsWith)) => self.starts_with(tok),
            (TokKind::Ident { steps, .. }, None)
                if steps.is_empty() && self.src[tok.end..].trim_start().starts_with('(') =>
            {
                Err(syntax(
                    tok.start,
                    format!(
                        "unknown function '{}': the functions are exists(path) and \
                         startsWith(field, 'prefix')",
                        self.text(&tok)
                    ),
                ))
            }
            _ => self.predicate(tok),
        }
    }

    fn expect_lparen(&mut self, func: &Token, example: &str) -> Result<(), QueryError> {
        let tok = self.bump()?;
        if tok.kind != TokKind::LParen {
            return Err(syntax(
                tok.start,
                format!(
                    "expected '(' after {}, found {} (write e.g. {example})",
                    self.text(func),
                    self.describe(&tok)
                ),
            ));
        }
        Ok(())
    }

    fn expect_rparen(&mut self, func: &Token, example: &str) -> Result<(), QueryError> {
        let tok = self.bump()?;
        if tok.kind != TokKind::RParen {
            return Err(syntax(
                tok.start,
                format!(
                    "expected ')' closing {}(, found {} (write e.g. {example})",
                    self.text(func),
                    self.describe(&tok)
                ),
            ));
        }
        Ok(())
    }

    /// The field argument of a function, or an error naming what was found.
    fn field_arg(&mut self, func: &Token, example: &str) -> Result<(Token, Field), QueryError> {
        let tok = self.bump()?;
        if matches!(tok.kind, TokKind::Ident { .. }) && tok.keyword().is_none() {
            let field = resolve_field(self.src, &tok, false)?;
            return Ok((tok, field));
        }
        Err(syntax(
            tok.start,
            format!(
                "expected a field in {}(…), found {} (write e.g. {example})",
                self.text(func),
                self.describe(&tok)
            ),
        ))
    }

    fn exists(&mut self, func: Token) -> Result<Expr, QueryError> {
        const EXAMPLE: &str = "exists(reported.fw)";
        self.count_condition(func.start)?;
        self.expect_lparen(&func, EXAMPLE)?;
        let (arg, field) = self.field_arg(&func, EXAMPLE)?;
        let Field::Json(path) = field else {
            return Err(syntax(
                arg.start,
                format!(
                    "exists() takes a desired./reported./tags. path; '{}' always exists",
                    self.text(&arg)
                ),
            ));
        };
        self.expect_rparen(&func, EXAMPLE)?;
        Ok(Expr::Exists(path))
    }

    fn starts_with(&mut self, func: Token) -> Result<Expr, QueryError> {
        const EXAMPLE: &str = "startsWith(deviceId, 'pump-')";
        self.count_condition(func.start)?;
        self.expect_lparen(&func, EXAMPLE)?;
        let (arg, field) = self.field_arg(&func, EXAMPLE)?;
        if field.kind() == Kind::Number {
            return Err(syntax(
                arg.start,
                format!(
                    "'{}' is a number; startsWith() works on text: deviceId, name or a \
                     desired./reported./tags. path",
                    self.text(&arg)
                ),
            ));
        }
        let comma = self.bump()?;
        if comma.kind != TokKind::Comma {
            return Err(syntax(
                comma.start,
                format!(
                    "expected ',' after the field in startsWith(…), found {} (write e.g. \
                     {EXAMPLE})",
                    self.describe(&comma)
                ),
            ));
        }
        let prefix_tok = self.bump()?;
        let TokKind::Str(prefix) = prefix_tok.kind.clone() else {
            return Err(syntax(
                prefix_tok.start,
                format!(
                    "expected a quoted prefix in startsWith(…), found {} (write e.g. {EXAMPLE})",
                    self.describe(&prefix_tok)
                ),
            ));
        };
        self.expect_rparen(&func, EXAMPLE)?;
        Ok(Expr::StartsWith { field, prefix })
    }

    /// Reads an operand from `tok`: `Ok(None)` if it is not one (the caller reports it).
    fn operand(&self, tok: &Token, value_side: bool) -> Result<Option<Operand>, QueryError> {
        let literal = match (&tok.kind, tok.keyword()) {
            (TokKind::Str(s), _) => Literal::Text(s.clone()),
            (TokKind::Int(i), _) => Literal::Int(*i),
            (TokKind::Real(r), _) => Literal::Real(*r),
            (_, Some(Kw::True)) => Literal::Bool(true),
            (_, Some(Kw::False)) => Literal::Bool(false),
            (_, Some(Kw::Null)) => Literal::Null,
            (_, Some(_)) => return Ok(None),
            (TokKind::Ident { .. }, None) => {
                return Ok(Some(Operand::Field(resolve_field(
                    self.src, tok, value_side,
                )?)));
            }
            _ => return Ok(None),
        };
        Ok(Some(Operand::Value(literal)))
    }

    fn predicate(&mut self, first: Token) -> Result<Expr, QueryError> {
        let Some(left) = self.operand(&first, false)? else {
            return Err(syntax(
                first.start,
                format!(
                    "expected a condition, found {} (write e.g. reported.fw = '1.2', \
                     exists(tags.site) or NOT (…))",
                    self.describe(&first)
                ),
            ));
        };
        self.count_condition(first.start)?;
        let left_text = self.text(&first);
        let tok = self.bump()?;
        match (&tok.kind, tok.keyword()) {
            (TokKind::Op(op), _) => {
                let op = *op;
                let op_text = self.text(&tok);
                let right_tok = self.bump()?;
                let Some(right) = self.operand(&right_tok, true)? else {
                    let example = match &left {
                        Operand::Field(f) if f.kind() == Kind::Number => "3",
                        Operand::Field(Field::Name) => "'default'",
                        Operand::Field(Field::DeviceId) => "'pump-7'",
                        _ => "'1.2'",
                    };
                    return Err(syntax(
                        right_tok.start,
                        format!(
                            "expected a value after '{op_text}', found {} (write e.g. \
                             {left_text} {op_text} {example})",
                            self.describe(&right_tok)
                        ),
                    ));
                };
                self.compare(left, &first, op, op_text, right, &right_tok)
            }
            (_, Some(Kw::In)) => self.in_list(left, &first, false),
            (_, Some(Kw::Not)) => {
                let in_tok = self.bump()?;
                if in_tok.keyword() != Some(Kw::In) {
                    return Err(syntax(
                        in_tok.start,
                        format!(
                            "expected IN after NOT, found {} (write {left_text} NOT IN ('a', \
                             'b'), or NOT {left_text} = 'a')",
                            self.describe(&in_tok)
                        ),
                    ));
                }
                self.in_list(left, &first, true)
            }
            (_, Some(Kw::Is)) => {
                let mut negated = false;
                let mut next = self.bump()?;
                if next.keyword() == Some(Kw::Not) {
                    negated = true;
                    next = self.bump()?;
                }
                if next.keyword() != Some(Kw::Null) {
                    return Err(syntax(
                        next.start,
                        format!(
                            "expected NULL or NOT NULL after IS, found {} (to compare values \
                             use = or !=)",
                            self.describe(&next)
                        ),
                    ));
                }
                let Operand::Field(field) = left else {
                    return Err(syntax(
                        first.start,
                        format!(
                            "the left side of IS {}NULL must be a field, e.g. reported.fw IS NULL",
                            if negated { "NOT " } else { "" }
                        ),
                    ));
                };
                Ok(Expr::IsNull { field, negated })
            }
            _ => Err(syntax(
                tok.start,
                format!(
                    "expected a comparison after '{left_text}' (=, !=, <, <=, >, >=, IN, NOT \
                     IN, IS NULL or IS NOT NULL), found {}",
                    self.describe(&tok)
                ),
            )),
        }
    }

    fn compare(
        &self,
        left: Operand,
        left_tok: &Token,
        op: CmpOp,
        op_text: &str,
        right: Operand,
        right_tok: &Token,
    ) -> Result<Expr, QueryError> {
        match (left, right) {
            (Operand::Field(field), Operand::Field(other)) => Ok(Expr::Compare {
                field,
                op,
                rhs: Rhs::Field(other),
            }),
            (Operand::Field(field), Operand::Value(v)) => {
                self.field_value(field, left_tok, op, op_text, v, right_tok)
            }
            (Operand::Value(v), Operand::Field(field)) => {
                self.field_value(field, right_tok, op.flip(), op_text, v, left_tok)
            }
            (Operand::Value(_), Operand::Value(_)) => Err(syntax(
                left_tok.start,
                format!(
                    "both sides of '{op_text}' are values: compare a field with a value or with \
                     another field, e.g. reported.fw = '1.2'"
                ),
            )),
        }
    }

    fn field_value(
        &self,
        field: Field,
        field_tok: &Token,
        op: CmpOp,
        op_text: &str,
        value: Literal,
        value_tok: &Token,
    ) -> Result<Expr, QueryError> {
        self.check_type(&field, field_tok, &value, value_tok)?;
        if value == Literal::Null {
            return match op {
                CmpOp::Eq => Ok(Expr::IsNull {
                    field,
                    negated: false,
                }),
                CmpOp::Ne => Ok(Expr::IsNull {
                    field,
                    negated: true,
                }),
                _ => Err(syntax(
                    value_tok.start,
                    format!(
                        "'{op_text}' with null is never true: compare null with = or != (or \
                         write IS NULL / IS NOT NULL)"
                    ),
                )),
            };
        }
        Ok(Expr::Compare {
            field,
            op,
            rhs: Rhs::Value(value),
        })
    }

    /// `version`/`updatedAt` take numbers, `deviceId`/`name` take text.
    fn check_type(
        &self,
        field: &Field,
        field_tok: &Token,
        value: &Literal,
        value_tok: &Token,
    ) -> Result<(), QueryError> {
        let name = self.text(field_tok);
        match (field.kind(), value) {
            (Kind::Number, Literal::Int(_) | Literal::Real(_))
            | (Kind::Text, Literal::Text(_))
            | (Kind::Json, _) => Ok(()),
            (Kind::Number, _) => Err(syntax(
                value_tok.start,
                format!("'{name}' is a number: compare it with a number, e.g. {name} >= 3"),
            )),
            (Kind::Text, _) => {
                let example = if *field == Field::Name {
                    "'default'"
                } else {
                    "'pump-7'"
                };
                Err(syntax(
                    value_tok.start,
                    format!("'{name}' is text: quote the value, e.g. {name} = {example}"),
                ))
            }
        }
    }

    fn in_list(
        &mut self,
        left: Operand,
        left_tok: &Token,
        negated: bool,
    ) -> Result<Expr, QueryError> {
        let example = "tags.site IN ('berlin', 'paris')";
        let Operand::Field(field) = left else {
            return Err(syntax(
                left_tok.start,
                format!("the left side of IN must be a field, e.g. {example}"),
            ));
        };
        let open = self.bump()?;
        if open.kind != TokKind::LParen {
            return Err(syntax(
                open.start,
                format!(
                    "expected '(' after IN, found {} (write e.g. {example})",
                    self.describe(&open)
                ),
            ));
        }
        let mut values = Vec::new();
        loop {
            let tok = self.bump()?;
            if tok.kind == TokKind::RParen && values.is_empty() {
                return Err(syntax(
                    tok.start,
                    format!("an IN list needs at least one value, e.g. {example}"),
                ));
            }
            let value = match self.operand(&tok, true)? {
                Some(Operand::Value(v)) => v,
                Some(Operand::Field(_)) => {
                    return Err(syntax(
                        tok.start,
                        format!(
                            "an IN list holds values, not fields, e.g. {example} (compare two \
                             fields with =)"
                        ),
                    ));
                }
                None => {
                    return Err(syntax(
                        tok.start,
                        format!(
                            "expected a value in the IN list, found {} (write e.g. {example})",
                            self.describe(&tok)
                        ),
                    ));
                }
            };
            if values.len() == MAX_IN_VALUES {
                return Err(QueryError::InListTooLong {
                    column: tok.start + 1,
                    limit: MAX_IN_VALUES,
                });
            }
            self.check_type(&field, left_tok, &value, &tok)?;
            values.push(value);
            let sep = self.bump()?;
            match sep.kind {
                TokKind::Comma => {}
                TokKind::RParen => break,
                _ => {
                    return Err(syntax(
                        sep.start,
                        format!(
                            "expected ',' or ')' in the IN list opened at column {}, found {}",
                            open.start + 1,
                            self.describe(&sep)
                        ),
                    ));
                }
            }
        }
        let expr = Expr::In { field, values };
        Ok(if negated {
            Expr::Not(Box::new(expr))
        } else {
            expr
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rusqlite::{Connection, params_from_iter};
    use serde_json::json;

    const SCHEMA: &str = "CREATE TABLE twins (
        tenant TEXT NOT NULL, device TEXT NOT NULL, name TEXT NOT NULL,
        version INTEGER NOT NULL, updated_at INTEGER NOT NULL,
        desired TEXT NOT NULL, reported TEXT NOT NULL, tags TEXT NOT NULL,
        doc TEXT NOT NULL,
        PRIMARY KEY (tenant, device, name)) WITHOUT ROWID;";

    type Row = (
        &'static str,
        &'static str,
        &'static str,
        i64,
        i64,
        serde_json::Value,
        serde_json::Value,
        serde_json::Value,
    );

    fn rows() -> Vec<Row> {
        vec![
            (
                "t1",
                "pump-1",
                "",
                3,
                1000,
                json!({"fw": "1.2", "interval": 30, "mode": "eco"}),
                json!({"fw": "1.2", "online": true, "health": {"battery": 80, "temp": 21.5},
                       "sensors": [{"kind": "temp"}, {"kind": "hum"}]}),
                json!({"site": "berlin", "floor": 3, "config": {"a": 1}}),
            ),
            (
                "t1",
                "pump-2",
                "",
                5,
                2000,
                json!({"fw": "1.3"}),
                json!({"fw": "1.2", "online": false, "health": {"battery": 15}}),
                json!({"site": "paris"}),
            ),
            (
                "t1",
                "pump-3",
                "",
                1,
                3000,
                json!({"fw": "1.3"}),
                json!({"online": true}),
                json!({"site": null}),
            ),
            (
                "t1",
                "pump-4",
                "",
                2,
                4000,
                json!({}),
                json!({"fw": "1.1", "health": {"battery": 50.5}}),
                json!({}),
            ),
            (
                "t1",
                "pump-4",
                "lamp",
                7,
                4500,
                json!({"on": true}),
                json!({"on": false, "fw": "0.9"}),
                json!({"site": "berlin"}),
            ),
            (
                "t1",
                "sensor_1",
                "",
                1,
                5000,
                json!({"fw": "2"}),
                json!({"fw": 2, "sensors": [{"kind": "hum"}]}),
                json!({"site": "berl", "note": "it's"}),
            ),
            (
                "t1",
                "sensor%2",
                "",
                1,
                6000,
                json!({"fw": "2"}),
                json!({"fw": "2"}),
                json!({"site": "100%_off"}),
            ),
            (
                "t1",
                "sensorX3",
                "",
                1,
                7000,
                json!({}),
                json!({"o'neil": "x", "my key": {"a b": 1}, "a\\b": "bs",
                       "'; DROP TABLE twins; --": 1, "-": "dash", "0": "zero", "café": "au lait"}),
                json!({"site": "Berlin"}),
            ),
            (
                "t1",
                "sensorX3",
                "cfg",
                2,
                8000,
                json!({"mode": "eco"}),
                json!({"mode": "eco"}),
                json!({}),
            ),
            (
                "t1",
                "pump-5",
                "",
                9,
                9000,
                json!({"fw": null}),
                json!({"fw": null}),
                json!({"site": "berlin_2"}),
            ),
            // Another tenant: matches many filters, must never show up.
            (
                "t2",
                "pump-1",
                "",
                1,
                1000,
                json!({"fw": "9"}),
                json!({"fw": "1", "online": true}),
                json!({"site": "berlin"}),
            ),
        ]
    }

    const ALL: [&str; 10] = [
        "pump-1",
        "pump-2",
        "pump-3",
        "pump-4",
        "pump-4/lamp",
        "sensor_1",
        "sensor%2",
        "sensorX3",
        "sensorX3/cfg",
        "pump-5",
    ];

    fn insert(c: &Connection, row: &Row) {
        let (tenant, device, name, version, updated_at, desired, reported, tags) = row;
        let doc = json!({"desired": desired, "reported": reported, "tags": tags});
        c.execute(
            "INSERT INTO twins VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rusqlite::params![
                tenant,
                device,
                name,
                version,
                updated_at,
                desired.to_string(),
                reported.to_string(),
                tags.to_string(),
                doc.to_string()
            ],
        )
        .unwrap();
    }

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(SCHEMA).unwrap();
        for row in rows() {
            insert(&c, &row);
        }
        c
    }

    /// Runs a compiled filter the way the caller does; twins as `device` or `device/name`.
    fn run(c: &Connection, f: &CompiledFilter) -> rusqlite::Result<Vec<String>> {
        let sql = format!(
            "SELECT device, name FROM twins WHERE tenant = ? AND {} ORDER BY device, name",
            f.sql
        );
        let params = std::iter::once(Value::Text("t1".into())).chain(f.params.iter().cloned());
        let mut stmt = c.prepare(&sql)?;
        let rows = stmt.query_map(params_from_iter(params), |r| {
            let device: String = r.get(0)?;
            let name: String = r.get(1)?;
            Ok(if name.is_empty() {
                device
            } else {
                format!("{device}/{name}")
            })
        })?;
        rows.collect()
    }

    fn matching(c: &Connection, query: &str) -> Vec<String> {
        let filter = Filter::parse(query).unwrap_or_else(|e| panic!("{query}: {e}"));
        let compiled = filter.to_sql();
        assert_eq!(
            compiled.sql.matches('?').count(),
            compiled.params.len(),
            "{query}: {}",
            compiled.sql
        );
        run(c, &compiled).unwrap_or_else(|e| panic!("{query}: {e}\n{}", compiled.sql))
    }

    #[track_caller]
    fn check(c: &Connection, query: &str, expected: &[&str]) {
        let mut got = matching(c, query);
        got.sort();
        let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(got, want, "query: {query}");
    }

    fn all_except(excluded: &[&str]) -> Vec<&'static str> {
        ALL.iter()
            .copied()
            .filter(|t| !excluded.contains(t))
            .collect()
    }

    #[track_caller]
    fn err(query: &str) -> QueryError {
        match Filter::parse(query) {
            Ok(f) => panic!("{query} parsed: {f:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn firmware_mismatch_between_sections() {
        let c = db();
        // Null-safe: missing on one side counts as different, missing on both as equal.
        check(
            &c,
            "reported.fw != desired.fw",
            &["pump-2", "pump-3", "pump-4", "pump-4/lamp", "sensor_1"],
        );
        check(
            &c,
            "reported.fw <> desired.fw",
            &["pump-2", "pump-3", "pump-4", "pump-4/lamp", "sensor_1"],
        );
        check(
            &c,
            "exists(desired.fw) AND reported.fw != desired.fw",
            &["pump-2", "pump-3", "sensor_1"],
        );
        check(
            &c,
            "reported.fw = desired.fw",
            &["pump-1", "sensor%2", "sensorX3", "sensorX3/cfg", "pump-5"],
        );
        // Both sides missing are equal.
        check(&c, "reported.mode = desired.mode", &all_except(&["pump-1"]));
        check(&c, "reported.on != desired.on", &["pump-4/lamp"]);
        // Ordering between fields: false when a side is missing.
        check(
            &c,
            "reported.health.battery > desired.interval",
            &["pump-1"],
        );
        check(&c, "reported.health.battery <= desired.interval", &[]);
        // A column against a section value.
        check(&c, "version = tags.floor", &["pump-1"]);
        check(&c, "tags.floor = version", &["pump-1"]);
        check(&c, "version < tags.floor", &[]);
    }

    #[test]
    fn comparison_operators_on_numbers() {
        let c = db();
        check(&c, "reported.health.battery < 20", &["pump-2"]);
        check(&c, "reported.health.battery <= 15", &["pump-2"]);
        check(&c, "reported.health.battery > 15", &["pump-1", "pump-4"]);
        check(&c, "reported.health.battery >= 50.5", &["pump-1", "pump-4"]);
        check(&c, "reported.health.battery >= 5e1", &["pump-1", "pump-4"]);
        check(&c, "reported.health.battery < 50.5", &["pump-2"]);
        check(
            &c,
            "reported.health.battery > -1",
            &["pump-1", "pump-2", "pump-4"],
        );
        check(
            &c,
            "reported.health.battery > -1.5e-3",
            &["pump-1", "pump-2", "pump-4"],
        );
        check(&c, "reported.health.battery = 80", &["pump-1"]);
        check(&c, "reported.health.battery = 80.0", &["pump-1"]);
        check(&c, "reported.health.battery == 15", &["pump-2"]);
        check(
            &c,
            "reported.health.battery != 80",
            &all_except(&["pump-1"]),
        );
        check(
            &c,
            "reported.health.battery <> 80",
            &all_except(&["pump-1"]),
        );
        check(&c, "reported.health.temp = 21.5", &["pump-1"]);
        // A value on the left is flipped.
        check(&c, "20 > reported.health.battery", &["pump-2"]);
        check(&c, "50.5 <= reported.health.battery", &["pump-1", "pump-4"]);
        check(&c, "'1.3' = desired.fw", &["pump-2", "pump-3"]);
        // Text never equals a number.
        check(&c, "reported.fw = 2", &["sensor_1"]);
        check(&c, "reported.fw = '2'", &["sensor%2"]);
        // Numbers sort before text.
        check(&c, "reported.fw < '0'", &["sensor_1"]);
    }

    #[test]
    fn columns() {
        let c = db();
        check(&c, "version >= 5", &["pump-2", "pump-4/lamp", "pump-5"]);
        check(
            &c,
            "version = 1",
            &["pump-3", "sensor_1", "sensor%2", "sensorX3"],
        );
        check(&c, "version > 2.5 AND version < 6", &["pump-1", "pump-2"]);
        check(&c, "updatedAt > 7000", &["sensorX3/cfg", "pump-5"]);
        check(&c, "updatedAt <= 2000", &["pump-1", "pump-2"]);
        check(&c, "deviceId = 'pump-4'", &["pump-4", "pump-4/lamp"]);
        check(
            &c,
            "deviceId != 'pump-4'",
            &all_except(&["pump-4", "pump-4/lamp"]),
        );
        check(&c, "deviceId < 'pump-3'", &["pump-1", "pump-2"]);
        check(
            &c,
            "deviceId IN ('pump-1', 'sensor_1')",
            &["pump-1", "sensor_1"],
        );
        check(
            &c,
            "version IN (1, 9)",
            &["pump-3", "sensor_1", "sensor%2", "sensorX3", "pump-5"],
        );
        // Columns are never null.
        check(&c, "deviceId IS NULL", &[]);
        check(&c, "version IS NOT NULL", &ALL);
    }

    #[test]
    fn nested_paths_and_array_indexes() {
        let c = db();
        check(&c, "reported.sensors[0].kind = 'temp'", &["pump-1"]);
        check(&c, "reported.sensors[1].kind = 'hum'", &["pump-1"]);
        check(&c, "reported.sensors[0].kind = 'hum'", &["sensor_1"]);
        check(&c, "exists(reported.sensors[1])", &["pump-1"]);
        check(&c, "exists(reported.sensors[0])", &["pump-1", "sensor_1"]);
        check(&c, "reported.sensors[5] IS NULL", &ALL);
        check(&c, "reported.sensors[0].kind.deeper IS NULL", &ALL);
        // Indexing a non-array, keying a non-object: missing.
        check(&c, "reported.fw[0] IS NOT NULL", &[]);
        check(&c, "exists(reported.sensors.kind)", &[]);
        // Objects and arrays compare as their compact JSON text.
        check(&c, "reported.health = '{\"battery\":15}'", &["pump-2"]);
        check(&c, "tags.config = '{\"a\":1}'", &["pump-1"]);
        check(&c, "tags.config.a = 1", &["pump-1"]);
        check(
            &c,
            "reported.sensors[1] = '{\"kind\":\"hum\"}'",
            &["pump-1"],
        );
        // Odd plain keys and backtick keys.
        check(&c, "reported.- = 'dash'", &["sensorX3"]);
        check(&c, "reported.0 = 'zero'", &["sensorX3"]);
        check(&c, "reported.`my key`.`a b` = 1", &["sensorX3"]);
        check(&c, "reported.`café` = 'au lait'", &["sensorX3"]);
        check(
            &c,
            "reported.`fw` = desired.`fw`",
            &["pump-1", "sensor%2", "sensorX3", "sensorX3/cfg", "pump-5"],
        );
    }

    #[test]
    fn booleans() {
        let c = db();
        check(&c, "reported.online = true", &["pump-1", "pump-3"]);
        check(&c, "reported.online = TRUE", &["pump-1", "pump-3"]);
        check(&c, "reported.online = false", &["pump-2"]);
        check(
            &c,
            "reported.online != true",
            &all_except(&["pump-1", "pump-3"]),
        );
        // json_extract semantics: true is 1, false is 0.
        check(&c, "reported.online = 1", &["pump-1", "pump-3"]);
        check(&c, "reported.online IN (false)", &["pump-2"]);
        check(
            &c,
            "desired.on = true AND reported.on = false",
            &["pump-4/lamp"],
        );
    }

    #[test]
    fn in_and_not_in() {
        let c = db();
        check(
            &c,
            "tags.site IN ('berlin', 'paris')",
            &["pump-1", "pump-2", "pump-4/lamp"],
        );
        // NOT IN is true for a missing or null value.
        check(
            &c,
            "tags.site NOT IN ('berlin', 'paris')",
            &all_except(&["pump-1", "pump-2", "pump-4/lamp"]),
        );
        check(
            &c,
            "NOT tags.site IN ('berlin', 'paris')",
            &all_except(&["pump-1", "pump-2", "pump-4/lamp"]),
        );
        // null in the list matches missing and null values.
        check(
            &c,
            "tags.site IN ('paris', null)",
            &["pump-2", "pump-3", "pump-4", "sensorX3/cfg"],
        );
        check(
            &c,
            "tags.site NOT IN ('paris', null)",
            &all_except(&["pump-2", "pump-3", "pump-4", "sensorX3/cfg"]),
        );
        check(
            &c,
            "tags.site IN (null)",
            &["pump-3", "pump-4", "sensorX3/cfg"],
        );
        check(&c, "reported.fw IN (2, '1.1')", &["sensor_1", "pump-4"]);
        check(&c, "tags.floor IN (3.0)", &["pump-1"]);
        check(&c, "tags.site in ('berlin')", &["pump-1", "pump-4/lamp"]);
    }

    #[test]
    fn exists_versus_is_null() {
        let c = db();
        // pump-3 has "site": null; pump-4 and sensorX3/cfg have no site.
        check(
            &c,
            "exists(tags.site)",
            &all_except(&["pump-4", "sensorX3/cfg"]),
        );
        check(&c, "NOT exists(tags.site)", &["pump-4", "sensorX3/cfg"]);
        check(
            &c,
            "tags.site IS NULL",
            &["pump-3", "pump-4", "sensorX3/cfg"],
        );
        check(
            &c,
            "tags.site = null",
            &["pump-3", "pump-4", "sensorX3/cfg"],
        );
        check(
            &c,
            "tags.site IS NOT NULL",
            &all_except(&["pump-3", "pump-4", "sensorX3/cfg"]),
        );
        check(
            &c,
            "tags.site != null",
            &all_except(&["pump-3", "pump-4", "sensorX3/cfg"]),
        );
        check(&c, "exists(tags.site) AND tags.site IS NULL", &["pump-3"]);
        check(
            &c,
            "exists(desired.fw)",
            &[
                "pump-1", "pump-2", "pump-3", "sensor_1", "sensor%2", "pump-5",
            ],
        );
        check(
            &c,
            "desired.fw IS NULL",
            &[
                "pump-4",
                "pump-4/lamp",
                "sensorX3",
                "sensorX3/cfg",
                "pump-5",
            ],
        );
    }

    #[test]
    fn starts_with_is_literal() {
        let c = db();
        check(&c, "startsWith(deviceId, 'sensor_')", &["sensor_1"]);
        check(&c, "startsWith(deviceId, 'sensor%')", &["sensor%2"]);
        check(
            &c,
            "startsWith(deviceId, 'sensor')",
            &["sensor_1", "sensor%2", "sensorX3", "sensorX3/cfg"],
        );
        check(&c, "startsWith(deviceId, '')", &ALL);
        check(
            &c,
            "startsWith(deviceId, 'pump-4')",
            &["pump-4", "pump-4/lamp"],
        );
        check(
            &c,
            "startsWith(tags.site, 'berl')",
            &["pump-1", "pump-4/lamp", "sensor_1", "pump-5"],
        );
        check(&c, "startsWith(tags.site, 'berlin_')", &["pump-5"]);
        check(&c, "startsWith(tags.site, '100%')", &["sensor%2"]);
        check(&c, "startsWith(tags.site, '100%_')", &["sensor%2"]);
        check(&c, "startsWith(tags.site, '1__')", &[]);
        check(&c, "startsWith(tags.site, '%')", &[]);
        check(&c, "startsWith(tags.site, 'Berl')", &["sensorX3"]);
        // Only text matches: sensor_1's fw is the number 2.
        check(&c, "startsWith(reported.fw, '2')", &["sensor%2"]);
        check(
            &c,
            "startsWith(tags.site, '')",
            &all_except(&["pump-3", "pump-4", "sensorX3/cfg"]),
        );
        // NOT is the complement, missing values included.
        check(
            &c,
            "NOT startsWith(tags.site, 'berl')",
            &all_except(&["pump-1", "pump-4/lamp", "sensor_1", "pump-5"]),
        );
        check(&c, "STARTSWITH(tags.site, \"par\")", &["pump-2"]);
        check(
            &c,
            "startsWith(reported.sensors[0].kind, 'te')",
            &["pump-1"],
        );
        let compiled = Filter::parse("startsWith(deviceId, 'a%_')")
            .unwrap()
            .to_sql();
        assert_eq!(compiled.sql, "((device >= ? AND device < ?))");
        assert_eq!(
            compiled.params,
            vec![Value::Text("a%_".into()), Value::Text("a%`".into())]
        );
    }

    #[test]
    fn prefix_upper_bounds() {
        assert_eq!(prefix_upper_bound("ab").as_deref(), Some("ac"));
        assert_eq!(prefix_upper_bound("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_upper_bound("\u{10FFFF}\u{10FFFF}"), None);
        assert_eq!(prefix_upper_bound(""), None);
        assert_eq!(
            prefix_upper_bound("x\u{D7FF}").as_deref(),
            Some("x\u{E000}")
        );
        assert_eq!(prefix_upper_bound("é").as_deref(), Some("ê"));
    }

    #[test]
    fn starts_with_non_ascii_and_extreme_prefixes() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(SCHEMA).unwrap();
        for (i, id) in [
            "é1",
            "é",
            "ê",
            "e",
            "\u{10FFFF}x",
            "\u{10FFFF}",
            "z\u{10FFFF}",
        ]
        .into_iter()
        .enumerate()
        {
            c.execute(
                "INSERT INTO twins VALUES ('t1', ?, '', 1, ?, '{}', '{}', '{}', '{}')",
                rusqlite::params![id, i as i64],
            )
            .unwrap();
        }
        let sorted = |q: &str| {
            let mut v = matching(&c, q);
            v.sort();
            v
        };
        assert_eq!(sorted("startsWith(deviceId, 'é')"), ["é", "é1"]);
        assert_eq!(
            sorted("startsWith(deviceId, '\u{10FFFF}')"),
            ["\u{10FFFF}", "\u{10FFFF}x"]
        );
        assert_eq!(
            sorted("startsWith(deviceId, 'z\u{10FFFF}')"),
            ["z\u{10FFFF}"]
        );
    }

    #[test]
    fn default_twin_name() {
        let c = db();
        let defaults = all_except(&["pump-4/lamp", "sensorX3/cfg"]);
        check(&c, "name = 'default'", &defaults);
        check(&c, "name == \"default\"", &defaults);
        check(&c, "name != 'default'", &["pump-4/lamp", "sensorX3/cfg"]);
        check(&c, "name = 'lamp'", &["pump-4/lamp"]);
        check(
            &c,
            "name IN ('default', 'cfg')",
            &all_except(&["pump-4/lamp"]),
        );
        check(
            &c,
            "name NOT IN ('default')",
            &["pump-4/lamp", "sensorX3/cfg"],
        );
        check(&c, "startsWith(name, 'def')", &defaults);
        check(&c, "name > 'd'", &all_except(&["sensorX3/cfg"]));
        // The stored '' is not a name users see.
        check(&c, "name = ''", &[]);
        check(&c, "deviceId = 'pump-4' AND name = 'default'", &["pump-4"]);
    }

    #[test]
    fn precedence_and_grouping() {
        let c = db();
        // AND binds tighter than OR.
        check(
            &c,
            "tags.site = 'paris' OR tags.site = 'berlin' AND version > 5",
            &["pump-2", "pump-4/lamp"],
        );
        check(
            &c,
            "(tags.site = 'paris' OR tags.site = 'berlin') AND version > 5",
            &["pump-4/lamp"],
        );
        // NOT binds tighter than AND.
        check(&c, "NOT tags.site = 'paris' AND version = 5", &[]);
        check(
            &c,
            "NOT (tags.site = 'paris' AND version = 5)",
            &all_except(&["pump-2"]),
        );
        check(&c, "NOT NOT tags.site = 'paris'", &["pump-2"]);
        assert_eq!(
            Filter::parse("NOT version = 1 OR version = 2 AND version = 3").unwrap(),
            Filter::parse("(NOT (version = 1)) OR ((version = 2) AND (version = 3))").unwrap()
        );
        assert_eq!(
            Filter::parse("version = 1 AND version = 2 OR version = 3 AND version = 4").unwrap(),
            Filter::parse("(version = 1 AND version = 2) OR (version = 3 AND version = 4)")
                .unwrap()
        );
        // NOT of something that can be unknown is its exact complement.
        check(
            &c,
            "NOT reported.health.battery < 20",
            &all_except(&["pump-2"]),
        );
        check(
            &c,
            "NOT (reported.health.battery < 20 OR version > 8)",
            &all_except(&["pump-2", "pump-5"]),
        );
        check(
            &c,
            "NOT (reported.health.battery > 20 AND version > 2)",
            &all_except(&["pump-1"]),
        );
        check(
            &c,
            "NOT reported.health.battery > desired.interval",
            &all_except(&["pump-1"]),
        );
        check(&c, "((((version = 9))))", &["pump-5"]);
    }

    #[test]
    fn keywords_are_case_insensitive() {
        let c = db();
        check(
            &c,
            "tags.site in ('paris') or Not EXISTS(reported.fw) aNd version Is nOt NuLl",
            &["pump-2", "pump-3", "sensorX3", "sensorX3/cfg"],
        );
        check(
            &c,
            "tags.site not in ('berlin') and tags.site is not null",
            &["pump-2", "sensor_1", "sensor%2", "sensorX3", "pump-5"],
        );
        check(
            &c,
            "reported.online = True OR reported.online = FALSE",
            &["pump-1", "pump-2", "pump-3"],
        );
        check(
            &c,
            "tags.site is null",
            &["pump-3", "pump-4", "sensorX3/cfg"],
        );
        check(&c, "startswith(deviceId, 'pump-5')", &["pump-5"]);
        // Field names are not.
        assert!(matches!(
            err("DeviceId = 'x'"),
            QueryError::UnknownField { .. }
        ));
    }

    #[test]
    fn text_values() {
        let c = db();
        check(&c, "tags.note = 'it''s'", &["sensor_1"]);
        check(&c, "tags.note = \"it's\"", &["sensor_1"]);
        check(&c, "tags.site = 'berlin'", &["pump-1", "pump-4/lamp"]);
        check(&c, "tags.site = 'BERLIN'", &[]);
        let f = Filter::parse(r#"tags.a = "say ""hi""" OR tags.b = 'C:\dir' OR tags.c = ''"#)
            .unwrap()
            .to_sql();
        assert_eq!(
            f.params,
            vec![
                Value::Text("say \"hi\"".into()),
                Value::Text("C:\\dir".into()),
                Value::Text(String::new())
            ]
        );
        // Whitespace of any kind separates tokens.
        check(&c, "\tversion\n=\r\n9\u{a0}", &["pump-5"]);
    }

    #[test]
    fn injection_attempts_match_literally() {
        let c = db();
        let attempts = [
            "tags.site = 'x'' OR 1=1 --'",
            "tags.site = 'berlin''; DROP TABLE twins; --'",
            "tags.site = \"berlin\"\" OR \"\"1\"\"=\"\"1\"",
            "deviceId = 'pump-1'' --'",
            "deviceId IN ('a'') OR (''1''=''1')",
            "startsWith(deviceId, ''' OR 1=1 --')",
            "reported.`'); DROP TABLE twins; --` = 1",
            "reported.`' || (SELECT 1) || '` = 1",
            "exists(reported.`x'')) OR 1=1 --`)",
        ];
        for q in attempts {
            assert_eq!(matching(&c, q), Vec::<String>::new(), "{q}");
            let compiled = Filter::parse(q).unwrap().to_sql();
            if !q.contains('`') {
                // Values never reach the SQL text (keys do, inside the quoted JSON path).
                assert!(!compiled.sql.contains("1=1"), "{q}: {}", compiled.sql);
                assert!(!compiled.sql.contains("DROP"), "{q}: {}", compiled.sql);
            }
        }
        // Keys with quotes, backslashes and SQL address exactly that key.
        check(&c, "reported.`o'neil` = 'x'", &["sensorX3"]);
        check(&c, "reported.`'; DROP TABLE twins; --` = 1", &["sensorX3"]);
        check(&c, "reported.`a\\b` = 'bs'", &["sensorX3"]);
        check(&c, "exists(reported.`o'neil`)", &["sensorX3"]);
        // Values are parameters, never SQL.
        let compiled = Filter::parse("tags.site = 'berlin''; DROP TABLE twins; --'")
            .unwrap()
            .to_sql();
        assert_eq!(compiled.sql, "(json_extract(tags, '$.\"site\"') IS ?)");
        assert_eq!(
            compiled.params,
            vec![Value::Text("berlin'; DROP TABLE twins; --".into())]
        );
        let compiled = Filter::parse("reported.`o'neil`.`a\\b`[3] = 1")
            .unwrap()
            .to_sql();
        assert_eq!(
            compiled.sql,
            r#"(json_extract(reported, '$."o''neil"."a\\b"[3]') IS ?)"#
        );
        // The table is still there, with all its rows.
        let n: i64 = c
            .query_row("SELECT count(*) FROM twins", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 11);
    }

    #[test]
    fn tenant_isolation_is_the_callers_condition() {
        let c = db();
        // t2's pump-1 matches (fw "1" != "9", online, berlin) but the caller's tenant = ? and
        // our parenthesised OR keep it out.
        check(
            &c,
            "reported.fw = '1' OR tags.site = 'berlin'",
            &["pump-1", "pump-4/lamp"],
        );
    }

    #[test]
    fn sql_shapes() {
        let sql = |q: &str| Filter::parse(q).unwrap().to_sql().sql;
        assert_eq!(
            sql("reported.fw != desired.fw"),
            r#"(json_extract(reported, '$."fw"') IS NOT json_extract(desired, '$."fw"'))"#
        );
        assert_eq!(
            sql("version = 1 OR version = 2 AND updatedAt > 3"),
            "(version IS ? OR (version IS ? AND updated_at > ?))"
        );
        assert_eq!(
            sql("NOT reported.battery < 20"),
            r#"(NOT coalesce(json_extract(reported, '$."battery"') < ?, 0))"#
        );
        assert_eq!(sql("NOT version < 20"), "(NOT (version < ?))");
        assert_eq!(
            sql("exists(tags.site)"),
            r#"(json_type(tags, '$."site"') IS NOT NULL)"#
        );
        assert_eq!(
            sql("tags.site IN ('a', null)"),
            r#"((json_extract(tags, '$."site"') IN (?) OR json_extract(tags, '$."site"') IS NULL))"#
        );
        assert_eq!(
            sql("name = 'default'"),
            "((CASE name WHEN '' THEN 'default' ELSE name END) IS ?)"
        );
        let f = Filter::parse("reported.online = true AND version IN (1, 2.5)")
            .unwrap()
            .to_sql();
        assert_eq!(
            f.params,
            vec![Value::Integer(1), Value::Integer(1), Value::Real(2.5)]
        );
        let big = Filter::parse("version < 99999999999999999999")
            .unwrap()
            .to_sql();
        assert_eq!(big.params, vec![Value::Real(1e20)]);
        // Control characters and backslashes in keys are JSON-escaped in the path.
        assert_eq!(
            sql("reported.`a\u{1}\\` = 1"),
            r#"(json_extract(reported, '$."a\u0001\\"') IS ?)"#
        );
    }

    #[test]
    fn errors_name_the_column_and_the_fix() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "reported.fw =",
                14,
                "expected a value after '=', found end of query (write e.g. reported.fw = '1.2')",
            ),
            ("version <=", 11, "(write e.g. version <= 3)"),
            (
                "reported.fw == AND",
                16,
                "expected a value after '==', found 'AND'",
            ),
            (
                "foo = 1",
                1,
                "unknown field 'foo': fields are deviceId, name, version, updatedAt, desired.…, \
                 reported.…, tags.…",
            ),
            ("deviceid = 'x'", 1, "(did you mean deviceId?)"),
            ("updated_at > 5", 1, "(did you mean updatedAt?)"),
            (
                "tags.site = berlin",
                13,
                "(to compare with text, quote it: 'berlin')",
            ),
            (
                "reported.fw = 1.2.3",
                15,
                "invalid number '1.2.3' (quote text values: '1.2.3')",
            ),
            (
                "tags.site = 'berlin",
                13,
                "unterminated text value: add the closing '",
            ),
            ("tags.site = \"berlin", 13, "add the closing \""),
            (
                "(version = 1",
                13,
                "expected AND, OR or ')' closing the '(' at column 1, found end of query",
            ),
            ("version = 1)", 12, "unmatched ')'"),
            (
                "version = 1 version = 2",
                13,
                "expected AND, OR or end of query, found 'version'",
            ),
            (
                "version = 'x'",
                11,
                "'version' is a number: compare it with a number",
            ),
            ("updatedAt > true", 13, "'updatedAt' is a number"),
            ("version = null", 11, "'version' is a number"),
            (
                "deviceId = 5",
                12,
                "'deviceId' is text: quote the value, e.g. deviceId = 'pump-7'",
            ),
            ("name IN ('a', 1)", 15, "e.g. name = 'default'"),
            ("reported.x < null", 14, "'<' with null is never true"),
            ("'a' = 'b'", 1, "both sides of '=' are values"),
            ("1 IN (1)", 1, "the left side of IN must be a field"),
            (
                "null IS NULL",
                1,
                "the left side of IS NULL must be a field",
            ),
            ("version IS 5", 12, "expected NULL or NOT NULL after IS"),
            (
                "version IS NOT true",
                16,
                "expected NULL or NOT NULL after IS",
            ),
            ("tags.site NOT = 'x'", 15, "expected IN after NOT"),
            ("tags.site IN 'x'", 14, "expected '(' after IN"),
            ("tags.site IN ()", 15, "an IN list needs at least one value"),
            (
                "tags.site IN ('a' 'b')",
                19,
                "expected ',' or ')' in the IN list opened at column 14, found the text 'b'",
            ),
            (
                "tags.site IN ('a',",
                19,
                "expected a value in the IN list, found end of query",
            ),
            (
                "tags.site IN (deviceId)",
                15,
                "an IN list holds values, not fields",
            ),
            (
                "exists(deviceId)",
                8,
                "exists() takes a desired./reported./tags. path",
            ),
            ("exists tags.site", 8, "expected '(' after exists"),
            ("exists(tags.site", 17, "expected ')' closing exists("),
            ("exists('x')", 8, "expected a field in exists(…)"),
            (
                "startsWith(version, '1')",
                12,
                "'version' is a number; startsWith() works on text",
            ),
            (
                "startsWith(deviceId 'p')",
                21,
                "expected ',' after the field",
            ),
            ("startsWith(deviceId, p)", 22, "expected a quoted prefix"),
            (
                "startsWith(deviceId, 'p'",
                25,
                "expected ')' closing startsWith(",
            ),
            ("contains(deviceId, 'x')", 1, "unknown function 'contains'"),
            ("reported. = 1", 10, "expected a key after '.'"),
            ("reported.fw. = 1", 13, "expected a key after '.'"),
            (
                "reported.sensors[x] = 1",
                17,
                "expected an array index like [0]",
            ),
            (
                "reported.sensors[1 = 1",
                17,
                "expected an array index like [0]",
            ),
            (
                "reported.sensors[99999999999] = 1",
                18,
                "array index too large",
            ),
            (
                "reported.`a.b` = 1",
                12,
                "keys containing '\"' or '.' cannot be queried",
            ),
            (
                "reported.`a\"b` = 1",
                12,
                "keys containing '\"' or '.' cannot be queried",
            ),
            (
                "reported.`abc = 1",
                10,
                "unterminated key: add the closing backtick",
            ),
            ("reported.`` = 1", 10, "empty key"),
            (
                "desired = '{}'",
                8,
                "write a key after 'desired', e.g. desired.fw",
            ),
            ("tags[0] = 1", 5, "'tags' is an object"),
            ("deviceId.x = 1", 9, "'deviceId' has no keys"),
            ("", 1, "the query is empty"),
            ("   ", 1, "the query is empty"),
            (
                "version = 1 AND",
                16,
                "expected a condition, found end of query",
            ),
            ("AND version = 1", 1, "expected a condition, found 'AND'"),
            ("NOT", 4, "expected a condition, found end of query"),
            ("()", 2, "expected a condition, found ')'"),
            ("version = 1 && version = 2", 13, "write AND instead of '&'"),
            ("version = 1 || version = 2", 13, "write OR instead of '|'"),
            ("!exists(tags.a)", 1, "write NOT instead of '!'"),
            ("version = 1 AND # x", 17, "unexpected character '#'"),
            ("version - 1", 9, "expected a number after '-'"),
            ("version = 1e999", 11, "number '1e999' is out of range"),
            (
                "version",
                8,
                "expected a comparison after 'version' (=, !=, <, <=, >, >=, IN",
            ),
            (
                "`x` = 1",
                1,
                "a backtick-quoted key must follow a section and a dot",
            ),
            // Columns count bytes: 'é' is two.
            ("tags.site = 'é' AND foo = 1", 22, "unknown field 'foo'"),
        ];
        for (query, column, fragment) in cases {
            let e = err(query);
            let text = e.to_string();
            assert_eq!(e.column(), *column, "{query}: {text}");
            assert!(
                text.starts_with(&format!("at column {column}: ")),
                "{query}: {text}"
            );
            assert!(
                text.contains(fragment),
                "{query}: {text}\n  wanted: {fragment}"
            );
        }
    }

    #[test]
    fn limits() {
        let c = db();
        // Length.
        let ok = format!("tags.site = '{}'", "x".repeat(MAX_QUERY_BYTES - 14));
        assert_eq!(ok.len(), MAX_QUERY_BYTES);
        assert!(Filter::parse(&ok).is_ok());
        let long = format!("tags.site = '{}'", "x".repeat(MAX_QUERY_BYTES));
        assert_eq!(
            err(&long),
            QueryError::TooLong {
                column: MAX_QUERY_BYTES + 1,
                len: MAX_QUERY_BYTES + 14,
                limit: MAX_QUERY_BYTES
            }
        );
        assert!(GroupKey::parse(&long).is_err());

        // Nesting: parentheses and NOT.
        let nested = |n: usize| format!("{}version = 9{}", "(".repeat(n), ")".repeat(n));
        check(&c, &nested(MAX_NESTING), &["pump-5"]);
        assert_eq!(
            err(&nested(MAX_NESTING + 1)),
            QueryError::TooDeep {
                column: MAX_NESTING + 1,
                limit: MAX_NESTING
            }
        );
        let nots = |n: usize| format!("{}version = 9", "NOT ".repeat(n));
        check(&c, &nots(MAX_NESTING), &["pump-5"]);
        assert_eq!(err(&nots(MAX_NESTING + 1)).column(), MAX_NESTING * 4 + 1);
        let mixed = "(NOT ".repeat(MAX_NESTING / 2) + "version = 9" + &")".repeat(MAX_NESTING / 2);
        check(&c, &mixed, &["pump-5"]);
        let mixed =
            "(NOT ".repeat(MAX_NESTING / 2) + "NOT version = 9" + &")".repeat(MAX_NESTING / 2);
        assert!(matches!(err(&mixed), QueryError::TooDeep { .. }));
        // Sequential NOTs and parentheses are not nesting.
        check(
            &c,
            &vec!["(NOT version = 1)"; 40].join(" AND "),
            &all_except(&["pump-3", "sensor_1", "sensor%2", "sensorX3"]),
        );

        // Conditions.
        let ors = |n: usize| vec!["version = 9"; n].join(" OR ");
        check(&c, &ors(MAX_CONDITIONS), &["pump-5"]);
        let e = err(&ors(MAX_CONDITIONS + 1));
        assert_eq!(
            e,
            QueryError::TooManyConditions {
                column: MAX_CONDITIONS * 15 + 1,
                limit: MAX_CONDITIONS
            }
        );
        assert!(e.to_string().contains("more than 64 conditions"), "{e}");
        let funcs = vec!["exists(tags.a)"; MAX_CONDITIONS + 1].join(" OR ");
        assert!(matches!(err(&funcs), QueryError::TooManyConditions { .. }));

        // IN lists.
        let list = |n: usize| {
            let values: Vec<String> = (0..n).map(|i| (i % 10).to_string()).collect();
            format!("version IN ({})", values.join(", "))
        };
        check(&c, &list(MAX_IN_VALUES), &ALL);
        assert_eq!(
            err(&list(MAX_IN_VALUES + 1)),
            QueryError::InListTooLong {
                column: 12 + MAX_IN_VALUES * 3 + 1,
                limit: MAX_IN_VALUES
            }
        );
    }

    #[test]
    fn grouped_counts() {
        let c = db();
        let grouped = |key: &str, filter: &str, limit: i64| -> Vec<(Value, i64)> {
            let key = GroupKey::parse(key).unwrap();
            let filter = Filter::parse(filter).unwrap().to_sql();
            let sql = format!(
                "SELECT {} AS k, count(*) FROM twins WHERE tenant = ? AND {} GROUP BY k \
                 ORDER BY count(*) DESC, k LIMIT ?",
                key.to_sql(),
                filter.sql
            );
            let params = std::iter::once(Value::Text("t1".into()))
                .chain(filter.params)
                .chain(std::iter::once(Value::Integer(limit)));
            let mut stmt = c.prepare(&sql).unwrap();
            stmt.query_map(params_from_iter(params), |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        assert_eq!(
            grouped("tags.site", "version < 9", 3),
            vec![
                (Value::Null, 3),
                (Value::Text("berlin".into()), 2),
                (Value::Text("100%_off".into()), 1)
            ]
        );
        assert_eq!(
            grouped("name", "deviceId = 'pump-4' OR deviceId = 'sensorX3'", 10),
            vec![
                (Value::Text("default".into()), 2),
                (Value::Text("cfg".into()), 1),
                (Value::Text("lamp".into()), 1)
            ]
        );
        assert_eq!(
            grouped("reported.online", "version > 0", 10),
            vec![
                (Value::Null, 7),
                (Value::Integer(1), 2),
                (Value::Integer(0), 1)
            ]
        );
        assert_eq!(
            grouped(" reported.sensors[0].kind ", "exists(reported.sensors)", 10),
            vec![
                (Value::Text("hum".into()), 1),
                (Value::Text("temp".into()), 1)
            ]
        );
        assert_eq!(
            grouped("reported.`o'neil`", "deviceId = 'sensorX3'", 10),
            vec![(Value::Null, 1), (Value::Text("x".into()), 1)]
        );
    }

    #[test]
    fn group_key_errors() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "deviceId",
                1,
                "cannot group by 'deviceId': group by name or a desired./reported./tags. path",
            ),
            ("version", 1, "cannot group by 'version'"),
            (
                "reported.fw name",
                13,
                "expected end of the group key after 'reported.fw', found 'name'",
            ),
            ("", 1, "expected a field to group by, found end of query"),
            ("'x'", 1, "expected a field to group by"),
            ("AND", 1, "expected a field to group by, found 'AND'"),
            ("foo", 1, "unknown field 'foo'"),
            ("tags", 5, "write a key after 'tags'"),
            ("reported.`a.b`", 12, "keys containing"),
        ];
        for (text, column, fragment) in cases {
            let e = GroupKey::parse(text).unwrap_err();
            let message = e.to_string();
            assert_eq!(e.column(), *column, "{text}: {message}");
            assert!(
                message.contains(fragment),
                "{text}: {message}\n  wanted: {fragment}"
            );
        }
        assert_eq!(
            GroupKey::parse("name").unwrap().to_sql(),
            "(CASE name WHEN '' THEN 'default' ELSE name END)"
        );
        assert_eq!(
            "reported.fw_version".parse::<GroupKey>().unwrap().to_sql(),
            r#"json_extract(reported, '$."fw_version"')"#
        );
    }

    #[test]
    fn json_path_escaping() {
        let mut s = String::new();
        push_json_string(&mut s, "a\\b\"c\u{1}\u{7f}\té");
        assert_eq!(s, r#""a\\b\"c\u0001\u007f\u0009é""#);
    }

    const VOCABULARY: &[&str] = &[
        "reported.fw",
        "desired.fw",
        "tags.site",
        "reported.health.battery",
        "reported.sensors[0].kind",
        "reported.`o'neil`",
        "reported.`'; DROP TABLE twins; --`",
        "deviceId",
        "name",
        "version",
        "updatedAt",
        "=",
        "==",
        "!=",
        "<>",
        "<",
        "<=",
        ">",
        ">=",
        "IN",
        "not",
        "NOT",
        "IS",
        "NULL",
        "AND",
        "or",
        "(",
        ")",
        ",",
        "'x'",
        "'it''s'",
        "\"dq\"",
        "'%_'",
        "'default'",
        "1",
        "-2.5",
        "1e3",
        "true",
        "false",
        "null",
        "exists(",
        "startsWith(",
        "'",
        "\"",
        "`",
        "[0]",
        ".",
        "--",
        ";",
        "/*",
        "é",
    ];

    fn token_soup() -> impl Strategy<Value = String> {
        prop::collection::vec(
            (
                prop::sample::select(VOCABULARY),
                prop::sample::select(&[" ", "", "  "][..]),
            ),
            0..24,
        )
        .prop_map(|parts| {
            parts
                .into_iter()
                .map(|(t, sep)| format!("{t}{sep}"))
                .collect()
        })
    }

    // A model of the documented semantics, to check the SQL against on generated filters.

    #[derive(Debug, Clone, PartialEq)]
    enum V {
        Null,
        Num(f64),
        Text(String),
    }

    fn order(a: &V, b: &V) -> Option<std::cmp::Ordering> {
        use std::cmp::Ordering::{Greater, Less};
        match (a, b) {
            (V::Null, _) | (_, V::Null) => None,
            (V::Num(x), V::Num(y)) => x.partial_cmp(y),
            (V::Num(_), V::Text(_)) => Some(Less),
            (V::Text(_), V::Num(_)) => Some(Greater),
            (V::Text(x), V::Text(y)) => Some(x.cmp(y)),
        }
    }

    fn same(a: &V, b: &V) -> bool {
        a == &V::Null && b == &V::Null || order(a, b) == Some(std::cmp::Ordering::Equal)
    }

    fn literal_value(text: &str) -> V {
        match text {
            "null" => V::Null,
            "true" => V::Num(1.0),
            "false" => V::Num(0.0),
            t if t.starts_with('\'') => V::Text(t[1..t.len() - 1].to_owned()),
            t => V::Num(t.parse().unwrap()),
        }
    }

    /// The JSON value at a generated path (`section.key.key[0].key`), if present.
    fn lookup<'r>(row: &'r Row, path: &str) -> Option<&'r serde_json::Value> {
        let mut parts = path.split('.');
        let mut at = match parts.next() {
            Some("desired") => &row.5,
            Some("reported") => &row.6,
            _ => &row.7,
        };
        for part in parts {
            let (key, index) = match part.split_once('[') {
                Some((key, rest)) => (key, Some(rest.trim_end_matches(']').parse().unwrap())),
                None => (part, None),
            };
            at = at.as_object()?.get(key)?;
            if let Some(i) = index {
                at = at.as_array()?.get::<usize>(i)?;
            }
        }
        Some(at)
    }

    fn field_value(row: &Row, field: &str) -> V {
        match field {
            "deviceId" => V::Text(row.1.to_owned()),
            "name" if row.2.is_empty() => V::Text("default".to_owned()),
            "name" => V::Text(row.2.to_owned()),
            "version" => V::Num(row.3 as f64),
            path => match lookup(row, path) {
                None | Some(serde_json::Value::Null) => V::Null,
                Some(serde_json::Value::Bool(b)) => V::Num(f64::from(u8::from(*b))),
                Some(serde_json::Value::Number(n)) => V::Num(n.as_f64().unwrap()),
                Some(serde_json::Value::String(s)) => V::Text(s.clone()),
                Some(other) => V::Text(other.to_string()),
            },
        }
    }

    #[derive(Debug, Clone)]
    enum Gen {
        Cmp(&'static str, &'static str, &'static str),
        CmpFields(&'static str, &'static str, &'static str),
        In(&'static str, Vec<&'static str>, bool),
        IsNull(&'static str, bool),
        Exists(&'static str, bool),
        StartsWith(&'static str, &'static str),
        Not(Box<Gen>),
        And(Box<Gen>, Box<Gen>),
        Or(Box<Gen>, Box<Gen>),
    }

    const GEN_PATHS: &[&str] = &[
        "reported.fw",
        "desired.fw",
        "tags.site",
        "reported.health.battery",
        "desired.interval",
        "reported.online",
        "tags.floor",
        "reported.sensors[0].kind",
        "tags.config",
        "reported.mode",
        "desired.mode",
    ];
    const GEN_OPS: &[&str] = &["=", "!=", "<", "<=", ">", ">="];
    const PATH_VALUES: &[&str] = &[
        "'berlin'",
        "'paris'",
        "'1.2'",
        "'1.3'",
        "'2'",
        "2",
        "15",
        "50.5",
        "3",
        "80",
        "true",
        "false",
        "null",
        "'{\"a\":1}'",
        "'hum'",
        "'Berlin'",
        "'eco'",
    ];
    const TEXT_VALUES: &[&str] = &["'pump-1'", "'default'", "'lamp'", "'sensor%2'", "'pump-4'"];
    const NUMBER_VALUES: &[&str] = &["1", "2", "5", "7", "9", "2.5"];
    const PREFIXES: &[&str] = &[
        "'berl'",
        "'p'",
        "'sensor_'",
        "'sensor%'",
        "''",
        "'1'",
        "'de'",
    ];

    /// A field (columns first, then paths) and the values that suit it.
    fn gen_field(i: usize) -> (&'static str, &'static [&'static str]) {
        match i {
            0 => ("deviceId", TEXT_VALUES),
            1 => ("name", TEXT_VALUES),
            2 => ("version", NUMBER_VALUES),
            i => (GEN_PATHS[(i - 3) % GEN_PATHS.len()], PATH_VALUES),
        }
    }

    fn gen_filter() -> impl Strategy<Value = Gen> {
        let fields = 0..3 + GEN_PATHS.len();
        let leaf = prop_oneof![
            (fields.clone(), 0..GEN_OPS.len(), any::<usize>()).prop_map(|(f, op, v)| {
                let (field, values) = gen_field(f);
                let value = values[v % values.len()];
                // Ordering with null is an error, not a filter.
                let op = if value == "null" {
                    &GEN_OPS[op % 2]
                } else {
                    &GEN_OPS[op]
                };
                Gen::Cmp(field, op, value)
            }),
            (0..GEN_PATHS.len(), 0..GEN_OPS.len(), 0..GEN_PATHS.len())
                .prop_map(|(a, op, b)| Gen::CmpFields(GEN_PATHS[a], GEN_OPS[op], GEN_PATHS[b])),
            (
                fields.clone(),
                prop::collection::vec(any::<usize>(), 1..4),
                any::<bool>()
            )
                .prop_map(|(f, vs, negated)| {
                    let (field, values) = gen_field(f);
                    let list = vs.into_iter().map(|v| values[v % values.len()]).collect();
                    Gen::In(field, list, negated)
                }),
            (fields.clone(), any::<bool>())
                .prop_map(|(f, negated)| Gen::IsNull(gen_field(f).0, negated)),
            (0..GEN_PATHS.len(), any::<bool>())
                .prop_map(|(p, negated)| Gen::Exists(GEN_PATHS[p], negated)),
            (fields, 0..PREFIXES.len()).prop_map(|(f, p)| {
                let field = if f == 2 { "deviceId" } else { gen_field(f).0 };
                Gen::StartsWith(field, PREFIXES[p])
            }),
        ];
        leaf.prop_recursive(5, 40, 2, |inner| {
            prop_oneof![
                inner.clone().prop_map(|g| Gen::Not(Box::new(g))),
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| Gen::And(Box::new(a), Box::new(b))),
                (inner.clone(), inner).prop_map(|(a, b)| Gen::Or(Box::new(a), Box::new(b))),
            ]
        })
    }

    fn render(g: &Gen) -> String {
        match g {
            Gen::Cmp(f, op, v) => format!("{f} {op} {v}"),
            Gen::CmpFields(a, op, b) => format!("{a} {op} {b}"),
            Gen::In(f, list, negated) => {
                let not = if *negated { "NOT " } else { "" };
                format!("{f} {not}IN ({})", list.join(", "))
            }
            Gen::IsNull(f, negated) => {
                format!("{f} IS {}NULL", if *negated { "NOT " } else { "" })
            }
            Gen::Exists(p, negated) => {
                format!("{}exists({p})", if *negated { "NOT " } else { "" })
            }
            Gen::StartsWith(f, prefix) => format!("startsWith({f}, {prefix})"),
            Gen::Not(inner) => format!("NOT ({})", render(inner)),
            Gen::And(a, b) => format!("({}) AND ({})", render(a), render(b)),
            Gen::Or(a, b) => format!("({}) OR ({})", render(a), render(b)),
        }
    }

    fn eval(g: &Gen, row: &Row) -> bool {
        match g {
            Gen::Cmp(f, op, v) => compare(&field_value(row, f), op, &literal_value(v)),
            Gen::CmpFields(a, op, b) => compare(&field_value(row, a), op, &field_value(row, b)),
            Gen::In(f, list, negated) => {
                let x = field_value(row, f);
                let found = list.iter().any(|v| same(&x, &literal_value(v)));
                found != *negated
            }
            Gen::IsNull(f, negated) => (field_value(row, f) == V::Null) != *negated,
            Gen::Exists(p, negated) => lookup(row, p).is_some() != *negated,
            Gen::StartsWith(f, prefix) => match field_value(row, f) {
                V::Text(t) => t.starts_with(&prefix[1..prefix.len() - 1]),
                _ => false,
            },
            Gen::Not(inner) => !eval(inner, row),
            Gen::And(a, b) => eval(a, row) && eval(b, row),
            Gen::Or(a, b) => eval(a, row) || eval(b, row),
        }
    }

    fn compare(a: &V, op: &str, b: &V) -> bool {
        use std::cmp::Ordering::{Equal, Greater, Less};
        match op {
            "=" => same(a, b),
            "!=" => !same(a, b),
            "<" => order(a, b) == Some(Less),
            "<=" => matches!(order(a, b), Some(Less | Equal)),
            ">" => order(a, b) == Some(Greater),
            _ => matches!(order(a, b), Some(Greater | Equal)),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_text_never_panics(text in any::<String>()) {
            let _ = Filter::parse(&text);
            let _ = GroupKey::parse(&text);
        }

        #[test]
        fn random_printable_text_never_panics(text in "\\PC{0,120}") {
            if let Ok(f) = Filter::parse(&text) {
                let _ = f.to_sql();
            }
            let _ = GroupKey::parse(&text);
        }

        /// Whatever parses compiles to SQL that SQLite accepts and runs.
        #[test]
        fn token_soup_parses_or_runs(text in token_soup()) {
            match Filter::parse(&text) {
                Ok(f) => {
                    let compiled = f.to_sql();
                    prop_assert_eq!(compiled.sql.matches('?').count(), compiled.params.len());
                    let c = db();
                    let result = run(&c, &compiled);
                    prop_assert!(result.is_ok(), "{} -> {} : {:?}", text, compiled.sql, result);
                }
                Err(e) => prop_assert!(e.column() >= 1 && e.column() <= text.len() + 1),
            }
        }

        /// Generated filters select exactly the twins the documented semantics select.
        #[test]
        fn generated_filters_match_the_model(g in gen_filter()) {
            let text = render(&g);
            let filter = Filter::parse(&text);
            prop_assert!(filter.is_ok(), "{}: {:?}", text, filter);
            let c = db();
            let mut got = run(&c, &filter.unwrap().to_sql()).unwrap();
            got.sort();
            let mut want: Vec<String> = rows()
                .iter()
                .filter(|row| row.0 == "t1" && eval(&g, row))
                .map(|row| if row.2.is_empty() { row.1.to_owned() } else { format!("{}/{}", row.1, row.2) })
                .collect();
            want.sort();
            prop_assert_eq!(got, want, "{}", text);
        }

        /// Any text value, quoted either way, is one parameter with exactly that text.
        #[test]
        fn text_values_round_trip(value in "\\PC{0,40}", double in any::<bool>()) {
            let q = if double { '"' } else { '\'' };
            let quoted = value.replace(q, &format!("{q}{q}"));
            let text = format!("tags.site = {q}{quoted}{q}");
            let compiled = Filter::parse(&text).unwrap().to_sql();
            prop_assert_eq!(compiled.params, vec![Value::Text(value)]);
        }

        /// Any queryable key addresses exactly that key.
        #[test]
        fn backtick_keys_address_that_key(key in "[^\".`]{1,16}") {
            let c = Connection::open_in_memory().unwrap();
            c.execute_batch(SCHEMA).unwrap();
            let reported = json!({ key.clone(): "hit" });
            insert(&c, &("t1", "dev", "", 1, 1, json!({}), reported, json!({})));
            // A key the generator cannot produce.
            let reported = json!({ "k.other": "hit" });
            insert(&c, &("t1", "other", "", 1, 1, json!({}), reported, json!({})));
            let f = Filter::parse(&format!("reported.`{key}` = 'hit'")).unwrap();
            prop_assert_eq!(run(&c, &f.to_sql()).unwrap(), vec!["dev".to_string()]);
            let f = Filter::parse(&format!("exists(reported.`{key}`)")).unwrap();
            prop_assert_eq!(run(&c, &f.to_sql()).unwrap(), vec!["dev".to_string()]);
            let g = GroupKey::parse(&format!("reported.`{key}`")).unwrap();
            let sql = format!("SELECT {} FROM twins WHERE device = 'dev'", g.to_sql());
            let v: Value = c.query_row(&sql, [], |r| r.get(0)).unwrap();
            prop_assert_eq!(v, Value::Text("hit".into()));
        }
    }
}
