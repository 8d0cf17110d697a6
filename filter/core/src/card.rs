//! The Rate-Limit Rollout Review Card (seed 000, "Asset: The Rate-Limit Rollout Review Card"),
//! filled from evidence: the policy (through its [competition map](crate::map)), the audit
//! records of a shadow phase, and optionally the filter's Prometheus counters.
//!
//! Every "evidence required before harder enforcement" line and every "stop condition" is a
//! [`Check`] that passes or fails with the counts and the record ids behind it, and the card
//! ends with a verdict, ready to enforce or not, and the reasons. What the gateway cannot
//! see (downstream convergence, the owning team) is said as such: a check that stands in for
//! it says what it measures (`measures`), and free-text fields come from the caller or stay
//! "to fill in".
//!
//! Pure: the shell reads the files, hands over parsed JSON and text, and prints the result.

use crate::map::{self, CompetitionMap};
use crate::policy::{Consequence, Policy};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

const NS: u64 = 1_000_000_000;

/// The fields of an audit record ([`crate::audit::Record`]) the card reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EvidenceRecord {
    /// Where it is in the log: `#<seq>` for the service's hash-chained log, `line N` otherwise.
    pub id: String,
    pub request_id: Option<String>,
    pub time_ns: Option<u64>,
    pub events: Vec<String>,
    pub tenant: String,
    pub principal: String,
    pub declared: Option<String>,
    pub granted: String,
    pub forged: bool,
    /// The bucket that tripped first.
    pub bucket: Option<String>,
    pub mode: String,
    pub status: u16,
    pub active_classes: Vec<String>,
}

impl EvidenceRecord {
    /// From one record's JSON; `None` if it is not an audit record (no `events` or class).
    pub fn from_json(id: String, v: &Value) -> Option<EvidenceRecord> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let class = v.get("class")?;
        let events = v
            .get("events")?
            .as_array()?
            .iter()
            .filter_map(|e| e.as_str().map(str::to_string))
            .collect();
        Some(EvidenceRecord {
            id,
            request_id: s("request_id"),
            time_ns: s("time").as_deref().and_then(crate::audit::parse_time),
            events,
            tenant: s("tenant").unwrap_or_default(),
            principal: s("principal").unwrap_or_default(),
            declared: class
                .get("declared")
                .and_then(Value::as_str)
                .map(str::to_string),
            granted: class.get("granted")?.as_str()?.to_string(),
            forged: class
                .get("forged")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bucket: s("bucket"),
            mode: s("mode").unwrap_or_default(),
            status: v
                .get("status")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok())
                .unwrap_or(200),
            active_classes: v
                .get("active_classes")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    fn has(&self, event: &str) -> bool {
        self.events.iter().any(|e| e == event)
    }

    /// Refused or would have been refused.
    fn refused(&self) -> bool {
        self.has("limited") || self.has("shadow_limited")
    }

    /// Actually refused: an enforced limit whose fallback did not let it through, or the
    /// service failed and the class failed closed.
    fn really_refused(&self) -> bool {
        (self.has("limited") || self.has("degraded")) && self.status >= 400
    }

    /// `#12 (rid 3f2a…)`.
    pub fn label(&self) -> String {
        match &self.request_id {
            Some(r) => format!("{} (request {r})", self.id),
            None => self.id.clone(),
        }
    }
}

/// One class's counters from the filter's Prometheus scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClassStats {
    pub allowed: u64,
    pub limited: u64,
    pub shadow_limited: u64,
    pub near_miss: u64,
    pub degraded: u64,
    pub forged: u64,
}

/// The filter's counters (`laneguard_*` series of Envoy's `/stats/prometheus`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub classes: BTreeMap<String, ClassStats>,
    /// `(protected class, other class)`: squeezes of the lane while the other was active.
    pub collisions: BTreeMap<String, u64>,
    pub forged_class: u64,
    /// Audit records the filter could not ship: the log is missing that many.
    pub audit_dropped: u64,
}

