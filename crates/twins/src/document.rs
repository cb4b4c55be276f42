//! The twin document: a pure, in-memory model of one twin of one device.
//!
//! A [`TwinDocument`] has three sections, each a JSON object: `desired` (written by operators and
//! rules), `reported` (written by the device) and `tags` (operator-only, never shown to devices).
//! Around them it keeps versions, per-key timestamps (metadata), per-key acknowledgements of
//! desired values and computes the `delta` (what desired asks for that reported does not show).
//!
//! # Updates
//!
//! [`TwinDocument::apply_patch`] applies a JSON Merge Patch ([RFC 7396]) to one section: object
//! members merge recursively, `null` deletes a key, any other value (arrays included) replaces
//! whatever was there. An update is all-or-nothing: it is validated in full (key rules, nesting
//! depth, section size) and on any error the document is left exactly as it was.
//!
//! * **Keys** are non-empty, at most [`MAX_KEY_BYTES`] bytes, do not start with `$` (reserved for
//!   metadata such as `$lastUpdated`) and contain neither `.` (paths are dotted) nor control
//!   characters. The rules apply to every object key of the patch, including keys of objects
//!   inside arrays.
//! * **Depth** counts nested containers: the section root object is depth 1, every object or
//!   array inside adds one level and scalars add none. `{"a": {"b": 1}}` has depth 2,
//!   `{"a": [{"b": 1}]}` has depth 3. The limit is [`Limits::max_depth`].
//! * **Size** is the length of the section serialized as compact JSON (the section alone, not
//!   its metadata). The limit is [`Limits::max_section_bytes`]. It is computed exactly without
//!   building the result: a section is measured once (on its first patch after loading) and each
//!   patch adds the difference it makes, serializing only the values it replaces and itself.
//!
//! Validation reads only; an accepted patch is then merged in place, so no section is cloned.
//!
//! # Versions
//!
//! `version` counts accepted changes of the whole document; each section has its own version
//! too. Every accepted patch bumps `version` and the patched section's version by one, **even if
//! it changes nothing** (a patch equal to the current values, or `{}`), as AWS IoT Device Shadow
//! does: the rule is simple and a client can rely on "accepted ⇒ new version". A
//! [`reject`](TwinDocument::reject) that changes an acknowledgement bumps `version` (the document
//! changed, so its [`etag`](TwinDocument::etag) must) but no section version.
//!
//! # Metadata
//!
//! For each section a [`MetaNode`] tree mirrors the section's objects and holds the last-updated
//! time (Unix milliseconds) of the section root, of every object and of every leaf. A patch sets
//! the time of every key it names and of every object above it (the section root included);
//! deleted keys lose their metadata. Arrays are leaves: their elements have no metadata.
//!
//! # Acknowledgements
//!
//! Every leaf of `desired` (any non-object value; arrays are leaves) has a [`KeyAck`] under its
//! dotted path (`config.rate`):
//!
//! * a desired patch that writes a leaf — even with the value it already had, which lets an
//!   operator retry a rejected key — makes it `Pending` with the new desired version, or
//!   `Applied` at once if `reported` already holds an equal value at that path; deleting or
//!   replacing desired keys drops the acknowledgements of the leaves that no longer exist;
//! * a reported patch makes every `Pending` or `Rejected` acknowledgement whose desired value now
//!   equals the reported value at the same path `Applied`;
//! * [`reject`](TwinDocument::reject) lets the device say it cannot apply a desired value (not
//!   one it currently reports). An `Applied` acknowledgement stays `Applied` if the device later
//!   reports something else: it records that the device did apply that desired version.
//!
//! # Delta and equality
//!
//! The delta follows AWS semantics: every desired key whose value differs from reported; nested
//! objects are compared recursively and only their differing members are included; arrays and
//! scalars are compared whole; keys only in reported never appear; a desired key that reported
//! lacks appears. Values are compared structurally except numbers, which compare by value: two
//! integers compare exactly, anything else as `f64`, so `1` equals `1.0`. The same equality
//! decides whether an acknowledgement is applied.
//!
//! # Storage
//!
//! [`TwinDocument`] serializes to a compact JSON object with stable field names (`version`,
//! `desiredVersion`, ..., `desired`, `reported`, `tags`, `meta`, `acks`); metadata nodes and
//! acknowledgements use one-letter field names because there is one per key. Every field has a
//! default, so fields can be added later and older documents still load. The views
//! ([`operator_view`](TwinDocument::operator_view), [`device_view`](TwinDocument::device_view))
//! are the API form, separate from the stored one.
//!
//! [RFC 7396]: https://www.rfc-editor.org/rfc/rfc7396

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

/// Default for [`Limits::max_section_bytes`]: 32 KiB.
pub const DEFAULT_MAX_SECTION_BYTES: usize = 32 * 1024;
/// Default for [`Limits::max_depth`].
pub const DEFAULT_MAX_DEPTH: usize = 10;
/// The longest key (in bytes) a section may hold.
pub const MAX_KEY_BYTES: usize = 128;
/// The longest rejection reason (in bytes) kept; longer reasons are truncated.
pub const MAX_REASON_BYTES: usize = 256;

/// One of the three sections of a twin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    /// What operators and rules want the device to be; written by them, read by the device.
    Desired,
    /// What the device says it is; written by the device.
    Reported,
    /// Operator-only labels; never shown to the device.
    Tags,
}

impl Section {
    /// All sections, in document order.
    pub const ALL: [Section; 3] = [Section::Desired, Section::Reported, Section::Tags];

    /// The section's name as it appears in documents and paths: `desired`, `reported`, `tags`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Section::Desired => "desired",
            Section::Reported => "reported",
            Section::Tags => "tags",
        }
    }

    /// The section named `name` (`desired`, `reported` or `tags`), if any.
    pub fn parse(name: &str) -> Option<Section> {
        Section::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Size limits checked on every patch (configuration `twins.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest a section may be, as compact JSON (`twins.max_section_bytes`).
    pub max_section_bytes: usize,
    /// The deepest a section may nest, the section root being depth 1 (`twins.max_depth`).
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_section_bytes: DEFAULT_MAX_SECTION_BYTES,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// Where a desired value stands on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckStatus {
    /// Desired but not (yet) reported.
    Pending,
    /// Reported with the desired value.
    Applied,
    /// The device said it cannot apply the value.
    Rejected,
}

impl AckStatus {
    /// `pending`, `applied` or `rejected`.
    pub const fn as_str(self) -> &'static str {
        match self {
            AckStatus::Pending => "pending",
            AckStatus::Applied => "applied",
            AckStatus::Rejected => "rejected",
        }
    }
}

/// The acknowledgement of one desired leaf.
///
/// Stored compactly as `{"s": status, "v": desired version, "r": reason (if any), "t": at}`
/// (there is one per desired leaf); [`KeyAck::to_view`] gives the API form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAck {
    /// Where the value stands.
    #[serde(rename = "s")]
    pub status: AckStatus,
    /// The desired version that set the value.
    #[serde(rename = "v", default)]
    pub desired_version: u64,
    /// Why the device rejected the value (only for `Rejected`; at most [`MAX_REASON_BYTES`]).
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the status was last set (Unix milliseconds).
    #[serde(rename = "t", default)]
    pub at: u64,
}

impl KeyAck {
    /// `{"status", "desiredVersion", "reason"?, "at"}`, as shown in the views.
    pub fn to_view(&self) -> Value {
        let mut m = Map::new();
        m.insert("status".into(), self.status.as_str().into());
        m.insert("desiredVersion".into(), self.desired_version.into());
        if let Some(reason) = &self.reason {
            m.insert("reason".into(), reason.as_str().into());
        }
        m.insert("at".into(), self.at.into());
        Value::Object(m)
    }
}

/// Last-updated times of one object of a section (or of a leaf, which has no children).
///
/// Stored compactly as `{"t": ms, "c": {key: node}}` (`c` omitted when empty); shown in the views
/// as `{"$lastUpdated": ms, key: node}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaNode {
    /// When this key (or anything below it) was last written (Unix milliseconds).
    #[serde(rename = "t", default)]
    pub updated: u64,
    /// The metadata of the members of this object (empty for a leaf).
    #[serde(rename = "c", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub children: BTreeMap<String, MetaNode>,
}

impl MetaNode {
    /// A node without children updated at `updated`.
    pub fn new(updated: u64) -> Self {
        MetaNode {
            updated,
            children: BTreeMap::new(),
        }
    }

    /// The node at the dotted `path` below this one (`""` is this node).
    pub fn at_path(&self, path: &str) -> Option<&MetaNode> {
        if path.is_empty() {
            return Some(self);
        }
        path.split('.')
            .try_fold(self, |node, key| node.children.get(key))
    }

    /// `{"$lastUpdated": ms, key: {...}}`.
    pub fn to_view(&self) -> Value {
        let mut m = Map::new();
        m.insert("$lastUpdated".into(), self.updated.into());
        for (k, child) in &self.children {
            m.insert(k.clone(), child.to_view());
        }
        Value::Object(m)
    }
}

/// The metadata trees of the three sections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
struct SectionsMeta {
    desired: MetaNode,
    reported: MetaNode,
    tags: MetaNode,
}

/// Why a patch (or a rejection) was refused. Messages name the offending path and say what to
/// change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The patch is not a JSON object.
    #[error(
        "a {section} patch must be a JSON object, not {found}: send {{\"key\": value}} to set keys and {{\"key\": null}} to delete them"
    )]
    NotAnObject {
        /// The section patched.
        section: Section,
        /// What the patch was (`an array`, `a string`, ...).
        found: &'static str,
    },
    /// A key breaks the key rules.
    #[error("{path}: invalid key: {reason}")]
    InvalidKey {
        /// The path of the key, section first (`desired.config.$rate`).
        path: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// The section would nest deeper than [`Limits::max_depth`].
    #[error("{path}: nesting depth {depth} exceeds the limit of {limit} (twins.max_depth)")]
    TooDeep {
        /// The key whose value nests too deep, section first.
        path: String,
        /// The depth this update would create there.
        depth: usize,
        /// The limit.
        limit: usize,
    },
    /// The section would be larger than [`Limits::max_section_bytes`].
    #[error(
        "{section} would be {size} bytes after this update; the limit is {limit} bytes (twins.max_section_bytes)"
    )]
    TooLarge {
        /// The section patched.
        section: Section,
        /// Its size after the update, as compact JSON.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A rejection names a path that is not a desired leaf.
    #[error(
        "desired.{path} is not a desired value (it does not exist or is an object): reject names a leaf of desired, e.g. `config.rate`"
    )]
    NotADesiredLeaf {
        /// The path as given.
        path: String,
    },
    /// A rejection names a desired value the device already reports.
    #[error(
        "desired.{path} is already applied (reported holds the desired value): report a different value before rejecting it"
    )]
    AlreadyApplied {
        /// The path as given.
        path: String,
    },
}

