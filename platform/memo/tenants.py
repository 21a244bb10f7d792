"""Tenants and API keys for the memory router.

A tenants file (YAML) lists who may call the router and which domains each may ask:

    tenants:
      - name: support-team
        key_sha256: 9f2c...            # sha256 of the API key; the key itself is never stored
        domains: [demo, hr]            # or ["*"] for every domain
        requests_per_minute_per_replica: 120   # rate limit (0 = unlimited), enforced by each router replica

`memo tenants add` creates an entry and prints the new key exactly once. The router re-reads a changed
file within `tenants_reload_s` (ServeConfig): a revoked key is refused and a new key works without a
redeploy; a malformed new file is rejected with a log line and the previous tenants stay in force.

Rate limits are kept per router replica (a token bucket in each), hence the field's name: with N router
replicas a tenant may reach N x its limit. The shipped configs run one router replica; scale the router
and the limit together (limit / N), or put a shared limiter in front, when an exact global limit matters. Keys are compared by hash
with `hmac.compare_digest` against every entry (the time taken does not depend on which entry, or
how much of a hash, matched), and never logged: logs and errors name the tenant, not the key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
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
RATE_FIELD = "requests_per_minute_per_replica"
log = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Tenant:
    name: str
    key_sha256: str
    domains: list[str]
    requests_per_minute_per_replica: int = 0

    def allows(self, domain: str) -> bool:
        return "*" in self.domains or domain in self.domains


@dataclass
class RateLimiter:
    """Token bucket per tenant: `rpm` requests per minute with bursts up to `rpm / 6` (10 s worth), in
    one router replica (see the module docstring for several replicas)."""

    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def allow(self, tenant: Tenant, now: float | None = None) -> tuple[bool, float]:
        """(allowed, seconds until the next request would be allowed)."""
        rpm = tenant.requests_per_minute_per_replica
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
        if "requests_per_minute" in r:
            raise MemoError(f"{where} ({name}): `requests_per_minute` is now `{RATE_FIELD}` (limits are kept by "
                            "each router replica); rename the key")
        rpm = r.get(RATE_FIELD, 0)
        if not isinstance(rpm, int) or isinstance(rpm, bool) or rpm < 0:
            raise MemoError(f"{where} ({name}): `{RATE_FIELD}` must be an integer >= 0")
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


class TenantsFile:
    """The tenants a router replica enforces, re-read when the file changes (checked at most every
    `reload_s` seconds, on the request path: a stat call). A file that fails to load leaves the previous
    tenants in force and logs one line per change naming the problem."""

    def __init__(self, path: str | Path, reload_s: float = 2.0):
        self.path, self.reload_s = Path(path), reload_s
        self.tenants = load_tenants(self.path)  # the first load must succeed: nothing to fall back on
        self._stamp, self._checked, self._rejected = self._stat(), time.monotonic(), None
        self._lock = threading.Lock()

    def _stat(self):
        try:
            st = os.stat(self.path)
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError:
            return None

    def current(self) -> list[Tenant]:
        now = time.monotonic()
        if now - self._checked < self.reload_s:
            return self.tenants
        with self._lock:
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp or stamp == self._rejected:
                return self.tenants
            try:
                tenants = load_tenants(self.path)
            except MemoError as e:
                self._rejected = stamp
                log.error(f"tenants file rejected, keeping the previous {len(self.tenants)} tenant(s): {e}")
                return self.tenants
            self.tenants, self._stamp, self._rejected = tenants, stamp, None
            log.warning(f"tenants file {self.path} reloaded: {len(tenants)} tenant(s)")
        return self.tenants


def _write(p: Path, tenants: list) -> None:
    rows = [t if isinstance(t, dict) else {"name": t.name, "key_sha256": t.key_sha256, "domains": t.domains,
                                            RATE_FIELD: t.requests_per_minute_per_replica} for t in tenants]
    # Atomic replace: a router re-reading the file mid-write sees the old file or the new one, never half.
    write_text(p, "# MeMo router tenants: API keys are stored as sha256 hashes only.\n"
               + yaml.safe_dump({"tenants": rows}, sort_keys=False), mode=0o600)


def revoke_tenant(path: str | Path, name: str) -> None:
    p = Path(path)
    current = load_tenants(p)
    if not any(t.name == name for t in current):
        raise MemoError(f"--name {name}: no such tenant in {p} (tenants: {', '.join(t.name for t in current)})")
    _write(p, [t for t in current if t.name != name])


def add_tenant(path: str | Path, name: str, domains: list[str], requests_per_minute_per_replica: int = 0) -> str:
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
    if requests_per_minute_per_replica < 0:
        raise MemoError(f"--rpm-per-replica {requests_per_minute_per_replica}: use 0 (unlimited) or more")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    _write(p, current + [{"name": name, "key_sha256": hash_key(key), "domains": domains,
                          RATE_FIELD: requests_per_minute_per_replica}])
    return key
