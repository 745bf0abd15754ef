"""Secrets kept out of what ganforge writes: every URI's credentials are redacted (with the rules below, not a
URL parser's, because a raw "@", "/" or "?" in a password defeats a parser) in logs, summaries, MLflow params,
Prefect parameters and the CLI's one-line failures."""

from __future__ import annotations

import logging
import re
from typing import Any


# a URI inside any text: a scheme, "://", then everything up to whitespace or a quote
_URI = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>[^\s'\"<>]+)")
# query parameters whose values are secrets (password=, token=, X-Amz-Signature=, api_key=, ...)
_SECRET_NAME = re.compile(r"(?i)pass|pwd|secret|token|key|sig|credential|auth")


def _redact_uri(m: re.Match) -> str:
    scheme, rest = m["scheme"], m["rest"]
    # The userinfo ends at the LAST "@" before the query: a password may hold raw "@", "/" or ":" that a URL
    # parser would take for the host or path. Redacting a path that merely contains "user:x@" is the safe
    # mistake.
    head, qmark, query = rest.partition("?")
    at = head.rfind("@")
    if at < 0 and "@" in query:  # no "@" before the first "?": was that "?" inside a password?
        at = rest.rfind("@")
        user = rest[:at].partition(":")[0]
        if ":" in rest[:at] and not any(c in user for c in "/?#"):
            head, qmark, query = rest, "", ""
        else:
            at = -1
    if at > 0:
        user, colon, _ = head[:at].partition(":")
        if colon:
            head = f"{user}:***{head[at:]}"
        elif scheme.lower() in ("http", "https"):  # https://TOKEN@host: the token stands where a user would
            head = f"***{head[at:]}"
    if qmark:
        query, hash_, fragment = query.partition("#")
        parts = []
        for item in query.split("&"):
            name, eq, value = item.partition("=")
            parts.append(f"{name}=***" if eq and value and _SECRET_NAME.search(name) else item)
        query = "&".join(parts) + hash_ + fragment
    return f"{scheme}://{head}{qmark}{query}"


def redact(value: Any) -> Any:
    """Every URI's secrets replaced by ``***``, inside strings, lists and dicts: the password of its userinfo
    (``postgresql://user:***@host/db``, even when the password holds a raw ``@`` or ``/``), a bare token
    (``https://***@host``) and secret query values (``?password=***``, ``X-Amz-Signature=***``). ganforge
    writes no credential it was given into logs, summaries, MLflow params or Prefect."""
    if isinstance(value, str):
        return _URI.sub(_redact_uri, value) if "://" in value else value
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """A handler's filter: the record's message (with its arguments) redacted before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "://" in msg:
            record.msg, record.args = redact(msg), None
        return True
