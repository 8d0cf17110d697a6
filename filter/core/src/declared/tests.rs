use super::*;
use crate::engine::{plan, BucketKind, LocalTable, RequestInfo};
use crate::policy::parse;

const S: u64 = 1_000_000_000;

/// Purposes with a default (`general`, the tightest), models that refuse what they do not
/// know and apply to the chat family only; erp may declare only `sync`, bot only `small`.
const POLICY: &str = r#"
version: 1
classification: { default_class: interactive }
classes:
  - { name: interactive, consequence: time_sensitive, budget: { per_second: 100, burst: 100 } }
principals:
  - { name: erp, default_class: interactive, may_declare: [interactive],
      may_declare_purposes: [sync] }
  - { name: bot, default_class: interactive, may_declare: [interactive],
      may_declare_models: [small] }
tenants:
  default: { ceiling: { per_second: 200, burst: 200 } }
endpoint_families:
  - { name: chat, path_prefixes: [/v1/chat] }
  - { name: orders, path_prefixes: [/orders] }
purposes:
  header: x-purpose
  default: general
  limits:
    general: { per_minute: 3, burst: 3 }
    sync: { per_minute: 60, burst: 30 }
    bulk: { per_minute: 60, burst: 30 }
models:
  header: x-model
  default: small
  unknown: refuse
  families: [chat]
  list:
    - { name: large, capacity: { per_minute: 60, burst: 20 }, allocation: { share: 1.0, burst: 20 } }
    - { name: small, capacity: { per_minute: 60, burst: 2 }, allocation: { share: 1.0, burst: 2 } }
"#;

fn policy() -> Policy {
    parse(POLICY).unwrap()
}

fn req<'a>(principal: &'a str, path: &'a str) -> RequestInfo<'a> {
    RequestInfo {
        tenant: Some("northwind"),
        principal: Some(principal),
        method: "GET",
        path,
        ..RequestInfo::default()
    }
}

fn charged(p: &Policy, r: &RequestInfo<'_>, kind: BucketKind) -> Vec<String> {
    plan(p, r)
        .unwrap()
        .buckets
        .iter()
        .filter(|b| b.kind == kind)
        .map(|b| b.name())
        .collect()
}

#[test]
fn omitting_the_purpose_header_no_longer_escapes_the_purpose_bucket() {
    // Old code: no x-purpose, no purpose bucket, so nothing but the class budget (100)
    // limited the caller. Now the request is charged to the default purpose and the fourth
    // one in a minute is refused by it.
    let p = policy();
    let r = req("web", "/orders/1");
    assert_eq!(charged(&p, &r, BucketKind::Purpose), ["purpose:general"]);
    let mut t = LocalTable::default();
    let mut allowed = 0;
    let mut tripped = None;
    for i in 0..10 {
        let pl = plan(&p, &r).unwrap();
        let (e, _) = t.decide(&pl, 100 * S + i, 1.0);
        if e.allowed {
            allowed += 1;
        } else if tripped.is_none() {
            tripped = e.tripped.map(|k| pl.buckets[k].name());
        }
    }
    assert_eq!(allowed, 3, "the default purpose's burst");
    assert_eq!(tripped.as_deref(), Some("purpose:general"));
}

#[test]
fn an_unlisted_purpose_is_charged_to_the_default_and_flagged() {
    let p = policy();
    let mut r = req("web", "/orders/1");
    r.purpose = Some("anything-else");
    let pl = plan(&p, &r).unwrap();
    assert_eq!(pl.purpose.as_deref(), Some("general"));
    assert_eq!(pl.defaulted, [Dimension::Purpose]);
    // A listed one is its own bucket, not flagged; blanks are as good as nothing.
    r.purpose = Some("bulk");
    let pl = plan(&p, &r).unwrap();
    assert_eq!(pl.purpose.as_deref(), Some("bulk"));
    assert!(pl.defaulted.is_empty());
    r.purpose = Some("  ");
    let pl = plan(&p, &r).unwrap();
    assert_eq!(
        (pl.purpose.as_deref(), pl.defaulted.len()),
        (Some("general"), 0)
    );
}

#[test]
fn a_principal_declaring_a_purpose_it_may_not_gets_the_default() {
    let p = policy();
    let mut r = req("erp", "/orders/1");
    r.purpose = Some("sync");
    assert_eq!(charged(&p, &r, BucketKind::Purpose), ["purpose:sync"]);
    // Listed, but not erp's: like an unlisted one (unknown: default).
    r.purpose = Some("bulk");
    let pl = plan(&p, &r).unwrap();
    assert_eq!(pl.purpose.as_deref(), Some("general"));
    assert_eq!(pl.defaulted, [Dimension::Purpose]);
    // The default is always allowed.
    r.purpose = Some("general");
    let pl = plan(&p, &r).unwrap();
    assert_eq!(
        (pl.purpose.as_deref(), pl.defaulted.len()),
        (Some("general"), 0)
    );
    assert!(may_declare(&p, Dimension::Purpose, "erp", "sync"));
    assert!(may_declare(&p, Dimension::Purpose, "erp", "general"));
    assert!(!may_declare(&p, Dimension::Purpose, "erp", "bulk"));
    assert!(may_declare(&p, Dimension::Purpose, "web", "bulk"));
}

