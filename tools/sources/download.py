"""The content-addressed store every expert file lands in: ``<home>/blobs/sha256/<aa>/<hash>``.

Addressing by the published sha256 makes a download idempotent (a file already there is not
fetched again, whichever source or name it came under) and makes verification the only way in:
bytes stream into ``<hash>.partial`` beside their final place, resume from there after a cut
(HTTP Range), and are renamed into place atomically only once their sha256 matches and, for
safetensors, their header checks out and every floating-point weight is finite. Nothing an API says is used as a path: the store's paths
come from the hash alone (checked to be 64 hex digits), and file names are only checked for
what they claim to be. Pickle files (.ckpt, .pt, .pth, .bin) can run code when loaded, so they
are refused unless the caller opts in; an opted-in one is then read once with
``torch.load(weights_only=True)`` (:func:`load_weights`) and stored as a safetensors file of its
own (:meth:`ContentStore.as_safetensors`), so everything after the download reads one format.
A store may have a budget (DIFFGRAPH_MAX_STORE_GB): a download that would take it over is
refused before it starts when its size is published, and stopped when the bytes say so when it
is not, as a :class:`StoreFull` (the agent skips the expert, to be tried when there is room); a
disk that fills up during a download (ENOSPC) is a StoreFull too, its partial file removed.
One process writes a store at a time (the agent's run lock).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import replace
from pathlib import Path, PurePosixPath

import httpx

from diffgraph.files import disk_full, free_bytes, size_text
from diffgraph.graph_store.records import ExpertFile
from diffgraph.settings import get_settings

from .errors import DownloadError, FileGone, IntegrityError, InvalidSafetensors, StoreFull, UnsafeFileError
from .http import RetryPolicy, TransientStatus, check_status, describe_status, retry_call
from .validate import check_finite, looks_like_safetensors, validate_safetensors

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DEFAULT_MAX_BYTES = 64 * 2**30  # larger than any single-file checkpoint we know of
CHUNK = 1 << 20
MAX_ERROR_BODY = 1 << 16  # an error answer's body is read for its message only up to this size
_SHA256 = re.compile(r"[0-9a-f]{64}")


def safe_name(name: str) -> PurePosixPath:
    """An API-supplied file name, accepted only as a plain relative POSIX path (Hub repos have
    folders, "unet/x.safetensors"); anything that could point elsewhere is refused."""
    reason = None
    if not isinstance(name, str) or not name:
        reason = "empty"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        reason = "control character or NUL"
    elif "\\" in name or ":" in name:
        reason = "backslash or drive/stream separator"
    elif name.startswith("/"):
        reason = "absolute path"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        reason = "'.', '..' or empty path component"
    if reason:
        raise UnsafeFileError(f"unsafe file name {name!r}: {reason}")
    return PurePosixPath(name)


def checked_sha256(file: ExpertFile) -> str:
    """The published sha256, lower-cased; the store's paths are built from it, so it must be
    exactly 64 hex digits."""
    digest = (file.sha256 or "").strip().lower()
    if not _SHA256.fullmatch(digest):
        raise UnsafeFileError(f"{file.name!r}: no usable published sha256 ({file.sha256!r}); "
                              "refusing a file that cannot be verified")
    return digest


class ContentStore:
    """Files by sha256 under ``<home>/blobs/sha256``. ``home`` defaults to DIFFGRAPH_HOME,
    ``allow_pickle`` to DIFFGRAPH_ALLOW_PICKLE and ``budget`` (bytes the whole store may hold;
    None: no limit) to DIFFGRAPH_MAX_STORE_GB; ``max_bytes`` bounds any single file."""

    def __init__(self, home: str | Path | None = None, *, allow_pickle: bool | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, budget: int | None = -1):
        settings = get_settings()
        self.home = Path(home) if home is not None else settings.home
        self.root = self.home / "blobs" / "sha256"
        self.allow_pickle = settings.allow_pickle if allow_pickle is None else allow_pickle
        self.max_bytes = max_bytes
        self.budget = settings.max_store_bytes if budget == -1 else budget

    def used(self) -> int:
        """Bytes the store's files (finished and partial) take."""
        if not self.root.is_dir():
            return 0
        return sum(entry.stat().st_size for sub in os.scandir(self.root) if sub.is_dir()
                   for entry in os.scandir(sub.path) if entry.is_file())

    def room(self, file: ExpertFile) -> int | None:
        """Bytes this file may take (None: no budget), after what the store holds besides its
        own partial download; StoreFull when its published size does not fit."""
        if self.budget is None:
            return None
        partial = self.path(checked_sha256(file)).with_suffix(".partial")
        room = self.budget - self.used() + (partial.stat().st_size if partial.exists() else 0)
        if file.size is not None and file.size > room:
            raise StoreFull(_over_budget(file.name, file.size, self.budget, room))
        return room

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def get(self, sha256: str) -> Path | None:
        """The stored file with this sha256, if present."""
        sha256 = sha256.lower()
        return self.path(sha256) if _SHA256.fullmatch(sha256) and self.path(sha256).is_file() else None

    def admit(self, file: ExpertFile) -> str:
        """Everything that can be refused before a byte is fetched; returns the sha256."""
        name = safe_name(file.name)
        suffix = name.suffix.lower()
        if suffix in PICKLE_SUFFIXES and not self.allow_pickle:
            raise UnsafeFileError(f"{file.name!r} is a pickle file, which can run code when loaded; refused "
                                  "(opt in with DIFFGRAPH_ALLOW_PICKLE=1 to load it with weights_only=True)")
        if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
            raise UnsafeFileError(f"{file.name!r}: not a weights file (.safetensors or, opted in, a pickle)")
        if file.size is not None and file.size > self.max_bytes:
            raise UnsafeFileError(f"{file.name!r}: {file.size} bytes is over the {self.max_bytes}-byte limit")
        return checked_sha256(file)

    def fetch(self, file: ExpertFile, client: httpx.Client, retry: RetryPolicy | None = None) -> Path:
        """Download ``file.url`` into the store (resuming a previous partial download), verify
        it and return its path. Refusals raise UnsafeFileError, a sha256 mismatch
        IntegrityError (nothing is kept), a network failure DownloadError (the partial file is
        kept for the next attempt)."""
        sha256 = self.admit(file)
        if found := self.get(sha256):
            return self._recheck(found, file)
        if httpx.URL(file.url).scheme not in ("http", "https"):
            raise UnsafeFileError(f"{file.name!r}: refusing to download from {file.url!r} (not http/https)")
        retry = retry or RetryPolicy()
        room = self.room(file)
        partial = self._partial(sha256)
        download = _Resumable(partial, self.max_bytes, file.name, room, self.budget)
        failed = f"{file.name!r}: download from {file.url} failed after {retry.attempts} attempts"
        try:
            retry_call(lambda: download.attempt(client, file.url), retry)
            return self._commit(partial, file, sha256, download.hexdigest())
        except OSError as exc:
            if not disk_full(exc):
                raise
            partial.unlink(missing_ok=True)  # a full disk: free what this download took
            raise StoreFull(f"{file.name!r}: the disk holding the store is full ({size_text(download.size)} of it "
                            f"written, {size_text(free_bytes(self.root))} free); free space and it is tried again") from None
        except TransientStatus as exc:
            raise DownloadError(f"{failed}: {exc}") from exc
        except httpx.UnsupportedProtocol as exc:  # a redirect to file://, ftp:// ...
            partial.unlink(missing_ok=True)
            raise UnsafeFileError(f"{file.name!r}: {file.url} leads to a URL that is not http/https; refused") from exc
        except httpx.TransportError as exc:
            raise DownloadError(f"{failed}: {type(exc).__name__}: {exc}") from exc
        except (UnsafeFileError, StoreFull):
            partial.unlink(missing_ok=True)
            raise

    def ingest(self, source: str | Path, file: ExpertFile) -> Path:
        """Copy a local file into the store under the same checks as a download."""
        sha256 = self.admit(file)
        if found := self.get(sha256):
            return self._recheck(found, file)
        partial = self._partial(sha256)
        hasher = hashlib.sha256()
        try:
            with open(source, "rb") as src, open(partial, "wb") as dst:
                while chunk := src.read(CHUNK):
                    hasher.update(chunk)
                    dst.write(chunk)
            return self._commit(partial, file, sha256, hasher.hexdigest())
        except OSError as exc:
            if not disk_full(exc):
                raise
            partial.unlink(missing_ok=True)
            raise StoreFull(f"{file.name!r}: the disk holding the store is full "
                            f"({size_text(free_bytes(self.root))} free); free space and it is tried again") from None

    def check_in_place(self, path: Path, file: ExpertFile, sha256: str) -> Path:
        """A user's own safetensors file, used where it is, under the same checks as a download
        (``sha256``: what it hashes to now, which must be what it was listed with)."""
        expected = self.admit(file)
        if sha256 != expected:
            raise IntegrityError(f"{file.name!r} changed since it was listed; it is picked up at the next pass")
        check_finite(path, validate_safetensors(path))
        return path

    def as_safetensors(self, file: ExpertFile) -> ExpertFile:
        """``file`` (downloaded, ``local_path`` set) as a safetensors file: itself when it is one;
        an opted-in pickle's tensors (A1111's ``{"state_dict": ...}`` unwrapped, anything but
        named tensors dropped) written as a blob of their own, named like the published file with
        the .safetensors suffix. A payload weights_only loading refuses is an UnsafeFileError."""
        if PurePosixPath(file.name).suffix.lower() == ".safetensors":
            return file
        import torch
        from safetensors.torch import save

        try:
            state = load_weights(file.local_path, allow_pickle=self.allow_pickle)
        except UnsafeFileError:
            raise
        except Exception as exc:  # UnpicklingError for code, or a file torch cannot read at all
            raise UnsafeFileError(f"{file.name!r}: not loadable as plain tensors ({type(exc).__name__}); refused") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        tensors = ({k: v.detach().clone().contiguous() for k, v in state.items()
                    if isinstance(k, str) and isinstance(v, torch.Tensor)} if isinstance(state, dict) else {})
        if not tensors:
            raise UnsafeFileError(f"{file.name!r}: holds no named tensors")
        data = save(tensors)
        sha256 = hashlib.sha256(data).hexdigest()
        converted = ExpertFile(str(PurePosixPath(file.name).with_suffix(".safetensors")), file.url, sha256, len(data),
                               file.primary)
        if not (path := self.get(sha256)):
            partial = self._partial(sha256)
            partial.write_bytes(data)
            path = self._commit(partial, converted, sha256, sha256)  # the header and finite checks of a download
        return replace(converted, local_path=str(path))

    def _recheck(self, found: Path, file: ExpertFile) -> Path:
        """A blob already stored may have come in under another name (the same bytes published
        as x.ckpt by one expert, opted in, and as x.safetensors by another): what this name
        claims is checked again, so a pickle is never handed out as a safetensors file."""
        if PurePosixPath(file.name).suffix.lower() == ".safetensors":
            try:
                check_finite(found, validate_safetensors(found))
            except InvalidSafetensors as exc:
                raise InvalidSafetensors(str(exc).replace(found.name, repr(file.name), 1)) from None
        return found

    def _partial(self, sha256: str) -> Path:
        path = self.path(sha256).with_suffix(".partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _commit(self, partial: Path, file: ExpertFile, expected: str, actual: str) -> Path:
        """Verify, then move into place atomically; a file failing any check is deleted."""
        try:
            if actual != expected:
                raise IntegrityError(f"{file.name!r}: sha256 mismatch: published {expected}, downloaded {actual}")
            if PurePosixPath(file.name).suffix.lower() == ".safetensors":
                try:
                    check_finite(partial, validate_safetensors(partial))
                except InvalidSafetensors as exc:  # name the published file, not our .partial
                    raise InvalidSafetensors(str(exc).replace(partial.name, repr(file.name), 1)) from None
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        final = self.path(expected)
        os.replace(partial, final)
        return final


class _Resumable:
    """One file's download across attempts: appends to the partial file and keeps its running
    sha256, so a resumed download is hashed without reading the file again."""

    def __init__(self, partial: Path, max_bytes: int, name: str, room: int | None = None, budget: int | None = None):
        self.partial, self.max_bytes, self.name = partial, max_bytes, name
        self.room, self.budget = room, budget  # what the store's budget leaves for this file (None: no budget)
        self.hasher, self.size = hashlib.sha256(), 0
        if partial.exists():
            with open(partial, "rb") as f:
                while chunk := f.read(CHUNK):
                    self.hasher.update(chunk)
                    self.size += len(chunk)

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()

    def attempt(self, client: httpx.Client, url: str) -> None:
        headers = {"Accept-Encoding": "identity"}  # byte ranges of the file itself, not of a gzip stream
        if self.size:
            headers["Range"] = f"bytes={self.size}-"
        with client.stream("GET", url, headers=headers) as response:
            if response.status_code == 416 and self.size:
                return  # we already hold every byte the server has; the hash decides
            check_status(response)
            if response.is_error:
                length = response.headers.get("Content-Length", "")
                if length.isdigit() and int(length) <= MAX_ERROR_BODY:
                    response.read()  # the server's own message (a login wall says why), bounded
                hint = " (the file needs a login or an API token, or is in early access)" \
                    if response.status_code in (401, 403) else ""
                error = FileGone if response.status_code in (404, 410) else DownloadError
                raise error(f"{self.name!r}: download from {url} failed: {describe_status(response)}{hint}")
            if response.headers.get("Content-Type", "").lower().startswith("text/html"):
                raise DownloadError(f"{self.name!r}: {url} answered a web page, not the file (a login, "
                                    "early-access or download page)")
            if response.status_code == 206 and not _resumes_at(response, self.size):
                self.partial.unlink(missing_ok=True)  # start afresh next time
                raise DownloadError(f"{self.name!r}: {url} answered a range other than the one asked for")
            if response.status_code != 206:
                self.hasher, self.size = hashlib.sha256(), 0  # the server sent the whole file
            length = response.headers.get("Content-Length", "")
            total = self.size + (int(length) if length.isdigit() else 0)
            if total > self.max_bytes:
                raise UnsafeFileError(f"{self.name!r}: {total} bytes is over the {self.max_bytes}-byte limit")
            if self.room is not None and total > self.room:
                raise StoreFull(_over_budget(self.name, total, self.budget, self.room))
            with open(self.partial, "ab" if self.size else "wb") as f:
                for chunk in response.iter_bytes():  # as received: a cut loses nothing already read
                    if self.size + len(chunk) > self.max_bytes:
                        raise UnsafeFileError(f"{self.name!r}: more than {self.max_bytes} bytes; download stopped")
                    if self.room is not None and self.size + len(chunk) > self.room:
                        raise StoreFull(_over_budget(self.name, self.size + len(chunk), self.budget, self.room))
                    f.write(chunk)
                    self.hasher.update(chunk)
                    self.size += len(chunk)


def _over_budget(name: str, size: int, budget: int, room: int) -> str:
    return (f"{name!r}: {size_text(size)} would take the store over its budget (DIFFGRAPH_MAX_STORE_GB = "
            f"{size_text(budget)}, {size_text(max(room, 0))} left); raise it or free space")


def _resumes_at(response: httpx.Response, offset: int) -> bool:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    return bool(match) and int(match.group(1)) == offset


def load_weights(path: str | Path, *, allow_pickle: bool | None = None) -> dict:
    """A state dict from a stored file, by its content (store paths have no extension):
    safetensors after a header check, pickle only when allowed and only with
    ``torch.load(weights_only=True)``, which refuses anything but tensors and plain data."""
    import torch
    from safetensors.torch import load_file

    if looks_like_safetensors(path):
        validate_safetensors(path)
        return load_file(path)
    allow = get_settings().allow_pickle if allow_pickle is None else allow_pickle
    if not allow:
        raise UnsafeFileError(f"{Path(path).name}: not safetensors; pickle loading is off (DIFFGRAPH_ALLOW_PICKLE=1)")
    return torch.load(path, map_location="cpu", weights_only=True)
