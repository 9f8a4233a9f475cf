"""The content trackers never miss a written page.

Round after round, adversarial writes go into a RAM file: changes that
a weak page checksum would not see (two 8-byte words swapped, or one
raised and another lowered by the same amount, so that their sum stays;
a change that keeps the page's CRC-32; one flipped bit), the first and
the last byte of a page, the last page of RAM, and writes that leave a
page as it was. After each round the tracker must report exactly the
pages whose contents changed, and a mirror fed only its deltas (what
the secondary resumes from) must equal RAM. The same rounds run against
trackers built on a sum and on a CRC, which must be caught missing
pages: the rounds can fail.

A page written with the value it already held is *not* reported by the
content trackers (``hash``, ``scan``): the secondary already holds it.
"""

import mmap
import os
import tempfile
import unittest
import zlib

import numpy as np

from mftvm_openstack.ft import trackers
from mftvm_openstack.ft.trackers import PAGE_SIZE, RamDelta

#: an odd page count: chunks and thread shares end mid-RAM
PAGES = 97
ROUNDS = 300
#: CRC-32's generator polynomial x^32 + ... + 1, bit-reversed as zlib
#: computes it: XORed into a message at any bit offset, it keeps the CRC
CRC32_POLY_REFLECTED = 0x1DB710641


class Ram:
    """A RAM file in /dev/shm, mapped writable, with a numpy view."""

    def __init__(self, test: unittest.TestCase, pages: int = PAGES) -> None:
        fd, self.path = tempfile.mkstemp(dir='/dev/shm', prefix='mftvm-t-')
        test.addCleanup(os.unlink, self.path)
        self.size = pages * PAGE_SIZE
        os.ftruncate(fd, self.size)
        self.map = mmap.mmap(fd, self.size)
        os.close(fd)
        self.pages = np.frombuffer(self.map, np.uint8).reshape(-1,
                                                               PAGE_SIZE)


def swap_words(page: np.ndarray, rng: np.random.Generator) -> None:
    words = page.view(np.uint64)
    i, j = rng.choice(len(words), 2, replace=False)
    if words[i] == words[j]:
        words[i] ^= np.uint64(1 << int(rng.integers(64)))
    words[i], words[j] = words[j], words[i]


def keep_word_sum(page: np.ndarray, rng: np.random.Generator) -> None:
    # one 8-byte word up by d, another down by d: their sum (mod 2^64)
    # stays
    words = page.view(np.uint64)
    i, j = rng.choice(len(words), 2, replace=False)
    d = np.uint64(rng.integers(1, 1 << 62))
    words[[i]] += d         # (arrays wrap silently; scalars warn)
    words[[j]] -= d


def keep_crc32(page: np.ndarray, rng: np.random.Generator) -> None:
    shift = int(rng.integers(PAGE_SIZE * 8 - 33))
    pattern = (CRC32_POLY_REFLECTED << shift).to_bytes(PAGE_SIZE, 'little')
    page ^= np.frombuffer(pattern, np.uint8)


def flip_bit(page: np.ndarray, rng: np.random.Generator) -> None:
    page[int(rng.integers(PAGE_SIZE))] ^= np.uint8(1 << int(rng.integers(8)))


def first_byte(page: np.ndarray, rng: np.random.Generator) -> None:
    page[0] ^= np.uint8(rng.integers(1, 256))


def last_byte(page: np.ndarray, rng: np.random.Generator) -> None:
    page[-1] ^= np.uint8(rng.integers(1, 256))


CHANGES = (swap_words, keep_word_sum, keep_crc32, flip_bit, first_byte,
           last_byte)


def adversarial_round(ram: Ram, rng: np.random.Generator,
                      changes=CHANGES) -> set[int]:
    """Write one round; return the pages meant to change."""
    pages = ram.pages
    n = len(pages)
    order = rng.permutation(n - 1)
    meant = set()
    # each kind of change on a few pages, and always on the last page
    for k, change in enumerate(changes):
        for p in order[k * 3:k * 3 + 3]:
            change(pages[p], rng)
            meant.add(int(p))
    change = changes[int(rng.integers(len(changes)))]
    change(pages[n - 1], rng)
    meant.add(n - 1)
    # writes that leave pages as they were: the same value rewritten,
    # and a change undone within the epoch
    rest = order[len(changes) * 3:]
    same, undone = int(rest[0]), int(rest[1])
    pages[same] = pages[same].copy()
    before = pages[undone].copy()
    flip_bit(pages[undone], rng)
    pages[undone] = before
    return meant


