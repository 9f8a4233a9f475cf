"""Shared pieces of the real-QEMU tier: guest image, disks, waiting."""

import glob
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import testtools
from testtools import content

from mftvm_openstack.contract.states import State
from mftvm_openstack.ft import vm
from mftvm_openstack.images import builder, records, workload
from mftvm_openstack.instance import client
from mftvm_openstack.local import demo, operations

_image = None
_image_lock = threading.Lock()


def guest_image():
    global _image
    with _image_lock:
        if _image is None:
            _image = builder.build_guest_image(demo.cache_dir())
        return _image


def wait_for(predicate, timeout, interval=0.05, what='condition'):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout}s waiting for '
                                 f'{what}')
        time.sleep(interval)


class SerialWatcher:
    """Tails a serial log in a thread, timestamping each ACK as it
    appears (the guest has no clock we trust across a failover)."""

    def __init__(self, path, pattern=None):
        self.path = path
        self.pattern = pattern or workload.ACK_RE
        self.acks = []      # (host monotonic time, seq)
        self.text = ''
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        pos = 0
        partial = ''
        while not self._stop.is_set():
            try:
                with open(self.path, 'rb') as f:
                    f.seek(pos)
                    data = f.read()
            except OSError:
                data = b''
            if data:
                pos += len(data)
                now = time.monotonic()
                chunk = partial + data.decode(errors='replace')
                lines = chunk.split('\n')
                partial = lines.pop()
                for line in lines:
                    self.text += line + '\n'
                    m = self.pattern.match(line + '\n')
                    if m:
                        self.acks.append((now, int(m.group(1))))
            time.sleep(0.01)

    def stop(self):
        self._stop.set()
        self._thread.join()


class GuestTestCase(testtools.TestCase):
    """Each test gets a state dir, a disk and a free port; whatever it
    started is stopped (and killed if need be) at cleanup."""

    def setUp(self):
        super().setUp()
        self.image = guest_image()
        self.tmp = tempfile.mkdtemp(prefix='mftvm-test-', dir='/var/tmp')
        if not os.environ.get('MFTVM_KEEP_TEST_DIRS'):
            self.addCleanup(shutil.rmtree, self.tmp, True)
        self.state_dir = os.path.join(self.tmp, 'state')
        self.port = demo.free_port()
        self.addOnException(self._attach_host_logs)

    def _attach_host_logs(self, exc_info):
        # The host processes' own account of a failure, in the test result
        # (the state dir is gone after the run).
        for path in sorted(glob.glob(os.path.join(self.state_dir, '*',
                                                  '*-host.log'))):
            with open(path, errors='replace') as f:
                tail = f.readlines()[-200:]
            self.addDetail(os.path.relpath(path, self.state_dir),
                           content.text_content(''.join(tail)))

    def make_disk(self, size_mib=64, fill_mib=0):
        path = os.path.join(self.tmp, f'disk{len(os.listdir(self.tmp))}.raw')
        with open(path, 'wb') as f:
            f.truncate(size_mib << 20)
        if fill_mib:
            # Data beyond the guest's regions: the initial sync must copy it.
            subprocess.run(['dd', 'if=/dev/urandom', f'of={path}', 'bs=1M',
                            f'seek={size_mib - fill_mib}',
                            f'count={fill_mib}', 'conv=notrunc'],
                           check=True, capture_output=True)
        return path

    def protect(self, name='g', run='writer,counter', memory_mib=128,
                epoch_ms=200, disk=None, writer_ms=20, smp=1, append='',
                **options):
        """``append``: more of the guest kernel's command line."""
        disk = disk or self.make_disk()
        spec = operations.make_spec(
            name, self.image.kernel, self.image.initrd, disk,
            append=f'console=ttyS0 quiet mftvm.run={run} '
                   f'mftvm.writer_interval_ms={writer_ms} {append}'.strip(),
            memory_mib=memory_mib, smp=smp,
            nic=f'user,hostfwd=tcp:127.0.0.1:{self.port}-:7000')
        opts = operations.ProtectOptions(epoch_ms=epoch_ms, **options)
        self.addCleanup(self._stop_guest, name)
        gdir = operations.protect(spec, opts, self.state_dir)
        return spec, gdir

    def _stop_guest(self, name):
        try:
            operations.stop(self.state_dir, name)
        except operations.UserError:
            pass

    def side(self, name, role):
        gdir = operations.guest_dir(self.state_dir, name)
        return client.read_status(gdir, role) or {}

    def talk(self, last, seconds):
        """Ask the counter for ``seconds``; each answer must be last + 1.
        Returns the last answer."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            got = workload.counter_request('127.0.0.1', self.port)
            if got is not None:
                self.assertEqual(last + 1, got)
                last = got
        return last

    def kill_and_ask(self, qemu_pid, last, timeout=60):
        """SIGKILL the primary QEMU a random moment after an answer
        (without output commit, that answer came from an epoch the
        failover takes back); the guest's next answer must be exactly
        last + 1. Returns it and the seconds it took."""
        time.sleep(random.uniform(0, 0.2))
        os.kill(qemu_pid, signal.SIGKILL)
        t_kill = time.monotonic()
        after = wait_for(
            lambda: workload.counter_request('127.0.0.1', self.port, 5),
            timeout, 0, 'an answer from the failed-over guest')
        answered_in = time.monotonic() - t_kill
        self.assertEqual(last + 1, after)
        return after, answered_in

    def wait_active(self, name, timeout=10):
        """The secondary's status once it reports running the guest."""
        return wait_for(lambda: (s := self.side(name, 'secondary')).get(
            'state') == State.ACTIVE and s, timeout, what='secondary active')

    def wait_counter(self, gdir, timeout=90):
        """The counter's first answer, asked once the service listens.

        Asking earlier is not harmless: user-mode networking accepts the
        connection and delivers the request once the guest listens, after
        the client gave up, and that increment would go unseen. The
        answer may take long: it is held until a checkpoint commits, and
        a guest dirtying all its RAM on a loaded machine takes more than
        10 s for that (seen twice in full runs at load ~15)."""
        serial = os.path.join(gdir, 'primary', 'serial.log')
        wait_for(lambda: 'COUNTER-READY' in workload.read_text(serial),
                 timeout, 0.2, 'the guest counter service')
        return workload.counter_request('127.0.0.1', self.port, 30)