/// What an accepted patch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchOutcome {
    /// The document's new version.
    pub version: u64,
    /// The patched section's new version.
    pub section_version: u64,
    /// Whether [`TwinDocument::delta`] differs from what it was before the patch.
    pub delta_changed: bool,
    /// Paths whose acknowledgement was created or changed (status, desired version or reason),
    /// sorted.
    pub acks_changed: Vec<String>,
    /// Paths whose acknowledgement was removed (their desired leaf no longer exists), sorted.
    pub acks_removed: Vec<String>,
    /// The patched section's size after the patch, as compact JSON.
    pub section_bytes: usize,
}

/// A twin document: desired, reported and tags with versions, metadata and acknowledgements.
///
/// Serialized (for storage) as a compact JSON object with stable field names; every field has a
/// default, so fields can be added later and older documents still load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TwinDocument {
    version: u64,
    desired_version: u64,
    reported_version: u64,
    tags_version: u64,
    created_at: u64,
    updated_at: u64,
    desired: Map<String, Value>,
    reported: Map<String, Value>,
    tags: Map<String, Value>,
    #[serde(rename = "meta")]
    metadata: SectionsMeta,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    acks: BTreeMap<String, KeyAck>,
    #[serde(skip)]
    sizes: SizeCache,
}

/// The compact JSON size of each section, once known (measured on the first patch of a section,
/// then kept up to date by every patch). Not stored and ignored by comparisons.
#[derive(Debug, Clone, Copy, Default)]
struct SizeCache([Option<usize>; 3]);

impl PartialEq for SizeCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl TwinDocument {
    /// An empty twin created at `now` (Unix milliseconds), all versions 0.
    pub fn new(now: u64) -> Self {
        TwinDocument {
            created_at: now,
            updated_at: now,
            metadata: SectionsMeta {
                desired: MetaNode::new(now),
                reported: MetaNode::new(now),
                tags: MetaNode::new(now),
            },
            ..TwinDocument::default()
        }
    }

    /// The whole-document version: +1 on every accepted change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The version of `section`: +1 on every accepted patch of it.
    pub fn section_version(&self, section: Section) -> u64 {
        match section {
            Section::Desired => self.desired_version,
            Section::Reported => self.reported_version,
            Section::Tags => self.tags_version,
        }
    }

    /// When the twin was created (Unix milliseconds).
    pub fn created_at(&self) -> u64 {
        self.created_at
    }

    /// When the twin last changed (Unix milliseconds).
    pub fn updated_at(&self) -> u64 {
        self.updated_at
    }

    /// The contents of `section`.
    pub fn section(&self, section: Section) -> &Map<String, Value> {
        match section {
            Section::Desired => &self.desired,
            Section::Reported => &self.reported,
            Section::Tags => &self.tags,
        }
    }

    /// The desired section.
    pub fn desired(&self) -> &Map<String, Value> {
        &self.desired
    }

    /// The reported section.
    pub fn reported(&self) -> &Map<String, Value> {
        &self.reported
    }

    /// The tags section.
    pub fn tags(&self) -> &Map<String, Value> {
        &self.tags
    }

    /// The metadata tree of `section`.
    pub fn metadata(&self, section: Section) -> &MetaNode {
        match section {
            Section::Desired => &self.metadata.desired,
            Section::Reported => &self.metadata.reported,
            Section::Tags => &self.metadata.tags,
        }
    }

    /// The acknowledgements, by dotted desired path.
    pub fn acks(&self) -> &BTreeMap<String, KeyAck> {
        &self.acks
    }

    /// The acknowledgement of the desired leaf at the dotted `path`.
    pub fn ack(&self, path: &str) -> Option<&KeyAck> {
        self.acks.get(path)
    }

    /// A strong ETag for the document: its version in quotes (`"7"`). It changes exactly when
    /// the version does, which is on every change of the document, and only ever grows.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.version)
    }

    /// Applies the JSON Merge Patch `patch` to `section` at `now` (Unix milliseconds).
    ///
    /// All-or-nothing: on error nothing changes. See the [module documentation](self) for the
    /// rules, versions, metadata and acknowledgements.
    pub fn apply_patch(
        &mut self,
        section: Section,
        patch: &Value,
        now: u64,
        limits: &Limits,
    ) -> Result<PatchOutcome, PatchError> {
        let Value::Object(patch) = patch else {
            return Err(PatchError::NotAnObject {
                section,
                found: kind(patch),
            });
        };
        let mut path = String::with_capacity(64);
        path.push_str(section.as_str());
        validate_keys(patch, &mut path)?;
        if limits.max_depth < 1 {
            return Err(PatchError::TooDeep {
                path,
                depth: 1,
                limit: limits.max_depth,
            });
        }
        // Validate without touching anything: depth and the exact size the section would have.
        let old_size = match self.sizes.0[section as usize] {
            Some(size) => size,
            None => serialized_len(self.section(section)),
        };
        let growth = measure(
            Some(self.section(section)),
            patch,
            1,
            &mut path,
            limits.max_depth,
        )?;
        let size = old_size.saturating_add_signed(growth);
        if size > limits.max_section_bytes {
            return Err(PatchError::TooLarge {
                section,
                size,
                limit: limits.max_section_bytes,
            });
        }

        // Accepted: from here on nothing can fail, so the patch is applied in place.
        self.version += 1;
        self.updated_at = now;
        let section_version = match section {
            Section::Desired => &mut self.desired_version,
            Section::Reported => &mut self.reported_version,
            Section::Tags => &mut self.tags_version,
        };
        *section_version += 1;
        let section_version = *section_version;
        self.sizes.0[section as usize] = Some(size);

        let TwinDocument {
            desired,
            reported,
            tags,
            metadata,
            acks,
            desired_version,
            ..
        } = self;
        let (target, other, meta) = match section {
            Section::Desired => (desired, Some(&*reported), &mut metadata.desired),
            Section::Reported => (reported, Some(&*desired), &mut metadata.reported),
            Section::Tags => (tags, None, &mut metadata.tags),
        };
        let mut commit = Commit {
            section,
            now,
            desired_version: *desired_version,
            acks,
            delta_changed: false,
            acks_changed: Vec::new(),
            acks_removed: Vec::new(),
        };
        meta.updated = now;
        let mut rel = String::with_capacity(64);
        commit.walk(target, meta, patch, other, &mut rel, true);
        let Commit {
            delta_changed,
            mut acks_changed,
            mut acks_removed,
            ..
        } = commit;
        acks_changed.sort_unstable();
        acks_changed.dedup();
        acks_removed.sort_unstable();
        acks_removed.dedup();

        Ok(PatchOutcome {
            version: self.version,
            section_version,
            delta_changed,
            acks_changed,
            acks_removed,
            section_bytes: size,
        })
    }

    /// The device says it cannot apply the desired leaf at the dotted `path` (relative to
    /// desired: `config.rate`), because of `reason` (truncated to [`MAX_REASON_BYTES`] at a
    /// character boundary).
    ///
    /// Valid only for an existing desired leaf that reported does not already hold. Returns
    /// whether something changed: rejecting again with the same reason changes nothing. A change
    /// bumps the document version (not the desired version) and sets `updated_at`.
    pub fn reject(&mut self, path: &str, reason: &str, now: u64) -> Result<bool, PatchError> {
        let desired = lookup(&self.desired, path)
            .filter(|v| !v.is_object())
            .ok_or_else(|| PatchError::NotADesiredLeaf {
                path: path.to_owned(),
            })?;
        if lookup(&self.reported, path).is_some_and(|r| json_eq(desired, r)) {
            return Err(PatchError::AlreadyApplied {
                path: path.to_owned(),
            });
        }
        let reason = truncate(reason, MAX_REASON_BYTES);
        let desired_version = match self.acks.get(path) {
            Some(ack)
                if ack.status == AckStatus::Rejected && ack.reason.as_deref() == Some(reason) =>
            {
                return Ok(false);
            }
            Some(ack) => ack.desired_version,
            None => self.desired_version,
        };
        self.acks.insert(
            path.to_owned(),
            KeyAck {
                status: AckStatus::Rejected,
                desired_version,
                reason: Some(reason.to_owned()),
                at: now,
            },
        );
        self.version += 1;
        self.updated_at = now;
        Ok(true)
    }

    /// The desired values reported does not show (AWS semantics; see the
    /// [module documentation](self)).
    pub fn delta(&self) -> Map<String, Value> {
        render_partial(&self.desired, &self.reported)
    }

    /// The document as operators see it:
    /// `{"deviceId", "name", "version", "etag", "desired", "reported", "tags", "delta", "acks",
    /// "versions": {"desired", "reported", "tags"}, "metadata": {"desired", "reported", "tags"},
    /// "createdAt", "updatedAt"}`.
    pub fn operator_view(&self, device_id: &str, name: &str) -> Value {
        let mut m = Map::new();
        m.insert("deviceId".into(), device_id.into());
        m.insert("name".into(), name.into());
        m.insert("version".into(), self.version.into());
        m.insert("etag".into(), self.etag().into());
        m.insert("desired".into(), Value::Object(self.desired.clone()));
        m.insert("reported".into(), Value::Object(self.reported.clone()));
        m.insert("tags".into(), Value::Object(self.tags.clone()));
        m.insert("delta".into(), Value::Object(self.delta()));
        m.insert("acks".into(), self.acks_view());
        let mut versions = Map::new();
        let mut metadata = Map::new();
        for s in Section::ALL {
            versions.insert(s.as_str().into(), self.section_version(s).into());
            metadata.insert(s.as_str().into(), self.metadata(s).to_view());
        }
        m.insert("versions".into(), Value::Object(versions));
        m.insert("metadata".into(), Value::Object(metadata));
        m.insert("createdAt".into(), self.created_at.into());
        m.insert("updatedAt".into(), self.updated_at.into());
        Value::Object(m)
    }

    /// The document as the device sees it: no tags (nor their version or metadata):
    /// `{"version", "desired", "reported", "delta", "acks", "versions": {"desired", "reported"},
    /// "metadata": {"desired", "reported"}, "updatedAt"}`.
    pub fn device_view(&self) -> Value {
        let mut m = Map::new();
        m.insert("version".into(), self.version.into());
        m.insert("desired".into(), Value::Object(self.desired.clone()));
        m.insert("reported".into(), Value::Object(self.reported.clone()));
        m.insert("delta".into(), Value::Object(self.delta()));
        m.insert("acks".into(), self.acks_view());
        let mut versions = Map::new();
        let mut metadata = Map::new();
        for s in [Section::Desired, Section::Reported] {
            versions.insert(s.as_str().into(), self.section_version(s).into());
            metadata.insert(s.as_str().into(), self.metadata(s).to_view());
        }
        m.insert("versions".into(), Value::Object(versions));
        m.insert("metadata".into(), Value::Object(metadata));
        m.insert("updatedAt".into(), self.updated_at.into());
        Value::Object(m)
    }

    fn acks_view(&self) -> Value {
        Value::Object(
            self.acks
                .iter()
                .map(|(path, ack)| (path.clone(), ack.to_view()))
                .collect(),
        )
    }
}

