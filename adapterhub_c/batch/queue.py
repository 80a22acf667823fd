"""The batch work queue, kept in the registry: batches, items, claims, leases.

An item is ``queued``, ``running`` (claimed by one worker until its lease expires),
``done`` or ``failed``. Claiming is one atomic statement:

    UPDATE batch_items SET state='running', attempts=attempts+1, worker_id=…, lease_expires_at=…
    WHERE id = (SELECT id FROM batch_items WHERE batch_id=… AND state='queued'
                ORDER BY position LIMIT 1 FOR UPDATE SKIP LOCKED)
      AND state='queued'
    RETURNING …

On PostgreSQL the sub-select locks the row and skips rows other workers hold, so many
workers claim different items without waiting on each other. SQLite has no row locks
(SQLAlchemy drops the FOR UPDATE clause); there every registry transaction starts with
BEGIN IMMEDIATE, so the statement runs under the database write lock, and the
``state='queued'`` re-check makes it a compare-and-set either way.

A claim's ``attempts`` value is its token: the worker renews its lease, records step
outputs and completes the item only while (worker id, attempts, state='running') still
match. A worker that lost its lease (it stalled past expiry and someone else took the
item over) can therefore never record a second completion: no item runs twice to
completion. Expired leases (a killed worker) return the item to the queue, counting the
attempt; an item out of attempts fails with the reason.
"""
from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError as SAIntegrityError

from adapterhub_c.errors import NotFoundError, UsageError
from adapterhub_c.registry.models import Batch, BatchItem, utcnow
from adapterhub_c.registry.store import Registry

STATES = ("queued", "running", "done", "failed")
ERROR_HISTORY = 10  # errors of earlier attempts kept per item (outputs["errors"])


@dataclass
class Claim:
    """A worker's hold on one item: the item's identity and the claim token (attempt)."""

    item_id: int
    batch_id: str
    position: int
    source: str
    attempt: int
    worker_id: str
    outputs: dict[str, Any] = field(default_factory=dict)


