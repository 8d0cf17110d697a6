//! Input generators shared by the targets: YAML documents and mutations of fixtures, text
//! lines, header sets. Each is a proptest [`Strategy`], so a failing input shrinks.

use proptest::prelude::*;
use serde_yaml::{Mapping, Value};

/// A scalar: the awkward ones a parser meets (0, negatives, huge, floats, empty, long,
/// unicode, booleans, null) and words from `vocab` (field and class names).
pub fn scalar(vocab: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(1),
            Just(i64::from(u32::MAX)),
            Just(i64::from(u32::MAX) + 1),
            Just(i64::MAX),
            Just(i64::MIN),
            any::<i64>(),
            0i64..100_000,
        ]
        .prop_map(|n| Value::Number(n.into())),
        prop_oneof![
            Just(0.5f64),
            Just(-0.0),
            Just(1e300),
            Just(f64::NAN),
            any::<f64>()
        ]
        .prop_map(|f| Value::Number(f.into())),
        proptest::sample::select(vocab).prop_map(|s| Value::String(s.to_string())),
        ".{0,12}".prop_map(Value::String),
        (200usize..300).prop_map(|n| Value::String("a".repeat(n))),
    ]
}

/// Any YAML value up to a small depth, with keys from `vocab`.
pub fn value(vocab: &'static [&'static str]) -> impl Strategy<Value = Value> {
    scalar(vocab).prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Sequence),
            proptest::collection::vec((key(vocab), inner), 0..6).prop_map(|kv| {
                let mut m = Mapping::new();
                for (k, v) in kv {
                    m.insert(k, v);
                }
                Value::Mapping(m)
            }),
        ]
    })
}

fn key(vocab: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => proptest::sample::select(vocab).prop_map(|s| Value::String(s.to_string())),
        1 => "[a-z_]{1,10}".prop_map(Value::String),
        1 => any::<i32>().prop_map(|n| Value::Number(n.into())),
    ]
}

/// A whole document: a mapping whose keys are mostly `vocab` words, rendered as YAML.
pub fn document(vocab: &'static [&'static str]) -> impl Strategy<Value = String> {
    proptest::collection::vec((key(vocab), value(vocab)), 0..10).prop_map(|kv| {
        let mut m = Mapping::new();
        for (k, v) in kv {
            m.insert(k, v);
        }
        serde_yaml::to_string(&Value::Mapping(m)).unwrap_or_default()
    })
}

/// One edit of a YAML tree, applied at the node numbered `at` (in pre-order, modulo the
/// number of nodes).
#[derive(Clone, Debug)]
pub enum Edit {
    Replace(u32, Value),
    Remove(u32),
    /// Insert a key (into a mapping) or an element (into a sequence).
    Insert(u32, Value, Value),
    /// Duplicate a sequence's element, or wrap the node in a list.
    Duplicate(u32),
}

pub fn edit(vocab: &'static [&'static str]) -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<u32>(), value(vocab)).prop_map(|(a, v)| Edit::Replace(a, v)),
        2 => any::<u32>().prop_map(Edit::Remove),
        2 => (any::<u32>(), key(vocab), value(vocab)).prop_map(|(a, k, v)| Edit::Insert(a, k, v)),
        1 => any::<u32>().prop_map(Edit::Duplicate),
    ]
}

fn count(v: &Value) -> u32 {
    1 + match v {
        Value::Sequence(s) => s.iter().map(count).sum(),
        Value::Mapping(m) => m.values().map(count).sum(),
        Value::Tagged(t) => count(&t.value),
        _ => 0,
    }
}

