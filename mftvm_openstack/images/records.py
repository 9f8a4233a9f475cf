"""Host-side reader of what the guest workloads write to their disk.

Mirrors the layout written by ``guest/guestd.c`` (see its header comment):

* ``[0, 4 KiB)``: the counter block, ``b"MFTVCNT1"`` + u64 value;
* ``[4 KiB, 8 KiB)``: the session counter's, ``b"MFTVSES1"`` + u64 value;
* from ``WRITER_BASE`` (1 MiB): writer record k at ``WRITER_BASE + k * 4096``.

A writer record chains to the previous one by hash, so a disk image tells
whether it is an unbroken prefix of the guest's history: a lost, torn,
reordered or foreign record breaks the chain.  Together with the
``ACK k <hash>`` lines the writer prints, a failover test checks that every
acknowledged write survived, and that nothing else did.
"""

import dataclasses
import hashlib
import struct

RECORD_SIZE = 4096
WRITER_BASE = 1 << 20
WRITER_END = 512 << 20
HEADER_SIZE = 80
RECORD_MAGIC = b"MFTVREC1"
COUNTER_MAGIC = b"MFTVCNT1"
ZERO_HASH = bytes(32)


class ChainError(ValueError):
    """A record is present but does not continue the chain."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"record {index}: {reason}")
        self.index = index
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Record:
    """One decoded writer record (``hash`` as stored, not recomputed)."""

    seq: int
    prev_hash: bytes
    hash: bytes
    payload: bytes


def payload_bytes(seq: int) -> bytes:
    """The deterministic payload of record ``seq``: its LE seq repeated."""
    return struct.pack("<Q", seq) * ((RECORD_SIZE - HEADER_SIZE) // 8)


def record_hash(seq: int, prev_hash: bytes, payload: bytes) -> bytes:
    """SHA-256 over seq (u64 LE) || prev_hash || payload."""
    return hashlib.sha256(
        struct.pack("<Q", seq) + prev_hash + payload).digest()


def record_bytes(seq: int, prev_hash: bytes) -> bytes:
    """The exact 4096 bytes guestd writes for record ``seq``."""
    payload = payload_bytes(seq)
    return (RECORD_MAGIC + struct.pack("<Q", seq) + prev_hash
            + record_hash(seq, prev_hash, payload) + payload)


def parse_records(data: bytes, base: int = WRITER_BASE) -> list[Record]:
    """Decode writer slots from a disk image, up to the first empty slot.

    :param data: disk contents from offset 0 (pass ``base=0`` for bytes
        that start at the first record slot).
    Slots are decoded, not checked; use :func:`verify_chain` for that.
    """
    records = []
    for off in range(base, len(data) - RECORD_SIZE + 1, RECORD_SIZE):
        slot = data[off:off + RECORD_SIZE]
        if slot[:8] != RECORD_MAGIC:
            break
        records.append(_decode(slot))
    return records


def read_records(path: str, limit: int | None = None) -> list[Record]:
    """Like :func:`parse_records` on a disk image file, read slot by slot.

    Stops at the first slot without a record, so a big sparse disk is not
    read whole.
    """
    records: list[Record] = []
    with open(path, "rb") as f:
        f.seek(WRITER_BASE)
        while limit is None or len(records) < limit:
            slot = f.read(RECORD_SIZE)
            if len(slot) < RECORD_SIZE or slot[:8] != RECORD_MAGIC:
                break
            records.append(_decode(slot))
    return records


def verify_chain(records: list[Record], strict: bool = True) -> int:
    """Check the hash chain; return the index of the last valid record.

    Returns -1 for an empty list.  Record i must have seq i, carry the hash
    of record i-1 (zeros for record 0) and a hash matching its content.
    On the first record that breaks these rules, raise :class:`ChainError`
    (``strict``) or return the index of the record before it.
    """
    prev = ZERO_HASH
    for i, rec in enumerate(records):
        reason = None
        if rec.seq != i:
            reason = f"seq {rec.seq} in slot {i}"
        elif rec.prev_hash != prev:
            reason = "prev hash does not match the previous record"
        elif rec.payload != payload_bytes(i):
            reason = "payload altered"
        elif rec.hash != record_hash(rec.seq, rec.prev_hash, rec.payload):
            reason = "hash does not match the content"
        if reason:
            if strict:
                raise ChainError(i, reason)
            return i - 1
        prev = rec.hash
    return len(records) - 1


def counter_bytes(value: int) -> bytes:
    """The 4096-byte counter block guestd writes for ``value``."""
    block = COUNTER_MAGIC + struct.pack("<Q", value)
    return block + bytes(RECORD_SIZE - len(block))


def read_counter(data: bytes) -> int:
    """Counter value from a disk image (or its first block); zeros mean 0."""
    head = data[:16]
    if head[:8] == COUNTER_MAGIC:
        return struct.unpack_from("<Q", head, 8)[0]
    if not any(head):
        return 0
    raise ValueError("counter block has a bad magic")


def _decode(slot: bytes) -> Record:
    (seq,) = struct.unpack_from("<Q", slot, 8)
    return Record(seq=seq, prev_hash=slot[16:48], hash=slot[48:80],
                  payload=slot[HEADER_SIZE:])
