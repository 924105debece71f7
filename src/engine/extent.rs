//! An interval map from page ranges to values: the index of the buffer store, of a
//! transaction's overlay, and of a layer.
//!
//! Invariant: extents never overlap, and none is empty. Inserting over existing extents splits
//! or replaces them, so the map always says, for each page, the value written last.

use std::collections::BTreeMap;

/// A value attached to a run of pages. `advance(n)` is the value for the same run started `n`
/// pages later (a WAL offset moves on by `n` pages; a "zero" marker stays the same).
pub trait ExtentValue: Clone {
    fn advance(&self, pages: u64) -> Self;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent<V> {
    pub start: u64,
    pub len: u64,
    pub value: V,
}

impl<V> Extent<V> {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

#[derive(Debug, Clone, Default)]
pub struct ExtentMap<V> {
    /// start page → (length in pages, value)
    map: BTreeMap<u64, (u64, V)>,
    pages: u64,
}

impl<V: ExtentValue> ExtentMap<V> {
    pub fn new() -> Self {
        ExtentMap {
            map: BTreeMap::new(),
            pages: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Pages covered by all extents.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Removes whatever covers `[start, start+len)`, splitting extents that straddle its edges.
    pub fn punch(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = start + len;
        // An extent beginning before `start` may reach into the range.
        if let Some((&s, &(l, ref v))) = self.map.range(..start).next_back() {
            if s + l > start {
                let v = v.clone();
                self.map.insert(s, (start - s, v.clone()));
                self.pages -= s + l - start;
                if s + l > end {
                    self.map.insert(end, (s + l - end, v.advance(end - s)));
                    self.pages += s + l - end;
                }
            }
        }
        // One lookup per extent inside, and no list of them: a 4 KiB write over a buffered
        // page (the common case) finds one, or none.
        while let Some(s) = self.map.range(start..end).next().map(|(&s, _)| s) {
            let (l, v) = self.map.remove(&s).expect("key found above");
            self.pages -= l;
            if s + l > end {
                self.map.insert(end, (s + l - end, v.advance(end - s)));
                self.pages += s + l - end;
            }
        }
    }

    /// Maps `[start, start+len)` to `value` (page `start + i` gets `value.advance(i)`).
    pub fn insert(&mut self, start: u64, len: u64, value: V) {
        if len == 0 {
            return;
        }
        // The common cases of a 4 KiB write take no more lookups than they need: a page
        // written again while buffered replaces its extent's value in place (one lookup),
        // and a page next to nothing mapped is inserted (three).
        match self.map.range_mut(..=start).next_back() {
            Some((&s, (l, v))) if s == start && *l == len => {
                *v = value;
                return;
            }
            Some((&s, (l, _))) if s + *l > start => {}
            _ => {
                if self.map.range(start..start + len).next().is_none() {
                    self.map.insert(start, (len, value));
                    self.pages += len;
                    return;
                }
            }
        }
        self.punch(start, len);
        self.map.insert(start, (len, value));
        self.pages += len;
    }

    /// The parts of `[start, start+len)` that are mapped, clipped to the range, in order.
    pub fn lookup(&self, start: u64, len: u64) -> Vec<Extent<V>> {
        let end = start + len;
        let mut out = Vec::new();
        if let Some((&s, (l, v))) = self.map.range(..start).next_back() {
            if s + l > start {
                let e = (s + l).min(end);
                out.push(Extent {
                    start,
                    len: e - start,
                    value: v.advance(start - s),
                });
            }
        }
        for (&s, (l, v)) in self.map.range(start..end) {
            out.push(Extent {
                start: s,
                len: (*l).min(end - s),
                value: v.clone(),
            });
        }
        out
    }

    /// `[first page mapped, last page mapped + 1)`, or `(0, 0)` when empty.
    pub fn span(&self) -> (u64, u64) {
        match (self.map.first_key_value(), self.map.last_key_value()) {
            (Some((&first, _)), Some((&last, (len, _)))) => (first, last + len),
            _ => (0, 0),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Extent<V>> + '_ {
        self.map.iter().map(|(&start, (len, v))| Extent {
            start,
            len: *len,
            value: v.clone(),
        })
    }

    /// The extents in page order, the map's memory freed as they are taken.
    pub fn into_extents(self) -> impl Iterator<Item = Extent<V>> {
        self.map
            .into_iter()
            .map(|(start, (len, value))| Extent { start, len, value })
    }

    /// Removes every extent for which `drop` is true (whole extents: values are per extent).
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        let mut removed = 0;
        self.map.retain(|_, (l, v)| {
            let k = keep(v);
            if !k {
                removed += *l;
            }
            k
        });
        self.pages -= removed;
    }
}

/// Splits `[start, start+len)` into the gaps not covered by `covered` (sorted, inside range).
pub fn gaps<V>(start: u64, len: u64, covered: &[Extent<V>]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = start;
    for e in covered {
        if e.start > pos {
            out.push((pos, e.start - pos));
        }
        pos = pos.max(e.end());
    }
    if pos < start + len {
        out.push((pos, start + len - pos));
    }
    out
}

/// An immutable interval map, built in page order: an opened layer's index. A sorted array
/// takes 32 bytes an extent where the B-tree of [`ExtentMap`] took ~58 (a delta of 165 000
/// scattered pages: 5 MiB instead of 9.7; docs/PERFORMANCE.md), and finds an extent by
/// binary search.
#[derive(Debug, Clone, Default)]
pub struct SortedExtents<V> {
    extents: Vec<Extent<V>>,
    pages: u64,
}

impl<V: ExtentValue> SortedExtents<V> {
    pub fn with_capacity(n: usize) -> Self {
        SortedExtents {
            extents: Vec::with_capacity(n),
            pages: 0,
        }
    }

    /// Appends `[start, start+len)`; false (and nothing appended) unless it begins at or
    /// after the end of the last one. Empty extents are skipped.
    pub fn push(&mut self, start: u64, len: u64, value: V) -> bool {
        if len == 0 {
            return true;
        }
        if self.extents.last().is_some_and(|l| l.end() > start) || start.checked_add(len).is_none()
        {
            return false;
        }
        self.extents.push(Extent { start, len, value });
        self.pages += len;
        true
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.extents.len()
    }

    /// Pages covered by all extents.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// `[first page mapped, last page mapped + 1)`, or `(0, 0)` when empty.
    pub fn span(&self) -> (u64, u64) {
        match (self.extents.first(), self.extents.last()) {
            (Some(f), Some(l)) => (f.start, l.end()),
            _ => (0, 0),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Extent<V>> + '_ {
        self.extents.iter().cloned()
    }

    /// The parts of `[start, start+len)` that are mapped, clipped to the range, in order.
    pub fn lookup(&self, start: u64, len: u64) -> Vec<Extent<V>> {
        let end = start + len;
        let first = self.extents.partition_point(|e| e.end() <= start);
        let mut out = Vec::new();
        for e in self.extents[first..].iter().take_while(|e| e.start < end) {
            let from = e.start.max(start);
            out.push(Extent {
                start: from,
                len: e.end().min(end) - from,
                value: e.value.advance(from - e.start),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A value that records which write produced a page and at which position in it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct W {
        id: u32,
        pos: u64,
    }
    impl ExtentValue for W {
        fn advance(&self, pages: u64) -> Self {
            W {
                id: self.id,
                pos: self.pos + pages,
            }
        }
    }

    fn model_lookup(m: &ExtentMap<W>, page: u64) -> Option<W> {
        m.lookup(page, 1).into_iter().next().map(|e| e.value)
    }

    proptest! {
        /// The map agrees page-by-page with a plain array after any sequence of inserts,
        /// punches and retains, and never holds overlapping extents.
        #[test]
        fn matches_array_model(ops in prop::collection::vec((0u8..3, 0u64..64, 1u64..20), 1..60)) {
            let mut m = ExtentMap::new();
            let mut model: Vec<Option<W>> = vec![None; 100];
            for (i, (op, start, len)) in ops.into_iter().enumerate() {
                match op {
                    0 => {
                        m.insert(start, len, W { id: i as u32, pos: 0 });
                        for p in start..start + len {
                            model[p as usize] = Some(W { id: i as u32, pos: p - start });
                        }
                    }
                    1 => {
                        m.punch(start, len);
                        for p in start..start + len { model[p as usize] = None; }
                    }
                    _ => {
                        let cut = start as u32;
                        m.retain(|v| v.id >= cut);
                        for slot in model.iter_mut() {
                            if slot.as_ref().is_some_and(|w| w.id < cut) { *slot = None; }
                        }
                    }
                }
                let mut last_end = 0;
                for e in m.iter() {
                    prop_assert!(e.len > 0 && e.start >= last_end);
                    last_end = e.end();
                }
                prop_assert_eq!(m.pages(), model.iter().filter(|s| s.is_some()).count() as u64);
            }
            for p in 0..100u64 {
                prop_assert_eq!(model_lookup(&m, p), model[p as usize].clone());
            }
        }

        /// A sorted array built from a map answers every lookup as the map does.
        #[test]
        fn sorted_extents_answer_as_the_map(
            ops in prop::collection::vec((0u64..64, 1u64..20), 1..40),
            probes in prop::collection::vec((0u64..90, 0u64..30), 1..40),
        ) {
            let mut m = ExtentMap::new();
            for (i, (start, len)) in ops.into_iter().enumerate() {
                m.insert(start, len, W { id: i as u32, pos: 0 });
            }
            let mut s = SortedExtents::with_capacity(m.len());
            for e in m.iter() {
                prop_assert!(s.push(e.start, e.len, e.value));
            }
            prop_assert_eq!((s.len(), s.pages(), s.span()), (m.len(), m.pages(), m.span()));
            for (start, len) in probes {
                prop_assert_eq!(s.lookup(start, len), m.lookup(start, len));
            }
            if let Some(last) = m.iter().last() {
                prop_assert!(!s.push(last.end() - 1, 1, last.value.clone()), "overlap refused");
                prop_assert!(s.push(last.end(), 0, last.value), "empty skipped");
                prop_assert_eq!(s.len(), m.len());
            }
        }
    }

    #[test]
    fn lookup_clips_and_gaps() {
        let mut m = ExtentMap::new();
        m.insert(10, 10, W { id: 1, pos: 0 });
        m.insert(30, 5, W { id: 2, pos: 0 });
        let l = m.lookup(15, 20);
        assert_eq!(l.len(), 2);
        assert_eq!(
            l[0],
            Extent {
                start: 15,
                len: 5,
                value: W { id: 1, pos: 5 }
            }
        );
        assert_eq!(
            l[1],
            Extent {
                start: 30,
                len: 5,
                value: W { id: 2, pos: 0 }
            }
        );
        assert_eq!(gaps(15, 20, &l), vec![(20, 10)]);
        assert_eq!(gaps(0, 5, &m.lookup(0, 5)), vec![(0, 5)]);
    }
}
