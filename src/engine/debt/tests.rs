use super::*;
use proptest::prelude::*;

fn shape(first: u64, end: u64, data_pages: u64) -> Shape {
    Shape {
        first,
        end,
        data_pages,
        bytes: data_pages << 12,
        pages_disjoint: false,
    }
}

#[test]
fn sequential_fill_is_all_base_and_needs_nothing() {
    let layers: Vec<Shape> = (0..100)
        .map(|i| shape(i * 1000, i * 1000 + 1000, 1000))
        .collect();
    assert_eq!(split(&layers), ((0..100).collect(), vec![]));
    assert_eq!(read_depth(&layers), 1);
    // 100 layers of 4 MiB: past the coalescing floor, so neighbours are merged pairwise.
    let step = plan(&Policy::DEFAULT, &layers, 400 << 20, 12);
    assert!(matches!(step, Some(Step::Coalesce { .. })), "{step:?}");
    // Layers of a whole partition each are left alone however many there are.
    let big: Vec<Shape> = (0..100)
        .map(|i| Shape {
            bytes: BASE_PARTITION_BYTES,
            ..shape(i * 65536, i * 65536 + 65536, 65536)
        })
        .collect();
    assert_eq!(
        plan(&Policy::DEFAULT, &big, 100 * BASE_PARTITION_BYTES, 12),
        None
    );
}

#[test]
fn checkpoints_interleaved_at_their_edges_stay_in_the_base_when_their_pages_are_disjoint() {
    // A sequential writer with requests in flight: the second checkpoint holds a page below
    // the first one's last.
    let mut layers = vec![shape(0, 1000, 999), shape(998, 2000, 1001)];
    assert_eq!(split(&layers).1, vec![1], "by spans alone, a delta");
    layers[1].pages_disjoint = true;
    assert_eq!(split(&layers), (vec![0, 1], vec![]));
    assert_eq!(read_depth(&layers), 1);
    assert_eq!(plan(&Policy::DEFAULT, &layers, 2000 << 12, 12), None);
}

#[test]
fn deltas_merge_into_the_base_they_overlap_once_they_weigh_as_much() {
    let base = [shape(0, 1000, 1000), shape(1000, 2000, 1000)];
    let mut layers = base.to_vec();
    layers.push(shape(10, 500, 300)); // a delta over the first base layer only
    let p = Policy::DEFAULT;
    assert_eq!(split(&layers), (vec![0, 1], vec![2]));
    assert_eq!(read_depth(&layers), 2);
    assert_eq!(plan(&p, &layers, 2000 << 12, 12), None);
    layers.push(shape(600, 990, 380));
    assert_eq!(plan(&p, &layers, 2000 << 12, 12), None);
    layers.push(shape(0, 900, 400)); // 1080 delta pages ≥ 1000 overlapped
    assert_eq!(
        plan(&p, &layers, 2000 << 12, 12),
        Some(Step::IntoBase {
            inputs: vec![0, 2, 3, 4],
            fences: vec![1000]
        })
    );
}

#[test]
fn too_many_deltas_force_a_base_merge() {
    let mut layers = vec![shape(0, 100_000, 100_000)];
    for i in 0..=DELTAS_MAX as u64 {
        // Small deltas of distinct tiers would never merge among themselves.
        layers.push(shape(i, i + 1 + (1 << (2 * i)), 1 + (1 << (2 * i))));
    }
    let step = plan(&Policy::DEFAULT, &layers, 100_000 << 12, 12).unwrap();
    assert!(matches!(step, Step::IntoBase { .. }), "{step:?}");
}

#[test]
fn a_layer_disjoint_from_everything_older_sinks_into_the_base() {
    let layers = [shape(0, 100, 100), shape(50, 60, 10), shape(200, 300, 100)];
    assert_eq!(split(&layers), (vec![0, 2], vec![1]));
    let step = plan(&Policy::DEFAULT, &layers, 0, 12).unwrap();
    assert_eq!(
        step,
        Step::Sink {
            order: vec![0, 2, 1]
        }
    );
    assert_eq!(
        step.apply(&["a", "b", "c", "new"], vec![]),
        ["a", "c", "b", "new"]
    );
}

