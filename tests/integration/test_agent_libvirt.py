"""Agents protect a libvirt domain the way Nova asks them to.

A libvirt domain runs the guest (as ``LibvirtDriver.spawn`` would have
started it); h1's agent is asked to protect it with the spec
``FTLibvirtDriver`` sends (:func:`mftvm_openstack.nova.driver.domain_spec`:
the instance's uuid and domain name, no kernel or disk). Then h1 dies
whole, the domain's QEMU with it: h2's agent restores the guest as a
libvirt domain of the same name — what Nova on h2 expects to find — and
re-protects it onto h3 from that restored domain.

One libvirtd (in the root namespace) plays libvirt on every "host"; the
agents and their instance processes run in the hosts' namespaces and
reach it over its unix socket.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

from mftvm_openstack.agent import exception
from mftvm_openstack.images import workload
from mftvm_openstack.local import demo, operations
from tests.functional import base, test_libvirt
from tests.integration.test_agent_failover import AgentLab

URI = test_libvirt.URI


class AgentLibvirtTest(AgentLab):

    def setUp(self) -> None:
        self.domain = f'instance-{os.getpid():08x}'
        # Registered first, so it runs last: once the lab's hosts are
        # gone. Destroyed earlier, the domain would count as a lost
        # primary, and the secondary would restore it once more.
        self.addCleanup(self._destroy)
        super().setUp()
        # Nova's shape: the instance is its uuid, which is its domain's
        # uuid too (the agent adopts only the instance's own domain)
        self.name = str(uuid.uuid4())
        import libvirt
        self.useFixture(test_libvirt.LibvirtDaemons())
        self.conn = libvirt.open(URI)
        self.addCleanup(self.conn.close)

    def _destroy(self) -> None:
        import libvirt
        try:
            conn = libvirt.open(URI)
        except libvirt.libvirtError:
            return      # no libvirtd: nothing can run
        try:
            conn.lookupByName(self.domain).destroy()
        except libvirt.libvirtError:
            pass    # gone already
        finally:
            conn.close()

    def start_domain(self, port: int) -> int:
        """Start the guest as a libvirt domain; return the counter's first
        answer."""
        disk = os.path.join(self.tmp, 'disk.raw')
        with open(disk, 'wb') as f:
            f.truncate(64 << 20)
        spec = operations.make_spec(
            self.domain, self.image.kernel, self.image.initrd, disk,
            append='console=ttyS0 quiet mftvm.run=writer,counter '
                   'mftvm.writer_interval_ms=50',
            memory_mib=128,
            nic=f'user,hostfwd=tcp:127.0.0.1:{port}-:7000')
        serial = os.path.join(self.tmp, 'domain-serial.log')
        test_libvirt.start_domain(self.conn, spec, serial, uuid=self.name)
        base.wait_for(lambda: 'COUNTER-READY' in workload.read_text(serial),
                      90, 0.2, 'the guest counter service')
        first = workload.counter_request('127.0.0.1', port, 10)
        self.assertIsNotNone(first)
        return first

    def talk_local(self, port: int, last: int, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            got = workload.counter_request('127.0.0.1', port, 15)
            if got is not None:
                self.assertEqual(last + 1, got)
                last = got
        return last

    def domain_pid(self) -> int:
        with open(f'/run/libvirt/qemu/{self.domain}.pid') as f:
            return int(f.read())

    def test_nova_spec_protects_domain_and_failover_lands_in_libvirt(self):
        import libvirt

        port = demo.free_port()
        last = self.start_domain(port)
        # What FTLibvirtDriver sends (nova.driver.domain_spec; tests/nova
        # checks the driver sends exactly this shape), plus the port
        # forward: the lab's guest has user-mode networking, whose
        # forwards (added through the monitor) are not in the domain XML;
        # and the kernel and initrd it boots: a secondary starts no kernel
        # the wire names, only those of its own spec (a Nova guest that
        # boots from its disk has none).
        spec = {'name': self.name, 'domain': self.domain,
                'memory_mib': 128, 'smp': 1,
                'kernel': self.image.kernel, 'initrd': self.image.initrd,
                'forwards': [{'host_addr': '127.0.0.1', 'host_port': port,
                              'guest_port': 7000}]}
        # Another instance cannot adopt this one's domain.
        other = str(uuid.uuid4())
        refused = self.assertRaises(
            exception.Conflict, self.api.protect, {}, 'h1', other,
            dict(spec, name=other), {'epoch_ms': 200}, secondary_host='h2')
        self.assertIn(f"is not instance {other}'s own", str(refused))
        self.api.protect({}, 'h1', self.name, spec, {'epoch_ms': 200},
                         secondary_host='h2')
        st = self.status('h1')
        self.assertEqual(('protected', 'h2'), (st['state'], st['peer']))
        self.assertEqual(self.domain_pid(), st['qemu_pid'])
        last = self.talk_local(port, last, 2)

        # h1 dies: its namespace, and the domain's QEMU on it.
        old_pid = self.domain_pid()
        os.kill(old_pid, signal.SIGKILL)
        self.lab.kill_all('h1')
        killed = time.monotonic()
        got = base.wait_for(
            lambda: workload.counter_request('127.0.0.1', port, 15), 90, 0,
            'an answer from the guest restored on h2')
        took = time.monotonic() - killed
        self.assertEqual(last + 1, got)
        last = got
        # It runs on as a libvirt domain of the same name, once.
        dom = self.conn.lookupByName(self.domain)
        self.assertEqual(libvirt.VIR_DOMAIN_RUNNING, dom.state()[0])
        self.assertNotEqual(old_pid, self.domain_pid())
        # ...and h2 protects it again, onto h3, from that domain.
        st = base.wait_for(
            lambda: (s := self.status('h2')).get('state') == 'protected'
            and s.get('last_committed_epoch', 0) >= 1 and s, 120, 0.5,
            'the restored domain to be re-protected from h2')
        self.assertEqual('h3', st['peer'])
        self.assertEqual(self.domain_pid(), st['qemu_pid'])
        last = self.talk_local(port, last, 1)
        print(f'libvirt domain via agents: kill -> next answer '
              f'{took * 1000:.0f} ms')