#[test]
fn a_model_the_policy_does_not_list_or_the_principal_may_not_use_is_refused() {
    let p = policy();
    let mut r = req("web", "/v1/chat");
    r.model = Some("gpt-9");
    assert_eq!(plan(&p, &r), Err(Reject::NotDeclarable(Dimension::Model)));
    let e = Reject::NotDeclarable(Dimension::Model);
    assert_eq!((e.status(), e.code()), (403, "model_not_allowed"));
    r.model = Some("large");
    assert_eq!(
        charged(&p, &r, BucketKind::Model),
        ["model:large"],
        "web may declare any listed model"
    );
    let mut r = req("bot", "/v1/chat");
    r.model = Some("large");
    assert_eq!(plan(&p, &r), Err(Reject::NotDeclarable(Dimension::Model)));
    r.model = Some("small");
    assert_eq!(charged(&p, &r, BucketKind::Model), ["model:small"]);
}

#[test]
fn omitting_the_model_header_is_charged_to_the_default_model() {
    let p = policy();
    let r = req("web", "/v1/chat");
    let pl = plan(&p, &r).unwrap();
    assert_eq!(pl.model.as_deref(), Some("small"));
    let models: Vec<String> = pl
        .buckets
        .iter()
        .filter(|b| b.kind.is_model())
        .map(|b| b.name())
        .collect();
    assert_eq!(models, ["model:small", "model_total:small"]);
}

#[test]
fn outside_its_families_a_declared_dimension_is_not_charged() {
    let p = policy();
    let mut r = req("web", "/orders/1");
    r.model = Some("gpt-9");
    let pl = plan(&p, &r).unwrap();
    assert_eq!(pl.model, None);
    assert!(pl.buckets.iter().all(|b| !b.kind.is_model()));
}

#[test]
fn without_a_default_a_missing_value_is_refused() {
    let p = parse(&POLICY.replace("  default: small\n", "")).unwrap();
    let r = req("web", "/v1/chat");
    assert_eq!(plan(&p, &r), Err(Reject::Undeclared(Dimension::Model)));
    let e = Reject::Undeclared(Dimension::Model);
    assert_eq!((e.status(), e.code()), (400, "model_required"));
}

#[test]
fn the_body_model_of_an_ai_request_follows_the_same_rule() {
    let text = format!(
        "{POLICY}tokens:\n  path_prefixes: [/v1/chat]\n  default_estimate: 1\n  users: {{ per_minute: 600, burst: 100 }}\n"
    );
    let p = parse(&text).unwrap();
    let mut r = req("web", "/v1/chat");
    r.user = Some("u1");
    // Planned from the headers: no model yet, the body decides.
    let pl = plan(&p, &r).unwrap();
    assert_eq!(pl.model, None);
    let admitted = crate::ai::admit(&p, pl.clone(), None, br#"{"model":"gpt-9"}"#);
    assert_eq!(
        admitted.map(|_| ()),
        Err(crate::ai::AdmitError::Declared(Reject::NotDeclarable(
            Dimension::Model
        )))
    );
    let (admitted, inspected, _) = crate::ai::admit(&p, pl.clone(), None, b"{}").unwrap();
    assert_eq!(admitted.model.as_deref(), Some("small"));
    assert_eq!(inspected.model.as_deref(), Some("small"));
    assert!(admitted.buckets.iter().any(|b| b.name() == "model:small"));
    let (admitted, _, _) = crate::ai::admit(&p, pl, None, br#"{"model":"large"}"#).unwrap();
    assert!(admitted.buckets.iter().any(|b| b.name() == "model:large"));
    assert!(admitted.buckets.iter().all(|b| b.name() != "model:small"));
}

#[test]
fn declared_dimension_settings_are_validated_naming_the_field() {
    let cases = [
        (
            POLICY.replace("  default: general\n", ""),
            "purposes.default",
        ),
        (
            POLICY.replace("  default: general\n", "  unknown: default\n"),
            "purposes.unknown",
        ),
        (
            POLICY.replace("  default: general\n", "  default: nope\n"),
            "purposes.default",
        ),
        (
            POLICY.replace("  families: [chat]\n", "  families: [nope]\n"),
            "models.families[0]",
        ),
        (
            POLICY.replace("  families: [chat]\n", "  families: []\n"),
            "models.families",
        ),
        (
            POLICY.replace(
                "may_declare_purposes: [sync]",
                "may_declare_purposes: [nope]",
            ),
            "principals[0].may_declare_purposes[0]",
        ),
        (
            POLICY.replace("may_declare_models: [small]", "may_declare_models: [sync]"),
            "principals[1].may_declare_models[0]",
        ),
    ];
    for (text, path) in cases {
        match parse(&text) {
            Ok(_) => panic!("accepted, expected an error at {path}"),
            Err(e) => assert_eq!(e.path, path, "{e}"),
        }
    }
    // The policy without its models section: nothing to declare.
    let no_models = POLICY.split("models:\n").next().unwrap().to_string();
    let e = parse(&no_models).unwrap_err();
    assert_eq!(e.path, "principals[1].may_declare_models", "{e}");
}
