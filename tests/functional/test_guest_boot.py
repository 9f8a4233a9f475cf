"""Boot the real test guest in QEMU (TCG) and check its workloads end to end.

Needs qemu-system-x86_64, a kernel in /boot, busybox-static and gcc; the
image is cached in $MFTVM_CACHE_DIR (default ~/.cache/mftvm).
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time

import fixtures
import testtools
from testtools import content

from mftvm_openstack.images import builder, records, workload

BOOT_TIMEOUT = 120
ACK_RE = re.compile(r"ACK (\d+) ([0-9a-f]{64})")


def _cache_dir():
    return os.environ.get("MFTVM_CACHE_DIR",
                          os.path.expanduser("~/.cache/mftvm"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestGuestBoot(testtools.TestCase):

    def setUp(self):
        super().setUp()
        if shutil.which("qemu-system-x86_64") is None:
            self.skipTest("qemu-system-x86_64 not installed")
        try:
            self.image = builder.build_guest_image(_cache_dir())
        except builder.ImageError as exc:
            self.skipTest(str(exc))
        self.tmp = self.useFixture(fixtures.TempDir(rootdir="/var/tmp")).path
        self.disk = os.path.join(self.tmp, "disk.img")
        self.serial = os.path.join(self.tmp, "serial.log")
        with open(self.disk, "wb") as f:
            f.truncate(64 << 20)

    def _boot(self, run):
        self.port = _free_port()
        cmd = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "128",
            "-nographic", "-no-reboot", "-monitor", "none",
            "-serial", f"file:{self.serial}",
            "-kernel", self.image.kernel, "-initrd", self.image.initrd,
            "-append", f"console=ttyS0 quiet panic=-1 mftvm.run={run}",
            "-drive", f"file={self.disk},format=raw,if=none,id=d0",
            "-device", "virtio-blk-pci,drive=d0",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:7000",
            "-device", "virtio-net-pci,netdev=n0",
        ]
        self.qemu = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        self.addCleanup(self._kill)

    def _kill(self):
        if self.qemu.poll() is None:
            self.qemu.send_signal(signal.SIGKILL)
        self.qemu.wait(timeout=30)
        self.qemu.stdout.close()

    def _console(self):
        try:
            with open(self.serial, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _wait_for(self, predicate, what, timeout=BOOT_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self._console()
            if predicate(text):
                return text
            if self.qemu.poll() is not None:
                out = self.qemu.stdout.read().decode(errors="replace")
                self.fail(f"QEMU exited ({self.qemu.returncode}) waiting for "
                          f"{what}: {out}\nconsole:\n{text[-2000:]}")
            time.sleep(0.2)
        self.fail(f"timed out waiting for {what}; console:\n"
                  f"{self._console()[-2000:]}")

    def _request(self):
        return workload.counter_request("127.0.0.1", self.port, 30)

    def test_writer_and_counter(self):
        start = time.monotonic()
        self._boot("writer,counter")
        self._wait_for(lambda t: "MFTVM-GUEST-READY" in t, "guest ready")
        self.addDetail("boot_seconds", content.text_content(
            f"{time.monotonic() - start:.1f}"))
        self._wait_for(lambda t: "COUNTER-READY 7000 0" in t, "counter")
        self.assertEqual([1, 2, 3], [self._request() for _ in range(3)])
        # The guest logs a count just after answering: wait for the log
        # line too, not only for the answer.
        self._wait_for(lambda t: len(ACK_RE.findall(t)) >= 10 and
                       "COUNT 3" in t, "10 ACKs and COUNT 3")

        self._kill()
        console = self._console()
        self.assertIn("COUNT 3", console)
        self.assertNotIn("FUTURE", console)
        acks = {int(k): h for k, h in ACK_RE.findall(console)}
        self.assertEqual(list(range(len(acks))), sorted(acks))

        chain = records.read_records(self.disk)
        last = records.verify_chain(chain)
        # Every acknowledged record is on disk; at most one more was
        # written but not yet acknowledged when QEMU died.
        self.assertIn(last, (max(acks), max(acks) + 1))
        for seq, digest in acks.items():
            self.assertEqual(digest, chain[seq].hash.hex())
        with open(self.disk, "rb") as f:
            self.assertEqual(3, records.read_counter(f.read(4096)))
