//! Invalid policies are rejected with the path of the mistake, by the one parser
//! (`laneguard_core::policy::parse`) and by Envoy itself, which must refuse to serve under
//! a broken policy.
//!
//! The corpus is `tests/policies/invalid/*.yaml`: the demo policy with one mistake each,
//! every file starting with `# expect: <path>`, the path the error must name.

// Test code: a failed unwrap or panic is a failed test (clippy.toml allows them inside
// #[test] functions; this extends that to the helpers of this file).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::{
    config, demo_config, demo_policy, repo_root, DemoPorts, Envoy, EnvoyOptions,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

fn corpus(dir: &str) -> Vec<(PathBuf, String)> {
    let dir = repo_root().join("tests/policies").join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, text)
        })
        .collect()
}

/// The `# expect: PATH` header of a corpus file.
fn expected_path(text: &str) -> Option<&str> {
    text.lines()
        .next()?
        .strip_prefix("# expect:")
        .map(str::trim)
}

#[test]
fn every_invalid_policy_is_rejected_naming_its_path() {
    let files = corpus("invalid");
    assert!(
        files.len() >= 15,
        "the corpus needs at least 15 files, has {}",
        files.len()
    );
    let mut failures = Vec::new();
    for (path, text) in &files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(expect) = expected_path(text) else {
            failures.push(format!("{name}: first line must be `# expect: <path>`"));
            continue;
        };
        match laneguard_core::policy::parse(text) {
            Ok(_) => failures.push(format!(
                "{name}: accepted, expected an error naming {expect:?}"
            )),
            Err(e) => {
                let shown = e.to_string();
                eprintln!("{name}: {shown}");
                if !shown.contains(expect) {
                    failures.push(format!("{name}: error {shown:?} does not name {expect:?}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} corpus files failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn each_invalid_policy_differs_from_the_demo_policy_once() {
    // One mistake each: the file is the demo policy with a small edit, so a failing file
    // points at exactly one rule. (Guards the corpus against drifting into many changes.)
    let demo = demo_policy().expect("the demo policy");
    let demo_lines: Vec<&str> = demo
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    for (path, text) in corpus("invalid") {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        // Lines added plus lines removed, counting repeated lines as often as they occur.
        let mut count: HashMap<&str, i64> = HashMap::new();
        for l in &lines {
            *count.entry(l).or_default() += 1;
        }
        for l in &demo_lines {
            *count.entry(l).or_default() -= 1;
        }
        let changed: i64 = count.values().map(|c| c.abs()).sum();
        assert!(
            (1..=12).contains(&changed),
            "{}: {changed} lines differ from the demo policy; keep one mistake per file",
            path.display()
        );
    }
}

#[test]
fn the_demo_policy_and_every_valid_policy_parse() {
    let demo = demo_policy().expect("the policy in envoy/demo/envoy.yaml");
    if let Err(e) = laneguard_core::policy::parse(&demo) {
        panic!("the demo policy in envoy/demo/envoy.yaml is invalid: {e}");
    }
    let files = corpus("valid");
    assert!(!files.is_empty(), "tests/policies/valid/ is empty");
    for (path, text) in files {
        if let Err(e) = laneguard_core::policy::parse(&text) {
            panic!("{} is invalid: {e}", path.display());
        }
    }
}

/// The corpus file that goes through Envoy: a reserve of zero requests per minute.
const THROUGH_ENVOY: &str = "03-zero-rate.yaml";

#[test]
fn envoy_refuses_to_serve_under_an_invalid_policy() {
    let text = std::fs::read_to_string(
        repo_root()
            .join("tests/policies/invalid")
            .join(THROUGH_ENVOY),
    )
    .expect("reading the corpus file");
    let expect = expected_path(&text).expect("# expect header").to_string();

    // No service or upstream is needed: Envoy must refuse before anything is routed. The
    // clusters point at a port nothing listens on, so a request that got through anyway
    // would show up as a 503 from the router, never a 200.
    let mut cfg = demo_config().expect("demo config");
    config::rewrite_demo(
        &mut cfg,
        &DemoPorts {
            service: 1,
            upstream: 1,
        },
    )
    .expect("rewrite");
    config::set_policy(&mut cfg, &text).expect("set policy");

    let outcome = Envoy::start_expecting_failure(
        "bad_policy-envoy",
        &cfg,
        EnvoyOptions::default(),
        Duration::from_secs(30),
    )
    .expect("running Envoy");

    let context = format!(
        "outcome: exit {:?}, became LIVE: {}, listeners {:?}, served {:?}\n--- Envoy log ---\n{}\n(logs in {})",
        outcome.status,
        outcome.became_live,
        outcome.listeners,
        outcome.served,
        last_lines(&outcome.log, 60),
        outcome.dir.display()
    );
    // Envoy refuses the configuration: it exits non-zero, or it never becomes LIVE with
    // the gateway listener.
    let refused = match outcome.status {
        Some(status) => !status.success(),
        None => !(outcome.became_live && outcome.listeners.contains_key("gateway")),
    };
    assert!(refused, "Envoy accepted an invalid policy\n{context}");
    assert!(
        outcome.served.iter().all(|(_, status)| *status != 200),
        "a request was served under an invalid policy\n{context}"
    );
    assert!(
        outcome.log.contains(&expect),
        "Envoy's log does not name the bad field {expect:?}\n{context}"
    );
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
