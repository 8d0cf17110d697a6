//! # laneguard-core
//!
//! The pure engine behind laneguard's Envoy filter and rate-limit service. It owns the
//! policy model and its validation ([`policy`]), classification of declared traffic classes
//! ([`classify`]), the GCRA bucket math ([`gcra`]), the decision over every bucket a request
//! touches, including reserved lanes and borrowing ([`engine`]), response headers
//! ([`headers`]) and the one bucket-key codec ([`key`]) that every store uses. Operability
//! lives here too: rollout modes and near misses ([`rollout`]), graceful degradation before
//! the 429 ([`degrade`]) and audit records ([`audit`]); client-controlled text is bounded and
//! escaped before it reaches a log or a record ([`logsafe`]). AI traffic's token quotas,
//! reserved at admission and settled from the response, are in [`ai`]. The assignments of the
//! RLQS server (Envoy's native quota filter) are in [`quota`]. The offline replay ([`replay`]) drives the same decision
//! code with a recorded trace and a virtual clock. The usage ledger that billing reads,
//! and the rule for how decisions, grants and the filters' tallies move it, is [`usage`].
//!
//! It knows nothing of proxy-wasm, tokio or Redis, and time is always an argument
//! (`now_ns`, nanoseconds since the Unix epoch), so every behaviour is deterministic in
//! tests and identical on the host and in `wasm32-wasip1`.

pub mod ai;
pub mod audit;
pub mod card;
pub mod classify;
pub mod declared;
pub mod degrade;
pub mod engine;
pub mod gcra;
pub mod headers;
pub mod key;
pub mod lint;
pub mod logsafe;
pub mod map;
pub mod peer;
pub mod policy;
pub mod quota;
pub mod rate;
pub mod reconnect;
pub mod replay;
pub mod rollout;
pub mod usage;

pub use engine::{
    plan, Bucket, BucketKind, Evaluation, Level, LocalTable, Pending, Plan, Reject, RequestInfo,
    Unreported, MAX_UNREPORTED_BUCKETS,
};
pub use policy::{parse, parse_raw, FailureMode, Fallback, Mode, Policy, PolicyError};
pub use rate::{Rate, Window};
