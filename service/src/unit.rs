//! Time units, as the wire and the config name them, and how they map to
//! `laneguard_core::Window`.
//!
//! The RLS protocol defines SECOND, MINUTE, HOUR, DAY, WEEK, MONTH and YEAR. The core's
//! `Window` has second to day, so the longer units are recognised (and named in errors) but
//! not yet served: [`Unit::window`] is the one place to extend when the core grows them.

use std::fmt;

use laneguard_core::Window;
use laneguard_protos::envoy::r#type::v3::RateLimitUnit;
use laneguard_protos::envoy::service::ratelimit::v3::rate_limit_response::rate_limit;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    const ALL: [Unit; 7] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];

    /// From `envoy.type.v3.RateLimitUnit` (a descriptor's `limit.unit`). `UNKNOWN` and
    /// undefined numbers give `None`.
    pub fn from_proto(value: i32) -> Option<Unit> {
        Some(match RateLimitUnit::try_from(value).ok()? {
            RateLimitUnit::Unknown => return None,
            RateLimitUnit::Second => Unit::Second,
            RateLimitUnit::Minute => Unit::Minute,
            RateLimitUnit::Hour => Unit::Hour,
            RateLimitUnit::Day => Unit::Day,
            RateLimitUnit::Week => Unit::Week,
            RateLimitUnit::Month => Unit::Month,
            RateLimitUnit::Year => Unit::Year,
        })
    }

    /// The core window this unit counts over, if the core supports it.
    pub fn window(self) -> Option<Window> {
        match self {
            Unit::Second => Some(Window::Second),
            Unit::Minute => Some(Window::Minute),
            Unit::Hour => Some(Window::Hour),
            Unit::Day => Some(Window::Day),
            Unit::Week | Unit::Month | Unit::Year => None,
        }
    }

    pub fn from_window(window: Window) -> Unit {
        match window {
            Window::Second => Unit::Second,
            Window::Minute => Unit::Minute,
            Window::Hour => Unit::Hour,
            Window::Day => Unit::Day,
        }
    }

    /// `RateLimitResponse.RateLimit.Unit`, for `DescriptorStatus.current_limit`.
    pub fn to_response(self) -> rate_limit::Unit {
        match self {
            Unit::Second => rate_limit::Unit::Second,
            Unit::Minute => rate_limit::Unit::Minute,
            Unit::Hour => rate_limit::Unit::Hour,
            Unit::Day => rate_limit::Unit::Day,
            Unit::Week => rate_limit::Unit::Week,
            Unit::Month => rate_limit::Unit::Month,
            Unit::Year => rate_limit::Unit::Year,
        }
    }

    /// The lowercase name used in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Case-insensitive (`minute`, `MINUTE`), as in envoyproxy/ratelimit's config.
impl<'de> Deserialize<'de> for Unit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Unit, D::Error> {
        struct UnitVisitor;
        impl Visitor<'_> for UnitVisitor {
            type Value = Unit;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("one of second, minute, hour, day, week, month, year")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Unit, E> {
                Unit::ALL
                    .into_iter()
                    .find(|u| u.name().eq_ignore_ascii_case(v))
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        deserializer.deserialize_str(UnitVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_numbers_follow_upstream() {
        assert_eq!(Unit::from_proto(0), None);
        assert_eq!(Unit::from_proto(1), Some(Unit::Second));
        assert_eq!(Unit::from_proto(4), Some(Unit::Day));
        assert_eq!(Unit::from_proto(5), Some(Unit::Month));
        assert_eq!(Unit::from_proto(6), Some(Unit::Year));
        assert_eq!(Unit::from_proto(7), Some(Unit::Week));
        assert_eq!(Unit::from_proto(8), None);
        for u in Unit::ALL {
            assert_eq!(Unit::from_proto(u.to_response() as i32), Some(u));
        }
    }

    #[test]
    fn windows_round_trip() {
        for w in [Window::Second, Window::Minute, Window::Hour, Window::Day] {
            assert_eq!(Unit::from_window(w).window(), Some(w));
        }
        assert_eq!(Unit::Week.window(), None);
    }
}
