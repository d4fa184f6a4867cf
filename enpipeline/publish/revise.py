"""Pure rules for revising an already stored key (report-type transitions and token checks)."""

from __future__ import annotations

import dataclasses
from enum import Enum

from enpipeline.errors import (
    CODE_INTERNAL,
    CODE_INVALID_REPORT_TYPE_TRANSITION,
    CODE_INVALID_REVISION_TOKEN,
    CODE_KEY_ALREADY_REVISED,
    CODE_MISSING_REVISION_TOKEN,
    RevisionError,
)
from enpipeline.model import (
    REPORT_TYPE_CONFIRMED,
    REPORT_TYPE_LIKELY,
    REPORT_TYPE_NEGATIVE,
    REPORT_TYPE_SELF_REPORT,
    Exposure,
    RevisableKey,
)

# Allowed report-type transitions (stored -> incoming). A stored "" counts as likely.
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    REPORT_TYPE_LIKELY: frozenset({REPORT_TYPE_CONFIRMED, REPORT_TYPE_NEGATIVE}),
    REPORT_TYPE_SELF_REPORT: frozenset({REPORT_TYPE_CONFIRMED, REPORT_TYPE_LIKELY, REPORT_TYPE_NEGATIVE}),
}


class TokenState(Enum):
    NONE = "none"  # no token sent (or not base64): treated as absent
    UNREADABLE = "unreadable"  # present but failed to decrypt
    VALID = "valid"


def check_token(stored: Exposure, incoming: Exposure, token_state: TokenState,
                token_keys: dict[bytes, RevisableKey], *, allow_partial: bool) -> bool:
    """Token and metadata checks for re-sent keys. Returns False when the key is to be silently dropped."""
    if token_state is TokenState.NONE:
        raise RevisionError(CODE_MISSING_REVISION_TOKEN, "no revision token, but sent existing keys")
    if token_state is TokenState.UNREADABLE:
        raise RevisionError(CODE_INVALID_REVISION_TOKEN, "revision token is invalid")
    if (incoming.interval_number, incoming.interval_count) != (stored.interval_number, stored.interval_count):
        raise RevisionError(CODE_INTERNAL, "incoming key interval does not match the stored key")
    entry = token_keys.get(stored.exposure_key)
    if entry is None:
        if allow_partial:
            return False
        raise RevisionError(CODE_INVALID_REVISION_TOKEN, "revision token is invalid")
    if (entry.interval_number, entry.interval_count) != (stored.interval_number, stored.interval_count):
        raise RevisionError(CODE_INVALID_REVISION_TOKEN, "revision token is invalid")
    return True


def revise(stored: Exposure, incoming: Exposure) -> Exposure | None:
    """The revised row, or None when the revision is a no-op. Raises RevisionError when refused."""
    if stored.report_type == incoming.report_type:
        return None
    if stored.revised_report_type is not None and stored.revised_report_type == incoming.report_type:
        return None
    if not stored.local_provenance:
        # Federated and imported keys may only be revised through their own lineage.
        raise RevisionError(CODE_INTERNAL, "cannot revise a key that was not published here")
    if stored.revised_at is not None:
        raise RevisionError(CODE_KEY_ALREADY_REVISED, "key was already revised")
    source = stored.report_type or REPORT_TYPE_LIKELY
    if incoming.report_type not in ALLOWED_TRANSITIONS.get(source, frozenset()):
        raise RevisionError(
            CODE_INVALID_REPORT_TYPE_TRANSITION,
            f'invalid report type transition: cannot transition from "{stored.report_type}" to '
            f'"{incoming.report_type}"')
    return dataclasses.replace(
        stored,
        revised_report_type=incoming.report_type,
        revised_at=incoming.created_at,
        revised_days_since_symptom_onset=incoming.days_since_symptom_onset,
        revised_transmission_risk=incoming.transmission_risk,
        health_authority_id=incoming.health_authority_id,
        # Regions are only ever added, never removed.
        regions=sorted(set(stored.regions) | set(incoming.regions)),
    )
