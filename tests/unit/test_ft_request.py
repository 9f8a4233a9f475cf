"""FT requests from flavor extra specs and server metadata (no Nova)."""

from __future__ import annotations

import doctest
import types

import testtools

from mftvm_openstack.nova import ft_request
from mftvm_openstack.nova.ft_request import (
    FTRequest,
    FTRequestConflict,
    InvalidFTRequest,
    for_instance,
    get_ft_request,
)

TRUE_SPELLINGS = ('true', 'True', 'TRUE', ' true ', 'yes', 'Y', 'on', 't',
                  '1')
FALSE_SPELLINGS = ('false', 'False', 'no', 'N', 'off', 'f', '0', ' 0\n')
NOT_BOOLS = ('', 'maybe', 'enabled', '2', 'tru', 'none', 'null', '1.0')


class TestEnabled(testtools.TestCase):

    def test_nothing_set_is_off(self):
        for specs, meta in (({}, {}), (None, None), ({'hw:x': '1'},
                                                     {'owner': 'me'})):
            self.assertEqual(FTRequest(enabled=False),
                             get_ft_request(specs, meta))

    def test_metadata_true_spellings(self):
        for value in TRUE_SPELLINGS:
            self.assertTrue(get_ft_request({}, {'ft': value}).enabled, value)

    def test_metadata_false_spellings(self):
        for value in FALSE_SPELLINGS:
            self.assertFalse(get_ft_request({}, {'ft': value}).enabled,
                             value)

    def test_flavor_true_and_false_spellings(self):
        for value in TRUE_SPELLINGS:
            self.assertTrue(
                get_ft_request({'ft:enabled': value}, {}).enabled, value)
        for value in FALSE_SPELLINGS:
            self.assertFalse(
                get_ft_request({'ft:enabled': value}, {}).enabled, value)

    def test_real_booleans_are_accepted(self):
        self.assertTrue(get_ft_request({'ft:enabled': True}, {}).enabled)
        self.assertFalse(get_ft_request({}, {'ft': False}).enabled)

    def test_bad_metadata_value_names_the_key(self):
        for value in NOT_BOOLS + (None, 2):
            exc = self.assertRaises(InvalidFTRequest, get_ft_request,
                                    {}, {'ft': value})
            self.assertIsInstance(exc, ValueError)
            self.assertEqual(('server metadata', 'ft', value),
                             (exc.source, exc.key, exc.value))
            self.assertTrue(str(exc).startswith("server metadata 'ft': "),
                            str(exc))
            self.assertIn(repr(value), str(exc))
            self.assertIn('true/false', str(exc))

    def test_bad_flavor_value_names_the_key(self):
        exc = self.assertRaises(InvalidFTRequest, get_ft_request,
                                {'ft:enabled': 'sure'}, {'ft': 'true'})
        self.assertEqual("flavor extra spec 'ft:enabled': 'sure' is not a "
                         "boolean (true/false, yes/no, on/off, 1/0)",
                         str(exc))

    def test_either_side_true_enables(self):
        self.assertTrue(get_ft_request({'ft:enabled': 'true'}, {}).enabled)
        self.assertTrue(get_ft_request({}, {'ft': 'true'}).enabled)
        self.assertTrue(get_ft_request({'ft:enabled': 'yes'},
                                       {'ft': 'on'}).enabled)
        self.assertFalse(get_ft_request({'ft:enabled': 'no'},
                                        {'ft': 'off'}).enabled)

    def test_flavor_and_metadata_conflict(self):
        for specs, meta in (({'ft:enabled': 'false'}, {'ft': 'true'}),
                            ({'ft:enabled': 'true'}, {'ft': 'no'})):
            exc = self.assertRaises(FTRequestConflict, get_ft_request,
                                    specs, meta)
            self.assertIsInstance(exc, InvalidFTRequest)
            self.assertEqual('ft', exc.key)
            self.assertIn("server metadata 'ft': ", str(exc))
            self.assertIn("flavor extra spec 'ft:enabled'", str(exc))


