"""Failover across agents, measured run after run, beside a reboot.

Three "hosts" (network namespaces, ``tests/integration/lab.py``) run a
real ``mftvm-agent`` each, with RabbitMQ and Redis in a fourth (or, with
``--backend etcd``, fencing on a 3-member etcd cluster whose members are
three more namespaces). One guest
is protected; then, ``--runs`` times: the host that runs it dies whole
(its link cut, then SIGKILL of every process in its namespace: no FIN or
RST reaches the secondary, as with a power loss), the guest goes on at its
secondary, the dead host's agent is started again, and the guest is
re-protected onto the next host. For each run it records, on the
system-wide monotonic clock:

* detection: kill → the secondary declares its primary lost;
* fence wait: → the secondary won the guest's lease (the rest of the dead
  primary's lease, ``[fencing] lease``);
* restore: → the restored guest runs;
* answer: kill → the guest's next answer to an external client, which
  must be exactly last-seen + 1.

The baseline is what recovery without replication costs at the very
least (Masakari's evacuation): booting the same guest afresh until its
service answers — and its memory is lost. Usage::

    .venv/bin/python benchmarks/agent_failover.py [--runs 10] \\
        [--lease 3] [--backend redis|etcd] [--out FILE]

(results in ``benchmarks/results-agent.json``, or
``results-agent-etcd.json`` for etcd.)

Needs root, and what ``tools/run.sh test`` installs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import fixtures

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from mftvm_openstack.agent import rpcapi  # noqa: E402
from mftvm_openstack.ft import vm  # noqa: E402
from mftvm_openstack.ft.monitor import QMPMonitor  # noqa: E402
from mftvm_openstack.images import builder, workload  # noqa: E402
from mftvm_openstack.local import demo, operations  # noqa: E402
from tests.integration import lab as ftlab  # noqa: E402

HOSTS = ('h1', 'h2', 'h3')
ETCD_MEMBERS = ('e1', 'e2', 'e3')


def summary(values: list[float]) -> dict[str, float]:
    return {'median': round(statistics.median(values), 1),
            'min': round(min(values), 1), 'max': round(max(values), 1)}


class AgentBench(fixtures.Fixture):
    def __init__(self, lease: int, backend: str = 'redis') -> None:
        super().__init__()
        self.lease = lease
        self.backend = backend

    def _setUp(self) -> None:
        self.image = builder.build_guest_image(demo.cache_dir())
        etcd = self.backend == 'etcd'
        self.lab = self.useFixture(ftlab.Lab(
            HOSTS + ETCD_MEMBERS if etcd else HOSTS))
        self.rabbit = self.useFixture(ftlab.RabbitMQ(self.lab))
        self.fencing: ftlab.Redis | ftlab.EtcdCluster = self.useFixture(
            ftlab.EtcdCluster(self.lab, ETCD_MEMBERS) if etcd
            else ftlab.Redis(self.lab))
        self.tmp = tempfile.mkdtemp(prefix='mftvm-agentbench-',
                                    dir='/var/tmp')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.name = f'bench{os.getpid()}'
        self.addCleanup(self._remove_ram)
        for host in HOSTS:
            self.start_agent(host)
        self.api = rpcapi.AgentAPI(
            rpcapi.get_transport(url=self.rabbit.url), timeout=10)
        for host in HOSTS:
            ftlab.wait_for(lambda h=host: self._answers(h), 60, 0.5,
                           f'agent {host}')

    def _remove_ram(self) -> None:
        for host in HOSTS:
            try:
                os.unlink(vm.ram_path(self.name, host))
            except OSError:
                pass

    def start_agent(self, host: str) -> None:
        ftlab.start_agent(self.lab, host, self.tmp, self.rabbit,
                          self.fencing, lease=self.lease, peers=HOSTS)

    def _answers(self, host: str) -> bool:
        try:
            self.api.list({}, host)
            return True
        except Exception:
            return False

    def status(self, host: str) -> dict[str, Any]:
        try:
            return self.api.status({}, host, self.name)
        except Exception:
            return {}

    def side_file(self, host: str, role: str) -> dict[str, Any]:
        path = os.path.join(self.tmp, host, 'instances', self.name, role,
                            'status.json')
        try:
            with open(path) as f:
                data: dict[str, Any] = json.load(f)
                return data
        except (OSError, ValueError):
            return {}

    def spec(self, port: int) -> vm.GuestSpec:
        disk = os.path.join(self.tmp, 'disk.raw')
        with open(disk, 'wb') as f:
            f.truncate(64 << 20)
        return operations.make_spec(
            self.name, self.image.kernel, self.image.initrd, disk,
            append='console=ttyS0 quiet mftvm.run=writer,counter '
                   'mftvm.writer_interval_ms=50', memory_mib=128,
            nic=f'user,hostfwd=tcp:0.0.0.0:{port}-:7000')

    def run(self, runs: int) -> list[dict[str, float]]:
        port = demo.free_port()
        self.api.protect({}, 'h1', self.name, self.spec(port).to_json(),
                         {'epoch_ms': 200}, secondary_host='h2')
        primary, secondary = 'h1', 'h2'
        serial = os.path.join(self.tmp, 'h1', 'instances', self.name,
                              'primary', 'serial.log')
        ftlab.wait_for(lambda: 'COUNTER-READY' in workload.read_text(
            serial), 90, 0.2, 'the counter service')
        last = workload.counter_request(self.lab.ip(primary), port, 10)
        results = []
        for n in range(runs):
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                got = workload.counter_request(self.lab.ip(primary), port)
                if got is not None:
                    assert got == last + 1, (got, last)
                    last = got
            # Power off: the link goes first, so no FIN or RST tells the
            # secondary; it has only the silence to go by.
            killed = time.monotonic()
            self.lab.link_down(primary)
            self.lab.kill_all(primary)
            got = ftlab.wait_for(lambda s=secondary: workload.counter_request(
                self.lab.ip(s), port, 2), 60, 0, 'the answer')
            answered = time.monotonic()
            if got != last + 1:
                raise RuntimeError(f'run {n}: answer {got} after {last}: '
                                   f'output commit broken')
            last = got
            take = ftlab.wait_for(lambda s=secondary: (
                t := self.side_file(s, 'secondary').get('takeover', {})).get(
                    'resumed') and t, 10, what='takeover')
            row = {
                'detect_ms': (take['detected'] - killed) * 1000,
                'fence_wait_ms': (take['fenced'] - take['detected']) * 1000,
                'restore_ms': (take['resumed'] - take['fenced']) * 1000,
                'answer_ms': (answered - killed) * 1000,
            }
            results.append({k: round(v, 1) for k, v in row.items()})
            print(f'run {n + 1}: {primary} killed; on {secondary}: '
                  + ', '.join(f'{k} {v:.0f}' for k, v in row.items()),
                  flush=True)
            # The dead host comes back (an empty agent); the survivor
            # re-protects the guest onto the next host.
            self.lab.link_up(primary)
            self.start_agent(primary)
            st = ftlab.wait_for(lambda s=secondary: (
                x := self.status(s)).get('state') == 'protected' and x.get(
                    'last_committed_epoch', 0) >= 1 and x, 180, 0.5,
                'reprotection')
            primary, secondary = secondary, st['peer']
        return results


async def boot_to_answer(image: builder.GuestImage, tmp: str) -> float:
    """The baseline: a fresh guest, from QEMU start to its first answer."""
    port = demo.free_port()
    disk = os.path.join(tmp, 'boot.raw')
    with open(disk, 'wb') as f:
        f.truncate(64 << 20)
    spec = operations.make_spec(
        'bootbase', image.kernel, image.initrd, disk,
        append='console=ttyS0 quiet mftvm.run=counter', memory_mib=128,
        nic=f'user,hostfwd=tcp:127.0.0.1:{port}-:7000')
    paths = vm.Paths(os.path.join(tmp, 'boot'))
    os.makedirs(paths.root, exist_ok=True)
    ram = vm.ram_path('bootbase', str(os.getpid()))
    with open(ram, 'wb') as f:
        f.truncate(spec.memory_bytes)
    started = time.monotonic()
    qemu = await vm.ChildProcess.start(vm.qemu_argv(spec, paths, ram),
                                       paths.log)
    try:
        monitor = await QMPMonitor.connect(paths.qmp, 'boot')
        await asyncio.to_thread(
            ftlab.wait_for, lambda: 'COUNTER-READY' in workload.read_text(
                paths.serial), 90, 0.02, 'boot')
        await asyncio.to_thread(workload.counter_request, '127.0.0.1', port,
                                10)
        took = time.monotonic() - started
        await monitor.close()
    finally:
        await qemu.kill()
        os.unlink(ram)
    return took * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=10)
    parser.add_argument('--lease', type=int, default=3)
    parser.add_argument('--backend', choices=['redis', 'etcd'],
                        default='redis')
    parser.add_argument('--out', default='')
    args = parser.parse_args()
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        'results-agent.json' if args.backend == 'redis'
        else f'results-agent-{args.backend}.json')
    bench = AgentBench(args.lease, args.backend)
    with bench:
        rows = bench.run(args.runs)
        boots = [asyncio.run(boot_to_answer(bench.image, bench.tmp))
                 for _ in range(3)]
    report = {
        'runs': rows, 'lease_s': args.lease, 'backend': args.backend,
        'summary': {k: summary([r[k] for r in rows]) for k in rows[0]},
        'baseline_reboot_to_answer_ms': summary(boots),
    }
    ours = report['summary']['answer_ms']['median']
    base = report['baseline_reboot_to_answer_ms']['median']
    report['ratio_answer_vs_reboot'] = round(ours / base, 2)
    print(json.dumps(report['summary'], indent=1))
    print(f'kill -> next answer (median): ours {ours:.0f} ms, reboot '
          f'elsewhere >= {base:.0f} ms (state lost): ratio '
          f'{ours / base:.2f}')
    with open(out, 'w') as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
