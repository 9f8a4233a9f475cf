"""When the primary's next checkpoint is due: soon after the guest's
first held packet, never so often that pauses starve the guest.

A packet the guest sends waits for its epoch's commit, so a talking
guest's epoch should end soon after its first packet: ``output_batch_ms``
later (the reply's other segments and other clients' packets join it),
or, while the guest's QEMU is still busy then (:mod:`.activity`: it
computes, or flushes a disk write, the rest of an answer still to come),
once it goes quiet, waiting at most as long as a pause lasts. Ending the
epoch while the guest is busy would pause it in mid-answer and leave the
answer for the next commit: a whole pause, ship and ACK later. A guest
busy with something else (a job beside its service) never goes quiet:
waits that end at their bound with no more output shorten the next
(down to a quarter pause), and waits that pay lengthen them again. A silent
epoch keeps nobody waiting and runs on to ``idle_epoch_ms``. Two bounds
keep a chatty guest running:

* ``min_epoch_ms``: from one checkpoint's start to the next's, at least;
* ``max_pause_percent``: the share of the time the guest wants to run
  that it loses to pauses. Each pause is charged to a budget that
  refills at that share of wall time (a second's worth at most, for
  bursts), weighted by how busy the guest's QEMU was while it ran (its
  CPU time from the last pause's end to this one's start, the pause's
  own work left out: a guest waiting for its next request loses
  nothing by being paused, a busy one all of it); the next checkpoint
  waits until the budget holds what the last ones cost. Pauses grow
  with the pages the guest dirties, so a busy guest that dirties more
  gets longer epochs.

Neither bound stretches an epoch that holds output past ``epoch_ms``
(the old fixed epoch: the latency protection adds stays bounded). A due
checkpoint waits briefly for an ACK expected within half its pause
(:meth:`Cadence.ack_wait`): QEMU sends nothing while the guest is
stopped, so that ACK's output would wait out the pause::

    policy = EpochPolicy(output_batch_ms=2, min_epoch_ms=10,
                         max_pause_percent=25)
    cadence = Cadence(policy, clock, epoch_s=0.2, idle_s=1.0,
                      guest_busy=QemuActivity(qemu_pid).busy)
    await cadence.wait_due(output.waiting, frames)     # then checkpoint
    cadence.checkpoint_taken(started, pause_s, (cpu_before, cpu_after))
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Callable
from typing import Optional

from mftvm_openstack.contract.limits import (
    MIN_EPOCH_MS_RANGE,
    OUTPUT_BATCH_MS_RANGE,
    PAUSE_PERCENT_RANGE,
)
from mftvm_openstack.ft.pair.interfaces import Clock

#: seconds of pause budget a guest may save up, times the share
BURST_S = 1.0
#: weight of the newest epoch in the expected charge
PAUSE_WEIGHT = 0.3
#: how often a held epoch looks whether the guest has gone quiet
QUIET_POLL_S = 0.001
#: looks in a row that must find it quiet (one may fall between two of
#: its threads' turns: the vCPU handing a disk write to a worker)
QUIET_LOOKS = 2
#: how long an epoch that holds output waits for a busy guest to go
#: quiet, in pauses: waiting costs its packets that long, ending it costs
#: the rest of the answer a pause and a commit
HOLD_PAUSES = 1.0
#: the least share of that wait kept for a guest whose waits did not pay
#: (it stayed busy and sent nothing more): its answers may still come
HOLD_FLOOR = 0.25
#: the kernel's CPU time unit
CLK_TCK = os.sysconf('SC_CLK_TCK')


def process_cpu_seconds(pid: int) -> Optional[float]:
    """CPU time (user + system) process ``pid`` has used; None if it
    cannot be read."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            # after the command name, which may hold spaces and ')'
            fields = f.read().rsplit(')', 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class EpochPolicy:
    """How an epoch that holds output is cut short (ms, percent); the
    machine's ``epoch_ms`` and ``idle_epoch_ms`` stay its longest."""

    #: an epoch that holds output ends this long after its first packet
    output_batch_ms: int = 2
    #: shortest epoch, checkpoint start to checkpoint start
    min_epoch_ms: int = 10
    #: most of the time the guest spends paused, in percent
    max_pause_percent: int = 25

    def __post_init__(self) -> None:
        for name, (low, high) in (
                ('output_batch_ms', OUTPUT_BATCH_MS_RANGE),
                ('min_epoch_ms', MIN_EPOCH_MS_RANGE),
                ('max_pause_percent', PAUSE_PERCENT_RANGE)):
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f'{name}: must be an integer from {low} '
                                 f'to {high} (got {value!r})')

    @property
    def batch_s(self) -> float:
        return self.output_batch_ms / 1000

    @property
    def min_s(self) -> float:
        return self.min_epoch_ms / 1000

    @property
    def share(self) -> float:
        return self.max_pause_percent / 100


