//! The usage ledger through the real parts (issue 11 §3): 2 Envoys x 2 workers with the
//! built filter and the real service; after the run the ledger's admitted count per class,
//! exported with the real `laneguard-usage`, equals the sum of Envoy's own 2xx counts for
//! that class (interactive goes to `upstream_shared`, repair to `upstream_protected`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::config::{self, DemoPorts};
use laneguard_tests::traffic::{self, Stream};
use laneguard_tests::{
    built_binary, demo_config, test_policy, token, Envoy, EnvoyOptions, RunDir, Service, Upstream,
};
use std::collections::BTreeMap;
use std::time::Duration;

struct Fleet {
    envoys: Vec<Envoy>,
    service: Service,
    _upstream: Upstream,
}

fn fleet(label: &str, service_args: &[&str]) -> Fleet {
    let policy = test_policy("valid/leases.yaml").unwrap();
    let dir = RunDir::new(label).unwrap();
    let upstream = Upstream::start(&dir).unwrap();
    let service = Service::start(&dir, service_args).unwrap();
    let mut cfg = demo_config().unwrap();
    config::rewrite_demo(
        &mut cfg,
        &DemoPorts {
            service: service.port(),
            upstream: upstream.port(),
        },
    )
    .unwrap();
    config::set_policy(&mut cfg, &policy).unwrap();
    let envoys = (0..2)
        .map(|i| {
            let d = RunDir::new(&format!("{label}-envoy{i}")).unwrap();
            let options = EnvoyOptions {
                concurrency: 2,
                ..EnvoyOptions::default()
            };
            Envoy::start_in(d, &cfg, options).unwrap()
        })
        .collect();
    Fleet {
        envoys,
        service,
        _upstream: upstream,
    }
}

impl Fleet {
    fn base(&self, i: usize) -> String {
        format!(
            "http://127.0.0.1:{}",
            self.envoys[i].port("gateway").unwrap()
        )
    }

