"""Rewrite a snapshot at copy speed: a new ``data.pkl``, every other record copied byte for byte.

Stripping a prefix changes only ``data.pkl``, the first record of a ``torch.save`` file.
So the new file is: a new ``data.pkl`` record laid out as torch's writer lays it out
(local header, ``FB`` padding so its bytes start on a 64-byte boundary, the pickle, a data
descriptor); the next record's local header with its padding computed again for where it
now starts; then the rest of the original, from that record's bytes to its central
directory, copied by the kernel (``os.copy_file_range``); then the central directory with
the new offsets, and the end records. The second record's padding puts its bytes at the
original's offset modulo 4 KiB (up to 4 KiB of padding, where torch pads to 64 bytes; any
zip reader skips it): every record after it moves by a multiple of 4 KiB, so its padding
is exactly what torch would write, and on a copy-on-write file system (btrfs, xfs with
reflink) the kernel clones the copied range's blocks instead of writing them, so the new
file takes only the space of its first and last blocks. No tensor is built, and memory
stays flat in the snapshot's size. A file laid out any other way (another writer,
4 GiB or more, zip64 fields in its directory) is not taken: torch rewrites it instead.

:func:`read_back` proves the new file before it replaces the original: each record's
bytes against the CRC in the directory, ``data.pkl`` against the new pickle, and its sha256.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from dlc_snapshot_fix import osfiles
from dlc_snapshot_fix.zipappend import (
    CENTRAL,
    EOCD,
    EOCD_SIG,
    LOCAL,
    LOCAL_SIG,
    U32,
    ZIP64_EOCD,
    ZIP64_EOCD_SIG,
    ZIP64_LOCATOR,
    ZIP64_LOCATOR_SIG,
    CentralRecord,
    NotAppendable,
    ZipLayout,
    data_spans,
    read_layout,
)

ALIGNMENT = 64
"""torch.save starts every record's bytes on a multiple of 64 (its ``.storage_alignment``)."""
DESCRIPTOR = struct.Struct("<IIII")
DESCRIPTOR_SIG = 0x08074B50
PADDING_ID = 0x4246  # "FB": the extra field torch's writer pads with
LIMIT = U32 - (1 << 20)
"""The original and the new file stay below this: no zip64 fields in the directory to move."""
CHUNK = 1 << 20


class NotRezippable(NotAppendable):
    """Not laid out as torch's writer lays out a file below 4 GiB: torch rewrites it instead."""


class ReadBackError(OSError):
    """The new file does not read back as meant; it is deleted, the original stays in place."""

    def __init__(self, what: str):
        super().__init__(errno.EIO, f"the new file did not read back as meant ({what}) and was deleted")


@dataclass(frozen=True)
class RezipPlan:
    """Where the original's parts are, as :func:`build` needs them."""

    layout: ZipLayout
    first_local: tuple
    """``data.pkl``'s local header fields (version, flags, times are kept)."""
    second: CentralRecord
    second_local: tuple
    copy_from: int
    """Where the second record's bytes start: from here to the directory is copied as it is."""
    made_by: tuple[int, int]
    """The zip64 end record's "version made by" and "needed", kept as the original's writer set them."""


def plan(path: Path, layout: ZipLayout) -> RezipPlan:
    """Check the original is laid out as torch writes it; :class:`NotRezippable` if not."""
    records = sorted(layout.records, key=lambda r: r.header_offset)
    if len(records) < 2 or records[0] is not layout.pickle_record() or records[0].header_offset != 0:
        raise NotRezippable("data.pkl is not the first record, or the only one")
    if layout.size >= LIMIT or any(CENTRAL.unpack_from(r.raw)[11] for r in layout.records):
        raise NotRezippable("4 GiB or more, or zip64 fields in the directory")
    first, second = records[0], records[1]
    with open(path, "rb") as stream:
        fd = stream.fileno()
        first_local = LOCAL.unpack(osfiles.pread(fd, LOCAL.size, 0))
        descriptor_at = LOCAL.size + first_local[9] + first_local[10] + first.size
        descriptor = osfiles.pread(fd, DESCRIPTOR.size, descriptor_at)
        second_local = LOCAL.unpack(osfiles.pread(fd, LOCAL.size, second.header_offset))
        name_end = second.header_offset + LOCAL.size + second_local[9]
        extra = osfiles.pread(fd, second_local[10], name_end)
        zip64_at = layout.directory_offset + sum(len(r.raw) for r in layout.records)
        zip64 = osfiles.pread(fd, ZIP64_EOCD.size, zip64_at)
    if len(zip64) != ZIP64_EOCD.size or ZIP64_EOCD.unpack(zip64)[0] != ZIP64_EOCD_SIG:
        raise NotRezippable("no zip64 end record right after the directory")
    if not (
        first_local[2] & 0x8
        and len(descriptor) == DESCRIPTOR.size
        and DESCRIPTOR.unpack(descriptor)[0] == DESCRIPTOR_SIG
        and descriptor_at + DESCRIPTOR.size == second.header_offset
    ):
        raise NotRezippable("data.pkl is not followed by its data descriptor and then the next record")
    if second_local[0] != LOCAL_SIG or not _is_padding(extra):
        raise NotRezippable("the second record's extra field is not torch's padding")
    made_by = ZIP64_EOCD.unpack(zip64)[2:4]
    return RezipPlan(layout, first_local, second, second_local, name_end + len(extra), made_by)


