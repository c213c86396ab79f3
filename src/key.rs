//! Generational connection keys and the per-core slab that hands them out.
//!
//! A connection is named everywhere (directory, rooms, mailboxes, acks) by a [`ConnKey`]:
//! `(core, slot, generation)` packed in a `u64`. Every lookup and removal compares the
//! generation, so a key that outlived its connection misses instead of hitting whatever
//! connection reused the slot. This is what makes a late cleanup harmless by construction.

use std::fmt;

const CORE_BITS: u32 = 8;
const SLOT_BITS: u32 = 22;
const GEN_BITS: u32 = 64 - CORE_BITS - SLOT_BITS;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;

/// Largest number of cores a key can name.
pub const MAX_CORES: usize = 1 << CORE_BITS;
/// Largest number of simultaneous connections one core can hold.
pub const MAX_SLOTS_PER_CORE: usize = 1 << SLOT_BITS;

/// A connection's name: core, slot and generation packed in one `u64`.
///
/// Layout (high to low): 8 bits core, 22 bits slot, 34 bits generation. Generations come from
/// a per-core counter bumped on every insert, so a slot's generation never repeats before
/// 2^34 connections have been accepted on that core.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey(u64);

impl ConnKey {
    /// Packs a key. `core` and `slot` must fit their fields.
    pub fn new(core: usize, slot: usize, generation: u64) -> Self {
        debug_assert!(core < MAX_CORES && slot < MAX_SLOTS_PER_CORE);
        ConnKey(
            ((core as u64) << (SLOT_BITS + GEN_BITS))
                | ((slot as u64) << GEN_BITS)
                | (generation & GEN_MASK),
        )
    }

    /// The core that owns the connection.
    pub fn core(self) -> usize {
        (self.0 >> (SLOT_BITS + GEN_BITS)) as usize
    }

    /// The slot in that core's slab.
    pub fn slot(self) -> usize {
        ((self.0 >> GEN_BITS) & SLOT_MASK) as usize
    }

    /// The generation the slot had when this key was issued.
    pub fn generation(self) -> u64 {
        self.0 & GEN_MASK
    }

    /// The packed form, as sent to clients in `welcome.conn`.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// Rebuilds a key from its packed form.
    pub fn from_u64(v: u64) -> Self {
        ConnKey(v)
    }
}

impl fmt::Debug for ConnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.core(), self.slot(), self.generation())
    }
}

impl fmt::Display for ConnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

struct Entry<T> {
    generation: u64,
    value: T,
}

/// A slab whose keys carry a generation: stale keys miss.
pub struct GenSlab<T> {
    core: usize,
    slab: slab::Slab<Entry<T>>,
    next_generation: u64,
}

impl<T> GenSlab<T> {
    /// An empty slab for `core`.
    pub fn new(core: usize) -> Self {
        assert!(core < MAX_CORES, "core index {core} does not fit a key");
        GenSlab {
            core,
            slab: slab::Slab::new(),
            next_generation: 1,
        }
    }

    /// Inserts a value and returns its key, or gives the value back when the core is full.
    pub fn insert(&mut self, value: T) -> Result<ConnKey, T> {
        if self.slab.vacant_key() >= MAX_SLOTS_PER_CORE {
            return Err(value);
        }
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) & GEN_MASK;
        let slot = self.slab.insert(Entry { generation, value });
        Ok(ConnKey::new(self.core, slot, generation))
    }

    fn entry(&self, key: ConnKey) -> Option<&Entry<T>> {
        if key.core() != self.core {
            return None;
        }
        self.slab
            .get(key.slot())
            .filter(|e| e.generation == key.generation())
    }

    /// The value under `key`, if the key is still current.
    pub fn get(&self, key: ConnKey) -> Option<&T> {
        self.entry(key).map(|e| &e.value)
    }

    /// Mutable access to the value under `key`, if the key is still current.
    pub fn get_mut(&mut self, key: ConnKey) -> Option<&mut T> {
        if key.core() != self.core {
            return None;
        }
        self.slab
            .get_mut(key.slot())
            .filter(|e| e.generation == key.generation())
            .map(|e| &mut e.value)
    }

    /// Removes the value under `key`. A stale key removes nothing and returns `None`.
    pub fn remove(&mut self, key: ConnKey) -> Option<T> {
        self.entry(key)?;
        Some(self.slab.remove(key.slot()).value)
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// True when no entry is live.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Every live entry with its current key.
    pub fn iter(&self) -> impl Iterator<Item = (ConnKey, &T)> + '_ {
        self.slab
            .iter()
            .map(move |(slot, e)| (ConnKey::new(self.core, slot, e.generation), &e.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips_its_fields() {
        let k = ConnKey::new(200, MAX_SLOTS_PER_CORE - 1, GEN_MASK);
        assert_eq!(k.core(), 200);
        assert_eq!(k.slot(), MAX_SLOTS_PER_CORE - 1);
        assert_eq!(k.generation(), GEN_MASK);
        assert_eq!(ConnKey::from_u64(k.as_u64()), k);
    }

    #[test]
    fn stale_key_after_slot_reuse_removes_nothing() {
        let mut s = GenSlab::new(3);
        let old = s.insert("old user").unwrap();
        assert_eq!(s.remove(old), Some("old user"));
        let new = s.insert("new user").unwrap();
        // The slab reuses the freed slot, but under a new generation.
        assert_eq!(new.slot(), old.slot());
        assert_ne!(new, old);
        // The late cleanup of the old connection is a no-op.
        assert_eq!(s.remove(old), None);
        assert_eq!(s.get(old), None);
        assert!(s.get_mut(old).is_none());
        assert_eq!(s.get(new), Some(&"new user"));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn double_remove_is_a_no_op() {
        let mut s = GenSlab::new(0);
        let k = s.insert(1).unwrap();
        assert_eq!(s.remove(k), Some(1));
        assert_eq!(s.remove(k), None);
        assert!(s.is_empty());
    }

    #[test]
    fn key_of_another_core_misses() {
        let mut a = GenSlab::new(0);
        let b: GenSlab<i32> = GenSlab::new(1);
        let k = a.insert(7).unwrap();
        assert_eq!(b.get(k), None);
        assert_eq!(a.get(k), Some(&7));
    }

    #[test]
    fn iter_yields_current_keys() {
        let mut s = GenSlab::new(1);
        let k1 = s.insert('a').unwrap();
        let k2 = s.insert('b').unwrap();
        s.remove(k1);
        let k3 = s.insert('c').unwrap();
        let mut got: Vec<_> = s.iter().map(|(k, v)| (k, *v)).collect();
        got.sort();
        let mut want = vec![(k2, 'b'), (k3, 'c')];
        want.sort();
        assert_eq!(got, want);
    }
}