class PauseBudget:
    """Run time the guest may still lose to pauses: refilled at
    ``share`` of wall time, at most ``share * BURST_S`` saved up."""

    def __init__(self, share: float, now: float) -> None:
        self.share = share
        self.cap = share * BURST_S
        self.credit = self.cap
        self._at = now
        #: what the next pause is expected to cost (the last ones' mean)
        self.expected = 0.0
        #: how busy the guest was while it ran (CPU time / run time, 0-1)
        self.busy = 1.0
        # the guest's CPU time and the time at the last pause's end
        self._cpu: Optional[float] = None
        self._ended = now

    def _refill(self, now: float) -> None:
        self.credit = min(self.cap,
                          self.credit + self.share * max(0.0, now - self._at))
        self._at = max(self._at, now)

    def spend(self, started: float, pause_s: float, now: float,
              cpu: tuple[Optional[float], Optional[float]] = (None, None)
              ) -> None:
        """A pause began at ``started``, lasted ``pause_s`` and ended at
        ``now``; ``cpu``: the guest's CPU time as it began and as it
        ended (None: unknown, counted busy)."""
        self._refill(now)
        before, after = cpu
        if before is None or self._cpu is None:
            busy = 1.0
        else:
            # Only the run since the last pause counts: the pause's own
            # CPU (QEMU saving device state) is not the guest wanting to
            # run, and read with it a guest idle between its clients'
            # requests looked busy.
            ran = max(started - self._ended, 1e-3)
            busy = min(1.0, max(0.0, (before - self._cpu) / ran))
        self._cpu, self._ended = after, now
        self.busy += PAUSE_WEIGHT * (busy - self.busy)
        cost = pause_s * self.busy
        self.credit -= cost
        self.expected += PAUSE_WEIGHT * (cost - self.expected)

    def ready_at(self, now: float) -> float:
        """When the budget holds the expected pause."""
        self._refill(now)
        short = self.expected - self.credit
        return now if short <= 0 else now + short / self.share