/// The second, infallible pass of a patch: merges it into the section in place (`target`) and
/// maintains metadata, acknowledgements and the delta check on the way, comparing with the other
/// one of desired/reported (`other`).
struct Commit<'a> {
    section: Section,
    now: u64,
    desired_version: u64,
    acks: &'a mut BTreeMap<String, KeyAck>,
    delta_changed: bool,
    acks_changed: Vec<String>,
    acks_removed: Vec<String>,
}

impl Commit<'_> {
    /// Merges `patch` into `target`, the object at the dotted `path` (relative to the section)
    /// whose metadata is `meta`. `check_delta` is false below a key whose whole value is
    /// compared.
    fn walk(
        &mut self,
        target: &mut Map<String, Value>,
        meta: &mut MetaNode,
        patch: &Map<String, Value>,
        other: Option<&Map<String, Value>>,
        path: &mut String,
        check_delta: bool,
    ) {
        for (key, patch_value) in patch {
            let len = path.len();
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(key);
            let other_value = other.and_then(|m| m.get(key));
            match patch_value {
                Value::Null => {
                    let old = target.remove(key);
                    meta.children.remove(key);
                    if check_delta {
                        self.note_delta(old.as_ref(), None, other_value);
                    }
                    if self.section == Section::Desired {
                        self.drop_ack(path);
                        self.drop_descendant_acks(path);
                    }
                }
                Value::Object(patch_object) => {
                    let mut fresh_meta = MetaNode::default();
                    let (child_meta, new_meta) = match meta.children.get_mut(key) {
                        Some(child) => (child, false),
                        None => (&mut fresh_meta, true),
                    };
                    child_meta.updated = self.now;
                    let other_object = other_value.and_then(Value::as_object);
                    match target.get_mut(key) {
                        Some(Value::Object(existing)) => {
                            self.walk(
                                existing,
                                child_meta,
                                patch_object,
                                other_object,
                                path,
                                check_delta,
                            );
                        }
                        slot => {
                            // Nothing or a leaf was there: a new object, compared whole.
                            child_meta.children.clear();
                            let old = slot.map(std::mem::take);
                            if self.section == Section::Desired && old.is_some() {
                                self.drop_ack(path);
                            }
                            let mut object = Map::new();
                            self.walk(
                                &mut object,
                                child_meta,
                                patch_object,
                                other_object,
                                path,
                                false,
                            );
                            let new = Value::Object(object);
                            if check_delta {
                                self.note_delta(old.as_ref(), Some(&new), other_value);
                            }
                            match target.get_mut(key) {
                                Some(slot) => *slot = new,
                                None => {
                                    target.insert(key.clone(), new);
                                }
                            }
                        }
                    }
                    if new_meta {
                        meta.children.insert(key.clone(), fresh_meta);
                    }
                }
                leaf => {
                    match meta.children.get_mut(key) {
                        Some(child) => {
                            child.updated = self.now;
                            child.children.clear();
                        }
                        None => {
                            meta.children.insert(key.clone(), MetaNode::new(self.now));
                        }
                    }
                    let old = match target.get_mut(key) {
                        Some(slot) => Some(std::mem::replace(slot, leaf.clone())),
                        None => {
                            target.insert(key.clone(), leaf.clone());
                            None
                        }
                    };
                    if check_delta {
                        self.note_delta(old.as_ref(), Some(leaf), other_value);
                    }
                    match self.section {
                        Section::Desired => {
                            if old.as_ref().is_some_and(Value::is_object) {
                                self.drop_descendant_acks(path);
                            }
                            let status = if other_value.is_some_and(|r| json_eq(leaf, r)) {
                                AckStatus::Applied
                            } else {
                                AckStatus::Pending
                            };
                            let ack = KeyAck {
                                status,
                                desired_version: self.desired_version,
                                reason: None,
                                at: self.now,
                            };
                            self.acks.insert(path.clone(), ack);
                            self.acks_changed.push(path.clone());
                        }
                        Section::Reported => {
                            // Only the acknowledgement at this very path can become applied:
                            // below a reported leaf there is nothing to compare with.
                            if let Some(ack) = self.acks.get_mut(path.as_str())
                                && ack.status != AckStatus::Applied
                                && other_value.is_some_and(|d| !d.is_object() && json_eq(d, leaf))
                            {
                                ack.status = AckStatus::Applied;
                                ack.reason = None;
                                ack.at = self.now;
                                self.acks_changed.push(path.clone());
                            }
                        }
                        Section::Tags => {}
                    }
                }
            }
            path.truncate(len);
        }
    }

    /// Records whether the delta at one path changed, given desired/reported (whichever was
    /// patched) before and after and the other section's value there.
    fn note_delta(&mut self, old: Option<&Value>, new: Option<&Value>, other: Option<&Value>) {
        if self.delta_changed {
            return;
        }
        let (before, after) = match self.section {
            Section::Desired => (view(old, other), view(new, other)),
            Section::Reported => (view(other, old), view(other, new)),
            Section::Tags => return,
        };
        if !views_eq(before, after) {
            self.delta_changed = true;
        }
    }

    fn drop_ack(&mut self, path: &str) {
        if self.acks.remove(path).is_some() {
            self.acks_removed.push(path.to_owned());
        }
    }

    fn drop_descendant_acks(&mut self, path: &str) {
        let prefix = format!("{path}.");
        let doomed: Vec<String> = self
            .acks
            .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.acks.remove(&k);
            self.acks_removed.push(k);
        }
    }
}

/// `an object`, `an array`, ... for error messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Appends `.key` to an error path, control characters escaped.
fn push_key(path: &mut String, key: &str) {
    path.push('.');
    for c in key.chars() {
        if c.is_control() {
            path.extend(c.escape_unicode());
        } else {
            path.push(c);
        }
    }
}

/// Checks every object key of `object` (recursively, arrays included) against the key rules.
fn validate_keys(object: &Map<String, Value>, path: &mut String) -> Result<(), PatchError> {
    for (key, value) in object {
        let len = path.len();
        push_key(path, key);
        if let Some(reason) = key_problem(key) {
            return Err(PatchError::InvalidKey {
                path: std::mem::take(path),
                reason,
            });
        }
        validate_value_keys(value, path)?;
        path.truncate(len);
    }
    Ok(())
}

