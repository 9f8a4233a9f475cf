"""What a failed e2e test leaves behind: the lab's logs and state, kept.

The lab (and its directory) goes when the test process exits, so a
failure must copy what explains it first. :func:`keep_on_failure`
registers that copy for one test; on a failure it writes, under
``build/e2e-artifacts/<test id>/`` (``$MFTVM_E2E_ARTIFACTS`` if set),
and names the directory in the test's ``diagnostics`` detail (printed
with the failure)::

    def test_power_off(self):
        diagnostics.keep_on_failure(self)       # first thing
        ...

What it keeps (:func:`collect`):

* ``log/``: every log of the lab (the control plane's services, each
  host's nova-compute and mftvm-agent) and ``hosts/<host>/log/`` (Open
  vSwitch, ovn-controller, libvirt's and QEMU's logs);
* ``run-mftvm/<host>/``: the ``*.log`` and ``*.json`` of every instance
  process of each host still up (each side's host log, status and
  guest options, read from the host's private ``/run/mftvm`` through
  its mount namespace; a powered-off host's went with it), and its
  serial console logs;
* ``state/``: OVN's northbound and southbound databases as ``show`` and
  the port bindings, chassis and logical switch ports as ``list``; per
  host still up, ``ovs-vsctl show``, its interfaces, ``virsh list`` and
  each domain's XML, and its agent's ``mftvm list``; Nova's servers,
  services, hypervisors, ports and migrations through the CLI.

``MFTVM_E2E_KEEP_LAB=1`` also keeps the lab itself up after the test
process ends (:mod:`tests.e2e.lab`), to look at by hand; take it down
then with ``.cloud-venv/bin/python tools/cloud/cloudlab.py down --dir
<dir>`` (the directory is printed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import unittest
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
#: where kept directories go
ARTIFACTS = os.environ.get('MFTVM_E2E_ARTIFACTS',
                           os.path.join(ROOT, 'build', 'e2e-artifacts'))
#: what of an instance directory is kept (never RAM or disk data)
KEPT_SUFFIXES = ('.log', '.json')
#: a single file larger than this is not copied
MAX_FILE_BYTES = 64 << 20
#: the environment switch that keeps the lab up at exit (tests.e2e.lab)
KEEP_LAB = 'MFTVM_E2E_KEEP_LAB'


def keep_lab() -> bool:
    """Whether the lab stays up after the test process ends."""
    return os.environ.get(KEEP_LAB, '') not in ('', '0')


def keep_on_failure(case: Any) -> None:
    """On a failure of ``case`` (a :class:`~tests.e2e.lab.LabTestCase`),
    :func:`collect` the lab into a directory named after the test, and
    name that directory in the ``diagnostics`` detail."""
    def on_exception(exc_info: Any) -> None:
        if issubclass(exc_info[0], unittest.SkipTest):
            return
        dest = os.path.join(ARTIFACTS, case.id())
        try:
            collect(case.lab, dest, case.env)
            said = f'the lab\'s logs and state are kept in {dest}'
        except Exception as exc:        # never hide the test's failure
            said = f'the lab\'s logs could not be kept in {dest}: {exc!r}'
        if keep_lab():
            said += (f'; the lab stays up: '
                     f'{os.path.join(lab_bin(), "python")} '
                     f'{os.path.join(ROOT, "tools", "cloud", "cloudlab.py")}'
                     f' down --dir {case.lab.dir}')
        print(said, file=sys.stderr)
        from testtools import content
        case.addDetail('diagnostics', content.text_content(said))
    case.addOnException(on_exception)


def _run(argv: list[str], out: str, env: Any = None,
         timeout: float = 60) -> None:
    """``argv``'s output (and errors) into the file ``out``."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, 'w') as f:
        f.write(f'$ {" ".join(argv)}\n')
        f.flush()
        try:
            subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT,
                           env=env, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            f.write(f'\n{exc!r}\n')


def _copy_tree(src: str, dst: str, suffixes: tuple[str, ...] = ()) -> None:
    """Regular files under ``src`` (those ending in ``suffixes`` if
    given, none larger than :data:`MAX_FILE_BYTES`) to the same places
    under ``dst``."""
    for dirpath, _, names in os.walk(src):
        for name in names:
            path = os.path.join(dirpath, name)
            if suffixes and not name.endswith(suffixes):
                continue
            try:
                if not os.path.isfile(path) or os.path.islink(path) or \
                        os.path.getsize(path) > MAX_FILE_BYTES:
                    continue
                target = os.path.join(dst, os.path.relpath(path, src))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(path, target)
            except OSError:
                continue        # (a file that went meanwhile)


def host_up(info: dict[str, Any]) -> bool:
    """Whether the compute host of ``lab.json``'s ``info`` still runs
    (its namespaces' holder, a ``sleep``, is alive)."""
    holder = info.get('holder')
    if not holder:
        return False
    try:
        with open(f'/proc/{holder}/comm') as f:
            return f.read().strip() == 'sleep'
    except OSError:
        return False


