//! Hold numbers by hold id, for ids that mostly come in increasing order.
//!
//! The host names a hold after its run, and run ids are UUIDv7: they sort by creation. A hold
//! whose id is greater than every earlier one is appended to an ordered list, so a new hold
//! touches only the list's end, and a lookup, nearly always of a recent hold, searches back from
//! the end through cache lines still warm. (A map of every hold grows with the ledger instead,
//! and misses the cache at each new hold.) Any other id (a hold reserved out of order, another
//! caller's naming) goes to a map.

use std::sync::Arc;

use foldhash::HashMap;

#[derive(Debug, Default)]
pub(super) struct HoldIndex {
    /// The holds appended in increasing order of their ids, with their numbers.
    ordered: Vec<(Arc<str>, u32)>,
    /// The others.
    others: HashMap<Arc<str>, u32>,
}

impl HoldIndex {
    /// The number of the hold `id`.
    pub fn find(&self, id: &str) -> Option<u32> {
        self.find_ordered(id).or_else(|| self.others.get(id).copied())
    }

    fn find_ordered(&self, id: &str) -> Option<u32> {
        let ordered = &self.ordered;
        // Search back from the end in doubling steps, then bisect the last step. Every position
        // from `end` on holds an id greater than `id`.
        let (mut end, mut step) = (ordered.len(), 1);
        let start = loop {
            let probe = end.saturating_sub(step);
            if probe == 0 || &*ordered[probe].0 <= id {
                break probe;
            }
            end = probe;
            step *= 2;
        };
        let at = start + ordered[start..end].partition_point(|(held, _)| &**held < id);
        ordered[..end].get(at).filter(|(held, _)| &**held == id).map(|&(_, number)| number)
    }

    /// Adds hold `number` named `id`, which the index does not have.
    pub fn insert(&mut self, id: &Arc<str>, number: u32) {
        if self.ordered.last().is_none_or(|(last, _)| **last < **id) {
            self.ordered.push((Arc::clone(id), number));
        } else {
            self.others.insert(Arc::clone(id), number);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Indexes `ids` as holds numbered in that order; returns the index and the ids.
    fn index(ids: &[&str]) -> (HoldIndex, Vec<Arc<str>>) {
        let ids: Vec<Arc<str>> = ids.iter().map(|&id| id.into()).collect();
        let mut index = HoldIndex::default();
        for (number, id) in ids.iter().enumerate() {
            assert_eq!(index.find(id), None);
            index.insert(id, number as u32);
        }
        (index, ids)
    }

    #[test]
    fn finds_every_hold_whatever_the_order_of_their_ids() {
        let mut names: Vec<String> = (0..1000).map(|i| format!("run-{i:05}")).collect();
        // Mostly increasing, some out of order, some with other names.
        names.swap(10, 20);
        names.swap(500, 501);
        names.push("another".into());
        names.push("a".into());
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (index, ids) = index(&refs);
        // Out of order: run-00011 to run-00019 and run-00010 (after run-00020), run-00500 (after
        // run-00501), and the two other names.
        assert_eq!((index.ordered.len(), index.others.len()), (989, 13));
        for (number, id) in ids.iter().enumerate() {
            assert_eq!(index.find(id), Some(number as u32), "{id}");
        }
        for missing in ["", "run-", "run-00500x", "run-99999", "zzz", "b"] {
            assert_eq!(index.find(missing), None, "{missing}");
        }
    }

    #[test]
    fn an_empty_index_finds_nothing() {
        let (index, _) = index(&[]);
        assert_eq!(index.find("run"), None);
    }
}