def assert_ran_on_from_checkpoint(test, text, on_disk, disk_path):
    """The restored guest's console ``text`` shows it ran on from
    exactly the checkpoint whose disk held records up to ``on_disk``: no
    reboot, its next record is the one after (or the one in flight at)
    the checkpoint, and the chain it writes on ``disk_path`` stays
    intact."""
    test.assertNotIn('MFTVM-GUEST-READY', text)
    test.assertEqual([], workload.future_records(text))
    first = workload.serial_acks(text)[0][0]
    test.assertIn(first, (on_disk, on_disk + 1))
    records.verify_chain(records.read_records(disk_path))


def assert_acks_continue_chain(test, text, layers, tag=''):
    """After a failover: the replica's disk (``layers``, a status's
    ``disk_layers``) holds no record from after the committed epoch, its
    hash chain is intact, and the writer's ACKs on the console ``text``
    (tagged ``tag``) name records of that chain, one after another with
    no gap. Returns the ACKs."""
    test.assertEqual([], workload.future_records(text, tag))
    disk = workload.disk_records([tuple(x) for x in layers])
    last_record = records.verify_chain(disk)
    acks = workload.serial_acks(text, tag)
    test.assertTrue(acks, f'the writer {tag!r} ran on')
    test.assertLessEqual(acks[-1][0], last_record)
    for seq, digest in acks:
        test.assertEqual(digest, disk[seq].hash.hex())
    first = acks[0][0]
    test.assertEqual(list(range(first, first + len(acks))),
                     [seq for seq, _ in acks])
    return acks


def ram_files(name):
    """The guest RAM files of ``name`` still on this host."""
    return sorted(glob.glob(vm.ram_path(name, 'ROLE').replace('ROLE', '*')))


def qemu_pids_for(name):
    """PIDs of every qemu-system process running guest ``name``."""
    # '[q]' keeps a concurrent pgrep for the same name from matching.
    pattern = f'[{vm.QEMU_BINARY[0]}]{vm.QEMU_BINARY[1:]} -name {name} '
    out = subprocess.run(['pgrep', '-f', pattern],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]