#[test]
fn apply_puts_outputs_where_the_oldest_input_was() {
    let s = Step::IntoBase {
        inputs: vec![1, 3, 4],
        fences: vec![],
    };
    assert_eq!(
        s.apply(&["a", "b", "c", "d", "e", "new"], vec!["x", "y"]),
        ["a", "x", "y", "c", "new"]
    );
    let s = Step::Deltas { start: 2, end: 4 };
    assert_eq!(s.apply(&["a", "b", "c", "d"], vec![]), ["a", "b"]);
}

#[test]
fn cuts_bound_data_pages_and_respect_fences() {
    // 10 data pages, a tombstone, 10 data pages; at most 8 data pages a layer.
    let ex = [(0, 10, true), (10, 5, false), (15, 10, true)];
    assert_eq!(cut_points(&ex, &[], 8), vec![8, 21]);
    // A fence at 12 (a base layer left out begins there; extents never enter it).
    let ex = [(0, 4, true), (20, 4, true)];
    assert_eq!(cut_points(&ex, &[12], 100), vec![20]);
    assert_eq!(cut_points(&ex, &[0, 50], 100), Vec::<u64>::new());
    assert_eq!(cut_points(&[], &[3], 1), Vec::<u64>::new());
}

#[test]
fn spans() {
    let mut s = Spans::default();
    s.add(10, 20);
    s.add(30, 40);
    assert!(s.intersects(15, 16) && s.intersects(0, 11) && s.intersects(39, 100));
    assert!(!s.intersects(20, 30) && !s.intersects(0, 10) && !s.intersects(40, 50));
    assert!(s.covers(10, 20) && !s.covers(10, 21));
    assert_eq!(s.missing(0, 50), vec![(0, 10), (20, 30), (40, 50)]);
    assert_eq!(s.missing(12, 35), vec![(20, 30)]);
    s.add(20, 30);
    assert_eq!(s.ranges(), 1);
    assert_eq!(s.missing(5, 45), vec![(5, 10), (40, 45)]);
}

#[test]
fn pacing_grows_with_depth_and_stops() {
    let mut d = Debt {
        read_depth: READ_DEPTH_MAX,
        ..Debt::default()
    };
    assert_eq!(Policy::DEFAULT.pace(&d), Pace::Free);
    d.read_depth = READ_DEPTH_SLOWDOWN + 1;
    let Pace::Slow(a) = Policy::DEFAULT.pace(&d) else {
        panic!()
    };
    d.read_depth = READ_DEPTH_STOP;
    let Pace::Slow(b) = Policy::DEFAULT.pace(&d) else {
        panic!()
    };
    assert!(a < b);
    d.read_depth = READ_DEPTH_STOP + 1;
    assert_eq!(Policy::DEFAULT.pace(&d), Pace::Stop);
    let d = Debt {
        stored_bytes: STORED_SLACK_BYTES + 7 * (100 << 20),
        live_bytes: 100 << 20,
        ..Debt::default()
    };
    assert_eq!(Policy::DEFAULT.pace(&d), Pace::Stop);
}

// ------------------------------------------------------------------ model

/// A model layer: page → Some(version) or None (tombstone).
type Model = BTreeMap<u64, Option<u64>>;
const BITS: u32 = 12;
const PAGES: u64 = 512;

fn small_policy() -> Policy {
    Policy {
        deltas_max: 4,
        base_merge_ratio: 1,
        stored_per_live_max: 2,
        stored_slack_bytes: 16 << BITS,
        base_partition_bytes: 64 << BITS,
        base_layers_coalesce: 4,
        tier_base_bytes: 4 << BITS,
        ..Policy::DEFAULT
    }
}

/// The policy's view of the model's layers (oldest first), told which layers share no page
/// with older ones, as the engine tells it.
fn model_shapes(layers: &[Model]) -> Vec<Shape> {
    let mut seen = std::collections::BTreeSet::new();
    layers
        .iter()
        .map(|m| {
            let data = m.values().filter(|v| v.is_some()).count() as u64;
            let pages_disjoint = m.keys().all(|k| !seen.contains(k));
            seen.extend(m.keys().copied());
            Shape {
                first: m.keys().next().copied().unwrap_or(0),
                end: m.keys().next_back().map_or(0, |k| k + 1),
                data_pages: data,
                bytes: (data << BITS) + 64 * m.len() as u64,
                pages_disjoint,
            }
        })
        .collect()
}

