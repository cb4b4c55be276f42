//! Retained messages in a tree of topic levels, so that a wildcard subscribe walks only the
//! branches its filter can match instead of scanning every retained message.

use std::sync::Arc;

use ferrohub_types::Message;
use hashbrown::HashMap;

#[derive(Default)]
struct RNode {
    children: HashMap<Box<str>, RNode>,
    message: Option<Arc<Message>>,
}

/// One tenant's retained messages.
#[derive(Default)]
pub struct RetainedTree {
    root: RNode,
    len: usize,
}

impl RetainedTree {
    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `message` as the retained message of its topic, replacing any previous one.
    pub fn insert(&mut self, message: Arc<Message>) {
        let mut node = &mut self.root;
        for level in message.topic.as_str().split('/') {
            node = node.children.entry(Box::from(level)).or_default();
        }
        if node.message.replace(message).is_none() {
            self.len += 1;
        }
    }

    /// Clears the retained message of `topic`, pruning empty branches.
    pub fn remove(&mut self, topic: &str) {
        let levels: Vec<&str> = topic.split('/').collect();
        if remove_at(&mut self.root, &levels) {
            self.len -= 1;
        }
    }

    /// Appends the retained messages matching `filter` (MQTT rules, `$` rule included).
    pub fn matching(&self, filter: &str, out: &mut Vec<Arc<Message>>) {
        let levels: Vec<&str> = filter.split('/').collect();
        walk(&self.root, &levels, true, out);
    }
}

fn remove_at(node: &mut RNode, levels: &[&str]) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return node.message.take().is_some();
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove_at(child, rest);
    if child.message.is_none() && child.children.is_empty() {
        node.children.remove(*first);
    }
    removed
}

fn walk(node: &RNode, levels: &[&str], at_root: bool, out: &mut Vec<Arc<Message>>) {
    let Some((first, rest)) = levels.split_first() else {
        if let Some(m) = &node.message {
            out.push(m.clone());
        }
        return;
    };
    match *first {
        "#" => {
            // `a/#` also matches `a` itself.
            if !at_root && let Some(m) = &node.message {
                out.push(m.clone());
            }
            collect_all(node, at_root, out);
        }
        "+" => {
            for (name, child) in &node.children {
                if at_root && name.starts_with('$') {
                    continue;
                }
                walk(child, rest, false, out);
            }
        }
        literal => {
            if let Some(child) = node.children.get(literal) {
                walk(child, rest, false, out);
            }
        }
    }
}

fn collect_all(node: &RNode, at_root: bool, out: &mut Vec<Arc<Message>>) {
    for (name, child) in &node.children {
        if at_root && name.starts_with('$') {
            continue;
        }
        if let Some(m) = &child.message {
            out.push(m.clone());
        }
        collect_all(child, false, out);
    }
}
