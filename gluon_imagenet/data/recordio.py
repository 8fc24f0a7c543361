"""An indexed RecordIO writer in Python that hashes the .rec bytes as it writes them.

The packer records the SHA-256 of each packed .rec in pack.json (the split's data identity, which the trainer,
the sweep and export keep). Written here rather than through mx.recordio.MXIndexedRecordIO, the digest is of the
very bytes that went to the file, with no second read of a file that may be hundreds of gigabytes.

The bytes are dmlc-core's (src/recordio.cc, RecordIOWriter::WriteRecord), which MXNet's reader expects: each part
is uint32 magic, uint32 lrecord (continuation flag in the top 3 bits, length below), then the data padded with
zeros to 4 bytes. Where the payload holds the magic number at a 4-byte boundary the record is split there (the
magic number itself is dropped from the data: the reader puts it back between parts), cflag 1 for the first part,
2 for a middle one, 3 for the last; 0 for a record in one part. The .idx is MXIndexedRecordIO's: `key<TAB>offset`.
"""
from __future__ import annotations

import hashlib
import struct

RECORD_MAGIC = 0xCED7230A
_MAGIC = struct.pack("<I", RECORD_MAGIC)
IRHEADER = struct.Struct("IfQQ")  # mx.recordio.IRHeader as mx.recordio.pack writes it: flag, label, id, id2
_MAX_LENGTH = 1 << 29  # the length field's 29 bits


def image_record(label: float, record_id: int, payload: bytes) -> bytes:
    """mx.recordio.pack(IRHeader(0, label, record_id, 0), payload) for a scalar label."""
    return IRHEADER.pack(0, label, record_id, 0) + payload


def _part(cflag: int, data: bytes | memoryview) -> bytes:
    return _MAGIC + struct.pack("<I", cflag << 29 | len(data)) + bytes(data)


def frame(record: bytes) -> bytes:
    """The bytes dmlc's writer puts in the .rec for one record."""
    if len(record) >= _MAX_LENGTH:
        raise ValueError(f"a record of {len(record)} bytes: RecordIO holds records below 2^29 bytes")
    view, parts, start = memoryview(record), [], 0
    position = record.find(_MAGIC)
    while position != -1:
        if position % 4 == 0:
            parts.append(_part(1 if start == 0 else 2, view[start:position]))
            start = position + 4
            position = record.find(_MAGIC, start)
        else:
            position = record.find(_MAGIC, position + 1)
    parts.append(_part(3 if start else 0, view[start:]))
    padding = -len(record) % 4
    return b"".join(parts) + b"\0" * padding


class IndexedRecordWriter:
    """Writes records to rec_path and their offsets to idx_path; `digest()` is the SHA-256 of the .rec so far."""

    def __init__(self, idx_path: str, rec_path: str):
        self._rec = open(rec_path, "wb")
        try:
            self._idx = open(idx_path, "w")
        except BaseException:
            self._rec.close()
            raise
        self._hash = hashlib.sha256()
        self._offset = 0

    def write_idx(self, key: int, record: bytes) -> None:
        data = frame(record)
        self._rec.write(data)
        self._hash.update(data)
        self._idx.write(f"{key}\t{self._offset}\n")
        self._offset += len(data)

    def digest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        for f in (self._rec, self._idx):
            f.close()
