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
#[derive(Debug, Default)]
pub struct Sleeper {
    late_ns: f64,
}

impl Sleeper {
    pub fn new() -> Sleeper {
        Sleeper::default()
    }

    pub fn sleep_until(&mut self, deadline: Instant) {
        let now = Instant::now();
        if deadline <= now {
            return;
        }
        let left = deadline - now;
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
