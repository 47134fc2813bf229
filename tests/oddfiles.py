"""Files DeepLabCut's naming matches but whose content has an unexpected shape, made byte by byte.

Each builder writes a real zip with Python's ``zipfile`` (which torch reads), so the
oddity is exactly the one named: a compressed member, a pickle of some shape, tens of
thousands of members. Shared by the odd-files tests and the fuzz suite.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import BinaryIO

PROTO2 = b"\x80\x02"


def rezip(
    source: Path | BinaryIO,
    target: Path | BinaryIO,
    *,
    pickle: bytes | None = None,
    deflate: tuple[str, ...] = (),
    extra_members: int = 0,
) -> Path:
    """``source`` (a ``torch.save`` file or stream) written again, with its ``data.pkl`` replaced, members
    compressed (names ending in one of ``deflate``) or ``extra_members`` tiny members added."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for info in original.infolist():
            data = original.read(info)
            if pickle is not None and info.filename.endswith("/data.pkl"):
                data = pickle
            method = zipfile.ZIP_DEFLATED if info.filename.endswith(deflate) else zipfile.ZIP_STORED
            out.writestr(info.filename, data, compress_type=method)
        root = original.namelist()[0].split("/", 1)[0]
        for index in range(extra_members):
            out.writestr(f"{root}/extra/{index}", b"x")
    return target


def snapshot_pickle(metadata: bytes, model: bytes = b"}") -> bytes:
    """A protocol-2 pickle of ``{"model": <model>, "metadata": <metadata>}`` from pickled pieces (opcodes)."""
    return PROTO2 + b"}(" + _text("model") + model + _text("metadata") + metadata + b"u."


def nested_lists(depth: int) -> bytes:
    """Opcodes for a list nested ``depth`` levels deep: ``[[[...]]]`` (no recursion needed to write it)."""
    return b"]" * depth + b"a" * (depth - 1)


def declared_string(length: int, actual: bytes = b"abc") -> bytes:
    """A BINUNICODE string that declares ``length`` bytes but carries ``actual`` (the pickle is then truncated)."""
    return b"X" + struct.pack("<I", length) + actual


def _text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data
