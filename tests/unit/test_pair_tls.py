"""A pair's credentials, and the data stream over mutual TLS."""

import asyncio
import os
import ssl
import stat
import tempfile
import unittest

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.spec import ClientCredentials, PreparedSecondary
from mftvm_openstack.ft import pair_tls, transport
from mftvm_openstack.ft.transport import Kind


def _cert(pem):
    return x509.load_pem_x509_certificate(pem.encode())


def _cn(cert):
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def intruder_context(directory, cert, key):
    """A client that shows ``cert`` and trusts any server (an intruder
    does not care whom it talks to)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(os.path.join(directory, cert),
                        os.path.join(directory, key))
    return ctx


class CredentialsTest(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(__import__('shutil').rmtree, self.dir)
        self.creds = pair_tls.PairCredentials.generate()

    def test_one_ca_signs_a_server_and_a_client_named_after_the_pair(self):
        c = self.creds
        ca, server, client = (_cert(c.ca_cert), _cert(c.server_cert),
                              _cert(c.client_cert))
        server.verify_directly_issued_by(ca)
        client.verify_directly_issued_by(ca)
        self.assertEqual(pair_tls.server_name(c.pair_key), _cn(server))
        self.assertEqual(pair_tls.client_name(c.pair_key), _cn(client))
        self.assertTrue(ca.extensions.get_extension_for_class(
            x509.BasicConstraints).value.ca)
        self.assertEqual([ExtendedKeyUsageOID.SERVER_AUTH], list(
            server.extensions.get_extension_for_class(
                x509.ExtendedKeyUsage).value))
        self.assertEqual([ExtendedKeyUsageOID.CLIENT_AUTH], list(
            client.extensions.get_extension_for_class(
                x509.ExtendedKeyUsage).value))
        self.assertEqual([pair_tls.server_name(c.pair_key)],
                         server.extensions.get_extension_for_class(
                             x509.SubjectAlternativeName).value
                         .get_values_for_type(x509.DNSName))

    def test_the_ca_signs_only_and_the_others_only_serve_or_connect(self):
        c = self.creds
        ca, server, client = (_cert(c.ca_cert), _cert(c.server_cert),
                              _cert(c.client_cert))

        def ext(cert, kind):
            return cert.extensions.get_extension_for_class(kind)
        basic = ext(ca, x509.BasicConstraints)
        self.assertEqual((True, True, 0), (basic.critical, basic.value.ca,
                                           basic.value.path_length))
        usage = ext(ca, x509.KeyUsage).value
        self.assertEqual((True, True, False, False),
                         (usage.key_cert_sign, usage.crl_sign,
                          usage.digital_signature, usage.key_encipherment))
        with self.assertRaises(x509.ExtensionNotFound):
            ext(ca, x509.ExtendedKeyUsage)
        for leaf in (server, client):
            basic = ext(leaf, x509.BasicConstraints)
            self.assertEqual((True, False), (basic.critical, basic.value.ca))
            usage = ext(leaf, x509.KeyUsage)
            self.assertTrue(usage.critical)
            self.assertEqual((False, False, True, True),
                             (usage.value.key_cert_sign, usage.value.crl_sign,
                              usage.value.digital_signature,
                              usage.value.key_encipherment))
            self.assertEqual(ca.subject, leaf.issuer)
            self.assertEqual(ca.not_valid_after_utc, leaf.not_valid_after_utc)
        with self.assertRaises(x509.ExtensionNotFound):
            ext(client, x509.SubjectAlternativeName)

    def test_every_pair_has_its_own_ca_and_key(self):
        other = pair_tls.PairCredentials.generate()
        self.assertNotEqual(self.creds.pair_key, other.pair_key)
        self.assertNotEqual(self.creds.ca_cert, other.ca_cert)
        with self.assertRaises(ValueError):
            _cert(other.client_cert).verify_directly_issued_by(
                _cert(self.creds.ca_cert))

    def test_the_ca_key_is_not_kept(self):
        fields = vars(self.creds)
        self.assertEqual({'pair_key', 'ca_cert', 'server_cert',
                          'server_key', 'client_cert', 'client_key'},
                         set(fields))
        keys = [v for v in fields.values() if 'PRIVATE KEY' in v]
        self.assertEqual(2, len(keys))

    def test_files_are_private_and_laid_out_for_qemu(self):
        server = self.creds.write_server(os.path.join(self.dir, 's'))
        client = pair_tls.write_client(self.creds.client_bundle(),
                                       os.path.join(self.dir, 'c'))
        self.assertEqual(
            {'ca-cert.pem', 'server-cert.pem', 'server-key.pem', 'pair-key'},
            set(os.listdir(server)))
        self.assertEqual(
            {'ca-cert.pem', 'client-cert.pem', 'client-key.pem', 'pair-key'},
            set(os.listdir(client)))
        for d in (server, client):
            self.assertEqual(0o700, stat.S_IMODE(os.stat(d).st_mode))
            for name in os.listdir(d):
                self.assertEqual(0o600, stat.S_IMODE(
                    os.stat(os.path.join(d, name)).st_mode), name)
        self.assertEqual(self.creds.pair_key, pair_tls.read_pair_key(server))
        self.assertEqual(self.creds.pair_key, pair_tls.read_pair_key(client))

    def test_client_bundle_round_trips_and_rejects_junk(self):
        bundle = self.creds.client_bundle()
        self.assertEqual(bundle, ClientCredentials.from_dict(
            bundle.to_dict()))
        for field, value in [('pair_key', '../../etc'),
                             ('key', 'not a pem'),
                             ('cert', 'x' * 20000),
                             ('ca_cert', 7)]:
            with self.assertRaises(ContractError, msg=field):
                ClientCredentials.from_dict(
                    {**bundle.to_dict(), field: value})

    def test_the_secondarys_reply_carries_the_primarys_half_only(self):
        reply = PreparedSecondary(
            host='h2', data_address='tcp:10.0.0.2:4711',
            credentials=self.creds.client_bundle()).to_dict()
        got = PreparedSecondary.from_dict(reply)
        self.assertEqual(self.creds.client_key, got.credentials.key)
        self.assertNotIn(self.creds.server_key, repr(reply))

    def test_missing_or_bad_credentials_are_a_clear_error(self):
        with self.assertRaisesRegex(pair_tls.CredentialsError, 'no pair'):
            pair_tls.read_pair_key(self.dir)
        with self.assertRaisesRegex(pair_tls.CredentialsError,
                                    'cannot load'):
            pair_tls.server_context(self.dir)

    def test_contexts_require_tls13_and_a_peer_certificate(self):
        server = self.creds.write_server(os.path.join(self.dir, 's'))
        client = pair_tls.write_client(self.creds.client_bundle(),
                                       os.path.join(self.dir, 'c'))
        for ctx in (pair_tls.server_context(server),
                    pair_tls.client_context(client)):
            self.assertEqual(ssl.CERT_REQUIRED, ctx.verify_mode)
            self.assertEqual(ssl.TLSVersion.TLSv1_3, ctx.minimum_version)
        self.assertTrue(pair_tls.client_context(client).check_hostname)


class PairTestCase(unittest.IsolatedAsyncioTestCase):
    """A pair's credentials on disk, and :meth:`serve`: a secondary's
    listener that queues each channel it accepts in ``self.accepted``."""

    async def asyncSetUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(__import__('shutil').rmtree, self.dir)
        self.creds = pair_tls.PairCredentials.generate()
        self.server_dir = self.creds.write_server(
            os.path.join(self.dir, 'server'))
        self.client_dir = pair_tls.write_client(
            self.creds.client_bundle(), os.path.join(self.dir, 'client'))
        self.accepted = asyncio.Queue()

    async def serve(self, addr, **bounds):
        async def on_connect(channel):
            await self.accepted.put(channel)
        key = self.creds.pair_key
        server = await transport.serve(
            addr, on_connect, tls=transport.ServerTls(
                pair_tls.server_context(self.server_dir),
                lambda cert: None if pair_tls.peer_is_client(cert, key)
                else f'{pair_tls.peer_common_name(cert)!r} is not the '
                f'primary', **bounds))
        self.addCleanup(server.close)
        return server


class TlsStreamTest(PairTestCase):
    """The secondary's listener lets only its pair's primary through."""

    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.addr = transport.DataAddress(
            path=os.path.join(self.dir, 'data.sock'))
        self.server = await self.serve(self.addr)

    def client_tls(self, directory, name=None):
        return transport.ClientTls(
            pair_tls.client_context(directory),
            name or pair_tls.server_name(self.creds.pair_key))

    async def assert_refused(self, logs, why):
        # on_connect never ran, and the refusal named its reason
        await asyncio.sleep(0.05)
        self.assertTrue(self.accepted.empty())
        self.assertEqual(1, len(logs.records), logs.output)
        self.assertEqual('WARNING', logs.records[0].levelname)
        self.assertIn('refused a data connection from', logs.output[0])
        self.assertRegex(logs.output[0], why)

    async def test_the_pairs_primary_gets_a_channel(self):
        chan = await transport.Channel.connect(
            self.addr, tls=self.client_tls(self.client_dir))
        await chan.send(Kind.MARK, 7)
        server_side = await asyncio.wait_for(self.accepted.get(), 5)
        msg = await server_side.recv(timeout=5)
        self.assertEqual((Kind.MARK, 7), (msg.kind, msg.epoch))
        await server_side.send(Kind.MARKED, 7)
        self.assertEqual(Kind.MARKED, (await chan.recv(timeout=5)).kind)
        chan.close()
        server_side.close()

    async def test_a_plain_connection_is_refused_and_logged(self):
        with self.assertLogs('mftvm_openstack.ft.transport') as logs:
            chan = await transport.Channel.connect(self.addr)
            with self.assertRaises((ConnectionError, OSError)):
                await chan.send(Kind.HELLO, 0, b'{}' * 100)
                await chan.recv(timeout=5)
            await self.assert_refused(logs, 'TLS handshake failed')
        chan.close()

    async def test_a_certificate_of_another_ca_is_refused(self):
        other = pair_tls.PairCredentials.generate(self.creds.pair_key)
        other_dir = pair_tls.write_client(
            other.client_bundle(), os.path.join(self.dir, 'other'))
        with self.assertLogs('mftvm_openstack.ft.transport') as logs:
            with self.assertRaises(ConnectionError):
                chan = await transport.Channel.connect(
                    self.addr, tls=transport.ClientTls(
                        intruder_context(other_dir, 'client-cert.pem',
                                         'client-key.pem'), 'x'))
                # TLS 1.3: the server checks the client's certificate
                # after the client's handshake is done
                await chan.recv(timeout=5)
            await self.assert_refused(logs, 'CERTIFICATE_VERIFY_FAILED')

    async def test_the_servers_own_certificate_is_no_primary(self):
        # the same CA, but a server certificate: not for a client
        ctx = intruder_context(self.server_dir, 'server-cert.pem',
                               'server-key.pem')
        with self.assertLogs('mftvm_openstack.ft.transport') as logs:
            with self.assertRaises(ConnectionError):
                chan = await transport.Channel.connect(
                    self.addr, tls=transport.ClientTls(ctx, 'x'))
                await chan.recv(timeout=5)
            await self.assert_refused(logs, 'CERTIFICATE_VERIFY_FAILED')

    def test_only_the_primarys_name_passes_the_peer_check(self):
        key = self.creds.pair_key

        def cert(cn):
            return {'subject': ((('commonName', cn),),)}
        self.assertTrue(pair_tls.peer_is_client(
            cert(pair_tls.client_name(key)), key))
        for cn in (pair_tls.server_name(key), pair_tls.client_name('0' * 32),
                   ''):
            self.assertFalse(pair_tls.peer_is_client(cert(cn), key), cn)
        self.assertFalse(pair_tls.peer_is_client(None, key))

    async def test_the_primary_refuses_a_secondary_of_another_pair(self):
        # the primary checks the server too: a listener with another
        # pair's credentials is no secondary of this pair
        other = pair_tls.PairCredentials.generate()
        other_client = pair_tls.write_client(
            other.client_bundle(), os.path.join(self.dir, 'other'))
        with self.assertRaises(transport.AuthenticationError):
            await transport.Channel.connect(
                self.addr, tls=transport.ClientTls(
                    pair_tls.client_context(other_client),
                    pair_tls.server_name(other.pair_key)))

    async def test_a_silent_peer_does_not_block_the_real_primary(self):
        reader, writer = await asyncio.open_unix_connection(self.addr.path)
        chan = await transport.Channel.connect(
            self.addr, tls=self.client_tls(self.client_dir))
        await asyncio.wait_for(self.accepted.get(), 5)
        chan.close()
        writer.close()


class HandshakeFloodTest(PairTestCase):
    """Strangers that connect and never finish a handshake take a
    bounded room, and the real primary still gets in (real TCP sockets
    on the loopback, whose every 127.x address is this host's)."""

    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.strangers = []

    async def listen(self, **bounds):
        server = await self.serve(
            transport.DataAddress(host='127.0.0.1', port=0), **bounds)
        self.port = server.sockets[0].getsockname()[1]

    async def stranger(self, source):
        """A connection from ``source`` that says nothing."""
        reader, writer = await asyncio.open_connection(
            '127.0.0.1', self.port, local_addr=(source, 0))
        self.addCleanup(writer.close)
        self.strangers.append(reader)
        return reader

    async def closed_strangers(self, count):
        """Until ``count`` strangers' connections were closed by the
        server; the readers of those."""
        closed = []
        pending = {asyncio.ensure_future(r.read()): r
                   for r in self.strangers}
        try:
            while len(closed) < count:
                done, _ = await asyncio.wait(
                    pending, timeout=10, return_when=asyncio.FIRST_COMPLETED)
                self.assertTrue(done, f'only {len(closed)} of {count} '
                                      f'strangers were refused')
                for task in done:
                    self.assertEqual(b'', task.result())
                    closed.append(pending.pop(task))
        finally:
            for task in pending:
                task.cancel()
        return closed

    async def primary(self, source='127.0.0.1'):
        reader, writer = await asyncio.open_connection(
            '127.0.0.1', self.port, local_addr=(source, 0),
            ssl=pair_tls.client_context(self.client_dir),
            server_hostname=pair_tls.server_name(self.creds.pair_key),
            ssl_handshake_timeout=5)
        self.addCleanup(writer.close)
        return await asyncio.wait_for(self.accepted.get(), 5)

    async def test_one_address_gets_a_few_places_and_the_primary_its_own(self):
        await self.listen(max_handshakes=8, max_handshakes_per_peer=3)
        with self.assertLogs('mftvm_openstack.ft.transport') as logs:
            for _ in range(10):
                await self.stranger('127.0.0.2')
            closed = await self.closed_strangers(7)
        # one line for the flood, not one per connection
        self.assertEqual(1, len(logs.records), logs.output)
        self.assertIn('3 connections from 127.0.0.2 are in their '
                      'handshake', logs.output[0])
        channel = await self.primary()
        channel.close()
        # the three admitted strangers are still waiting: the primary
        # did not have to wait for them
        self.assertEqual(3, len([r for r in self.strangers
                                 if r not in closed and not r.at_eof()]))

    async def test_the_room_for_all_addresses_is_bounded(self):
        await self.listen(max_handshakes=5, max_handshakes_per_peer=2)
        for source in ('127.0.0.2', '127.0.0.2', '127.0.0.3', '127.0.0.3',
                       '127.0.0.4'):
            await self.stranger(source)
        with self.assertLogs('mftvm_openstack.ft.transport') as logs:
            # room left from this address, but none in all
            for _ in range(2):
                await self.stranger('127.0.0.5')
            await self.closed_strangers(2)
        self.assertEqual(1, len(logs.records), logs.output)
        self.assertIn('5 connections are in their handshake',
                      logs.output[0])

    async def test_a_silent_stranger_is_dropped_after_the_handshake_time(self):
        await self.listen(handshake_timeout=0.2, max_handshakes_per_peer=1)
        with self.assertLogs('mftvm_openstack.ft.transport') as logs:
            await self.stranger('127.0.0.2')
            await self.closed_strangers(1)
        self.assertIn('TLS handshake timed out', logs.output[0])
        # its place is free again: the next one from there is admitted
        # (and times out in turn), not refused for want of room
        with self.assertLogs('mftvm_openstack.ft.transport') as logs:
            await self.stranger('127.0.0.2')
            await self.closed_strangers(2)
        self.assertEqual(1, len(logs.records), logs.output)
        self.assertIn('TLS handshake timed out', logs.output[0])


class HandshakeGateTest(unittest.TestCase):

    def test_places_are_counted_per_address_and_in_all(self):
        gate = transport.HandshakeGate(total=3, per_peer=2)
        self.assertIsNone(gate.enter('a'))
        self.assertIsNone(gate.enter('a'))
        self.assertIn('from a', gate.enter('a'))
        self.assertIsNone(gate.enter(None))
        self.assertIn('3 connections', gate.enter('b'))
        gate.leave('a')
        self.assertIsNone(gate.enter('b'))
        self.assertEqual(2, gate.refused)
        for address in ('a', 'b', None):
            gate.leave(address)
        self.assertEqual(0, gate.pending)
        self.assertIsNone(gate.enter('a'))
