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

    /// Splits `t` into keys `< key` (or `<= key` when `inclusive`) and the rest.
    fn split(&mut self, t: u32, key: &K, inclusive: bool) -> (u32, u32) {
        if t == NIL {
            return (NIL, NIL);
        }
        let goes_left = {
            let k = &self.nodes[t as usize].key;
            if inclusive {
                k <= key
            } else {
                k < key
            }
        };
        if goes_left {
            let right = self.nodes[t as usize].right;
            let (l, r) = self.split(right, key, inclusive);
            self.nodes[t as usize].right = l;
            self.fix(t);
            (t, r)
        } else {
            let left = self.nodes[t as usize].left;
            let (l, r) = self.split(left, key, inclusive);
            self.nodes[t as usize].left = r;
            self.fix(t);
            (l, t)
        }
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
        let (l, r) = self.split(root, &key, false);
        let l = self.merge(l, idx);
        self.root = self.merge(l, r);
    }

    /// Removes `key`; returns whether it was present.
    pub(crate) fn remove(&mut self, key: &K) -> bool {
        let root = self.root;
        let (l, r) = self.split(root, key, false);
        let (m, r) = self.split(r, key, true);
        let found = m != NIL;
        if found {
            // Keys are unique, so `m` is a single node.
            let (ml, mr) = (self.nodes[m as usize].left, self.nodes[m as usize].right);
            self.free.push(m);
            let rest = self.merge(ml, mr);
            let r = self.merge(rest, r);
            self.root = self.merge(l, r);
        } else {
            self.root = self.merge(l, r);
        }
        found
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
