//! The router: where every message in the hub meets its subscribers.
//!
//! Protocol adapters publish into the router and services subscribe to it (see `ARCHITECTURE.md`).
//! The router owns, per tenant, the subscription trie (plain and `$share/{group}/…` subscriptions)
//! and the retained-message tree. It does *not* own queues: [`Router::route`] computes who gets a
//! message and at which QoS, and the caller hands the [`Match`]es to each [`Subscriber`], whose
//! bounded queue applies its own overflow policy. Matching runs in the publisher's task under a
//! read lock, so routing scales with cores instead of funnelling through one thread.
//!
//! Tenants are isolated by construction: every operation goes through a [`TenantRouter`], and no
//! trie is shared between tenants.

mod retained;
mod trie;

use std::sync::Arc;

use ferrohub_types::{Message, QoS, TenantId};
use hashbrown::HashMap;
use parking_lot::RwLock;
use smallvec::SmallVec;

pub use retained::RetainedTree;
pub use trie::{SubscribeOutcome, Subscription, SubscriptionTrie};

/// Identifies a subscriber (a session or a service) uniquely for the life of the process.
pub type SubscriberId = u64;

/// Something that receives messages: an MQTT session's outbox, or a service's inbox.
pub trait Subscriber: Send + Sync {
    /// The subscriber's id (used for No Local and for de-duplicating overlapping subscriptions).
    fn id(&self) -> SubscriberId;
    /// Whether the subscriber can take a message right now. Shared-subscription dispatch prefers
    /// members that are connected and have room, so that a group never strands messages on an
    /// offline member while another member could take them.
    fn is_available(&self) -> bool;
}

/// Where a delivery came from when it was dispatched through a shared subscription, so that a
/// member that goes away can hand its undelivered messages back to the rest of its group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShareKey {
    /// Share group name.
    pub group: Arc<str>,
    /// The filter the group subscribes to.
    pub filter: Arc<str>,
}

/// One subscriber's copy of a routed message.
#[derive(Clone)]
pub struct Match<S: ?Sized> {
    /// The recipient.
    pub subscriber: Arc<S>,
    /// Delivery QoS: the lower of the message's QoS and the highest matching subscription's QoS.
    pub qos: QoS,
    /// Retain flag to deliver with (true only for Retain As Published subscriptions).
    pub retain: bool,
    /// Subscription identifiers of every matching subscription of this subscriber.
    pub subscription_ids: SmallVec<[u32; 1]>,
    /// Set when dispatched through a shared subscription.
    pub share: Option<ShareKey>,
}

/// All tenants' routing state.
pub struct Router<S: Subscriber + ?Sized> {
    tenants: RwLock<HashMap<TenantId, Arc<TenantRouter<S>>>>,
}

impl<S: Subscriber + ?Sized> Default for Router<S> {
    fn default() -> Self {
        Router {
            tenants: RwLock::new(HashMap::new()),
        }
    }
}

impl<S: Subscriber + ?Sized> Router<S> {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// The routing state of `tenant`, created on first use. Sessions keep the returned `Arc` so
    /// that the hot path never looks the tenant up again.
    pub fn tenant(&self, tenant: &TenantId) -> Arc<TenantRouter<S>> {
        if let Some(t) = self.tenants.read().get(tenant) {
            return t.clone();
        }
        self.tenants
            .write()
            .entry(tenant.clone())
            .or_insert_with(|| Arc::new(TenantRouter::new(tenant.clone())))
            .clone()
    }

    /// Every tenant's router (for statistics).
    pub fn tenants(&self) -> Vec<Arc<TenantRouter<S>>> {
        self.tenants.read().values().cloned().collect()
    }

    /// Retained messages across tenants.
    pub fn retained_count(&self) -> usize {
        self.tenants
            .read()
            .values()
            .map(|t| t.retained_count())
            .sum()
    }

    /// Subscriptions across tenants.
    pub fn subscription_count(&self) -> usize {
        self.tenants
            .read()
            .values()
            .map(|t| t.subscription_count())
            .sum()
    }
}

/// One tenant's subscriptions and retained messages.
pub struct TenantRouter<S: Subscriber + ?Sized> {
    tenant: TenantId,
    trie: RwLock<SubscriptionTrie<S>>,
    retained: RwLock<RetainedTree>,
}

impl<S: Subscriber + ?Sized> TenantRouter<S> {
    fn new(tenant: TenantId) -> Self {
        TenantRouter {
            tenant,
            trie: RwLock::new(SubscriptionTrie::new()),
            retained: RwLock::new(RetainedTree::default()),
        }
    }

    /// The tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// Adds or replaces `subscriber`'s subscription to `sub.filter` (in `sub.share` group if set).
    pub fn subscribe(&self, subscriber: &Arc<S>, sub: Subscription) -> SubscribeOutcome {
        self.trie.write().insert(subscriber, sub)
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&self, subscriber: SubscriberId, filter: &str, group: Option<&str>) -> bool {
        self.trie.write().remove(subscriber, filter, group)
    }

    /// Computes the recipients of `message` published by `publisher` into `out` (cleared first).
    /// Overlapping subscriptions of one subscriber yield one copy at the highest QoS carrying all
    /// their subscription identifiers; each matching share group yields one member.
    pub fn route(&self, publisher: SubscriberId, message: &Message, out: &mut Vec<Match<S>>) {
        out.clear();
        self.trie.read().matches(publisher, message, out);
    }

    /// Whether any subscription matches `topic` (a probe: no share member is picked).
    pub fn has_match(&self, topic: &str) -> bool {
        self.trie.read().has_match(topic)
    }

    /// Picks another member of a share group for a message a member could not take, skipping
    /// `exclude`. Returns `None` when no other member is left.
    pub fn redispatch(&self, share: &ShareKey, exclude: SubscriberId) -> Option<(Arc<S>, QoS)> {
        self.trie.read().pick_share_member(share, exclude)
    }

    /// Stores (non-empty payload) or clears (empty payload) the retained message of its topic.
    /// Returns the retained count afterwards.
    pub fn retain(&self, message: Arc<Message>) -> usize {
        let mut tree = self.retained.write();
        if message.payload.is_empty() {
            tree.remove(&message.topic);
        } else {
            tree.insert(message);
        }
        tree.len()
    }

    /// Retained messages whose topics match `filter`, appended to `out`.
    pub fn retained_matching(&self, filter: &str, out: &mut Vec<Arc<Message>>) {
        self.retained.read().matching(filter, out);
    }

    /// Number of retained messages.
    pub fn retained_count(&self) -> usize {
        self.retained.read().len()
    }

    /// Number of subscriptions (plain plus share-group memberships).
    pub fn subscription_count(&self) -> usize {
        self.trie.read().len()
    }
}
