//! The soak (`make soak`, not part of `make test`): the whole stack on the Redis store, Envoy
//! with 2 workers, for SOAK_SECONDS (default 600). Mixed traffic from 4 connections: half
//! from 50 steady tenants (so their buckets are leased and renewed), half from tenants never
//! seen before (so the filter's bucket tables fill to their cap and evict), over every
//! principal of the policy, with random users. The service is killed and restarted in the
//! middle. Identity headers are sent directly (`jwt_authn` and `header_mutation` removed).
//!
//! It prints, after the warm-up (a fifth of the run) and at the end: Envoy's RSS and heap
//! (admin `/memory`), the filter's bucket count over all VMs (`laneguard.buckets`), the
//! service's RSS, Redis's key count. Memory figures are printed, not asserted (they are
//! benchmarks); what is asserted is that nothing failed: every request got an answer with a
//! status the policy can give.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::config::remove_http_filter;
use laneguard_tests::{test_policy, Client, EnvoyOptions, RedisServer, RunDir, Stack};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PRINCIPALS: [&str; 5] = ["web", "erp", "recon", "support", "export"];

/// RSS in KiB of every process in process group `pgid` (Envoy, or a wrapper and Envoy).
fn group_rss_kib(pgid: u32) -> u64 {
    let mut total = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2).and_then(|p| p.parse::<u32>().ok()) == Some(pgid) {
            total += rss_kib(&path);
        }
    }
    total
}

fn rss_kib(proc_dir: &std::path::Path) -> u64 {
    std::fs::read_to_string(proc_dir.join("status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

struct Sample {
    at: Duration,
    envoy_rss_kib: u64,
    envoy_allocated: u64,
    envoy_heap: u64,
    buckets: u64,
    service_rss_kib: u64,
    redis_keys: u64,
    requests: u64,
}

fn sample(stack: &Stack, redis: &RedisServer, at: Duration, requests: u64) -> Sample {
    let memory = stack
        .envoy
        .admin()
        .get("/memory", &[])
        .ok()
        .and_then(|r| r.json().ok())
        .unwrap_or(serde_json::Value::Null);
    let num = |k: &str| {
        memory[k]
            .as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| memory[k].as_u64())
            .unwrap_or(0)
    };
    let gauge = stack
        .envoy
        .stats("laneguard.buckets")
        .unwrap_or_default()
        .iter()
        .filter(|(k, _)| k.ends_with("laneguard.buckets"))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum();
    Sample {
        at,
        envoy_rss_kib: group_rss_kib(stack.envoy.pid()),
        envoy_allocated: num("allocated"),
        envoy_heap: num("heap_size"),
        buckets: gauge,
        service_rss_kib: stack
            .service
            .pid()
            .map(|p| rss_kib(&std::path::Path::new("/proc").join(p.to_string())))
            .unwrap_or(0),
        redis_keys: redis.key_count().unwrap_or(0),
        requests,
    }
}

fn growth(a: u64, b: u64) -> String {
    if a == 0 {
        return "n/a".into();
    }
    format!("{:+.1}%", (b as f64 - a as f64) / a as f64 * 100.0)
}

#[test]
#[ignore = "long: make soak (SOAK_SECONDS, default 600)"]
fn soak_mixed_traffic_with_a_service_restart() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let total = Duration::from_secs(seconds);
    let dir = RunDir::new("soak").unwrap();
    let redis = RedisServer::start(&dir).unwrap();
    let url = redis.url();
    let mut stack = Stack::start_in(
        dir,
        &test_policy("valid/fast.yaml").unwrap(),
        &["--store", &url, "--redis-timeout-ms", "100"],
        EnvoyOptions {
            concurrency: 2,
            ..EnvoyOptions::default()
        },
        |cfg| {
            remove_http_filter(cfg, "envoy.filters.http.header_mutation")?;
            remove_http_filter(cfg, "envoy.filters.http.jwt_authn")
        },
    )
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let (stop, sent) = (stop.clone(), sent.clone());
            let client = Client::new(stack.client.base().to_string());
            std::thread::spawn(move || {
                let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (w + 1);
                let mut fresh: u64 = 0;
                while !stop.load(Ordering::SeqCst) {
                    // xorshift: cheap, deterministic per worker.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let tenant = if x % 2 == 0 {
                        format!("steady{}", x % 50)
                    } else {
                        fresh += 1;
                        format!("new{w}-{fresh}")
                    };
                    let principal = PRINCIPALS[(x >> 8) as usize % PRINCIPALS.len()];
                    let user = format!("u{}", (x >> 16) % 1000);
                    let path = if principal == "export" {
                        "/exports/daily"
                    } else {
                        "/orders/1"
                    };
                    let status = client
                        .get(
                            path,
                            &[
                                ("x-laneguard-tenant", &tenant),
                                ("x-laneguard-principal", principal),
                                ("x-laneguard-user", &user),
                            ],
                        )
                        .map(|r| r.status)
                        .unwrap_or(0);
                    *statuses.entry(status).or_default() += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                statuses
            })
        })
        .collect();

    let warm = total / 5;
    let restart_at = total / 2;
    std::thread::sleep(warm);
    let first = sample(
        &stack,
        &redis,
        start.elapsed(),
        sent.load(Ordering::Relaxed),
    );
    let left = restart_at.saturating_sub(start.elapsed());
    std::thread::sleep(left);
    stack.service.stop();
    std::thread::sleep(Duration::from_secs(2));
    stack.service.restart().unwrap();
    let left = total.saturating_sub(start.elapsed());
    std::thread::sleep(left);
    let last = sample(
        &stack,
        &redis,
        start.elapsed(),
        sent.load(Ordering::Relaxed),
    );
    stop.store(true, Ordering::SeqCst);
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for h in workers {
        for (k, v) in h.join().unwrap() {
            *statuses.entry(k).or_default() += v;
        }
    }

    println!("soak: {seconds} s, Redis store, Envoy 2 workers, service restarted at {restart_at:?}; statuses {statuses:?}");
    println!(
        "| figure | after warm-up ({:?}) | end ({:?}) | growth |",
        first.at, last.at
    );
    println!("|---|---:|---:|---:|");
    let rows = [
        ("requests sent", first.requests, last.requests),
        ("Envoy RSS, KiB", first.envoy_rss_kib, last.envoy_rss_kib),
        (
            "Envoy allocated (admin /memory), bytes",
            first.envoy_allocated,
            last.envoy_allocated,
        ),
        ("Envoy heap_size, bytes", first.envoy_heap, last.envoy_heap),
        (
            "filter buckets, all VMs (laneguard.buckets)",
            first.buckets,
            last.buckets,
        ),
        (
            "service RSS, KiB",
            first.service_rss_kib,
            last.service_rss_kib,
        ),
        ("Redis keys", first.redis_keys, last.redis_keys),
    ];
    for (name, a, b) in rows {
        println!("| {name} | {a} | {b} | {} |", growth(a, b));
    }
    for status in statuses.keys() {
        assert!(
            matches!(status, 200 | 429 | 503),
            "unexpected status {status}: {statuses:?}\n{}",
            stack.logs()
        );
    }
    assert!(statuses.get(&200).copied().unwrap_or(0) > 0, "{statuses:?}");
}
