#!/usr/bin/env python3
"""Mint the demo JWTs in envoy/demo/tokens.env and print the JWKS that verifies them.

DEMO ONLY. The RSA private key in envoy/demo/demo-jwt-key.json is committed to the
repository so that anyone can run the demo. Anyone can therefore mint a token that the
demo gateway accepts for any tenant. Never use this key, these tokens or this gateway
configuration for anything but a local demo: in production the JWKS belongs to your
identity provider and the private key never leaves it.

The tokens are RS256 JWTs with the claims the demo gateway turns into identity headers
(envoy/demo/envoy.yaml, jwt_authn provider `demo`): `tenant` -> x-laneguard-tenant,
`principal` -> x-laneguard-principal, `sub` -> x-laneguard-user. They expire in 2100.
RS256 with PKCS#1 v1.5 padding is deterministic, so the same key and claims always give
the same tokens, and `--check` can tell whether tokens.env and envoy.yaml are current.

Python 3 standard library only.

usage:
  mint-tokens.py            write tokens.env and print the JWKS (public key only)
  mint-tokens.py --check    exit 1 if tokens.env or the JWKS in envoy.yaml are stale
  mint-tokens.py --new-key  generate a new demo key, rewrite the key file, tokens.env and
                            the JWKS line in envoy.yaml
  mint-tokens.py --mint TENANT PRINCIPAL SUB
                            print one token for these claims (any string, JSON-escaped in
                            the token); writes nothing. The tests use it for odd identities.
"""

import argparse
import base64
import hashlib
import json
import math
import os
import re
import secrets
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KEY_FILE = os.path.join(HERE, "demo-jwt-key.json")
TOKENS_FILE = os.path.join(HERE, "tokens.env")
ENVOY_FILE = os.path.join(HERE, "envoy.yaml")

ISSUER = "laneguard-demo"
EXPIRES = 4102444800  # 2100-01-01T00:00:00Z: demo tokens should outlive the demo
KID = "laneguard-demo-1"

# name in tokens.env -> (tenant, principal, sub)
TOKENS = [
    ("NORTHWIND_WEB", "northwind", "web", "alice"),
    ("NORTHWIND_ERP", "northwind", "erp", "svc-erp"),
    ("NORTHWIND_RECON", "northwind", "recon", "svc-recon"),
    ("NORTHWIND_SUPPORT", "northwind", "support", "bob-support"),
    ("NORTHWIND_EXPORT", "northwind", "export", "svc-export"),
    ("NORTHWIND_ASSISTANT", "northwind", "assistant", "svc-assistant"),
    ("ACME_WEB", "acme", "web", "carol"),
]

# DER prefix of DigestInfo for SHA-256 (RFC 8017, section 9.2, note 1).
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")

# The single line in envoy.yaml that holds the JWKS; --new-key rewrites it.
JWKS_LINE = re.compile(r"^(\s*inline_string: )'\{\"keys\".*'\s*$", re.MULTILINE)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def int_to_b64url(n: int) -> str:
    return b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def b64url_to_int(text: str) -> int:
    return int.from_bytes(b64url_decode(text), "big")


def compact_json(value) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def load_key() -> dict:
    try:
        with open(KEY_FILE, encoding="utf-8") as f:
            jwk = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"mint-tokens: cannot read the demo key {KEY_FILE}: {e} "
                 "(run with --new-key to make one)")
    if jwk.get("kty") != "RSA" or not all(k in jwk for k in ("n", "e", "d")):
        sys.exit(f"mint-tokens: {KEY_FILE} is not an RSA private JWK")
    return jwk


def jwks(jwk: dict) -> str:
    public = {k: jwk[k] for k in ("kty", "kid", "alg", "use", "n", "e")}
    return compact_json({"keys": [public]})


def sign_rs256(jwk: dict, signing_input: bytes) -> bytes:
    n, d = b64url_to_int(jwk["n"]), b64url_to_int(jwk["d"])
    k = (n.bit_length() + 7) // 8
    t = SHA256_DIGEST_INFO + hashlib.sha256(signing_input).digest()
    em = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
    return pow(int.from_bytes(em, "big"), d, n).to_bytes(k, "big")


