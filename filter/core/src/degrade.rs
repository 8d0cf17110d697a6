//! Graceful degradation before the hard 429: a limited request tries its class's ordered
//! fallbacks (`queue`, `fallback_route`, `reject`), and the first that applies fires.
//!
//! A queued request does not re-run its decision when it resumes: it reserves its place at
//! enqueue time by charging its buckets ahead (GCRA "delay" semantics: the bucket goes into
//! debt, and the wait is exactly how long until the charge would have conformed). Requests
//! that arrive later see that debt, so a queue never admits more than the rate, and the
//! order of service is the order of arrival.

use crate::engine::Level;
use crate::policy::ops::ClassOps;
use crate::policy::{ClassId, Fallback};

/// What a limited request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Wait this long, then go through.
    Queue { wait_ns: u64 },
    /// Go through on the fallback route.
    Route,
    /// Refuse with 429. `queue_refused`: the class had a queue that could not take it,
    /// because the wait was too long or the queue was full.
    Reject { queue_refused: bool },
}

impl Step {
    pub fn fallback(self) -> Fallback {
        match self {
            Step::Queue { .. } => Fallback::Queue,
            Step::Route => Fallback::FallbackRoute,
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
/// this worker.
pub fn choose(ops: &ClassOps, wait_ns: u64, depth: usize) -> Step {
    let mut queue_refused = false;
    for f in &ops.fallbacks {
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
    use crate::policy::ops::{FallbackRoute, QueueSettings};

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
