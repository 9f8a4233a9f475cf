"""A child's log stays under its limit while the child writes it."""

import asyncio
import os
import shutil
import tempfile
import unittest

from mftvm_openstack.ft import log_bound, vm

KiB = 1 << 10
#: QEMU 7.2's line for each blockdev-backup job onto an NBD target (the
#: block-copy baseline starts one per checkpoint)
WARNING = (b'qemu-system-x86_64: warning: The target block device doesn\'t '
           b'provide information about the block size and it doesn\'t have '
           b'a backing file. The default block size of 65536 bytes is used.'
           b' If the actual block size of the target exceeds this default, '
           b'the backup may be unusable\n')


class CutBackTest(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = os.path.join(self.dir, 'qemu.log')

    def read(self):
        with open(self.path, 'rb') as f:
            return f.read()

    def test_a_log_past_its_limit_keeps_its_head_and_newest_lines(self):
        with open(self.path, 'wb') as f:
            f.write(b'QEMU started\n' + WARNING * 1000 + b'the last line\n')
        cut = log_bound.cut_back(self.path, limit=16 * KiB, head=1 * KiB)
        text = self.read()
        self.assertLessEqual(len(text), 16 * KiB)
        self.assertTrue(text.startswith(b'QEMU started\n'))
        self.assertTrue(text.endswith(WARNING + b'the last line\n'))
        self.assertIn(b'[mftvm: %d bytes of this log were cut' % cut, text)
        # whole lines only, on either side of the cut
        for line in text.splitlines(keepends=True)[1:-1]:
            if not line.startswith(b'[mftvm'):
                self.assertEqual(WARNING, line)
        marker = next(line for line in text.splitlines(True)
                      if line.startswith(b'[mftvm'))
        self.assertEqual(13 + len(WARNING) * 1000 + 14,
                         cut + len(text) - len(marker))

    def test_a_log_under_its_limit_is_left_alone(self):
        with open(self.path, 'wb') as f:
            f.write(WARNING * 10)
        self.assertEqual(0, log_bound.cut_back(self.path, limit=16 * KiB))
        self.assertEqual(WARNING * 10, self.read())
        self.assertEqual(0, log_bound.cut_back(self.path + '.gone'))


class ChildLogTest(unittest.IsolatedAsyncioTestCase):

    async def test_a_child_that_repeats_itself_keeps_its_log_bounded(self):
        # (The block-copy baseline's QEMU wrote a line per checkpoint into
        # its qemu.log for as long as the guest ran.)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        log = os.path.join(directory, 'qemu.log')
        script = ('echo started; i=0; while [ $i -lt 400 ]; do '
                  'echo "warning: a line again, number $i of 400, to fill '
                  'the log"; i=$((i+1)); sleep 0.001; done; echo LAST; '
                  'exec sleep 60')
        child = await vm.ChildProcess.start(
            ['sh', '-c', script], log, log_limit=4 * KiB, log_check_s=0.05)
        self.addAsyncCleanup(child.kill)

        def done():
            with open(log, 'rb') as f:
                text = f.read()
            return b'LAST' in text and b'[mftvm:' in text and \
                len(text) <= 4 * KiB
        for _ in range(400):
            if done():
                break
            await asyncio.sleep(0.05)
        with open(log, 'rb') as f:
            text = f.read()
        self.assertLessEqual(len(text), 4 * KiB)
        self.assertTrue(text.startswith(b'started\n'))
        self.assertIn(b'[mftvm:', text)
        self.assertEqual('LAST', child.last_log_line())