fn validate_value_keys(value: &Value, path: &mut String) -> Result<(), PatchError> {
    match value {
        Value::Object(object) => validate_keys(object, path),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if matches!(item, Value::Object(_) | Value::Array(_)) {
                    let len = path.len();
                    path.push('[');
                    path.push_str(&i.to_string());
                    path.push(']');
                    validate_value_keys(item, path)?;
                    path.truncate(len);
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn key_problem(key: &str) -> Option<String> {
    if key.is_empty() {
        Some("keys must not be empty".into())
    } else if key.len() > MAX_KEY_BYTES {
        Some(format!(
            "the key is {} bytes; keys are at most {MAX_KEY_BYTES} bytes",
            key.len()
        ))
    } else if key.starts_with('$') {
        Some("keys must not start with '$' (reserved for metadata)".into())
    } else if key.contains('.') {
        Some("keys must not contain '.' (paths are dotted)".into())
    } else if key.chars().any(char::is_control) {
        Some("keys must not contain control characters".into())
    } else {
        None
    }
}

/// How many levels of containers `v` is: 0 for a scalar, 1 for `{}` or `[]`, ...
fn container_depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(container_depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(container_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Checks the nesting depth the RFC 7396 merge of `patch` into `target` (an object at `depth`,
/// the section root being 1; `None` for an object the merge creates) would create, and returns
/// how many bytes the merge adds to `target`'s compact JSON (negative if it shrinks), without
/// merging: only the replaced values and the patch are serialized. `path` is the error path of
/// `target`.
fn measure(
    target: Option<&Map<String, Value>>,
    patch: &Map<String, Value>,
    depth: usize,
    path: &mut String,
    max_depth: usize,
) -> Result<isize, PatchError> {
    let before = target.map_or(0, Map::len);
    let mut members = before;
    let mut growth: isize = 0;
    for (key, patch_value) in patch {
        let old = target.and_then(|m| m.get(key));
        let new_len = match patch_value {
            Value::Null => {
                if let Some(old) = old {
                    growth -= member_len(key, serialized_len(old));
                    members -= 1;
                }
                continue;
            }
            Value::Object(patch_object) => {
                let len = path.len();
                push_key(path, key);
                if depth + 1 > max_depth {
                    return Err(PatchError::TooDeep {
                        path: std::mem::take(path),
                        depth: depth + container_depth(patch_value),
                        limit: max_depth,
                    });
                }
                if let Some(Value::Object(existing)) = old {
                    growth += measure(Some(existing), patch_object, depth + 1, path, max_depth)?;
                    path.truncate(len);
                    continue;
                }
                // A new object: "{}" plus what the patch puts in it.
                let grown = measure(None, patch_object, depth + 1, path, max_depth)?;
                path.truncate(len);
                2usize.saturating_add_signed(grown)
            }
            leaf => {
                let leaf_depth = depth + container_depth(leaf);
                if leaf_depth > max_depth {
                    push_key(path, key);
                    return Err(PatchError::TooDeep {
                        path: std::mem::take(path),
                        depth: leaf_depth,
                        limit: max_depth,
                    });
                }
                serialized_len(leaf)
            }
        };
        match old {
            Some(old) => growth += signed(new_len) - signed(serialized_len(old)),
            None => {
                growth += member_len(key, new_len);
                members += 1;
            }
        }
    }
    // Members are separated by commas.
    growth += signed(members.saturating_sub(1)) - signed(before.saturating_sub(1));
    Ok(growth)
}

/// The length of `"key":value` given the value's length.
fn member_len(key: &str, value_len: usize) -> isize {
    signed(serialized_len(key) + 1 + value_len)
}

fn signed(n: usize) -> isize {
    isize::try_from(n).unwrap_or(isize::MAX)
}

/// Counts bytes written; for measuring serialized sizes without allocating.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The length of `value` as compact JSON.
fn serialized_len<T: Serialize + ?Sized>(value: &T) -> usize {
    let mut counter = ByteCounter(0);
    match serde_json::to_writer(&mut counter, value) {
        Ok(()) => counter.0,
        // Cannot happen (JSON values always serialize and the writer never fails); refuse the
        // update rather than accept an unmeasured section.
        Err(_) => usize::MAX / 2,
    }
}

/// The value at the dotted `path` of `root`.
fn lookup<'a>(root: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut keys = path.split('.');
    let first = root.get(keys.next()?)?;
    keys.try_fold(first, |v, key| v.as_object()?.get(key))
}

/// `s` cut to at most `max` bytes at a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Structural equality, numbers by value (`1 == 1.0`).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_eq(x, y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, a)| y.get(k).is_some_and(|b| json_eq(a, b)))
        }
        _ => a == b,
    }
}

/// Two integers compare exactly, anything else as `f64`.
fn number_eq(x: &Number, y: &Number) -> bool {
    if let (Some(a), Some(b)) = (x.as_i64(), y.as_i64()) {
        a == b
    } else if let (Some(a), Some(b)) = (x.as_u64(), y.as_u64()) {
        a == b
    } else {
        match (x.as_f64(), y.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => x == y,
        }
    }
}

/// The delta at one path, given desired `d` and reported `r` there, without building it.
#[derive(Clone, Copy)]
enum DeltaView<'a> {
    /// Nothing (no desired value, or reported equals it).
    Empty,
    /// The whole desired value.
    Whole(&'a Value),
    /// Both are objects: the differing members (possibly none).
    Partial(&'a Map<String, Value>, &'a Map<String, Value>),
}

fn view<'a>(d: Option<&'a Value>, r: Option<&'a Value>) -> DeltaView<'a> {
    match (d, r) {
        (None, _) => DeltaView::Empty,
        (Some(Value::Object(dm)), Some(Value::Object(rm))) => DeltaView::Partial(dm, rm),
        (Some(d), Some(r)) if json_eq(d, r) => DeltaView::Empty,
        (Some(d), _) => DeltaView::Whole(d),
    }
}

fn view_is_empty(v: DeltaView<'_>) -> bool {
    match v {
        DeltaView::Empty => true,
        DeltaView::Whole(_) => false,
        DeltaView::Partial(dm, rm) => dm
            .iter()
            .all(|(k, d)| view_is_empty(view(Some(d), rm.get(k)))),
    }
}

fn view_member<'a>(v: DeltaView<'a>, key: &str) -> DeltaView<'a> {
    match v {
        DeltaView::Empty => DeltaView::Empty,
        DeltaView::Whole(Value::Object(m)) => m.get(key).map_or(DeltaView::Empty, DeltaView::Whole),
        DeltaView::Whole(_) => DeltaView::Empty,
        DeltaView::Partial(dm, rm) => view(dm.get(key), rm.get(key)),
    }
}

fn view_keys<'a>(v: DeltaView<'a>) -> Option<&'a Map<String, Value>> {
    match v {
        DeltaView::Whole(Value::Object(m)) | DeltaView::Partial(m, _) => Some(m),
        _ => None,
    }
}

/// Whether two views render the same delta (leaves compared with [`json_eq`]).
fn views_eq(a: DeltaView<'_>, b: DeltaView<'_>) -> bool {
    if let (DeltaView::Whole(x), DeltaView::Whole(y)) = (a, b) {
        return json_eq(x, y);
    }
    let (a_empty, b_empty) = (view_is_empty(a), view_is_empty(b));
    if a_empty || b_empty {
        return a_empty == b_empty;
    }
    // Both render something and at least one is Partial, so an object: the other must be too.
    let (Some(a_keys), Some(b_keys)) = (view_keys(a), view_keys(b)) else {
        return false;
    };
    a_keys
        .keys()
        .chain(b_keys.keys().filter(|k| !a_keys.contains_key(*k)))
        .all(|k| views_eq(view_member(a, k), view_member(b, k)))
}

fn render(v: DeltaView<'_>) -> Option<Value> {
    match v {
        DeltaView::Empty => None,
        DeltaView::Whole(d) => Some(d.clone()),
        DeltaView::Partial(dm, rm) => {
            let m = render_partial(dm, rm);
            (!m.is_empty()).then_some(Value::Object(m))
        }
    }
}