def collect(lab: Any, dest: str, env: dict[str, str]) -> str:
    """Copy the lab's logs and record its state into ``dest`` (see the
    module docstring); ``env`` is the admin's openrc. Returns ``dest``."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    _copy_tree(os.path.join(lab.dir, 'log'), os.path.join(dest, 'log'))
    # the clients' own logs of the guest's answers (ft_server.CounterLog)
    _copy_tree(lab.tmp, os.path.join(dest, 'clients'), ('.counter',))
    state = lab.state()
    hosts: dict[str, Any] = state.get('hosts', {})
    for host, info in hosts.items():
        _copy_tree(os.path.join(lab.dir, 'hosts', host, 'log'),
                   os.path.join(dest, 'log', 'hosts', host))
        if not host_up(info):
            continue
        # the host's private /run, seen through its mount namespace
        run_dir = f'/proc/{info["holder"]}/root/run/mftvm'
        _copy_tree(run_dir, os.path.join(dest, 'run-mftvm', host),
                   KEPT_SUFFIXES)
        enter = info['enter']
        out = os.path.join(dest, 'state', host)
        _run([*enter, 'ovs-vsctl', '--timeout=20', 'show'],
             os.path.join(out, 'ovs-vsctl-show.txt'))
        _run([*enter, 'ovs-vsctl', '--timeout=20', '--columns=name,type,'
              'external_ids,ofport,error,link_state', 'list', 'interface'],
             os.path.join(out, 'ovs-interfaces.txt'))
        _run([*enter, 'ip', '-d', 'addr'], os.path.join(out, 'ip-addr.txt'))
        _run([*enter, 'virsh', '-c', 'qemu:///system', 'list', '--all',
              '--uuid', '--name'], os.path.join(out, 'virsh-list.txt'))
        with open(os.path.join(out, 'virsh-list.txt')) as f:
            # ("<uuid> <name>" lines, after the command; errors aside)
            domains = [fields[1] for fields in (
                line.split() for line in f.read().splitlines()[1:])
                if len(fields) == 2 and len(fields[0]) == 36]
        for dom in domains:
            _run([*enter, 'virsh', '-c', 'qemu:///system', 'dumpxml', dom],
                 os.path.join(out, f'domain-{dom}.xml'))
        _run([os.path.join(lab_bin(), 'mftvm'), '--timeout', '10', 'list',
              '--host', host, '--json'], os.path.join(out, 'mftvm-list.json'),
             env=env)
    ovn = os.path.join(lab.dir, 'ovn')
    out = os.path.join(dest, 'state')
    sb = ['ovn-sbctl', f'--db=unix:{ovn}/ovnsb_db.sock', '--timeout=20']
    nb = ['ovn-nbctl', f'--db=unix:{ovn}/ovnnb_db.sock', '--timeout=20']
    _run([*sb, 'show'], os.path.join(out, 'ovn-sb-show.txt'))
    _run([*sb, 'list', 'Port_Binding'],
         os.path.join(out, 'ovn-sb-port-bindings.txt'))
    _run([*sb, 'list', 'Chassis'], os.path.join(out, 'ovn-sb-chassis.txt'))
    _run([*nb, 'show'], os.path.join(out, 'ovn-nb-show.txt'))
    _run([*nb, 'list', 'Logical_Switch_Port'],
         os.path.join(out, 'ovn-nb-ports.txt'))
    openstack = os.path.join(lab_bin(), 'openstack')
    for name, args in (
            ('servers', ['server', 'list', '--all-projects', '--long']),
            ('compute-services', ['compute', 'service', 'list']),
            ('hypervisors', ['hypervisor', 'list', '--long']),
            ('ports', ['port', 'list', '--long']),
            ('migrations', ['--os-compute-api-version', '2.80', 'server',
                            'migration', 'list'])):
        _run([openstack, *args, '-f', 'json'],
             os.path.join(out, f'{name}.json'), env=env)
    # each server's and each guest or probe port's whole record
    # (binding host, status, ft_status)
    for name, listing, key, keep in (
            ('server', 'servers', 'ID', lambda _: True),
            ('port', 'ports', 'ID', lambda p: not str(
                p.get('Device Owner') or '').startswith('network:'))):
        try:
            with open(os.path.join(out, f'{listing}.json')) as f:
                rows = json.loads(f.read().split('\n', 1)[1])
        except (OSError, ValueError, IndexError):
            continue
        for row in rows:
            if isinstance(row, dict) and row.get(key) and keep(row):
                _run([openstack, name, 'show', row[key], '-f', 'json'],
                     os.path.join(out, name, f'{row[key]}.json'), env=env)
    return dest


def lab_bin() -> str:
    """``.cloud-venv/bin``, where the CLIs the lab serves are."""
    return os.path.join(ROOT, '.cloud-venv', 'bin')