class Cadence:
    """Times one protection's checkpoints by an :class:`EpochPolicy`:
    an epoch that holds output lasts at most ``epoch_s``, a silent one
    ``idle_s``."""

    def __init__(self, policy: EpochPolicy, clock: Clock, *,
                 epoch_s: float, idle_s: float,
                 guest_busy: Optional[Callable[[], Optional[bool]]] = None
                 ) -> None:
        self.policy = policy
        self.clock = clock
        #: whether the guest's QEMU is busy now (None: cannot tell)
        self.guest_busy = guest_busy
        self.epoch_s = epoch_s
        self.idle_s = max(idle_s, epoch_s)
        now = clock.monotonic()
        self.budget = PauseBudget(policy.share, now)
        # when the current epoch began (the last checkpoint's start)
        self._began = now
        # the last pauses' and ACKs' (shipped -> ACK) mean, in seconds
        self._pause_s = 0.0
        self._ack_s: Optional[float] = None
        # how often waiting for a busy guest to go quiet paid (0-1)
        self._hold_pays = 1.0

    def due(self, first_output: float) -> float:
        """When an epoch whose first packet came at ``first_output``
        ends."""
        p = self.policy
        due = max(first_output + p.batch_s, self._began + p.min_s,
                  self.budget.ready_at(first_output))
        return min(due, self._longest(first_output))

    def _longest(self, first_output: float) -> float:
        # (a packet late in a long silent epoch still gets its batch)
        return max(self._began + self.epoch_s,
                   first_output + self.policy.batch_s)

    def quiet_by(self, first_output: float) -> float:
        """The latest an epoch whose first packet came at
        ``first_output`` waits for a busy guest to go quiet: a pause
        (the last ones' mean) after the packet, never before
        :meth:`due` nor past ``epoch_s``."""
        hold = first_output + max(
            self.policy.batch_s,
            HOLD_PAUSES * self.pause_s * max(HOLD_FLOOR, self._hold_pays))
        return max(self.due(first_output),
                   min(hold, self._longest(first_output)))

    async def wait_due(self, waiting: asyncio.Event,
                       frames: Optional[Callable[[], int]] = None) -> None:
        """Until the current epoch should end; ``waiting`` is set while
        the epoch holds output, ``frames()`` counts the frames the guest
        has sent (whether waiting for it to go quiet paid)."""
        rest = self._began + self.idle_s - self.clock.monotonic()
        if not waiting.is_set():
            with contextlib.suppress(TimeoutError):
                await self.clock.wait_for(waiting.wait(), max(0.0, rest))
        now = self.clock.monotonic()
        if waiting.is_set():
            await self.clock.sleep(self.due(now) - now)
            await self._until_quiet(self.quiet_by(now), frames)
        # (a checkpoint that is then not taken still ends the epoch: the
        # next waits its own length, never in a busy loop)
        self._began = self.clock.monotonic()

    async def _until_quiet(self, end: float,
                           frames: Optional[Callable[[], int]]) -> None:
        """Until the guest's QEMU is quiet (:data:`QUIET_LOOKS` looks in
        a row) or ``end``; at once if nobody can tell. A wait that found
        the guest busy paid if it went quiet, or sent more, meanwhile."""
        quiet, looks = 0, 0
        sent = frames() if frames is not None else 0
        while self.guest_busy is not None:
            busy = self.guest_busy()
            if busy is None:
                return
            looks += 1
            quiet = 0 if busy else quiet + 1
            if quiet >= QUIET_LOOKS:
                if looks > QUIET_LOOKS:
                    self._waited(paid=True)
                return
            if self.clock.monotonic() >= end:
                if looks > 1:       # (it did wait)
                    self._waited(paid=frames is None or frames() > sent)
                return
            await self.clock.sleep(
                min(QUIET_POLL_S, end - self.clock.monotonic()))

    def _waited(self, paid: bool) -> None:
        self._hold_pays += PAUSE_WEIGHT * (float(paid) - self._hold_pays)

    @property
    def pause_s(self) -> float:
        """What the last pauses took (their mean, seconds)."""
        return self._pause_s

    def ack_took(self, seconds: float) -> None:
        """An ACK came ``seconds`` after its checkpoint was shipped."""
        self._ack_s = seconds if self._ack_s is None else (
            self._ack_s + PAUSE_WEIGHT * (seconds - self._ack_s))

    def ack_wait(self, shipped: float) -> float:
        """How long a due checkpoint should wait for the ACK of a shipped
        epoch (shipped at ``shipped``) whose output is held.

        QEMU sends nothing while the guest is stopped, so an ACK that
        comes during the next pause frees its output only as the pause
        ends. Due within half a pause, it is worth waiting for (at most
        that long): its output leaves up to a pause sooner, the next
        epoch's later by less. Due later, the pause would be over by
        then, and waiting only delays the next epoch."""
        if self._ack_s is None:
            return 0.0
        half = self.pause_s / 2
        due = shipped + self._ack_s - self.clock.monotonic()
        return half if due <= half else 0.0

    def checkpoint_taken(
            self, started: float, pause_s: float,
            guest_cpu: tuple[Optional[float], Optional[float]] = (None, None)
    ) -> None:
        """A checkpoint began at ``started`` and paused the guest
        ``pause_s`` seconds; ``guest_cpu``: the CPU time its QEMU had
        used as the checkpoint began and now (None: unknown)."""
        self._began = started
        # (from 0: the first, of all RAM, weighs little)
        self._pause_s += PAUSE_WEIGHT * (pause_s - self._pause_s)
        self.budget.spend(started, pause_s, self.clock.monotonic(),
                          guest_cpu)
