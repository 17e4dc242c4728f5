"""Keep credentials out of everything a process writes: URLs with masked passwords, redacted log records.

The passwords of ``EVENTFLEET_DATABASE_URL`` and ``EVENTFLEET_AMQP_URL`` are the secrets. ``cli.main``
collects them with ``secrets_of`` and installs ``RedactingFormatter`` on the only log handler (see
``logs.setup``), and passes its one-line error messages through ``text``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import urllib.parse
from collections.abc import Iterable
from typing import Any

MASK = "***"

# Too short to mask in free text without erasing ordinary words; such a password is masked in URLs only.
MIN_SECRET_LENGTH = 4

# scheme://user:password@ in free text, whatever the secrets configured: the password is group 2, up to the
# URL's last '@' (a password with an unencoded '@' is masked whole, not up to its first '@').
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:)([^\s/?#]+)(@)")
# The same up to the first '@', for what the first misses: a password with an unencoded '/', '?' or '#'.
_URL_PASSWORD_LOOSE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:)([^@\s]+)(@)")
# password=... in a query string or a libpq keyword/value DSN.
_PASSWORD_PARAM = re.compile(r"(\bpassword=)([^&\s]+)", re.IGNORECASE)


def url(value: str) -> str:
    """The URL with its password (user info or ``password=`` parameter) replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:
        return f"{value.partition(':')[0]}://{MASK}" if "://" in value else MASK
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{hosts}"
    query = _PASSWORD_PARAM.sub(rf"\g<1>{MASK}", parts.query)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def secrets_of(*urls: str) -> tuple[str, ...]:
    """The passwords in these URLs, as written and percent-decoded, longest first."""
    found: set[str] = set()
    for value in urls:
        try:
            parts = urllib.parse.urlsplit(value)
        except ValueError:
            parts = None
        userinfo, at, _ = (parts.netloc if parts else value.partition("://")[2]).rpartition("@")
        if at and ":" in userinfo:
            found.add(userinfo.partition(":")[2])
        for match in _PASSWORD_PARAM.finditer(parts.query if parts else value):
            found.add(match.group(2))
    found |= {urllib.parse.unquote(s) for s in found} | {urllib.parse.unquote_plus(s) for s in found}
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def text(value: str, secrets: Iterable[str] = ()) -> str:
    """value with every secret, every URL password and every ``password=`` value replaced by ``***``."""
    for secret in secrets:
        if len(secret) >= MIN_SECRET_LENGTH:
            value = value.replace(secret, MASK)
    value = _URL_PASSWORD.sub(rf"\g<1>{MASK}\g<3>", value)
    value = _URL_PASSWORD_LOOSE.sub(rf"\g<1>{MASK}\g<3>", value)
    return _PASSWORD_PARAM.sub(rf"\g<1>{MASK}", value)


def fields(obj: Any) -> str:
    """``Name(field=value, ...)`` of a dataclass with every URL's password masked (``url``), the URLs in
    tuples too, and the whole text then passed through ``text``: the ``__repr__`` of a configuration."""

    def shown(value: Any) -> Any:
        if isinstance(value, str) and "://" in value:
            return url(value)
        if isinstance(value, tuple):
            return tuple(shown(v) for v in value)
        return value

    listed = ", ".join(f"{f.name}={shown(getattr(obj, f.name))!r}" for f in dataclasses.fields(obj) if f.repr)
    return text(f"{type(obj).__name__}({listed})")


class RedactingFormatter(logging.Formatter):
    """Formats with another formatter, then redacts the whole text.

    It redacts the finished line rather than filtering the record: a filter runs before formatting, so
    the message arguments, the ``extra`` fields and the exception text rendered later would escape it.
    """

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.inner = inner
        self.secrets = tuple(sorted(set(secrets), key=len, reverse=True))

    def format(self, record: logging.LogRecord) -> str:
        return text(self.inner.format(record), self.secrets)
