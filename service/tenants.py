"""Tenants, API keys, scopes and per-tenant rates: who is calling, and what they may do.

- A key reads `hsk_<key id>_<secret>`. The key id is public (it names the key in lists and logs); the
  secret is 32 random bytes and is stored only as its SHA-256 (a hash of a high-entropy secret needs no
  slow KDF), compared in constant time.
- `Authenticator` turns the `authorization: Bearer <key>` metadata into a `Caller`. A verified key is
  trusted for `auth_cache_seconds` (2 s by default) before the store is asked again, so a revocation made
  through another server replica or the local CLI takes effect within that time; one made through this
  server takes effect at once. While the store does not answer (a database restart), a key verified within
  `auth_stale_seconds` (5 minutes) keeps being accepted, with its tenant's quotas as last read, so that
  loaded heads keep serving; a key not verified in that time is UNAVAILABLE until the store is back.
- Scopes: `predict`, `train` (which includes predict) and `admin` (tenants and keys of every tenant).
- `RateLimiter`: token buckets per tenant for Predict requests and inputs per second, per replica.
- `TenantAdmin`: the admin use cases, shared by the Admin RPCs and the local `headserve tenants|keys`
  commands, which work on the store with no server running.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable

from adapters.errors import InvalidInput, NotFound, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable
from service.storage import TenantStore
from service.store import DEFAULT_TENANT, KeyRecord, Quotas, TenantRecord, Usage, now_ms, store_outage, task_key

PREDICT, TRAIN, ADMIN = "predict", "train", "admin"
SCOPES = (PREDICT, TRAIN, ADMIN)
IMPLIED = {TRAIN: {PREDICT}}  # a scope also grants these
DEFAULT_SCOPES = (PREDICT, TRAIN)
KEY_PREFIX = "hsk"
KEY = re.compile(r"hsk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def quote(text: str, limit: int = 40) -> str:
    """`text` for an error message: repr'd, and cut to `limit` characters with an ellipsis."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def page_limit(page_size: int) -> int:
    """Items on a page of a List call: page_size, 0 for the default (100), at most 1000."""
    if page_size < 0 or page_size > 1000:
        raise InvalidInput(f"page_size must be between 0 (default 100) and 1000, not {page_size}")
    return page_size or 100


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who is calling: their tenant, the key they used ('' without auth) and what it may do."""

    tenant_id: str
    key_id: str
    scopes: frozenset[str]
    quotas: Quotas = Quotas()

    def key(self, task_id: str) -> str:
        """The store's key of this tenant's task `task_id`."""
        return task_key(self.tenant_id, task_id)

    def require(self, scope: str | None, method: str) -> None:
        if scope is not None and scope not in self.scopes:
            raise PermissionDenied(
                f"{method} needs an API key with the {scope!r} scope; this key has "
                f"{', '.join(sorted(self.scopes)) or 'none'}")


def grants(scopes: list[str] | tuple[str, ...]) -> frozenset[str]:
    out = set(scopes)
    for scope in scopes:
        out |= IMPLIED.get(scope, set())
    return frozenset(out)


def check_scopes(scopes: list[str] | tuple[str, ...]) -> list[str]:
    if not scopes:
        raise InvalidInput(f"a key needs at least one scope; choose from {', '.join(SCOPES)}")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise InvalidInput(f"unknown scope {quote(unknown[0])}; choose from {', '.join(SCOPES)}")
    return sorted(set(scopes))


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(tenant_id: str, scopes: list[str], description: str = "", expires_at_ms: int = 0) -> tuple[KeyRecord, str]:
    """A new key for `tenant_id`: its record (to store) and the key itself (shown once, never stored)."""
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    record = KeyRecord(key_id, tenant_id, secret_hash(secret), check_scopes(scopes), description,
                       expires_at_ms=expires_at_ms)
    return record, f"{KEY_PREFIX}_{key_id}_{secret}"


def bearer(metadata) -> str | None:
    """The key in `authorization: Bearer <key>` metadata; None when there is no such metadata."""
    for name, value in metadata or ():
        if name == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("malformed authorization metadata; send 'authorization: Bearer <API key>'")
            return token.strip()
    return None


class Authenticator:
    """API key -> Caller, with a short cache of verified keys (see the module docstring)."""

    def __init__(self, store: TenantStore, cache_seconds: float = 2.0, stale_seconds: float = 300.0) -> None:
        self.store = store
        self.cache_seconds = cache_seconds
        self.stale_seconds = stale_seconds
        # key id or 'tenant:ID' -> (trusted since, record, quotas, read from the store at)
        self._cache: dict[str, tuple[float, KeyRecord | None, Quotas, float]] = {}
        self._outage = False  # the last store read failed for want of a store: stale entries serve
        self._flights: dict[str, concurrent.futures.Future] = {}  # store reads under way, by cache slot
        self._stale: set[concurrent.futures.Future] = set()  # reads a forget() overlapped: not cached
        self._lock = threading.Lock()

    def anonymous(self) -> Caller:
        """The caller when auth is off: the default tenant, every scope, its quotas (cached like a key)."""
        return Caller(DEFAULT_TENANT, "", frozenset(SCOPES), self._tenant_quotas(DEFAULT_TENANT))

    def authenticate(self, token: str | None) -> Caller:
        if token is None:
            raise Unauthenticated("no API key; send metadata 'authorization: Bearer <API key>'")
        match = KEY.fullmatch(token)
        if match is None:
            raise Unauthenticated("malformed API key; a key reads hsk_<key id>_<secret>")
        key_id, secret = match.groups()
        record, quotas = self._lookup(key_id)
        if record is None or not hmac.compare_digest(record.secret_sha256, secret_hash(secret)):
            raise Unauthenticated(f"API key {key_id} is not valid")
        now = now_ms()
        if record.revoked_at_ms:  # revocation is at once: the time is the revoker's clock, not this one's
            raise Unauthenticated(f"API key {key_id} was revoked")
        if record.expires_at_ms and record.expires_at_ms <= now:
            raise Unauthenticated(f"API key {key_id} expired; ask an admin for a new one")
        return Caller(record.tenant_id, key_id, grants(record.scopes), quotas)

    def _lookup(self, key_id: str) -> tuple[KeyRecord | None, Quotas]:
        def load() -> tuple[KeyRecord | None, Quotas, bool]:
            record = self.store.get_key(key_id)
            if record is None:
                return None, Quotas(), False  # not cached: a key created elsewhere works at once
            try:
                return record, self.store.get_tenant(record.tenant_id).quotas, True
            except NotFound:
                return None, Quotas(), False

        return self._cached(key_id, load)

    def _tenant_quotas(self, tenant_id: str) -> Quotas:
        return self._cached(f"tenant:{tenant_id}", lambda: (None, self.store.get_tenant(tenant_id).quotas, True))[1]

    def _cached(self, slot: str, load: Callable[[], tuple[KeyRecord | None, Quotas, bool]]
                ) -> tuple[KeyRecord | None, Quotas]:
        """A cache slot's (record, quotas): from the cache while fresh; else read by one caller while the
        others that want the same slot wait for its answer (single flight: when a popular key's entry
        expires, concurrent calls make one store read, not one each). `load` returns the answer and whether
        it may be cached."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(slot)
            if hit is not None and now - hit[0] < self.cache_seconds:
                return hit[1], hit[2]
            stale = hit is not None and now - hit[3] < self.stale_seconds
            flight = self._flights.get(slot)
            leader = flight is None
            if leader:
                flight = self._flights[slot] = concurrent.futures.Future()
            elif stale and self._outage:  # the store is down and being asked again: no need to wait for it
                return hit[1], hit[2]
        if not leader:
            try:
                return flight.result(timeout=30)  # the first caller's read (or its error)
            except concurrent.futures.TimeoutError:
                raise Unavailable("the tenant store did not answer in time; retry") from None
        try:
            record, quotas, cacheable = load()
        except BaseException as exc:
            with self._lock:
                forgotten = self._land(slot, flight)
                if stale and not forgotten and store_outage(exc):
                    # Serve what was verified last, and ask the store again after cache_seconds.
                    self._outage = True
                    self._cache[slot] = (now, hit[1], hit[2], hit[3])
                    flight.set_result((hit[1], hit[2]))
                    return hit[1], hit[2]
            flight.set_exception(exc)
            raise
        with self._lock:
            self._outage = False
            if not self._land(slot, flight) and cacheable:
                if len(self._cache) > 100_000:
                    self._cache.clear()
                self._cache[slot] = (now, record, quotas, now)
        flight.set_result((record, quotas))
        return record, quotas

    def _land(self, slot: str, flight: concurrent.futures.Future) -> bool:
        """(lock held) The read has its answer: later callers read the cache, or start their own. Whether a
        forget() overlapped it (its answer is then not cached)."""
        if self._flights.get(slot) is flight:
            del self._flights[slot]
        stale = flight in self._stale
        self._stale.discard(flight)
        return stale

    def forget(self, key_id: str = "", tenant_id: str = "") -> None:
        """Drops cached knowledge of a key or of a tenant's keys and quotas (after a change made here). A
        read in flight may have started before the change: its answer is not cached, and later callers read
        again."""
        with self._lock:
            if key_id:
                self._cache.pop(key_id, None)
            if tenant_id:
                self._cache.pop(f"tenant:{tenant_id}", None)
                for kid in [k for k, v in self._cache.items() if v[1] is not None and v[1].tenant_id == tenant_id]:
                    del self._cache[kid]
            # Which key ids a tenant's flights are for is not known before they answer: a tenant change
            # makes every flight stale.
            for slot in [slot for slot in self._flights if tenant_id or slot == key_id]:
                self._stale.add(self._flights.pop(slot))


