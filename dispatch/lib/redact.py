"""Secrets that must never be shown: credentials in a slot's URL (``http://user:pass@host``).

A slot URL may carry userinfo (an upstream behind basic auth); hal0web sends it upstream and
shows it nowhere else: not in errors, events, snapshots, log lines, ``/healthz`` or the
admin's lists. ``api_key_env`` is the way to give a slot a credential (README, Slots).

Pure: strings in, strings out.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://userinfo@ anywhere in a text. Userinfo cannot hold "/", "@" or whitespace
# (RFC 3986 §3.2.1: it is percent-encoded there), so the match stops at the host.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s?#]+@")


def masked(value: str) -> str:
    """``value`` (a URL, an error message, a log line) with every URL's userinfo replaced
    by ``***``: ``http://***@host:8001/v1``."""
    return _USERINFO.sub(rf"\1{MASK}@", value) if "@" in value else value
