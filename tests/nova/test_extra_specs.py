"""The ``ft`` flavor extra specs through Nova's real API.

Nova's in-process functional harness (``_IntegratedTestBase``: the API
behind wsgi-intercept, conductor, scheduler, one fake compute, Placement)
at microversion 2.86, the first that validates extra specs.

Nova loads extra-spec validators from the entry point group
``nova.api.extra_spec_validators`` once, when
``nova.api.validation.extra_specs.validators`` is imported.
:class:`FTValidatorsFixture` uses the real entry point when it is
installed (``setup.cfg`` declares it and the package was installed with
``pip install -e .`` since); otherwise it runs Nova's loader again with
this package's module added to what stevedore finds. Each test records
which in its ``validators`` detail; :class:`TestEntryPoint` checks that
the installed entry point, if any, is the right one.
"""

import importlib.metadata

import fixtures
import testtools
from nova import exception
from nova.api.validation.extra_specs import base, validators
from nova.tests.functional import integrated_helpers
from nova.tests.functional.api import client as api_client
from stevedore import extension
from testtools import content

from mftvm_openstack.nova import extra_specs, ft_request

GROUP = 'nova.api.extra_spec_validators'
ENTRY_POINT_NAME = 'mftvm'
FT_KEYS = (ft_request.ENABLED, ft_request.EPOCH_MS, ft_request.DISK_SYNC)

#: (key, value, what the 400's message must say besides the key)
BAD_VALUES = [
    ('ft:enabled', 'maybe', 'is not a boolean'),
    ('ft:enabled', '', 'is not a boolean'),
    ('ft:epoch_ms', '19', 'out of range'),
    ('ft:epoch_ms', '10001', 'out of range'),
    ('ft:epoch_ms', 'fast', 'is not an integer'),
    ('ft:epoch_ms', '100.0', 'is not an integer'),
    ('ft:disk_sync', 'colo', 'is not one of: async-replication, '
                             'block-copy, write-replication'),
    ('ft:disk_sync', 'Block-Copy', 'is not one of'),
]
GOOD_VALUES = [
    ('ft:enabled', 'true'), ('ft:enabled', 'False'), ('ft:enabled', 'yes'),
    ('ft:enabled', '0'), ('ft:epoch_ms', '20'), ('ft:epoch_ms', '10000'),
    ('ft:epoch_ms', '200'), ('ft:disk_sync', 'write-replication'),
    ('ft:disk_sync', 'block-copy'),
]


def api_paste_config():
    """Nova's ``api-paste.ini``, installed as data next to the venv.

    Nova's default (``api-paste.ini`` searched from the package) only
    works in a source checkout.
    """
    dist = importlib.metadata.distribution('nova')
    for path in dist.files or ():
        if path.name == 'api-paste.ini' and 'nova' in path.parts:
            return str(dist.locate_file(path).resolve())
    raise LookupError('nova\'s etc/nova/api-paste.ini is not installed')


def installed_entry_point():
    """Our entry point in ``nova.api.extra_spec_validators``, or None."""
    for ep in importlib.metadata.entry_points(group=GROUP):
        if ep.value == extra_specs.__name__:
            return ep
    return None


class FTValidatorsFixture(fixtures.Fixture):
    """Nova's validators, loaded as its API loads them, ours included.

    ``source`` tells how ours got there: ``'entry point'`` (installed;
    nothing is patched) or ``'injected'`` (Nova's ``load_validators()``
    run again into fresh registries, with stevedore's manager for the
    group given our module next to Nova's own; undone at cleanup).
    """

    def _setUp(self):
        if installed_entry_point() is not None:
            self.source = 'entry point'
            return
        self.source = 'injected'
        self.useFixture(fixtures.MonkeyPatch(
            'nova.api.validation.extra_specs.validators.VALIDATORS', {}))
        self.useFixture(fixtures.MonkeyPatch(
            'nova.api.validation.extra_specs.validators.NAMESPACES', set()))
        real_manager = extension.ExtensionManager

        def manager(namespace, *args, **kwargs):
            found = real_manager(namespace, *args, **kwargs)
            ours = extension.Extension(ENTRY_POINT_NAME, None, extra_specs,
                                       None)
            return real_manager.make_test_instance(
                list(found) + [ours], namespace=namespace)

        with fixtures.MonkeyPatch(
                'stevedore.extension.ExtensionManager', manager):
            validators.load_validators()


