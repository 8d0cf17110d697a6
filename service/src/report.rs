//! Rendering for the rollout tools (`laneguard-policy map|lint`, `laneguard-audit card`):
//! Markdown, SVG and HTML of what `laneguard_core::{map, lint, card}` computed. Nothing here
//! decides; it only lays out. SVG goes through the `svg` crate and HTML through
//! `pulldown-cmark` (the card's Markdown rendered as-is), so no markup is built by hand.

use laneguard_core::card::{Card, Check};
use laneguard_core::lint::Warning;
use laneguard_core::map::{CompetitionMap, Draw, PoolKind};
use std::fmt::Write as _;

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn or_dash(v: &Option<String>) -> String {
    v.as_deref()
        .filter(|s| !s.is_empty())
        .map(cell)
        .unwrap_or_else(|| "-".into())
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        cell(&v.join(", "))
    }
}

/// The map in the seed's layout: segments, one block per class, then who shares identity,
/// who shares a budget, and the collisions.
pub fn map_markdown(m: &CompetitionMap) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# Tenant traffic competition map\n");
    let _ = writeln!(o, "## Tenant segments\n");
    let _ = writeln!(o, "| segment | tenant ceiling | shared pool | reserves |");
    let _ = writeln!(o, "| --- | --- | --- | --- |");
    for s in &m.segments {
        let reserves: Vec<String> = s.reserves.iter().map(|(c, r)| format!("{c} {r}")).collect();
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} |",
            cell(&s.name),
            s.ceiling,
            s.shared,
            list(&reserves)
        );
    }
    for c in &m.classes {
        let _ = writeln!(
            o,
            "\n## Traffic class: {}{}\n",
            c.name,
            if c.protected { " (protected)" } else { "" }
        );
        let rows: [(&str, String); 13] = [
            ("Tenant or account segment", list(&c.segments)),
            ("Source", or_dash(&c.source)),
            (
                "Source identity (principals; * = default)",
                list(&c.identities),
            ),
            ("Endpoints or endpoint family", list(&c.families)),
            ("Operational purpose", or_dash(&c.purpose)),
            (
                "Failure consequence if throttled",
                c.consequence.to_string(),
            ),
            ("Typical burst shape", cell(&c.burst_shape)),
            ("Rollout mode", c.mode.to_string()),
            ("Allowed to compete with", list(&c.may_compete_with)),
            ("Must not compete with", list(&c.must_not_compete_with)),
            ("Fallback behavior if limited", cell(&c.fallback)),
            ("Service down", c.failure_mode.to_string()),
            ("Owner", or_dash(&c.owner)),
        ];
        let _ = writeln!(o, "| field | value |\n| --- | --- |");
        for (k, v) in rows {
            let _ = writeln!(o, "| {k} | {v} |");
        }
    }
    let _ = writeln!(o, "\n## Who shares identity\n");
    let _ = writeln!(
        o,
        "| principal | default class | may declare | more than one class | protected and unprotected |"
    );
    let _ = writeln!(o, "| --- | --- | --- | --- | --- |");
    for p in &m.principals {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} |",
            cell(&p.name),
            cell(&p.default_class),
            list(&p.may_declare),
            if p.shares_identity { "yes" } else { "no" },
            if p.mixes_protected { "**yes**" } else { "no" }
        );
    }
    let _ = writeln!(o, "\n## Who shares a budget\n");
    let _ = writeln!(o, "| pool | rate (default plan) | drawn from by |");
    let _ = writeln!(o, "| --- | --- | --- |");
    for p in &m.pools {
        let members: Vec<String> = p
            .members
            .iter()
            .map(|mb| match mb.draw {
                Draw::Lane => mb.class.clone(),
                Draw::Borrow => format!("{} (borrows)", mb.class),
                Draw::Calls => format!("{} (calls it)", mb.class),
                Draw::Identity => format!("{} (via {})", mb.class, mb.via.join(", ")),
            })
            .collect();
        let _ = writeln!(o, "| {} | {} | {} |", p.id, p.rate, list(&members));
    }
    let _ = writeln!(
        o,
        "\n## Classes that must not compete, drawing from one pool\n"
    );
    if m.collisions.is_empty() {
        let _ = writeln!(o, "None.");
    }
    for c in &m.collisions {
        let _ = writeln!(
            o,
            "- {} and {} in `{}`: {}{}",
            c.a,
            c.b,
            c.pool,
            c.why,
            if c.guaranteed {
                ""
            } else {
                " (only idle capacity: the reserve is the guarantee)"
            }
        );
    }
    o
}

