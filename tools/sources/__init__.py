"""Where experts come from: the Civitai and Hugging Face Hub APIs, a local folder, and the
mini world's hub (both APIs at once), each yielding ExpertRecords; and the content-addressed
store their files are downloaded into, verified, and checked for safety.

Every error raised here is a one-line :class:`SourceError`, for the agent to record as a reason.
"""

from .base import Source
from .civitai import CivitaiSource
from .destinations import ForbiddenDestination, check_destination
from .download import ContentStore, load_weights, safe_name
from .errors import (
    ApiError,
    DownloadError,
    FileGone,
    IntegrityError,
    InvalidSafetensors,
    SourceError,
    StoreFull,
    UnsafeFileError,
)
from .hf import HFSource
from .http import RetryPolicy
from .local import LocalFolderSource
from .spec import SourceSpec, open_sources, parse_source_spec
from .validate import Header, check_finite, validate_safetensors

__all__ = [
    "ApiError", "CivitaiSource", "ForbiddenDestination", "check_destination", "ContentStore", "DownloadError", "FileGone", "HFSource", "Header", "IntegrityError",
    "InvalidSafetensors", "LocalFolderSource", "RetryPolicy", "Source", "SourceError", "SourceSpec", "StoreFull",
    "UnsafeFileError", "check_finite", "load_weights", "open_sources", "parse_source_spec", "safe_name", "validate_safetensors",
]
