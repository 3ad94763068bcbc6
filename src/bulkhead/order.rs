//! An order-statistic set: ordered keys with O(log n) insert, remove, first and
//! rank ("how many keys are before this one").
//!
//! The waiting line needs both a priority order (who is served next) and the
//! rank of any waiter in it (its position, "12th of 45"). `BTreeSet` has the first
//! but counts ranks in O(n); at 100,000 waiters that is too slow, so this is a
//! small treap whose nodes carry subtree sizes, stored in one arena `Vec` (no
//! allocation per insert once the arena has grown).

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Node<K> {
    key: K,
    prio: u32,
    left: u32,
    right: u32,
    size: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct OrderTree<K> {
    nodes: Vec<Node<K>>,
    free: Vec<u32>,
    root: u32,
    rng: u64,
}

impl<K: Ord + Copy> OrderTree<K> {
    pub(crate) fn new() -> Self {
        OrderTree {
            nodes: Vec::new(),
            free: Vec::new(),
            root: NIL,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.size(self.root) as usize
    }

    fn size(&self, t: u32) -> u32 {
        if t == NIL {
            0
        } else {
            self.nodes[t as usize].size
        }
    }

    fn fix(&mut self, t: u32) {
        let (l, r) = {
            let n = &self.nodes[t as usize];
            (n.left, n.right)
        };
        self.nodes[t as usize].size = 1 + self.size(l) + self.size(r);
    }

    fn next_prio(&mut self) -> u32 {
        // xorshift64*: the treap only needs priorities that are not adversarial.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }

    fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.nodes[a as usize].prio > self.nodes[b as usize].prio {
            let ar = self.nodes[a as usize].right;
            let m = self.merge(ar, b);
            self.nodes[a as usize].right = m;
            self.fix(a);
            a
        } else {
            let bl = self.nodes[b as usize].left;
            let m = self.merge(a, bl);
            self.nodes[b as usize].left = m;
            self.fix(b);
            b
        }
    }

    /// Inserts `key` (keys are unique; inserting a present key adds a duplicate).
    pub(crate) fn insert(&mut self, key: K) {
        let prio = self.next_prio();
        let node = Node {
            key,
            prio,
            left: NIL,
            right: NIL,
            size: 1,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        let root = self.root;
        self.root = self.insert_at(root, idx, &key);
    }

    /// Puts node `idx` in its place under `t` by descent, then rotates it up
    /// while its priority is higher than its parent's: one walk down and back,
    /// where a split and two merges rebuilt the path (a line's join costs a
    /// third of what it did).
    fn insert_at(&mut self, t: u32, idx: u32, key: &K) -> u32 {
        if t == NIL {
            return idx;
        }
        self.nodes[t as usize].size += 1;
        if *key < self.nodes[t as usize].key {
            let left = self.nodes[t as usize].left;
            let l = self.insert_at(left, idx, key);
            self.nodes[t as usize].left = l;
            if self.nodes[l as usize].prio > self.nodes[t as usize].prio {
                return self.rotate_right(t);
            }
        } else {
            let right = self.nodes[t as usize].right;
            let r = self.insert_at(right, idx, key);
            self.nodes[t as usize].right = r;
            if self.nodes[r as usize].prio > self.nodes[t as usize].prio {
                return self.rotate_left(t);
            }
        }
        t
    }

    /// `t`'s left child takes its place; returns it.
    fn rotate_right(&mut self, t: u32) -> u32 {
        let l = self.nodes[t as usize].left;
        self.nodes[t as usize].left = self.nodes[l as usize].right;
        self.nodes[l as usize].right = t;
        self.fix(t);
        self.fix(l);
        l
    }

    /// `t`'s right child takes its place; returns it.
    fn rotate_left(&mut self, t: u32) -> u32 {
        let r = self.nodes[t as usize].right;
        self.nodes[t as usize].right = self.nodes[r as usize].left;
        self.nodes[r as usize].left = t;
        self.fix(t);
        self.fix(r);
        r
    }

    /// Removes `key`; returns whether it was present.
    pub(crate) fn remove(&mut self, key: &K) -> bool {
        let root = self.root;
        let (root, found) = self.remove_at(root, key);
        self.root = root;
        found
    }

    /// Finds `key` under `t` by descent and puts the merge of its children in
    /// its place, one smaller on the way back.
    fn remove_at(&mut self, t: u32, key: &K) -> (u32, bool) {
        if t == NIL {
            return (NIL, false);
        }
        let (k, left, right) = {
            let n = &self.nodes[t as usize];
            (n.key, n.left, n.right)
        };
        let found = if *key < k {
            let (l, found) = self.remove_at(left, key);
            self.nodes[t as usize].left = l;
            found
        } else if k < *key {
            let (r, found) = self.remove_at(right, key);
            self.nodes[t as usize].right = r;
            found
        } else {
            self.free.push(t);
            return (self.merge(left, right), true);
        };
        if found {
            self.nodes[t as usize].size -= 1;
        }
        (t, found)
    }

    /// The smallest key.
    pub(crate) fn first(&self) -> Option<K> {
        let mut t = self.root;
        if t == NIL {
            return None;
        }
        while self.nodes[t as usize].left != NIL {
            t = self.nodes[t as usize].left;
        }
        Some(self.nodes[t as usize].key)
    }

    /// The largest key.
    pub(crate) fn last(&self) -> Option<K> {
        let mut t = self.root;
        if t == NIL {
            return None;
        }
        while self.nodes[t as usize].right != NIL {
            t = self.nodes[t as usize].right;
        }
        Some(self.nodes[t as usize].key)
    }

    /// How many keys are strictly smaller than `key`.
    pub(crate) fn rank(&self, key: &K) -> usize {
        let mut t = self.root;
        let mut count = 0usize;
        while t != NIL {
            let n = &self.nodes[t as usize];
            if n.key < *key {
                count += self.size(n.left) as usize + 1;
                t = n.right;
            } else {
                t = n.left;
            }
        }
        count
    }

    /// Removes every key (keeps the arena's memory).
    pub(crate) fn clear(&mut self) {
        self.nodes.clear();
        self.free.clear();
        self.root = NIL;
    }

    /// Every node's size counts its subtree, and its priority is not below
    /// its children's (a treap; the keys' order is checked by `keys`).
    #[cfg(test)]
    fn check(&self, t: u32) -> u32 {
        if t == NIL {
            return 0;
        }
        let n = &self.nodes[t as usize];
        for c in [n.left, n.right] {
            assert!(
                c == NIL || self.nodes[c as usize].prio <= n.prio,
                "heap order"
            );
        }
        let size = 1 + self.check(n.left) + self.check(n.right);
        assert_eq!(size, n.size, "subtree size");
        size
    }

    /// All keys in order.
    #[cfg(test)]
    pub(crate) fn keys(&self) -> Vec<K> {
        let mut out = Vec::with_capacity(self.len());
        let mut stack = Vec::new();
        let mut t = self.root;
        while t != NIL || !stack.is_empty() {
            while t != NIL {
                stack.push(t);
                t = self.nodes[t as usize].left;
            }
            if let Some(n) = stack.pop() {
                out.push(self.nodes[n as usize].key);
                t = self.nodes[n as usize].right;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn behaves_like_a_btreeset(ops in proptest::collection::vec((0u8..3, 0u32..200), 0..400)) {
            let mut tree = OrderTree::new();
            let mut model = BTreeSet::new();
            for (op, k) in ops {
                match op {
                    0 => if model.insert(k) { tree.insert(k) },
                    1 => prop_assert_eq!(tree.remove(&k), model.remove(&k)),
                    _ => {
                        prop_assert_eq!(tree.rank(&k), model.range(..k).count());
                    }
                }
                prop_assert_eq!(tree.len(), model.len());
                prop_assert_eq!(tree.first(), model.first().copied());
                prop_assert_eq!(tree.check(tree.root) as usize, model.len());
            }
            prop_assert_eq!(tree.keys(), model.iter().copied().collect::<Vec<_>>());
        }
    }

    #[test]
    fn large_fifo_stays_shallow() {
        let mut tree = OrderTree::new();
        for k in 0..100_000u64 {
            tree.insert(k);
        }
        assert_eq!(tree.rank(&50_000), 50_000);
        for k in 0..100_000u64 {
            assert_eq!(tree.first(), Some(k));
            assert!(tree.remove(&k));
        }
        assert_eq!(tree.len(), 0);
    }
}
