"""Bounded readers for untrusted files (map files handed to the node by any DDS peer).

Every reader here checks a size limit *before* it reads, never allocates more than the bytes it was allowed to
read, and raises :class:`UnsafeFileError` (or its subclass :class:`FileTooLargeError`) for anything it refuses;
no other exception type leaves these functions for malformed input. Used by :mod:`langgs_ros.persistence`.

- :func:`read_regular_file`: opens without blocking (a FIFO or device is refused, not waited on), checks
  ``fstat`` size against the limit, then reads from the same descriptor (no check-then-open race).
- :func:`read_npz_arrays`: a numpy ``.npz`` (zip of ``.npy``) read member by member: only stored or deflated
  members (what ``np.savez`` / ``np.savez_compressed`` write; bzip2/lzma members have no bounded decompression in
  ``zipfile``), each member's declared size checked against what is left of the budget before decompressing, the
  decompressed bytes counted while reading (``zipfile`` stops at the declared size and checks the CRC), and
  ``.npy`` headers parsed here so that the declared shape must match the bytes present (``np.load`` would allocate
  the declared shape first). Object and structured dtypes are refused (no pickles).
- :func:`ply_binary_layout`: the PLY header parsed and the body length checked against the element counts before
  anything is allocated; :func:`ply_element_array` then views an element's records in place.
"""

from __future__ import annotations

import io
import math
import os
import stat
import zipfile
from pathlib import Path

import numpy as np

__all__ = [
    "PLY_SCALAR_SIZES",
    "FileTooLargeError",
    "PlyElementLayout",
    "UnsafeFileError",
    "clip",
    "ply_binary_layout",
    "ply_element_array",
    "read_head",
    "read_npz_arrays",
    "read_regular_file",
    "short",
]

MAX_PLY_HEADER_BYTES = 1 << 16
"""A PLY header longer than this is refused (save_map's is ~700 bytes)."""
_CHUNK = 1 << 20
_MAX_NPY_HEADER = 1 << 16

PLY_SCALAR_SIZES: dict[str, int] = {
    "char": 1, "uchar": 1, "int8": 1, "uint8": 1, "short": 2, "ushort": 2, "int16": 2, "uint16": 2,
    "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8,
}
"""Bytes per PLY scalar type (the PLY 1.0 names and their sized aliases)."""


class UnsafeFileError(ValueError):
    """A file was refused: not a regular file, unreadable, malformed, or over a limit."""


class FileTooLargeError(UnsafeFileError):
    """A file, or the decompressed content of a file, exceeds its size limit."""


