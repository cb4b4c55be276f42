//! Lexer and recursive-descent parser: rule text → [`Statement`] (an AST with positions).
//!
//! The grammar is small and non-standard in places (a quoted topic filter after `FROM`, `WINDOW
//! TUMBLING(..)`, JSON paths with `[n]`), so it is parsed by hand rather than through a general
//! SQL parser: every error then carries the exact line and column and a message that says what
//! to change.

use crate::error::RuleError;

/// A 1-based line and column (in characters) of the rule text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1, counted in characters.
    pub column: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    Ident(String),
    /// `"quoted identifier"`.
    QIdent(String),
    Int(i64),
    Dec(f64),
    Str(String),
    Sym(&'static str),
    Eof,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::QIdent(s) => format!("\"{s}\""),
            Tok::Int(i) => format!("`{i}`"),
            Tok::Dec(d) => format!("`{d}`"),
            Tok::Str(s) => format!("'{s}'"),
            Tok::Sym(s) => format!("`{s}`"),
            Tok::Eof => "the end of the rule".to_string(),
        }
    }
}

const SYMBOLS: [&str; 21] = [
    "<>", "!=", "<=", ">=", "||", "=", "<", ">", "+", "-", "*", "/", "%", "(", ")", ",", ".", "[",
    "]", "{", "}",
];

pub(crate) fn lex(src: &str) -> Result<Vec<(Tok, Pos)>, RuleError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line, mut col) = (0usize, 1u32, 1u32);
    let advance = |i: &mut usize, line: &mut u32, col: &mut u32, c: char| {
        *i += 1;
        if c == '\n' {
            *line += 1;
            *col = 1;
        } else {
            *col += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        let pos = Pos { line, column: col };
        if c.is_whitespace() {
            advance(&mut i, &mut line, &mut col, c);
            continue;
        }
        if c == '-' && chars.get(i + 1) == Some(&'-') {
            // `-- comment` to the end of the line.
            while i < chars.len() && chars[i] != '\n' {
                {
                    let c0 = chars[i];
                    advance(&mut i, &mut line, &mut col, c0);
                }
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == '$' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '$')
            {
                {
                    let c0 = chars[i];
                    advance(&mut i, &mut line, &mut col, c0);
                }
            }
            out.push((Tok::Ident(chars[start..i].iter().collect()), pos));
            continue;
        }
        if c.is_ascii_digit() {
            let start = i;
            let mut dec = false;
            while i < chars.len() {
                let d = chars[i];
                if d.is_ascii_digit() {
                } else if d == '.' && !dec && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit()) {
                    dec = true;
                } else if (d == 'e' || d == 'E')
                    && (chars.get(i + 1).is_some_and(|n| n.is_ascii_digit())
                        || (matches!(chars.get(i + 1), Some('+' | '-'))
                            && chars.get(i + 2).is_some_and(|n| n.is_ascii_digit())))
                {
                    dec = true;
                    advance(&mut i, &mut line, &mut col, d);
                    if matches!(chars.get(i), Some('+' | '-')) {
                        {
                            let c0 = chars[i];
                            advance(&mut i, &mut line, &mut col, c0);
                        }
                    }
                    continue;
                } else {
                    break;
                }
                advance(&mut i, &mut line, &mut col, d);
            }
            let text: String = chars[start..i].iter().collect();
            let tok = if dec {
                text.parse::<f64>().ok().map(Tok::Dec)
            } else {
                text.parse::<i64>()
                    .ok()
                    .map(Tok::Int)
                    .or_else(|| text.parse::<f64>().ok().map(Tok::Dec))
            };
            match tok {
                Some(t) => out.push((t, pos)),
                None => return Err(RuleError::new(pos, format!("invalid number `{text}`"))),
            }
            continue;
        }
        if c == '\'' || c == '"' {
            let quote = c;
            advance(&mut i, &mut line, &mut col, c);
            let mut s = String::new();
            loop {
                let Some(&d) = chars.get(i) else {
                    let what = if quote == '\'' {
                        "string"
                    } else {
                        "quoted identifier"
                    };
                    return Err(RuleError::new(
                        pos,
                        format!("unterminated {what}: add the closing {quote}"),
                    ));
                };
                advance(&mut i, &mut line, &mut col, d);
                if d == quote {
                    if chars.get(i) == Some(&quote) {
                        // '' inside a string is one quote.
                        s.push(quote);
                        advance(&mut i, &mut line, &mut col, quote);
                        continue;
                    }
                    break;
                }
                s.push(d);
            }
            out.push((
                if quote == '\'' {
                    Tok::Str(s)
                } else {
                    Tok::QIdent(s)
                },
                pos,
            ));
            continue;
        }
        let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
        let Some(sym) = SYMBOLS.iter().find(|s| rest.starts_with(**s)) else {
            return Err(RuleError::new(pos, format!("unexpected character `{c}`")));
        };
        for _ in 0..sym.len() {
            {
                let c0 = chars[i];
                advance(&mut i, &mut line, &mut col, c0);
            }
        }
        out.push((Tok::Sym(sym), pos));
    }
    out.push((Tok::Eof, Pos { line, column: col }));
    Ok(out)
}

/// Binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Concat,
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

/// What `IS [NOT] …` tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IsWhat {
    Null,
    Undefined,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    Null,
    Bool(bool),
    Int(i64),
    Dec(f64),
    Str(String),
    /// A top-level payload key.
    Ident(String, Pos),
    /// `*` (whole payload).
    Star(Pos),
    Field(Box<Expr>, String),
    Index(Box<Expr>, Box<Expr>),
    Call(String, Pos, Vec<Expr>),
    Neg(Box<Expr>),
    Not(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Is(Box<Expr>, bool, IsWhat),
    Case(Option<Box<Expr>>, Vec<(Expr, Expr)>, Option<Box<Expr>>),
    Array(Vec<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SelectItem {
    Star(Pos),
    Expr(Expr, Option<String>, Pos),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum WindowSpec {
    Tumbling { size_ms: i64 },
    Hopping { size_ms: i64, step_ms: i64 },
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Statement {
    pub value: bool,
    pub items: Vec<SelectItem>,
    pub from: String,
    pub from_pos: Pos,
    pub where_: Option<Expr>,
    pub group_by: Option<(Expr, Pos)>,
    pub window: Option<WindowSpec>,
}

const RESERVED: [&str; 20] = [
    "select", "from", "where", "group", "by", "window", "as", "and", "or", "not", "is", "case",
    "when", "then", "else", "end", "null", "true", "false", "value",
];

pub(crate) struct Parser {
    toks: Vec<(Tok, Pos)>,
    at: usize,
    depth: u32,
}

const MAX_DEPTH: u32 = 64;

impl Parser {
    pub(crate) fn new(src: &str) -> Result<Parser, RuleError> {
        Ok(Parser {
            toks: lex(src)?,
            at: 0,
            depth: 0,
        })
    }

    fn peek(&self) -> &Tok {
        &self.toks[self.at.min(self.toks.len() - 1)].0
    }

    fn pos(&self) -> Pos {
        self.toks[self.at.min(self.toks.len() - 1)].1
    }

    fn bump(&mut self) -> (Tok, Pos) {
        let t = self.toks[self.at.min(self.toks.len() - 1)].clone();
        if self.at < self.toks.len() - 1 {
            self.at += 1;
        }
        t
    }

    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Tok::Ident(s) if s.eq_ignore_ascii_case(kw))
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        if self.is_kw(kw) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn expect_kw(&mut self, kw: &str, why: &str) -> Result<(), RuleError> {
        if self.eat_kw(kw) {
            Ok(())
        } else {
            Err(self.unexpected(&format!("expected `{}` {why}", kw.to_uppercase())))
        }
    }

    fn is_sym(&self, s: &str) -> bool {
        matches!(self.peek(), Tok::Sym(x) if *x == s)
    }

    fn eat_sym(&mut self, s: &str) -> bool {
        if self.is_sym(s) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn expect_sym(&mut self, s: &str, why: &str) -> Result<(), RuleError> {
        if self.eat_sym(s) {
            Ok(())
        } else {
            Err(self.unexpected(&format!("expected `{s}` {why}")))
        }
    }

    fn unexpected(&self, msg: &str) -> RuleError {
        RuleError::new(
            self.pos(),
            format!("{msg}, found {}", self.peek().describe()),
        )
    }

    pub(crate) fn statement(&mut self) -> Result<Statement, RuleError> {
        self.expect_kw(
            "select",
            "at the start of a rule (SELECT … FROM '<topic filter>' [WHERE …])",
        )?;
        let value = self.eat_kw("value");
        let mut items = Vec::new();
        loop {
            let pos = self.pos();
            if self.is_sym("*") && !value {
                self.bump();
                items.push(SelectItem::Star(pos));
            } else {
                let e = self.expr()?;
                let alias = if self.eat_kw("as") {
                    Some(self.name("after AS (the output field name)")?)
                } else {
                    None
                };
                items.push(SelectItem::Expr(e, alias, pos));
            }
            if value || !self.eat_sym(",") {
                break;
            }
        }
        let from_pos = self.pos();
        self.expect_kw(
            "from",
            "after the SELECT list (add `FROM '<topic filter>'`)",
        )?;
        let from_pos2 = self.pos();
        let from = match self.bump() {
            (Tok::Str(s), _) => s,
            (t, p) => {
                return Err(RuleError::new(
                    p,
                    format!(
                        "expected the topic filter as a quoted string after FROM (e.g. FROM 'devices/+/telemetry'), found {}",
                        t.describe()
                    ),
                ));
            }
        };
        let _ = from_pos;
        let where_ = if self.eat_kw("where") {
            Some(self.expr()?)
        } else {
            None
        };
        let group_by = if self.eat_kw("group") {
            self.expect_kw("by", "after GROUP")?;
            let p = self.pos();
            Some((self.expr()?, p))
        } else {
            None
        };
        let window = if self.eat_kw("window") {
            Some(self.window()?)
        } else {
            None
        };
        if !matches!(self.peek(), Tok::Eof) {
            return Err(self.unexpected(
                "expected the end of the rule (clauses come in the order SELECT, FROM, WHERE, GROUP BY, WINDOW)",
            ));
        }
        Ok(Statement {
            value,
            items,
            from,
            from_pos: from_pos2,
            where_,
            group_by,
            window,
        })
    }

    fn seconds(&mut self, what: &str) -> Result<i64, RuleError> {
        let p = self.pos();
        let ms = match self.bump().0 {
            Tok::Int(i) => i.checked_mul(1000),
            Tok::Dec(d) if d.is_finite() && d < 1e12 => Some((d * 1000.0).round() as i64),
            t => {
                return Err(RuleError::new(
                    p,
                    format!(
                        "expected the {what} in seconds (a number), found {}",
                        t.describe()
                    ),
                ));
            }
        };
        match ms {
            Some(ms) if ms > 0 => Ok(ms),
            _ => Err(RuleError::new(
                p,
                format!("the {what} must be a positive number of seconds"),
            )),
        }
    }

    fn window(&mut self) -> Result<WindowSpec, RuleError> {
        let p = self.pos();
        if self.eat_kw("tumbling") {
            self.expect_sym("(", "after TUMBLING (write TUMBLING(<seconds>))")?;
            let size_ms = self.seconds("window size")?;
            self.expect_sym(")", "after the window size")?;
            Ok(WindowSpec::Tumbling { size_ms })
        } else if self.eat_kw("hopping") {
            self.expect_sym(
                "(",
                "after HOPPING (write HOPPING(<size seconds>, <step seconds>))",
            )?;
            let size_ms = self.seconds("window size")?;
            self.expect_sym(",", "between the window size and step")?;
            let sp = self.pos();
            let step_ms = self.seconds("window step")?;
            self.expect_sym(")", "after the window step")?;
            if step_ms > size_ms {
                return Err(RuleError::new(
                    sp,
                    "the HOPPING step must not exceed the window size",
                ));
            }
            if size_ms / step_ms > 1000 {
                return Err(RuleError::new(
                    sp,
                    "a HOPPING window may overlap at most 1000 others: make the step larger",
                ));
            }
            Ok(WindowSpec::Hopping { size_ms, step_ms })
        } else {
            Err(RuleError::new(
                p,
                format!(
                    "expected TUMBLING(<seconds>) or HOPPING(<size>, <step>) after WINDOW, found {}",
                    self.peek().describe()
                ),
            ))
        }
    }

    fn name(&mut self, why: &str) -> Result<String, RuleError> {
        match self.bump() {
            (Tok::Ident(s), _) | (Tok::QIdent(s), _) | (Tok::Str(s), _) => Ok(s),
            (t, p) => Err(RuleError::new(
                p,
                format!("expected a name {why}, found {}", t.describe()),
            )),
        }
    }

    fn enter(&mut self) -> Result<(), RuleError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(RuleError::new(
                self.pos(),
                "expression nested too deeply (limit 64 levels)",
            ));
        }
        Ok(())
    }

    /// One more link of a left-nested chain (`a + b + c …`, `a.b.c …`): counts as depth.
    fn chain(&mut self, n: &mut u32) -> Result<(), RuleError> {
        self.enter()?;
        *n += 1;
        Ok(())
    }

    pub(crate) fn expr(&mut self) -> Result<Expr, RuleError> {
        self.enter()?;
        let r = self.or();
        self.depth -= 1;
        r
    }

    fn or(&mut self) -> Result<Expr, RuleError> {
        let mut l = self.and()?;
        let mut n = 0;
        while self.eat_kw("or") {
            self.chain(&mut n)?;
            let r = self.and()?;
            l = Expr::Binary(BinOp::Or, Box::new(l), Box::new(r));
        }
        self.depth -= n;
        Ok(l)
    }

    fn and(&mut self) -> Result<Expr, RuleError> {
        let mut l = self.not()?;
        let mut n = 0;
        while self.eat_kw("and") {
            self.chain(&mut n)?;
            let r = self.not()?;
            l = Expr::Binary(BinOp::And, Box::new(l), Box::new(r));
        }
        self.depth -= n;
        Ok(l)
    }

    fn not(&mut self) -> Result<Expr, RuleError> {
        if self.eat_kw("not") {
            self.enter()?;
            let e = self.not();
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(e?)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, RuleError> {
        let l = self.concat()?;
        if self.eat_kw("is") {
            let not = self.eat_kw("not");
            let what = if self.eat_kw("null") {
                IsWhat::Null
            } else if self.eat_kw("undefined") {
                IsWhat::Undefined
            } else {
                return Err(self.unexpected("expected NULL or UNDEFINED after IS"));
            };
            return Ok(Expr::Is(Box::new(l), not, what));
        }
        let op = match self.peek() {
            Tok::Sym("=") => BinOp::Eq,
            Tok::Sym("<>") | Tok::Sym("!=") => BinOp::Ne,
            Tok::Sym("<") => BinOp::Lt,
            Tok::Sym("<=") => BinOp::Le,
            Tok::Sym(">") => BinOp::Gt,
            Tok::Sym(">=") => BinOp::Ge,
            _ => return Ok(l),
        };
        self.bump();
        let r = self.concat()?;
        Ok(Expr::Binary(op, Box::new(l), Box::new(r)))
    }

    fn concat(&mut self) -> Result<Expr, RuleError> {
        let mut l = self.additive()?;
        let mut n = 0;
        while self.eat_sym("||") {
            self.chain(&mut n)?;
            let r = self.additive()?;
            l = Expr::Binary(BinOp::Concat, Box::new(l), Box::new(r));
        }
        self.depth -= n;
        Ok(l)
    }

    fn additive(&mut self) -> Result<Expr, RuleError> {
        let mut l = self.multiplicative()?;
        let mut n = 0;
        loop {
            let op = if self.eat_sym("+") {
                BinOp::Add
            } else if self.eat_sym("-") {
                BinOp::Sub
            } else {
                self.depth -= n;
                return Ok(l);
            };
            self.chain(&mut n)?;
            let r = self.multiplicative()?;
            l = Expr::Binary(op, Box::new(l), Box::new(r));
        }
    }

    fn multiplicative(&mut self) -> Result<Expr, RuleError> {
        let mut l = self.unary()?;
        let mut n = 0;
        loop {
            let op = if self.eat_sym("*") {
                BinOp::Mul
            } else if self.eat_sym("/") {
                BinOp::Div
            } else if self.eat_sym("%") {
                BinOp::Mod
            } else {
                self.depth -= n;
                return Ok(l);
            };
            self.chain(&mut n)?;
            let r = self.unary()?;
            l = Expr::Binary(op, Box::new(l), Box::new(r));
        }
    }

    fn unary(&mut self) -> Result<Expr, RuleError> {
        if self.eat_sym("-") {
            self.enter()?;
            let e = self.unary();
            self.depth -= 1;
            return Ok(match e? {
                Expr::Int(i) => Expr::Int(i.wrapping_neg()),
                Expr::Dec(d) => Expr::Dec(-d),
                e => Expr::Neg(Box::new(e)),
            });
        }
        if self.eat_sym("+") {
            return self.unary();
        }
        self.postfix()
    }

    fn postfix(&mut self) -> Result<Expr, RuleError> {
        let mut e = self.primary()?;
        let mut n = 0;
        loop {
            if self.is_sym(".") || self.is_sym("[") {
                self.chain(&mut n)?;
            }
            if self.eat_sym(".") {
                let key = self.name("after `.` (a field name)")?;
                e = Expr::Field(Box::new(e), key);
            } else if self.eat_sym("[") {
                let idx = self.expr()?;
                self.expect_sym("]", "to close the index")?;
                e = Expr::Index(Box::new(e), Box::new(idx));
            } else {
                self.depth -= n;
                return Ok(e);
            }
        }
    }

    fn primary(&mut self) -> Result<Expr, RuleError> {
        let (tok, pos) = self.bump();
        match tok {
            Tok::Int(i) => Ok(Expr::Int(i)),
            Tok::Dec(d) => Ok(Expr::Dec(d)),
            Tok::Str(s) => Ok(Expr::Str(s)),
            Tok::QIdent(s) => Ok(Expr::Ident(s, pos)),
            Tok::Sym("*") => Ok(Expr::Star(pos)),
            Tok::Sym("(") => {
                let e = self.expr()?;
                self.expect_sym(")", "to close the parenthesis")?;
                Ok(e)
            }
            Tok::Sym("[") => {
                let mut items = Vec::new();
                if !self.eat_sym("]") {
                    loop {
                        items.push(self.expr()?);
                        if self.eat_sym("]") {
                            break;
                        }
                        self.expect_sym(",", "between array elements (or `]` to close it)")?;
                    }
                }
                Ok(Expr::Array(items))
            }
            Tok::Sym("{") => Err(RuleError::new(
                pos,
                "object literals are not supported: build objects with SELECT <expr> AS <name>, …",
            )),
            Tok::Ident(s) => {
                let lower = s.to_ascii_lowercase();
                match lower.as_str() {
                    "null" => return Ok(Expr::Null),
                    "true" => return Ok(Expr::Bool(true)),
                    "false" => return Ok(Expr::Bool(false)),
                    "case" => return self.case(),
                    _ => {}
                }
                if lower == "cast" && self.eat_sym("(") {
                    let e = self.expr()?;
                    self.expect_kw(
                        "as",
                        "in cast (write cast(<expr> AS Int|Decimal|Boolean|String))",
                    )?;
                    let ty = self.name("after AS (a type: Int, Decimal, Boolean or String)")?;
                    self.expect_sym(")", "to close cast")?;
                    return Ok(Expr::Call(lower, pos, vec![e, Expr::Str(ty)]));
                }
                if self.eat_sym("(") {
                    let mut args = Vec::new();
                    if !self.eat_sym(")") {
                        loop {
                            args.push(self.expr()?);
                            if self.eat_sym(")") {
                                break;
                            }
                            self.expect_sym(
                                ",",
                                &format!("between the arguments of `{s}` (or `)` to close them)"),
                            )?;
                        }
                    }
                    return Ok(Expr::Call(lower, pos, args));
                }
                if RESERVED.contains(&lower.as_str()) {
                    return Err(RuleError::new(
                        pos,
                        format!(
                            "`{s}` is a keyword here: an expression was expected (quote a field with this name as \"{s}\")"
                        ),
                    ));
                }
                Ok(Expr::Ident(s, pos))
            }
            t => Err(RuleError::new(
                pos,
                format!("expected an expression, found {}", t.describe()),
            )),
        }
    }

    fn case(&mut self) -> Result<Expr, RuleError> {
        let operand = if self.is_kw("when") {
            None
        } else {
            Some(Box::new(self.expr()?))
        };
        let mut whens = Vec::new();
        while self.eat_kw("when") {
            let w = self.expr()?;
            self.expect_kw("then", "after the WHEN condition")?;
            let t = self.expr()?;
            whens.push((w, t));
        }
        if whens.is_empty() {
            return Err(self.unexpected("expected WHEN after CASE"));
        }
        let else_ = if self.eat_kw("else") {
            Some(Box::new(self.expr()?))
        } else {
            None
        };
        self.expect_kw("end", "to close the CASE expression")?;
        Ok(Expr::Case(operand, whens, else_))
    }
}
