//! Graceful degradation before the hard 429: a limited request tries its class's ordered
//! fallbacks (`queue`, `fallback_route`, `cached`, `reject`), and the first that applies
//! fires.
//!
//! A queued request does not re-run its decision when it resumes: it reserves its place at
//! enqueue time by charging its buckets ahead (GCRA "delay" semantics: the bucket goes into
//! debt, and the wait is exactly how long until the charge would have conformed). Requests
//! that arrive later see that debt, so a queue never admits more than the rate, and the
//! order of service is the order of arrival.

use crate::engine::{Bucket, BucketKind, Level, Plan};
use crate::policy::ops::ClassOps;
use crate::policy::{ClassId, Fallback, Policy};

/// What a limited request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Wait this long, then go through.
    Queue { wait_ns: u64 },
    /// Go through on the fallback route.
    Route,
    /// Go to the cache-only route (`classes[].cache`): answered from Envoy's cache, or the
    /// 429 when the cache has nothing.
    Cached,
    /// Refuse with 429. `queue_refused`: the class had a queue that could not take it,
    /// because the wait was too long or the queue was full.
    Reject { queue_refused: bool },
}

impl Step {
    pub fn fallback(self) -> Fallback {
        match self {
            Step::Queue { .. } => Fallback::Queue,
            Step::Route => Fallback::FallbackRoute,
            Step::Cached => Fallback::Cached,
            Step::Reject { .. } => Fallback::Reject,
        }
    }
}

/// How long until the request's cost fits in every bucket that lacks room.
pub fn wait_ns(levels: &[Level]) -> u64 {
    levels
        .iter()
        .filter(|l| !l.has_room)
        .map(|l| l.retry_after_ns)
        .max()
        .unwrap_or(0)
}

/// `Retry-After` for a refused request: whole seconds, at least 1.
pub fn retry_after_s(levels: &[Level]) -> u64 {
    crate::engine::ceil_s(wait_ns(levels)).max(1)
}

/// Walk the class's fallbacks. `depth` is how many requests of this class already wait on
/// this worker. Without the request (the offline replay) `cached` is passed over: whether
/// the cache would have had the answer is not known, so it counts as the miss it may be.
pub fn choose(ops: &ClassOps, wait_ns: u64, depth: usize) -> Step {
    let fallbacks: Vec<Fallback> = ops
        .fallbacks
        .iter()
        .copied()
        .filter(|f| *f != Fallback::Cached)
        .collect();
    walk(ops, &fallbacks, wait_ns, depth)
}

/// [`choose`] for a request's plan: the fallbacks it may use ([`usable`]).
pub fn choose_for(ops: &ClassOps, plan: &Plan, method: &str, wait_ns: u64, depth: usize) -> Step {
    walk(ops, &usable(ops, plan, method), wait_ns, depth)
}

/// The fallback route's own budget had no room: walk the fallbacks the request may use
/// that are listed after `fallback_route` (a 429 when nothing else applies).
pub fn choose_after_route(
    ops: &ClassOps,
    plan: &Plan,
    method: &str,
    wait_ns: u64,
    depth: usize,
) -> Step {
    let fallbacks = usable(ops, plan, method);
    let rest = fallbacks
        .iter()
        .position(|f| *f == Fallback::FallbackRoute)
        .map_or(&fallbacks[..0], |i| &fallbacks[i + 1..]);
    walk(ops, rest, wait_ns, depth)
}

/// The class's fallbacks, in order, that apply to this request. An AI request (token
/// buckets, `crate::ai`) is never queued: a queued request is paid when it is released,
/// from the root tick, where its reservation could not be settled against its response.
/// `cached` applies only to a cacheable request ([`crate::policy::ops::CacheSettings`]).
fn usable(ops: &ClassOps, plan: &Plan, method: &str) -> Vec<Fallback> {
    let ai = plan.tokens.is_some();
    ops.fallbacks
        .iter()
        .copied()
        .filter(|f| match f {
            Fallback::Queue => !ai,
            Fallback::Cached => ops.cache.cacheable(method, plan.family.as_deref(), ai),
            Fallback::FallbackRoute | Fallback::Reject => true,
        })
        .collect()
}

/// What a request sent to its class's fallback route is charged to: the route's own bucket
/// (`[tenant, fallback, class]`), at `fallback_route.budget`, or by default the class's budget
/// for this tenant, or the tenant's shared pool for a class without one. The returned plan is
/// decided like any other (lease, local mirror, central call, failure mode), so a fallback
/// route admits at most its budget, fleet-wide; when it has no room the fallbacks after
/// `fallback_route` apply ([`choose_after_route`]).
pub fn route_plan(policy: &Policy, plan: &Plan) -> Plan {
    let tenant_plan = policy.plan_for(&plan.tenant);
    let rate = policy
        .ops
        .class(plan.class)
        .and_then(|o| o.fallback_route.budget)
        .or(tenant_plan.budgets.get(plan.class).copied().flatten())
        .unwrap_or(tenant_plan.shared);
    let bucket = Bucket::new(
        &policy.service.domain,
        BucketKind::Fallback,
        &plan.tenant,
        &plan.class_name,
        rate,
    );
    Plan {
        buckets: vec![bucket],
        borrow: None,
        ..plan.clone()
    }
}

