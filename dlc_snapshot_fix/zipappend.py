"""Migrate a snapshot by appending kilobytes: a new ``data.pkl`` and central directory.

A ``torch.save`` file is a stored zip whose readers find members through the central
directory at its end. Appending a new ``data.pkl`` record, then a full central directory
that lists the same members in the same order with only ``data.pkl`` pointing at the new
record, then the end records, gives a file that torch loads with the new key names and
the untouched tensor bytes. Bytes ``[0, S)`` (``S`` = original size) are never written,
so truncating to ``S`` gives back the original exactly.

Crash safety rests on how zip readers find the end record: they search backwards
through the last 64 KiB for a complete one. While the new end records are missing or
incomplete, the original end record (at ``S - 22``) is found as long as everything
appended before it stays within that window; :data:`MAX_TAIL` enforces that (larger
pickles use the full rewrite instead). Everything but the end records is fsynced before
the end records are written in one ``write`` and fsynced again.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from dlc_snapshot_fix import osfiles

EOCD = struct.Struct("<IHHHHIIH")  # end of central directory
EOCD_SIG = 0x06054B50
ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
ZIP64_EOCD_SIG = 0x06064B50
ZIP64_LOCATOR = struct.Struct("<IIQI")
ZIP64_LOCATOR_SIG = 0x07064B50
CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
CENTRAL_SIG = 0x02014B50
LOCAL = struct.Struct("<IHHHHHIIIHH")
LOCAL_SIG = 0x04034B50
ZIP64_EXTRA_ID = 0x0001
U32 = 0xFFFFFFFF
FLAGS_NOT_PLAIN = 0x0001 | 0x0040 | 0x2000
"""Encrypted, strongly encrypted, local header masked: a zip reader refuses to extract such a member."""

SEARCH_WINDOW = 65535 + EOCD.size
"""How far from the end zip readers (Python's zipfile, torch's miniz) look for the end record."""
MAX_TAIL = 60 * 1024
"""The most this writes before its end records: keeps the original end record findable throughout."""


class NotAppendable(Exception):
    """This file cannot take the fast path (layout, size); the full rewrite handles it."""


@dataclass(frozen=True)
class CentralRecord:
    raw: bytes
    name: str
    header_offset: int

    @property
    def plain(self) -> bool:
        """Stored, not encrypted, on this disk: what torch.save writes and every zip reader extracts."""
        fields = CENTRAL.unpack_from(self.raw)
        return fields[4] == 0 and not fields[3] & FLAGS_NOT_PLAIN and fields[13] == 0

    @property
    def size(self) -> int:
        """The member's stored size, through a zip64 extra where used."""
        fields = CENTRAL.unpack_from(self.raw)
        extra = self.raw[CENTRAL.size + fields[10] : CENTRAL.size + fields[10] + fields[11]]
        return _zip64_values(fields, extra)[1]


@dataclass(frozen=True)
class ZipLayout:
    """What the append needs to know about a torch zip: its size and its central directory."""

    size: int
    records: list[CentralRecord]
    directory_offset: int = 0
    """Where the central directory starts."""

    def pickle_record(self) -> CentralRecord:
        pickles = [r for r in self.records if r.name.endswith("/data.pkl") or r.name == "data.pkl"]
        if len(pickles) != 1:
            raise NotAppendable(f"expected one data.pkl member, found {len(pickles)}")
        return pickles[0]


def read_layout(path: Path) -> ZipLayout:
    """Parse the end records and central directory; refuse anything but a plain torch zip."""
    try:
        return _read_layout(path)
    except (struct.error, UnicodeDecodeError, ValueError, StopIteration, OverflowError) as error:
        raise NotAppendable(f"a zip structure this reader does not take ({error})") from error