def canonical(params: dict[str, Any]) -> str:
    """Canonical JSON of batch parameters (what makes two runs "the same batch")."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)


# ---- batches -------------------------------------------------------------------------
def open_batch(reg: Registry, name: str, command: str, params: dict[str, Any], sources: Iterable[str],
               max_attempts: int) -> tuple[Batch, dict[str, int]]:
    """Create batch ``name``, or reopen it for another run; returns (batch, changes).

    Reopening requires the same command and parameters (UsageError otherwise). Sources
    not yet in the batch are appended: a source listed twice becomes a second item that
    fails at once as a duplicate (never retried), so a list with duplicates is reported
    item by item and the same list given again adds nothing. Failed items with attempts
    left go back to the queue. ``changes`` counts {"added", "duplicates", "requeued"}.
    """
    if max_attempts < 1:
        raise UsageError("--retries must be >= 0")
    sources = list(sources)
    try:
        return _open_batch(reg, name, command, params, sources, max_attempts)
    except SAIntegrityError:
        # Another process created the same batch between our look-up and insert: reopen it.
        return _open_batch(reg, name, command, params, sources, max_attempts)


def _open_batch(reg, name, command, params, sources, max_attempts):
    changes = {"added": 0, "duplicates": 0, "requeued": 0}
    with reg.session() as s:
        batch = s.scalar(select(Batch).where(Batch.name == name).with_for_update())
        if batch is None:
            batch = Batch(name=name, command=command, params=params, max_attempts=max_attempts)
            s.add(batch)
            s.flush()
        else:
            if batch.command != command or canonical(batch.params) != canonical(params):
                diff = _describe_diff(batch.params, params)
                raise UsageError(f"batch {name!r} exists with other options ({diff}); "
                                 "give the same options to resume it, or pick another --name")
            batch.max_attempts = max_attempts
            batch.updated_at = utcnow()
        items = s.scalars(select(BatchItem).where(BatchItem.batch_id == batch.id)
                          .order_by(BatchItem.position)).all()
        have = Counter(i.source for i in items)
        first = {}
        for i in items:
            first.setdefault(i.source, i.position)
        position = max((i.position for i in items), default=0)
        seen: Counter = Counter()
        for src in sources:
            seen[src] += 1
            if seen[src] <= have[src]:
                continue
            position += 1
            if src in first:
                s.add(BatchItem(batch_id=batch.id, position=position, source=src, state="failed",
                                retryable=False, attempts=0, outputs={},
                                error=f"duplicate of item #{first[src]} ({src})", finished_at=utcnow()))
                changes["duplicates"] += 1
            else:
                first[src] = position
                s.add(BatchItem(batch_id=batch.id, position=position, source=src, state="queued", outputs={}))
                changes["added"] += 1
        for item in items:
            if item.state == "failed" and item.retryable and item.attempts < max_attempts:
                item.state, item.error = "queued", None
                item.worker_id = item.lease_expires_at = None
                changes["requeued"] += 1
        s.flush()
        return batch, changes


def _describe_diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if canonical({"v": old.get(k)}) != canonical({"v": new.get(k)}))
    return ", ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys[:3]) or "parameters differ"


def get_batch(reg: Registry, ref: str) -> Batch:
    """A batch by name or id prefix (UsageError with suggestions if unknown)."""
    with reg.session() as s:
        batch = s.scalar(select(Batch).where(Batch.name == ref))
        if batch is None and len(ref) >= 4:
            found = s.scalars(select(Batch).where(Batch.id.startswith(ref))).all()
            if len(found) == 1:
                batch = found[0]
        if batch is None:
            raise NotFoundError("batch", ref, s.scalars(select(Batch.name)).all())
        return batch


# ---- claiming and leases ---------------------------------------------------------------
def claim(reg: Registry, batch_id: str, worker_id: str, lease_s: float) -> Claim | None:
    """Atomically take the first queued item of the batch, or None if none is queued."""
    now = utcnow()
    pick = (select(BatchItem.id)
            .where(BatchItem.batch_id == batch_id, BatchItem.state == "queued")
            .order_by(BatchItem.position).limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery())
    stmt = (update(BatchItem)
            .where(BatchItem.id == pick, BatchItem.state == "queued")
            .values(state="running", worker_id=worker_id, attempts=BatchItem.attempts + 1,
                    lease_expires_at=now + dt.timedelta(seconds=lease_s), started_at=now,
                    finished_at=None, error=None)
            .returning(BatchItem.id, BatchItem.position, BatchItem.source, BatchItem.attempts,
                       BatchItem.outputs)
            .execution_options(synchronize_session=False))
    with reg.session() as s:
        row = s.execute(stmt).first()
    if row is None:
        return None
    return Claim(item_id=row.id, batch_id=batch_id, position=row.position, source=row.source,
                 attempt=row.attempts, worker_id=worker_id, outputs=dict(row.outputs or {}))


def _owned(c: Claim):
    return and_(BatchItem.id == c.item_id, BatchItem.worker_id == c.worker_id,
                BatchItem.attempts == c.attempt, BatchItem.state == "running")


def renew(reg: Registry, c: Claim, lease_s: float) -> bool:
    """Extend the lease; False if the claim is no longer this worker's."""
    stmt = (update(BatchItem).where(_owned(c))
            .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_s))
            .execution_options(synchronize_session=False))
    with reg.session() as s:
        return s.execute(stmt).rowcount == 1


def _locked_item(s, c: Claim) -> BatchItem | None:
    return s.scalar(select(BatchItem).where(_owned(c)).with_for_update())


def record_output(reg: Registry, c: Claim, key: str, value: Any) -> bool:
    """Store ``outputs[key] = value`` for a claimed item; False if the claim was lost."""
    with reg.session() as s:
        item = _locked_item(s, c)
        if item is None:
            return False
        outputs = dict(item.outputs or {})
        outputs[key] = value
        item.outputs = outputs
        c.outputs = outputs
        return True


def complete(reg: Registry, c: Claim, artifact_ids: list[str], run_id: str | None = None) -> bool:
    """Mark the claimed item done (compare-and-set); False if the claim was lost."""
    with reg.session() as s:
        item = _locked_item(s, c)
        if item is None:
            return False
        now = utcnow()
        item.state, item.error, item.lease_expires_at = "done", None, None
        item.finished_at = now
        item.duration_s = (now - item.started_at).total_seconds() if item.started_at else None
        item.artifact_ids = list(artifact_ids)
        item.run_id = run_id
        return True


