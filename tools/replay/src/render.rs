//! Layout of what `laneguard_core::replay` computed: plain text for a terminal, and an HTML
//! page (the same blocks as Markdown through `pulldown-cmark`, plus SVG plots drawn with the
//! `svg` crate), so no markup is built by hand. Nothing here decides.
//!
//! Both outputs come from one list of [`Block`]s, so the text and the page never disagree.

use laneguard_core::replay::trace::parse_rfc3339;
use laneguard_core::replay::{Point, Report};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

enum Block {
    Heading(String),
    Para(String),
    /// Header, rows; numeric columns (all but the first `text_cols`) are right-aligned.
    Table {
        header: Vec<String>,
        rows: Vec<Vec<String>>,
        text_cols: usize,
    },
    List(Vec<String>),
}

fn pct(x: f64) -> String {
    format!("{x:.2}%")
}

fn tripped(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter()
        .map(|(b, n)| format!("{b} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `P1`, `P2` in a side-by-side table; nothing for a single policy.
fn tag(i: usize, n: usize) -> String {
    if n > 1 {
        format!("P{} ", i + 1)
    } else {
        String::new()
    }
}

/// A table header: the shared columns, then each policy's columns, tagged.
fn columns(shared: &[&str], per_policy: &[&str], n: usize) -> Vec<String> {
    let mut h: Vec<String> = shared.iter().map(|s| s.to_string()).collect();
    for i in 0..n {
        h.extend(per_policy.iter().map(|c| format!("{}{c}", tag(i, n))));
    }
    h
}

fn trace_line(r: &Report) -> String {
    let t = &r.trace;
    format!(
        "{} records ({} replayed), {} .. {} ({} s); {} malformed lines skipped; {} without identity; \
         {} rejected (missing identity {}, invalid identity {}, declared purpose or model {}); {} out of order beyond the reorder window",
        t.records,
        t.replayed,
        t.from.as_deref().unwrap_or("-"),
        t.to.as_deref().unwrap_or("-"),
        t.seconds,
        t.malformed,
        t.no_identity,
        t.rejected.total(),
        t.rejected.missing_identity,
        t.rejected.invalid_identity,
        t.rejected.declared,
        t.late
    )
}

const OVERLAPS_SHOWN: usize = 12;

fn blocks(reports: &[Report], trace: &str) -> Vec<Block> {
    let n = reports.len();
    let mut b = Vec::new();
    b.push(Block::Heading(format!("laneguard-replay: {trace}")));
    let mut policies = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        policies.push(format!(
            "{}policy {} ({} accounting)",
            tag(i, n),
            r.policy,
            r.model.replace('_', " ")
        ));
    }
    b.push(Block::List(policies));
    if let Some(r) = reports.first() {
        b.push(Block::Para(format!("trace: {}", trace_line(r))));
        if !r.trace.malformed_lines.is_empty() {
            let mut l = r.trace.malformed_lines.clone();
            if r.trace.malformed > l.len() as u64 {
                l.push(format!(
                    "... {} more (all counted)",
                    r.trace.malformed - l.len() as u64
                ));
            }
            b.push(Block::Para("malformed lines (skipped):".into()));
            b.push(Block::List(l));
        }
    }

    // Per tenant: the ceiling, then one row per class with every policy's figures.
    let tenants: BTreeSet<&String> = reports.iter().flat_map(|r| r.tenants.keys()).collect();
    for t in tenants {
        b.push(Block::Heading(format!("tenant {t}")));
        let mut ceilings = Vec::new();
        for (i, r) in reports.iter().enumerate() {
            if let Some(tr) = r.tenants.get(t) {
                let c = &tr.ceiling;
                ceilings.push(format!(
                    "{}ceiling ({} plan) {} per {} + burst {} = {}: peak {}{}: {}",
                    tag(i, n),
                    tr.plan,
                    c.requests,
                    c.per,
                    c.burst,
                    c.limit,
                    c.peak,
                    c.peak_at
                        .as_deref()
                        .map(|a| format!(" at {a}"))
                        .unwrap_or_default(),
                    if tr.ceiling_ok { "holds" } else { "EXCEEDED" }
                ));
            }
        }
        b.push(Block::List(ceilings));
        let header = columns(
            &["class", "offered"],
            &[
                "admitted",
                "limited",
                "shadow",
                "degraded",
                "served",
                "first tripped",
            ],
            n,
        );
        let classes: BTreeSet<&String> = reports
            .iter()
            .filter_map(|r| r.tenants.get(t))
            .flat_map(|tr| tr.classes.keys())
            .collect();
        let mut rows = Vec::new();
        for c in classes {
            let mut row = vec![c.clone()];
            let offered = reports
                .iter()
                .filter_map(|r| r.tenants.get(t)?.classes.get(c))
                .map(|x| x.offered)
                .max()
                .unwrap_or(0);
            row.push(offered.to_string());
            for r in reports {
                match r.tenants.get(t).and_then(|tr| tr.classes.get(c)) {
                    Some(x) => row.extend([
                        x.admitted.to_string(),
                        x.limited.to_string(),
                        x.shadow_limited.to_string(),
                        x.degraded.to_string(),
                        pct(x.served_pct),
                        tripped(&x.first_tripped),
                    ]),
                    None => row.extend(std::iter::repeat_n("-".to_string(), 6)),
                }
            }
            rows.push(row);
        }
        b.push(Block::Table {
            header,
            rows,
            text_cols: 1,
        });
    }

    // The lanes to watch.
    let lanes: BTreeSet<(&String, &String)> = reports
        .iter()
        .flat_map(|r| r.protected.iter().map(|l| (&l.tenant, &l.class)))
        .collect();
    if !lanes.is_empty() {
        b.push(Block::Heading(
            "protected lanes (served %, longest run of refusals, near misses)".into(),
        ));
        let header = columns(
            &["tenant", "class"],
            &["served", "refused", "longest refusal run", "near misses"],
            n,
        );
        let mut rows = Vec::new();
        for (t, c) in lanes {
            let mut row = vec![t.clone(), c.clone()];
            for r in reports {
                match r.protected.iter().find(|l| &l.tenant == t && &l.class == c) {
                    Some(l) => row.extend([
                        format!(
                            "{}{}",
                            pct(l.served_pct),
                            if l.protected { "" } else { " (not protected)" }
                        ),
                        (l.limited + l.shadow_limited).to_string(),
                        l.longest_refusal.as_ref().map_or("-".into(), |run| {
                            format!(
                                "{} requests over {} s from {}",
                                run.requests, run.seconds, run.from
                            )
                        }),
                        format!("{} ({} requests)", l.near_misses, l.near_miss_requests),
                    ]),
                    None => row.extend(std::iter::repeat_n("-".to_string(), 4)),
                }
            }
            rows.push(row);
        }
        b.push(Block::Table {
            header,
            rows,
            text_cols: 2,
        });
    }

    for (i, r) in reports.iter().enumerate() {
        if r.overlap_windows.is_empty() {
            continue;
        }
        b.push(Block::Heading(format!(
            "{}overlap windows: a protected lane lost or nearly lost budget ({} in all)",
            tag(i, n),
            r.overlap_windows.len()
        )));
        let mut l: Vec<String> = r
            .overlap_windows
            .iter()
            .take(OVERLAPS_SHOWN)
            .map(|o| {
                format!(
                    "{} {} {} .. {}: {} lost, {} shadow-lost, {} near misses; active: {}",
                    o.tenant,
                    o.class,
                    o.from,
                    o.to,
                    o.lost,
                    o.shadow_lost,
                    o.near_misses,
                    if o.active.is_empty() {
                        "-".to_string()
                    } else {
                        o.active.join(", ")
                    }
                )
            })
            .collect();
        if r.overlap_windows.len() > OVERLAPS_SHOWN {
            l.push(format!(
                "... {} more (--format json lists all)",
                r.overlap_windows.len() - OVERLAPS_SHOWN
            ));
        }
        b.push(Block::List(l));
    }

    for (i, r) in reports.iter().enumerate() {
        if r.warnings.is_empty() {
            continue;
        }
        b.push(Block::Heading(format!("{}warnings", tag(i, n))));
        b.push(Block::List(
            r.warnings
                .iter()
                .map(|w| {
                    format!(
                        "{}: {} ({} requests, first at line {})",
                        w.kind, w.message, w.requests, w.first_line
                    )
                })
                .collect(),
        ));
    }
    b
}

/// The report for a terminal.
pub fn text(reports: &[Report], trace: &str) -> String {
    let mut o = String::new();
    for block in blocks(reports, trace) {
        match block {
            Block::Heading(h) => {
                let _ = writeln!(o, "\n{h}");
            }
            Block::Para(p) => {
                let _ = writeln!(o, "  {p}");
            }
            Block::List(l) => {
                for x in l {
                    let _ = writeln!(o, "  {x}");
                }
            }
            Block::Table {
                header,
                rows,
                text_cols,
            } => {
                let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
                for r in &rows {
                    for (i, c) in r.iter().enumerate() {
                        if let Some(x) = w.get_mut(i) {
                            *x = (*x).max(c.chars().count());
                        }
                    }
                }
                // A column of figures is right-aligned; one with words, left.
                let numeric = |s: &str| {
                    s.chars()
                        .all(|c| c.is_ascii_digit() || matches!(c, '.' | '%' | '-'))
                };
                let left: Vec<bool> = (0..w.len())
                    .map(|i| {
                        i < text_cols || rows.iter().any(|r| r.get(i).is_some_and(|c| !numeric(c)))
                    })
                    .collect();
                let line = |cells: &[String]| {
                    let mut s = String::from(" ");
                    for (i, c) in cells.iter().enumerate() {
                        let width = w.get(i).copied().unwrap_or(0);
                        if left.get(i).copied().unwrap_or(true) {
                            let _ = write!(s, " {c:<width$}");
                        } else {
                            let _ = write!(s, " {c:>width$}");
                        }
                    }
                    s.trim_end().to_string()
                };
                let _ = writeln!(o, "{}", line(&header));
                for r in &rows {
                    let _ = writeln!(o, "{}", line(r));
                }
            }
        }
    }
    o.trim_start().to_string()
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn markdown(reports: &[Report], trace: &str) -> String {
    let mut o = String::new();
    for block in blocks(reports, trace) {
        match block {
            Block::Heading(h) => {
                let _ = writeln!(o, "\n## {}\n", md_cell(&h));
            }
            Block::Para(p) => {
                let _ = writeln!(o, "{}\n", md_cell(&p));
            }
            Block::List(l) => {
                for x in l {
                    let _ = writeln!(o, "- {}", md_cell(&x));
                }
                o.push('\n');
            }
            Block::Table {
                header,
                rows,
                text_cols,
            } => {
                let _ = writeln!(
                    o,
                    "| {} |",
                    header
                        .iter()
                        .map(|h| md_cell(h))
                        .collect::<Vec<_>>()
                        .join(" | ")
                );
                let _ = writeln!(
                    o,
                    "|{}",
                    (0..header.len())
                        .map(|i| if i < text_cols { " --- |" } else { " ---: |" })
                        .collect::<String>()
                );
                for r in rows {
                    let _ = writeln!(
                        o,
                        "| {} |",
                        r.iter().map(|c| md_cell(c)).collect::<Vec<_>>().join(" | ")
                    );
                }
                o.push('\n');
            }
        }
    }
    o
}

/// Which count of a step a line plots.
type Value = fn(&Point) -> u64;

const PALETTE: [&str; 10] = [
    "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22",
];

/// One report's time series as an SVG: requests served per step (top) and refused per step
/// (bottom; dashed: shadow-limited), one line per class, the overlap windows shaded. The
/// time range, the vertical scales and the colours are shared by every report on the page,
/// so two policies' plots compare at a glance.
fn plot(r: &Report, scale: &Scale) -> String {
    use svg::node::element::path::Data;
    use svg::node::element::{Line, Path, Rectangle, Text, Title};
    use svg::Document;

    const W: f64 = 960.0;
    const PANEL: f64 = 200.0;
    const LEFT: f64 = 56.0;
    const RIGHT: f64 = 170.0;
    const TOP: f64 = 28.0;
    const GAP: f64 = 48.0;
    let plot_w = W - LEFT - RIGHT;
    let height = TOP + 2.0 * PANEL + GAP + 40.0;
    let step_ns = r.series.step_s.max(1) * 1_000_000_000;
    let span = (scale.to_ns.saturating_sub(scale.from_ns)).max(step_ns) as f64;
    let x = |t: u64| LEFT + (t.saturating_sub(scale.from_ns)) as f64 / span * plot_w;
    let text = |x: f64, y: f64, s: &str, size: u32, anchor: &str| {
        Text::new(s)
            .set("x", x)
            .set("y", y)
            .set("font-family", "sans-serif")
            .set("font-size", size)
            .set("text-anchor", anchor)
    };
    let mut doc = Document::new()
        .set("viewBox", (0, 0, W, height))
        .set("width", W)
        .set("height", height);
    let panels = [
        (
            "served (admitted, queued, rerouted) per step",
            scale.served_max,
        ),
        (
            "refused per step: limited (solid), shadow-limited (dashed)",
            scale.refused_max,
        ),
    ];
    for (pi, (title, ymax)) in panels.iter().enumerate() {
        let top = TOP + pi as f64 * (PANEL + GAP);
        let ymax = (*ymax).max(1) as f64;
        let y = |v: u64| top + PANEL - v as f64 / ymax * PANEL;
        // Overlap windows: where a watched lane lost or nearly lost budget.
        for o in &r.overlap_windows {
            if let (Some(a), Some(b)) = (parse_rfc3339(&o.from), parse_rfc3339(&o.to)) {
                let (xa, xb) = (x(a.max(scale.from_ns)), x(b.min(scale.to_ns)));
                doc = doc.add(
                    Rectangle::new()
                        .set("x", xa)
                        .set("y", top)
                        .set("width", (xb - xa).max(1.0))
                        .set("height", PANEL)
                        .set("fill", if o.lost > 0 { "#f8d0d0" } else { "#fbe9c8" })
                        .set("fill-opacity", 0.6)
                        .add(Title::new(format!(
                            "{} {} {} .. {}: {} lost, {} shadow-lost, {} near misses; active: {}",
                            o.tenant,
                            o.class,
                            o.from,
                            o.to,
                            o.lost,
                            o.shadow_lost,
                            o.near_misses,
                            o.active.join(", ")
                        ))),
                );
            }
        }
        doc = doc.add(text(LEFT, top - 8.0, title, 13, "start")).add(
            Rectangle::new()
                .set("x", LEFT)
                .set("y", top)
                .set("width", plot_w)
                .set("height", PANEL)
                .set("fill", "none")
                .set("stroke", "#999"),
        );
        for k in 0..=4u64 {
            let v = (ymax as u64 * k).div_ceil(4);
            let yy = y(v);
            doc = doc
                .add(
                    Line::new()
                        .set("x1", LEFT - 4.0)
                        .set("x2", LEFT)
                        .set("y1", yy)
                        .set("y2", yy)
                        .set("stroke", "#999"),
                )
                .add(text(LEFT - 6.0, yy + 4.0, &v.to_string(), 11, "end"));
        }
        for (ci, class) in scale.classes.iter().enumerate() {
            let colour = PALETTE[ci % PALETTE.len()];
            let pts: BTreeMap<u64, Point> = r
                .series
                .classes
                .get(class)
                .map(|v| v.iter().copied().collect())
                .unwrap_or_default();
            let lines: Vec<(Value, &str)> = if pi == 0 {
                vec![(|p| p.served, "")]
            } else {
                vec![(|p| p.limited, ""), (|p| p.shadow_limited, "5,4")]
            };
            for (value, dash) in lines {
                if pts.values().all(|p| value(p) == 0) {
                    continue;
                }
                let mut d = Data::new();
                let mut t = scale.from_ns / step_ns * step_ns;
                let mut first = true;
                while t <= scale.to_ns {
                    let v = pts.get(&t).map_or(0, value);
                    let (px, py) = (x(t), y(v));
                    d = if first {
                        d.move_to((px, py))
                    } else {
                        d.line_to((px, py))
                    };
                    first = false;
                    t += step_ns;
                }
                let mut path = Path::new()
                    .set("d", d)
                    .set("fill", "none")
                    .set("stroke", colour)
                    .set("stroke-width", 1.5)
                    .add(Title::new(class.clone()));
                if !dash.is_empty() {
                    path = path.set("stroke-dasharray", dash);
                }
                doc = doc.add(path);
            }
        }
    }
    // The time axis (UTC), under the bottom panel.
    let axis_y = TOP + 2.0 * PANEL + GAP;
    // Ticks on round times: the smallest of these steps that gives at most 8.
    let tick_ns = [
        10u64, 30, 60, 120, 300, 600, 900, 1_800, 3_600, 7_200, 21_600, 86_400,
    ]
    .iter()
    .map(|s| s * 1_000_000_000)
    .find(|t| scale.to_ns.saturating_sub(scale.from_ns) / t <= 8)
    .unwrap_or(86_400_000_000_000 * 7);
    let mut t = scale.from_ns.div_ceil(tick_ns) * tick_ns;
    while t <= scale.to_ns {
        let label = laneguard_core::audit::rfc3339_ms(t);
        let hhmmss = label.get(11..19).unwrap_or(&label).to_string();
        doc = doc.add(text(x(t), axis_y + 16.0, &hhmmss, 11, "middle"));
        t += tick_ns;
    }
    doc = doc.add(text(
        LEFT + plot_w / 2.0,
        axis_y + 32.0,
        &format!(
            "time (UTC), steps of {} s; shaded: overlap windows (red: a watched lane lost budget, amber: near misses)",
            r.series.step_s
        ),
        11,
        "middle",
    ));
    // The legend.
    for (ci, class) in scale.classes.iter().enumerate() {
        let ly = TOP + 10.0 + ci as f64 * 18.0;
        let lx = W - RIGHT + 16.0;
        doc = doc
            .add(
                Line::new()
                    .set("x1", lx)
                    .set("x2", lx + 22.0)
                    .set("y1", ly)
                    .set("y2", ly)
                    .set("stroke", PALETTE[ci % PALETTE.len()])
                    .set("stroke-width", 2.5),
            )
            .add(text(lx + 28.0, ly + 4.0, class, 12, "start"));
    }
    doc.to_string()
}

/// What the plots on one page share.
struct Scale {
    from_ns: u64,
    to_ns: u64,
    served_max: u64,
    refused_max: u64,
    classes: Vec<String>,
}

fn scale(reports: &[Report]) -> Scale {
    let mut s = Scale {
        from_ns: u64::MAX,
        to_ns: 0,
        served_max: 0,
        refused_max: 0,
        classes: Vec::new(),
    };
    let mut classes = BTreeSet::new();
    for r in reports {
        for (c, pts) in &r.series.classes {
            classes.insert(c.clone());
            for (t, p) in pts {
                s.from_ns = s.from_ns.min(*t);
                s.to_ns = s.to_ns.max(*t);
                s.served_max = s.served_max.max(p.served);
                s.refused_max = s.refused_max.max(p.limited.max(p.shadow_limited));
            }
        }
    }
    if s.from_ns > s.to_ns {
        s.from_ns = 0;
        s.to_ns = 0;
    }
    s.classes = classes.into_iter().collect();
    s
}

/// The HTML report: the text report's blocks, then one plot per policy.
pub fn html(reports: &[Report], trace: &str) -> String {
    let md = markdown(reports, trace);
    let mut body = String::new();
    let parser = pulldown_cmark::Parser::new_ext(&md, pulldown_cmark::Options::ENABLE_TABLES);
    pulldown_cmark::html::push_html(&mut body, parser);
    let sc = scale(reports);
    let n = reports.len();
    for (i, r) in reports.iter().enumerate() {
        let mut h = String::new();
        let heading = format!(
            "{}admitted vs limited per class over time: {}",
            tag(i, n),
            r.policy
        );
        pulldown_cmark::html::push_html(
            &mut h,
            pulldown_cmark::Parser::new(&format!("\n## {}\n", md_cell(&heading))),
        );
        body.push_str(&h);
        body.push_str("<figure>");
        body.push_str(&plot(r, &sc));
        body.push_str("</figure>\n");
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>laneguard-replay</title>\
         <style>body{{font-family:sans-serif;max-width:80em;margin:2em auto;line-height:1.4}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.2em .5em}}\
         figure{{margin:0}}</style></head>\n<body>\n{body}</body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use laneguard_core::replay::trace::parse_line;
    use laneguard_core::replay::{Options, Replay};

    const POLICY: &str = "version: 1\nclasses:\n  - { name: web, consequence: time_sensitive, budget: { per_minute: 60, burst: 2 } }\n  - { name: repair, consequence: repair, reserve: { per_minute: 6, burst: 1 } }\nprincipals:\n  - { name: w, default_class: web, may_declare: [web] }\n  - { name: r, default_class: repair, may_declare: [repair] }\ntenants:\n  default: { ceiling: { per_minute: 120, burst: 10 } }\n";

    fn report() -> Report {
        let p = laneguard_core::parse(POLICY).unwrap();
        let mut r = Replay::new(&p, "p.yaml", Options::default());
        for (i, who) in ["w", "w", "w", "r", "r", "x<y"].iter().enumerate() {
            let line = format!(
                r#"{{"ts": 1795000000.{i}, "tenant": "acme", "principal": "{who}", "method": "GET", "path": "/"}}"#
            );
            r.push(parse_line(i as u64 + 1, &line).unwrap().unwrap());
        }
        r.finish()
    }

    #[test]
    fn text_has_a_row_per_class_with_the_figures() {
        let out = text(&[report()], "t.jsonl");
        let web = out
            .lines()
            .find(|l| l.trim_start().starts_with("web"))
            .unwrap();
        let cells: Vec<&str> = web.split_whitespace().collect();
        // class offered admitted limited shadow degraded served
        assert_eq!(
            &cells[..7],
            &["web", "3", "2", "1", "0", "0", "66.67%"],
            "{out}"
        );
        // `x<y` is not a valid identity: refused before any bucket, and counted.
        assert!(
            out.contains(
                "1 rejected (missing identity 0, invalid identity 1, declared purpose or model 0)"
            ),
            "{out}"
        );
        let repair = out
            .lines()
            .find(|l| l.trim_start().starts_with("repair"))
            .unwrap();
        assert!(repair.contains("reserve:repair 1"), "{out}");
    }

    #[test]
    fn side_by_side_tags_each_policy() {
        let out = text(&[report(), report()], "t.jsonl");
        assert!(
            out.contains("P1 admitted") && out.contains("P2 admitted"),
            "{out}"
        );
    }

    #[test]
    fn html_escapes_and_plots() {
        let page = html(&[report()], "t<1>.jsonl");
        assert!(page.contains("<svg"), "no plot");
        assert!(!page.contains("t<1>"), "unescaped trace name");
        assert!(page.contains("t&lt;1&gt;.jsonl"), "{page}");
    }
}