def _read_layout(path: Path) -> ZipLayout:
    size = os.path.getsize(path)
    with open(path, "rb") as stream:
        window = min(size, SEARCH_WINDOW)
        stream.seek(size - window)
        tail = stream.read(window)
        at = tail.rfind(struct.pack("<I", EOCD_SIG))
        if at < 0 or at + EOCD.size != len(tail):
            raise NotAppendable("no end record at the very end (a comment or trailing bytes)")
        _, disk, cd_disk, on_disk, count, cd_size, cd_offset, comment = EOCD.unpack_from(tail, at)
        if disk or cd_disk or on_disk != count or comment:
            raise NotAppendable("multi-disk zip or zip comment")
        if at >= ZIP64_LOCATOR.size:
            sig, zip64_disk, zip64_offset, disks = ZIP64_LOCATOR.unpack_from(tail, at - ZIP64_LOCATOR.size)
            if sig == ZIP64_LOCATOR_SIG:
                stream.seek(zip64_offset)
                fields = ZIP64_EOCD.unpack(stream.read(ZIP64_EOCD.size))
                if fields[0] != ZIP64_EOCD_SIG:
                    raise NotAppendable("broken zip64 end record")
                if zip64_disk or disks > 1 or fields[4] or fields[5] or fields[6] != fields[7]:
                    raise NotAppendable("multi-disk zip64")
                count, cd_size, cd_offset = fields[7], fields[8], fields[9]
        stream.seek(cd_offset)
        directory = stream.read(cd_size)
    if len(directory) != cd_size:
        raise NotAppendable("central directory runs past the end of the file")
    records, position = [], 0
    for _ in range(count):
        fields = CENTRAL.unpack_from(directory, position)
        if fields[0] != CENTRAL_SIG:
            raise NotAppendable("central directory record without its signature")
        name_len, extra_len, comment_len = fields[10], fields[11], fields[12]
        end = position + CENTRAL.size + name_len + extra_len + comment_len
        raw = directory[position:end]
        name = raw[CENTRAL.size : CENTRAL.size + name_len].decode("utf-8")
        extra = raw[CENTRAL.size + name_len : CENTRAL.size + name_len + extra_len]
        if not _extra_well_formed(extra):
            raise NotAppendable(f"{name}: a malformed extra field")
        records.append(CentralRecord(raw, name, _zip64_values(fields, extra)[2]))
        position = end
    if position != len(directory):
        raise NotAppendable("the central directory is not exactly its records")
    return ZipLayout(size, records, cd_offset)


