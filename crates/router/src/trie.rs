//! The subscription trie: one node per topic level, wildcards as dedicated edges.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ferrohub_types::{Message, QoS, TopicFilter};
use hashbrown::HashMap;
use indexmap::IndexMap;
use smallvec::{SmallVec, smallvec};

use crate::{Match, ShareKey, Subscriber, SubscriberId};

/// A subscription request as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The filter matched against topics (without any `$share/` prefix).
    pub filter: TopicFilter,
    /// Share group, for `$share/{group}/{filter}`.
    pub share_group: Option<Arc<str>>,
    /// Maximum QoS granted.
    pub qos: QoS,
    /// Do not deliver the subscriber's own publications.
    pub no_local: bool,
    /// Keep the publisher's retain flag on delivery.
    pub retain_as_published: bool,
    /// Subscription identifier to attach to deliveries.
    pub subscription_id: Option<u32>,
}

/// Whether a subscribe created a subscription or replaced an existing one (MQTT 5 Retain Handling 1
/// sends retained messages only for new subscriptions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeOutcome {
    /// No subscription to this filter existed for the subscriber.
    New,
    /// An existing subscription was replaced.
    Replaced,
}

struct Entry<S: ?Sized> {
    subscriber: Arc<S>,
    qos: QoS,
    no_local: bool,
    retain_as_published: bool,
    subscription_id: Option<u32>,
}

impl<S: ?Sized> Entry<S> {
    fn to_match(&self, message: &Message, share: Option<ShareKey>) -> Match<S> {
        Match {
            subscriber: self.subscriber.clone(),
            qos: self.qos.min(message.qos),
            retain: self.retain_as_published && message.retain,
            subscription_ids: match self.subscription_id {
                Some(id) => smallvec![id],
                None => SmallVec::new(),
            },
            share,
        }
    }
}

struct Group<S: ?Sized> {
    key: ShareKey,
    members: IndexMap<SubscriberId, Entry<S>>,
    /// Round-robin cursor; atomic because routing holds only a read lock.
    cursor: AtomicUsize,
}

impl<S: Subscriber + ?Sized> Group<S> {
    /// Round-robin over available members; falls back to any member (whose session then queues
    /// the message) when none is available.
    fn pick(&self, exclude: Option<SubscriberId>) -> Option<&Entry<S>> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for i in 0..n {
            let (id, entry) = self.members.get_index((start + i) % n)?;
            if Some(*id) == exclude {
                continue;
            }
            if entry.subscriber.is_available() {
                return Some(entry);
            }
            fallback.get_or_insert(entry);
        }
        fallback
    }
}

struct Subs<S: ?Sized> {
    /// Filters ending exactly at this node.
    exact: IndexMap<SubscriberId, Entry<S>>,
    /// Filters ending in `/#` below this node (or `#` at the root).
    multi: IndexMap<SubscriberId, Entry<S>>,
    exact_groups: HashMap<Arc<str>, Group<S>>,
    multi_groups: HashMap<Arc<str>, Group<S>>,
}

