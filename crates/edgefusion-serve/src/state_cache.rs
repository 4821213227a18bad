//! Saved recurrent states of the slots' cached tokens: prefix reuse for hybrid models.
//!
//! A dense model cuts a slot's KV cache back to the prefix a new prompt shares with it. The
//! SSM states, sinks and windows of a hybrid summarize every position in constant size and
//! cannot be cut back; so while a slot prefills, it saves them at chosen positions (the
//! ends of the first and the last eight chat messages before the new one, and one token
//! before the prompt's end), and a later prompt that shares at least that much restores the
//! latest one it covers. The full-attention layers keep their
//! rows in place. The cache holds at most `capacity` states over all slots and evicts the
//! least recently used.

use edgefusion_runtime::RecurrentState;

/// One saved state: of slot `slot`'s first `state.n_past()` cached tokens.
struct Entry {
    slot: usize,
    state: RecurrentState,
    /// Clock of its last save or restore (least recently used goes first).
    last_used: u64,
}

/// Every slot's saved states, under one budget.
pub(crate) struct StateCache {
    entries: Vec<Entry>,
    /// States held at most (0: none saved).
    capacity: usize,
    clock: u64,
    /// States evicted to make room, since the start.
    pub(crate) evicted: u64,
}

impl StateCache {
    /// A cache of at most `capacity` states.
    pub(crate) fn new(capacity: usize) -> Self {
        StateCache {
            entries: Vec::new(),
            capacity,
            clock: 0,
            evicted: 0,
        }
    }

    /// States it may hold.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// States held now.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Keeps `state` of `slot`, evicting the least recently used state (of any slot) when
    /// the cache is full. A state at a position the slot already saved replaces it.
    pub(crate) fn save(&mut self, slot: usize, state: RecurrentState) {
        if self.capacity == 0 {
            return;
        }
        self.clock += 1;
        let n_past = state.n_past();
        self.entries
            .retain(|e| !(e.slot == slot && e.state.n_past() == n_past));
        if self.entries.len() >= self.capacity {
            if let Some(oldest) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used)
            {
                self.entries.swap_remove(oldest);
                self.evicted += 1;
            }
        }
        self.entries.push(Entry {
            slot,
            state,
            last_used: self.clock,
        });
    }

    /// The latest position at most `limit` at which `slot` saved its state.
    pub(crate) fn best(&self, slot: usize, limit: usize) -> Option<usize> {
        self.entries
            .iter()
            .filter(|e| e.slot == slot && e.state.n_past() <= limit)
            .map(|e| e.state.n_past())
            .max()
    }

    /// `slot`'s state saved at `n_past`, marked as just used.
    pub(crate) fn use_state(&mut self, slot: usize, n_past: usize) -> Option<&RecurrentState> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self
            .entries
            .iter_mut()
            .find(|e| e.slot == slot && e.state.n_past() == n_past)?;
        entry.last_used = clock;
        Some(&entry.state)
    }

    /// Marks `slot`'s states as just used (its cache goes on from them).
    pub(crate) fn touch(&mut self, slot: usize) {
        self.clock += 1;
        let clock = self.clock;
        for e in self.entries.iter_mut().filter(|e| e.slot == slot) {
            e.last_used = clock;
        }
    }

    /// Drops `slot`'s states beyond position `n`: its cache rows after `n` are about to be
    /// overwritten by other tokens.
    pub(crate) fn forget_after(&mut self, slot: usize, n: usize) {
        self.entries
            .retain(|e| !(e.slot == slot && e.state.n_past() > n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefusion_io::ModelSource;
    use edgefusion_model::Model;
    use edgefusion_runtime::{Logits, Session, SessionOptions};
    use edgefusion_testkit::fixture;

    /// States of the tiny hybrid after 1, 2, … `n` tokens.
    fn states(n: usize) -> Vec<RecurrentState> {
        let source = ModelSource::open(fixture("tiny-hybrid-f32.gguf")).unwrap();
        let model = Model::load(&source).unwrap();
        let mut session = Session::new(&model, SessionOptions::new(64, 1)).unwrap();
        (0..n)
            .map(|t| {
                session.forward(&[t as u32 + 1], Logits::Last).unwrap();
                session.recurrent_state()
            })
            .collect()
    }

    #[test]
    fn the_least_recently_used_state_goes_first() {
        let s = states(8);
        let mut cache = StateCache::new(2);
        cache.save(0, s[2].clone()); // slot 0 at 3
        cache.save(1, s[4].clone()); // slot 1 at 5
        assert_eq!(cache.best(0, 10), Some(3));
        assert_eq!(cache.best(0, 2), None);
        // Slot 0's state is used, so slot 1's is the oldest when a third comes.
        assert_eq!(cache.use_state(0, 3).map(RecurrentState::n_past), Some(3));
        cache.save(1, s[6].clone()); // slot 1 at 7
        assert_eq!((cache.len(), cache.evicted), (2, 1));
        assert_eq!(cache.best(1, 6), None);
        assert_eq!(cache.best(1, 7), Some(7));
        assert_eq!(cache.best(0, 7), Some(3));
        // A position saved again replaces the old state instead of evicting another.
        cache.save(0, s[2].clone());
        assert_eq!((cache.len(), cache.evicted), (2, 1));
        // Cut back: the states beyond the cut are gone, the others stay.
        cache.forget_after(1, 6);
        assert_eq!(cache.best(1, 100), None);
        assert_eq!(cache.best(0, 100), Some(3));
        assert!(cache.use_state(1, 7).is_none());
        // A slot whose cache goes on keeps its states fresh: the other slot's go first.
        let mut cache = StateCache::new(2);
        cache.save(0, s[1].clone());
        cache.save(1, s[3].clone());
        cache.touch(0);
        cache.save(1, s[5].clone());
        assert_eq!(cache.best(0, 100), Some(2));
        assert_eq!(cache.best(1, 5), None);
        // A budget of none keeps nothing.
        let mut none = StateCache::new(0);
        none.save(0, s[0].clone());
        assert_eq!(none.len(), 0);
    }
}