def missed_pages(tracker: trackers.DirtyTracker, ram: Ram, rounds: int,
                 seed: int = 0, changes=CHANGES) -> list[tuple[int, set]]:
    """Run ``rounds`` against ``tracker``; the rounds' misses (pages
    changed and not reported, or a mirror that differs from RAM)."""
    rng = np.random.default_rng(seed)
    ram.pages[:] = rng.integers(0, 256, ram.pages.shape, dtype=np.uint8)
    ram.pages[::5] = 0              # zero pages, as in a fresh guest
    mirror = np.zeros_like(ram.pages)   # the secondary's image
    tracker.start()
    misses = []
    for r in range(rounds + 1):
        before = np.array(ram.pages)
        meant = adversarial_round(ram, rng, changes) if r else set()
        changed = set(np.flatnonzero(
            (ram.pages != (mirror if r == 0 else before)).any(axis=1))
            .tolist())
        assert meant <= changed, 'a change that changes nothing'
        delta = tracker.collect()
        mirror[delta.indices] = delta.pages
        reported = set(delta.indices.tolist())
        missed = changed - reported
        if missed or not np.array_equal(mirror, ram.pages):
            misses.append((r, missed))
    tracker.close()
    return misses


class ContentTrackerTests:
    """The rounds, for one content tracker (``tracker`` set by the
    subclass)."""

    tracker: type[trackers.DirtyTracker]

    def make(self, ram: Ram) -> trackers.DirtyTracker:
        tracker = self.tracker(ram.path, ram.size, 0)
        tracker.CHUNK = 10          # chunk edges inside RAM
        return tracker

    def test_no_written_page_is_missed(self):
        ram = Ram(self)
        self.assertEqual([], missed_pages(self.make(ram), ram, ROUNDS))

    def test_only_changed_pages_are_reported(self):
        # A page rewritten with its own value, or changed and changed
        # back, is not shipped: exactly the changed pages are reported.
        ram = Ram(self)
        rng = np.random.default_rng(7)
        ram.pages[:] = rng.integers(0, 256, ram.pages.shape, np.uint8)
        tracker = self.make(ram)
        tracker.start()
        tracker.collect()
        for _ in range(20):
            before = np.array(ram.pages)
            adversarial_round(ram, rng)
            changed = np.flatnonzero((ram.pages != before).any(axis=1))
            self.assertEqual(sorted(changed.tolist()),
                             sorted(tracker.collect().indices.tolist()))
        ram.pages[3] = ram.pages[3].copy()
        self.assertEqual(0, len(tracker.collect().indices))
        tracker.close()

    def test_first_collect_ships_non_zero_pages_then_copies(self):
        ram = Ram(self)
        ram.pages[3, 0] = 1
        ram.pages[PAGES - 1, PAGE_SIZE - 1] = 2
        tracker = self.make(ram)
        tracker.start()
        self.assertEqual([3, PAGES - 1],
                         sorted(tracker.collect().indices.tolist()))
        self.assertEqual(0, len(tracker.collect().indices))
        ram.pages[40, 100] = 9
        ram.pages[3, 0] = 0         # back to zero is a change too
        delta = tracker.collect()
        order = np.argsort(delta.indices)
        self.assertEqual([3, 40], delta.indices[order].tolist())
        ram.pages[40, 100] = 77     # the delta holds copies
        self.assertEqual(9, delta.pages[order][1][100])
        self.assertEqual(0, delta.pages[order][0][0])
        tracker.close()


class HashTrackerTest(ContentTrackerTests, unittest.TestCase):
    tracker = trackers.HashTracker

    def test_keeps_under_two_percent_of_ram(self):
        ram = Ram(self, pages=1024)
        tracker = self.make(ram)
        tracker.start()
        self.assertLessEqual(tracker.state_bytes, 0.02 * ram.size)
        self.assertGreater(tracker.state_bytes, 0)
        tracker.close()

    def test_hashes_are_keyed_per_tracker(self):
        # Each tracker draws its own secret: the guest cannot know which
        # contents collide.
        ram = Ram(self, pages=1)
        ram.pages[0, :] = 7
        a, b = self.make(ram), self.make(ram)
        c = trackers._pagehash_module()
        self.assertNotEqual(c.page_hash(ram.map, a._secret),
                            c.page_hash(ram.map, b._secret))
        self.assertEqual(16, len(c.page_hash(ram.map, a._secret)))
        a.close()
        b.close()


