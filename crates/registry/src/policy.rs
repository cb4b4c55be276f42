//! Authorization policies: what an authenticated client may do.
//!
//! A [`PolicyDocument`] is a small AWS-IoT-style language that operators write as JSON:
//!
//! ```json
//! {"version": 1, "statements": [
//!   {"effect": "allow", "actions": ["connect"], "resources": ["${device.id}"]},
//!   {"effect": "allow", "actions": ["publish", "subscribe", "receive"],
//!    "resources": ["devices/${device.id}/#"]},
//!   {"effect": "deny", "actions": ["publish"], "resources": ["devices/${device.id}/config"]}
//! ]}
//! ```
//!
//! * **Actions** are `connect` (resources are client-id patterns: an exact id, a prefix ending in
//!   `*`, or `*` alone) and `publish`, `subscribe`, `receive` (resources are MQTT topic filters;
//!   `+` and `#` are the only wildcards, and `*` is refused there to catch AWS habits).
//! * **Variables** may appear anywhere inside a resource: `${tenant}`, `${device.id}`,
//!   `${device.type}`, `${device.tags.KEY}`, `${cert.cn}`, `${cert.serial}`,
//!   `${cert.fingerprint}` and `${client.id}`.
//! * **Deny wins**: a request is allowed when some `allow` resource grants it and no `deny`
//!   resource touches it. Nothing allowed means denied.
//!
//! [`PolicyDocument::validate`] checks a document when it is stored. At CONNECT the session's
//! documents are compiled once, against the session's [`PolicyVars`], into a [`CompiledPolicy`]
//! whose checks do no allocation on the publish path.
//!
//! Compilation never lets a variable's *value* widen a rule: a resource whose variable has no
//! value (no such tag, no client certificate) is dropped, and so is an `allow` resource whose
//! value is empty, contains `/`, `+`, `#`, `*` or NUL, or starts with `$` at the start of a topic
//! filter. Such a value in a `deny` resource fails closed instead: the deny then covers
//! everything for its actions.

use std::collections::BTreeMap;

use ferrohub_types::{TopicError, TopicFilter, TopicLimits, filter_matches, parse_shared};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The only policy language version.
pub const POLICY_VERSION: u32 = 1;
/// Most statements a document may hold.
pub const MAX_STATEMENTS: usize = 100;
/// Most resources a statement may hold.
pub const MAX_RESOURCES: usize = 100;
/// Longest resource, in bytes, as written (before variables are substituted).
pub const MAX_RESOURCE_LEN: usize = 1024;

const KNOWN_VARIABLES: &str = "${tenant}, ${device.id}, ${device.type}, ${device.tags.KEY}, \
                               ${cert.cn}, ${cert.serial}, ${cert.fingerprint}, ${client.id}";

/// Whether a statement grants or forbids.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Grants the actions on the resources.
    Allow,
    /// Forbids the actions on the resources, whatever else allows them.
    Deny,
}

/// What a client asks to do.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Open a session under a client id (resources are client-id patterns).
    Connect,
    /// Send a PUBLISH to a topic.
    Publish,
    /// SUBSCRIBE to a topic filter.
    Subscribe,
    /// Be delivered a message published on a topic.
    Receive,
}

/// One rule: an effect, the actions it concerns and the resources it names.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    /// Allow or deny.
    pub effect: Effect,
    /// The actions concerned (at least one).
    pub actions: Vec<Action>,
    /// Topic filters (publish, subscribe, receive) or client-id patterns (connect), possibly
    /// with `${...}` variables (at least one).
    pub resources: Vec<String>,
}

impl Statement {
    /// An `allow` statement.
    pub fn allow(actions: &[Action], resources: &[&str]) -> Statement {
        Statement {
            effect: Effect::Allow,
            actions: actions.to_vec(),
            resources: resources.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    /// A `deny` statement.
    pub fn deny(actions: &[Action], resources: &[&str]) -> Statement {
        Statement {
            effect: Effect::Deny,
            ..Statement::allow(actions, resources)
        }
    }
}

/// A policy as operators write and store it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Language version; must be [`POLICY_VERSION`].
    pub version: u32,
    /// The rules, in no particular order (deny wins regardless of position).
    pub statements: Vec<Statement>,
}

/// Where in a document a problem is: `statements[i].resources[j]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Index of the statement (from 0).
    pub statement: usize,
    /// Index of the resource within the statement (from 0).
    pub resource: usize,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "statements[{}].resources[{}]",
            self.statement, self.resource
        )
    }
}

/// Why a policy document was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    /// The text is not a policy document.
    #[error(
        "invalid policy JSON: {0} (expected {{\"version\":1,\"statements\":[{{\"effect\":\"allow\",\"actions\":[...],\"resources\":[...]}}]}})"
    )]
    Json(String),
    /// `version` is not 1.
    #[error("unsupported policy version {0}: set \"version\" to 1")]
    UnsupportedVersion(u32),
    /// `statements` is empty.
    #[error("the policy has no statements: add at least one statement")]
    NoStatements,
    /// Too many statements.
    #[error(
        "the policy has {count} statements, the limit is {max}: merge statements or split the policy"
    )]
    TooManyStatements {
        /// Statements in the document.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A statement lists no action.
    #[error(
        "statements[{statement}] has no actions: list at least one of \"connect\", \"publish\", \"subscribe\", \"receive\""
    )]
    NoActions {
        /// Index of the statement.
        statement: usize,
    },
    /// A statement lists no resource.
    #[error(
        "statements[{statement}] has no resources: list at least one topic filter or client-id pattern"
    )]
    NoResources {
        /// Index of the statement.
        statement: usize,
    },
    /// A statement lists too many resources.
    #[error(
        "statements[{statement}] has {count} resources, the limit is {max}: split it into several statements"
    )]
    TooManyResources {
        /// Index of the statement.
        statement: usize,
        /// Resources in the statement.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A resource is longer than [`MAX_RESOURCE_LEN`].
    #[error("{at} is {len} bytes long, the limit is {max}: shorten it")]
    ResourceTooLong {
        /// Where.
        at: Location,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A resource is the empty string.
    #[error("{at} is empty: write a topic filter or a client-id pattern")]
    EmptyResource {
        /// Where.
        at: Location,
    },
    /// `${name}` where `name` is not a known variable.
    #[error("{at} ({text:?}): unknown variable ${{{name}}}; the known variables are {known}", known = KNOWN_VARIABLES)]
    UnknownVariable {
        /// Where.
        at: Location,
        /// The resource as written.
        text: String,
        /// The name between `${` and `}`.
        name: String,
    },
    /// `${` without a closing `}`.
    #[error("{at} ({text:?}): \"${{\" is not closed: write variables as ${{name}}")]
    UnterminatedVariable {
        /// Where.
        at: Location,
        /// The resource as written.
        text: String,
    },
    /// `${device.tags.}` without a tag name.
    #[error("{at} ({text:?}): ${{device.tags.}} needs a tag name, e.g. ${{device.tags.site}}")]
    EmptyTagName {
        /// Where.
        at: Location,
        /// The resource as written.
        text: String,
    },
    /// A resource of a publish/subscribe/receive statement is not a valid MQTT topic filter.
    #[error("{at} ({text:?}) is not a valid topic filter for publish/subscribe/receive: {reason}")]
    InvalidTopicFilter {
        /// Where.
        at: Location,
        /// The resource as written.
        text: String,
        /// What MQTT rule it breaks.
        reason: TopicError,
    },
    /// `*` in a topic filter.
    #[error(
        "{at} ({text:?}): '*' is not a topic wildcard; use '+' for one level or a final '#' for all remaining levels"
    )]
    StarInTopicFilter {
        /// Where.
        at: Location,
        /// The resource as written.
        text: String,
    },
    /// A topic resource starting with `$share/`.
    #[error(
        "{at} ({text:?}): shared subscriptions are checked on their inner filter; drop the \"$share/{{group}}/\" prefix"
    )]
    SharedPrefix {
        /// Where.
        at: Location,
        /// The resource as written.
        text: String,
    },
    /// A resource of a connect statement is not a valid client-id pattern.
    #[error(
        "{at} ({text:?}) is not a valid client-id pattern for connect: {problem}; write an exact client id, a prefix ending in '*', or '*' alone"
    )]
    InvalidClientIdPattern {
        /// Where.
        at: Location,
        /// The resource as written.
        text: String,
        /// What is wrong.
        problem: &'static str,
    },
}

