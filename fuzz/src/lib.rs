//! Fuzzing on the stable toolchain (issue 12 §2; `docs/fuzzing.md`).
//!
//! `cargo fuzz` and libFuzzer need a nightly compiler, which this project does not use. The
//! targets are therefore property tests driven by this runner: a proptest [`Strategy`]
//! generates inputs (structure-aware: YAML documents, header sets, gRPC requests, log lines,
//! and mutations of real fixtures), the runner feeds them to a check for a bounded number of
//! cases or a bounded time, catches panics, and on the first failure shrinks the input to a
//! small one and fails with it. It is random, not coverage-guided.
//!
//! Each target is a `#[test]` next to the code it exercises. [`Budget::from_env`] gives the
//! short, fixed-seed version that `make test` runs (a few hundred cases), or, with
//! `FUZZ_SECONDS` set (`make fuzz`), a timed run with a fresh seed. Every run prints one line
//! `fuzz NAME: N executions in S s (R/s), seed X` and, with `FUZZ_REPORT=FILE`, appends it
//! there as JSON.

use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use std::fmt::Debug;
use std::io::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

pub mod gen;

/// How long a target runs.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    /// This many inputs, from a fixed seed (deterministic: `make test`).
    Cases(u64),
    /// As many inputs as fit, from a fresh seed (`make fuzz`).
    Time(Duration),
}

impl Budget {
    /// `FUZZ_SECONDS` set: that many seconds; otherwise `cases` inputs.
    pub fn from_env(cases: u64) -> Budget {
        match std::env::var("FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            Some(s) => Budget::Time(Duration::from_secs(s.max(1))),
            None => Budget::Cases(cases),
        }
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Report {
    pub name: String,
    pub executions: u64,
    pub elapsed: Duration,
    pub seed: u64,
}

impl Report {
    pub fn per_second(&self) -> f64 {
        self.executions as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A check's verdict on one input: `Err` says what property failed.
pub type Outcome = Result<(), String>;

fn run_one<T>(check: &impl Fn(&T) -> Outcome, input: &T) -> Outcome {
    match catch_unwind(AssertUnwindSafe(|| check(input))) {
        Ok(r) => r,
        Err(p) => Err(format!(
            "panicked: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

fn seed_for(budget: Budget) -> u64 {
    if let Some(s) = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()) {
        return s;
    }
    match budget {
        Budget::Cases(_) => 0x1a9e_6a4d,
        Budget::Time(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

/// Run `check` on inputs from `strategy` within `budget`. On a failure, shrink the input
/// and return the smallest failing one with what failed (the target's test then fails with
/// it; keep it as a regression test).
pub fn fuzz<S>(
    name: &str,
    budget: Budget,
    strategy: S,
    check: impl Fn(&S::Value) -> Outcome,
) -> Result<Report, String>
where
    S: Strategy,
    S::Value: Debug,
{
    let seed = seed_for(budget);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    let start = Instant::now();
    let mut executions = 0u64;
    loop {
        let done = match budget {
            Budget::Cases(n) => executions >= n,
            Budget::Time(d) => start.elapsed() >= d,
        };
        if done {
            break;
        }
        let mut tree = strategy
            .new_tree(&mut runner)
            .map_err(|e| format!("fuzz {name}: cannot generate an input: {e}"))?;
        executions += 1;
        let Err(first) = run_one(&check, &tree.current()) else {
            continue;
        };
        // Shrink: simplify while it still fails, step back when it stops failing.
        let mut smallest = (format!("{:?}", tree.current()), first);
        for _ in 0..2_000 {
            if !tree.simplify() {
                break;
            }
            loop {
                match run_one(&check, &tree.current()) {
                    Err(e) => {
                        smallest = (format!("{:?}", tree.current()), e);
                        break;
                    }
                    Ok(()) if tree.complicate() => continue,
                    Ok(()) => break,
                }
            }
        }
        return Err(format!(
            "fuzz {name}: failed after {executions} executions (seed {seed}; rerun with FUZZ_SEED={seed})\n\
             property: {}\ninput (shrunk): {}",
            smallest.1, smallest.0
        ));
    }
    let report = Report {
        name: name.to_string(),
        executions,
        elapsed: start.elapsed(),
        seed,
    };
    println!(
        "fuzz {}: {} executions in {:.1} s ({:.0}/s), seed {}",
        report.name,
        report.executions,
        report.elapsed.as_secs_f64(),
        report.per_second(),
        report.seed
    );
    if let Ok(path) = std::env::var("FUZZ_REPORT") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(
                f,
                "{{\"target\":\"{}\",\"executions\":{},\"seconds\":{:.3},\"per_second\":{:.1},\"seed\":{}}}",
                report.name,
                report.executions,
                report.elapsed.as_secs_f64(),
                report.per_second(),
                report.seed
            );
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The runner can fail: a planted bug is found and shrunk to its smallest input.
    #[test]
    fn a_planted_panic_is_found_and_shrunk() {
        let r = fuzz(
            "planted",
            Budget::Cases(10_000),
            proptest::collection::vec(any::<u8>(), 0..64),
            |v: &Vec<u8>| {
                if v.iter().filter(|&&b| b > 200).count() >= 2 {
                    panic!("two big bytes");
                }
                Ok(())
            },
        );
        let err = r.expect_err("the planted panic is found");
        assert!(err.contains("panicked: two big bytes"), "{err}");
        assert!(err.contains("input (shrunk): [201, 201]"), "{err}");
    }

    #[test]
    fn a_clean_target_reports_its_executions() {
        let r = fuzz("clean", Budget::Cases(100), any::<u32>(), |_| Ok(())).unwrap();
        assert_eq!(r.executions, 100);
    }
}