class ScanTrackerRoundsTest(ContentTrackerTests, unittest.TestCase):
    tracker = trackers.ScanTracker


class PageHashBoundsTest(unittest.TestCase):
    """The extension checks what it is given before touching memory."""

    def setUp(self):
        self.c = trackers._pagehash_module()
        self.secret = os.urandom(192)
        self.ram = bytes(4 * PAGE_SIZE)
        self.hashes = np.zeros((4, 2), np.uint64)
        self.found = np.zeros(4, np.uint32)

    def test_page_range(self):
        for first, last in ((0, 5), (-1, 2), (3, 2)):
            self.assertRaisesRegex(ValueError, 'not in RAM of 4 pages',
                                   self.c.hash_pages, self.ram, self.hashes,
                                   self.secret, first, last, self.found)
        self.assertEqual(4, self.c.hash_pages(
            self.ram, self.hashes, self.secret, 0, 4, self.found))

    def test_short_buffers_and_secret(self):
        self.assertRaisesRegex(ValueError, 'too short', self.c.hash_pages,
                               self.ram, self.hashes[:3], self.secret, 0, 4,
                               self.found)
        self.assertRaisesRegex(ValueError, 'too short', self.c.hash_pages,
                               self.ram, self.hashes, self.secret, 0, 4,
                               self.found[:2])
        self.assertRaisesRegex(ValueError, 'secret', self.c.page_hash,
                               self.ram, b'short')
        self.assertRaisesRegex(ValueError, 'too short', self.c.copy_pages,
                               self.ram, np.array([0, 1], np.uint32),
                               np.zeros((1, PAGE_SIZE), np.uint8),
                               self.hashes, self.secret)

    def test_index_beyond_ram(self):
        self.assertRaisesRegex(ValueError, 'page 4 is not in RAM',
                               self.c.copy_pages, self.ram,
                               np.array([1, 4], np.uint32),
                               np.zeros((2, PAGE_SIZE), np.uint8),
                               self.hashes, self.secret)

    def test_read_only_outputs_are_refused(self):
        self.assertRaises(TypeError, self.c.hash_pages, self.ram,
                          bytes(64), self.secret, 0, 4, self.found)


class _ChecksumTracker(trackers.DirtyTracker):
    """A tracker on a weak per-page checksum, to prove the rounds catch
    one: what the rounds are for."""

    checksum = staticmethod(lambda page: 0)

    def start(self) -> None:
        self._sums = [self.checksum(bytes(PAGE_SIZE))] * len(self.ram)

    def collect(self) -> RamDelta:
        found = []
        for i, page in enumerate(self.ram):
            s = self.checksum(page.tobytes())
            if s != self._sums[i]:
                self._sums[i] = s
                found.append(i)
        indices = np.array(found, np.uint32)
        return RamDelta(indices, self.ram[indices].copy())


def word_sum(page) -> int:
    """The sum of a page's 8-byte words, mod 2^64."""
    return int(np.frombuffer(page, np.uint64).sum(dtype=np.uint64))


class _SumTracker(_ChecksumTracker):
    checksum = staticmethod(word_sum)


class _CrcTracker(_ChecksumTracker):
    checksum = staticmethod(zlib.crc32)


class WeakChecksumsAreCaughtTest(unittest.TestCase):

    def test_a_word_sum_misses_swaps_and_moved_bytes(self):
        for change in (swap_words, keep_word_sum):
            ram = Ram(self)
            misses = missed_pages(_SumTracker(ram.path, ram.size, 0), ram,
                                  5, changes=(change,))
            self.assertEqual(5, len(misses), change.__name__)

    def test_a_crc_misses_crc_keeping_changes(self):
        ram = Ram(self)
        misses = missed_pages(_CrcTracker(ram.path, ram.size, 0), ram, 5,
                              changes=(keep_crc32,))
        self.assertEqual(5, len(misses))
        # and the pages it missed were changed
        self.assertTrue(all(missed for _, missed in misses))

    def test_the_changes_keep_what_they_claim(self):
        rng = np.random.default_rng(3)
        for _ in range(50):
            page = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
            for change, same in ((swap_words, word_sum),
                                 (keep_word_sum, word_sum),
                                 (keep_crc32, lambda p: zlib.crc32(p))):
                changed = page.copy()
                change(changed, rng)
                self.assertFalse(np.array_equal(page, changed))
                self.assertEqual(same(page), same(changed),
                                 change.__name__)
