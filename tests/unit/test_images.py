"""Tests of the guest disk record format and the image builder helpers."""

import gzip
import os
import re
import shutil
import socket
import subprocess

import fixtures
import testtools

from mftvm_openstack.images import builder, records, workload

# Not /tmp: tmpfs would refuse O_DIRECT (guestd falls back, but test the
# real path where the filesystem allows it).
_TMP_ROOT = "/var/tmp"


def _chain(n):
    """Records 0..n-1 as guestd would write them, and the raw slot bytes."""
    prev = records.ZERO_HASH
    slots = []
    for seq in range(n):
        slot = records.record_bytes(seq, prev)
        slots.append(slot)
        prev = slot[48:80]
    return slots


def _disk(slots):
    return bytes(records.WRITER_BASE) + b"".join(slots) + bytes(
        records.RECORD_SIZE)


class TestRecords(testtools.TestCase):

    def test_record_layout(self):
        slot = records.record_bytes(7, records.ZERO_HASH)
        self.assertEqual(records.RECORD_SIZE, len(slot))
        self.assertEqual(b"MFTVREC1", slot[:8])
        self.assertEqual(7, int.from_bytes(slot[8:16], "little"))
        self.assertEqual(records.payload_bytes(7), slot[80:])

    def test_valid_chain(self):
        parsed = records.parse_records(_disk(_chain(5)))
        self.assertEqual([0, 1, 2, 3, 4], [r.seq for r in parsed])
        self.assertEqual(4, records.verify_chain(parsed))

    def test_empty_disk(self):
        self.assertEqual([], records.parse_records(bytes(2 << 20)))
        self.assertEqual(-1, records.verify_chain([]))

    def test_tampered_payload_is_detected(self):
        slots = _chain(4)
        bad = bytearray(slots[2])
        bad[1000] ^= 0xFF
        slots[2] = bytes(bad)
        parsed = records.parse_records(_disk(slots))
        err = self.assertRaises(records.ChainError,
                                records.verify_chain, parsed)
        self.assertEqual(2, err.index)
        self.assertEqual(1, records.verify_chain(parsed, strict=False))

    def test_tampered_hash_is_detected(self):
        slots = _chain(3)
        bad = bytearray(slots[1])
        bad[50] ^= 1
        slots[1] = bytes(bad)
        parsed = records.parse_records(_disk(slots))
        err = self.assertRaises(records.ChainError,
                                records.verify_chain, parsed)
        # The altered hash fails record 1 itself, before record 2 sees it.
        self.assertEqual(1, err.index)

    def test_broken_prev_hash_is_detected(self):
        slots = _chain(3)
        # A self-consistent record 2 that chains to something else.
        slots[2] = records.record_bytes(2, b"\x01" * 32)
        parsed = records.parse_records(_disk(slots))
        err = self.assertRaises(records.ChainError,
                                records.verify_chain, parsed)
        self.assertEqual(2, err.index)
        self.assertIn("prev hash", err.reason)

    def test_wrong_seq_is_detected(self):
        slots = _chain(2)
        slots.append(records.record_bytes(5, slots[1][48:80]))
        parsed = records.parse_records(_disk(slots))
        self.assertEqual(1, records.verify_chain(parsed, strict=False))

    def test_counter(self):
        self.assertEqual(0, records.read_counter(bytes(4096)))
        self.assertEqual(42, records.read_counter(records.counter_bytes(42)))
        self.assertRaises(ValueError, records.read_counter, b"junk" * 8)


class TestNewc(testtools.TestCase):

    def test_archive_lists_with_cpio(self):
        if shutil.which("cpio") is None:
            self.skipTest("cpio not installed")
        cpio = builder.NewcWriter()
        cpio.add_dir("bin")
        cpio.add_file("bin/x", b"hello", 0o755)
        cpio.add_symlink("bin/y", "/bin/x")
        out = subprocess.run(["cpio", "-it"], input=cpio.finish(),
                             capture_output=True, check=True).stdout
        self.assertEqual([b"bin", b"bin/x", b"bin/y"], out.split())


class TestBuilder(testtools.TestCase):

    def test_kernel_version_from_name(self):
        self.assertEqual("6.1.0-9-cloud-amd64", builder.kernel_version(
            "/boot/vmlinuz-6.1.0-9-cloud-amd64"))

    def test_version_sort(self):
        paths = ["/boot/vmlinuz-6.1.0-10", "/boot/vmlinuz-6.1.0-9"]
        self.assertEqual("/boot/vmlinuz-6.1.0-10",
                         sorted(paths, key=builder._version_key)[-1])

    def test_build_is_cached(self):
        try:
            kernel = builder.find_kernel()
        except builder.ImageError as exc:
            self.skipTest(str(exc))
        out = self.useFixture(fixtures.TempDir(rootdir=_TMP_ROOT)).path
        image = builder.build_guest_image(out, kernel)
        mtime = os.stat(image.initrd).st_mtime_ns
        self.assertEqual(image, builder.build_guest_image(out, kernel))
        self.assertEqual(mtime, os.stat(image.initrd).st_mtime_ns)
        with gzip.open(image.initrd) as f:
            archive = f.read()
        for name in (b"init\0", b"bin/guestd\0", b"bin/busybox\0",
                     b"lib/modules/virtio_blk.ko\0", b"dev/console\0"):
            self.assertIn(name, archive)