fn walk(ops: &ClassOps, fallbacks: &[Fallback], wait_ns: u64, depth: usize) -> Step {
    let mut queue_refused = false;
    for f in fallbacks {
        match f {
            Fallback::Queue => {
                let fits = wait_ns <= u64::from(ops.queue.max_wait_ms) * 1_000_000;
                let room = depth < ops.queue.max_depth as usize;
                if fits && room {
                    return Step::Queue { wait_ns };
                }
                queue_refused = true;
            }
            Fallback::FallbackRoute => return Step::Route,
            Fallback::Cached => return Step::Cached,
            Fallback::Reject => break,
        }
    }
    Step::Reject { queue_refused }
}

/// One worker's queued requests.
#[derive(Debug, Clone, Default)]
pub struct WaitQueue {
    waiting: Vec<Waiting>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiting {
    context_id: u32,
    class: ClassId,
    ready_at_ns: u64,
}

impl WaitQueue {
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Requests of `class` waiting now.
    pub fn depth(&self, class: ClassId) -> usize {
        self.waiting.iter().filter(|w| w.class == class).count()
    }

    pub fn push(&mut self, context_id: u32, class: ClassId, ready_at_ns: u64) {
        self.waiting.push(Waiting {
            context_id,
            class,
            ready_at_ns,
        });
    }

    /// Whether a request is waiting.
    pub fn contains(&self, context_id: u32) -> bool {
        self.waiting.iter().any(|w| w.context_id == context_id)
    }

