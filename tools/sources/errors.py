"""The errors sources raise, all one line long.

The Graph Construction Agent records ``str(error)`` as the reason an expert was rejected or a
pass failed, so every message names what went wrong and where, on a single line, and every
error of this package derives from :class:`SourceError` so the agent needs one ``except``.
"""

from __future__ import annotations

from diffgraph.errors import DiffGraphError


class SourceError(DiffGraphError):
    """Base class: something a source or the download store refused or could not do."""


class ApiError(SourceError):
    """An API answered with an error, answered garbage, or could not be reached."""


class DownloadError(SourceError):
    """A download did not complete (network, server or size limit)."""


class FileGone(DownloadError):
    """The host answers that a listed file does not exist (404 or 410: a deleted version)."""


class StoreFull(DownloadError):
    """A download would take the content store over its budget (DIFFGRAPH_MAX_STORE_GB), or the
    disk holding the store is full."""


class IntegrityError(DownloadError):
    """The downloaded bytes do not match the published sha256."""


class UnsafeFileError(SourceError):
    """A file was refused before or instead of being stored: a hostile name, a pickle file
    without opt-in, a file that is too large."""


class InvalidSafetensors(UnsafeFileError):
    """A file is not a well-formed safetensors file (checked without loading it)."""