    /// Envoy's own 2xx count for an upstream cluster, over both Envoys.
    fn upstream_2xx(&self, cluster: &str) -> u64 {
        let needle = format!("cluster.{cluster}.upstream_rq_2xx");
        self.envoys
            .iter()
            .map(|e| {
                e.stats(&needle)
                    .unwrap()
                    .iter()
                    .filter(|(k, _)| *k == needle)
                    .filter_map(|(_, v)| v.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum()
    }

    /// Run both Envoys at once with the same streams.
    fn drive(&self, streams: &[Stream], run: Duration) -> Vec<traffic::StreamResult> {
        let base1 = self.base(1);
        let s1 = streams.to_vec();
        let h = std::thread::spawn(move || traffic::run(&base1, &s1, run));
        let mut all = traffic::run(&self.base(0), streams, run).0;
        all.extend(h.join().unwrap().0);
        all
    }
}

/// The ledger's JSON lines, from the real CLI, summed per class of tenant `northwind`.
fn export(service: &Service) -> BTreeMap<String, serde_json::Value> {
    let metrics = service.metrics_url().unwrap();
    let base = metrics.trim_end_matches("/metrics");
    let out = std::process::Command::new(built_binary("laneguard-usage").unwrap())
        .args([
            "export",
            "--service",
            base,
            "--since",
            &(now_s() - 7200).to_string(),
            "--until",
            &(now_s() + 3600).to_string(),
            "--format",
            "jsonl",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut by_class: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["tenant"] != "northwind" {
            continue;
        }
        let class = v["class"].as_str().unwrap().to_string();
        let e = by_class
            .entry(class)
            .or_insert_with(|| serde_json::json!({}));
        for k in [
            "admitted",
            "admitted_central",
            "admitted_leased",
            "admitted_degraded",
            "refused",
            "filter_admitted",
        ] {
            let sum = e[k].as_u64().unwrap_or(0) + v[k].as_u64().unwrap();
            e[k] = sum.into();
        }
        let drift = e["drift"].as_i64().unwrap_or(0) + v["drift"].as_i64().unwrap();
        e["drift"] = drift.into();
    }
    by_class
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Poll the export until the filters' tallies (sync_interval_s 1) are all in.
fn settled(fleet: &Fleet, admitted_2xx: &[(&str, u64)]) -> BTreeMap<String, serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ledger = export(&fleet.service);
        let done = admitted_2xx.iter().all(|(class, n)| {
            ledger
                .get(*class)
                .is_some_and(|v| v["filter_admitted"].as_u64() == Some(*n))
        });
        if done || std::time::Instant::now() > deadline {
            return ledger;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_ledger_admits_exactly_what_envoy_served_per_class() {
    let fleet = fleet("usage-fleet", &["--metrics-addr", "127.0.0.1:0"]);
    // interactive over its 40/s budget (leases and central decisions, some 429s); repair
    // over its 10/s reserve (central only: a reserve is never leased).
    let streams = [
        Stream::new("web", &token("NORTHWIND_WEB").unwrap(), "/orders/1", 30.0),
        Stream::new(
            "recon",
            &token("NORTHWIND_RECON").unwrap(),
            "/orders/1",
            8.0,
        ),
    ];
    let results = fleet.drive(&streams, Duration::from_secs(4));
    let web_2xx = fleet.upstream_2xx("upstream_shared");
    let repair_2xx = fleet.upstream_2xx("upstream_protected");
    let web_429: usize = results
        .iter()
        .filter(|r| r.stream.name == "web")
        .map(|r| r.count(429))
        .sum();
    let ledger = settled(&fleet, &[("interactive", web_2xx), ("repair", repair_2xx)]);
    let ctx = format!(
        "{ledger:#?}\n{}",
        results
            .iter()
            .map(|r| r.summary())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(web_2xx > 0 && repair_2xx > 0, "{ctx}");
    assert!(
        web_429 > 0,
        "the run must drive interactive past its budget\n{ctx}"
    );
    let web = &ledger["interactive"];
    let repair = &ledger["repair"];
    assert_eq!(web["admitted"].as_u64(), Some(web_2xx), "{ctx}");
    assert_eq!(repair["admitted"].as_u64(), Some(repair_2xx), "{ctx}");
    assert!(
        web["admitted_leased"].as_u64().unwrap() > 0,
        "leases were spent\n{ctx}"
    );
    assert!(web["admitted_central"].as_u64().unwrap() > 0, "{ctx}");
    assert_eq!(
        repair["admitted_leased"].as_u64(),
        Some(0),
        "a reserve is never leased\n{ctx}"
    );
    assert_eq!(web["refused"].as_u64(), Some(web_429 as u64), "{ctx}");
    assert_eq!(web["drift"].as_i64(), Some(0), "{ctx}");
    assert_eq!(repair["drift"].as_i64(), Some(0), "{ctx}");
}

/// With `--store redis` the ledger survives a restart of the service: after a run, the
/// service is killed (SIGKILL, past its 1 s flush) and started again on the same real
/// Redis; its export still equals Envoy's 2xx counts per class.
#[test]
fn the_ledger_in_redis_survives_a_restart_of_the_service() {
    let dir = RunDir::new("usage-redis").unwrap();
    let redis = laneguard_tests::RedisServer::start(&dir).unwrap();
    let url = redis.url();
    let mut fleet = fleet(
        "usage-redis-fleet",
        &["--metrics-addr", "127.0.0.1:0", "--store", &url],
    );
    let streams = [
        Stream::new("web", &token("NORTHWIND_WEB").unwrap(), "/orders/1", 30.0),
        Stream::new(
            "recon",
            &token("NORTHWIND_RECON").unwrap(),
            "/orders/1",
            8.0,
        ),
    ];
    let results = fleet.drive(&streams, Duration::from_secs(3));
    let web_2xx = fleet.upstream_2xx("upstream_shared");
    let repair_2xx = fleet.upstream_2xx("upstream_protected");
    let before = settled(&fleet, &[("interactive", web_2xx), ("repair", repair_2xx)]);
    // Past the flush interval, then a crash and a new process on the same Redis.
    std::thread::sleep(Duration::from_millis(1500));
    fleet.service.restart().unwrap();
    let after = export(&fleet.service);
    let ctx = format!(
        "before {before:#?}\nafter {after:#?}\n{}",
        results
            .iter()
            .map(|r| r.summary())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(web_2xx > 0 && repair_2xx > 0, "{ctx}");
    assert_eq!(
        after["interactive"]["admitted"].as_u64(),
        Some(web_2xx),
        "{ctx}"
    );
    assert_eq!(
        after["repair"]["admitted"].as_u64(),
        Some(repair_2xx),
        "{ctx}"
    );
    assert_eq!(after["interactive"]["drift"].as_i64(), Some(0), "{ctx}");
}