fn newest(layers: &[Model], page: u64) -> Option<u64> {
    layers
        .iter()
        .rev()
        .find_map(|l| l.get(&page))
        .copied()
        .flatten()
}

fn live_bytes(layers: &[Model]) -> u64 {
    (0..PAGES).filter(|&p| newest(layers, p).is_some()).count() as u64 * (1 << BITS)
}

fn run_step(p: &Policy, layers: &[Model], step: &Step) -> Vec<Model> {
    let inputs = step.inputs();
    let mut merged = Model::new();
    for &i in &inputs {
        merged.extend(layers[i].iter().map(|(&k, &v)| (k, v)));
    }
    if step.at_bottom() {
        merged.retain(|_, v| v.is_some());
    }
    let max = match step {
        Step::Deltas { .. } => u64::MAX,
        _ => p.base_partition_bytes >> BITS,
    };
    let ex: Vec<(u64, u64, bool)> = merged.iter().map(|(&k, v)| (k, 1, v.is_some())).collect();
    let cuts = cut_points(&ex, step.fences(), max);
    let mut outputs: Vec<Model> = Vec::new();
    let mut cur = Model::new();
    let mut next_cut = cuts.iter().peekable();
    for (k, v) in merged {
        if next_cut.peek().is_some_and(|&&c| c <= k) {
            next_cut.next();
            outputs.push(std::mem::take(&mut cur));
        }
        cur.insert(k, v);
    }
    if !cur.is_empty() {
        outputs.push(cur);
    }
    step.apply(layers, outputs)
}

#[derive(Debug, Clone)]
enum Write {
    Random(Vec<u64>),
    Sequential(u64, u64),
    Trim(u64, u64),
}

fn write_strategy() -> impl Strategy<Value = Write> {
    prop_oneof![
        4 => proptest::collection::vec(0..PAGES, 1..120).prop_map(Write::Random),
        2 => (0..PAGES, 1..200u64).prop_map(|(s, n)| Write::Sequential(s, n)),
        1 => (0..PAGES, 1..100u64).prop_map(|(s, n)| Write::Trim(s, n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// For random histories of checkpoints, compaction steps until the plan is empty; then the
    /// limits hold, and every page reads as the newest write (the model) says.
    #[test]
    fn limits_hold_and_the_image_is_unchanged(history in proptest::collection::vec(write_strategy(), 1..40)) {
        let p = small_policy();
        let mut layers: Vec<Model> = Vec::new();
        let mut image: BTreeMap<u64, u64> = BTreeMap::new();
        for (version, w) in history.into_iter().enumerate() {
            let version = version as u64;
            let mut l = Model::new();
            match w {
                Write::Random(pages) => for pg in pages {
                    l.insert(pg, Some(version));
                    image.insert(pg, version);
                },
                Write::Sequential(s, n) => for pg in s..(s + n).min(PAGES) {
                    l.insert(pg, Some(version));
                    image.insert(pg, version);
                },
                Write::Trim(s, n) => for pg in s..(s + n).min(PAGES) {
                    l.insert(pg, None);
                    image.remove(&pg);
                },
            }
            layers.push(l);
            let mut steps = 0;
            loop {
                let shapes = model_shapes(&layers);
                let Some(step) = plan(&p, &shapes, live_bytes(&layers), BITS) else { break };
                layers = run_step(&p, &layers, &step);
                steps += 1;
                prop_assert!(steps < 64, "compaction does not converge: {:?}", step);
            }
            let shapes = model_shapes(&layers);
            let debt = Debt::measure(&shapes, live_bytes(&layers));
            prop_assert!(debt.deltas <= p.deltas_max, "{debt:?}");
            prop_assert!(debt.read_depth <= p.deltas_max + 1, "{debt:?}");
            prop_assert!(!p.stored_past(&debt, p.stored_per_live_max), "{debt:?}");
            let span = shapes.iter().map(|s| s.end).max().unwrap_or(0)
                - shapes.iter().map(|s| s.first).min().unwrap_or(0);
            prop_assert!(debt.layers <= p.layers_limit(span << BITS), "{debt:?}");
            // Liveness of pacing: with nothing left for compaction to do, no writer waits.
            prop_assert_eq!(p.pace(&debt), Pace::Free, "{:?}", debt);
            for page in 0..PAGES {
                prop_assert_eq!(newest(&layers, page), image.get(&page).copied(), "page {}", page);
            }
        }
    }
}