class TestOptions(testtools.TestCase):

    def test_options_from_flavor(self):
        request = get_ft_request(
            {'ft:enabled': 'true', 'ft:epoch_ms': '100',
             'ft:disk_sync': 'block-copy'}, {})
        self.assertEqual(FTRequest(True, 100, 'block-copy'), request)
        self.assertEqual({'epoch_ms': 100, 'disk_sync': 'block-copy'},
                         request.agent_options())

    def test_unset_options_are_left_to_the_agent(self):
        request = get_ft_request({}, {'ft': 'true'})
        self.assertEqual(FTRequest(True, None, None), request)
        self.assertEqual({}, request.agent_options())
        self.assertEqual(
            {'disk_sync': 'write-replication'},
            get_ft_request({'ft:disk_sync': 'write-replication'},
                           {'ft': '1'}).agent_options())

    def test_flavor_options_with_metadata_request(self):
        self.assertEqual(FTRequest(True, 20, None),
                         get_ft_request({'ft:epoch_ms': '20'}, {'ft': 'y'}))

    def test_options_are_checked_even_when_ft_is_off(self):
        request = get_ft_request({'ft:epoch_ms': '10000'}, {})
        self.assertEqual(FTRequest(False, 10000, None), request)
        self.assertRaises(InvalidFTRequest, get_ft_request,
                          {'ft:epoch_ms': '10001'}, {})

    def test_epoch_ms_range_and_spelling(self):
        for value, expected in (('20', 20), ('10000', 10000), (' 250 ', 250),
                                (300, 300), ('+40', 40)):
            self.assertEqual(
                expected,
                get_ft_request({'ft:epoch_ms': value}, {}).epoch_ms)

    def test_bad_epoch_ms_names_the_key(self):
        for value, reason in (
                ('19', '19 is out of range (milliseconds from 20 to 10000)'),
                ('10001', '10001 is out of range'),
                ('0', '0 is out of range'),
                ('-200', '-200 is out of range'),
                ('fast', "'fast' is not an integer number of milliseconds"),
                ('200ms', "'200ms' is not an integer"),
                ('100.0', "'100.0' is not an integer"),
                ('', "'' is not an integer"),
                (True, 'True is not an integer'),
                (None, 'None is not an integer'),
                (1.5, '1.5 is not an integer')):
            exc = self.assertRaises(InvalidFTRequest, get_ft_request,
                                    {'ft:epoch_ms': value}, {'ft': 'true'})
            self.assertEqual(('flavor extra spec', 'ft:epoch_ms', value),
                             (exc.source, exc.key, exc.value))
            self.assertTrue(
                str(exc).startswith(
                    f"flavor extra spec 'ft:epoch_ms': {reason}"),
                str(exc))

    def test_bad_disk_sync_names_the_key(self):
        for value in ('Write-Replication', 'write_replication', '', 'colo',
                      ' block-copy', None):
            exc = self.assertRaises(InvalidFTRequest, get_ft_request,
                                    {'ft:disk_sync': value}, {})
            self.assertEqual(
                f"flavor extra spec 'ft:disk_sync': {value!r} is not one "
                f"of: async-replication, block-copy, write-replication",
                str(exc))

    def test_long_values_are_shortened_in_messages(self):
        exc = self.assertRaises(InvalidFTRequest, get_ft_request,
                                {'ft:disk_sync': 'x' * 300}, {})
        self.assertLess(len(str(exc)), 160)
        self.assertEqual('x' * 300, exc.value)


class TestKeys(testtools.TestCase):

    def test_unknown_flavor_key_in_namespace(self):
        exc = self.assertRaises(InvalidFTRequest, get_ft_request,
                                {'ft:foo': 'bar', 'ft:enabled': 'true'}, {})
        self.assertEqual('ft:foo', exc.key)
        self.assertEqual(
            "flavor extra spec 'ft:foo': is not a known extra spec (known: "
            "ft:enabled, ft:epoch_ms, ft:disk_sync)", str(exc))

    def test_other_flavor_keys_are_ignored(self):
        specs = {'hw:cpu_policy': 'dedicated', 'ft': 'junk',
                 'ftx:foo': 'bar', 'quota:cpu_limit': '5', 'ft:enabled': '1'}
        self.assertEqual(FTRequest(True), get_ft_request(specs, {}))

    def test_other_metadata_keys_are_ignored(self):
        meta = {'ft_epoch_ms': 'junk', 'FT': 'junk', 'role': 'db',
                'ftp:server': 'x'}
        self.assertEqual(FTRequest(False), get_ft_request({}, meta))

    def test_tuning_in_metadata_is_refused(self):
        for key in ('ft:epoch_ms', 'ft:disk_sync', 'ft:enabled'):
            exc = self.assertRaises(InvalidFTRequest, get_ft_request,
                                    {}, {'ft': 'true', key: '100'})
            self.assertEqual(('server metadata', key), (exc.source, exc.key))
            self.assertTrue(str(exc).startswith(f"server metadata {key!r}: "
                                                f"the ft: namespace is not "
                                                f"allowed"), str(exc))
            self.assertIn('set it as a flavor extra spec', str(exc))

    def test_unknown_metadata_key_in_namespace(self):
        exc = self.assertRaises(InvalidFTRequest, get_ft_request,
                                {}, {'ft:foo': 'bar'})
        self.assertEqual('ft:foo', exc.key)
        self.assertIn('the known keys are ft:enabled, ft:epoch_ms, '
                      'ft:disk_sync, set as flavor extra specs', str(exc))


class TestMisc(testtools.TestCase):

    def test_for_instance(self):
        instance = types.SimpleNamespace(
            flavor=types.SimpleNamespace(
                extra_specs={'ft:epoch_ms': '50'}),
            metadata={'ft': 'true'})
        self.assertEqual(FTRequest(True, 50), for_instance(instance))
        bare = types.SimpleNamespace(flavor=None, metadata=None)
        self.assertEqual(FTRequest(False), for_instance(bare))

    def test_request_is_immutable(self):
        request = FTRequest(True)
        self.assertRaises(AttributeError, setattr, request, 'enabled', False)

    def test_limits_match_the_agent(self):
        # the agent checks the same options again on its RPC API
        from mftvm_openstack.agent import exception, rpc
        from mftvm_openstack.contract import plugins
        low, high = ft_request.EPOCH_MS_MIN, ft_request.EPOCH_MS_MAX
        for ms in (low, high):
            self.assertEqual({'epoch_ms': ms},
                             rpc.check_options({'epoch_ms': ms}).to_dict())
        for ms in (low - 1, high + 1):
            self.assertRaises(exception.InvalidRequest, rpc.check_options,
                              {'epoch_ms': ms})
        self.assertEqual(plugins.disk_sync_choices(),
                         ft_request.DISK_SYNC_CHOICES)
        for sync in ft_request.DISK_SYNC_CHOICES:
            rpc.check_options({'disk_sync': sync})
        self.assertEqual(rpc.check_options(
            FTRequest(True, 20, 'block-copy').agent_options()).to_dict(),
            {'epoch_ms': 20, 'disk_sync': 'block-copy'})

    def test_module_examples(self):
        result = doctest.testmod(ft_request)
        self.assertEqual(0, result.failed)
        self.assertGreater(result.attempted, 0)
