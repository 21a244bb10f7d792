"""Tenants and API keys for the memory router.

A tenants file (YAML) lists who may call the router and which domains each may ask:

    tenants:
      - name: support-team
        key_sha256: 9f2c...            # sha256 of the API key; the key itself is never stored
        domains: [demo, hr]            # or ["*"] for every domain
        requests_per_minute: 120       # per-tenant rate limit (0 = unlimited)

`memo tenants add` creates an entry and prints the new key exactly once. Keys are compared by hash
with `hmac.compare_digest` against every entry (the time taken does not depend on which entry, or
how much of a hash, matched), and never logged: logs and errors name the tenant, not the key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from memo.atomic import write_text
from memo.config import check_domain
from memo.errors import MemoError

KEY_PREFIX = "memo-sk-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Tenant:
    name: str
    key_sha256: str
    domains: list[str]
    requests_per_minute: int = 0

    def allows(self, domain: str) -> bool:
        return "*" in self.domains or domain in self.domains


@dataclass
class RateLimiter:
    """Token bucket per tenant: `rpm` requests per minute with bursts up to `rpm / 6` (10 s worth).

    Per router replica: with N router replicas a tenant may reach N x its limit; run one router
    replica per limit domain, or put a shared limiter in front, when that matters."""

    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def allow(self, tenant: Tenant, now: float | None = None) -> tuple[bool, float]:
        """(allowed, seconds until the next request would be allowed)."""
        rpm = tenant.requests_per_minute
        if rpm <= 0:
            return True, 0.0
        now = time.monotonic() if now is None else now
        capacity, rate = max(1.0, rpm / 6), rpm / 60.0
        with self.lock:
            tokens, last = self.buckets.get(tenant.name, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * rate)
            if tokens >= 1:
                self.buckets[tenant.name] = (tokens - 1, now)
                return True, 0.0
            self.buckets[tenant.name] = (tokens, now)
            return False, (1 - tokens) / rate


def load_tenants(path: str | Path) -> list[Tenant]:
    """Read and validate a tenants file; every problem names the file and the entry."""
    p = Path(path)
    if not p.exists():
        raise MemoError(f"tenants_file {p}: no such file (create one with `memo tenants add --file {p} ...`)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise MemoError(f"{p}: not valid YAML ({e})") from None
    rows = data.get("tenants") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise MemoError(f"{p}: expected a top-level `tenants:` list")
    out, names, hashes = [], set(), set()
    for i, r in enumerate(rows, start=1):
        where = f"{p}: tenant #{i}"
        if not isinstance(r, dict):
            raise MemoError(f"{where}: expected a mapping with name, key_sha256, domains")
        if "key" in r:
            raise MemoError(f"{where}: holds a plain `key`; store only `key_sha256` (memo tenants add does this)")
        name, h, domains = r.get("name"), r.get("key_sha256"), r.get("domains")
        if not isinstance(name, str) or not name:
            raise MemoError(f"{where}: `name` is required")
        if not isinstance(h, str) or len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
            raise MemoError(f"{where} ({name}): `key_sha256` must be 64 lowercase hex characters")
        if not isinstance(domains, list) or not domains:
            raise MemoError(f"{where} ({name}): `domains` must be a non-empty list (or [\"*\"])")
        for d in domains:
            if d != "*":
                check_domain(str(d), f"{where} ({name}) domains")
        rpm = r.get("requests_per_minute", 0)
        if not isinstance(rpm, int) or rpm < 0:
            raise MemoError(f"{where} ({name}): `requests_per_minute` must be an integer >= 0")
        if name in names or h in hashes:
            raise MemoError(f"{where} ({name}): duplicate tenant name or key")
        names.add(name)
        hashes.add(h)
        out.append(Tenant(name, h, [str(d) for d in domains], rpm))
    return out


def authenticate(tenants: list[Tenant], key: str | None) -> Tenant | None:
    """The tenant whose key hash matches, comparing against every entry in constant time."""
    if not key:
        return None
    h = hash_key(key)
    found = None
    for t in tenants:
        if hmac.compare_digest(h, t.key_sha256):
            found = t
    return found


def add_tenant(path: str | Path, name: str, domains: list[str], requests_per_minute: int = 0) -> str:
    """Append a tenant with a fresh key to the file (created if missing); returns the key (shown once)."""
    p = Path(path)
    current = load_tenants(p) if p.exists() else []
    if any(t.name == name for t in current):
        raise MemoError(f"--name {name}: a tenant with this name is already in {p}")
    domains = [d.strip() for d in domains if d.strip()]
    if not domains:
        raise MemoError("--domains: give at least one domain (or * for all)")
    for d in domains:
        if d != "*":
            check_domain(d, "--domains")
    if requests_per_minute < 0:
        raise MemoError(f"--rpm {requests_per_minute}: use 0 (unlimited) or more")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = {"name": name, "key_sha256": hash_key(key), "domains": domains, "requests_per_minute": requests_per_minute}
    rows = [{"name": t.name, "key_sha256": t.key_sha256, "domains": t.domains,
             "requests_per_minute": t.requests_per_minute} for t in current] + [entry]
    write_text(p, "# MeMo router tenants: API keys are stored as sha256 hashes only.\n"
               + yaml.safe_dump({"tenants": rows}, sort_keys=False), mode=0o600)
    return key
