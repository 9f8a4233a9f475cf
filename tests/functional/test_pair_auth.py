"""Only the pair's own primary gets a secondary, or its replica.

A real pair over TCP on 127.0.0.1 (as between two hosts), its primary
held back a few seconds (``start_delay``) so that intruders reach the
secondary's data port first: plain TCP with a well-formed HELLO, TLS with
a stranger's self-signed certificate, TLS with a valid certificate of
another pair. Each is closed and logged, the secondary keeps waiting, and
the real primary then protects the guest and fails over as ever. Then the
replica's NBD export refuses clients without the primary's certificate.
"""

import os
import re
import subprocess
import tempfile
import threading

from mftvm_openstack.contract.states import State
from mftvm_openstack.ft import pair_tls
from mftvm_openstack.images import workload
from mftvm_openstack.local import demo, operations
from tests import intruder
from tests.functional import base

#: seconds the real primary waits before it connects
HOLD_BACK = 4.0


class IntruderTest(base.GuestTestCase):

    def start_pair(self, name):
        """Protect ``name`` over TCP in the background, its primary held
        back; (spec, thread, data port, result dict)."""
        self.data_port = demo.free_port()
        disk = self.make_disk()
        spec = operations.make_spec(
            name, self.image.kernel, self.image.initrd, disk,
            append='console=ttyS0 quiet mftvm.run=writer,counter '
                   'mftvm.writer_interval_ms=20',
            nic=f'user,hostfwd=tcp:127.0.0.1:{self.port}-:7000')
        opts = operations.ProtectOptions(start_delay=HOLD_BACK)
        address = f'tcp:127.0.0.1:{self.data_port}'
        result = {}

        def run():
            try:
                result['gdir'] = operations.protect(
                    spec, opts, self.state_dir, host_options={
                        'listen': address, 'secondary': address,
                        'nbd_host': '127.0.0.1'})
            except Exception as exc:    # reported by the test thread
                result['error'] = exc
        self.addCleanup(self._stop_guest, name)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return spec, thread, result

    def wait_listening(self, name):
        # its status, not a probe: a probe would be one more intruder
        base.wait_for(lambda: self.side(name, 'secondary').get('state')
                      == State.WAITING_FOR_PRIMARY, 30,
                      what='the secondary listening')

    def test_intruders_are_refused_and_the_real_primary_protects(self):
        spec, thread, result = self.start_pair('ia')
        self.wait_listening('ia')
        gdir = operations.guest_dir(self.state_dir, 'ia')
        tmp = tempfile.mkdtemp(dir=self.tmp)
        for who, ctx in intruder.intruders(tmp).items():
            got = intruder.intrude(self.data_port,
                                   intruder.hello_frame(spec.disk_size), ctx)
            # no READY, no frame at all: closed at the handshake
            self.assertEqual(b'', got, who)
            sec = self.side('ia', 'secondary')
            self.assertEqual(State.WAITING_FOR_PRIMARY, sec['state'], who)
            self.assertEqual('', sec.get('pair_id', ''), who)
        thread.join(180)
        self.assertNotIn('error', result)
        self.assertEqual(gdir, result['gdir'])
        log = workload.read_text(os.path.join(gdir, 'secondary-host.log'))
        refused = re.findall(r'WARNING .*refused a data connection from '
                             r'127\.0\.0\.1:\d+: (.*)', log)
        self.assertEqual(3, len(refused), log[-3000:])
        self.assertNotIn('refused a primary', log)
        prim = self.side('ia', 'primary')
        self.assertEqual(State.PROTECTED, prim['state'])
        # ...and a failover still works (exactly one copy runs after it)
        last = self.wait_counter(gdir)
        last = self.talk(last, 2)
        self.kill_and_ask(prim['qemu_pid'], last)
        sec = self.wait_active('ia')
        self.assertEqual([sec['qemu_pid']], base.qemu_pids_for('ia'))

    def test_the_replica_export_refuses_clients_without_the_primarys_cert(
            self):
        spec, thread, result = self.start_pair('ib')
        thread.join(180)
        self.assertNotIn('error', result)
        gdir = result['gdir']
        nbd_port = self.replica_port(gdir)
        plain = f'nbd://127.0.0.1:{nbd_port}/disk0'
        self.assert_refused({
            'no TLS, read': ['qemu-io', '-f', 'raw', '-c', 'read 0 4k',
                             plain],
            'no TLS, write': ['qemu-io', '-f', 'raw', '-c',
                              'write -P 0x66 0 4k', plain]})
        # Another pair's valid client cert, and this pair's CA cert (no
        # secret: anyone may learn it from a handshake), so that it is
        # the server that must refuse.
        server = os.path.join(gdir, 'tls', 'server')
        other = pair_tls.PairCredentials.generate()
        other_dir = self.creds_dir('other', [
            (os.path.join(server, 'ca-cert.pem'), 'ca-cert.pem')])
        with open(os.path.join(other_dir, 'client-cert.pem'), 'w') as f:
            f.write(other.client_cert)
        with open(os.path.join(other_dir, 'client-key.pem'), 'w') as f:
            f.write(other.client_key)
        # the pair's CA, but the secondary's own cert: not the primary's
        # name, refused by tls-authz
        server_as_client = self.creds_dir('server-as-client', [
            (os.path.join(server, src), dst)
            for src, dst in (('ca-cert.pem', 'ca-cert.pem'),
                             ('server-cert.pem', 'client-cert.pem'),
                             ('server-key.pem', 'client-key.pem'))])
        name = pair_tls.server_name(pair_tls.read_pair_key(server))

        def with_creds(directory):
            return ['--object', f'tls-creds-x509,id=t,dir={directory},'
                    f'endpoint=client', '--image-opts',
                    f'driver=nbd,host=127.0.0.1,port={nbd_port},'
                    f'export=disk0,tls-creds=t,tls-hostname={name}']
        self.assert_refused({
            'another pair, write': ['qemu-io', '-c', 'write -P 0x66 0 4k',
                                    *with_creds(other_dir)],
            'the server cert, write': ['qemu-io', '-c',
                                       'write -P 0x66 0 4k',
                                       *with_creds(server_as_client)]})
        # the pair's primary still replicates, and a failover works
        self.assertEqual(State.PROTECTED, self.side('ib', 'primary')['state'])
        last = self.wait_counter(gdir)
        last = self.talk(last, 2)
        self.kill_and_ask(self.side('ib', 'primary')['qemu_pid'], last)
        self.wait_active('ib')

    def replica_port(self, gdir):
        """The TCP port the secondary's storage daemon serves NBD on."""
        st = operations.status(self.state_dir, os.path.basename(gdir))
        pids = set(st.child_pids.get('secondary', ()))
        out = subprocess.run(['ss', '-Hltnp'], capture_output=True,
                             text=True, check=True).stdout
        for line in out.splitlines():
            m = re.search(r'127\.0\.0\.1:(\d+) .*pid=(\d+)', line)
            if m and int(m.group(2)) in pids and \
                    int(m.group(1)) != self.data_port:
                return int(m.group(1))
        self.fail(f'no NBD port of {pids} in:\n{out}')

    def assert_refused(self, attempts):
        for what, argv in attempts.items():
            run = subprocess.run(argv, capture_output=True, text=True,
                                 timeout=60)
            self.assertNotEqual(0, run.returncode, what)
            self.assertNotIn('wrote', run.stdout, what)
            self.assertNotIn('read ', run.stdout, what)

    def creds_dir(self, name, copies):
        """A QEMU creds dir holding copies of (source, name) files."""
        directory = os.path.join(self.tmp, name)
        os.makedirs(directory)
        for src, dst in copies:
            with open(src, 'rb') as f:
                data = f.read()
            with open(os.path.join(directory, dst), 'wb') as f:
                f.write(data)
        return directory
