//! What a hostile client can put into the logs (issue 14, items 6, 7 and 9), through real
//! Envoy (jwt_authn with tokens minted for odd claims), the filter and the service's audit
//! log.
//!
//! - A user id (the `sub` claim) such as `auth0|5f7c`, or with `+`, a space or non-ASCII, is
//!   served and gets its own user bucket.
//! - A 50 kB `x-traffic-class` reaches no log whole: the access log, Envoy's log and the
//!   audit log carry at most 256 bytes of it, and `laneguard.oversized_declared` counts it.
//! - A tenant claim with a newline and `audit={...}` is refused (400), logged on one line with
//!   the newline escaped, and the docs/operations.md recipe finds no forged record.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::{demo_policy, mint_token, repo_root, token, EnvoyOptions, RunDir, Stack};
use std::time::{Duration, Instant};

fn stack(label: &str, audit_log: bool) -> (Stack, RunDir) {
    let dir = RunDir::new(label).unwrap();
    let log = dir.file("audit.log").display().to_string();
    let args: Vec<&str> = if audit_log {
        vec!["--audit-log", &log]
    } else {
        Vec::new()
    };
    let stack = Stack::start_in(
        dir.clone(),
        &demo_policy().unwrap(),
        &args,
        EnvoyOptions::default(),
        |_| Ok(()),
    )
    .unwrap();
    (stack, dir)
}