/// `laneguard-policy lint`'s text output.
pub fn lint_text(label: &str, warnings: &[Warning]) -> String {
    let mut o = String::new();
    for w in warnings {
        let _ = writeln!(o, "{label}: warning: {w}");
    }
    let _ = writeln!(o, "{label}: {} warnings", warnings.len());
    o
}

/// The pools as a picture: the tenant ceiling holding the shared pool and the reserves, the
/// classes inside them, the pools that cut across (family limits, per-user limit) below, and
/// an edge between two classes that must not compete but draw from one pool (red: they
/// share it; dashed amber: one only borrows idle capacity).
pub fn map_svg(m: &CompetitionMap) -> String {
    use svg::node::element::path::Data;
    use svg::node::element::{Path, Rectangle, Text, Title};
    use svg::Document;

    const BOX_W: f64 = 190.0;
    const BOX_H: f64 = 46.0;
    const GAP: f64 = 16.0;
    const PAD: f64 = 18.0;

    let text = |x: f64, y: f64, s: &str, size: u32, weight: &str| {
        Text::new(s)
            .set("x", x)
            .set("y", y)
            .set("font-family", "sans-serif")
            .set("font-size", size)
            .set("font-weight", weight)
    };
    let rect = |x: f64, y: f64, w: f64, h: f64, fill: &str, stroke: &str| {
        Rectangle::new()
            .set("x", x)
            .set("y", y)
            .set("width", w)
            .set("height", h)
            .set("rx", 6)
            .set("fill", fill)
            .set("stroke", stroke)
    };

    let seg = m.segments.first();
    let shared_pool = m.pools.iter().find(|p| p.kind == PoolKind::Shared);
    let shared_classes: Vec<&str> = shared_pool
        .map(|p| {
            p.members
                .iter()
                .filter(|mb| mb.draw == Draw::Lane)
                .map(|mb| mb.class.as_str())
                .collect()
        })
        .unwrap_or_default();
    let reserves: Vec<_> = m
        .pools
        .iter()
        .filter(|p| p.kind == PoolKind::Reserve)
        .collect();
    let cross: Vec<_> = m
        .pools
        .iter()
        .filter(|p| matches!(p.kind, PoolKind::Tool | PoolKind::User))
        .collect();

    let ceil_x = 20.0;
    let ceil_y = 20.0;
    let shared_x = ceil_x + PAD;
    let inner_y = ceil_y + 44.0;
    let shared_h = 44.0 + shared_classes.len().max(1) as f64 * (BOX_H + GAP) - GAP + PAD;
    let shared_w = BOX_W + 2.0 * PAD;
    let res_x = shared_x + shared_w + 60.0;
    let res_h = 44.0 + BOX_H + PAD;
    let reserves_h = reserves.len() as f64 * (res_h + GAP) - GAP;
    let inner_h = shared_h.max(reserves_h);
    let ceil_w = res_x + shared_w + PAD - ceil_x;
    let ceil_h = inner_h + 44.0 + PAD;

    let mut doc = Document::new();
    let mut centres: Vec<(String, f64, f64)> = Vec::new();
    let mut class_box = |doc: Document, name: &str, x: f64, y: f64, protected: bool| {
        let row = m.class(name);
        let detail = row
            .map(|c| match (&c.reserve, &c.budget) {
                (Some(r), _) => format!("reserve {r}"),
                (None, Some(b)) => format!("budget {b}"),
                (None, None) => "no budget".into(),
            })
            .unwrap_or_default();
        centres.push((name.to_string(), x + BOX_W / 2.0, y + BOX_H / 2.0));
        doc.add(rect(
            x,
            y,
            BOX_W,
            BOX_H,
            if protected { "#e3f2e1" } else { "#ffffff" },
            "#555",
        ))
        .add(text(x + 8.0, y + 19.0, name, 14, "bold"))
        .add(text(x + 8.0, y + 37.0, &detail, 11, "normal"))
    };

    doc = doc
        .add(rect(ceil_x, ceil_y, ceil_w, ceil_h, "#f7f7f7", "#333"))
        .add(text(
            ceil_x + 10.0,
            ceil_y + 24.0,
            &format!(
                "tenant ceiling ({}) {}",
                seg.map_or("default", |s| s.name.as_str()),
                seg.map(|s| s.ceiling.to_string()).unwrap_or_default()
            ),
            15,
            "bold",
        ))
        .add(rect(
            shared_x, inner_y, shared_w, shared_h, "#fff8e6", "#b58900",
        ))
        .add(text(
            shared_x + 10.0,
            inner_y + 24.0,
            &format!(
                "shared pool {}",
                shared_pool.map(|p| p.rate.to_string()).unwrap_or_default()
            ),
            13,
            "bold",
        ));
    for (k, c) in shared_classes.iter().enumerate() {
        let y = inner_y + 40.0 + k as f64 * (BOX_H + GAP);
        doc = class_box(doc, c, shared_x + PAD, y, false);
    }
    for (k, r) in reserves.iter().enumerate() {
        let y = inner_y + k as f64 * (res_h + GAP);
        doc = doc
            .add(rect(res_x, y, shared_w, res_h, "#eef6ff", "#268bd2"))
            .add(text(
                res_x + 10.0,
                y + 24.0,
                &format!("{} {}", r.id, r.rate),
                13,
                "bold",
            ));
        if let Some(mb) = r.members.first() {
            doc = class_box(doc, &mb.class, res_x + PAD, y + 36.0, true);
        }
    }

    // Pools that cut across lanes.
    let mut y = ceil_y + ceil_h + 30.0;
    for p in &cross {
        let members: Vec<String> = p
            .members
            .iter()
            .map(|mb| match mb.draw {
                Draw::Identity => format!("{} (via {})", mb.class, mb.via.join(", ")),
                _ => mb.class.clone(),
            })
            .collect();
        let label = match p.kind {
            PoolKind::User => format!("{} {} per user", p.id, p.rate),
            _ => format!("{} {} per tenant", p.id, p.rate),
        };
        doc = doc
            .add(rect(ceil_x, y, ceil_w, 52.0, "#fbeff5", "#d33682"))
            .add(text(ceil_x + 10.0, y + 20.0, &label, 13, "bold"))
            .add(text(
                ceil_x + 10.0,
                y + 40.0,
                &format!(
                    "drawn from by: {}",
                    if members.is_empty() {
                        "no class declares it (classes[].families)".to_string()
                    } else {
                        members.join(", ")
                    }
                ),
                12,
                "normal",
            ));
        y += 52.0 + GAP;
    }

    // Borrowing: a dashed edge from the protected class to the shared pool.
    let at = |name: &str| {
        centres
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|c| (c.1, c.2))
    };
    if let Some(sp) = shared_pool {
        for mb in sp.members.iter().filter(|mb| mb.draw == Draw::Borrow) {
            if let Some((x, yc)) = at(&mb.class) {
                let d = Data::new()
                    .move_to((x - BOX_W / 2.0, yc))
                    .line_to((shared_x + shared_w, yc));
                doc = doc.add(
                    Path::new()
                        .set("d", d)
                        .set("stroke", "#268bd2")
                        .set("stroke-dasharray", "3 3")
                        .set("fill", "none")
                        .add(Title::new(format!(
                            "{} borrows idle shared capacity",
                            mb.class
                        ))),
                );
            }
        }
    }
    for (k, c) in m.collisions.iter().enumerate() {
        let (Some(a), Some(b)) = (at(&c.a), at(&c.b)) else {
            continue;
        };
        let (d, mid) = if (a.0 - b.0).abs() < 1.0 {
            // One column: curve out to the right of both boxes, so the edge hides neither.
            let bulge = a.0 + BOX_W / 2.0 + 24.0 + 10.0 * k as f64;
            (
                Data::new()
                    .move_to((a.0 + BOX_W / 2.0, a.1))
                    .cubic_curve_to((bulge, a.1, bulge, b.1, b.0 + BOX_W / 2.0, b.1)),
                (bulge - 6.0, (a.1 + b.1) / 2.0),
            )
        } else {
            // Facing sides of two columns.
            let (l, r) = if a.0 < b.0 { (a, b) } else { (b, a) };
            let (x0, x1) = (l.0 + BOX_W / 2.0, r.0 - BOX_W / 2.0);
            let xm = (x0 + x1) / 2.0;
            let lift = 4.0 * k as f64;
            (
                Data::new().move_to((x0, l.1 + lift)).cubic_curve_to((
                    xm,
                    l.1 + lift,
                    xm,
                    r.1 + lift,
                    x1,
                    r.1 + lift,
                )),
                (xm, (l.1 + r.1) / 2.0 + lift),
            )
        };
        if c.guaranteed {
            doc =
                doc.add(text(mid.0 + 4.0, mid.1 - 4.0, &c.pool, 11, "bold").set("fill", "#dc322f"));
        }
        let mut edge = Path::new()
            .set("d", d)
            .set("fill", "none")
            .set("stroke-width", 2.5)
            .set(
                "class",
                if c.guaranteed {
                    "collision"
                } else {
                    "borrowing"
                },
            )
            .set("stroke", if c.guaranteed { "#dc322f" } else { "#cb8b16" })
            .add(Title::new(format!(
                "{} must not compete with {}: {} ({})",
                c.a, c.b, c.pool, c.why
            )));
        if !c.guaranteed {
            edge = edge.set("stroke-dasharray", "6 4");
        }
        doc = doc.add(edge);
    }
    let legend_y = y + 10.0;
    doc = doc
        .add(text(
            ceil_x,
            legend_y,
            "red: two classes that must not compete draw from one pool; dashed amber: one only borrows idle shared capacity; dashed blue: borrowing",
            11,
            "normal",
        ));
    let width = (ceil_x + ceil_w + 160.0 + 12.0 * m.collisions.len() as f64).max(900.0);
    doc.set("viewBox", (0, 0, width as i64, (legend_y + 20.0) as i64))
        .set("width", width as i64)
        .set("height", (legend_y + 20.0) as i64)
        .to_string()
}