def fail(reg: Registry, c: Claim, error: str, run_id: str | None = None) -> bool:
    """Mark the claimed item failed with ``error``; False if the claim was lost."""
    with reg.session() as s:
        item = _locked_item(s, c)
        if item is None:
            return False
        now = utcnow()
        item.state, item.error, item.lease_expires_at = "failed", error[:2000], None
        item.finished_at = now
        item.duration_s = (now - item.started_at).total_seconds() if item.started_at else None
        item.outputs = _with_error(item.outputs, item.attempts, error)
        item.run_id = run_id
        return True


def _with_error(outputs: dict | None, attempt: int, error: str) -> dict:
    out = dict(outputs or {})
    out["errors"] = (list(out.get("errors", [])) + [{"attempt": attempt, "error": error[:500]}])[-ERROR_HISTORY:]
    return out


def _return_to_queue(s, items: Iterable[BatchItem], reason: str, count_attempt: bool = True) -> int:
    n = 0
    for item in items:
        if not count_attempt:
            item.attempts = max(0, item.attempts - 1)
        item.outputs = _with_error(item.outputs, item.attempts, reason) if count_attempt else item.outputs
        item.worker_id, item.lease_expires_at = None, None
        max_attempts = s.get(Batch, item.batch_id).max_attempts
        if item.attempts >= max_attempts:
            item.state, item.error, item.finished_at = "failed", f"{reason} (attempt {item.attempts})", utcnow()
        else:
            item.state = "queued"
        n += 1
    return n


def reap_expired(reg: Registry, batch_id: str) -> int:
    """Return running items whose lease expired (their worker died) to the queue."""
    with reg.session() as s:
        items = s.scalars(select(BatchItem).where(
            BatchItem.batch_id == batch_id, BatchItem.state == "running",
            BatchItem.lease_expires_at < utcnow()).with_for_update(skip_locked=True)).all()
        return _return_to_queue(s, items, "worker lost: lease expired")


def release_worker(reg: Registry, batch_id: str, worker_prefix: str, reason: str,
                   count_attempt: bool = True) -> int:
    """Return the running items of workers whose id starts with ``worker_prefix`` to the queue.

    For workers known to be gone (a local process that died, a Ray task that failed), so
    their items need not wait for the lease to expire. ``count_attempt=False`` (the user
    interrupted) gives the attempt back.
    """
    with reg.session() as s:
        items = s.scalars(select(BatchItem).where(
            BatchItem.batch_id == batch_id, BatchItem.state == "running",
            BatchItem.worker_id.startswith(worker_prefix, autoescape=True)).with_for_update()).all()
        return _return_to_queue(s, items, reason, count_attempt)


def release_claim(reg: Registry, c: Claim, reason: str, count_attempt: bool = False) -> bool:
    """Give one claimed item back to the queue (e.g. the worker was interrupted)."""
    with reg.session() as s:
        item = _locked_item(s, c)
        if item is None:
            return False
        _return_to_queue(s, [item], reason, count_attempt)
        return True


# ---- reading ---------------------------------------------------------------------------
def counts(reg: Registry, batch_id: str) -> dict[str, int]:
    """{state: number of items} for every state (zeros included)."""
    with reg.session() as s:
        rows = s.execute(select(BatchItem.state, func.count()).where(BatchItem.batch_id == batch_id)
                         .group_by(BatchItem.state)).all()
    out = dict.fromkeys(STATES, 0)
    out.update({state: n for state, n in rows})
    return out


def outstanding(reg: Registry, batch_id: str) -> tuple[int, dt.datetime | None]:
    """(items queued or running, the earliest lease expiry among running items)."""
    with reg.session() as s:
        n = s.scalar(select(func.count()).where(BatchItem.batch_id == batch_id,
                                                or_(BatchItem.state == "queued", BatchItem.state == "running")))
        soonest = s.scalar(select(func.min(BatchItem.lease_expires_at)).where(
            BatchItem.batch_id == batch_id, BatchItem.state == "running"))
    return int(n or 0), soonest


def items(reg: Registry, batch_id: str) -> list[BatchItem]:
    """All items of a batch in list order (detached)."""
    with reg.session() as s:
        return list(s.scalars(select(BatchItem).where(BatchItem.batch_id == batch_id)
                              .order_by(BatchItem.position)))