/// A client certificate's identity, as variables see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertVars<'a> {
    /// Subject common name (`${cert.cn}`); empty when the certificate has none.
    pub cn: &'a str,
    /// Serial number (`${cert.serial}`).
    pub serial: &'a str,
    /// Fingerprint (`${cert.fingerprint}`).
    pub fingerprint: &'a str,
}

/// The values of the variables for one session (borrowed; only used while compiling).
#[derive(Debug, Clone, Copy)]
pub struct PolicyVars<'a> {
    /// `${tenant}`.
    pub tenant: &'a str,
    /// `${device.id}`.
    pub device_id: &'a str,
    /// `${device.type}`; resources using it are dropped when `None`.
    pub device_type: Option<&'a str>,
    /// `${device.tags.KEY}`; resources naming an absent tag are dropped.
    pub tags: &'a BTreeMap<String, String>,
    /// `${cert.*}`; resources using them are dropped when the client has no certificate.
    pub cert: Option<CertVars<'a>>,
    /// `${client.id}`: the MQTT client id of the session.
    pub client_id: &'a str,
}

static NO_TAGS: BTreeMap<String, String> = BTreeMap::new();

impl<'a> PolicyVars<'a> {
    /// Variables for a device without type, tags or certificate.
    pub fn new(tenant: &'a str, device_id: &'a str, client_id: &'a str) -> PolicyVars<'a> {
        PolicyVars {
            tenant,
            device_id,
            device_type: None,
            tags: &NO_TAGS,
            cert: None,
            client_id,
        }
    }

    /// Sets `${device.type}`.
    pub fn with_device_type(self, device_type: &'a str) -> PolicyVars<'a> {
        PolicyVars {
            device_type: Some(device_type),
            ..self
        }
    }

    /// Sets the tags read by `${device.tags.KEY}`.
    pub fn with_tags(self, tags: &'a BTreeMap<String, String>) -> PolicyVars<'a> {
        PolicyVars { tags, ..self }
    }

    /// Sets the `${cert.*}` variables.
    pub fn with_cert(self, cert: CertVars<'a>) -> PolicyVars<'a> {
        PolicyVars {
            cert: Some(cert),
            ..self
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resource templates
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var<'d> {
    Tenant,
    DeviceId,
    DeviceType,
    Tag(&'d str),
    CertCn,
    CertSerial,
    CertFingerprint,
    ClientId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece<'d> {
    Lit(&'d str),
    Var(Var<'d>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplateError {
    Unterminated,
    Unknown(String),
    EmptyTag,
}

/// Splits a resource into literal text and `${...}` variables.
fn parse_template(s: &str) -> Result<Vec<Piece<'_>>, TemplateError> {
    let mut pieces = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        if start > 0 {
            pieces.push(Piece::Lit(&rest[..start]));
        }
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(TemplateError::Unterminated)?;
        let name = &after[..end];
        let var = match name {
            "tenant" => Var::Tenant,
            "device.id" => Var::DeviceId,
            "device.type" => Var::DeviceType,
            "cert.cn" => Var::CertCn,
            "cert.serial" => Var::CertSerial,
            "cert.fingerprint" => Var::CertFingerprint,
            "client.id" => Var::ClientId,
            _ => match name.strip_prefix("device.tags.") {
                Some("") => return Err(TemplateError::EmptyTag),
                Some(key) => Var::Tag(key),
                None => return Err(TemplateError::Unknown(name.to_owned())),
            },
        };
        pieces.push(Piece::Var(var));
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Lit(rest));
    }
    Ok(pieces)
}

/// The value of a variable for a session, `None` when it has none.
fn lookup<'v>(var: Var<'_>, vars: &PolicyVars<'v>) -> Option<&'v str> {
    match var {
        Var::Tenant => Some(vars.tenant),
        Var::DeviceId => Some(vars.device_id),
        Var::DeviceType => vars.device_type,
        Var::Tag(key) => vars.tags.get(key).map(String::as_str),
        Var::CertCn => vars.cert.map(|c| c.cn),
        Var::CertSerial => vars.cert.map(|c| c.serial),
        Var::CertFingerprint => vars.cert.map(|c| c.fingerprint),
        Var::ClientId => Some(vars.client_id),
    }
}

/// Whether the resource is interpreted as a topic filter or a client-id pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Topic,
    ClientId,
}

/// The outcome of substituting a session's variables into a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Subst {
    /// The concrete resource.
    Ok(String),
    /// A variable has no value: the resource cannot concern this session.
    Missing,
    /// A value would change the resource's shape (or the result is invalid).
    Unsafe,
}

/// Whether a value could change the shape of a resource: a value may only ever stand for (part
/// of) one plain literal level.
fn value_reshapes(value: &str, at_start: bool, kind: Kind) -> bool {
    value.is_empty()
        || value.contains(['/', '+', '#', '*', '\0'])
        || (at_start && kind == Kind::Topic && value.starts_with('$'))
}

fn substitute(pieces: &[Piece<'_>], vars: &PolicyVars<'_>, kind: Kind) -> Subst {
    let mut out = String::new();
    let mut unsafe_value = false;
    for piece in pieces {
        match *piece {
            Piece::Lit(text) => out.push_str(text),
            Piece::Var(var) => {
                let Some(value) = lookup(var, vars) else {
                    return Subst::Missing;
                };
                unsafe_value |= value_reshapes(value, out.is_empty(), kind);
                out.push_str(value);
            }
        }
    }
    if unsafe_value {
        return Subst::Unsafe;
    }
    match kind {
        Kind::Topic if TopicFilter::parse(&out).is_err() => Subst::Unsafe,
        _ => Subst::Ok(out),
    }
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

impl PolicyDocument {
    /// A document from statements (version 1).
    pub fn new(statements: Vec<Statement>) -> PolicyDocument {
        PolicyDocument {
            version: POLICY_VERSION,
            statements,
        }
    }

    /// The policy every device gets unless told otherwise: connect with its own device id as
    /// client id; publish, subscribe and receive under `devices/{id}/`; subscribe to and
    /// receive its reserved service topics `$devices/{id}/…`, but publish there only the
    /// requests a device makes (twin get/update, command responses), never the hub's own
    /// answers (`…/accepted`, `…/delta`, `…/commands/req/…`), which others may be listening to.
    pub fn default_device() -> PolicyDocument {
        PolicyDocument::new(vec![
            Statement::allow(&[Action::Connect], &["${device.id}"]),
            Statement::allow(
                &[Action::Publish, Action::Subscribe, Action::Receive],
                &["devices/${device.id}/#"],
            ),
            Statement::allow(
                &[Action::Subscribe, Action::Receive],
                &["$devices/${device.id}/#"],
            ),
            Statement::allow(
                &[Action::Publish],
                &[
                    "$devices/${device.id}/twin/get",
                    "$devices/${device.id}/twin/update",
                    "$devices/${device.id}/twin/name/+/get",
                    "$devices/${device.id}/twin/name/+/update",
                    "$devices/${device.id}/commands/res/#",
                ],
            ),
        ])
    }

    /// Parses a JSON document and validates it.
    pub fn from_json(json: &str) -> Result<PolicyDocument, PolicyError> {
        let doc: PolicyDocument =
            serde_json::from_str(json).map_err(|e| PolicyError::Json(e.to_string()))?;
        doc.validate()?;
        Ok(doc)
    }

    /// Checks the document: version 1, 1 to [`MAX_STATEMENTS`] statements, each with at least one
    /// action and 1 to [`MAX_RESOURCES`] resources of at most [`MAX_RESOURCE_LEN`] bytes, only
    /// known variables, valid topic filters for publish/subscribe/receive (variables count as
    /// one literal) and valid client-id patterns for connect. The error says what to fix.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.version != POLICY_VERSION {
            return Err(PolicyError::UnsupportedVersion(self.version));
        }
        if self.statements.is_empty() {
            return Err(PolicyError::NoStatements);
        }
        if self.statements.len() > MAX_STATEMENTS {
            return Err(PolicyError::TooManyStatements {
                count: self.statements.len(),
                max: MAX_STATEMENTS,
            });
        }
        for (si, st) in self.statements.iter().enumerate() {
            if st.actions.is_empty() {
                return Err(PolicyError::NoActions { statement: si });
            }
            if st.resources.is_empty() {
                return Err(PolicyError::NoResources { statement: si });
            }
            if st.resources.len() > MAX_RESOURCES {
                return Err(PolicyError::TooManyResources {
                    statement: si,
                    count: st.resources.len(),
                    max: MAX_RESOURCES,
                });
            }
            let connect = st.actions.contains(&Action::Connect);
            let topic = st.actions.iter().any(|a| *a != Action::Connect);
            for (ri, text) in st.resources.iter().enumerate() {
                let at = Location {
                    statement: si,
                    resource: ri,
                };
                validate_resource(at, text, connect, topic)?;
            }
        }
        Ok(())
    }

    /// Compiles this document alone for one session; see [`CompiledPolicy::from_documents`].
    pub fn compile(&self, vars: &PolicyVars<'_>) -> CompiledPolicy {
        CompiledPolicy::from_documents(&[self], vars)
    }
}

fn validate_resource(
    at: Location,
    text: &str,
    connect: bool,
    topic: bool,
) -> Result<(), PolicyError> {
    if text.len() > MAX_RESOURCE_LEN {
        return Err(PolicyError::ResourceTooLong {
            at,
            len: text.len(),
            max: MAX_RESOURCE_LEN,
        });
    }
    if text.is_empty() {
        return Err(PolicyError::EmptyResource { at });
    }
    let owned = || text.to_owned();
    let pieces = parse_template(text).map_err(|e| match e {
        TemplateError::Unterminated => PolicyError::UnterminatedVariable { at, text: owned() },
        TemplateError::EmptyTag => PolicyError::EmptyTagName { at, text: owned() },
        TemplateError::Unknown(name) => PolicyError::UnknownVariable {
            at,
            text: owned(),
            name,
        },
    })?;
    let literals = || {
        pieces.iter().filter_map(|p| match p {
            Piece::Lit(t) => Some(*t),
            Piece::Var(_) => None,
        })
    };
    if connect {
        let problem = if literals().any(|t| t.contains('\0')) {
            Some("it contains the NUL character")
        } else if text.find('*').is_some_and(|i| i + 1 != text.len()) {
            Some("'*' may only be the last character")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(PolicyError::InvalidClientIdPattern {
                at,
                text: owned(),
                problem,
            });
        }
    }
    if topic {
        if literals().any(|t| t.contains('*')) {
            return Err(PolicyError::StarInTopicFilter { at, text: owned() });
        }
        // Each variable stands for one plain literal (values that would not are dropped at
        // compile time), so a placeholder shows whether the shape is a valid filter.
        let shape: String = pieces
            .iter()
            .map(|p| match p {
                Piece::Lit(t) => t,
                Piece::Var(_) => "v",
            })
            .collect();
        if shape == "$share" || shape.starts_with("$share/") {
            return Err(PolicyError::SharedPrefix { at, text: owned() });
        }
        TopicFilter::parse(&shape).map_err(|reason| PolicyError::InvalidTopicFilter {
            at,
            text: owned(),
            reason,
        })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Compiled policies
// ---------------------------------------------------------------------------------------------

/// A client-id pattern after substitution.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ClientPattern {
    Any,
    Prefix(Box<str>),
    Exact(Box<str>),
}

impl ClientPattern {
    fn new(s: &str) -> ClientPattern {
        match s.strip_suffix('*') {
            Some("") => ClientPattern::Any,
            Some(prefix) => ClientPattern::Prefix(prefix.into()),
            None => ClientPattern::Exact(s.into()),
        }
    }

    fn matches(&self, client_id: &str) -> bool {
        match self {
            ClientPattern::Any => true,
            ClientPattern::Prefix(p) => client_id.starts_with(&**p),
            ClientPattern::Exact(e) => client_id == &**e,
        }
    }
}

/// A topic filter after substitution, with its literal head for a quick reject.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct TopicRule {
    filter: Box<str>,
    /// Every topic the filter matches starts with `filter[..head]`: the levels before the first
    /// wildcard (without the `/` before a `#`, which also matches the parent level).
    head: usize,
}

impl TopicRule {
    fn new(filter: &str) -> TopicRule {
        let mut start = 0;
        let mut head = filter.len();
        for level in filter.split('/') {
            match level {
                "+" => head = start,
                "#" => head = start.saturating_sub(1),
                _ => {
                    start += level.len() + 1;
                    continue;
                }
            }
            break;
        }
        TopicRule {
            filter: filter.into(),
            head,
        }
    }

    #[inline]
    fn matches(&self, topic: &str) -> bool {
        self.filter
            .get(..self.head)
            .is_some_and(|head| topic.starts_with(head))
            && filter_matches(&self.filter, topic)
    }
}

/// The allow and deny entries of one action.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rules<T> {
    allow: Vec<T>,
    deny: Vec<T>,
    /// A deny failed closed: everything is denied for this action.
    deny_all: bool,
}

impl<T> Default for Rules<T> {
    fn default() -> Self {
        Rules {
            allow: Vec::new(),
            deny: Vec::new(),
            deny_all: false,
        }
    }
}

impl<T: Ord> Rules<T> {
    fn push(&mut self, effect: Effect, entry: T) {
        match effect {
            Effect::Allow => self.allow.push(entry),
            Effect::Deny => self.deny.push(entry),
        }
    }

    fn finish(&mut self) {
        if self.deny_all {
            self.allow = Vec::new();
            self.deny = Vec::new();
        }
        for list in [&mut self.allow, &mut self.deny] {
            list.sort_unstable();
            list.dedup();
            list.shrink_to_fit();
        }
    }
}

/// A session's policies with its variables substituted: what the hot path checks.
///
/// Built once per session (at CONNECT, and again when a policy changes). Checks allocate
/// nothing except [`can_subscribe`](CompiledPolicy::can_subscribe), which parses the request.
/// The default value allows nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompiledPolicy {
    allow_all: bool,
    connect: Rules<ClientPattern>,
    publish: Rules<TopicRule>,
    subscribe: Rules<TopicRule>,
    receive: Rules<TopicRule>,
}

impl CompiledPolicy {
    /// Allows everything (development-mode anonymous users, static users).
    pub fn allow_all() -> CompiledPolicy {
        CompiledPolicy {
            allow_all: true,
            ..CompiledPolicy::default()
        }
    }

    /// Allows nothing.
    pub fn deny_all() -> CompiledPolicy {
        CompiledPolicy::default()
    }

    /// Whether this is [`CompiledPolicy::allow_all`].
    pub fn is_allow_all(&self) -> bool {
        self.allow_all
    }

    /// Compiles several documents (e.g. the device type's policy and the device's own) into one
    /// policy for a session, substituting its variables once.
    ///
    /// Fails closed: if any document does not [validate](PolicyDocument::validate), the result
    /// allows nothing. A resource whose variable has no value for this session is dropped. A
    /// value that is empty, contains `/`, `+`, `#`, `*` or NUL, or starts a topic filter with
    /// `$`, drops an `allow` resource and turns a `deny` resource into "deny everything" for the
    /// statement's actions: a value never widens what is allowed.
    pub fn from_documents(docs: &[&PolicyDocument], vars: &PolicyVars<'_>) -> CompiledPolicy {
        let mut out = CompiledPolicy::default();
        if docs.iter().any(|d| d.validate().is_err()) {
            return out;
        }
        for st in docs.iter().flat_map(|d| &d.statements) {
            for text in &st.resources {
                let Ok(pieces) = parse_template(text) else {
                    // Unreachable after validation; fail closed anyway.
                    return CompiledPolicy::default();
                };
                let mut topic_subst = None;
                let mut client_subst = None;
                for &action in &st.actions {
                    if action == Action::Connect {
                        let subst = client_subst
                            .get_or_insert_with(|| substitute(&pieces, vars, Kind::ClientId));
                        apply(&mut out.connect, st.effect, subst, ClientPattern::new);
                    } else {
                        let subst = topic_subst
                            .get_or_insert_with(|| substitute(&pieces, vars, Kind::Topic));
                        let rules = match action {
                            Action::Subscribe => &mut out.subscribe,
                            Action::Receive => &mut out.receive,
                            Action::Publish | Action::Connect => &mut out.publish,
                        };
                        apply(rules, st.effect, subst, TopicRule::new);
                    }
                }
            }
        }
        out.connect.finish();
        out.publish.finish();
        out.subscribe.finish();
        out.receive.finish();
        out
    }

    /// Whether a session may CONNECT under `client_id`.
    pub fn can_connect(&self, client_id: &str) -> bool {
        if self.allow_all {
            return true;
        }
        let r = &self.connect;
        !r.deny_all
            && r.allow.iter().any(|p| p.matches(client_id))
            && !r.deny.iter().any(|p| p.matches(client_id))
    }

    /// Whether the session may PUBLISH to `topic` (a topic name, not a filter).
    pub fn can_publish(&self, topic: &str) -> bool {
        self.allow_all || topic_allowed(&self.publish, topic)
    }

    /// Whether a message on `topic` may be delivered to the session (checked at delivery, so
    /// that a policy change applies to existing subscriptions).
    /// Whether receiving is restricted beyond what subscribing allows (a receive deny, or other
    /// receive allows): then every delivery must be checked with [`Self::can_receive`], since a
    /// granted subscription may match topics the device must not receive.
    pub fn receive_narrower_than_subscribe(&self) -> bool {
        !self.allow_all
            && (self.receive.deny_all
                || !self.receive.deny.is_empty()
                || self.receive.allow != self.subscribe.allow)
    }

    /// May receive a message published on `topic`.
    pub fn can_receive(&self, topic: &str) -> bool {
        self.allow_all || topic_allowed(&self.receive, topic)
    }

    /// Whether the session may SUBSCRIBE to `filter` (`$share/{group}/{filter}` is checked on
    /// its inner filter): some allowed filter must cover it entirely
    /// ([`filter_covers`]) and no denied filter may overlap it ([`filters_overlap`]). Malformed
    /// filters are refused.
    pub fn can_subscribe(&self, filter: &str) -> bool {
        if self.allow_all {
            return true;
        }
        let r = &self.subscribe;
        if r.deny_all {
            return false;
        }
        let Ok(shared) = parse_shared(filter, &TopicLimits::default()) else {
            return false;
        };
        let inner = shared.filter.as_str();
        r.allow.iter().any(|a| covers_unchecked(&a.filter, inner))
            && !r.deny.iter().any(|d| overlap_unchecked(&d.filter, inner))
    }
}

/// Records one substituted resource: kept, dropped, or (an unusable deny) failing closed.
fn apply<T: Ord>(
    rules: &mut Rules<T>,
    effect: Effect,
    subst: &Subst,
    make: impl FnOnce(&str) -> T,
) {
    match (subst, effect) {
        (Subst::Ok(s), _) => rules.push(effect, make(s)),
        (Subst::Missing, _) | (Subst::Unsafe, Effect::Allow) => {}
        (Subst::Unsafe, Effect::Deny) => rules.deny_all = true,
    }
}

fn topic_allowed(r: &Rules<TopicRule>, topic: &str) -> bool {
    // Topic names are validated by the protocol layer; refuse anything that is not one rather
    // than let a wildcard in a "topic" be matched literally.
    if r.deny_all || topic.is_empty() || topic.contains(['+', '#', '\0']) {
        return false;
    }
    r.allow.iter().any(|f| f.matches(topic)) && !r.deny.iter().any(|f| f.matches(topic))
}

// ---------------------------------------------------------------------------------------------
// Filter algebra
// ---------------------------------------------------------------------------------------------

/// Whether every topic matched by the filter `inner` is matched by the filter `outer`, under the
/// MQTT rules (`+` is one level, `#` is the whole rest including the parent level, so `a/#`
/// matches `a`; a wildcard first level never matches a topic starting with `$`).
///
/// `false` when either is not a valid filter. `$share/` prefixes are not interpreted.
pub fn filter_covers(outer: &str, inner: &str) -> bool {
    TopicFilter::parse(outer).is_ok()
        && TopicFilter::parse(inner).is_ok()
        && covers_unchecked(outer, inner)
}

/// Whether some topic is matched by both filters `a` and `b`, under the MQTT rules (see
/// [`filter_covers`]).
///
/// `false` when either is not a valid filter. `$share/` prefixes are not interpreted.
pub fn filters_overlap(a: &str, b: &str) -> bool {
    TopicFilter::parse(a).is_ok() && TopicFilter::parse(b).is_ok() && overlap_unchecked(a, b)
}

/// [`filter_covers`] for filters known to be valid.
fn covers_unchecked(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    let mut first = true;
    loop {
        match (o.next(), i.next()) {
            // The rest of `inner` (possibly nothing: `#` matches the parent too), except that a
            // leading `#` does not match `$` topics, which only a literal `$` level names.
            (Some("#"), il) => return !(first && il.is_some_and(|l| l.starts_with('$'))),
            // A leading `#` matches every non-`$` topic, as does a leading `+/#` (there is no
            // zero-level topic for `#` to match as a "parent").
            (Some("+"), Some("#")) if first => return o.next() == Some("#"),
            // `inner` ends here or matches the parent level too: `+` needs one more level.
            (Some("+"), None | Some("#")) => return false,
            (Some("+"), Some(il)) => {
                if first && il.starts_with('$') {
                    return false;
                }
            }
            // A literal covers only the same literal.
            (Some(ol), Some(il)) if ol == il => {}
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

/// [`filters_overlap`] for filters known to be valid.
fn overlap_unchecked(a: &str, b: &str) -> bool {
    let mut a = a.split('/');
    let mut b = b.split('/');
    let mut first = true;
    loop {
        match (a.next(), b.next()) {
            (Some("#"), Some(l)) | (Some(l), Some("#")) => {
                return !(first && l.starts_with('$'));
            }
            // `#` matches the parent level, where the other filter ends.
            (Some("#"), None) | (None, Some("#")) => return true,
            (Some("+"), Some(l)) | (Some(l), Some("+")) => {
                if first && l.starts_with('$') {
                    return false;
                }
            }
            (Some(x), Some(y)) if x == y => {}
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(statements: Vec<Statement>) -> PolicyDocument {
        PolicyDocument::new(statements)
    }

    fn vars<'a>(device: &'a str) -> PolicyVars<'a> {
        PolicyVars::new("t1", device, device)
    }

    const PSR: &[Action] = &[Action::Publish, Action::Subscribe, Action::Receive];

    // ---- filter algebra -------------------------------------------------------------------

    #[test]
    fn covers_examples() {
        assert!(filter_covers("devices/d1/#", "devices/d1/+/x"));
        assert!(filter_covers("devices/d1/#", "devices/d1/#"));
        assert!(filter_covers("devices/d1/#", "devices/d1"));
        assert!(!filter_covers("devices/d1/#", "devices/#"));
        assert!(!filter_covers("devices/d1/#", "+/d1/x"));
        assert!(filter_covers("a/+", "a/b"));
        assert!(filter_covers("a/+", "a/+"));
        assert!(!filter_covers("a/+", "a/#"));
        assert!(!filter_covers("a/+", "a"));
        assert!(filter_covers("a/+/#", "a/b/#"));
        assert!(!filter_covers("a/+/#", "a/#"));
        assert!(filter_covers("#", "a/#"));
        assert!(filter_covers("#", "+/+"));
        assert!(filter_covers("+/#", "#"));
        assert!(filter_covers("#", "+/#"));
        assert!(!filter_covers("+/+/#", "+/#"));
        assert!(!filter_covers("a/+/#", "a/#"));
        assert!(!filter_covers("#", "$SYS/x"));
        assert!(!filter_covers("+/#", "$SYS/#"));
        assert!(filter_covers("$SYS/#", "$SYS/x"));
        assert!(filter_covers("a/b", "a/b"));
        assert!(!filter_covers("a/b", "a/b/c"));
        assert!(!filter_covers("a/b/c", "a/b"));
        // Invalid filters cover nothing and are covered by nothing.
        assert!(!filter_covers("a/#/b", "a/x/b"));
        assert!(!filter_covers("#", "a/b#"));
        assert!(!filter_covers("#", ""));
    }

    #[test]
    fn topic_rule_heads() {
        let head = |f: &str| {
            let r = TopicRule::new(f);
            r.filter[..r.head].to_owned()
        };
        assert_eq!(head("a/b"), "a/b");
        assert_eq!(head("a/b/#"), "a/b");
        assert_eq!(head("a/+/c"), "a/");
        assert_eq!(head("#"), "");
        assert_eq!(head("+/x"), "");
        assert_eq!(head("a//+"), "a//");
        assert_eq!(head("$x/#"), "$x");
        // The quick reject never changes the answer.
        for f in all_filters() {
            let r = TopicRule::new(&f);
            for t in all_topics() {
                assert_eq!(r.matches(&t), filter_matches(&f, &t), "{f} {t}");
            }
        }
    }

    #[test]
    fn overlap_examples() {
        assert!(filters_overlap("a/+", "+/b"));
        assert!(filters_overlap("a/#", "a"));
        assert!(filters_overlap("a", "a/#"));
        assert!(filters_overlap("#", "a/b/c"));
        assert!(!filters_overlap("#", "$SYS/a"));
        assert!(!filters_overlap("+/a", "$SYS/a"));
        assert!(filters_overlap("$SYS/#", "$SYS/a"));
        assert!(filters_overlap("+", "#"));
        assert!(!filters_overlap("a/+", "a"));
        assert!(!filters_overlap("a/b", "a/c"));
        assert!(filters_overlap("a/+/c", "a/b/+"));
        assert!(!filters_overlap("a/+/c", "a/b"));
        assert!(!filters_overlap("a/+", "a/b#"));
    }

    // ---- documents ------------------------------------------------------------------------

    #[test]
    fn json_round_trip() {
        let json = r#"{"version":1,"statements":[{"effect":"allow","actions":["publish","subscribe"],"resources":["devices/${device.id}/#"]}]}"#;
        let d = PolicyDocument::from_json(json).unwrap();
        assert_eq!(
            d,
            doc(vec![Statement::allow(
                &[Action::Publish, Action::Subscribe],
                &["devices/${device.id}/#"]
            )])
        );
        assert_eq!(serde_json::to_string(&d).unwrap(), json);
        let back: PolicyDocument =
            serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn json_errors_are_explicit() {
        let e = PolicyDocument::from_json(r#"{"version":1,"statements":[{"effect":"allow","actions":["publish"],"resource":["a"]}]}"#)
            .unwrap_err();
        assert!(matches!(e, PolicyError::Json(_)));
        assert!(e.to_string().contains("resource"), "{e}");
        let e = PolicyDocument::from_json(
            r#"{"version":1,"statements":[{"effect":"permit","actions":["publish"],"resources":["a"]}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("permit"), "{e}");
        let e = PolicyDocument::from_json(
            r#"{"version":2,"statements":[{"effect":"allow","actions":["publish"],"resources":["a"]}]}"#,
        )
        .unwrap_err();
        assert_eq!(e, PolicyError::UnsupportedVersion(2));
    }

    #[test]
    fn validation_rules() {
        let ok = |resources: &[&str]| doc(vec![Statement::allow(PSR, resources)]).validate();
        assert!(ok(&["devices/${device.id}/#"]).is_ok());
        assert!(ok(&["t/${tenant}/${device.type}/${device.tags.site}/+"]).is_ok());
        assert!(ok(&["c/${cert.cn}-${cert.serial}/${cert.fingerprint}/${client.id}"]).is_ok());
        assert!(ok(&["pre${device.id}post/x"]).is_ok());
        assert!(PolicyDocument::default_device().validate().is_ok());

        let e = ok(&["a/b", "devices/${device.idd}/#"]).unwrap_err();
        assert_eq!(
            e,
            PolicyError::UnknownVariable {
                at: Location {
                    statement: 0,
                    resource: 1
                },
                text: "devices/${device.idd}/#".into(),
                name: "device.idd".into()
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("${device.idd}"), "{msg}");
        assert!(msg.contains("statements[0].resources[1]"), "{msg}");
        assert!(msg.contains("${device.id}"), "{msg}");

        assert!(matches!(
            ok(&["a/${device.id"]),
            Err(PolicyError::UnterminatedVariable { .. })
        ));
        assert!(matches!(
            ok(&["a/${device.tags.}"]),
            Err(PolicyError::EmptyTagName { .. })
        ));
        assert!(matches!(
            ok(&["a/#/b"]),
            Err(PolicyError::InvalidTopicFilter {
                reason: TopicError::BadWildcard,
                ..
            })
        ));
        assert!(matches!(
            ok(&["a/+${device.id}"]),
            Err(PolicyError::InvalidTopicFilter { .. })
        ));
        assert!(matches!(
            ok(&["a/*"]),
            Err(PolicyError::StarInTopicFilter { .. })
        ));
        assert!(matches!(
            ok(&["$share/g/a"]),
            Err(PolicyError::SharedPrefix { .. })
        ));
        assert!(matches!(ok(&[""]), Err(PolicyError::EmptyResource { .. })));
        let long = "a".repeat(MAX_RESOURCE_LEN + 1);
        assert!(matches!(
            ok(&[&long]),
            Err(PolicyError::ResourceTooLong { len: 1025, .. })
        ));
        assert!(ok(&[&"a".repeat(MAX_RESOURCE_LEN)]).is_ok());
        let many: Vec<String> = (0..=MAX_RESOURCES).map(|i| format!("r/{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            ok(&many),
            Err(PolicyError::TooManyResources { count: 101, .. })
        ));
        assert!(ok(&many[..MAX_RESOURCES]).is_ok());

        let connect = |r: &str| doc(vec![Statement::allow(&[Action::Connect], &[r])]).validate();
        assert!(connect("*").is_ok());
        assert!(connect("sensor-*").is_ok());
        assert!(connect("${tenant}-${device.id}").is_ok());
        assert!(connect("${tenant}-*").is_ok());
        assert!(matches!(
            connect("a*b"),
            Err(PolicyError::InvalidClientIdPattern { .. })
        ));
        assert!(matches!(
            connect("**"),
            Err(PolicyError::InvalidClientIdPattern { .. })
        ));

        assert_eq!(doc(vec![]).validate(), Err(PolicyError::NoStatements));
        let st = Statement::allow(PSR, &["a"]);
        assert!(matches!(
            doc(vec![st.clone(); MAX_STATEMENTS + 1]).validate(),
            Err(PolicyError::TooManyStatements { count: 101, .. })
        ));
        assert!(doc(vec![st; MAX_STATEMENTS]).validate().is_ok());
        assert_eq!(
            doc(vec![Statement::allow(&[], &["a"])]).validate(),
            Err(PolicyError::NoActions { statement: 0 })
        );
        assert_eq!(
            doc(vec![Statement::allow(PSR, &[])]).validate(),
            Err(PolicyError::NoResources { statement: 0 })
        );
        let mut d = doc(vec![Statement::allow(PSR, &["a"])]);
        d.version = 0;
        assert_eq!(d.validate(), Err(PolicyError::UnsupportedVersion(0)));
    }

    #[test]
    fn invalid_document_compiles_to_nothing() {
        let mut d = doc(vec![Statement::allow(PSR, &["#"])]);
        d.version = 2;
        let p = d.compile(&vars("d1"));
        assert!(!p.can_publish("a"));
        let good = doc(vec![Statement::allow(PSR, &["#"])]);
        let bad = doc(vec![Statement::deny(PSR, &["${nope}"])]);
        let p = CompiledPolicy::from_documents(&[&good, &bad], &vars("d1"));
        assert!(!p.can_publish("a"));
        assert_eq!(p, CompiledPolicy::deny_all());
    }

    // ---- variables ------------------------------------------------------------------------

    #[test]
    fn variables_are_substituted() {
        let d = doc(vec![Statement::allow(
            &[Action::Publish],
            &[
                "t/${tenant}/d/${device.id}",
                "type/${device.type}",
                "site/${device.tags.site}/+",
                "cn/${cert.cn}",
                "serial/${cert.serial}",
                "fp/${cert.fingerprint}",
                "client/${client.id}",
                "x/pre-${device.id}-post",
            ],
        )]);
        let tags = BTreeMap::from([("site".to_owned(), "paris".to_owned())]);
        let v = PolicyVars::new("acme", "d1", "c1")
            .with_device_type("meter")
            .with_tags(&tags)
            .with_cert(CertVars {
                cn: "d1.acme",
                serial: "0a1b",
                fingerprint: "ff00",
            });
        let p = d.compile(&v);
        for t in [
            "t/acme/d/d1",
            "type/meter",
            "site/paris/temp",
            "cn/d1.acme",
            "serial/0a1b",
            "fp/ff00",
            "client/c1",
            "x/pre-d1-post",
        ] {
            assert!(p.can_publish(t), "{t}");
        }
        for t in [
            "t/acme/d/d2",
            "type/other",
            "site/lyon/temp",
            "client/c2",
            "x/d1",
        ] {
            assert!(!p.can_publish(t), "{t}");
        }
        // Only the Publish action was granted.
        assert!(!p.can_receive("type/meter"));
        assert!(!p.can_subscribe("type/meter"));
        assert!(!p.can_connect("c1"));
    }

    #[test]
    fn missing_variable_drops_the_resource() {
        let d = doc(vec![Statement::allow(
            PSR,
            &[
                "site/${device.tags.site}/#",
                "type/${device.type}/#",
                "cn/${cert.cn}/#",
                "own/${device.id}",
            ],
        )]);
        let p = d.compile(&vars("d1"));
        assert!(p.can_publish("own/d1"));
        // Never a wildcard, never the empty string, never the literal variable.
        for t in [
            "site/x/y",
            "site//y",
            "site/${device.tags.site}/y",
            "type/x",
            "cn/x",
        ] {
            assert!(!p.can_publish(t), "{t}");
        }
        assert!(!p.can_subscribe("site/+/#"));
        // A certificate with an empty CN drops the rule too.
        let v = vars("d1").with_cert(CertVars {
            cn: "",
            serial: "1",
            fingerprint: "2",
        });
        let p = d.compile(&v);
        assert!(!p.can_publish("cn//x"));
        assert!(!p.can_subscribe("cn/+/#"));
    }

    #[test]
    fn unsafe_values_drop_allow_rules() {
        let d = doc(vec![
            Statement::allow(PSR, &["site/${device.tags.site}/data"]),
            Statement::allow(&[Action::Connect], &["${device.tags.site}"]),
            Statement::allow(PSR, &["${device.id}/x"]),
        ]);
        for bad in ["a/b", "+", "#", "a+", "x#", "*", "a\0b", ""] {
            let tags = BTreeMap::from([("site".to_owned(), bad.to_owned())]);
            let p = d.compile(&vars("d1").with_tags(&tags));
            assert!(!p.can_publish(&format!("site/{bad}/data")), "{bad:?}");
            assert!(!p.can_publish("site/a/b/data"), "{bad:?}");
            assert!(!p.can_publish("site/zzz/data"), "{bad:?}");
            assert!(!p.can_subscribe("site/+/data"), "{bad:?}");
            assert!(!p.can_connect(bad), "{bad:?}");
            assert!(!p.can_connect("anything"), "{bad:?}");
            // The other resources are unaffected.
            assert!(p.can_publish("d1/x"));
        }
        // A device id beginning with '$' must not reach into reserved topics.
        let p = d.compile(&vars("$SYS"));
        assert!(!p.can_publish("$SYS/x"));
        assert!(!p.can_subscribe("$SYS/x"));
        // ...but '$' elsewhere is just a character.
        let tags = BTreeMap::from([("site".to_owned(), "$eu".to_owned())]);
        let p = d.compile(&vars("d1").with_tags(&tags));
        assert!(p.can_publish("site/$eu/data"));
        assert!(p.can_connect("$eu"));
    }

    #[test]
    fn unsafe_values_in_deny_rules_fail_closed() {
        let d = doc(vec![
            Statement::allow(PSR, &["#"]),
            Statement::allow(&[Action::Connect], &["*"]),
            Statement::deny(&[Action::Publish], &["blocked/${device.tags.zone}/#"]),
        ]);
        let tags = BTreeMap::from([("zone".to_owned(), "a/b".to_owned())]);
        let p = d.compile(&vars("d1").with_tags(&tags));
        assert!(!p.can_publish("blocked/a/b/x"));
        assert!(!p.can_publish("anything"));
        // Only the deny's own action is affected.
        assert!(p.can_subscribe("anything/#"));
        assert!(p.can_receive("anything"));
        assert!(p.can_connect("d1"));
        // A missing variable merely drops the deny: it cannot concern this session.
        let p = d.compile(&vars("d1"));
        assert!(p.can_publish("blocked/x/y"));
        // A well-formed value denies exactly its topics.
        let tags = BTreeMap::from([("zone".to_owned(), "z1".to_owned())]);
        let p = d.compile(&vars("d1").with_tags(&tags));
        assert!(!p.can_publish("blocked/z1/y"));
        assert!(!p.can_publish("blocked/z1"));
        assert!(p.can_publish("blocked/z2/y"));
    }

    // ---- decisions ------------------------------------------------------------------------

    #[test]
    fn deny_wins_and_default_is_deny() {
        let d = doc(vec![
            Statement::deny(
                &[Action::Publish, Action::Receive],
                &["devices/${device.id}/config"],
            ),
            Statement::allow(PSR, &["devices/${device.id}/#"]),
            Statement::deny(&[Action::Subscribe], &["devices/${device.id}/secret/+"]),
        ]);
        let p = d.compile(&vars("d1"));
        assert!(p.can_publish("devices/d1/telemetry"));
        assert!(!p.can_publish("devices/d1/config"));
        assert!(!p.can_receive("devices/d1/config"));
        assert!(p.can_subscribe("devices/d1/config")); // deny did not name subscribe
        assert!(p.can_publish("devices/d1/config/x"));
        assert!(!p.can_publish("devices/d2/telemetry"));
        assert!(!p.can_publish("elsewhere"));
        // Subscribe: covered, and no overlap with the deny.
        assert!(p.can_subscribe("devices/d1/+"));
        assert!(!p.can_subscribe("devices/d1/#"));
        assert!(!p.can_subscribe("devices/d1/+/k"));
        assert!(!p.can_subscribe("devices/d1/secret/k"));
        assert!(p.can_subscribe("devices/d1/secret"));
        assert!(p.can_subscribe("devices/d1/secret/k/deeper"));
        assert!(!p.can_connect("d1"));
        let none = CompiledPolicy::deny_all();
        assert!(!none.can_publish("a") && !none.can_connect("a") && !none.can_subscribe("a"));
    }

    #[test]
    fn subscribe_coverage_and_shared() {
        let d = doc(vec![Statement::allow(
            &[Action::Subscribe],
            &["devices/d1/#", "fleet/+/status"],
        )]);
        let p = d.compile(&vars("d1"));
        for ok in [
            "devices/d1/#",
            "devices/d1",
            "devices/d1/+/x",
            "fleet/+/status",
            "fleet/7/status",
            "$share/g/devices/d1/+",
            "$share/g/fleet/+/status",
        ] {
            assert!(p.can_subscribe(ok), "{ok}");
        }
        for no in [
            "devices/#",
            "+/d1/x",
            "#",
            "fleet/+/#",
            "fleet/#",
            "$share/g/devices/#",
            "$share/g/#",
            "$share/g",
            "$share//devices/d1/x",
            "devices/d1/#/x",
            "devices/d1/x+",
            "",
        ] {
            assert!(!p.can_subscribe(no), "{no}");
        }
        // Deny overlap is checked on the inner filter too.
        let d = doc(vec![
            Statement::allow(&[Action::Subscribe], &["#"]),
            Statement::deny(&[Action::Subscribe], &["admin/#"]),
        ]);
        let p = d.compile(&vars("d1"));
        assert!(!p.can_subscribe("$share/g/admin/x"));
        assert!(!p.can_subscribe("$share/g/+/x"));
        assert!(p.can_subscribe("$share/g/user/x"));
    }

    #[test]
    fn dollar_topics_need_explicit_rules() {
        let d = doc(vec![Statement::allow(PSR, &["#", "+/status"])]);
        let p = d.compile(&vars("d1"));
        assert!(p.can_publish("a/b"));
        assert!(!p.can_publish("$SYS/broker"));
        assert!(!p.can_publish("$devices/d1/status"));
        assert!(!p.can_receive("$SYS/broker"));
        assert!(p.can_subscribe("#"));
        assert!(!p.can_subscribe("$SYS/#"));
        assert!(!p.can_subscribe("$SYS/status"));
        // A deny '#' does not reach '$' topics either.
        let d = doc(vec![
            Statement::allow(PSR, &["$SYS/#"]),
            Statement::deny(PSR, &["#"]),
        ]);
        let p = d.compile(&vars("d1"));
        assert!(p.can_publish("$SYS/x"));
        assert!(p.can_subscribe("$SYS/+"));
        assert!(!p.can_publish("a"));
    }

    #[test]
    fn connect_patterns() {
        let d = doc(vec![
            Statement::allow(
                &[Action::Connect],
                &["exact", "sensor-*", "${tenant}:${device.id}"],
            ),
            Statement::deny(&[Action::Connect], &["sensor-bad*"]),
        ]);
        let p = d.compile(&vars("d1"));
        assert!(p.can_connect("exact"));
        assert!(!p.can_connect("exact2"));
        assert!(!p.can_connect("exac"));
        assert!(p.can_connect("sensor-"));
        assert!(p.can_connect("sensor-42"));
        assert!(!p.can_connect("sensor-bad-1"));
        assert!(!p.can_connect("sensor"));
        assert!(p.can_connect("t1:d1"));
        assert!(!p.can_connect("t1:d2"));
        assert!(!p.can_publish("exact"));
        let any = doc(vec![Statement::allow(&[Action::Connect], &["*"])]).compile(&vars("d1"));
        assert!(any.can_connect("whatever") && any.can_connect(""));
    }

    #[test]
    fn default_policy_confines_each_device() {
        let d = PolicyDocument::default_device();
        let a = d.compile(&vars("A"));
        assert!(a.can_connect("A"));
        assert!(!a.can_connect("B"));
        assert!(!a.can_connect("A2"));
        for t in [
            "devices/A",
            "devices/A/telemetry",
            "$devices/A/twin/update",
            "$devices/A/twin/get",
            "$devices/A/twin/name/fw/update",
            "$devices/A/commands/res/r1",
            "$devices/A/commands/res/r1/200",
        ] {
            assert!(a.can_publish(t), "{t}");
        }
        for t in [
            "devices/A",
            "devices/A/telemetry",
            "$devices/A/twin/delta",
            "$devices/A/commands/req/reboot/r1",
        ] {
            assert!(a.can_receive(t), "{t}");
        }
        // The hub's answers are the hub's to publish.
        for t in [
            "$devices/A/twin/delta",
            "$devices/A/twin/update/accepted",
            "$devices/A/twin/documents",
            "$devices/A/commands/req/reboot/r1",
            "$devices/A/shadow/update",
        ] {
            assert!(!a.can_publish(t), "{t}");
        }
        for f in [
            "devices/A/#",
            "devices/A/+/x",
            "$devices/A/#",
            "$share/g/devices/A/x",
        ] {
            assert!(a.can_subscribe(f), "{f}");
        }
        for t in [
            "devices/B/telemetry",
            "$devices/B/shadow",
            "devices",
            "other/A",
            "$SYS/x",
        ] {
            assert!(!a.can_publish(t), "{t}");
            assert!(!a.can_receive(t), "{t}");
        }
        for f in [
            "#",
            "devices/#",
            "devices/+/telemetry",
            "+/A/#",
            "$devices/#",
            "$devices/+/x",
            "devices/B/#",
            "$share/g/devices/#",
        ] {
            assert!(!a.can_subscribe(f), "{f}");
        }
    }

    #[test]
    fn several_documents_combine() {
        let type_policy = doc(vec![Statement::allow(
            &[Action::Publish],
            &["types/${device.type}/#"],
        )]);
        let own = doc(vec![Statement::deny(
            &[Action::Publish],
            &["types/${device.type}/admin"],
        )]);
        let default = PolicyDocument::default_device();
        let v = vars("d1").with_device_type("meter");
        let p = CompiledPolicy::from_documents(&[&default, &type_policy, &own], &v);
        assert!(p.can_connect("d1"));
        assert!(p.can_publish("devices/d1/x"));
        assert!(p.can_publish("types/meter/reading"));
        assert!(!p.can_publish("types/meter/admin"));
        assert!(!p.can_publish("types/other/reading"));
    }

    #[test]
    fn allow_all_allows_everything() {
        let p = CompiledPolicy::allow_all();
        assert!(p.is_allow_all());
        assert!(p.can_connect("x"));
        assert!(p.can_publish("$SYS/x"));
        assert!(p.can_subscribe("#"));
        assert!(p.can_receive("a/b"));
        assert!(!CompiledPolicy::deny_all().is_allow_all());
    }

    #[test]
    fn publish_check_is_cheap() {
        // A sanity check on the hot path's shape (no timing assertion): ten filters, one hit.
        let d = doc(vec![
            Statement::allow(
                PSR,
                &[
                    "devices/${device.id}/#",
                    "$devices/${device.id}/#",
                    "fleet/+/status",
                    "site/${device.tags.site}/+",
                    "broadcast/#",
                    "a/b/c/d",
                    "x/+/y/+/z",
                    "groups/g1/#",
                ],
            ),
            Statement::deny(PSR, &["devices/${device.id}/config", "broadcast/secret/#"]),
        ]);
        let tags = BTreeMap::from([("site".to_owned(), "s1".to_owned())]);
        let p = d.compile(&vars("device-0001").with_tags(&tags));
        let start = std::time::Instant::now();
        let mut allowed = 0u32;
        for _ in 0..10_000 {
            allowed +=
                u32::from(p.can_publish(std::hint::black_box("devices/device-0001/telemetry")));
            allowed +=
                u32::from(p.can_publish(std::hint::black_box("devices/device-0002/telemetry")));
        }
        assert_eq!(allowed, 10_000);
        eprintln!(
            "can_publish: {:?} per check (debug build)",
            start.elapsed() / 20_000
        );
    }

    // ---- brute-force references -----------------------------------------------------------

    /// Level names the generated filters use, plus a fresh one (`c`) no filter names.
    const TOPIC_LEVELS: [&str; 4] = ["a", "b", "$x", "c"];
    /// Filters have at most this many levels; topics one more, which is enough: a deeper topic
    /// is matched by exactly the filters that match its truncation to this depth + 1.
    const MAX_FILTER_LEVELS: usize = 4;

    fn all_topics() -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut layer: Vec<String> = vec![String::new()];
        for depth in 0..=MAX_FILTER_LEVELS {
            let mut next = Vec::new();
            for prefix in &layer {
                for l in TOPIC_LEVELS {
                    next.push(if depth == 0 {
                        l.to_owned()
                    } else {
                        format!("{prefix}/{l}")
                    });
                }
            }
            out.extend(next.iter().cloned());
            layer = next;
        }
        out
    }

    /// Every valid filter over {a, b, $x, +} with an optional final `#`, up to 4 levels.
    fn all_filters() -> Vec<String> {
        let mut out = Vec::new();
        let mut layer: Vec<String> = vec![String::new()];
        for depth in 0..MAX_FILTER_LEVELS {
            let join = |prefix: &str, l: &str| {
                if depth == 0 {
                    l.to_owned()
                } else {
                    format!("{prefix}/{l}")
                }
            };
            let mut next = Vec::new();
            for prefix in &layer {
                out.push(join(prefix, "#"));
                for l in ["a", "b", "$x", "+"] {
                    next.push(join(prefix, l));
                }
            }
            out.extend(next.iter().cloned());
            layer = next;
        }
        out
    }

    fn filter_strategy() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        (
            proptest::collection::vec(prop::sample::select(vec!["a", "b", "$x", "+"]), 0..4),
            any::<bool>(),
        )
            .prop_map(|(mut levels, hash)| {
                if hash || levels.is_empty() {
                    levels.push("#");
                }
                levels.join("/")
            })
    }

    /// The set of generated topics a filter matches, as a bitset.
    fn match_bits(filter: &str, topics: &[String]) -> Vec<u64> {
        let mut bits = vec![0u64; topics.len().div_ceil(64)];
        for (k, t) in topics.iter().enumerate() {
            if filter_matches(filter, t) {
                bits[k / 64] |= 1 << (k % 64);
            }
        }
        bits
    }

    #[test]
    fn generators_are_sane() {
        let topics = all_topics();
        assert_eq!(topics.len(), 4 + 16 + 64 + 256 + 1024);
        let filters = all_filters();
        assert_eq!(filters.len(), 1 + 4 + 4 + 16 + 16 + 64 + 64 + 256);
        assert!(filters.iter().all(|f| TopicFilter::parse(f).is_ok()));
        // Every filter matches at least one generated topic (the reference can say "overlap").
        assert!(
            filters
                .iter()
                .all(|f| topics.iter().any(|t| filter_matches(f, t)))
        );
    }

    #[test]
    fn covers_and_overlap_match_brute_force_exhaustively() {
        let topics = all_topics();
        let filters = all_filters();
        let bits: Vec<Vec<u64>> = filters.iter().map(|f| match_bits(f, &topics)).collect();
        for (i, a) in filters.iter().enumerate() {
            for (j, b) in filters.iter().enumerate() {
                let (ma, mb) = (&bits[i], &bits[j]);
                let covers = mb.iter().zip(ma).all(|(&in_b, &in_a)| (in_b & !in_a) == 0);
                let overlap = mb.iter().zip(ma).any(|(&in_b, &in_a)| (in_b & in_a) != 0);
                assert_eq!(covers_unchecked(a, b), covers, "covers({a}, {b})");
                assert_eq!(overlap_unchecked(a, b), overlap, "overlap({a}, {b})");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn covers_matches_reference(outer in filter_strategy(), inner in filter_strategy()) {
            let topics = all_topics();
            let reference = topics.iter().all(|t| !filter_matches(&inner, t) || filter_matches(&outer, t));
            proptest::prop_assert_eq!(filter_covers(&outer, &inner), reference);
        }

        #[test]
        fn overlap_matches_reference(a in filter_strategy(), b in filter_strategy()) {
            let topics = all_topics();
            let reference = topics.iter().any(|t| filter_matches(&a, t) && filter_matches(&b, t));
            proptest::prop_assert_eq!(filters_overlap(&a, &b), reference);
            proptest::prop_assert_eq!(filters_overlap(&b, &a), reference);
        }

        /// Whatever a granted subscription can deliver is something the same rules allow.
        #[test]
        fn granted_subscriptions_stay_inside_the_policy(
            allow in proptest::collection::vec(filter_strategy(), 1..4),
            deny in proptest::collection::vec(filter_strategy(), 0..3),
            request in filter_strategy(),
        ) {
            let allow: Vec<&str> = allow.iter().map(String::as_str).collect();
            let deny: Vec<&str> = deny.iter().map(String::as_str).collect();
            let mut statements = vec![Statement::allow(PSR, &allow)];
            if !deny.is_empty() {
                statements.push(Statement::deny(PSR, &deny));
            }
            let p = doc(statements).compile(&vars("d1"));
            if p.can_subscribe(&request) {
                for t in all_topics().iter().filter(|t| filter_matches(&request, t)) {
                    proptest::prop_assert!(p.can_publish(t), "{} via {}", t, request);
                }
            }
        }
    }
}
