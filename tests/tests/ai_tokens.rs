//! AI token budgets through real Envoy, the real service and the demo model server
//! (`laneguard-upstream`, `POST /v1/chat/completions`): reservations at admission, settlement
//! from the response (JSON body, final SSE chunk, usage header), the overshoot bound under
//! concurrency, the cheaper-model fallback, and every bad input's outcome.
//!
//! The policy is the demo's (`envoy/demo/envoy.yaml`: models `large` and `small`, the
//! `assistant` principal of tenant northwind), with a 1 s sync interval so that settlements
//! reach the service quickly. Budgets refill slowly (per hour) where a test counts tokens,
//! so that no window boundary is straddled on a loaded machine.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::config::set_path;
use laneguard_tests::{demo_policy, token, Client, Reply, Stack};
use serde_json::{json, Value as Json};
use serde_yaml::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const COMPLETIONS: &str = "/v1/chat/completions";

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap()
}

/// The demo policy, syncing every second, edited by `edit`.
fn policy(edit: impl FnOnce(&mut Value)) -> String {
    let mut doc: Value = serde_yaml::from_str(&demo_policy().unwrap()).unwrap();
    set_path(&mut doc, &["service", "sync_interval_s"], 1.into()).unwrap();
    edit(&mut doc);
    serde_yaml::to_string(&doc).unwrap()
}

fn model(doc: &mut Value, i: usize) -> &mut Value {
    &mut doc["models"]["list"][i]
}

struct Ai {
    stack: Stack,
    token: String,
}

impl Ai {
    fn start(label: &str, policy: &str) -> Ai {
        Ai {
            stack: Stack::start(label, policy).unwrap(),
            token: token("NORTHWIND_ASSISTANT").unwrap(),
        }
    }

    fn ask_with(&self, body: &Json, headers: &[(&str, &str)]) -> Reply {
        let mut hs = vec![("content-type", "application/json")];
        hs.extend_from_slice(headers);
        self.stack
            .client
            .post_as(COMPLETIONS, &self.token, &hs, body.to_string().as_bytes())
            .unwrap()
    }

    fn ask(&self, model: &str, max_tokens: u32, headers: &[(&str, &str)]) -> Reply {
        let body = json!({
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hi"}],
        });
        self.ask_with(&body, headers)
    }

    fn stat(&self, name: &str) -> u64 {
        self.stack
            .envoy
            .stats(&format!("laneguard\\.tokens\\.{name}$"))
            .unwrap()
            .iter()
            .filter_map(|(_, v)| v.parse::<u64>().ok())
            .sum()
    }

