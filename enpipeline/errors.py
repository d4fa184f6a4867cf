"""Domain errors with the stable codes and HTTP statuses of the reference publish API."""

from __future__ import annotations

# `code` strings of the reference's v1 API (pkg/api/v1).
CODE_BAD_REQUEST = "bad_request"
CODE_INTERNAL = "internal_error"
CODE_UNKNOWN_HEALTH_AUTHORITY = "unknown_health_authority_id"
CODE_UNABLE_TO_LOAD_HEALTH_AUTHORITY = "unable_to_load_health_authority"
CODE_HEALTH_AUTHORITY_MISSING_REGION_CONFIG = "health_authority_missing_region_config"
CODE_VERIFICATION_CERTIFICATE_INVALID = "health_authority_verification_certificate_invalid"
CODE_INVALID_REVISION_TOKEN = "invalid_revision_token"
CODE_MISSING_REVISION_TOKEN = "missing_revision_token"
CODE_KEY_ALREADY_REVISED = "key_already_revised"
CODE_INVALID_REPORT_TYPE_TRANSITION = "invalid_report_type_transition"
CODE_PARTIAL_FAILURE = "partial_failure"


class PublishError(Exception):
    """A publish that must be answered with an error status and code."""

    def __init__(self, status: int, code: str, message: str, warnings: list[str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.warnings = warnings or []


class VerificationError(Exception):
    """The verification certificate (JWT + tekmac) was rejected; the message is the reason."""


class RevisionTokenError(Exception):
    """A revision token could not be decoded or decrypted."""


class RevisionError(Exception):
    """A key revision was refused; ``code`` maps to the API's code string."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
