//! The one bucket-key codec, shared by the filter and every store.
//!
//! `lg1:<domain>:<k>=<v>:<k>=<v>…` where every domain, key and value is percent-escaped
//! outside `[A-Za-z0-9._@-]`. Separators (`:`, `=`) and braces never appear unescaped inside
//! a part, so the encoding is injective (decodable), unlike joining with `_`, where
//! `a_b`+`c` and `a`+`b_c` collide. The value of a `tenant` entry is wrapped in `{…}`: a Redis
//! Cluster hash tag, so all of one tenant's buckets live in one slot and one Lua script can
//! update them atomically. The `v1` prefix lets a later format coexist during a rollout.

/// The version prefix of every key.
pub const PREFIX: &str = "lg1";

/// Encode a domain and descriptor entries into a bucket key.
pub fn encode<K: AsRef<str>, V: AsRef<str>>(domain: &str, entries: &[(K, V)]) -> String {
    let mut out = String::with_capacity(16 + domain.len() + entries.len() * 24);
    out.push_str(PREFIX);
    out.push(':');
    escape_into(domain, &mut out);
    for (k, v) in entries {
        let (k, v) = (k.as_ref(), v.as_ref());
        out.push(':');
        escape_into(k, &mut out);
        out.push('=');
        if k == "tenant" {
            out.push('{');
            escape_into(v, &mut out);
            out.push('}');
        } else {
            escape_into(v, &mut out);
        }
    }
    out
}

/// Decode a key produced by [`encode`]. Returns `None` for anything else.
pub fn decode(key: &str) -> Option<(String, Vec<(String, String)>)> {
    let mut parts = key.split(':');
    if parts.next()? != PREFIX {
        return None;
    }
    let domain = unescape(parts.next()?)?;
    let mut entries = Vec::new();
    for part in parts {
        let (k, v) = part.split_once('=')?;
        let k = unescape(k)?;
        let v = if k == "tenant" {
            unescape(v.strip_prefix('{')?.strip_suffix('}')?)?
        } else {
            unescape(v)?
        };
        entries.push((k, v));
    }
    Some((domain, entries))
}

/// The Redis Cluster hash tag of a key (the tenant, escaped), if it has one.
pub fn hash_tag(key: &str) -> Option<&str> {
    let start = key.find('{')?;
    let end = key[start + 1..].find('}')? + start + 1;
    Some(&key[start + 1..end])
}

fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-')
}

fn escape_into(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if is_plain(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        }
    }
}

fn unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if is_plain(b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn shape_and_hash_tag() {
        let k = encode(
            "laneguard",
            &[("tenant", "north:wind"), ("bucket", "shared")],
        );
        assert_eq!(k, "lg1:laneguard:tenant={north%3Awind}:bucket=shared");
        assert_eq!(hash_tag(&k), Some("north%3Awind"));
        let no_tenant = encode("laneguard", &[("bucket", "model_total"), ("model", "m")]);
        assert_eq!(hash_tag(&no_tenant), None);
    }

    /// envoyproxy/ratelimit joins descriptor parts with `_`, so these two collide there.
    #[test]
    fn underscore_join_collision_does_not_happen() {
        let a = encode("d", &[("a_b", "c")]);
        let b = encode("d", &[("a", "b_c")]);
        assert_ne!(a, b);
    }

    #[test]
    fn braces_in_values_cannot_fake_a_hash_tag() {
        let k = encode("d", &[("user", "{evil}"), ("tenant", "t")]);
        assert_eq!(hash_tag(&k), Some("t"));
    }

    fn entries() -> impl Strategy<Value = Vec<(String, String)>> {
        let part = prop_oneof![
            "[a-z_:=%{}]{0,6}",
            prop::sample::select(vec!["tenant".to_string(), "bucket".to_string()]),
            any::<String>(),
        ];
        prop::collection::vec((part.clone(), part), 0..4)
    }

    proptest! {
        #[test]
        fn codec_round_trips(domain in any::<String>(), e in entries()) {
            let key = encode(&domain, &e);
            prop_assert_eq!(decode(&key), Some((domain, e)));
        }

        #[test]
        fn codec_is_injective(d1 in "[a-z_:]{0,4}", e1 in entries(), d2 in "[a-z_:]{0,4}", e2 in entries()) {
            if (d1.clone(), e1.clone()) != (d2.clone(), e2.clone()) {
                prop_assert_ne!(encode(&d1, &e1), encode(&d2, &e2));
            }
        }
    }
}
