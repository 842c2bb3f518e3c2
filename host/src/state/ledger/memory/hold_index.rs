//! Hold numbers by hold id, for ids that mostly come in increasing order.
//!
//! The host names a hold after its run, and run ids are UUIDv7: they sort by creation. A hold
//! whose id sorts after all but the last few earlier ones goes into an ordered list, so a new
//! hold touches only the list's end, and a lookup, nearly always of a recent hold, searches back
//! from the end through cache lines still warm. (A map of every hold grows with the ledger
//! instead, and misses the cache at each new hold.) Runs started at the same moment on several
//! threads reserve their holds in any order, which the last few places absorb; any other id (a
//! hold reserved long out of order, another caller's naming) goes to a map.

use std::sync::Arc;

use foldhash::HashMap;

/// How many of the last ids in the ordered list a new id may sort before and still join it.
const IN_ORDER_WINDOW: usize = 64;

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
        let ordered = &mut self.ordered;
        if ordered.last().is_none_or(|(last, _)| **last < **id) {
            ordered.push((Arc::clone(id), number));
            return;
        }
        let window = ordered.len().saturating_sub(IN_ORDER_WINDOW);
        let at = window + ordered[window..].partition_point(|(held, _)| **held < **id);
        if at > window || window == 0 {
            ordered.insert(at, (Arc::clone(id), number));
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
        // Mostly increasing, some a few places out of order, one far out, two other names.
        names.swap(10, 20);
        names.swap(500, 501);
        let late = names.remove(100);
        names.push(late);
        names.push("another".into());
        names.push("a".into());
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (index, ids) = index(&refs);
        // Within the last 64 places, run-00011 to run-00020 and run-00500 join the ordered
        // list; run-00100 (after run-00999) and the two other names do not.
        assert_eq!((index.ordered.len(), index.others.len()), (999, 3));
        assert!(index.ordered.is_sorted_by(|a, b| a.0 < b.0));
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
