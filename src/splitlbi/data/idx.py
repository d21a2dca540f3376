"""The IDX file format of MNIST and Fashion-MNIST: parse, encode, read with checksum.

An IDX file is a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim``
big-endian uint32 dimension sizes, then the data in row-major order, big-endian.
See http://yann.lecun.com/exdb/mnist/ (bottom of the page).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

from splitlbi.errors import DataError

__all__ = ["IDX_TYPE_CODES", "parse_idx", "encode_idx", "read_idx", "read_decompressed", "md5_hex"]

#: IDX type byte -> big-endian numpy dtype.
IDX_TYPE_CODES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def md5_hex(data: bytes) -> str:
    """Hex md5 digest of ``data``."""
    return hashlib.md5(data).hexdigest()


def parse_idx(data: bytes, source: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Decode the (decompressed) bytes of an IDX file into a numpy array.

    Returns a writable array in native byte order, shaped as the header says.
    Raises :class:`DataError` naming ``source`` if the header or the length is wrong.
    """
    if len(data) < 4:
        raise DataError(f"corrupt IDX file {source}: {len(data)} bytes, too short for the 4-byte magic number")
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or type_code not in IDX_TYPE_CODES:
        raise DataError(
            f"corrupt IDX file {source}: bad magic number 0x{data[:4].hex()}, expected 0x0000<type><ndim>"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(
            f"corrupt IDX file {source}: truncated header ({len(data)} bytes, {ndim} dims need {header_size})"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPE_CODES[type_code]
    expected_size = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected_size:
        raise DataError(
            f"corrupt IDX file {source}: {len(data)} bytes, but header (shape {shape}, {dtype.itemsize}-byte items) "
            f"needs {expected_size}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    # frombuffer over bytes is read-only and big-endian; one copy makes it native and writable
    # (torch.from_numpy warns on read-only arrays).
    return array.astype(dtype.newbyteorder("="), copy=True)


def encode_idx(array: np.ndarray) -> bytes:
    """Encode ``array`` as IDX bytes (uncompressed); inverse of :func:`parse_idx`."""
    array = np.asarray(array)
    by_kind = {(dt.kind, dt.itemsize): code for code, dt in IDX_TYPE_CODES.items()}
    code = by_kind.get((array.dtype.kind, array.dtype.itemsize))
    if code is None or array.ndim > 255:
        raise ValueError(f"cannot encode dtype {array.dtype} with {array.ndim} dims as IDX")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(IDX_TYPE_CODES[code], copy=False).tobytes(order="C")


def read_decompressed(path: str | os.PathLike) -> bytes:
    """Bytes of ``path``, gunzipped if it is a gzip file (detected by its magic, not its name)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"corrupt file {path}: not a complete gzip archive ({exc}); replace it with the original"
        ) from exc


def read_idx(path: str | os.PathLike, expected_md5: str | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) and check the md5 of its decompressed content.

    Checking the decompressed bytes accepts any recompression of the original
    (Debian's, for instance) while still proving the content is the original.
    """
    data = read_decompressed(path)
    if expected_md5 is not None:
        actual = md5_hex(data)
        if actual != expected_md5:
            raise DataError(
                f"checksum mismatch for {path}: md5 of decompressed content is {actual}, expected {expected_md5}; "
                "replace it with the original file"
            )
    return parse_idx(data, path)
