//! The service's audit log under operations: a restart over a large log serves without
//! reading it whole, rotation keeps one chain that `laneguard-audit verify` checks across
//! files, a published head detects a cut tail, a cut tail stops the service from extending
//! it, and an HMAC key is needed to verify a keyed chain. Real Envoy, the real filter and
//! the real service (issue 14, items 3 and 10).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_service::audit::{AuditLog, AuditOptions};
use laneguard_tests::{poll, test_policy, token, EnvoyOptions, RunDir, Service, Stack};
use std::path::Path;
use std::time::Duration;

fn audit_cli(args: &[&str]) -> (i32, String) {
    laneguard_tests::audit_cli(args).unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_restart_over_a_large_audit_log_verifies_nothing_before_serving() {
    let dir = RunDir::new("audit-large").unwrap();
    let log = dir.file("audit.log");
    // 40,000 records (about 10 MB) written by the service's own writer, as a busy day
    // would leave them.
    {
        let o = AuditLog::open_with(&log, AuditOptions::default()).unwrap();
        for b in 0..40 {
            let batch: Vec<String> = (0..1000)
                .map(|i| {
                    format!(
                        r#"{{"tenant":"northwind","principal":"erp","bucket":"class:integration","events":["limited"],"request_id":"req-{b}-{i}","pad":"{}"}}"#,
                        "x".repeat(120)
                    )
                })
                .collect();
            o.log.append(&batch).unwrap();
        }
    }
    let arg = log.display().to_string();
    let service = Service::start(&dir, &["--audit-log", &arg]).unwrap();
    let stderr = dir.file("service.stderr.log");
    let text = read(&stderr);
    assert!(
        text.contains("0 lines verified before serving"),
        "the service read the log before serving:\n{}",
        service.logs()
    );
    // The whole file is still verified, while serving.
    let verified = poll(Duration::from_secs(120), || {
        read(&stderr)
            .lines()
            .find(|l| l.contains("verified: 40000 records"))
            .map(str::to_string)
    });
    assert!(verified.is_some(), "{}", service.logs());
}

#[test]
fn rotated_files_keep_one_chain_and_a_published_head_detects_a_cut_tail() {
    let dir = RunDir::new("audit-rotate").unwrap();
    let log = dir.file("audit.log");
    let key = dir.file("audit.key");
    std::fs::write(&key, "an hmac key of more than sixteen bytes\n").unwrap();
    let (log_arg, key_arg) = (log.display().to_string(), key.display().to_string());
    let stack = Stack::start_in(
        dir.clone(),
        &test_policy("valid/operations.yaml").unwrap(),
        &[
            "--audit-log",
            &log_arg,
            "--audit-rotate-size",
            "4K",
            "--audit-hmac-key-file",
            &key_arg,
            "--audit-head-every-s",
            "1",
        ],
        EnvoyOptions::default(),
        |_| Ok(()),
    )
    .unwrap();
    // erp: a burst of 2, then 429s, each with an audit record (several hundred bytes).
    let erp = token("NORTHWIND_ERP").unwrap();
    for _ in 0..32 {
        stack.client.get_as("/orders/1", &erp, &[]).unwrap();
    }
    let stderr = dir.file("service.stderr.log");
    // The head the service publishes once all 30 records are in.
    let head = poll(Duration::from_secs(60), || {
        read(&stderr)
            .lines()
            .filter_map(|l| l.split_once("audit head: seq=30 hash="))
            .map(|(_, h)| h.trim().to_string())
            .next()
    })
    .unwrap_or_else(|| panic!("no published head for seq 30\n{}", stack.service.logs()));
    let files = laneguard_service::audit::segments(&log).unwrap();
    assert!(files.len() >= 2, "the log rotated: {files:?}");

    // The set verifies as one chain, with the key, and holds the published head.
    let (code, out) = audit_cli(&[
        "verify",
        "--hmac-key-file",
        &key_arg,
        "--expect-head",
        &head,
        &log_arg,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 30 records"), "{out}");
    assert!(out.contains(&format!("head {head}")), "{out}");
    // Without the key the chain does not verify.
    let (code, out) = audit_cli(&["verify", &log_arg]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("HMAC"), "{out}");

    // Cut the last line off the chain (the last file that has one): the chain alone
    // still verifies, the published head does not. (The service's refusal to extend a
    // cut active file is a unit test of the writer.)
    drop(stack);
    let all = laneguard_service::audit::segments(&log).unwrap();
    let last = all
        .iter()
        .rev()
        .find(|f| !read(f).is_empty())
        .unwrap()
        .clone();
    let text = read(&last);
    let lines: Vec<&str> = text.lines().collect();
    let kept = lines[..lines.len() - 1].join("\n");
    std::fs::write(&last, if kept.is_empty() { kept } else { kept + "\n" }).unwrap();
    let (code, out) = audit_cli(&["verify", "--hmac-key-file", &key_arg, &log_arg]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 29 records"), "{out}");
    let (code, out) = audit_cli(&[
        "verify",
        "--hmac-key-file",
        &key_arg,
        "--expect-head",
        &head,
        &log_arg,
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cut off the end"), "{out}");

    // A rotated file edited: verify names that file and line.
    let first = &files[0];
    let t = read(first);
    std::fs::write(
        first,
        t.replacen("\"principal\":\"erp\"", "\"principal\":\"web\"", 1),
    )
    .unwrap();
    let (code, out) = audit_cli(&["verify", "--hmac-key-file", &key_arg, &log_arg]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("{}: line 1", first.display())),
        "{out}"
    );
}
