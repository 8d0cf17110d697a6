//! Lanes: a flood from one class cannot starve the others.
//!
//! Policy `tests/policies/valid/lanes.yaml`: northwind's ceiling is 16/s, split into the
//! repair reserve (4/s), the recovery reserve (2/s) and a shared pool (10/s) that holds the
//! integration budget (6/s) and the interactive budget (4/s). For four seconds the ERP floods
//! at 40/s while the reconciliation worker sends repair traffic at its reserved rate, the web
//! app sends interactive traffic under its budget, and a second tenant (acme) sends its own.
//! A second run has every northwind class flood at once, on two Envoy workers, so that the
//! ceiling itself is the binding limit.

// Test code: a failed unwrap or panic is a failed test (clippy.toml allows them inside
// #[test] functions; this extends that to the helpers of this file).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::traffic::{self, Stream, StreamResult};
use laneguard_tests::{test_policy, token, EnvoyOptions, Stack};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

const RUN: Duration = Duration::from_secs(4);

// From lanes.yaml.
const CEILING_PER_S: f64 = 16.0;
const CEILING_BURST: f64 = 16.0;
const INTEGRATION_PER_S: f64 = 6.0;
const INTEGRATION_BURST: f64 = 6.0;
const INTERACTIVE_PER_S: f64 = 4.0;
const INTERACTIVE_BURST: f64 = 4.0;
const REPAIR_RESERVE_PER_S: f64 = 4.0;
const RECOVERY_RESERVE_PER_S: f64 = 2.0;
const SHARED_PER_S: f64 = 10.0;
const SHARED_BURST: f64 = 10.0;

/// The tests here measure rates: run them one at a time, so that they do not compete for
/// the machine's cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn find<'a>(results: &'a [StreamResult], name: &str) -> &'a StreamResult {
    results
        .iter()
        .find(|r| r.stream.name == name)
        .unwrap_or_else(|| panic!("no results for stream {name}"))
}

