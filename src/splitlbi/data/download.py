"""Fetching dataset files from public mirrors: atomic, verified, offline-aware."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from splitlbi.data.idx import md5_hex, read_decompressed
from splitlbi.errors import DataError

__all__ = ["OFFLINE_ENV", "DOWNLOAD_TIMEOUT_S", "offline_reason", "file_md5", "download_file"]

logger = logging.getLogger(__name__)

#: Setting this environment variable to 1/true/yes/on disables all downloads.
OFFLINE_ENV = "SPLITLBI_OFFLINE"
#: Socket timeout of each connect/read, in seconds: an unreachable mirror fails fast.
DOWNLOAD_TIMEOUT_S = 10.0

_USER_AGENT = "splitlbi (https://pypi.org/project/splitlbi/)"
_CHUNK_BYTES = 1 << 20


def offline_reason(download: bool) -> str | None:
    """Why downloads are disabled (``None`` if they are allowed)."""
    if not download:
        return "downloads disabled by download=False"
    if os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return f"downloads disabled by {OFFLINE_ENV}={os.environ[OFFLINE_ENV]}"
    return None


def _fetch_to(url: str, destination: Path, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(destination, "wb") as out:
        while chunk := response.read(_CHUNK_BYTES):
            out.write(chunk)


def file_md5(path: str | os.PathLike) -> str:
    """Hex md5 of the bytes of ``path`` as stored (no decompression), read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    urls: Sequence[str],
    target: str | os.PathLike,
    expected_md5: str,
    *,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    checksum: str = "decompressed",
) -> Path:
    """Download the first of ``urls`` whose content checks out to ``target``.

    The file is written to a temporary file next to ``target``, checked against
    ``expected_md5``, and only then renamed to ``target``, so an interrupted or bad
    download never leaves a file that looks valid. ``checksum="decompressed"``
    checks the md5 of the gunzipped content (IDX files), ``checksum="file"`` that of
    the bytes as downloaded (archives such as CIFAR-10's ``.tar.gz``). Raises
    :class:`DataError` with the reason of each failed mirror.
    """
    if checksum not in ("decompressed", "file"):
        raise ValueError(f"checksum must be 'decompressed' or 'file', got {checksum!r}")
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {target.parent}: {exc.strerror or exc}") from exc
    failures = []
    for url in urls:
        try:
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        except OSError as exc:
            raise DataError(f"cannot write to {target.parent}: {exc.strerror or exc}") from exc
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            logger.info("downloading %s to %s", url, target)
            _fetch_to(url, tmp, timeout)
            if checksum == "file":
                actual, what = file_md5(tmp), "md5"
            else:
                actual, what = md5_hex(read_decompressed(tmp)), "md5 of decompressed content"
            if actual != expected_md5:
                raise DataError(f"{what} is {actual}, expected {expected_md5}")
            os.replace(tmp, target)
            return target
        except (urllib.error.URLError, OSError, DataError) as exc:
            # URLError wraps the socket error; show the innermost reason, which is the useful part.
            reason = getattr(exc, "reason", None) or exc
            failures.append(f"{url}: {reason}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(f"download of {target.name} failed ({'; '.join(failures)})")