def _zip64_values(fields: tuple, extra: bytes) -> tuple[int, int, int]:
    """(uncompressed size, compressed size, local header offset), read through a zip64 extra where used."""
    usize, csize, offset = fields[9], fields[8], fields[16]
    values = iter(())
    for field_id, data in _extra_fields(extra):
        if field_id == ZIP64_EXTRA_ID:
            values = iter(struct.unpack(f"<{len(data) // 8}Q", data[: len(data) // 8 * 8]))
    if usize == U32:
        usize = next(values)
    if csize == U32:
        csize = next(values)
    if offset == U32:
        offset = next(values)
    return usize, csize, offset


def _extra_well_formed(extra: bytes) -> bool:
    """Whole fields (a 4-byte header, then as many bytes as it declares) and nothing else."""
    position = 0
    while position + 4 <= len(extra):
        position += 4 + struct.unpack_from("<H", extra, position + 2)[0]
    return position == len(extra)


def _extra_fields(extra: bytes) -> list[tuple[int, bytes]]:
    fields, position = [], 0
    while position + 4 <= len(extra):
        field_id, length = struct.unpack_from("<HH", extra, position)
        fields.append((field_id, extra[position + 4 : position + 4 + length]))
        position += 4 + length
    return fields


def read_member(path: Path, layout: ZipLayout, record: CentralRecord) -> bytes:
    """A stored member's bytes, found through its local header."""
    try:
        return _read_member(path, record)
    except (struct.error, ValueError, StopIteration, OverflowError) as error:
        raise NotAppendable(f"{record.name}: cannot be read as a stored member ({error})") from error


def _read_member(path: Path, record: CentralRecord) -> bytes:
    fields = CENTRAL.unpack_from(record.raw)
    csize = record.size
    if fields[4] != 0:
        raise NotAppendable(f"{record.name} is compressed")
    with open(path, "rb") as stream:
        stream.seek(record.header_offset)
        local = LOCAL.unpack(stream.read(LOCAL.size))
        if local[0] != LOCAL_SIG:
            raise NotAppendable(f"{record.name}: no local header where the directory says")
        stream.seek(record.header_offset + LOCAL.size + local[9] + local[10])
        return stream.read(csize)


def data_spans(path: Path, records: list[CentralRecord]) -> list[tuple[int, int]]:
    """(where its bytes start, how many) for each stored member, as a zip reader finds them: through its local header.

    Each local header must carry its signature and the name the directory gives. The
    headers are asked of the kernel all at once first (``POSIX_FADV_WILLNEED``): on a cold
    cache that turns hundreds of waits for the disk into about one.
    """
    spans = []
    fd = osfiles.open_fd(path, os.O_RDONLY)
    try:
        for record in records:
            osfiles.will_need(fd, record.header_offset, LOCAL.size + len(record.name))
        for record in records:
            name = record.name.encode("utf-8")
            header = osfiles.pread(fd, LOCAL.size + len(name), record.header_offset)
            if len(header) < LOCAL.size:
                raise NotAppendable(f"{record.name}: its local header runs past the end of the file")
            local = LOCAL.unpack_from(header)
            if local[0] != LOCAL_SIG or local[9] != len(name) or header[LOCAL.size :] != name:
                raise NotAppendable(f"{record.name}: no local header of that name where the directory says")
            if not record.plain:
                raise NotAppendable(f"{record.name} is compressed, encrypted or on another disk")
            spans.append((record.header_offset + LOCAL.size + local[9] + local[10], record.size))
    finally:
        os.close(fd)
    return spans


def build_tail(layout: ZipLayout, new_pickle: bytes) -> tuple[bytes, bytes]:
    """(the new data.pkl record and central directory, the end records) to append at ``layout.size``."""
    old = layout.pickle_record()
    fields = list(CENTRAL.unpack_from(old.raw))
    name = old.raw[CENTRAL.size : CENTRAL.size + fields[10]]
    old_extra = old.raw[CENTRAL.size + fields[10] : CENTRAL.size + fields[10] + fields[11]]
    kept_extra = b"".join(struct.pack("<HH", i, len(d)) + d for i, d in _extra_fields(old_extra) if i != ZIP64_EXTRA_ID)
    offset, crc, size = layout.size, zlib.crc32(new_pickle), len(new_pickle)
    big_offset = offset >= U32
    central_extra = kept_extra + (struct.pack("<HHQ", ZIP64_EXTRA_ID, 8, offset) if big_offset else b"")
    # version made by, version needed, flags (no data descriptor), method stored, time, date: as before
    local = LOCAL.pack(LOCAL_SIG, fields[2], fields[3] & ~0x8, 0, fields[5], fields[6], crc, size, size, len(name), 0)
    fields[3] &= ~0x8
    fields[7:10] = [crc, size, size]
    fields[11] = len(central_extra)
    fields[16] = U32 if big_offset else offset
    comment = old.raw[CENTRAL.size + fields[10] + len(old_extra) :]
    new_record = CENTRAL.pack(*fields) + name + central_extra + comment
    directory = b"".join(new_record if r is old else r.raw for r in layout.records)
    body = local + name + new_pickle
    cd_offset = offset + len(body)
    zip64_at = cd_offset + len(directory)
    count = len(layout.records)
    end = (
        ZIP64_EOCD.pack(ZIP64_EOCD_SIG, ZIP64_EOCD.size - 12, 45, 45, 0, 0, count, count, len(directory), cd_offset)
        + ZIP64_LOCATOR.pack(ZIP64_LOCATOR_SIG, 0, zip64_at, 1)
        + EOCD.pack(
            EOCD_SIG, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF), min(len(directory), U32), min(cd_offset, U32), 0
        )
    )
    return body + directory, end


def append(path: Path, expected_size: int, body: bytes, end: bytes) -> None:
    """Append ``body`` (fsynced) then ``end`` (one write, fsynced) at ``expected_size``; never writes before it."""
    if len(body) > MAX_TAIL:
        raise NotAppendable(f"the new pickle and directory take {len(body)} bytes, over {MAX_TAIL}")
    fd = osfiles.open_fd(path, os.O_WRONLY)
    try:
        if os.fstat(fd).st_size != expected_size:
            raise NotAppendable("the file changed size since it was read")
        os.lseek(fd, expected_size, os.SEEK_SET)
        osfiles.write_all(fd, body)
        osfiles.flush_fd(fd)
        osfiles.write_all(fd, end)
        osfiles.flush_fd(fd)
    finally:
        os.close(fd)


def truncate(path: Path, size: int) -> None:
    """Undo (or clean up a crashed) append: back to the original ``size`` bytes, durably."""
    fd = osfiles.open_fd(path, os.O_WRONLY)
    try:
        osfiles.truncate_fd(fd, size, path)
        osfiles.flush_fd(fd)
    finally:
        os.close(fd)


def append_completed(path: Path, original_size: int) -> bool:
    """Whether the file ends with a complete directory whose data.pkl is the one appended at ``original_size``."""
    try:
        layout = read_layout(path)
        return layout.pickle_record().header_offset == original_size
    except (NotAppendable, OSError, struct.error, UnicodeDecodeError):
        return False