def short(value: object, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters (for error messages about untrusted content)."""
    return clip(repr(value), limit)


def clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters (exception texts that may quote untrusted content)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_regular_file(path: str | Path, max_bytes: int | None, what: str = "file") -> bytearray:
    """Read a whole regular file, refusing it before reading if it is larger than ``max_bytes``.

    Args:
        path: the file (symlinks are followed).
        max_bytes: size limit in bytes; ``None`` = no limit.
        what: how to name the file in error messages (e.g. ``"map file"``).

    Returns:
        The file's bytes (at most ``max_bytes``), read in place into one buffer.

    Raises:
        FileNotFoundError: no such file (so callers can word "not found" themselves).
        FileTooLargeError: the file is larger than ``max_bytes`` (checked with ``fstat`` before reading).
        UnsafeFileError: not a regular file (directory, FIFO, device, socket), it cannot be opened or read, or it
            changed size while read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise UnsafeFileError(f"cannot open {what} {path}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{what} {path} is not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise FileTooLargeError(f"{what} {path} is {st.st_size} bytes, over the limit of {max_bytes} bytes")
    except OSError as e:
        os.close(fd)
        raise UnsafeFileError(f"cannot stat {what} {path}: {e.strerror or e}") from e
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb", buffering=0) as f:
        try:
            buf = bytearray(st.st_size)  # exactly the size fstat reported, filled in place (no copies)
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            if got < len(buf):
                raise UnsafeFileError(f"{what} {path} shrank while read ({got} of {len(buf)} bytes)")
            if f.read(1):
                raise UnsafeFileError(f"{what} {path} grew while read")
        except OSError as e:
            raise UnsafeFileError(f"cannot read {what} {path}: {e.strerror or e}") from e
    return buf


def _parse_npy(raw: bytes | bytearray, name: str) -> np.ndarray:
    """An array from the bytes of one ``.npy`` member; the declared shape must match the bytes present."""
    f = io.BytesIO(bytes(raw[:_MAX_NPY_HEADER]))  # the header only (numpy refuses headers over 10 kB)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise UnsafeFileError(f"array '{name}' has unsupported .npy version {version}")
    except UnsafeFileError:
        raise
    except Exception as e:  # ValueError (bad header), EOFError, SyntaxError, ...
        raise UnsafeFileError(f"array '{name}' has a malformed .npy header: {clip(str(e))}") from e
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
        raise UnsafeFileError(f"array '{name}' has unsupported dtype {clip(str(dtype), 120)} (objects/records refused)")
    if any(d < 0 for d in shape):
        raise UnsafeFileError(f"array '{name}' declares a negative shape {shape}")
    count = math.prod(shape)
    body = memoryview(raw)[f.tell():]
    if count * dtype.itemsize != len(body):
        raise UnsafeFileError(f"array '{name}' declares shape {shape} of {dtype} ({count * dtype.itemsize} bytes) "
                              f"but holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")


def read_head(path: str | Path, max_bytes: int, what: str = "file") -> bytes:
    """The first ``max_bytes`` bytes of a regular file (opened non-blocking; FIFOs and devices refused).

    Raises:
        FileNotFoundError: no such file.
        UnsafeFileError: not a regular file, or it cannot be opened or read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise UnsafeFileError(f"cannot open {what} {path}: {e.strerror or e}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeFileError(f"{what} {path} is not a regular file")
        parts: list[bytes] = []
        got = 0
        while got < max_bytes:
            chunk = os.read(fd, max_bytes - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)
    except OSError as e:
        raise UnsafeFileError(f"cannot read {what} {path}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def read_npz_arrays(data: bytes | bytearray, names: tuple[str, ...], max_bytes: int | None, what: str = "npz"
                    ) -> dict[str, np.ndarray]:
    """Arrays ``names`` of an in-memory ``.npz``, decompressing at most ``max_bytes`` bytes in total.

    Args:
        data: the ``.npz`` file's bytes.
        names: member arrays to read (without ``.npy``); others are not read.
        max_bytes: budget for the decompressed members together; ``None`` = no limit.
        what: how to name the file in error messages.

    Returns:
        name -> array (a view on its decompressed bytes).

    Raises:
        FileTooLargeError: a member's declared or actual decompressed size exceeds what is left of the budget.
        UnsafeFileError: not a zip, a member missing, compressed other than stored/deflate, encrypted, corrupt (CRC,
            truncated deflate stream), or not a plain-dtype ``.npy`` whose shape matches its bytes.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except Exception as e:  # BadZipFile, ValueError, OSError, ... from a crafted central directory
        raise UnsafeFileError(f"{what} is not a readable zip/npz archive: {clip(str(e))}") from e
    left = max_bytes
    out: dict[str, np.ndarray] = {}
    with zf:
        present = set(zf.namelist())
        missing = [n for n in names if f"{n}.npy" not in present]
        if missing:
            raise UnsafeFileError(f"{what} lacks arrays {missing}")
        for name in names:
            info = zf.getinfo(f"{name}.npy")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise UnsafeFileError(f"{what}: array '{name}' uses zip compression method {info.compress_type} "
                                      "(only stored and deflate are read)")
            if left is not None and info.file_size > left:
                raise FileTooLargeError(f"{what}: array '{name}' expands to {info.file_size} bytes, over the "
                                        f"{left} bytes left of the {max_bytes}-byte limit")
            buf = bytearray()
            try:
                with zf.open(info) as member:
                    while True:
                        chunk = member.read(_CHUNK)
                        if not chunk:
                            break
                        buf += chunk
                        if left is not None and len(buf) > left:
                            raise FileTooLargeError(f"{what}: array '{name}' expands past the {max_bytes}-byte "
                                                    "limit")
            except UnsafeFileError:
                raise
            except Exception as e:  # BadZipFile (CRC), zlib.error, EOFError, RuntimeError (encrypted), ...
                raise UnsafeFileError(f"{what}: array '{name}' is corrupt or truncated: {clip(str(e))}") from e
            if left is not None:
                left -= len(buf)
            out[name] = _parse_npy(buf, name)
    return out


_PLY_NUMPY_TYPES = {"char": "i1", "uchar": "u1", "int8": "i1", "uint8": "u1", "short": "i2", "ushort": "u2",
                    "int16": "i2", "uint16": "u2", "int": "i4", "uint": "u4", "int32": "i4", "uint32": "u4",
                    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


class PlyElementLayout:
    """One element of a binary PLY header: ``name``, ``count``, ``properties`` [(name, type)], ``record_bytes``,
    and ``offset`` (byte offset of its data in the file)."""

    def __init__(self, name: str, count: int) -> None:
        self.name = name
        self.count = count
        self.properties: list[tuple[str, str]] = []
        self.record_bytes = 0
        self.offset = 0

    def dtype(self, byte_order: str) -> np.dtype:
        """Structured numpy dtype of one record (``byte_order`` ``"<"`` or ``">"``)."""
        return np.dtype([(n, byte_order + _PLY_NUMPY_TYPES[t]) for n, t in self.properties])


def ply_element_array(data: bytes | bytearray, fmt: str, element: PlyElementLayout) -> np.ndarray:
    """The records of ``element`` (from :func:`ply_binary_layout` on the same ``data``) as a structured array view.

    Equivalent to what ``plyfile`` reads for scalar-only binary elements, without its per-record Python loop (which
    it takes for in-memory streams: ~20 s per 100 k vertices on a busy CPU).
    """
    order = "<" if fmt == "binary_little_endian" else ">"
    return np.frombuffer(data, dtype=element.dtype(order), count=element.count, offset=element.offset)


def ply_binary_layout(data: bytes | bytearray, what: str = "PLY") -> tuple[str, list[PlyElementLayout], int]:
    """Parse a binary PLY header and check that the body has exactly the bytes its elements declare.

    Args:
        data: the whole file.
        what: how to name the file in error messages.

    Returns:
        (format, elements, header_bytes): format ``binary_little_endian`` or ``binary_big_endian``.

    Raises:
        UnsafeFileError: no ``ply`` magic or ``end_header`` within :data:`MAX_PLY_HEADER_BYTES`, an ASCII or
            unknown format, list properties, unknown types, malformed lines, or a body longer or shorter than the
            declared element counts times their record sizes (a truncated or padded file).
    """
    end = data.find(b"end_header", 0, MAX_PLY_HEADER_BYTES)
    if not data.startswith(b"ply") or end < 0:
        raise UnsafeFileError(f"{what} is not a PLY file (no 'ply' magic / 'end_header' in its first "
                              f"{MAX_PLY_HEADER_BYTES} bytes)")
    nl = data.find(b"\n", end)
    if nl < 0 or data[end:nl].strip() != b"end_header":
        raise UnsafeFileError(f"{what} has a malformed 'end_header' line")
    header_bytes = nl + 1
    fmt = None
    elements: list[PlyElementLayout] = []
    for i, line in enumerate(data[:end].decode("ascii", errors="replace").splitlines()):
        parts = line.split()
        if i == 0:
            if parts != ["ply"]:
                raise UnsafeFileError(f"{what} does not start with a 'ply' line")
            continue
        if not parts or parts[0] in ("comment", "obj_info"):
            continue
        if parts[0] == "format":
            if len(parts) != 3 or parts[1] not in ("binary_little_endian", "binary_big_endian") or parts[2] != "1.0":
                raise UnsafeFileError(f"{what}: format {short(' '.join(parts[1:]))} refused (binary PLY 1.0 only)")
            fmt = parts[1]
        elif parts[0] == "element":
            if len(parts) != 3 or not parts[2].isdigit():
                raise UnsafeFileError(f"{what}: malformed element line {short(line)}")
            elements.append(PlyElementLayout(parts[1], int(parts[2])))
        elif parts[0] == "property":
            if not elements:
                raise UnsafeFileError(f"{what}: property before any element")
            if len(parts) != 3 or parts[1] not in PLY_SCALAR_SIZES:
                raise UnsafeFileError(f"{what}: property line {short(line)} refused (scalar properties only)")
            if any(parts[2] == n for n, _ in elements[-1].properties):
                raise UnsafeFileError(f"{what}: property {short(parts[2])} repeated in element "
                                      f"{short(elements[-1].name)}")
            elements[-1].properties.append((parts[2], parts[1]))
            elements[-1].record_bytes += PLY_SCALAR_SIZES[parts[1]]
        else:
            raise UnsafeFileError(f"{what}: unknown header line {short(line)}")
    if fmt is None:
        raise UnsafeFileError(f"{what} has no format line")
    body = len(data) - header_bytes
    offset = header_bytes
    for e in elements:
        e.offset = offset
        offset += e.count * e.record_bytes
    expected = offset - header_bytes
    if expected != body:
        raise UnsafeFileError(f"{what}: header declares {expected} bytes of element data, the file holds {body} "
                              "(truncated or padded)")
    return fmt, elements, header_bytes