    /// Forget a request (its client went away). Returns whether it was waiting.
    pub fn remove(&mut self, context_id: u32) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|w| w.context_id != context_id);
        self.waiting.len() != before
    }

    /// Take the requests whose wait is over, earliest first.
    pub fn take_ready(&mut self, now_ns: u64) -> Vec<u32> {
        let mut ready: Vec<Waiting> = Vec::new();
        self.waiting.retain(|w| {
            if w.ready_at_ns <= now_ns {
                ready.push(*w);
                false
            } else {
                true
            }
        });
        ready.sort_by_key(|w| w.ready_at_ns);
        ready.into_iter().map(|w| w.context_id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ops::{CacheSettings, FallbackRoute, QueueSettings};

    const MS: u64 = 1_000_000;

    fn ops(fallbacks: &[Fallback]) -> ClassOps {
        ClassOps {
            mode: None,
            fallbacks: fallbacks.to_vec(),
            queue: QueueSettings {
                max_wait_ms: 1_000,
                max_depth: 2,
            },
            fallback_route: FallbackRoute {
                header: "x-laneguard-route".into(),
                value: "fallback".into(),
                budget: None,
            },
            cache: CacheSettings {
                header: "x-laneguard-route".into(),
                value: "cached".into(),
                families: Some(vec!["catalog".into()]),
            },
        }
    }

    #[test]
    fn fallbacks_are_tried_in_order() {
        use Fallback::*;
        let q = ops(&[Queue, FallbackRoute, Reject]);
        assert_eq!(choose(&q, 500 * MS, 0), Step::Queue { wait_ns: 500 * MS });
        assert_eq!(choose(&q, 1_500 * MS, 0), Step::Route, "too long a wait");
        assert_eq!(choose(&q, 500 * MS, 2), Step::Route, "queue full");
        let q = ops(&[Queue, Reject]);
        assert_eq!(
            choose(&q, 1_500 * MS, 0),
            Step::Reject {
                queue_refused: true
            }
        );
        assert_eq!(
            choose(&ops(&[Reject]), 0, 0),
            Step::Reject {
                queue_refused: false
            }
        );
        assert_eq!(choose(&ops(&[FallbackRoute, Reject]), 0, 0), Step::Route);
        // The route's budget is full: what follows it.
        let pl = plain_plan();
        let q = ops(&[FallbackRoute, Queue, Reject]);
        assert_eq!(
            choose_after_route(&q, &pl, "GET", 500 * MS, 0),
            Step::Queue { wait_ns: 500 * MS }
        );
        assert_eq!(
            choose_after_route(&ops(&[FallbackRoute, Reject]), &pl, "GET", 0, 0),
            Step::Reject {
                queue_refused: false
            }
        );
    }

    const ROUTE_POLICY: &str = r#"
version: 1
classes:
  - { name: web, consequence: time_sensitive, budget: { per_minute: 60, burst: 10 }, fallbacks: [fallback_route] }
  - { name: export, consequence: low, fallbacks: [fallback_route], fallback_route: { budget: { per_minute: 6, burst: 2 } } }
  - { name: batch, consequence: low, fallbacks: [fallback_route] }
  - { name: repair, consequence: repair, reserve: { per_minute: 20, burst: 5 } }
principals:
  - { name: e, default_class: export, may_declare: [export] }
  - { name: b, default_class: batch, may_declare: [batch] }
tenants:
  default: { ceiling: { per_minute: 100, burst: 20 } }
"#;

    #[test]
    fn cached_is_for_cacheable_requests_and_only_reject_follows_it() {
        use Fallback::*;
        let mut pl = plain_plan();
        let q = ops(&[Queue, Cached, Reject]);
        // Only GETs of the listed family (`catalog` in `ops`).
        assert!(matches!(
            choose_for(&q, &pl, "GET", 1_500 * MS, 0),
            Step::Reject { .. }
        ));
        pl.family = Some("catalog".into());
        assert_eq!(
            choose_for(&q, &pl, "GET", 500 * MS, 0),
            Step::Queue { wait_ns: 500 * MS }
        );
        assert_eq!(choose_for(&q, &pl, "GET", 1_500 * MS, 0), Step::Cached);
        assert!(matches!(
            choose_for(&q, &pl, "POST", 1_500 * MS, 0),
            Step::Reject { .. }
        ));
        // The replay cannot know what the cache held: a miss.
        assert!(matches!(choose(&q, 1_500 * MS, 0), Step::Reject { .. }));

        use crate::policy::parse;
        let with = |fallbacks: &str, cache: &str| {
            ROUTE_POLICY.replace(
                "fallbacks: [fallback_route] }\n  - { name: export",
                &format!("fallbacks: {fallbacks}{cache} }}\n  - {{ name: export"),
            )
        };
        let p = parse(&with("[cached, reject]", "")).unwrap();
        let web = p.ops.class(0).unwrap();
        assert_eq!(web.fallbacks, [Cached, Reject]);
        assert_eq!(
            (web.cache.header.as_str(), web.cache.value.as_str()),
            ("x-laneguard-route", "cached")
        );
        let err =
            |fallbacks: &str, cache: &str| parse(&with(fallbacks, cache)).unwrap_err().to_string();
        assert!(
            err("[cached, queue]", "").contains("classes[0].fallbacks[1]"),
            "{}",
            err("[cached, queue]", "")
        );
        assert!(err("[reject]", ", cache: {}").contains("classes[0].cache"));
        let e = err("[cached]", ", cache: { families: [nope] }");
        assert!(
            e.contains("classes[0].cache.families[0]") && e.contains("nope"),
            "{e}"
        );
        let e = err("[cached]", ", cache: { header: \":path\" }");
        assert!(e.contains("classes[0].cache.header"), "{e}");
    }

    /// A request of ROUTE_POLICY's web class (no token buckets).
    fn plain_plan() -> Plan {
        use crate::engine::{plan, RequestInfo};
        let p = crate::policy::parse(ROUTE_POLICY).unwrap();
        let req = RequestInfo {
            tenant: Some("t"),
            principal: Some("b"),
            method: "GET",
            path: "/",
            ..RequestInfo::default()
        };
        plan(&p, &req).unwrap()
    }

    #[test]
    fn the_fallback_route_is_charged_to_its_own_bounded_bucket() {
        use crate::engine::{plan, LocalTable, RequestInfo};
        use crate::policy::parse;
        let p = parse(ROUTE_POLICY).unwrap();
        let req = |principal| RequestInfo {
            tenant: Some("t"),
            principal: Some(principal),
            method: "GET",
            path: "/",
            ..RequestInfo::default()
        };
        let route = |principal| route_plan(&p, &plan(&p, &req(principal)).unwrap());
        let export = route("e");
        assert_eq!(export.buckets.len(), 1);
        let b = &export.buckets[0];
        assert_eq!(
            (b.kind, b.name()),
            (BucketKind::Fallback, "fallback:export".into())
        );
        assert_eq!(
            b.entries(),
            [("tenant", "t"), ("bucket", "fallback"), ("class", "export")]
        );
        assert_eq!((b.rate.requests.get(), b.rate.burst.get()), (6, 2));
        assert!(export.borrow.is_none());
        // Defaults: the class's budget, else the shared pool.
        let web = route("unknown-principal-gets-web");
        assert_eq!(web.buckets[0].rate, p.default_plan.budgets[0].unwrap());
        assert_eq!(route("b").buckets[0].rate, p.default_plan.shared);
        // Charged like any other bucket: its burst, then no room.
        let mut t = LocalTable::default();
        let now = 1_000 * 1_000_000_000;
        let admitted = (0..10)
            .filter(|_| t.decide(&export, now, 1.0).0.allowed)
            .count();
        assert_eq!(admitted, 2);
    }

    #[test]
    fn queue_releases_in_arrival_order_and_forgets_the_departed() {
        let mut w = WaitQueue::default();
        w.push(7, 0, 300);
        w.push(8, 0, 100);
        w.push(9, 1, 200);
        assert_eq!(w.depth(0), 2);
        assert!(w.remove(7));
        assert!(!w.remove(7));
        assert_eq!(w.take_ready(250), vec![8, 9]);
        assert!(w.is_empty());
    }
}
