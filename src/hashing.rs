//! The hasher of the maps a call looks up on its way (quota keys, keyed
//! pacers and breakers, coalescing, the per-model estimates).
//!
//! foldhash (hashbrown's default hasher) instead of std's SipHash-1-3: a
//! quota key or a model name hashes in a few instructions instead of ~50–100,
//! and each map is seeded at random when it is made, so a client does not
//! know which keys collide. It is not a keyed PRF as SipHash is; where a
//! request picks a slot of a fixed table (the bulkhead's partitions) the
//! bulkhead keeps SipHash with a random key on purpose.

/// A `HashMap` with [`RandomState`].
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, RandomState>;

/// A random seed per map (foldhash's fast variant).
pub(crate) type RandomState = foldhash::fast::RandomState;