    /// Wait until `name` reaches `want` (settlement runs when the response ends).
    fn wait_stat(&self, name: &str, want: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = self.stat(name);
            if v >= want || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn upstream_stats(&self) -> Json {
        let c = Client::new(format!("http://127.0.0.1:{}", self.stack.upstream.port()));
        c.get("/_upstream/stats", &[]).unwrap().json().unwrap()
    }

    fn served(&self, m: &str) -> u64 {
        self.upstream_stats()["completions"][m]
            .as_u64()
            .unwrap_or(0)
    }
}

/// `r=` of bucket `name` in a `RateLimit` header.
fn remaining(reply: &Reply, name: &str) -> Option<u64> {
    let header = reply.header("ratelimit")?;
    header.split(", ").find_map(|item| {
        let (n, rest) = item.split_once(';')?;
        if n.trim_matches('"') != name {
            return None;
        }
        rest.split(';')
            .find_map(|kv| kv.strip_prefix("r="))
            .and_then(|r| r.parse().ok())
    })
}

fn usage_total(reply: &Reply) -> u64 {
    reply.json().unwrap()["usage"]["total_tokens"]
        .as_u64()
        .unwrap()
}

#[test]
fn concurrent_requests_never_overshoot_by_more_than_the_bound() {
    // large: 1,000 tokens an hour, all of it at once: room for 10 reservations of 100.
    let p = policy(|doc| {
        let large = model(doc, 0);
        large["tokens"]["capacity"] = yaml("{ per_hour: 1000, burst: 1000 }");
        large["cheaper_model"] = Value::Null;
        large["capacity"] = yaml("{ per_minute: 600, burst: 100 }");
        large["allocation"] = yaml("{ share: 1.0, burst: 100 }");
        doc["classes"][5]["budget"] = yaml("{ per_minute: 300, burst: 60 }");
        doc["users"]["limit"] = yaml("{ per_minute: 600, burst: 100 }");
        doc["tenants"]["default"]["ceiling"] = yaml("{ per_minute: 600, burst: 100 }");
    });
    let ai = Ai::start("ai-concurrency", &p);
    let start = Instant::now();
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|_| {
                s.spawn(|| {
                    // Every answer uses all 100 completion tokens, plus its prompt.
                    ai.ask("large", 100, &[("x-demo-completion-tokens", "100")])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let admitted: Vec<&Reply> = replies.iter().filter(|r| r.status == 200).collect();
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!(
        admitted.len() + refused.len(),
        50,
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let used: u64 = admitted.iter().map(|r| usage_total(r)).sum();
    // The bound: limit (plus what refilled meanwhile) plus the sum of usage beyond each
    // reservation, which the filter exports.
    let over = ai.wait_stat("over_reservation", 1);
    let refill = (elapsed * 1000.0 / 3600.0).ceil() as u64;
    let reserved = admitted.len() as u64 * 100;
    assert!(
        reserved <= 1000 + refill,
        "{} admitted reservations of 100 in a bucket of 1000: {}",
        admitted.len(),
        ai.stack.logs()
    );
    assert!(admitted.len() >= 9, "only {} admitted", admitted.len());
    assert_eq!(
        over,
        used - reserved,
        "over_reservation is the usage beyond the reservations"
    );
    assert!(used <= 1000 + refill + over);
    for r in &refused {
        assert_eq!(
            r.json_str("bucket"),
            "model_tokens:large",
            "{}",
            r.describe()
        );
    }
    assert_eq!(
        ai.stat("in_flight_reserved"),
        0,
        "every reservation settled"
    );
    assert_eq!(ai.served("large"), admitted.len() as u64);
}

#[test]
fn refunds_and_extra_charges_reach_the_next_requests_headers() {
    let p = policy(|doc| {
        let large = model(doc, 0);
        large["tokens"]["capacity"] = yaml("{ per_hour: 2000, burst: 2000 }");
    });
    let ai = Ai::start("ai-refund", &p);
    let bucket = "model_tokens:large";
    // Reserves 500, uses 1 prompt + 16 completion tokens: 483 come back.
    let first = ai.ask("large", 500, &[]);
    assert_eq!(first.status, 200, "{}", first.describe());
    assert_eq!(first.json().unwrap()["model"], "large");
    let used = usage_total(&first);
    assert_eq!(used, 17);
    let at_admission = remaining(&first, bucket).unwrap();
    assert!(at_admission <= 1500, "{}", first.describe());
    assert_eq!(ai.wait_stat("settled.refund", 1), 1);
    assert_eq!(ai.stat("refunded"), 500 - used);
    // The refund reaches the service with the next sync tick (1 s).
    assert!(ai.wait_stat("refunds_sent", 500 - used) >= 500 - used);
    std::thread::sleep(Duration::from_millis(300));
    // Reserves 20, uses 11 (its 9 come back on a later tick).
    let next = ai.ask("large", 20, &[("x-demo-completion-tokens", "10")]);
    let after = remaining(&next, bucket).unwrap();
    // 2000 - 17 - 20, give or take what refilled (2000/h: under 1 a second) and the 9.
    assert!(
        after >= 2000 - used - 20 && after <= 2000 - used - 20 + 12,
        "refund not visible: {after} left\n{}",
        next.describe()
    );
    // One that uses more than it reserved pays the difference: a 1,200-byte prompt is 300
    // tokens, with max_tokens 10.
    let long = "x".repeat(1200);
    let body = json!({"model": "large", "max_tokens": 10, "messages": [{"role": "user", "content": long}]});
    let big = ai.ask_with(&body, &[("x-demo-completion-tokens", "10")]);
    assert_eq!(big.status, 200, "{}", big.describe());
    let big_used = usage_total(&big);
    assert_eq!(big_used, 310);
    assert_eq!(ai.wait_stat("over_reservation", 300), 300);
    // Reported on the sync tick like any hit admitted without the service.
    std::thread::sleep(Duration::from_millis(2500));
    let last = ai.ask("large", 20, &[("x-demo-completion-tokens", "10")]);
    let left = remaining(&last, bucket).unwrap();
    // first 17, next 11 (after its refund), big 310, and this one's reservation of 20.
    let spent = used + 11 + big_used + 20;
    assert!(
        left + 1 >= 2000 - spent && left <= 2000 - spent + 6,
        "extra charge not visible: {left} left, {spent} spent\n{}",
        last.describe()
    );
    // Usage in a response header (tokens.usage_header) settles too.
    let h = ai.ask("large", 100, &[("x-demo-usage", "header")]);
    assert_eq!(h.status, 200);
    assert!(
        h.header("x-upstream-total-tokens").is_some(),
        "{}",
        h.describe()
    );
    assert_eq!(ai.wait_stat("settled.refund", 4), 4);
}

#[test]
fn streams_settle_on_the_final_chunk_and_a_disconnect_at_the_reservation() {
    let ai = Ai::start("ai-stream", &policy(|_| {}));
    let body = json!({"model": "small", "max_tokens": 200, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let r = ai.ask_with(&body, &[]);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    assert!(r.body.contains("\"usage\""), "{}", r.body);
    assert!(r.body.trim_end().ends_with("data: [DONE]"), "{}", r.body);
    assert_eq!(ai.wait_stat("settled.refund", 1), 1);
    assert_eq!(ai.stat("refunded"), 200 - 17);
    // A stream without usage settles at the reservation, counted.
    let r = ai.ask_with(&body, &[("x-demo-usage", "omit")]);
    assert_eq!(r.status, 200);
    assert_eq!(ai.wait_stat("settled.missing", 1), 1);
    // A client that goes away mid-stream: settled at the reservation.
    let port = ai.stack.envoy.port("gateway").unwrap();
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let payload = body.to_string();
    let request = format!(
        "POST {COMPLETIONS} HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\nx-demo-chunk-delay-ms: 500\r\n\
         x-demo-completion-tokens: 50\r\ncontent-length: {}\r\n\r\n{payload}",
        ai.token,
        payload.len()
    );
    conn.write_all(request.as_bytes()).unwrap();
    let mut buf = [0u8; 4096];
    let n = conn.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(conn);
    assert_eq!(
        ai.wait_stat("settled.disconnected", 1),
        1,
        "{}",
        ai.stack.logs()
    );
    assert_eq!(ai.wait_stat("in_flight_reserved", 0), 0);
}

#[test]
fn a_full_model_falls_back_to_the_cheaper_one_then_429_names_the_bucket() {
    // The demo: large holds 400 tokens at once, small 600. Each request reserves 190 and
    // uses 191 (all its completion tokens and a 1-token prompt): large takes 2, small 3.
    let p = policy(|doc| {
        model(doc, 0)["tokens"]["capacity"] = yaml("{ per_hour: 400, burst: 400 }");
        model(doc, 1)["tokens"]["capacity"] = yaml("{ per_hour: 600, burst: 600 }");
    });
    let ai = Ai::start("ai-cheaper", &p);
    let use_all = [("x-demo-completion-tokens", "190")];
    let mut served = Vec::new();
    let mut last = None;
    for _ in 0..8 {
        let r = ai.ask("large", 190, &use_all);
        if r.status != 200 {
            last = Some(r);
            break;
        }
        let model = r.json().unwrap()["model"].as_str().unwrap().to_string();
        // Routed by the rewritten x-model: the demo's model-small route carries only the
        // small model's requests.
        assert_eq!(
            r.header("x-demo-model-route"),
            (model == "small").then_some("small"),
            "{}",
            r.describe()
        );
        served.push((model, r.header("x-laneguard-fallback").map(str::to_string)));
    }
    let large = served.iter().filter(|(m, _)| m == "large").count();
    let small: Vec<_> = served.iter().filter(|(m, _)| m == "small").collect();
    assert_eq!(large, 2, "{served:?}");
    assert_eq!(small.len(), 3, "{served:?}");
    assert!(
        small
            .iter()
            .all(|(_, f)| f.as_deref() == Some("cheaper_model")),
        "{served:?}"
    );
    assert_eq!(served[0].1, None);
    let refused = last.expect("small ran out too");
    assert_eq!(refused.status, 429, "{}", refused.describe());
    assert_eq!(refused.json_str("bucket"), "model_tokens:small");
    assert_eq!(ai.served("large"), 2);
    assert_eq!(
        ai.served("small"),
        3,
        "the rewritten body reached the small model"
    );
    assert_eq!(ai.stat("cheaper_model"), 4);
    // The access log is flushed by Envoy on its own schedule: poll for the record.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut log = ai.stack.envoy.access_log();
    while !log.contains("\"fallback\":\"cheaper_model\"") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        log = ai.stack.envoy.access_log();
    }
    assert!(log.contains("\"fallback\":\"cheaper_model\""), "{log}");
}

#[test]
fn per_user_and_per_tool_token_budgets_refuse_before_the_models_quota_naming_their_bucket() {
    // Issue 9, item 1: a request is admitted only if every token bucket it touches has
    // room. The model's quota is ample here; each user of northwind has 300 tokens an hour
    // (`tokens.users`) and the chat family (the tool) 450 for the tenant (`tokens.tools`).
    // Every answer uses exactly its reservation (1 prompt token + max_tokens - 1), so no
    // settlement moves the arithmetic.
    let p = policy(|doc| {
        model(doc, 0)["tokens"]["capacity"] = yaml("{ per_hour: 100000, burst: 100000 }");
        let tokens = &mut doc["tokens"];
        tokens["users"] = yaml("{ per_hour: 300, burst: 300 }");
        tokens["tools"] = yaml("{ chat: { limit: { per_hour: 450, burst: 450 } } }");
    });
    let ai = Ai::start("ai-user-tool", &p);
    let alice = token("NORTHWIND_WEB").unwrap();
    let ask_as = |tok: &str, max_tokens: u32| {
        let body = json!({"model": "large", "max_tokens": max_tokens,
                          "messages": [{"role": "user", "content": "hi"}]});
        let used = (max_tokens - 1).to_string();
        ai.stack
            .client
            .post_as(
                COMPLETIONS,
                tok,
                &[
                    ("content-type", "application/json"),
                    ("x-demo-completion-tokens", used.as_str()),
                ],
                body.to_string().as_bytes(),
            )
            .unwrap()
    };
    // svc-assistant: 190 of its 300; the tool has 260 left.
    let r = ask_as(&ai.token, 190);
    assert_eq!(r.status, 200, "{}", r.describe());
    // 110 left for this user: the next 190 is refused by the user's token bucket, while the
    // model and the tool have room (and nothing is charged to them: all or nothing).
    let r = ask_as(&ai.token, 190);
    assert_eq!(r.status, 429, "{}", r.describe());
    assert!(
        r.json_str("bucket").starts_with("user_tokens"),
        "{}",
        r.describe()
    );
    assert_eq!(r.header("x-laneguard-fallback"), Some("reject"));
    // Another user of the tenant (alice, class interactive) has her own 300: 100 of them;
    // the tool has 160 left.
    let r = ask_as(&alice, 100);
    assert_eq!(r.status, 200, "{}", r.describe());
    // 170 fits alice's 200 but not the tool's 160: the tool's token bucket refuses it.
    let r = ask_as(&alice, 170);
    assert_eq!(r.status, 429, "{}", r.describe());
    assert!(
        r.json_str("bucket").starts_with("tool_tokens"),
        "{}",
        r.describe()
    );
    assert_eq!(
        ai.served("large"),
        2,
        "the refused requests never reached the model"
    );
    assert_eq!(ai.wait_stat("settled.exact", 2), 2);
    assert_eq!(
        ai.stat("cheaper_model"),
        0,
        "not a model bucket: no downgrade"
    );
}

#[test]
fn bad_input_has_a_defined_outcome() {
    let ai = Ai::start("ai-bad-input", &policy(|_| {}));
    let post = |body: &[u8]| {
        ai.stack
            .client
            .post_as(
                COMPLETIONS,
                &ai.token,
                &[("content-type", "application/json")],
                body,
            )
            .unwrap()
    };
    let cases: [(&[u8], u16, &str); 5] = [
        (b"not json", 400, "invalid_body"),
        (b"[1,2]", 400, "invalid_body"),
        (
            br#"{"model":"large","max_tokens":-5}"#,
            400,
            "invalid_max_tokens",
        ),
        (
            br#"{"model":"large","max_tokens":"many"}"#,
            400,
            "invalid_max_tokens",
        ),
        (
            br#"{"model":"large","max_tokens":1000000000}"#,
            400,
            "max_tokens_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let r = post(body);
        assert_eq!(r.status, status, "{}", r.describe());
        assert_eq!(r.json_str("error"), code, "{}", r.describe());
    }
    // Larger than tokens.inspect_bytes (64 KiB): 413, never buffered further.
    let huge = format!(
        r#"{{"model":"large","messages":[{{"content":"{}"}}]}}"#,
        "x".repeat(70_000)
    );
    let r = post(huge.as_bytes());
    assert_eq!(r.status, 413, "{}", r.describe());
    assert_eq!(r.json_str("error"), "body_too_large");
    assert_eq!(ai.served("large"), 0, "no bad request reached the model");
    // A usage that is not a number: settled at the reservation, counted.
    let r = ai.ask("large", 50, &[("x-demo-usage", "invalid")]);
    assert_eq!(r.status, 200);
    assert_eq!(ai.wait_stat("settled.invalid", 1), 1);
    let r = ai.ask("large", 50, &[("x-demo-usage", "omit")]);
    assert_eq!(r.status, 200);
    assert_eq!(ai.wait_stat("settled.missing", 1), 1);
    assert_eq!(ai.stat("bad_body"), 2);
    assert_eq!(ai.stat("bad_max_tokens"), 2);
    assert_eq!(ai.stat("too_many_tokens"), 1);
    assert_eq!(ai.stat("body_too_large"), 1);
}

#[test]
fn a_response_larger_than_the_inspection_limit_settles_at_the_reservation_unharmed() {
    // tokens.inspect_bytes at its least, 1 KiB: a JSON answer of 350 completion tokens
    // (about 2 KB) is too large to read its usage from, so the request settles at its
    // reservation (docs/ai.md, "Bad input"); the caller still gets the whole answer.
    let ai = Ai::start(
        "ai-response-too-large",
        &policy(|doc| doc["tokens"]["inspect_bytes"] = 1024.into()),
    );
    let long = [("x-demo-completion-tokens", "350")];
    let r = ai.ask("large", 390, &long);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body.len() > 1024, "{} bytes", r.body.len());
    assert_eq!(usage_total(&r), 351, "the body reached the caller whole");
    assert_eq!(
        ai.wait_stat("settled.too_large", 1),
        1,
        "{}",
        ai.stack.logs()
    );
    assert_eq!(
        ai.stat("refunded"),
        0,
        "settled at the reservation: nothing back"
    );
    // The same answer streamed: every SSE event is under the limit, so the stream's final
    // usage still settles it (a refund of 390 - 351).
    let body = json!({"model": "large", "max_tokens": 390, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let r = ai.ask_with(&body, &long);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body.len() > 1024, "{} bytes", r.body.len());
    assert!(r.body.trim_end().ends_with("data: [DONE]"), "{}", r.body);
    assert_eq!(ai.wait_stat("settled.refund", 1), 1, "{}", ai.stack.logs());
    assert_eq!(ai.stat("refunded"), 390 - 351);
    assert_eq!(ai.stat("in_flight_reserved"), 0, "both settled");
}

#[test]
fn an_over_budget_cacheable_get_is_answered_from_the_cache_and_a_miss_gets_the_429() {
    // The demo's assistant class has `fallbacks: [cached, reject]`; five requests an hour
    // here (the demo's largest family cost), so the sixth is over budget on any machine.
    let ai = Ai::start(
        "ai-cached",
        &policy(|doc| {
            let classes = doc["classes"].as_sequence_mut().unwrap();
            let assistant = classes
                .iter_mut()
                .find(|c| c["name"] == "assistant")
                .unwrap();
            assistant["budget"] = yaml("{ per_hour: 5, burst: 5 }");
        }),
    );
    let get = |path: &str| ai.stack.client.get_as(path, &ai.token, &[]).unwrap();
    let reached = || ai.upstream_stats()["requests"].as_u64().unwrap();
    // Within the budget: the first GET fills Envoy's cache (the upstream marks
    // /v1/models `max-age=300`).
    for _ in 0..5 {
        let r = get("/v1/models");
        assert_eq!(r.status, 200, "{}", r.describe());
        assert_eq!(r.header("x-laneguard-fallback"), None);
    }
    let before = reached();
    assert!(before >= 1, "the first GET reached the upstream");
    // Over the budget: answered from the cache, never reaching the upstream.
    for _ in 0..2 {
        let r = get("/v1/models");
        assert_eq!(r.status, 200, "{}", r.describe());
        assert_eq!(r.header("x-laneguard-fallback"), Some("cached"));
        assert!(r.header("age").is_some(), "{}", r.describe());
        assert_eq!(r.json().unwrap()["object"], "list");
        assert!(r.header("ratelimit").is_some(), "{}", r.describe());
    }
    // A miss (nothing cached for this path) falls through to the 429, still without
    // reaching the upstream.
    let miss = get("/v1/models?page=2");
    assert_eq!(miss.status, 429, "{}", miss.describe());
    assert_eq!(miss.header("x-laneguard-fallback"), Some("reject"));
    assert!(miss.header("retry-after").is_some());
    assert_eq!(miss.json_str("class"), "assistant");
    assert_eq!(
        reached(),
        before,
        "over-budget requests never reached the upstream"
    );
    // A POST (an AI request) is never cacheable: over budget it gets the 429.
    let post = ai.ask("large", 10, &[]);
    assert_eq!(post.status, 429, "{}", post.describe());
    let stat = |name: &str| {
        ai.stack
            .envoy
            .stats(&format!("laneguard\\.{name}$"))
            .unwrap()
            .iter()
            .filter_map(|(_, v)| v.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert_eq!((stat("cache\\.hit"), stat("cache\\.miss")), (2, 1));
    // The audit record says which fired: `cached` (status 200) for a hit, `reject` for the
    // miss.
    let deadline = Instant::now() + Duration::from_secs(15);
    let hit = |log: &str| {
        log.lines()
            .filter(|l| l.contains("\"fallback\":\"cached\"") && l.contains("\"status\":200"))
            .count()
    };
    // The access log is flushed on Envoy's own schedule: wait for the miss's line too.
    let missed = |log: &str| {
        log.lines()
            .any(|l| l.contains("page=2") && l.contains("\"fallback\":\"reject\""))
    };
    let mut log = ai.stack.envoy.access_log();
    while (hit(&log) < 2 || !missed(&log)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        log = ai.stack.envoy.access_log();
    }
    assert_eq!(hit(&log), 2, "{log}");
    assert!(missed(&log), "{log}");
}