/// Apply `e` to the node numbered `*at` below `v` (counting down); true once applied.
fn apply_at(v: &mut Value, at: &mut u32, e: &Edit) -> bool {
    if *at == 0 {
        match e {
            Edit::Replace(_, new) => *v = new.clone(),
            Edit::Remove(_) => match v {
                Value::Mapping(m) if !m.is_empty() => {
                    let k = m.keys().next().cloned();
                    if let Some(k) = k {
                        m.remove(&k);
                    }
                }
                Value::Sequence(s) if !s.is_empty() => {
                    s.pop();
                }
                _ => *v = Value::Null,
            },
            Edit::Insert(_, k, new) => match v {
                Value::Mapping(m) => {
                    m.insert(k.clone(), new.clone());
                }
                Value::Sequence(s) => s.push(new.clone()),
                _ => *v = new.clone(),
            },
            Edit::Duplicate(_) => match v {
                Value::Sequence(s) if !s.is_empty() => {
                    let first = s[0].clone();
                    s.push(first);
                }
                other => *other = Value::Sequence(vec![other.clone(), other.clone()]),
            },
        }
        return true;
    }
    *at -= 1;
    match v {
        Value::Sequence(s) => s.iter_mut().any(|c| apply_at(c, at, e)),
        Value::Mapping(m) => m.values_mut().any(|c| apply_at(c, at, e)),
        Value::Tagged(t) => apply_at(&mut t.value, at, e),
        _ => false,
    }
}

/// `fixture` with `edits` applied, as YAML text.
pub fn apply(fixture: &Value, edits: &[Edit]) -> String {
    let mut v = fixture.clone();
    for e in edits {
        let (Edit::Replace(a, ..) | Edit::Remove(a) | Edit::Insert(a, ..) | Edit::Duplicate(a)) = e;
        let mut at = a % count(&v);
        apply_at(&mut v, &mut at, e);
    }
    serde_yaml::to_string(&v).unwrap_or_default()
}

/// Mutations of one of `fixtures` (valid documents): 1 to 4 tree edits.
pub fn mutated(
    fixtures: Vec<Value>,
    vocab: &'static [&'static str],
) -> impl Strategy<Value = String> {
    let n = fixtures.len().max(1);
    (0..n, proptest::collection::vec(edit(vocab), 1..5)).prop_map(move |(i, edits)| {
        fixtures
            .get(i)
            .map(|f| apply(f, &edits))
            .unwrap_or_default()
    })
}

/// Byte-level damage to a text: up to 4 flips, insertions or cuts (bytes that are no longer
/// UTF-8 become U+FFFD).
pub fn damaged(texts: Vec<String>) -> impl Strategy<Value = String> {
    let n = texts.len().max(1);
    (
        0..n,
        proptest::collection::vec((any::<u32>(), any::<u8>(), 0u8..3), 1..5),
    )
        .prop_map(move |(i, edits)| {
            let mut b = texts.get(i).cloned().unwrap_or_default().into_bytes();
            for (at, byte, op) in edits {
                let len = b.len().max(1);
                let at = at as usize % len;
                match op {
                    0 if at < b.len() => b[at] = byte,
                    1 => b.insert(at.min(b.len()), byte),
                    _ => b.truncate(at),
                }
            }
            String::from_utf8_lossy(&b).into_owned()
        })
}

/// Text for a line reader: JSON-ish fragments from `vocab`, arbitrary unicode, control
/// characters, and very long runs.
pub fn line(vocab: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        2 => value(vocab).prop_map(|v| serde_yaml::to_string(&v)
            .map(|s| s.replace('\n', " "))
            .unwrap_or_default()),
        2 => proptest::collection::vec(
            prop_oneof![
                proptest::sample::select(vocab).prop_map(str::to_string),
                Just("{".to_string()), Just("}".to_string()), Just("[".to_string()),
                Just("]".to_string()), Just("\"".to_string()), Just(":".to_string()),
                Just(",".to_string()), Just(" ".to_string()), Just("=".to_string()),
                Just("\\".to_string()), Just("null".to_string()), Just("-1".to_string()),
                Just("18446744073709551616".to_string()), Just("1e999".to_string()),
                ".{0,3}",
            ],
            0..40,
        ).prop_map(|parts| parts.concat()),
        1 => any::<String>(),
        1 => "[\\x00-\\x1f\\x7f]{0,20}",
        1 => (10_000usize..20_000).prop_map(|n| "x".repeat(n)),
    ]
}