fn metric_name(class: &str) -> String {
    class
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Read the `laneguard_*` counters of a Prometheus text scrape. Both forms are read: the flat
/// names (`laneguard_class_repair_near_miss`) of an Envoy without tag extraction, and the
/// labelled ones (`laneguard_class_near_miss{class="repair"}`) of `envoy/demo/envoy.yaml`'s
/// `stats_config.stats_tags`. Series of one name and label set are summed.
pub fn parse_stats(text: &str, policy: &Policy) -> Stats {
    // (name, labels sorted) -> value.
    let mut values: BTreeMap<(String, Vec<(String, String)>), u64> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n.trim(), prom_labels(rest.trim_end_matches('}'))),
            None => (series.trim(), Vec::new()),
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        if v.is_finite() && v >= 0.0 {
            *values.entry((name.to_string(), labels)).or_default() += v as u64;
        }
    }
    let get = |n: &str, labels: &[(&str, &str)]| {
        let mut key: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        key.sort();
        values.get(&(n.to_string(), key)).copied()
    };
    let flat = |n: &str| get(n, &[]).unwrap_or(0);
    let mut stats = Stats {
        forged_class: flat("laneguard_forged_class"),
        audit_dropped: flat("laneguard_audit_dropped"),
        ..Stats::default()
    };
    for c in &policy.classes {
        let p = format!("laneguard_class_{}", metric_name(&c.name));
        let class = |metric: &str| {
            get(&format!("{p}_{metric}"), &[])
                .or_else(|| get(&format!("laneguard_class_{metric}"), &[("class", &c.name)]))
                .unwrap_or(0)
        };
        stats.classes.insert(
            c.name.clone(),
            ClassStats {
                allowed: class("allowed"),
                limited: class("limited"),
                shadow_limited: class("shadow_limited"),
                near_miss: class("near_miss"),
                degraded: class("degraded"),
                forged: class("forged"),
            },
        );
        for o in &policy.classes {
            let n = format!(
                "laneguard_collision_{}_{}",
                metric_name(&c.name),
                metric_name(&o.name)
            );
            let v = get(&n, &[]).or_else(|| {
                get(
                    "laneguard_collision",
                    &[("class", &c.name), ("rival", &o.name)],
                )
            });
            if let Some(v) = v {
                stats.collisions.insert(format!("{}/{}", c.name, o.name), v);
            }
        }
    }
    stats
}

/// `a="x",b="y"` (Prometheus text format; values here never contain quotes), sorted.
fn prom_labels(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = text
        .split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        })
        .collect();
    out.sort();
    out
}

/// Thresholds of the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Thresholds {
    /// A protected class refused over a stretch this long misses its convergence threshold.
    pub convergence_s: u64,
    /// Near misses on protected lanes that are still acceptable.
    pub max_near_misses: u64,
    /// How long shadow evidence must cover to count as a full business cycle.
    pub business_cycle_s: u64,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds {
            convergence_s: 60,
            max_near_misses: 0,
            business_cycle_s: 86_400,
        }
    }
}

/// Fields the evidence cannot fill.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Fields {
    pub change: Option<String>,
    pub owner: Option<String>,
    pub goal: Option<String>,
}

/// Everything the card is computed from.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub policy: &'a Policy,
    pub records: &'a [EvidenceRecord],
    pub stats: Option<&'a Stats>,
    /// A problem with the evidence itself (a broken hash chain, unreadable lines).
    pub integrity: Vec<String>,
    /// What the shell checked about the evidence (a verified hash chain and its head).
    pub notes: Vec<String>,
    /// Extra observation period (for example a trace's first and last request), ns.
    pub observed: Option<(u64, u64)>,
    pub fields: Fields,
    pub thresholds: Thresholds,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Pass,
    Fail,
}

/// One evaluated line of the card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// The seed's wording.
    pub name: &'static str,
    /// What the gateway measures for it.
    pub measures: String,
    pub verdict: Verdict,
    /// The counts, in words.
    pub summary: String,
    pub counts: BTreeMap<String, u64>,
    /// The records behind a FAIL (all of them; renderers may shorten).
    pub records: Vec<String>,
}

impl Check {
    fn new(
        name: &'static str,
        measures: impl Into<String>,
        pass: bool,
        summary: String,
        counts: BTreeMap<String, u64>,
        records: Vec<String>,
    ) -> Check {
        Check {
            name,
            measures: measures.into(),
            verdict: if pass { Verdict::Pass } else { Verdict::Fail },
            summary,
            counts,
            records,
        }
    }

    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Pass
    }
}

/// How much the shadow phase covered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShadowPhase {
    pub completed: bool,
    /// Records written in shadow mode (any event) or shadow-limited.
    pub shadow_records: usize,
    pub first: Option<String>,
    pub last: Option<String>,
    pub covered_s: u64,
    pub hour_boundary: bool,
    pub full_cycle: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Question {
    pub question: &'static str,
    pub answer: String,
}

/// A yes/no field and what it rests on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct YesNo {
    pub yes: bool,
    pub because: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Card {
    pub change: Option<String>,
    pub owner: Option<String>,
    pub goal: Option<String>,
    /// `name (consequence)`, policy order.
    pub traffic_classes: Vec<String>,
    pub protected_classes: Vec<String>,
    /// Classes seen in the evidence that the policy does not have.
    pub unknown_classes: Vec<String>,
    pub recovery_paths_reviewed: YesNo,
    pub shared_identities: Vec<String>,
    pub internal_automation_on_customer_credentials: YesNo,
    pub shadow_phase: ShadowPhase,
    pub questions: Vec<Question>,
    pub evidence: Vec<Check>,
    pub stop_conditions: Vec<Check>,
    pub records: usize,
    pub integrity: Vec<String>,
    pub notes: Vec<String>,
    pub ready_to_enforce: bool,
    pub reasons: Vec<String>,
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn labels<'a>(rs: impl Iterator<Item = &'a EvidenceRecord>) -> Vec<String> {
    rs.map(EvidenceRecord::label).collect()
}

