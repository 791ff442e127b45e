"""No secret is ever recorded: what goes to MLflow params, ``config.yaml``, ``sweep.json``, tags,
Tune's experiment state and the console passes through :func:`redact` first.

Redacted: every value inside a ``storage_options`` mapping (where s3fs keys and tokens go; the
keys stay visible so a reader sees which options were set), every string value whose key looks
like a credential (``key``, ``secret``, ``token``, ``password``, ``credential``, ...), AWS access
key ids anywhere in a string, and the password of ``scheme://user:password@host`` URLs. Jobs never
carry storage options: the driver reads the data and publishes it (``orchestrator.runs.inputs``), so
workers need no credentials of the user's data.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"(^|[_.-])(key|secret|token|password|passwd|pwd|credential|credentials|session|"
                         r"auth|authorization|signature|access[_-]?key)s?($|[_.-])|secret|password|token",
                         re.IGNORECASE)
_NOT_SECRET_KEYS = {"image_column", "task_id", "kid_subset_size"}
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}\b")
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://[^/:@\s]+:)[^@/\s]+@")


def is_secret_key(key: str) -> bool:
    return key not in _NOT_SECRET_KEYS and bool(_SECRET_KEY.search(key))


def redact_text(text: str) -> str:
    text = _AWS_KEY_ID.sub(REDACTED, text)
    return _URL_PASSWORD.sub(lambda m: m.group("scheme") + REDACTED + "@", text)


def _all_leaves(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _all_leaves(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_all_leaves(v) for v in value]
    return value if value is None or isinstance(value, bool) else REDACTED


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` (dicts, lists, strings, numbers) with secrets replaced."""
    if isinstance(value, dict):
        return {k: (_all_leaves(v) if k == "storage_options" else redact(v, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, tuple):
        return tuple(redact(v, key) for v in value)
    if isinstance(value, str):
        if key and is_secret_key(key):
            return REDACTED
        return redact_text(value)
    return value


def has_redacted(value: Any) -> bool:
    if isinstance(value, dict):
        return any(has_redacted(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(has_redacted(v) for v in value)
    return value == REDACTED