def mint(jwk: dict, tenant: str, principal: str, sub: str) -> str:
    header = {"alg": "RS256", "kid": jwk["kid"], "typ": "JWT"}
    claims = {"iss": ISSUER, "sub": sub, "tenant": tenant, "principal": principal,
              "exp": EXPIRES}
    signing_input = f"{b64url(compact_json(header).encode())}." \
                    f"{b64url(compact_json(claims).encode())}".encode("ascii")
    return f"{signing_input.decode('ascii')}.{b64url(sign_rs256(jwk, signing_input))}"


def tokens_env(jwk: dict) -> str:
    lines = [
        "# Demo JWTs for envoy/demo/envoy.yaml, written by envoy/demo/mint-tokens.py.",
        "# DEMO ONLY: signed with the demo key committed in this repository.",
        "# Usage: set -a; . envoy/demo/tokens.env; set +a",
        "#        curl -H \"Authorization: Bearer $NORTHWIND_WEB\" http://127.0.0.1:10000/orders/1",
    ]
    for name, tenant, principal, sub in TOKENS:
        lines.append(f"# tenant={tenant} principal={principal} sub={sub}")
        lines.append(f"{name}={mint(jwk, tenant, principal, sub)}")
    return "\n".join(lines) + "\n"


def is_probable_prime(n: int, rounds: int = 40) -> bool:
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(rounds):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def random_prime(bits: int, e: int) -> int:
    while True:
        # Top two bits set so that p*q has exactly 2*bits bits; odd.
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if math.gcd(candidate - 1, e) == 1 and is_probable_prime(candidate):
            return candidate


def new_key() -> dict:
    e = 65537
    while True:
        p, q = random_prime(1024, e), random_prime(1024, e)
        if p != q:
            break
    n = p * q
    d = pow(e, -1, math.lcm(p - 1, q - 1))
    return {"kty": "RSA", "kid": KID, "alg": "RS256", "use": "sig",
            "n": int_to_b64url(n), "e": int_to_b64url(e), "d": int_to_b64url(d),
            "comment": "DEMO ONLY: committed on purpose so the laneguard demo runs anywhere. "
                       "Never trust this key outside a local demo."}


def read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="exit 1 if tokens.env or the JWKS in envoy.yaml are stale")
    mode.add_argument("--new-key", action="store_true",
                      help="generate a new demo key and rewrite everything that depends on it")
    mode.add_argument("--mint", nargs=3, metavar=("TENANT", "PRINCIPAL", "SUB"),
                      help="print one token for these claims and write nothing")
    args = parser.parse_args()

    if args.mint:
        print(mint(load_key(), *args.mint))
        return 0

    if args.new_key:
        jwk = new_key()
        write(KEY_FILE, json.dumps(jwk, indent=2) + "\n")
        envoy = read(ENVOY_FILE)
        if not JWKS_LINE.search(envoy):
            sys.exit(f"mint-tokens: no `inline_string: '{{\"keys\"...` line in {ENVOY_FILE}")
        write(ENVOY_FILE, JWKS_LINE.sub(lambda m: f"{m.group(1)}'{jwks(jwk)}'", envoy, count=1))
    else:
        jwk = load_key()

    if args.check:
        stale = []
        if read(TOKENS_FILE) != tokens_env(jwk):
            stale.append(os.path.relpath(TOKENS_FILE))
        if f"'{jwks(jwk)}'" not in read(ENVOY_FILE):
            stale.append(f"the JWKS in {os.path.relpath(ENVOY_FILE)}")
        if stale:
            print(f"mint-tokens: stale: {', '.join(stale)}; run python3 {os.path.relpath(__file__)}",
                  file=sys.stderr)
            return 1
        return 0

    write(TOKENS_FILE, tokens_env(jwk))
    print(jwks(jwk))
    return 0


if __name__ == "__main__":
    sys.exit(main())
