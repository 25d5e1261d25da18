"""Secrets never reach the terminal, logs or the state store, in any encoding a server may echo.

Credentials are registered once where they are read; ``redact`` replaces every form of each one
(as is, URL-encoded with either hex case, form-encoded, JSON- and HTML-escaped) with ``***``.
"""

from __future__ import annotations

import html
import json
import logging
import re
from urllib.parse import quote, quote_plus

_SECRETS: set[str] = set()
MASK = "***"


def register(*secrets: str | None) -> None:
    """Remember credentials for the rest of the process (empty values are ignored)."""
    _SECRETS.update(secret for secret in secrets if secret)


def _forms(secret: str) -> set[str]:
    forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret), html.escape(secret)}
    forms.add(json.dumps(secret)[1:-1])
    forms |= {re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), form) for form in list(forms)}
    return {form for form in forms if form}


def redact(text: str, extra: tuple[str, ...] = ()) -> str:
    """``text`` with every registered secret (and ``extra``) masked, longest forms first."""
    forms = set().union(*(_forms(secret) for secret in (*_SECRETS, *extra) if secret))
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Masks secrets in log records before any handler formats them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True