class TestEntryPoint(testtools.TestCase):
    """What Nova loads; the declared values agree with our parsers."""

    def setUp(self):
        super().setUp()
        self.validators = self.useFixture(FTValidatorsFixture())
        self.addDetail('validators',
                       content.text_content(self.validators.source))

    def test_installed_entry_point_is_ours(self):
        ep = installed_entry_point()
        if ep is None:
            self.assertEqual('injected', self.validators.source)
            return
        self.assertEqual(ENTRY_POINT_NAME, ep.name)
        self.assertIs(extra_specs, ep.load())

    def test_nova_loaded_ours(self):
        for key in FT_KEYS:
            self.assertIsInstance(validators.VALIDATORS[key],
                                  extra_specs.FTExtraSpecValidator)
        self.assertIn('ft', validators.NAMESPACES)
        # Nova's own validators are still there
        self.assertIn('hw:cpu_policy', validators.VALIDATORS)

    def test_descriptions(self):
        for validator in extra_specs.register():
            self.assertGreater(len(validator.description), 150)
            self.assertIn('description', validator.value)

    def test_declared_value_agrees_with_parser(self):
        # Nova's check of the declared value (what its API reference
        # shows) and ft_request's parsers accept and refuse the same
        for key, value in GOOD_VALUES + [(k, v) for k, v, _ in BAD_VALUES]:
            validator = validators.VALIDATORS[key]
            try:
                base.ExtraSpecValidator.validate(validator, key, value)
                nova_ok = True
            except exception.ValidationError:
                nova_ok = False
            self.assertEqual((key, value, (key, value) in GOOD_VALUES),
                             (key, value, nova_ok))
            try:
                validator.validate(key, value)
                ours_ok = True
            except exception.ValidationError as exc:
                ours_ok = False
                self.assertIn(f"'{key}'", str(exc))
            self.assertEqual((key, value, nova_ok), (key, value, ours_ok))


class FTExtraSpecsAPITest(integrated_helpers._IntegratedTestBase):
    """Setting ``ft:`` extra specs through the compute API."""

    microversion = '2.86'

    def setUp(self):
        self.validators = self.useFixture(FTValidatorsFixture())
        super().setUp()
        self.addDetail('validators',
                       content.text_content(self.validators.source))
        self.flavor_id = self._create_flavor(name='m1.ft')

    def _setup_services(self):
        self.flags(api_paste_config=api_paste_config(), group='wsgi')
        super()._setup_services()

    def _assert_refused(self, key, call, *args):
        exc = self.assertRaises(api_client.OpenStackApiException, call,
                                self.flavor_id, *args)
        self.assertEqual(400, exc.response.status_code)
        message = exc.response.json()['badRequest']['message']
        self.assertIn(f"'{key}'", message)
        return message

    def test_valid_specs_accepted(self):
        specs = {'ft:enabled': 'true', 'ft:epoch_ms': '100',
                 'ft:disk_sync': 'write-replication'}
        self.admin_api.post_extra_spec(self.flavor_id,
                                       {'extra_specs': specs})
        self.assertEqual(specs, self.admin_api.get_extra_specs(
            self.flavor_id))
        for key, value in GOOD_VALUES:
            self.admin_api.put_extra_spec(self.flavor_id, key, {key: value})
            self.assertEqual({key: value}, self.admin_api.get_extra_spec(
                self.flavor_id, key))
        # a JSON number is accepted as Nova accepts it (as its string)
        self.admin_api.post_extra_spec(
            self.flavor_id,
            {'extra_specs': {'ft:enabled': 'on', 'ft:epoch_ms': 250}})
        # what the API stored is what a build reads
        self.assertEqual(
            ft_request.FTRequest(True, 250, 'block-copy'),
            ft_request.get_ft_request(
                self.admin_api.get_extra_specs(self.flavor_id), {}))

    def test_invalid_values_refused(self):
        for key, value, reason in BAD_VALUES:
            message = self._assert_refused(
                key, self.admin_api.post_extra_spec,
                {'extra_specs': {'ft:enabled': 'true', key: value}})
            self.assertIn(reason, message)
            self.assertIn(f'flavor extra spec {key!r}: ', message)
            message = self._assert_refused(
                key, self.admin_api.put_extra_spec, key, {key: value})
            self.assertIn(reason, message)
        # nothing was stored, not even the good spec posted alongside
        self.assertEqual({}, self.admin_api.get_extra_specs(self.flavor_id))

    def test_unknown_key_in_namespace_refused(self):
        message = self._assert_refused(
            'ft:foo', self.admin_api.post_extra_spec,
            {'extra_specs': {'ft:foo': 'bar'}})
        self.assertIn('does not appear to be a valid extra spec', message)
        self._assert_refused('ft:epoch', self.admin_api.put_extra_spec,
                             'ft:epoch', {'ft:epoch': '100'})
        self.assertEqual({}, self.admin_api.get_extra_specs(self.flavor_id))
        # another namespace that merely starts with "ft" is not ours
        self.admin_api.post_extra_spec(
            self.flavor_id, {'extra_specs': {'ftp:server': 'x'}})

    def test_older_microversion_is_not_validated(self):
        # before 2.86 Nova stores anything: why ft_request checks again
        self.admin_api.microversion = '2.85'
        self.admin_api.post_extra_spec(
            self.flavor_id, {'extra_specs': {'ft:epoch_ms': '5'}})
        specs = self.admin_api.get_extra_specs(self.flavor_id)
        self.assertEqual({'ft:epoch_ms': '5'}, specs)
        exc = self.assertRaises(ft_request.InvalidFTRequest,
                                ft_request.get_ft_request, specs,
                                {'ft': 'true'})
        self.assertEqual('ft:epoch_ms', exc.key)