impl<S: ?Sized> Subs<S> {
    fn new() -> Self {
        Subs {
            exact: IndexMap::new(),
            multi: IndexMap::new(),
            exact_groups: HashMap::new(),
            multi_groups: HashMap::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.exact.is_empty()
            && self.multi.is_empty()
            && self.exact_groups.is_empty()
            && self.multi_groups.is_empty()
    }
}

struct Node<S: ?Sized> {
    children: HashMap<Box<str>, Node<S>>,
    plus: Option<Box<Node<S>>>,
    /// Boxed because most nodes are interior and carry no subscription.
    subs: Option<Box<Subs<S>>>,
}

impl<S: ?Sized> Node<S> {
    fn new() -> Self {
        Node {
            children: HashMap::new(),
            plus: None,
            subs: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plus.is_none() && self.subs.is_none()
    }
}

/// Subscriptions of one tenant.
pub struct SubscriptionTrie<S: ?Sized> {
    root: Node<S>,
    len: usize,
}

impl<S: Subscriber + ?Sized> Default for SubscriptionTrie<S> {
    fn default() -> Self {
        Self::new()
    }
}

/// Splits a filter into the levels leading to its node and whether it ends in `#`.
fn filter_path(filter: &str) -> (SmallVec<[&str; 8]>, bool) {
    let mut levels: SmallVec<[&str; 8]> = filter.split('/').collect();
    let multi = levels.last() == Some(&"#");
    if multi {
        levels.pop();
    }
    (levels, multi)
}

impl<S: Subscriber + ?Sized> SubscriptionTrie<S> {
    /// An empty trie.
    pub fn new() -> Self {
        SubscriptionTrie {
            root: Node::new(),
            len: 0,
        }
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no subscriptions.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces a subscription.
    pub fn insert(&mut self, subscriber: &Arc<S>, sub: Subscription) -> SubscribeOutcome {
        let (levels, multi) = filter_path(sub.filter.as_str());
        let mut node = &mut self.root;
        for level in levels {
            node = if level == "+" {
                node.plus.get_or_insert_with(|| Box::new(Node::new()))
            } else {
                node.children
                    .entry(Box::from(level))
                    .or_insert_with(Node::new)
            };
        }
        let subs = node.subs.get_or_insert_with(|| Box::new(Subs::new()));
        let entry = Entry {
            subscriber: subscriber.clone(),
            qos: sub.qos,
            no_local: sub.no_local,
            retain_as_published: sub.retain_as_published,
            subscription_id: sub.subscription_id,
        };
        let map = match (&sub.share_group, multi) {
            (None, false) => &mut subs.exact,
            (None, true) => &mut subs.multi,
            (Some(group), m) => {
                let groups = if m {
                    &mut subs.multi_groups
                } else {
                    &mut subs.exact_groups
                };
                &mut groups
                    .entry(group.clone())
                    .or_insert_with(|| Group {
                        key: ShareKey {
                            group: group.clone(),
                            filter: Arc::from(sub.filter.as_str()),
                        },
                        members: IndexMap::new(),
                        cursor: AtomicUsize::new(0),
                    })
                    .members
            }
        };
        match map.insert(subscriber.id(), entry) {
            Some(_) => SubscribeOutcome::Replaced,
            None => {
                self.len += 1;
                SubscribeOutcome::New
            }
        }
    }

    /// Removes a subscription and prunes nodes left empty. Returns whether it existed.
    pub fn remove(&mut self, subscriber: SubscriberId, filter: &str, group: Option<&str>) -> bool {
        let (levels, multi) = filter_path(filter);
        let removed = remove_at(&mut self.root, &levels, multi, subscriber, group);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Appends the recipients of `message` to `out`; see [`crate::TenantRouter::route`].
    pub fn matches(&self, publisher: SubscriberId, message: &Message, out: &mut Vec<Match<S>>) {
        let topic = message.topic.as_str();
        let levels: SmallVec<[&str; 8]> = topic.split('/').collect();
        let mut shared: SmallVec<[Match<S>; 2]> = SmallVec::new();
        let dollar = topic.starts_with('$');
        collect(
            &self.root,
            &levels,
            0,
            dollar,
            publisher,
            message,
            out,
            &mut shared,
        );
        if out.len() > 1 {
            merge_overlapping(out);
        }
        out.extend(shared);
    }

    /// Whether any subscription (plain or shared) matches `topic`, without picking a share
    /// member (so a probe never moves a group's round robin).
    pub fn has_match(&self, topic: &str) -> bool {
        let levels: SmallVec<[&str; 8]> = topic.split('/').collect();
        any_match(&self.root, &levels, 0, topic.starts_with('$'))
    }

    /// See [`crate::TenantRouter::redispatch`].
    pub fn pick_share_member(
        &self,
        share: &ShareKey,
        exclude: SubscriberId,
    ) -> Option<(Arc<S>, QoS)> {
        let (levels, multi) = filter_path(&share.filter);
        let mut node = &self.root;
        for level in levels {
            node = if level == "+" {
                node.plus.as_deref()?
            } else {
                node.children.get(level)?
            };
        }
        let subs = node.subs.as_deref()?;
        let groups = if multi {
            &subs.multi_groups
        } else {
            &subs.exact_groups
        };
        let entry = groups.get(&share.group)?.pick(Some(exclude))?;
        Some((entry.subscriber.clone(), entry.qos))
    }
}

fn remove_at<S: ?Sized>(
    node: &mut Node<S>,
    levels: &[&str],
    multi: bool,
    subscriber: SubscriberId,
    group: Option<&str>,
) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        let Some(subs) = node.subs.as_deref_mut() else {
            return false;
        };
        let removed = match group {
            None if multi => subs.multi.shift_remove(&subscriber).is_some(),
            None => subs.exact.shift_remove(&subscriber).is_some(),
            Some(g) => {
                let groups = if multi {
                    &mut subs.multi_groups
                } else {
                    &mut subs.exact_groups
                };
                let removed = groups
                    .get_mut(g)
                    .is_some_and(|grp| grp.members.shift_remove(&subscriber).is_some());
                if groups.get(g).is_some_and(|grp| grp.members.is_empty()) {
                    groups.remove(g);
                }
                removed
            }
        };
        if subs.is_empty() {
            node.subs = None;
        }
        return removed;
    };
    if *first == "+" {
        let Some(child) = node.plus.as_deref_mut() else {
            return false;
        };
        let removed = remove_at(child, rest, multi, subscriber, group);
        if child.is_empty() {
            node.plus = None;
        }
        removed
    } else {
        let Some(child) = node.children.get_mut(*first) else {
            return false;
        };
        let removed = remove_at(child, rest, multi, subscriber, group);
        if child.is_empty() {
            node.children.remove(*first);
        }
        removed
    }
}

#[allow(clippy::too_many_arguments)]
fn collect<S: Subscriber + ?Sized>(
    node: &Node<S>,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    publisher: SubscriberId,
    message: &Message,
    out: &mut Vec<Match<S>>,
    shared: &mut SmallVec<[Match<S>; 2]>,
) {
    // The `$` rule: a topic starting with `$` is not matched by a wildcard in the first level.
    let wild_ok = !(dollar && depth == 0);
    if let Some(subs) = node.subs.as_deref() {
        if wild_ok {
            add(
                &subs.multi,
                &subs.multi_groups,
                publisher,
                message,
                out,
                shared,
            );
        }
        if depth == levels.len() {
            add(
                &subs.exact,
                &subs.exact_groups,
                publisher,
                message,
                out,
                shared,
            );
        }
    }
    let Some(level) = levels.get(depth) else {
        return;
    };
    if let Some(child) = node.children.get(*level) {
        collect(
            child,
            levels,
            depth + 1,
            dollar,
            publisher,
            message,
            out,
            shared,
        );
    }
    if wild_ok && let Some(plus) = node.plus.as_deref() {
        collect(
            plus,
            levels,
            depth + 1,
            dollar,
            publisher,
            message,
            out,
            shared,
        );
    }
}

fn any_match<S: ?Sized>(node: &Node<S>, levels: &[&str], depth: usize, dollar: bool) -> bool {
    let wild_ok = !(dollar && depth == 0);
    if let Some(subs) = node.subs.as_deref() {
        if wild_ok && (!subs.multi.is_empty() || !subs.multi_groups.is_empty()) {
            return true;
        }
        if depth == levels.len() && (!subs.exact.is_empty() || !subs.exact_groups.is_empty()) {
            return true;
        }
    }
    let Some(level) = levels.get(depth) else {
        return false;
    };
    if let Some(child) = node.children.get(*level)
        && any_match(child, levels, depth + 1, dollar)
    {
        return true;
    }
    wild_ok
        && node
            .plus
            .as_deref()
            .is_some_and(|plus| any_match(plus, levels, depth + 1, dollar))
}

fn add<S: Subscriber + ?Sized>(
    entries: &IndexMap<SubscriberId, Entry<S>>,
    groups: &HashMap<Arc<str>, Group<S>>,
    publisher: SubscriberId,
    message: &Message,
    out: &mut Vec<Match<S>>,
    shared: &mut SmallVec<[Match<S>; 2]>,
) {
    for (id, entry) in entries {
        if entry.no_local && *id == publisher {
            continue;
        }
        out.push(entry.to_match(message, None));
    }
    for group in groups.values() {
        if let Some(entry) = group.pick(None) {
            shared.push(entry.to_match(message, Some(group.key.clone())));
        }
    }
}

/// Folds overlapping subscriptions of one subscriber into one copy: highest QoS, retain if any
/// Retain As Published subscription matched, all subscription identifiers.
fn merge_overlapping<S: Subscriber + ?Sized>(out: &mut Vec<Match<S>>) {
    out.sort_unstable_by_key(|m| m.subscriber.id());
    out.dedup_by(|later, kept| {
        if later.subscriber.id() != kept.subscriber.id() {
            return false;
        }
        kept.qos = kept.qos.max(later.qos);
        kept.retain |= later.retain;
        kept.subscription_ids
            .extend(later.subscription_ids.drain(..));
        true
    });
}