/// Poll (bounded) until `f` returns something.
fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The python program of the docs/operations.md recipe that extracts audit records from the
/// access log (the block after `<!-- recipe: access-log-records`), run on `access_log`.
/// Returns (exit code, stdout, stderr).
fn docs_recipe(access_log: &str) -> (i32, String, String) {
    let docs = std::fs::read_to_string(repo_root().join("docs/operations.md")).unwrap();
    let after = docs
        .split_once("<!-- recipe: access-log-records")
        .expect("docs/operations.md has the access-log-records recipe")
        .1;
    let program = after
        .split_once("python3 -c '")
        .and_then(|(_, p)| p.split_once("\n' <"))
        .map(|(p, _)| p)
        .expect("the recipe is `python3 -c '...' < FILE`");
    let mut child = std::process::Command::new("python3")
        .args(["-c", program])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(access_log.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The records the docs recipe finds in `access_log` (it must succeed), and its output.
fn recipe_records(access_log: &str, ctx: &str) -> (Vec<serde_json::Value>, String) {
    let (code, out, err) = docs_recipe(access_log);
    assert_eq!(code, 0, "{err}\n{ctx}");
    let recs = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (recs, out)
}

/// Item 6: opaque user ids are served, each with its own user bucket.
#[test]
fn user_ids_from_real_identity_providers_are_served() {
    let (stack, _dir) = stack("log-users", false);
    for sub in [
        "auth0|5f7c",
        "ana+billing@example.com",
        "Ana María",
        "用户-42",
    ] {
        let t = mint_token("northwind", "web", sub).unwrap();
        let r = stack.client.get_as("/orders/1", &t, &[]).unwrap();
        let ctx = format!("sub {sub:?}: {}\n{}", r.describe(), stack.logs());
        assert_eq!(r.status, 200, "{ctx}");
        // The user bucket is this user's own: 100/min, burst 40, one spent.
        let state = r.header("ratelimit").unwrap_or_default();
        assert!(state.contains("\"user\";r=39"), "{ctx}");
    }
    // Over the bound (256 bytes) or with a control character: a clear 400.
    for sub in ["u".repeat(257), "tab\there".to_string()] {
        let t = mint_token("northwind", "web", &sub).unwrap();
        let r = stack.client.get_as("/orders/1", &t, &[]).unwrap();
        let ctx = format!("sub {sub:?}: {}\n{}", r.describe(), stack.logs());
        assert_eq!(r.status, 400, "{ctx}");
        assert_eq!(r.json().unwrap()["error"], "invalid_identity", "{ctx}");
    }
}

/// Item 7: a 50 kB declared class is clipped in every log and counted.
#[test]
fn a_huge_declared_class_is_clipped_in_every_log_and_counted() {
    let (stack, dir) = stack("log-oversized", true);
    let web = token("NORTHWIND_WEB").unwrap();
    let huge = format!("integration{}", "x".repeat(50_000));
    let n = 3;
    for _ in 0..n {
        let r = stack
            .client
            .get_as("/orders/1", &web, &[("x-traffic-class", &huge)])
            .unwrap();
        // A forged class: served as the principal's default, with a record.
        assert_eq!(r.status, 200, "{}\n{}", r.describe(), stack.logs());
    }
    let counted = stack
        .envoy
        .counter_sum("laneguard", "laneguard.oversized_declared")
        .unwrap();
    assert_eq!(counted, n, "{}", stack.logs());
    let audit = dir.file("audit.log");
    let records = poll(Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        (text.lines().count() >= n as usize).then_some(text)
    })
    .unwrap_or_else(|| panic!("no audit records reached the service\n{}", stack.logs()));
    let access = poll(Duration::from_secs(10), || {
        let text = stack.envoy.access_log();
        (text.lines().count() >= n as usize).then_some(text)
    })
    .unwrap();
    for (what, text) in [
        ("access log", access.as_str()),
        ("envoy log", &stack.envoy.log()),
        ("audit log", records.as_str()),
    ] {
        let longest = text.lines().map(str::len).max().unwrap_or(0);
        assert!(
            longest < 4_000,
            "{what}: a line of {longest} bytes carries the 50 kB header"
        );
        assert!(
            !text.contains(&"x".repeat(300)),
            "{what} holds the value whole"
        );
    }
    let per_request = access.len() / n as usize;
    eprintln!("log-oversized: {per_request} bytes of access log per request");
    let (recs, out) = recipe_records(&access, "");
    assert_eq!(recs.len(), n as usize, "{out}");
    for rec in &recs {
        let declared = rec["class"]["declared"].as_str().unwrap();
        assert!(declared.starts_with("integrationxxx"), "{declared}");
        assert!(
            declared.len() <= 256 && declared.ends_with('…'),
            "{declared}"
        );
        assert_eq!(rec["class"]["forged"], true);
    }
}

/// Item 9: a tenant claim that tries to forge an audit record in the access log.
#[test]
fn a_claim_with_a_newline_cannot_forge_an_access_log_record() {
    let (stack, _dir) = stack("log-injection", false);
    let forged_record =
        r#"{"tenant":"forged","events":["limited"],"bucket":"class:integration","status":429}"#;
    let tenant = format!("northwind\naudit={forged_record}");
    let t = mint_token(&tenant, "web", "alice").unwrap();
    let r = stack.client.get_as("/orders/1", &t, &[]).unwrap();
    assert_eq!(r.status, 400, "{}\n{}", r.describe(), stack.logs());
    assert_eq!(r.json().unwrap()["error"], "invalid_identity");
    // And one real record next to it: a forged class, served.
    let web = token("NORTHWIND_WEB").unwrap();
    let r = stack
        .client
        .get_as("/orders/1", &web, &[("x-traffic-class", "repair")])
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
    let access = poll(Duration::from_secs(10), || {
        let text = stack.envoy.access_log();
        (text.lines().count() >= 2).then_some(text)
    })
    .unwrap();
    let ctx = format!("access log:\n{access}\n{}", stack.logs());
    assert_eq!(access.lines().count(), 2, "one line per request\n{ctx}");
    for line in access.lines() {
        assert!(
            line.starts_with('['),
            "a line that is not a request: {line:?}\n{ctx}"
        );
    }
    let refused = access.lines().find(|l| l.contains("\" 400 ")).unwrap();
    assert!(
        refused.contains("tenant=northwind%0Aaudit={%22tenant%22:%22forged%22"),
        "the claim is logged escaped: {refused}\n{ctx}"
    );
    assert!(refused.ends_with("audit=-"), "{refused}\n{ctx}");
    // The documented recipe parses records: exactly the real one, nothing forged.
    let (recs, out) = recipe_records(&access, &ctx);
    assert_eq!(recs.len(), 1, "{out}\n{ctx}");
    assert_eq!(recs[0]["tenant"], "northwind");
    assert_eq!(recs[0]["class"]["declared"], "repair");
    // A line that is not of the format makes the recipe fail loudly, not pass it on.
    let (code, _, err) = docs_recipe(&format!("{access}audit={forged_record}\n"));
    assert_ne!(code, 0, "the recipe must refuse a foreign line");
    assert!(err.contains("line 3"), "{err}");
}

/// A client that forges its class on every request writes about one warning a second, not
/// one a request: any caller can send the header, and Envoy's log is shared with every other
/// tenant. Each forgery is still counted (`forged_class`), and the line says how many like it
/// it held back.
#[test]
fn a_forged_class_flood_writes_one_warning_a_second_not_one_a_request() {
    // The leases test policy: web's class has no queue fallback, so a refusal is at once.
    let stack = Stack::start(
        "log-forged-flood",
        &laneguard_tests::test_policy("valid/leases.yaml").unwrap(),
    )
    .unwrap();
    let web = token("NORTHWIND_WEB").unwrap();
    let started = Instant::now();
    let mut sent = 0u64;
    // Past two seconds, so that a second line says how many the first held back; bounded.
    while sent < 3_000 && started.elapsed() < Duration::from_millis(2_500) {
        let r = stack
            .client
            .get_as("/orders/1", &web, &[("x-traffic-class", "repair")])
            .unwrap();
        assert!(
            matches!(r.status, 200 | 429),
            "{}\n{}",
            r.describe(),
            stack.logs()
        );
        sent += 1;
    }
    let seconds = started.elapsed().as_secs() + 1;
    let forged = poll(Duration::from_secs(5), || {
        let n = stack
            .envoy
            .counter_sum("laneguard", "laneguard.forged_class")
            .unwrap();
        (n >= sent).then_some(n)
    })
    .unwrap_or_else(|| panic!("not every forgery was counted\n{}", stack.logs()));
    assert_eq!(forged, sent);
    let log = stack.envoy.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("laneguard: forged class:"))
        .collect();
    // One worker VM: at most one line a second, plus one for a second boundary.
    assert!(
        !warnings.is_empty() && warnings.len() as u64 <= seconds + 1,
        "{} warnings for {sent} forged requests in {seconds} s:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    assert!(
        sent > 10 * warnings.len() as u64,
        "the flood must be much larger than the lines for the test to mean anything: {sent}"
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("more like it since the last such line")),
        "{sent} forgeries and no warning says how many were held back:\n{}",
        warnings.join("\n")
    );
}