class TestGuestdWriter(testtools.TestCase):
    """Run the real guest program on the host against a regular file."""

    def setUp(self):
        super().setUp()
        if shutil.which("gcc") is None:
            self.skipTest("gcc not installed")
        self.tmp = self.useFixture(fixtures.TempDir(rootdir=_TMP_ROOT)).path
        self.guestd = builder.compile_guestd(
            os.path.join(self.tmp, "guestd"))
        self.disk = os.path.join(self.tmp, "disk.img")

    def _write(self, max_records):
        out = subprocess.run(
            [self.guestd, "writer", self.disk, "0", str(max_records)],
            capture_output=True, text=True, check=True, timeout=60).stdout
        return {int(k): h for k, h in
                re.findall(r"^ACK (\d+) ([0-9a-f]{64})$", out, re.M)}, out

    def test_python_and_c_agree(self):
        acks, out = self._write(6)
        self.assertEqual(list(range(6)), sorted(acks))
        with open(self.disk, "rb") as f:
            data = f.read()
        self.assertEqual(b"".join(_chain(6)), data[records.WRITER_BASE:])
        parsed = records.parse_records(data)
        self.assertEqual(5, records.verify_chain(parsed))
        for rec in parsed:
            self.assertEqual(acks[rec.seq], rec.hash.hex())

    def test_restart_continues_chain(self):
        self._write(3)
        acks, out = self._write(5)
        self.assertIn("WRITER-START 3", out)
        self.assertEqual([3, 4], sorted(acks))
        self.assertNotIn("FUTURE", out)
        self.assertEqual(4, records.verify_chain(
            records.read_records(self.disk)))

    def test_future_record_is_reported(self):
        self._write(3)
        # Break record 1: the writer restarts at 1, where slots 1 and 2
        # are not empty, as after a failover that rolled RAM back.
        with open(self.disk, "r+b") as f:
            f.seek(records.WRITER_BASE + records.RECORD_SIZE + 100)
            f.write(b"X")
        _, out = self._write(3)
        self.assertIn("WRITER-START 1", out)
        self.assertIn("FUTURE 1", out)
        self.assertIn("FUTURE 2", out)
        self.assertEqual(2, records.verify_chain(
            records.read_records(self.disk)))


    def test_session_answers_each_line_of_many_clients_and_persists(self):
        with open(self.disk, "wb") as f:
            f.truncate(1 << 20)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(
            [self.guestd, "session", str(port), self.disk],
            stdout=subprocess.PIPE, text=True)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        self.assertEqual(f"SESSION-READY {port} 0", proc.stdout.readline()
                         .strip())
        conns = [socket.create_connection(("127.0.0.1", port), 5)
                 for _ in range(3)]
        answers = []
        for _ in range(4):
            for c in conns:         # interleaved: all open at once
                c.sendall(b"INC\n")
                answers.append(int(c.makefile("rb").readline()))
        for c in conns:
            c.close()
        self.assertEqual(list(range(1, 13)), answers)
        with open(self.disk, "rb") as f:
            f.seek(4096)
            block = f.read(16)
        # its own block: the per-request counter's stays untouched
        self.assertEqual(b"MFTVSES1" + (12).to_bytes(8, "little"), block)

    def test_diskrate_writes_its_own_area_in_whole_writes(self):
        out = subprocess.run(
            [self.guestd, "diskrate", self.disk, "32", "16", "0.3"],
            capture_output=True, text=True, check=True, timeout=60).stdout
        self.assertIn("DISKRATE-START 32.000 16", out)
        totals = [int(n) for n in re.findall(r"^DISKRATE (\d+)$", out, re.M)]
        self.assertGreater(totals[-1], 0)
        self.assertEqual(0, totals[-1] % (16 << 10))
        self.assertEqual(sorted(totals), totals)
        # Only in [576 MiB, 832 MiB): clear of the counters, the writer's
        # records and iobench's area.
        with open(self.disk, "rb") as f:
            first = os.lseek(f.fileno(), 0, os.SEEK_DATA)
            self.assertGreaterEqual(first, 576 << 20)
            self.assertLessEqual(os.fstat(f.fileno()).st_size, 832 << 20)

    def test_diskrate_refuses_a_write_size_off_its_grid(self):
        run = subprocess.run(
            [self.guestd, "diskrate", self.disk, "1", "6", "0.1"],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(1, run.returncode)
        self.assertIn("DISKRATE-ERROR", run.stdout)


class TestCounterRequest(testtools.TestCase):
    """The host-side client of the guest's counter."""

    def test_a_request_given_up_on_is_reset_not_closed(self):
        # Seen in the cloud lab: a request the client gave up on (no
        # answer in time: the guest paused for its first checkpoint, or
        # resumed on another host) was closed normally, so the client's
        # kernel went on sending it, and the guest counted it seconds
        # later, after requests that came after it had been answered (a
        # value skipped with no unanswered request in between). Reset,
        # nothing of it is sent any more: the server sees the reset
        # after what had reached it, not the end of a request.
        srv = socket.socket()
        self.addCleanup(srv.close)
        srv.bind(('127.0.0.1', 0))
        srv.listen(4)
        self.assertIsNone(workload.counter_request(
            '127.0.0.1', srv.getsockname()[1], timeout=0.2))
        conn, _ = srv.accept()
        self.addCleanup(conn.close)
        conn.settimeout(5)
        self.assertEqual(b'INC\n', conn.recv(64))
        self.assertRaises(ConnectionResetError, conn.recv, 64)
