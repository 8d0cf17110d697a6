//! Network benchmark helpers shared by `laneguard-delay-proxy` and `laneguard-openloop`.
//!
//! These machines have no `netem` qdisc, so round-trip time is injected in user space. Both
//! tools need sleeps far finer than tokio's 1 ms timer wheel (a 1 ms RTT is 0.5 ms each way),
//! so the timing-critical parts sleep on OS threads with the kernel's timer slack lowered:
//! the default 50 µs slack alone would be a tenth of the delay being injected.

use std::time::{Duration, Instant};

/// Ask the kernel to wake this thread (the main thread, and the threads it creates afterwards, which inherit
/// the value) as close to its deadlines as it can, through `/proc/self/timerslack_ns`
/// (no `unsafe` prctl needed). Best effort: where it is refused, sleeps are merely up to
/// 50 µs late, and `laneguard-delay-proxy --ping` shows it.
pub fn precise_timers() -> bool {
    std::fs::write("/proc/self/timerslack_ns", b"1").is_ok()
}

/// Sleeps to deadlines on one OS thread, learning how late the kernel wakes it.
///
/// In a VM the kernel oversleeps by 70-500 µs (measured on this project's machines, even
/// with the timer slack lowered), and the error grows with the sleep. So each sleep is
/// shortened by the oversleep seen so far (an exponentially weighted average), and the last
/// few µs before the deadline, if any are left, are spun. A pure spin would burn a core per
/// delayed direction; a yield can lose the CPU for a whole time slice on a busy machine.
///
/// Spinning is only affordable while deadlines are sparse. When they come closer together
/// than [`DENSE`] (a high request or chunk rate), spinning to each one would keep the thread
/// on the CPU all the time and starve whatever shares that CPU (the load generator's own
/// client, the service, the upstream): measured, `laneguard-openloop` at 5,000 req/s then
/// queued 2 s of backlog in front of a plain router. So dense deadlines are slept to in
/// full: a wake-up is late by the kernel's oversleep, never early, and every deadline that
/// passed meanwhile is served at once on that wake-up (natural batching).
#[derive(Debug, Default)]
pub struct Sleeper {
    late_ns: f64,
    last: Option<Instant>,
}

/// Deadlines closer together than this are slept to without spinning (see [`Sleeper`]).
pub const DENSE: Duration = Duration::from_millis(1);

impl Sleeper {
    pub fn new() -> Sleeper {
        Sleeper::default()
    }

    pub fn sleep_until(&mut self, deadline: Instant) {
        let now = Instant::now();
        if deadline <= now {
            return;
        }
        let dense = self
            .last
            .is_some_and(|l| deadline.saturating_duration_since(l) < DENSE);
        self.last = Some(deadline);
        let left = deadline - now;
        if dense {
            std::thread::sleep(left);
            return;
        }
        let guess = Duration::from_nanos(self.late_ns as u64);
        if left > guess {
            let want = left - guess;
            let t = Instant::now();
            std::thread::sleep(want);
            let late = t.elapsed().saturating_sub(want).as_nanos() as f64;
            self.late_ns = 0.9 * self.late_ns + 0.1 * late.min(2_000_000.0);
        }
        // What is left now is at most the current oversleep estimate: spin it, bounded.
        let spin_until = deadline.min(Instant::now() + Duration::from_micros(200));
        while Instant::now() < spin_until {
            std::hint::spin_loop();
        }
        // The estimate overshot the spin bound: sleep the rest rather than wake early.
        let now = Instant::now();
        if now < deadline {
            std::thread::sleep(deadline - now);
        }
    }
}

/// Percentiles of a latency histogram in µs, as the benchmark's JSON rows name them.
pub fn percentiles_us(h: &hdrhistogram::Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "p50_us": h.value_at_quantile(0.50),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
        "mean_us": h.mean(),
        "count": h.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_wakes_before_the_deadline_sparse_or_dense() {
        let mut s = Sleeper::new();
        let start = Instant::now();
        // Sparse (2 ms apart), then dense (100 µs apart).
        let mut at: Vec<Instant> = (1..=5)
            .map(|i| start + Duration::from_millis(2 * i))
            .collect();
        let dense_from = start + Duration::from_millis(12);
        at.extend((0..20).map(|i| dense_from + Duration::from_micros(100 * i)));
        for d in at {
            s.sleep_until(d);
            assert!(Instant::now() >= d, "woke before its deadline");
        }
    }
}
