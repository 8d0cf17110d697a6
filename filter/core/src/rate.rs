//! Rates as "N per window, with an explicit burst". The window is part of the field name in
//! the policy (`per_minute: 60`), so a rate can never be misread as "one every N seconds".

use std::num::NonZeroU32;

/// The window a rate is counted over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Window {
    Second,
    Minute,
    Hour,
    Day,
}

impl Window {
    pub const fn seconds(self) -> u64 {
        match self {
            Window::Second => 1,
            Window::Minute => 60,
            Window::Hour => 3_600,
            Window::Day => 86_400,
        }
    }

    pub const fn nanos(self) -> u64 {
        self.seconds() * 1_000_000_000
    }

    /// The policy field that names this window.
    pub const fn field(self) -> &'static str {
        match self {
            Window::Second => "per_second",
            Window::Minute => "per_minute",
            Window::Hour => "per_hour",
            Window::Day => "per_day",
        }
    }
}

/// `requests` per `window`, of which up to `burst` may arrive at once.
/// Both counts are non-zero by construction, so an invalid rate cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub requests: NonZeroU32,
    pub window: Window,
    pub burst: NonZeroU32,
}

impl Rate {
    pub fn new(requests: u32, window: Window, burst: u32) -> Option<Rate> {
        Some(Rate {
            requests: NonZeroU32::new(requests)?,
            window,
            burst: NonZeroU32::new(burst)?,
        })
    }

    /// Nanoseconds between two requests at the steady rate (the GCRA emission interval).
    /// At least 1 ns, so the arithmetic below never divides by or multiplies with zero.
    pub fn interval_ns(&self) -> u64 {
        (self.window.nanos() / u64::from(self.requests.get())).max(1)
    }

    /// This rate expressed over a (larger or equal) window, as an exact count.
    /// Windows divide each other (1 s, 60 s, 3600 s, 86400 s), so the count is exact.
    pub fn count_over(&self, window: Window) -> u64 {
        u64::from(self.requests.get()) * window.seconds() / self.window.seconds()
    }
}