fn render_partial(dm: &Map<String, Value>, rm: &Map<String, Value>) -> Map<String, Value> {
    dm.iter()
        .filter_map(|(k, d)| Some((k.clone(), render(view(Some(d), rm.get(k)))?)))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const T0: u64 = 1_000;

    fn apply(doc: &mut TwinDocument, section: Section, patch: Value, now: u64) -> PatchOutcome {
        doc.apply_patch(section, &patch, now, &Limits::default())
            .unwrap()
    }

    fn try_apply(doc: &mut TwinDocument, section: Section, patch: Value) -> PatchError {
        doc.apply_patch(section, &patch, T0 + 99, &Limits::default())
            .unwrap_err()
    }

    fn twin(desired: Value, reported: Value) -> TwinDocument {
        let mut doc = TwinDocument::new(T0);
        apply(&mut doc, Section::Desired, desired, T0 + 1);
        apply(&mut doc, Section::Reported, reported, T0 + 2);
        doc
    }

    // ---- delta (AWS semantics) ----

    #[test]
    fn delta_nested_objects_only_differing_members() {
        let doc = twin(
            json!({"config": {"rate": 5, "mode": "eco", "net": {"ssid": "a", "ch": 6}}, "led": "on"}),
            json!({"config": {"rate": 1, "mode": "eco", "net": {"ssid": "a", "ch": 11}}, "led": "on"}),
        );
        assert_eq!(
            Value::Object(doc.delta()),
            json!({"config": {"rate": 5, "net": {"ch": 6}}})
        );
    }

    #[test]
    fn delta_desired_object_against_reported_leaf_is_whole() {
        let doc = twin(json!({"a": {"b": 1, "c": 2}}), json!({"a": 7}));
        assert_eq!(Value::Object(doc.delta()), json!({"a": {"b": 1, "c": 2}}));
        // And a desired leaf against a reported object.
        let doc = twin(json!({"a": 7}), json!({"a": {"b": 1}}));
        assert_eq!(Value::Object(doc.delta()), json!({"a": 7}));
        // An empty desired object is in the delta when reported lacks it, not when it has one.
        let doc = twin(json!({"a": {}}), json!({}));
        assert_eq!(Value::Object(doc.delta()), json!({"a": {}}));
        let doc = twin(json!({"a": {}}), json!({"a": {"x": 1}}));
        assert_eq!(Value::Object(doc.delta()), json!({}));
    }

    #[test]
    fn delta_arrays_replaced_and_compared_whole() {
        let mut doc = twin(json!({"list": [1, 2, 3]}), json!({"list": [1, 2]}));
        assert_eq!(Value::Object(doc.delta()), json!({"list": [1, 2, 3]}));
        // Reported replaces the array whole: equal now.
        let out = apply(
            &mut doc,
            Section::Reported,
            json!({"list": [1, 2, 3]}),
            T0 + 5,
        );
        assert!(out.delta_changed);
        assert_eq!(doc.reported()["list"], json!([1, 2, 3]));
        assert!(doc.delta().is_empty());
        // Arrays of objects are leaves too: no partial comparison inside.
        let out = apply(
            &mut doc,
            Section::Desired,
            json!({"list": [{"a": 1, "b": 2}]}),
            T0 + 6,
        );
        assert!(out.delta_changed);
        apply(
            &mut doc,
            Section::Reported,
            json!({"list": [{"a": 1}]}),
            T0 + 7,
        );
        assert_eq!(
            Value::Object(doc.delta()),
            json!({"list": [{"a": 1, "b": 2}]})
        );
        // Order matters in arrays.
        let doc = twin(json!({"l": [1, 2]}), json!({"l": [2, 1]}));
        assert_eq!(Value::Object(doc.delta()), json!({"l": [1, 2]}));
    }

    #[test]
    fn delta_keys_only_in_reported_never_appear() {
        let doc = twin(
            json!({"a": 1, "o": {"x": 1}}),
            json!({"a": 1, "extra": 5, "o": {"x": 1, "y": 2}, "p": {"q": 1}}),
        );
        assert!(doc.delta().is_empty());
    }

    #[test]
    fn delta_reported_deletion_reexposes_desired_key() {
        let mut doc = twin(
            json!({"a": 1, "o": {"x": 1}}),
            json!({"a": 1, "o": {"x": 1}}),
        );
        assert!(doc.delta().is_empty());
        let out = apply(&mut doc, Section::Reported, json!({"a": null}), T0 + 5);
        assert!(out.delta_changed);
        assert_eq!(Value::Object(doc.delta()), json!({"a": 1}));
        let out = apply(
            &mut doc,
            Section::Reported,
            json!({"o": {"x": null}}),
            T0 + 6,
        );
        assert!(out.delta_changed);
        assert_eq!(Value::Object(doc.delta()), json!({"a": 1, "o": {"x": 1}}));
        let out = apply(&mut doc, Section::Reported, json!({"o": null}), T0 + 7);
        assert!(!out.delta_changed, "o.x was already in the delta");
        assert_eq!(Value::Object(doc.delta()), json!({"a": 1, "o": {"x": 1}}));
    }

    #[test]
    fn delta_null_deletes() {
        let mut doc = twin(json!({"a": 1, "b": {"c": 2, "d": 3}}), json!({}));
        assert_eq!(
            Value::Object(doc.delta()),
            json!({"a": 1, "b": {"c": 2, "d": 3}})
        );
        let out = apply(
            &mut doc,
            Section::Desired,
            json!({"a": null, "b": {"c": null}}),
            T0 + 5,
        );
        assert!(out.delta_changed);
        assert_eq!(Value::Object(doc.desired().clone()), json!({"b": {"d": 3}}));
        assert_eq!(Value::Object(doc.delta()), json!({"b": {"d": 3}}));
        // Deleting something that is not there changes nothing in the delta.
        let out = apply(&mut doc, Section::Desired, json!({"zzz": null}), T0 + 6);
        assert!(!out.delta_changed);
    }

    #[test]
    fn delta_numbers_compare_by_value() {
        let doc = twin(
            json!({"a": 1, "b": [1, 2.5], "c": {"d": 0}}),
            json!({"a": 1.0, "b": [1.0, 2.5], "c": {"d": -0.0}}),
        );
        assert!(doc.delta().is_empty());
        let doc = twin(json!({"a": 1}), json!({"a": 1.5}));
        assert_eq!(Value::Object(doc.delta()), json!({"a": 1}));
        let doc = twin(json!({"big": u64::MAX}), json!({"big": u64::MAX - 1}));
        assert_eq!(Value::Object(doc.delta()), json!({"big": u64::MAX}));
        let doc = twin(json!({"s": "1"}), json!({"s": 1}));
        assert_eq!(Value::Object(doc.delta()), json!({"s": "1"}));
    }

    #[test]
    fn delta_changed_flags() {
        let mut doc = twin(json!({"a": 1}), json!({"a": 2}));
        // Reported to the same value: no change.
        assert!(!apply(&mut doc, Section::Reported, json!({"a": 2}), T0 + 3).delta_changed);
        // Reported a key desired does not have: no change.
        assert!(!apply(&mut doc, Section::Reported, json!({"x": {"y": 1}}), T0 + 4).delta_changed);
        // Desired 1 -> 1.0: the delta is the same value.
        assert!(!apply(&mut doc, Section::Desired, json!({"a": 1.0}), T0 + 5).delta_changed);
        // Tags never change the delta.
        assert!(!apply(&mut doc, Section::Tags, json!({"a": 5}), T0 + 6).delta_changed);
        // Desired leaf -> empty object while reported has an object: delta loses `a`.
        apply(&mut doc, Section::Reported, json!({"a": {"k": 1}}), T0 + 7);
        assert_eq!(Value::Object(doc.delta()), json!({"a": 1.0}));
        assert!(apply(&mut doc, Section::Desired, json!({"a": {}}), T0 + 8).delta_changed);
        assert!(doc.delta().is_empty());
        // Reported leaf replaced by an object matching a desired object.
        let mut doc = twin(json!({"a": {"b": 1}}), json!({"a": 3}));
        assert!(apply(&mut doc, Section::Reported, json!({"a": {"b": 1}}), T0 + 3).delta_changed);
        assert!(doc.delta().is_empty());
    }

    // ---- merge patch ----

    #[test]
    fn merge_patch_rfc7396_appendix_a() {
        // (original, patch, result) from RFC 7396 Appendix A. Rows whose original or patch is
        // not an object are run one level down, under the key "x" (a section is an object).
        let rows = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (
                json!({"x": ["a", "b"]}),
                json!({"x": ["c", "d"]}),
                json!({"x": ["c", "d"]}),
            ),
            (
                json!({"x": {"a": "b"}}),
                json!({"x": ["c"]}),
                json!({"x": ["c"]}),
            ),
            (json!({"x": {"a": "foo"}}), json!({"x": null}), json!({})),
            (
                json!({"x": {"a": "foo"}}),
                json!({"x": "bar"}),
                json!({"x": "bar"}),
            ),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!({"x": [1, 2]}),
                json!({"x": {"a": "b", "c": null}}),
                json!({"x": {"a": "b"}}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (original, patch, result) in rows {
            for section in Section::ALL {
                // Load the original as stored (it may hold a null, which no patch can write).
                let mut doc: TwinDocument =
                    serde_json::from_value(json!({ section.as_str(): original.clone() })).unwrap();
                apply(&mut doc, section, patch.clone(), T0);
                assert_eq!(
                    Value::Object(doc.section(section).clone()),
                    result,
                    "{original} + {patch} in {section}"
                );
            }
        }
        // The rows whose patch is not an object, at the top: refused, with a hint.
        for (patch, found) in [
            (json!(["c", "d"]), "an array"),
            (json!(null), "null"),
            (json!("bar"), "a string"),
            (json!(3), "a number"),
            (json!(true), "a boolean"),
        ] {
            let mut doc = twin(json!({"a": "b"}), json!({}));
            let before = doc.clone();
            let err = try_apply(&mut doc, Section::Desired, patch);
            assert_eq!(
                err,
                PatchError::NotAnObject {
                    section: Section::Desired,
                    found
                }
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "a desired patch must be a JSON object, not {found}: send {{\"key\": value}} to set keys and {{\"key\": null}} to delete them"
                )
            );
            assert_eq!(doc, before);
        }
    }

    #[test]
    fn all_or_nothing_on_error() {
        let mut doc = twin(json!({"a": 1, "o": {"p": 2}}), json!({"a": 0}));
        doc.reject("a", "busy", T0 + 3).unwrap();
        let before = doc.clone();
        // Valid changes first, then a bad key deep down.
        let err = try_apply(
            &mut doc,
            Section::Desired,
            json!({"a": null, "b": 2, "o": {"p": null, "q": {"$bad": 1}}}),
        );
        assert!(matches!(err, PatchError::InvalidKey { .. }), "{err}");
        assert_eq!(doc, before);
        // Too deep after valid changes.
        let err = try_apply(
            &mut doc,
            Section::Desired,
            json!({"a": 5, "o": {"d": {"d": {"d": {"d": {"d": {"d": {"d": {"d": {"d": {}}}}}}}}}}}),
        );
        assert!(matches!(err, PatchError::TooDeep { .. }), "{err}");
        assert_eq!(doc, before);
        // Too large after valid changes.
        let err = doc
            .apply_patch(
                Section::Reported,
                &json!({"a": null, "blob": "x".repeat(100)}),
                T0 + 9,
                &Limits {
                    max_section_bytes: 50,
                    ..Limits::default()
                },
            )
            .unwrap_err();
        assert!(matches!(err, PatchError::TooLarge { .. }), "{err}");
        assert_eq!(doc, before);
    }

    fn nested(keys: usize, leaf: Value) -> Value {
        (1..=keys)
            .rev()
            .fold(leaf, |inner, i| json!({ format!("k{i}"): inner }))
    }

    #[test]
    fn depth_limit() {
        // nested(n, 1) is the root and n - 1 objects: depth n.
        let mut doc = TwinDocument::new(T0);
        apply(&mut doc, Section::Desired, nested(10, json!(1)), T0 + 1);
        apply(&mut doc, Section::Desired, nested(9, json!({})), T0 + 1);
        // One more object: depth 11, refused, naming the key whose value is too deep.
        let before = doc.clone();
        let err = try_apply(&mut doc, Section::Desired, nested(10, json!({})));
        assert_eq!(
            err.to_string(),
            "desired.k1.k2.k3.k4.k5.k6.k7.k8.k9.k10: nesting depth 11 exceeds the limit of 10 (twins.max_depth)"
        );
        assert_eq!(
            err,
            PatchError::TooDeep {
                path: "desired.k1.k2.k3.k4.k5.k6.k7.k8.k9.k10".into(),
                depth: 11,
                limit: 10
            }
        );
        assert_eq!(doc, before);
        // The depth reported is the whole depth the update would create.
        let err = try_apply(&mut doc, Section::Reported, nested(13, json!(1)));
        assert_eq!(
            err.to_string(),
            "reported.k1.k2.k3.k4.k5.k6.k7.k8.k9.k10: nesting depth 13 exceeds the limit of 10 (twins.max_depth)"
        );
        // Arrays count as a level.
        apply(&mut doc, Section::Desired, nested(8, json!([[1]])), T0 + 2);
        let err = try_apply(&mut doc, Section::Desired, nested(9, json!([[1]])));
        assert_eq!(
            err.to_string(),
            "desired.k1.k2.k3.k4.k5.k6.k7.k8.k9: nesting depth 11 exceeds the limit of 10 (twins.max_depth)"
        );
        // Merging into an existing deep object counts from where it is.
        apply(&mut doc, Section::Tags, nested(9, json!({})), T0 + 3);
        let err = try_apply(
            &mut doc,
            Section::Tags,
            nested(9, json!({"deeper": {"x": 1}})),
        );
        assert_eq!(
            err.to_string(),
            "tags.k1.k2.k3.k4.k5.k6.k7.k8.k9.deeper: nesting depth 11 exceeds the limit of 10 (twins.max_depth)"
        );
        apply(
            &mut doc,
            Section::Tags,
            nested(9, json!({"shallow": 1})),
            T0 + 4,
        );
        // Other limits.
        let two = Limits {
            max_depth: 2,
            ..Limits::default()
        };
        let mut doc = TwinDocument::new(T0);
        doc.apply_patch(Section::Tags, &json!({"a": {}}), T0, &two)
            .unwrap();
        let err = doc
            .apply_patch(Section::Tags, &json!({"a": {"b": {}}}), T0, &two)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "tags.a.b: nesting depth 3 exceeds the limit of 2 (twins.max_depth)"
        );
        // Scalars at the deepest level are fine.
        doc.apply_patch(Section::Tags, &json!({"a": {"b": 1}}), T0, &two)
            .unwrap();
    }

    #[test]
    fn size_limit() {
        let mut doc = TwinDocument::new(T0);
        let before = doc.clone();
        let err = try_apply(
            &mut doc,
            Section::Reported,
            json!({"blob": "x".repeat(40_000)}),
        );
        // {"blob":"xxx…"} = 9 + 40000 + 2 bytes.
        assert_eq!(
            err.to_string(),
            "reported would be 40011 bytes after this update; the limit is 32768 bytes (twins.max_section_bytes)"
        );
        assert_eq!(
            err,
            PatchError::TooLarge {
                section: Section::Reported,
                size: 40_011,
                limit: 32_768
            }
        );
        assert_eq!(doc, before);
        // Exactly at the limit is accepted and the size is reported.
        let exact = json!({"blob": "x".repeat(32_768 - 11)});
        assert_eq!(serde_json::to_string(&exact).unwrap().len(), 32_768);
        let out = apply(&mut doc, Section::Reported, exact, T0 + 1);
        assert_eq!(out.section_bytes, 32_768);
        // One byte more is not; making room in the same patch is fine.
        let err = try_apply(&mut doc, Section::Reported, json!({"y": 1}));
        assert_eq!(
            err.to_string(),
            "reported would be 32774 bytes after this update; the limit is 32768 bytes (twins.max_section_bytes)"
        );
        let out = apply(
            &mut doc,
            Section::Reported,
            json!({"blob": null, "y": 1}),
            T0 + 2,
        );
        assert_eq!(out.section_bytes, 7);
        // The limit is per section.
        apply(
            &mut doc,
            Section::Desired,
            json!({"blob": "x".repeat(30_000)}),
            T0 + 3,
        );
        apply(
            &mut doc,
            Section::Tags,
            json!({"blob": "x".repeat(30_000)}),
            T0 + 4,
        );
    }

    #[test]
    fn key_validation() {
        let cases = [
            (
                json!({"": 1}),
                "desired.: invalid key: keys must not be empty",
            ),
            (
                json!({"config": {"$rate": 1}}),
                "desired.config.$rate: invalid key: keys must not start with '$' (reserved for metadata)",
            ),
            (
                json!({"config": {"rate.max": 1}}),
                "desired.config.rate.max: invalid key: keys must not contain '.' (paths are dotted)",
            ),
            (
                json!({"a\u{1}b": 1}),
                "desired.a\\u{1}b: invalid key: keys must not contain control characters",
            ),
            (
                json!({"a\u{85}": 1}),
                "desired.a\\u{85}: invalid key: keys must not contain control characters",
            ),
            (
                json!({ "k".repeat(129): 1 }),
                &*format!(
                    "desired.{}: invalid key: the key is 129 bytes; keys are at most 128 bytes",
                    "k".repeat(129)
                )
                .leak(),
            ),
            (
                json!({"list": [1, {"ok": [{"$x": 1}]}]}),
                "desired.list[1].ok[0].$x: invalid key: keys must not start with '$' (reserved for metadata)",
            ),
            (
                json!({"gone": {"$x": null}}),
                "desired.gone.$x: invalid key: keys must not start with '$' (reserved for metadata)",
            ),
        ];
        for (patch, message) in cases {
            let mut doc = TwinDocument::new(T0);
            let err = try_apply(&mut doc, Section::Desired, patch);
            assert!(matches!(err, PatchError::InvalidKey { .. }));
            assert_eq!(err.to_string(), message);
            assert_eq!(doc, TwinDocument::new(T0));
        }
        // Accepted: 128 bytes, unicode, spaces, '$' not first, '-' and '_'.
        let mut doc = TwinDocument::new(T0);
        apply(
            &mut doc,
            Section::Desired,
            json!({ "k".repeat(128): 1, "température": 2, "a b": 3, "a$": 4, "x-y_z": 5 }),
            T0,
        );
        assert_eq!(doc.desired().len(), 5);
    }

    #[test]
    fn metadata_timestamps_at_every_level() {
        let mut doc = TwinDocument::new(T0);
        for s in Section::ALL {
            assert_eq!(doc.metadata(s), &MetaNode::new(T0));
        }
        apply(
            &mut doc,
            Section::Desired,
            json!({"a": {"b": {"c": 1, "d": 2}, "e": [1, {"f": 2}]}, "g": 3}),
            2_000,
        );
        let m = doc.metadata(Section::Desired);
        for path in ["", "a", "a.b", "a.b.c", "a.b.d", "a.e", "g"] {
            assert_eq!(m.at_path(path).unwrap().updated, 2_000, "{path}");
        }
        assert!(
            m.at_path("a.e").unwrap().children.is_empty(),
            "arrays are leaves"
        );
        assert_eq!(m.at_path("a.b.c").unwrap().children.len(), 0);

        // A nested patch touches the key, its ancestors and the root, nothing else.
        apply(
            &mut doc,
            Section::Desired,
            json!({"a": {"b": {"c": 10}}}),
            3_000,
        );
        let m = doc.metadata(Section::Desired);
        for (path, t) in [
            ("", 3_000),
            ("a", 3_000),
            ("a.b", 3_000),
            ("a.b.c", 3_000),
            ("a.b.d", 2_000),
            ("a.e", 2_000),
            ("g", 2_000),
        ] {
            assert_eq!(m.at_path(path).unwrap().updated, t, "{path}");
        }
        // An empty object in a patch still touches the key.
        apply(&mut doc, Section::Desired, json!({"a": {"e": {}}}), 3_500);
        let m = doc.metadata(Section::Desired);
        assert_eq!(m.at_path("a.e").unwrap().updated, 3_500);
        assert_eq!(m.at_path("a.b").unwrap().updated, 3_000);

        // Deletions drop metadata (whole subtrees too) and touch the ancestors.
        apply(
            &mut doc,
            Section::Desired,
            json!({"a": {"b": {"d": null}}, "g": null}),
            4_000,
        );
        let m = doc.metadata(Section::Desired);
        assert!(m.at_path("a.b.d").is_none());
        assert!(m.at_path("g").is_none());
        assert_eq!(m.at_path("a.b").unwrap().updated, 4_000);
        assert_eq!(m.at_path("a.b.c").unwrap().updated, 3_000);
        apply(&mut doc, Section::Desired, json!({"a": {"b": null}}), 5_000);
        let m = doc.metadata(Section::Desired);
        assert!(m.at_path("a.b").is_none());
        assert_eq!(m.at_path("a").unwrap().updated, 5_000);

        // An object replaced by a leaf loses its children; a leaf replaced by an object gains
        // only the new ones.
        apply(&mut doc, Section::Desired, json!({"a": 1}), 6_000);
        assert!(
            doc.metadata(Section::Desired)
                .at_path("a")
                .unwrap()
                .children
                .is_empty()
        );
        apply(
            &mut doc,
            Section::Desired,
            json!({"a": {"x": {"y": null}}}),
            7_000,
        );
        let m = doc.metadata(Section::Desired);
        assert_eq!(m.at_path("a.x").unwrap(), &MetaNode::new(7_000));
        assert_eq!(m.at_path("a").unwrap().children.len(), 1);
        assert_eq!(
            Value::Object(doc.desired().clone()),
            json!({"a": {"x": {}}})
        );

        // Other sections are untouched; the views render `$lastUpdated`.
        assert_eq!(doc.metadata(Section::Reported), &MetaNode::new(T0));
        assert_eq!(
            doc.operator_view("d1", "")["metadata"]["desired"],
            json!({"$lastUpdated": 7_000, "a": {"$lastUpdated": 7_000, "x": {"$lastUpdated": 7_000}}})
        );
    }

    #[test]
    fn versions() {
        let mut doc = TwinDocument::new(T0);
        assert_eq!(doc.version(), 0);
        assert_eq!(doc.etag(), "\"0\"");
        let out = apply(&mut doc, Section::Desired, json!({"a": 1}), 2_000);
        assert_eq!((out.version, out.section_version), (1, 1));
        let out = apply(&mut doc, Section::Reported, json!({"a": 1}), 2_001);
        assert_eq!((out.version, out.section_version), (2, 1));
        let out = apply(&mut doc, Section::Tags, json!({"site": "x"}), 2_002);
        assert_eq!((out.version, out.section_version), (3, 1));
        // A patch that changes nothing is still accepted and bumps.
        let out = apply(&mut doc, Section::Desired, json!({"a": 1}), 2_003);
        assert_eq!((out.version, out.section_version), (4, 2));
        let out = apply(&mut doc, Section::Reported, json!({}), 2_004);
        assert_eq!((out.version, out.section_version), (5, 2));
        // Errors do not.
        try_apply(&mut doc, Section::Desired, json!({"$": 1}));
        assert_eq!(doc.version(), 5);
        assert_eq!(doc.section_version(Section::Desired), 2);
        assert_eq!(doc.section_version(Section::Reported), 2);
        assert_eq!(doc.section_version(Section::Tags), 1);
        assert_eq!(doc.etag(), "\"5\"");
        assert_eq!((doc.created_at(), doc.updated_at()), (T0, 2_004));
        // A reject bumps the document version only.
        apply(&mut doc, Section::Desired, json!({"a": 2}), 2_005);
        assert!(doc.reject("a", "no", 2_006).unwrap());
        assert_eq!(doc.version(), 7);
        assert_eq!(doc.section_version(Section::Desired), 3);
        assert_eq!(doc.updated_at(), 2_006);
        assert!(!doc.reject("a", "no", 2_007).unwrap());
        assert_eq!((doc.version(), doc.updated_at()), (7, 2_006));
    }

    // ---- acknowledgements ----

    #[test]
    fn ack_pending_then_applied_by_report() {
        let mut doc = TwinDocument::new(T0);
        let out = apply(
            &mut doc,
            Section::Desired,
            json!({"config": {"rate": 5, "mode": "eco"}}),
            2_000,
        );
        assert_eq!(out.acks_changed, ["config.mode", "config.rate"]);
        assert_eq!(
            doc.ack("config.rate"),
            Some(&KeyAck {
                status: AckStatus::Pending,
                desired_version: 1,
                reason: None,
                at: 2_000
            })
        );
        // The device reports one of them (as 5.0: equal by value).
        let out = apply(
            &mut doc,
            Section::Reported,
            json!({"config": {"rate": 5.0}}),
            3_000,
        );
        assert_eq!(out.acks_changed, ["config.rate"]);
        assert_eq!(
            doc.ack("config.rate"),
            Some(&KeyAck {
                status: AckStatus::Applied,
                desired_version: 1,
                reason: None,
                at: 3_000
            })
        );
        assert_eq!(doc.ack("config.mode").unwrap().status, AckStatus::Pending);
        // Reporting something else afterwards leaves it applied (to that desired version).
        let out = apply(
            &mut doc,
            Section::Reported,
            json!({"config": {"rate": 7}}),
            4_000,
        );
        assert!(out.acks_changed.is_empty());
        assert_eq!(doc.ack("config.rate").unwrap().status, AckStatus::Applied);
        // A reported object replacing a leaf applies the leaves inside it.
        apply(&mut doc, Section::Reported, json!({"config": 0}), 4_500);
        let out = apply(
            &mut doc,
            Section::Reported,
            json!({"config": {"mode": "eco"}}),
            5_000,
        );
        assert_eq!(out.acks_changed, ["config.mode"]);
        assert_eq!(doc.ack("config.mode").unwrap().status, AckStatus::Applied);
        // Tags never touch acknowledgements.
        let out = apply(
            &mut doc,
            Section::Tags,
            json!({"config": {"rate": 5}}),
            6_000,
        );
        assert!(out.acks_changed.is_empty() && out.acks_removed.is_empty());
    }

    #[test]
    fn ack_reject_then_applied_when_reported_matches() {
        let mut doc = twin(json!({"rate": 100}), json!({"rate": 10}));
        assert_eq!(doc.ack("rate").unwrap().status, AckStatus::Pending);
        assert!(doc.reject("rate", "out of range (max 50)", 3_000).unwrap());
        assert_eq!(
            doc.ack("rate"),
            Some(&KeyAck {
                status: AckStatus::Rejected,
                desired_version: 1,
                reason: Some("out of range (max 50)".into()),
                at: 3_000
            })
        );
        // Another reason is a change; the same one is not.
        assert!(doc.reject("rate", "still no", 3_100).unwrap());
        assert!(!doc.reject("rate", "still no", 3_200).unwrap());
        assert_eq!(doc.ack("rate").unwrap().at, 3_100);
        // Reporting another value keeps it rejected; reporting the desired one applies it.
        let out = apply(&mut doc, Section::Reported, json!({"rate": 20}), 3_500);
        assert!(out.acks_changed.is_empty());
        let out = apply(&mut doc, Section::Reported, json!({"rate": 100}), 4_000);
        assert_eq!(out.acks_changed, ["rate"]);
        assert_eq!(
            doc.ack("rate"),
            Some(&KeyAck {
                status: AckStatus::Applied,
                desired_version: 1,
                reason: None,
                at: 4_000
            })
        );
        // Now reject is refused: the device reports the desired value.
        let err = doc.reject("rate", "x", 4_100).unwrap_err();
        assert_eq!(
            err.to_string(),
            "desired.rate is already applied (reported holds the desired value): report a different value before rejecting it"
        );
        // Once reported differs again, an applied key can be rejected.
        apply(&mut doc, Section::Reported, json!({"rate": 1}), 4_200);
        assert!(doc.reject("rate", "reverted", 4_300).unwrap());
        assert_eq!(doc.ack("rate").unwrap().status, AckStatus::Rejected);
    }

    #[test]
    fn ack_desired_changed_again_is_pending_with_new_version() {
        let mut doc = twin(json!({"rate": 100}), json!({}));
        doc.reject("rate", "no", 2_500).unwrap();
        let out = apply(&mut doc, Section::Desired, json!({"rate": 40}), 3_000);
        assert_eq!(out.acks_changed, ["rate"]);
        assert_eq!(
            doc.ack("rate"),
            Some(&KeyAck {
                status: AckStatus::Pending,
                desired_version: 2,
                reason: None,
                at: 3_000
            })
        );
        // Writing the same value again re-requests it (retry of a rejected key).
        doc.reject("rate", "no", 3_100).unwrap();
        apply(&mut doc, Section::Desired, json!({"rate": 40}), 3_200);
        assert_eq!(doc.ack("rate").unwrap().status, AckStatus::Pending);
        assert_eq!(doc.ack("rate").unwrap().desired_version, 3);
    }

    #[test]
    fn ack_desired_deleted_or_reshaped_drops_acks() {
        let mut doc = twin(
            json!({"a": 1, "o": {"p": 1, "q": {"r": 2}}, "o-x": 1, "o0": 1, "l": 1}),
            json!({}),
        );
        assert_eq!(
            doc.acks().keys().collect::<Vec<_>>(),
            ["a", "l", "o-x", "o.p", "o.q.r", "o0"]
        );
        // Deleting a leaf drops its ack.
        let out = apply(&mut doc, Section::Desired, json!({"a": null}), 3_000);
        assert_eq!(out.acks_removed, ["a"]);
        assert!(doc.ack("a").is_none());
        // An object replaced by a leaf drops everything below it (not its look-alike siblings).
        let out = apply(&mut doc, Section::Desired, json!({"o": 5}), 3_100);
        assert_eq!(out.acks_removed, ["o.p", "o.q.r"]);
        assert_eq!(out.acks_changed, ["o"]);
        assert_eq!(
            doc.acks().keys().collect::<Vec<_>>(),
            ["l", "o", "o-x", "o0"]
        );
        // A leaf replaced by an object drops the leaf's ack.
        let out = apply(
            &mut doc,
            Section::Desired,
            json!({"o": {"n": {"m": true}}}),
            3_200,
        );
        assert_eq!(out.acks_removed, ["o"]);
        assert_eq!(out.acks_changed, ["o.n.m"]);
        // Deleting an object drops everything below it.
        let out = apply(&mut doc, Section::Desired, json!({"o": null}), 3_300);
        assert_eq!(out.acks_removed, ["o.n.m"]);
        // Deleting something absent removes nothing.
        let out = apply(&mut doc, Section::Desired, json!({"nope": null}), 3_400);
        assert!(out.acks_removed.is_empty() && out.acks_changed.is_empty());
        assert_eq!(doc.acks().keys().collect::<Vec<_>>(), ["l", "o-x", "o0"]);
        // Reported deletions do not touch acks.
        let out = apply(&mut doc, Section::Reported, json!({"l": null}), 3_500);
        assert!(out.acks_removed.is_empty());
        assert_eq!(doc.acks().len(), 3);
    }

    #[test]
    fn ack_desired_equal_to_reported_is_applied_at_once() {
        let mut doc = twin(
            json!({}),
            json!({"fw": "1.2", "cfg": {"a": [1, 2]}, "n": 3.0}),
        );
        let out = apply(
            &mut doc,
            Section::Desired,
            json!({"fw": "1.2", "cfg": {"a": [1, 2], "b": 1}, "n": 3}),
            3_000,
        );
        assert_eq!(out.acks_changed, ["cfg.a", "cfg.b", "fw", "n"]);
        for path in ["fw", "cfg.a", "n"] {
            assert_eq!(
                doc.ack(path),
                Some(&KeyAck {
                    status: AckStatus::Applied,
                    desired_version: 2,
                    reason: None,
                    at: 3_000
                }),
                "{path}"
            );
        }
        assert_eq!(doc.ack("cfg.b").unwrap().status, AckStatus::Pending);
        assert_eq!(Value::Object(doc.delta()), json!({"cfg": {"b": 1}}));
    }

    #[test]
    fn reject_errors_and_reason_truncation() {
        let mut doc = twin(json!({"o": {"p": 1}}), json!({}));
        for path in ["", "o", "missing", "o.p.q", "o.x"] {
            let err = doc.reject(path, "r", 3_000).unwrap_err();
            assert_eq!(err, PatchError::NotADesiredLeaf { path: path.into() });
        }
        assert_eq!(
            doc.reject("o", "r", 3_000).unwrap_err().to_string(),
            "desired.o is not a desired value (it does not exist or is an object): reject names a leaf of desired, e.g. `config.rate`"
        );
        // 255 ASCII bytes then a 2-byte character: cut before it.
        let reason = format!("{}é and more", "x".repeat(255));
        assert!(doc.reject("o.p", &reason, 3_000).unwrap());
        assert_eq!(
            doc.ack("o.p").unwrap().reason.as_deref(),
            Some(&*"x".repeat(255))
        );
        let reason = "é".repeat(200);
        doc.reject("o.p", &reason, 3_000).unwrap();
        assert_eq!(
            doc.ack("o.p").unwrap().reason.as_deref(),
            Some(&*"é".repeat(128))
        );
    }

    // ---- views and storage ----

    #[test]
    fn views() {
        let mut doc = twin(
            json!({"rate": 5, "o": {"a": 1}}),
            json!({"rate": 1, "o": {"a": 1}}),
        );
        apply(&mut doc, Section::Tags, json!({"site": "berlin"}), 3_000);
        doc.reject("rate", "too fast", 3_500).unwrap();
        assert_eq!(doc.etag(), "\"4\"");
        let op = doc.operator_view("dev-1", "main");
        assert_eq!(
            op,
            json!({
                "deviceId": "dev-1",
                "name": "main",
                "version": 4,
                "etag": "\"4\"",
                "desired": {"rate": 5, "o": {"a": 1}},
                "reported": {"rate": 1, "o": {"a": 1}},
                "tags": {"site": "berlin"},
                "delta": {"rate": 5},
                "acks": {
                    "o.a": {"status": "applied", "desiredVersion": 1, "at": T0 + 2},
                    "rate": {"status": "rejected", "desiredVersion": 1, "reason": "too fast", "at": 3_500}
                },
                "versions": {"desired": 1, "reported": 1, "tags": 1},
                "metadata": {
                    "desired": {"$lastUpdated": T0 + 1, "rate": {"$lastUpdated": T0 + 1}, "o": {"$lastUpdated": T0 + 1, "a": {"$lastUpdated": T0 + 1}}},
                    "reported": {"$lastUpdated": T0 + 2, "rate": {"$lastUpdated": T0 + 2}, "o": {"$lastUpdated": T0 + 2, "a": {"$lastUpdated": T0 + 2}}},
                    "tags": {"$lastUpdated": 3_000, "site": {"$lastUpdated": 3_000}}
                },
                "createdAt": T0,
                "updatedAt": 3_500
            })
        );
        let dev = doc.device_view();
        assert_eq!(
            dev,
            json!({
                "version": 4,
                "desired": op["desired"],
                "reported": op["reported"],
                "delta": {"rate": 5},
                "acks": op["acks"],
                "versions": {"desired": 1, "reported": 1},
                "metadata": {"desired": op["metadata"]["desired"], "reported": op["metadata"]["reported"]},
                "updatedAt": 3_500
            })
        );
        assert!(
            !dev.to_string().contains("berlin"),
            "tags are invisible to devices"
        );
        assert!(dev.get("tags").is_none());
    }

    #[test]
    fn serde_round_trip() {
        let mut doc = twin(
            json!({"rate": 5, "o": {"a": [1, {"b": 2}]}}),
            json!({"rate": 1.5}),
        );
        apply(&mut doc, Section::Tags, json!({"site": "x"}), 3_000);
        doc.reject("rate", "no", 3_100).unwrap();
        let stored = serde_json::to_string(&doc).unwrap();
        let back: TwinDocument = serde_json::from_str(&stored).unwrap();
        assert_eq!(back, doc);
        assert_eq!(serde_json::to_string(&back).unwrap(), stored);
        // The stable, compact form.
        let v: Value = serde_json::from_str(&stored).unwrap();
        assert_eq!(v["version"], 4);
        assert_eq!(v["desiredVersion"], 1);
        assert_eq!(
            v["meta"]["tags"],
            json!({"t": 3_000, "c": {"site": {"t": 3_000}}})
        );
        assert_eq!(
            v["acks"]["rate"],
            json!({"s": "rejected", "v": 1, "r": "no", "t": 3_100})
        );
        assert_eq!(
            v["acks"]["o.a"],
            json!({"s": "pending", "v": 1, "t": T0 + 1})
        );
        // Missing fields default, unknown ones are ignored.
        let old: TwinDocument =
            serde_json::from_str(r#"{"version": 3, "desired": {"a": 1}, "future": true}"#).unwrap();
        assert_eq!(old.version(), 3);
        assert_eq!(old.desired()["a"], 1);
        assert!(old.acks().is_empty());
        assert_eq!(
            serde_json::from_str::<TwinDocument>("{}").unwrap(),
            TwinDocument::default()
        );
    }

    #[test]
    fn section_names() {
        for s in Section::ALL {
            assert_eq!(Section::parse(s.as_str()), Some(s));
            assert_eq!(s.to_string(), s.as_str());
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        }
        assert_eq!(Section::parse("Desired"), None);
        assert_eq!(
            Limits::default(),
            Limits {
                max_section_bytes: 32_768,
                max_depth: 10
            }
        );
    }

    // ---- properties ----

    /// Reference RFC 7396 merge.
    fn reference_merge(target: &Value, patch: &Value) -> Value {
        let Value::Object(pm) = patch else {
            return patch.clone();
        };
        let mut t = target.as_object().cloned().unwrap_or_default();
        for (k, v) in pm {
            if v.is_null() {
                t.remove(k);
            } else {
                let merged = reference_merge(t.get(k).unwrap_or(&Value::Null), v);
                t.insert(k.clone(), merged);
            }
        }
        Value::Object(t)
    }

    /// Every delta leaf exists in desired and differs from reported.
    fn check_delta(
        delta: &Map<String, Value>,
        desired: &Map<String, Value>,
        reported: Option<&Map<String, Value>>,
        path: &str,
    ) {
        for (k, dv) in delta {
            let p = format!("{path}.{k}");
            let d = desired
                .get(k)
                .unwrap_or_else(|| panic!("{p} in delta, not in desired"));
            let r = reported.and_then(|m| m.get(k));
            match (dv, d, r) {
                (Value::Object(dm), Value::Object(dd), Some(Value::Object(rr))) => {
                    assert!(!dm.is_empty(), "{p}: empty partial delta");
                    check_delta(dm, dd, Some(rr), &p);
                }
                _ => {
                    assert!(json_eq(dv, d), "{p}: delta {dv} is not desired {d}");
                    assert!(
                        !r.is_some_and(|r| json_eq(d, r)),
                        "{p}: desired equals reported"
                    );
                }
            }
        }
    }

    fn leaf_paths(m: &Map<String, Value>, prefix: &str, out: &mut Vec<String>) {
        for (k, v) in m {
            let p = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Object(o) => leaf_paths(o, &p, out),
                _ => out.push(p),
            }
        }
    }

    /// The metadata tree has exactly the section's object keys.
    fn check_meta(m: &Map<String, Value>, meta: &MetaNode) {
        assert_eq!(
            m.keys().collect::<Vec<_>>(),
            meta.children.keys().collect::<Vec<_>>()
        );
        for (k, v) in m {
            let child = &meta.children[k];
            assert!(child.updated <= meta.updated);
            match v {
                Value::Object(o) => check_meta(o, child),
                _ => assert!(child.children.is_empty()),
            }
        }
    }

    fn value_strategy(with_nulls: bool) -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            (0i64..3).prop_map(Value::from),
            Just(json!(1.0)),
            Just(json!("s")),
            Just(json!("é\n\"\\")),
            Just(json!(-1.5e300)),
            Just(json!([1, 2])),
            Just(json!([1.0, 2])),
            if with_nulls {
                Just(Value::Null)
            } else {
                Just(json!(false))
            },
        ];
        leaf.prop_recursive(3, 24, 3, |inner| {
            prop::collection::btree_map(
                prop::sample::select(vec!["a", "b", "c", "q\"\\é"]),
                inner,
                0..3,
            )
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
        })
    }

    fn object_strategy(with_nulls: bool) -> impl Strategy<Value = Value> {
        prop::collection::btree_map(
            prop::sample::select(vec!["a", "b", "c", "q\"\\é"]),
            value_strategy(with_nulls),
            0..3,
        )
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
    }

    fn section_strategy() -> impl Strategy<Value = Section> {
        prop_oneof![
            Just(Section::Desired),
            Just(Section::Reported),
            Just(Section::Tags)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn patches_keep_the_document_consistent(
            desired in object_strategy(false),
            reported in object_strategy(false),
            patches in prop::collection::vec((section_strategy(), object_strategy(true)), 1..6),
        ) {
            let mut doc = twin(desired, reported);
            for (i, (section, patch)) in patches.into_iter().enumerate() {
                let now = 10_000 + i as u64;
                if i == 2 {
                    // As if loaded from storage: sizes are measured again.
                    doc = serde_json::from_str(&serde_json::to_string(&doc).unwrap()).unwrap();
                }
                let delta_before = Value::Object(doc.delta());
                let expected = reference_merge(&Value::Object(doc.section(section).clone()), &patch);
                let out = apply(&mut doc, section, patch, now);
                // The merge is RFC 7396.
                prop_assert_eq!(&Value::Object(doc.section(section).clone()), &expected);
                // The size is exact.
                prop_assert_eq!(out.section_bytes, serde_json::to_string(doc.section(section)).unwrap().len());
                // delta_changed tells the truth.
                let delta = doc.delta();
                prop_assert_eq!(out.delta_changed, !json_eq(&delta_before, &Value::Object(delta.clone())));
                // Every delta path exists in desired and differs from reported.
                check_delta(&delta, doc.desired(), Some(doc.reported()), "");
                // Acks cover exactly the desired leaves; unapplied ones differ from reported.
                let mut leaves = Vec::new();
                leaf_paths(doc.desired(), "", &mut leaves);
                leaves.sort();
                prop_assert_eq!(doc.acks().keys().cloned().collect::<Vec<_>>(), leaves);
                for (path, ack) in doc.acks() {
                    let d = lookup(doc.desired(), path).unwrap();
                    let r = lookup(doc.reported(), path);
                    if ack.status != AckStatus::Applied {
                        prop_assert!(!r.is_some_and(|r| json_eq(d, r)), "{} {:?}", path, ack);
                    }
                }
                // Metadata mirrors every section.
                for s in Section::ALL {
                    check_meta(doc.section(s), doc.metadata(s));
                }
                prop_assert_eq!(doc.metadata(section).updated, now);
            }
        }
    }
}
