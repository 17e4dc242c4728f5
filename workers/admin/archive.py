"""Closing and archiving a stream from the command line: who archives, and what an archival would do."""

from __future__ import annotations

import getpass
import socket

from store import archive


def operator() -> str:
    """Who runs the command, for the audit row when ``--by`` is not given: ``user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's user), nor a variable naming one
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def describe(found: archive.ArchivePreview) -> str:
    """One line on what ``archive --yes`` would do with the stream now, or why it would refuse."""
    refusal = found.refusal
    if refusal is not None:
        return f"stream {found.stream_id}: refused: {refusal}"
    return (f"stream {found.stream_id}: would move {found.events} event(s) to events_archive and append "
            f"StreamArchived to archived-{found.stream_id}")


def report(entry: archive.ArchiveEntry) -> str:
    """One line on an archival done."""
    return (f"stream {entry.stream_id}: archived {entry.events} event(s) (versions 0-{entry.last_version}, "
            f"positions {entry.first_position}-{entry.last_position}) as archive {entry.archive_id}, "
            f"by {entry.archived_by}")
