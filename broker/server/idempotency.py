"""Idempotency claims: the value stored under a key in the ``laneway_idempotency`` bucket.

A claim is ``"<job_id> <claimed_at> <request digest>"``. The digest
(``laneway.broker.core.wire.jobs.request_digest``) is of the job the caller asked
for, so a key sent again with the same job finds its original (``duplicate``),
while a key reused for another job (other input, lane, schedule, metadata,
providers; the deadline does not count) is refused with ALREADY_EXISTS, nothing
enqueued, rather than answered with a job that is not the one asked for. A claim
written before digests were stored has none, and matches every request (the
behaviour it was written under).
"""

from __future__ import annotations

from dataclasses import dataclass

from laneway.errors import AlreadyExists

__all__ = ["Claim", "check_same_job", "decode_claim", "encode_claim"]


@dataclass(frozen=True, slots=True)
class Claim:
    job_id: str
    claimed_at: float
    """Unix time the claim was written (0 when unknown)."""
    digest: str = ""


def encode_claim(claim: Claim) -> bytes:
    return f"{claim.job_id} {claim.claimed_at:.3f} {claim.digest}".rstrip().encode()


def decode_claim(value: bytes) -> Claim:
    job_id, _, rest = value.decode().partition(" ")
    claimed_at, _, digest = rest.partition(" ")
    try:
        at = float(claimed_at or 0)
    except ValueError:
        at = 0.0
    return Claim(job_id, at, digest.strip())


def check_same_job(stored: Claim, key: str, digest: str) -> None:
    """Raise ALREADY_EXISTS (reason IDEMPOTENCY_KEY_REUSED) when the job that holds
    ``key`` was submitted with another request than the one with ``digest``."""
    if stored.digest and digest and stored.digest != digest:
        raise AlreadyExists(
            f"idempotency key {key!r} was used for another job ({stored.job_id}) with a different "
            "request; nothing was enqueued: use a new key for new work",
            reason="IDEMPOTENCY_KEY_REUSED",
            metadata={"job_id": stored.job_id, "idempotency_key": key},
        )