class _Bucket:
    __slots__ = ("rate", "tokens", "stamp")

    def __init__(self, rate: float) -> None:
        self.rate, self.tokens, self.stamp = rate, max(rate, 1.0), time.monotonic()

    def take(self, amount: float) -> float:
        """Takes `amount` tokens and returns 0, or returns the seconds until they will be there."""
        now = time.monotonic()
        capacity = max(self.rate, amount, 1.0)  # a burst of one second's worth (or one request)
        self.tokens = min(capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= amount:
            self.tokens -= amount
            return 0.0
        return (amount - self.tokens) / self.rate


class RateLimiter:
    """Per-tenant token buckets for Predict requests and inputs per second (from the tenant's quotas)."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._lock = threading.Lock()

    def charge(self, caller: Caller, inputs: int) -> None:
        q = caller.quotas
        for name, rate, amount in (("predict_requests_per_second", q.predict_requests_per_second, 1),
                                   ("predict_inputs_per_second", q.predict_inputs_per_second, inputs)):
            if rate <= 0:
                continue
            with self._lock:
                bucket = self._buckets.get((caller.tenant_id, name))
                if bucket is None or bucket.rate != rate:
                    bucket = self._buckets[(caller.tenant_id, name)] = _Bucket(rate)
                wait = bucket.take(amount)
            if wait:
                raise ResourceExhausted(f"over the tenant's {name} quota ({rate:g}/s); retry in {wait:.2f} s")


@dataclasses.dataclass
class TenantView:
    tenant: TenantRecord
    usage: Usage


class TenantAdmin:
    """Tenants and keys: the Admin RPCs and the local CLI both go through here."""

    def __init__(self, store: TenantStore, authenticator: Authenticator | None = None) -> None:
        self.store = store
        self.authenticator = authenticator

    def _forget(self, **what: str) -> None:
        if self.authenticator is not None:
            self.authenticator.forget(**what)

    def create_tenant(self, name: str, scopes: list[str] | tuple[str, ...] = DEFAULT_SCOPES,
                      description: str = "", expires_at_ms: int = 0) -> tuple[TenantRecord, KeyRecord, str]:
        """A new tenant and its first key (returned once, in full)."""
        if not TENANT_NAME.fullmatch(name):
            raise InvalidInput(f"tenant name {quote(name)} is not valid: use 1-64 letters, digits, '.', '_' or "
                               "'-', starting with a letter or digit")
        tenant = TenantRecord(f"tn-{secrets.token_hex(6)}", name, Quotas())
        self._check_expiry(expires_at_ms)
        record, key = new_key(tenant.tenant_id, list(scopes), description or "first key", expires_at_ms)
        self.store.create_tenant(tenant, record)
        return tenant, record, key

    def tenant(self, ref: str) -> TenantView:
        tenant = self.store.get_tenant(ref)
        return TenantView(tenant, self.store.usage(tenant.tenant_id))

    def list_tenants(self, page_size: int = 0, page_token: str = "") -> tuple[list[TenantView], str]:
        """A page of tenants in name order, with the token of the next page ('' after the last). The token
        is the page's last name."""
        size = page_limit(page_size)
        records = self.store.list_tenants(page_token, size + 1)
        page = [TenantView(t, self.store.usage(t.tenant_id)) for t in records[:size]]
        return page, (records[size - 1].name if len(records) > size else "")

    def delete_tenant(self, ref: str) -> tuple[TenantRecord, list[str]]:
        """Deletes the tenant and everything it owns; returns it and its task keys."""
        tenant = self.store.get_tenant(ref)
        keys = self.store.delete_tenant(tenant.tenant_id)
        self._forget(tenant_id=tenant.tenant_id)
        return tenant, keys

    def set_quotas(self, ref: str, quotas: Quotas) -> TenantView:
        for field in dataclasses.fields(quotas):
            if not getattr(quotas, field.name) >= 0:  # NaN too: stored, it would refuse every Predict
                raise InvalidInput(f"quota {field.name} must be 0 (unlimited) or positive")
        tenant = self.store.get_tenant(ref)
        self.store.set_quotas(tenant.tenant_id, quotas)
        self._forget(tenant_id=tenant.tenant_id)
        return self.tenant(tenant.tenant_id)

    def task_usage(self, ref: str) -> tuple[TenantView, list[tuple[str, int, int, int]]]:
        """The tenant and its tasks' Predict traffic: (task id, requests, inputs, last used ms)."""
        view = self.tenant(ref)
        return view, self.store.task_usage(view.tenant.tenant_id)

    def create_key(self, ref: str, scopes: list[str], description: str = "",
                   expires_at_ms: int = 0) -> tuple[KeyRecord, str]:
        tenant = self.store.get_tenant(ref)
        self._check_expiry(expires_at_ms)
        if len(description) > 200:
            raise InvalidInput(f"a key's description has at most 200 characters, not {len(description)}")
        record, key = new_key(tenant.tenant_id, scopes, description, expires_at_ms)
        self.store.create_key(record)
        return record, key

    def list_keys(self, ref: str = "", page_size: int = 0, page_token: str = "") -> tuple[list[KeyRecord], str]:
        """A page of keys (of the tenant `ref`, when given) in the order they were made, with the token of
        the next page ('' after the last): the page's last key, as 'CREATED_MS:KEY_ID'."""
        size = page_limit(page_size)
        after = (-1, "")
        if page_token:
            created, _, key_id = page_token.partition(":")
            if not (created.isascii() and created.isdigit() and len(created) <= 18 and key_id):
                raise InvalidInput(f"page_token {quote(page_token)} is not a next_page_token of ListKeys")
            after = (int(created), key_id)
        tenant_id = self.store.get_tenant(ref).tenant_id if ref else ""
        records = self.store.list_keys(tenant_id, after, size + 1)
        last = records[size - 1] if len(records) > size else None
        return records[:size], (f"{last.created_at_ms}:{last.key_id}" if last else "")

    def revoke_key(self, key_id: str, ref: str = "") -> KeyRecord:
        tenant_id = self.store.get_tenant(ref).tenant_id if ref else ""
        record = self.store.revoke_key(key_id, tenant_id)
        self._forget(key_id=key_id)
        return record

    @staticmethod
    def _check_expiry(expires_at_ms: int) -> None:
        if expires_at_ms < 0 or (expires_at_ms and expires_at_ms <= now_ms()):
            raise InvalidInput("a key's expiry must be in the future (or 0 for none)")