const MAX_IDS: usize = 12;

fn check_line(o: &mut String, c: &Check) {
    let _ = writeln!(
        o,
        "- **{}** {}: {}",
        if c.passed() { "PASS" } else { "FAIL" },
        c.name,
        cell(&c.summary)
    );
    let _ = writeln!(o, "  - measured: {}", cell(&c.measures));
    if !c.records.is_empty() {
        let shown: Vec<&str> = c.records.iter().take(MAX_IDS).map(String::as_str).collect();
        let more = c.records.len().saturating_sub(MAX_IDS);
        let _ = writeln!(
            o,
            "  - records: {}{}",
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more (`--format json` lists all)")
            } else {
                String::new()
            }
        );
    }
}

fn fill(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "_to fill in_".into())
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The card in the seed's order.
pub fn card_markdown(c: &Card) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# Rate-Limit Rollout Review Card\n");
    let _ = writeln!(o, "- Change name: {}", fill(&c.change));
    let _ = writeln!(o, "- Owning team: {}", fill(&c.owner));
    let _ = writeln!(
        o,
        "- Primary goal (fairness, abuse control, platform protection, plan differentiation): {}",
        fill(&c.goal)
    );
    let _ = writeln!(
        o,
        "- Traffic classes identified: {}",
        c.traffic_classes.join(", ")
    );
    if !c.unknown_classes.is_empty() {
        let _ = writeln!(
            o,
            "  - seen in the evidence but not in the policy: {}",
            c.unknown_classes.join(", ")
        );
    }
    let _ = writeln!(
        o,
        "- Protected classes identified: {}",
        if c.protected_classes.is_empty() {
            "none".to_string()
        } else {
            c.protected_classes.join(", ")
        }
    );
    let _ = writeln!(
        o,
        "- Recovery paths reviewed: {}",
        yes(c.recovery_paths_reviewed.yes)
    );
    for b in &c.recovery_paths_reviewed.because {
        let _ = writeln!(o, "  - {}", cell(b));
    }
    let _ = writeln!(
        o,
        "- Shared tenant identities still in use: {}",
        if c.shared_identities.is_empty() {
            "none"
        } else {
            "yes"
        }
    );
    for s in &c.shared_identities {
        let _ = writeln!(o, "  - {}", cell(s));
    }
    let _ = writeln!(
        o,
        "- Internal automation using customer credentials: {}",
        yes(c.internal_automation_on_customer_credentials.yes)
    );
    for s in &c.internal_automation_on_customer_credentials.because {
        let _ = writeln!(o, "  - {}", cell(s));
    }
    let sp = &c.shadow_phase;
    let _ = writeln!(
        o,
        "- Would-have-been-throttled phase completed: {}",
        yes(sp.completed)
    );
    let _ = writeln!(
        o,
        "  - {} shadow records, {} to {}: {} s; hour boundary: {}; full business cycle: {}",
        sp.shadow_records,
        sp.first.as_deref().unwrap_or("-"),
        sp.last.as_deref().unwrap_or("-"),
        sp.covered_s,
        yes(sp.hour_boundary),
        yes(sp.full_cycle)
    );
    let _ = writeln!(o, "\n## Hard questions\n");
    for (i, q) in c.questions.iter().enumerate() {
        let _ = writeln!(o, "{}. {}\n   {}", i + 1, q.question, cell(&q.answer));
    }
    let _ = writeln!(o, "\n## Evidence required before harder enforcement\n");
    for ch in &c.evidence {
        check_line(&mut o, ch);
    }
    let _ = writeln!(o, "\n## Stop conditions\n");
    for ch in &c.stop_conditions {
        check_line(&mut o, ch);
    }
    let _ = writeln!(o, "\n## Evidence\n");
    let _ = writeln!(o, "- {} audit records read", c.records);
    for n in &c.notes {
        let _ = writeln!(o, "- {}", cell(n));
    }
    for i in &c.integrity {
        let _ = writeln!(o, "- problem: {}", cell(i));
    }
    let _ = writeln!(o, "\n## Ready to enforce: {}\n", yes(c.ready_to_enforce));
    for r in &c.reasons {
        let _ = writeln!(o, "- {}", cell(r));
    }
    o
}

/// The card's Markdown as a standalone HTML page.
pub fn card_html(c: &Card) -> String {
    let md = card_markdown(c);
    let mut body = String::new();
    let parser = pulldown_cmark::Parser::new_ext(&md, pulldown_cmark::Options::ENABLE_TABLES);
    pulldown_cmark::html::push_html(&mut body, parser);
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Rate-Limit Rollout Review Card</title>\
         <style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}}\
         strong{{padding:0 .2em}}</style></head>\n<body>\n{body}</body></html>\n"
    )
}