#[test]
fn erp_flood_is_limited_while_repair_interactive_and_other_tenants_are_served() {
    let _serial = serial();
    let stack = Stack::start("lanes", &test_policy("valid/lanes.yaml").unwrap()).unwrap();
    let streams = vec![
        Stream::new(
            "erp",
            &token("NORTHWIND_ERP").unwrap(),
            "/orders/sync",
            40.0,
        ),
        Stream::new(
            "repair",
            &token("NORTHWIND_RECON").unwrap(),
            "/orders/42/repair",
            REPAIR_RESERVE_PER_S,
        ),
        Stream::new("web", &token("NORTHWIND_WEB").unwrap(), "/orders/7", 3.0),
        Stream::new("acme", &token("ACME_WEB").unwrap(), "/orders/1", 3.0),
    ];
    let (results, elapsed) = traffic::run(stack.client.base(), &streams, RUN);
    let summary: Vec<String> = results.iter().map(StreamResult::summary).collect();
    let ctx = format!(
        "elapsed {elapsed:?}\n{}\n{}",
        summary.join("\n"),
        stack.logs()
    );

    eprintln!("lanes: elapsed {elapsed:?}\n{}", summary.join("\n"));
    let erp = find(&results, "erp");
    let repair = find(&results, "repair");
    let web = find(&results, "web");
    let acme = find(&results, "acme");
    let t = elapsed.as_secs_f64();

    // Nothing failed at the transport level or with an unexpected status.
    for r in &results {
        for o in &r.outcomes {
            assert!(
                o.status == 200 || o.status == 429,
                "{}: unexpected outcome {o:?}\n{ctx}",
                r.stream.name
            );
        }
    }

    // The flood is limited, within its class budget, and served on the shared lane.
    assert!(erp.count(429) > 0, "the ERP flood was never limited\n{ctx}");
    let erp_ok = erp.count(200) as f64;
    assert!(
        erp_ok <= INTEGRATION_PER_S * t + INTEGRATION_BURST,
        "ERP admitted {erp_ok} > integration budget {INTEGRATION_PER_S}/s x {t:.2}s + {INTEGRATION_BURST}\n{ctx}"
    );
    assert!(
        erp_ok >= INTEGRATION_BURST,
        "ERP was served less than its burst ({erp_ok})\n{ctx}"
    );
    for o in erp.outcomes.iter().filter(|o| o.status == 200) {
        assert_eq!(
            (o.lane.as_str(), o.class.as_str()),
            ("shared", "integration"),
            "ERP request served as {o:?}\n{ctx}"
        );
    }
    for o in erp.outcomes.iter().filter(|o| o.status == 429) {
        let v: serde_json::Value = serde_json::from_str(&o.body).unwrap_or_default();
        assert_eq!(v["tenant"], "northwind", "429 body {}\n{ctx}", o.body);
        assert_eq!(v["class"], "integration", "429 body {}\n{ctx}", o.body);
    }

    // Repair at its reserved rate: every request served, on the protected lane.
    assert_eq!(
        repair.count(200),
        repair.sent(),
        "repair at its reserved rate was limited\n{ctx}"
    );
    for o in &repair.outcomes {
        assert_eq!(
            (o.lane.as_str(), o.class.as_str()),
            ("protected", "repair"),
            "repair served as {o:?}\n{ctx}"
        );
    }

    // Interactive under its own budget: every request served, on the shared lane.
    assert_eq!(
        web.count(200),
        web.sent(),
        "interactive under its budget was limited\n{ctx}"
    );
    for o in &web.outcomes {
        assert_eq!(
            (o.lane.as_str(), o.class.as_str()),
            ("shared", "interactive"),
            "web served as {o:?}\n{ctx}"
        );
    }

    // The second tenant does not notice northwind's flood.
    assert_eq!(
        acme.count(200),
        acme.sent(),
        "acme was limited during northwind's flood\n{ctx}"
    );
    for o in &acme.outcomes {
        assert_eq!(o.tenant, "acme", "acme served as {o:?}\n{ctx}");
    }

    // Northwind as a whole never exceeds its ceiling.
    let northwind_ok = (erp.count(200) + repair.count(200) + web.count(200)) as f64;
    eprintln!(
        "lanes: northwind admitted {northwind_ok}, ceiling bound {:.1}",
        CEILING_PER_S * t + CEILING_BURST
    );
    assert!(
        northwind_ok <= CEILING_PER_S * t + CEILING_BURST,
        "northwind admitted {northwind_ok} > ceiling {CEILING_PER_S}/s x {t:.2}s + {CEILING_BURST}\n{ctx}"
    );

    // Interactive is served up to its own budget, and no further: a burst well above it
    // is cut at the budget, and the 429 names the class.
    let web_token = token("NORTHWIND_WEB").unwrap();
    let burst_start = std::time::Instant::now();
    let mut burst = Vec::new();
    for _ in 0..(INTERACTIVE_BURST as usize * 3) {
        burst.push(stack.client.get_as("/orders/7", &web_token, &[]).unwrap());
    }
    let total_t = t + burst_start.elapsed().as_secs_f64();
    let burst_ok = burst.iter().filter(|r| r.status == 200).count();
    let limited: Vec<_> = burst.iter().filter(|r| r.status == 429).collect();
    let ctx = format!(
        "burst: {} served, {} limited\n{ctx}",
        burst_ok,
        limited.len()
    );
    assert!(
        !limited.is_empty(),
        "an interactive burst of 3x its burst was never limited\n{ctx}"
    );
    let web_ok = (web.count(200) + burst_ok) as f64;
    assert!(
        web_ok <= INTERACTIVE_PER_S * total_t + INTERACTIVE_BURST,
        "interactive admitted {web_ok} > its budget {INTERACTIVE_PER_S}/s x {total_t:.2}s + {INTERACTIVE_BURST}\n{ctx}"
    );
    let body = limited[0].json().unwrap();
    assert_eq!(
        body["class"],
        "interactive",
        "{}\n{ctx}",
        limited[0].describe()
    );
    assert_eq!(
        body["tenant"],
        "northwind",
        "{}\n{ctx}",
        limited[0].describe()
    );
}