fn per_class(rs: &[&EvidenceRecord]) -> String {
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rs {
        *by.entry(r.granted.as_str()).or_default() += 1;
    }
    by.iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn principal_line(pr: &map::PrincipalRow, verb: &str, suffix: &str) -> String {
    format!(
        "principal {} {verb} {}{suffix}",
        pr.name,
        pr.may_declare.join(", ")
    )
}

/// `; active then: a, b`: the other classes active when the records were written.
fn active_then(rs: &[&EvidenceRecord]) -> String {
    let active: BTreeSet<&str> = rs
        .iter()
        .flat_map(|r| r.active_classes.iter().map(String::as_str))
        .collect();
    if active.is_empty() {
        String::new()
    } else {
        format!(
            "; other classes active then: {}",
            active.into_iter().collect::<Vec<_>>().join(", ")
        )
    }
}

/// The longest stretch of refusals of one class: refusals less than `gap_ns` apart form one
/// stretch; its length is from its first to its last refusal.
fn longest_stretch_ns(mut times: Vec<u64>, gap_ns: u64) -> u64 {
    times.sort_unstable();
    let mut best = 0;
    let mut start = None;
    let mut prev = 0;
    for t in times {
        match start {
            Some(s) if t.saturating_sub(prev) <= gap_ns => best = best.max(t - s),
            _ => start = Some(t),
        }
        prev = t;
    }
    best
}

/// Compute the card.
pub fn card(inputs: &Inputs<'_>) -> Card {
    let p = inputs.policy;
    let m: CompetitionMap = map::map(p);
    let t = inputs.thresholds;
    let records = inputs.records;
    let class_of = |r: &EvidenceRecord| p.class_id(&r.granted);
    let consequence = |r: &EvidenceRecord| class_of(r).map(|c| p.classes[c].consequence);
    let is_protected = |r: &EvidenceRecord| consequence(r).is_some_and(Consequence::is_protected);
    let stat = |class: &str| {
        inputs
            .stats
            .and_then(|s| s.classes.get(class))
            .cloned()
            .unwrap_or_default()
    };
    let protected_names: Vec<&str> = p
        .classes
        .iter()
        .filter(|c| c.consequence.is_protected())
        .map(|c| c.name.as_str())
        .collect();
    let of_kind = |k: Consequence| -> Vec<&str> {
        p.classes
            .iter()
            .filter(|c| c.consequence == k)
            .map(|c| c.name.as_str())
            .collect()
    };
    // The records of the classes of consequence `k` that `pick` selects, and how many such
    // requests there were: the records, or what those classes' stats count (`counted`),
    // whichever is more (the log may have lost records the counters kept).
    let evidence_of = |k: Consequence,
                       pick: &dyn Fn(&EvidenceRecord) -> bool,
                       counted: &dyn Fn(&ClassStats) -> u64|
     -> (Vec<&EvidenceRecord>, u64) {
        let rs: Vec<&EvidenceRecord> = records
            .iter()
            .filter(|r| consequence(r) == Some(k) && pick(r))
            .collect();
        let stats: u64 = of_kind(k).iter().map(|c| counted(&stat(c))).sum();
        let n = (rs.len() as u64).max(stats);
        (rs, n)
    };

    // The header fields.
    let traffic_classes = p
        .classes
        .iter()
        .map(|c| format!("{} ({})", c.name, c.consequence.as_str()))
        .collect();
    let protected_classes = p
        .classes
        .iter()
        .filter(|c| c.consequence.is_protected())
        .map(|c| {
            let reserve = p.default_plan.reserves[p.class_id(&c.name).unwrap_or(0)]
                .as_ref()
                .map(|r| map::RateView::new(r).to_string())
                .unwrap_or_default();
            format!("{} ({}, reserve {reserve})", c.name, c.consequence.as_str())
        })
        .collect();
    let unknown_classes: Vec<String> = records
        .iter()
        .filter(|r| class_of(r).is_none())
        .map(|r| r.granted.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    let mut unreviewed = Vec::new();
    for row in m.classes.iter().filter(|c| c.protected) {
        if row.owner.as_deref().is_none_or(|o| o.trim().is_empty()) {
            unreviewed.push(format!("{} has no owner", row.name));
        }
        if row.fallbacks.iter().all(|f| *f == "reject") {
            unreviewed.push(format!("{} has no fallback but the 429", row.name));
        }
    }
    let recovery_paths_reviewed = YesNo {
        yes: unreviewed.is_empty(),
        because: if unreviewed.is_empty() {
            m.classes
                .iter()
                .filter(|c| c.protected)
                .map(|c| {
                    format!(
                        "{}: owner {}, {}",
                        c.name,
                        c.owner.as_deref().unwrap_or(""),
                        c.fallback
                    )
                })
                .collect()
        } else {
            unreviewed
        },
    };

    let forged: Vec<&EvidenceRecord> = records.iter().filter(|r| r.forged).collect();
    let mut shared_identities: Vec<String> = m
        .principals
        .iter()
        .filter(|pr| pr.shares_identity)
        .map(|pr| principal_line(pr, "may land in", ""))
        .collect();
    let mut forged_by: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in &forged {
        *forged_by
            .entry((
                r.principal.clone(),
                r.declared.clone().unwrap_or_else(|| "?".into()),
            ))
            .or_default() += 1;
    }
    for ((principal, declared), n) in &forged_by {
        shared_identities.push(format!(
            "principal {principal} declared {declared}, which it may not: {n} forged-class records"
        ));
    }

    // Seen in the evidence: a principal granted both protected and unprotected classes.
    let mut seen: BTreeMap<&str, (BTreeSet<&str>, BTreeSet<&str>)> = BTreeMap::new();
    for r in records.iter().filter(|r| class_of(r).is_some()) {
        let e = seen.entry(r.principal.as_str()).or_default();
        if is_protected(r) {
            e.0.insert(&r.granted);
        } else {
            e.1.insert(&r.granted);
        }
    }
    let mut mixed: Vec<String> = m
        .principals
        .iter()
        .filter(|pr| pr.mixes_protected)
        .map(|pr| principal_line(pr, "may declare", " (policy)"))
        .collect();
    for (principal, (prot, unprot)) in &seen {
        if !prot.is_empty() && !unprot.is_empty() {
            mixed.push(format!(
                "principal {principal} was seen in {} and {} (evidence)",
                prot.iter().copied().collect::<Vec<_>>().join(", "),
                unprot.iter().copied().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    let internal_automation = YesNo {
        yes: !mixed.is_empty(),
        because: mixed,
    };

    // The shadow phase.
    let shadow: Vec<&EvidenceRecord> = records
        .iter()
        .filter(|r| r.mode == "shadow" || r.has("shadow_limited"))
        .collect();
    let times: Vec<u64> = shadow
        .iter()
        .filter_map(|r| r.time_ns)
        .chain(inputs.observed.into_iter().flat_map(|(a, b)| [a, b]))
        .collect();
    let (first, last) = (times.iter().min().copied(), times.iter().max().copied());
    let covered_s = match (first, last) {
        (Some(a), Some(b)) => (b - a) / NS,
        _ => 0,
    };
    let hour_boundary = match (first, last) {
        (Some(a), Some(b)) => a / (3_600 * NS) != b / (3_600 * NS),
        _ => false,
    };
    let full_cycle = covered_s >= t.business_cycle_s;
    let shadow_phase = ShadowPhase {
        completed: !shadow.is_empty() && full_cycle,
        shadow_records: shadow.len(),
        first: first.map(crate::audit::rfc3339_ms),
        last: last.map(crate::audit::rfc3339_ms),
        covered_s,
        hour_boundary,
        full_cycle,
    };

    // Evidence required before harder enforcement.
    let starving: Vec<&EvidenceRecord> = records
        .iter()
        .filter(|r| is_protected(r) && r.refused())
        .collect();
    let rec_limited = starving.iter().filter(|r| r.has("limited")).count() as u64;
    let rec_shadow = starving.iter().filter(|r| r.has("shadow_limited")).count() as u64;
    let (st_limited, st_shadow) = protected_names.iter().fold((0, 0), |(l, s), c| {
        let x = stat(c);
        (l + x.limited, s + x.shadow_limited)
    });
    let (limited, shadow_limited) = (rec_limited.max(st_limited), rec_shadow.max(st_shadow));
    let starvation = Check::new(
        "no protected workflow starvation",
        format!(
            "limited and shadow-limited requests of the protected classes ({})",
            protected_names.join(", ")
        ),
        limited + shadow_limited == 0,
        if starving.is_empty() && limited + shadow_limited == 0 {
            "no protected request was limited or would have been".into()
        } else {
            format!(
                "{limited} limited, {shadow_limited} shadow-limited ({} records: {}){}",
                starving.len(),
                per_class(&starving),
                active_then(&starving)
            )
        },
        counts(&[
            ("limited", limited),
            ("shadow_limited", shadow_limited),
            ("records", starving.len() as u64),
        ]),
        labels(starving.iter().copied()),
    );

    let near: Vec<&EvidenceRecord> = records
        .iter()
        .filter(|r| is_protected(r) && r.has("near_miss"))
        .collect();
    let near_n = (near.len() as u64).max(protected_names.iter().map(|c| stat(c).near_miss).sum());
    let lag = Check::new(
        "acceptable convergence lag",
        format!(
            "headroom of the protected lanes: near misses (a lane within {}% of empty), at most {}",
            p.ops.near_miss_pct, t.max_near_misses
        ),
        near_n <= t.max_near_misses && starvation.passed(),
        format!(
            "{near_n} near misses{}",
            if starvation.passed() {
                String::new()
            } else {
                "; and protected requests were limited (above)".into()
            }
        ),
        counts(&[("near_misses", near_n)]),
        labels(near.iter().copied()),
    );

    let recovery = of_kind(Consequence::Recovery);
    let (recovery_bad, recovery_n) = evidence_of(
        Consequence::Recovery,
        &|r| r.refused() || r.has("degraded"),
        &|s| s.limited + s.shadow_limited,
    );
    let support = Check::new(
        "support recovery remains usable",
        format!(
            "limited, shadow-limited or degraded requests of the recovery classes ({})",
            if recovery.is_empty() {
                "none in the policy".to_string()
            } else {
                recovery.join(", ")
            }
        ),
        !recovery.is_empty() && recovery_n == 0,
        if recovery.is_empty() {
            "the policy has no recovery class: support replay shares a budget with something".into()
        } else {
            format!("{recovery_n} recovery requests limited or degraded")
        },
        counts(&[("refused_or_degraded", recovery_n)]),
        labels(recovery_bad.iter().copied()),
    );

    let windows = Check::new(
        "export and reconciliation windows still meet business expectations",
        format!(
            "the shadow evidence spans a full business cycle ({} h: a night and every hour boundary, when exports and reconciliation run)",
            t.business_cycle_s / 3_600
        ),
        full_cycle && !shadow.is_empty(),
        if shadow.is_empty() {
            "no shadow evidence: no rule ran in shadow, or nothing was recorded".into()
        } else {
            format!(
                "shadow evidence covers {} s{}{}",
                covered_s,
                if hour_boundary {
                    ", across an hour boundary"
                } else {
                    ", no hour boundary"
                },
                if full_cycle {
                    ""
                } else {
                    ", less than a full business cycle"
                }
            )
        },
        counts(&[
            ("covered_s", covered_s),
            ("shadow_records", shadow.len() as u64),
        ]),
        Vec::new(),
    );

    let mixed_principals: Vec<&str> = m
        .principals
        .iter()
        .filter(|pr| pr.mixes_protected)
        .map(|pr| pr.name.as_str())
        .collect();
    let forged_n = (forged.len() as u64).max(inputs.stats.map_or(0, |s| s.forged_class));
    let hidden = Check::new(
        "no hidden shared identity still bypassing policy intent",
        "forged-class records, and principals that may declare both protected and unprotected classes",
        forged_n == 0 && mixed_principals.is_empty(),
        format!(
            "{forged_n} forged-class requests; {} principals mix protected and unprotected classes{}",
            mixed_principals.len(),
            if mixed_principals.is_empty() {
                String::new()
            } else {
                format!(" ({})", mixed_principals.join(", "))
            }
        ),
        counts(&[
            ("forged", forged_n),
            ("mixed_principals", mixed_principals.len() as u64),
        ]),
        labels(forged.iter().copied()),
    );

    // Stop conditions.
    let mut stretches = Vec::new();
    let mut stretch_records = Vec::new();
    let mut longest = 0;
    for (id, c) in p.classes.iter().enumerate() {
        if !c.consequence.is_protected() {
            continue;
        }
        let gap_ns = p.default_plan.reserves[id].map_or(NS, |r| r.window.nanos());
        let mine: Vec<&EvidenceRecord> = starving
            .iter()
            .copied()
            .filter(|r| r.granted == c.name)
            .collect();
        let s = longest_stretch_ns(mine.iter().filter_map(|r| r.time_ns).collect(), gap_ns) / NS;
        if !mine.is_empty() {
            stretches.push(format!("{} {s} s", c.name));
        }
        if s >= t.convergence_s {
            stretch_records.extend(labels(mine.into_iter()));
        }
        longest = longest.max(s);
    }
    let stop_convergence = Check::new(
        "protected workflow misses convergence threshold",
        format!(
            "the longest stretch over which a protected class kept being refused (limited or shadow-limited), against {} s",
            t.convergence_s
        ),
        longest < t.convergence_s,
        if stretches.is_empty() {
            "no protected refusals".into()
        } else {
            format!("longest stretch: {}", stretches.join(", "))
        },
        counts(&[("longest_stretch_s", longest)]),
        stretch_records,
    );

    let (replay_refused, replay_n) = evidence_of(
        Consequence::Recovery,
        &EvidenceRecord::really_refused,
        &|s| s.limited,
    );
    let stop_replay = Check::new(
        "replay or remediation path becomes unreliable",
        "recovery requests actually refused (429, or 503 when the service failed and the class failed closed)",
        replay_n == 0,
        format!("{replay_n} recovery requests refused"),
        counts(&[("refused", replay_n)]),
        labels(replay_refused.iter().copied()),
    );

    let (repair_refused, repair_n) =
        evidence_of(Consequence::Repair, &EvidenceRecord::really_refused, &|s| {
            s.limited
        });
    let stop_divergence = Check::new(
        "morning downstream state diverges",
        "reconciliation (repair-class) requests actually refused: each is a repair that did not happen (downstream state itself is not visible to the gateway)",
        repair_n == 0,
        format!("{repair_n} repair requests refused"),
        counts(&[("refused", repair_n)]),
        labels(repair_refused.iter().copied()),
    );

    // A protected request that tripped a bucket other than its own reserve while a class it
    // must not compete with was active: they shared that bucket.
    let shared_budget: Vec<&EvidenceRecord> = records
        .iter()
        .filter(|r| is_protected(r) && r.refused())
        .filter(|r| {
            r.bucket
                .as_deref()
                .is_some_and(|b| b != format!("reserve:{}", r.granted))
        })
        .filter(|r| {
            let Some(a) = class_of(r) else { return false };
            r.active_classes.iter().any(|o| {
                p.class_id(o)
                    .is_some_and(|b| b != a && map::excluded(p, a, b))
            })
        })
        .collect();
    let guaranteed: Vec<String> = m
        .collisions
        .iter()
        .filter(|c| c.guaranteed)
        .map(|c| format!("{} and {} in {}", c.a, c.b, c.pool))
        .collect();
    let stat_collisions: u64 = inputs
        .stats
        .map(|s| {
            s.collisions
                .iter()
                .filter(|(k, _)| {
                    let mut it = k.splitn(2, '/');
                    match (
                        it.next().and_then(|a| p.class_id(a)),
                        it.next().and_then(|b| p.class_id(b)),
                    ) {
                        (Some(a), Some(b)) => map::excluded(p, a, b),
                        _ => false,
                    }
                })
                .map(|(_, v)| *v)
                .sum()
        })
        .unwrap_or(0);
    let stop_shared = Check::new(
        "critical internal tool shares a budget it was not supposed to share",
        "pools of the map that two must-not-compete classes both draw from, and protected requests refused by a bucket other than their reserve while such a rival was active",
        guaranteed.is_empty() && shared_budget.is_empty(),
        format!(
            "{} shared pools in the policy{}; {} records{}",
            guaranteed.len(),
            if guaranteed.is_empty() {
                String::new()
            } else {
                format!(" ({})", guaranteed.join("; "))
            },
            shared_budget.len(),
            if stat_collisions > 0 {
                format!(
                    "; {stat_collisions} squeezes of a protected lane while a rival was active (stats: collision evidence, not a shared budget)"
                )
            } else {
                String::new()
            }
        ),
        counts(&[
            ("policy_pools", guaranteed.len() as u64),
            ("records", shared_budget.len() as u64),
            ("squeezes_with_rival_active", stat_collisions),
        ]),
        labels(shared_budget.iter().copied()),
    );

    let questions = questions(p, &m, t);
    let evidence = vec![starvation, lag, support, windows, hidden];
    let stop_conditions = vec![stop_convergence, stop_replay, stop_divergence, stop_shared];
    let mut integrity = inputs.integrity.clone();
    if let Some(s) = inputs.stats {
        if s.audit_dropped > 0 {
            integrity.push(format!(
                "the filter dropped {} audit records: the log is incomplete (counts above use the larger of log and stats)",
                s.audit_dropped
            ));
        }
    }
    let mut reasons: Vec<String> = evidence
        .iter()
        .map(|c| ("evidence", c))
        .chain(stop_conditions.iter().map(|c| ("stop condition", c)))
        .filter(|(_, c)| !c.passed())
        .map(|(kind, c)| format!("{kind} FAIL: {}: {}", c.name, c.summary))
        .collect();
    if !shadow_phase.completed {
        reasons.push("the would-have-been-throttled phase is not completed".into());
    }
    reasons.extend(
        integrity
            .iter()
            .map(|i| format!("the evidence is not intact: {i}")),
    );
    let ready = reasons.is_empty();
    if ready {
        reasons.push(format!(
            "every evidence line and stop condition passes over {} s of shadow evidence ({} records)",
            shadow_phase.covered_s,
            records.len()
        ));
    }
    Card {
        change: inputs.fields.change.clone(),
        owner: inputs.fields.owner.clone(),
        goal: inputs.fields.goal.clone(),
        traffic_classes,
        protected_classes,
        unknown_classes,
        recovery_paths_reviewed,
        shared_identities,
        internal_automation_on_customer_credentials: internal_automation,
        shadow_phase,
        questions,
        evidence,
        stop_conditions,
        records: records.len(),
        integrity,
        notes: inputs.notes.clone(),
        ready_to_enforce: ready,
        reasons,
    }
}

fn questions(p: &Policy, m: &CompetitionMap, t: Thresholds) -> Vec<Question> {
    let rows = |k: Consequence| -> Vec<&map::ClassRow> {
        m.classes
            .iter()
            .filter(|c| c.consequence == k.as_str())
            .collect()
    };
    let describe = |c: &map::ClassRow| {
        format!(
            "{}{}: {}",
            c.name,
            c.purpose
                .as_ref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default(),
            c.burst_shape
        )
    };
    let protected: Vec<String> = m
        .classes
        .iter()
        .filter(|c| c.protected)
        .map(describe)
        .collect();
    let shared: Vec<&str> = m
        .pools
        .iter()
        .find(|pl| pl.id == "shared")
        .map(|pl| {
            pl.members
                .iter()
                .filter(|mb| mb.draw == map::Draw::Lane)
                .map(|mb| mb.class.as_str())
                .collect()
        })
        .unwrap_or_default();
    let mut separate: Vec<String> = protected.clone();
    for c in &m.classes {
        for o in &c.must_not_compete_with {
            if c.name < *o {
                separate.push(format!("{} must not compete with {o}", c.name));
            }
        }
    }
    let fallback_of = |k: Consequence| -> String {
        let rs = rows(k);
        if rs.is_empty() {
            return format!("no {} class in the policy", k.as_str());
        }
        rs.iter()
            .map(|c| {
                if c.fallbacks.iter().all(|f| *f == "reject") && !c.borrow {
                    format!("{}: none approved (429 only)", c.name)
                } else {
                    format!("{}: {}", c.name, c.fallback)
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let _ = p;
    vec![
        Question {
            question: "Which workflows must still converge even when the tenant is noisy?",
            answer: if protected.is_empty() {
                "none is protected".into()
            } else {
                protected.join("; ")
            },
        },
        Question {
            question: "Which traffic classes are allowed to compete?",
            answer: if shared.is_empty() {
                "none".into()
            } else {
                format!("in the tenant's shared pool: {}", shared.join(", "))
            },
        },
        Question {
            question: "Which traffic classes must have reserved or separate capacity?",
            answer: separate.join("; "),
        },
        Question {
            question: "If support replay gets 429, what is the approved fallback?",
            answer: fallback_of(Consequence::Recovery),
        },
        Question {
            question: "If reconciliation gets 429, when does that become workflow risk rather than transient retry?",
            answer: format!(
                "{}. Risk: any enforced refusal (stop condition \"morning downstream state diverges\"), or refusals over {} s (\"protected workflow misses convergence threshold\")",
                fallback_of(Consequence::Repair),
                t.convergence_s
            ),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;
    use serde_json::json;

    const POLICY: &str = r#"
version: 1
classes:
  - { name: web, consequence: time_sensitive, owner: ui, budget: { per_minute: 60, burst: 10 } }
  - { name: repair, consequence: repair, owner: ops, reserve: { per_minute: 20, burst: 5 }, fallbacks: [queue, reject], mode: shadow, must_not_compete_with: [web], borrow: true }
  - { name: support, consequence: recovery, owner: support, reserve: { per_minute: 10, burst: 2 }, fallbacks: [queue, reject] }
principals:
  - { name: web, default_class: web, may_declare: [web] }
  - { name: recon, default_class: repair, may_declare: [repair] }
  - { name: support, default_class: support, may_declare: [support] }
tenants:
  default: { ceiling: { per_minute: 120, burst: 30 } }
"#;

    fn rec(seq: u64, time: &str, class: &str, events: &[&str], extra: Value) -> EvidenceRecord {
        let mut v = json!({
            "time": time, "events": events, "tenant": "northwind", "principal": class,
            "class": {"granted": class, "forged": false}, "mode": "shadow", "status": 200,
            "request_id": format!("rid-{seq}"),
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        EvidenceRecord::from_json(format!("#{seq}"), &v).unwrap()
    }

    /// A plain shadow-limited record: the evidence most tests need around the one they vary.
    fn shadow(seq: u64, time: &str, class: &str) -> EvidenceRecord {
        rec(seq, time, class, &["shadow_limited"], json!({}))
    }

    fn get<'a>(c: &'a Card, name: &str) -> &'a Check {
        c.evidence
            .iter()
            .chain(&c.stop_conditions)
            .find(|x| x.name == name)
            .unwrap()
    }

    fn inputs<'a>(p: &'a Policy, rs: &'a [EvidenceRecord]) -> Inputs<'a> {
        Inputs {
            policy: p,
            records: rs,
            stats: None,
            integrity: Vec::new(),
            notes: Vec::new(),
            observed: None,
            fields: Fields::default(),
            thresholds: Thresholds::default(),
        }
    }

    #[test]
    fn a_full_clean_day_is_ready() {
        let p = parse(POLICY).unwrap();
        let rs = [
            shadow(1, "2026-11-24T00:00:00Z", "web"),
            shadow(2, "2026-11-25T00:30:00Z", "web"),
        ];
        let c = card(&inputs(&p, &rs));
        assert!(c.ready_to_enforce, "{:#?}", c.reasons);
        assert!(c.shadow_phase.completed && c.shadow_phase.hour_boundary);
        assert_eq!(c.shadow_phase.covered_s, 86_400 + 1_800);
        assert!(c
            .evidence
            .iter()
            .chain(&c.stop_conditions)
            .all(Check::passed));
    }

    #[test]
    fn a_squeezed_protected_lane_fails_and_names_its_records() {
        let p = parse(POLICY).unwrap();
        let borrowed = json!({"bucket": "shared", "active_classes": ["web"]});
        let rs = [
            shadow(1, "2026-11-24T00:00:00Z", "web"),
            rec(
                2,
                "2026-11-24T08:00:00Z",
                "repair",
                &["near_miss"],
                json!({}),
            ),
            rec(
                3,
                "2026-11-24T08:00:01Z",
                "repair",
                &["shadow_limited"],
                borrowed.clone(),
            ),
            rec(
                4,
                "2026-11-24T08:00:50Z",
                "repair",
                &["shadow_limited"],
                borrowed.clone(),
            ),
            rec(
                6,
                "2026-11-24T08:01:40Z",
                "repair",
                &["shadow_limited"],
                borrowed,
            ),
            shadow(5, "2026-11-25T01:00:00Z", "web"),
        ];
        let c = card(&inputs(&p, &rs));
        assert!(!c.ready_to_enforce);
        let s = get(&c, "no protected workflow starvation");
        assert_eq!(s.verdict, Verdict::Fail);
        assert_eq!(s.counts["shadow_limited"], 3);
        assert_eq!(s.counts["limited"], 0);
        assert_eq!(
            s.records,
            [
                "#3 (request rid-3)",
                "#4 (request rid-4)",
                "#6 (request rid-6)"
            ]
        );
        assert_eq!(
            get(&c, "acceptable convergence lag").counts["near_misses"],
            1
        );
        // 99 s of refusals, each within a minute (the lane's window) of the last: one stretch.
        let conv = get(&c, "protected workflow misses convergence threshold");
        assert_eq!(conv.verdict, Verdict::Fail);
        assert_eq!(conv.counts["longest_stretch_s"], 99);
        // Shadow refusals are not real ones.
        assert!(get(&c, "morning downstream state diverges").passed());
        // Borrowing the shared pool while web (a rival) was active.
        let shared = get(
            &c,
            "critical internal tool shares a budget it was not supposed to share",
        );
        assert_eq!(shared.records.len(), 3);
        assert!(c
            .reasons
            .iter()
            .any(|r| r.contains("no protected workflow starvation")));
    }

    #[test]
    fn short_evidence_and_forged_classes_are_not_enough() {
        let p = parse(POLICY).unwrap();
        let forged = json!({"class": {"declared": "repair", "granted": "web", "forged": true}});
        let rs = [rec(
            1,
            "2026-11-24T10:00:00Z",
            "web",
            &["forged_class", "shadow_limited"],
            forged,
        )];
        let c = card(&inputs(&p, &rs));
        assert!(get(&c, "no protected workflow starvation").passed());
        let hidden = get(
            &c,
            "no hidden shared identity still bypassing policy intent",
        );
        assert_eq!(hidden.counts["forged"], 1);
        assert_eq!(hidden.records, ["#1 (request rid-1)"]);
        assert!(!get(
            &c,
            "export and reconciliation windows still meet business expectations"
        )
        .passed());
        assert!(!c.shadow_phase.completed);
        assert!(!c.ready_to_enforce);
    }

    #[test]
    fn stats_fill_what_the_log_lost() {
        let p = parse(POLICY).unwrap();
        let scrape = "# TYPE laneguard_class_repair_shadow_limited counter\n\
                      laneguard_class_repair_shadow_limited{} 7\n\
                      laneguard_class_repair_near_miss 2\n\
                      laneguard_collision_repair_web 3\n\
                      laneguard_audit_dropped 4\n";
        let stats = parse_stats(scrape, &p);
        assert_eq!(stats.classes["repair"].shadow_limited, 7);
        let rs: [EvidenceRecord; 0] = [];
        let mut i = inputs(&p, &rs);
        i.stats = Some(&stats);
        let c = card(&i);
        assert_eq!(
            get(&c, "no protected workflow starvation").counts["shadow_limited"],
            7
        );
        assert_eq!(
            get(&c, "acceptable convergence lag").counts["near_misses"],
            2
        );
        let shared = get(
            &c,
            "critical internal tool shares a budget it was not supposed to share",
        );
        assert_eq!(shared.counts["squeezes_with_rival_active"], 3);
        assert!(c.integrity.iter().any(|i| i.contains("dropped 4")));
    }

    #[test]
    fn stats_read_the_labelled_series_too() {
        let p = parse(POLICY).unwrap();
        let scrape = "laneguard_class_shadow_limited{class=\"repair\"} 7\n\
                      laneguard_class_shadow_limited{class=\"web\"} 1\n\
                      laneguard_class_budget_shadow_limited{class=\"repair\",budget=\"reserve\"} 5\n\
                      laneguard_class_near_miss{class=\"repair\"} 2\n\
                      laneguard_collision{class=\"repair\",rival=\"web\"} 3\n\
                      laneguard_audit_dropped{} 4\n";
        let stats = parse_stats(scrape, &p);
        assert_eq!(stats.classes["repair"].shadow_limited, 7);
        assert_eq!(stats.classes["repair"].near_miss, 2);
        assert_eq!(stats.collisions["repair/web"], 3);
        assert_eq!(stats.audit_dropped, 4);
    }
}