def _is_padding(extra: bytes) -> bool:
    if len(extra) < 4:
        return False
    field_id, length = struct.unpack_from("<HH", extra)
    return field_id == PADDING_ID and length == len(extra) - 4 and extra[4:] == b"Z" * length


def _local_header(fields: tuple, cursor: int, name: bytes, bytes_at: int | None = None) -> bytes:
    """A local header at ``cursor`` as torch's writer makes it: ``FB`` padding so the bytes start aligned
    (at ``bytes_at`` modulo :data:`osfiles.CLONE_BLOCK`, if given)."""
    start = cursor + LOCAL.size + len(name) + 4
    aligned = -start % ALIGNMENT if bytes_at is None else (bytes_at - start) % osfiles.CLONE_BLOCK
    padding = b"Z" * aligned
    extra = struct.pack("<HH", PADDING_ID, len(padding)) + padding
    return LOCAL.pack(LOCAL_SIG, *fields[1:9], len(name), len(extra)) + name + extra


def build(rezip: RezipPlan, new_pickle: bytes) -> tuple[bytes, bytes]:
    """(what goes before the copied range, what goes after it)."""
    layout, pickle_record = rezip.layout, rezip.layout.pickle_record()
    crc, size = zlib.crc32(new_pickle), len(new_pickle)
    first = (
        _local_header(rezip.first_local, 0, pickle_record.name.encode())
        + new_pickle
        + DESCRIPTOR.pack(DESCRIPTOR_SIG, crc, size, size)
    )
    # the copied range keeps its offset modulo the block size: copy-on-write file systems clone its blocks
    head = first + _local_header(rezip.second_local, len(first), rezip.second.name.encode(), rezip.copy_from)
    shift = len(head) - rezip.copy_from
    directory = []
    for record in layout.records:
        fields = list(CENTRAL.unpack_from(record.raw))
        if record is pickle_record:
            fields[7:10] = [crc, size, size]
        elif record is rezip.second:
            fields[16] = len(first)
        else:
            fields[16] = record.header_offset + shift
        directory.append(CENTRAL.pack(*fields) + record.raw[CENTRAL.size :])
    central = b"".join(directory)
    cd_offset, count = layout.directory_offset + shift, len(directory)
    if shift % ALIGNMENT or cd_offset + len(central) >= LIMIT:
        raise NotRezippable("the records would not stay aligned, or the file would reach 4 GiB")
    end = (
        ZIP64_EOCD.pack(
            ZIP64_EOCD_SIG, ZIP64_EOCD.size - 12, *rezip.made_by, 0, 0, count, count, len(central), cd_offset
        )
        + ZIP64_LOCATOR.pack(ZIP64_LOCATOR_SIG, 0, cd_offset + len(central), 1)
        + EOCD.pack(EOCD_SIG, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF), len(central), cd_offset, 0)
    )
    return head, central + end


def write(rezip: RezipPlan, source: Path, temp: Path, head: bytes, tail: bytes) -> None:
    """The new file at ``temp`` (created, never overwritten): ``head``, the copied range, ``tail``.

    Not fsynced here: the caller syncs it while it reads it back (``store.write_rezipped``).
    """
    fd = osfiles.open_fd(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        osfiles.write_all(fd, head)
        with open(source, "rb") as original:
            count = rezip.layout.directory_offset - rezip.copy_from
            osfiles.copy_range(original.fileno(), fd, rezip.copy_from, count, CHUNK)
        osfiles.write_all(fd, tail)
    finally:
        os.close(fd)


def read_back(path: Path, meant: ZipLayout, new_pickle: bytes) -> None:
    """Every record's bytes match the CRC the directory gives (the original's), ``data.pkl`` is the new pickle.

    Raises :class:`ReadBackError` on the first difference. The caller also reads the file
    with the torch-free reader, as torch will.
    """
    layout = read_layout(path)
    if [r.raw[CENTRAL.size :] for r in layout.records] != [r.raw[CENTRAL.size :] for r in meant.records]:
        raise ReadBackError("its directory lists other members")
    pickle_name = meant.pickle_record().name
    with open(path, "rb") as stream:
        fd = stream.fileno()
        for record, (start, length) in zip(layout.records, data_spans(path, layout.records), strict=True):
            crc = 0
            for offset in range(start, start + length, CHUNK):
                crc = zlib.crc32(osfiles.pread(fd, min(CHUNK, start + length - offset), offset), crc)
            if crc != CENTRAL.unpack_from(record.raw)[7]:
                raise ReadBackError(f"the bytes of {record.name} do not match its CRC")
            if record.name == pickle_name and osfiles.pread(fd, length, start) != new_pickle:
                raise ReadBackError("its data.pkl is not the new pickle")