/// Every northwind caller floods at once: the ceiling becomes the binding limit. The tenant
/// still stays under it, the unprotected classes stay inside the shared pool, and repair and
/// recovery each still get at least their reserved rate.
#[test]
fn when_every_class_floods_the_tenant_stays_under_its_ceiling_and_reserves_hold() {
    let _serial = serial();
    // Two workers: each has its own local buckets, so this also checks that the service's
    // authoritative count holds the tenant to its ceiling across workers.
    let stack = Stack::start_with(
        "lanes-all-flood",
        &test_policy("valid/lanes.yaml").unwrap(),
        EnvoyOptions {
            concurrency: 2,
            ..EnvoyOptions::default()
        },
        |_| Ok(()),
    )
    .unwrap();
    let flood = 20.0;
    let streams = vec![
        Stream::new(
            "erp",
            &token("NORTHWIND_ERP").unwrap(),
            "/orders/sync",
            flood,
        ),
        Stream::new("web", &token("NORTHWIND_WEB").unwrap(), "/orders/7", flood),
        Stream::new(
            "export",
            &token("NORTHWIND_EXPORT").unwrap(),
            "/orders/all",
            flood,
        ),
        Stream::new(
            "repair",
            &token("NORTHWIND_RECON").unwrap(),
            "/orders/42/repair",
            flood,
        ),
        Stream::new(
            "recovery",
            &token("NORTHWIND_SUPPORT").unwrap(),
            "/replay/9",
            flood,
        ),
    ];
    let (results, elapsed) = traffic::run(stack.client.base(), &streams, RUN);
    let summary: Vec<String> = results.iter().map(StreamResult::summary).collect();
    eprintln!(
        "lanes-all-flood: elapsed {elapsed:?}\n{}",
        summary.join("\n")
    );
    let ctx = format!(
        "elapsed {elapsed:?}\n{}\n{}",
        summary.join("\n"),
        stack.logs()
    );
    let t = elapsed.as_secs_f64();
    let ok = |name: &str| find(&results, name).count(200) as f64;
    for r in &results {
        for o in &r.outcomes {
            assert!(
                o.status == 200 || o.status == 429,
                "{}: unexpected outcome {o:?}\n{ctx}",
                r.stream.name
            );
        }
    }

    let total = ok("erp") + ok("web") + ok("export") + ok("repair") + ok("recovery");
    let ceiling = CEILING_PER_S * t + CEILING_BURST;
    assert!(
        total <= ceiling,
        "northwind admitted {total} > ceiling bound {ceiling:.1}\n{ctx}"
    );
    // The check above is not vacuous: the flood does reach the ceiling's neighbourhood.
    assert!(
        total >= 0.6 * CEILING_PER_S * t,
        "northwind admitted only {total}: the flood never pressed on the ceiling\n{ctx}"
    );

    let unprotected = ok("erp") + ok("web") + ok("export");
    let shared = SHARED_PER_S * t + SHARED_BURST;
    assert!(
        unprotected <= shared,
        "unprotected classes admitted {unprotected} > shared pool bound {shared:.1}: they used a reservation\n{ctx}"
    );
    for (name, reserve) in [
        ("repair", REPAIR_RESERVE_PER_S),
        ("recovery", RECOVERY_RESERVE_PER_S),
    ] {
        let got = ok(name);
        assert!(
            got >= 0.9 * reserve * t,
            "{name} got {got} < its reserve {reserve}/s x {t:.2}s under a flood\n{ctx}"
        );
        for o in find(&results, name)
            .outcomes
            .iter()
            .filter(|o| o.status == 200)
        {
            assert_eq!(o.lane, "protected", "{name} served as {o:?}\n{ctx}");
        }
    }
}
