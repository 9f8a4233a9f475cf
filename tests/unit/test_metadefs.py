"""The Glance metadefs namespace of the ``ft:`` flavor properties.

``etc/metadefs/mftvm-ft.json`` is what ``mftvm_openstack.nova.metadefs``
writes from the flavor validators; it must fit what Glance's API accepts
for a namespace (the constraints of Glance's ``/v2/schemas/metadefs/
namespace``, written out below as a JSON schema), and what Horizon
offers from it must be what Nova's validators accept: every bound and
choice, and nothing past them.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tempfile
import unittest
from contextlib import redirect_stderr

import jsonschema
from nova import exception as nova_exception

from mftvm_openstack.nova import extra_specs, ft_request, metadefs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
CHECKED_IN = os.path.join(ROOT, 'etc', 'metadefs', 'mftvm-ft.json')

_TYPES = ['array', 'boolean', 'integer', 'number', 'object', 'string', None]

#: what Glance (2023.1 to 2025.x) accepts for a namespace with its
#: properties: the namespace required and at most 80 characters, the
#: display name 80, the description 500; a public or private visibility;
#: associations of named resource types with a prefix; each property
#: with a title and one of Glance's types, numeric bounds, a list of
#: choices. Nothing else at the top (Glance refuses unknown keys there).
GLANCE_NAMESPACE = {
    'type': 'object',
    'required': ['namespace'],
    'additionalProperties': False,
    'properties': {
        'namespace': {'type': 'string', 'maxLength': 80},
        'display_name': {'type': 'string', 'maxLength': 80},
        'description': {'type': 'string', 'maxLength': 500},
        'visibility': {'type': 'string', 'enum': ['public', 'private']},
        'protected': {'type': 'boolean'},
        'owner': {'type': 'string', 'maxLength': 255},
        'resource_type_associations': {
            'type': 'array',
            'items': {
                'type': 'object',
                'required': ['name'],
                'properties': {
                    'name': {'type': 'string'},
                    'prefix': {'type': 'string'},
                    'properties_target': {'type': 'string'},
                },
            },
        },
        'properties': {
            'type': 'object',
            'additionalProperties': {
                'type': 'object',
                'required': ['title', 'type'],
                'properties': {
                    'title': {'type': 'string'},
                    'description': {'type': 'string'},
                    'type': {'enum': _TYPES},
                    'minimum': {'type': 'number'},
                    'maximum': {'type': 'number'},
                    'enum': {'type': 'array'},
                    'readonly': {'type': 'boolean'},
                    'default': {},
                },
            },
        },
        'objects': {'type': 'array'},
        'tags': {'type': 'array'},
    },
}


def validator(name):
    [v] = [v for v in extra_specs.register() if v.name == name]
    return v


class MetadefsTest(unittest.TestCase):

    def setUp(self):
        with open(CHECKED_IN) as f:
            self.doc = json.load(f)

    def test_checked_in_file_is_generated(self):
        with open(CHECKED_IN) as f:
            self.assertEqual(metadefs.render(), f.read(),
                             'regenerate: python -m '
                             'mftvm_openstack.nova.metadefs -o '
                             'etc/metadefs/mftvm-ft.json')
        self.assertEqual(0, metadefs.main(['--check', CHECKED_IN]))

    def test_check_finds_a_stale_file(self):
        stale = copy.deepcopy(self.doc)
        stale['properties']['epoch_ms']['maximum'] = 60000
        with tempfile.NamedTemporaryFile('w', suffix='.json') as f:
            json.dump(stale, f, indent=4)
            f.flush()
            with redirect_stderr(io.StringIO()) as err:
                self.assertEqual(1, metadefs.main(['--check', f.name]))
        self.assertIn('stale', err.getvalue())

    def test_glance_accepts_it(self):
        jsonschema.validate(self.doc, GLANCE_NAMESPACE)
        # the schema can refuse: a property without its type
        broken = copy.deepcopy(self.doc)
        del broken['properties']['enabled']['type']
        with self.assertRaises(jsonschema.ValidationError):
            jsonschema.validate(broken, GLANCE_NAMESPACE)

    def test_for_flavors_with_the_ft_prefix(self):
        self.assertEqual([{'name': 'OS::Nova::Flavor', 'prefix': 'ft:'}],
                         self.doc['resource_type_associations'])
        self.assertEqual(
            {v.name for v in extra_specs.register()},
            {'ft:' + name for name in self.doc['properties']})
        for prop in self.doc['properties'].values():
            self.assertTrue(prop['title'] and prop['description'])

    def assert_valid(self, name, value, valid):
        v = validator(name)
        if valid:
            v.validate(name, value)
        else:
            with self.assertRaises(nova_exception.ValidationError):
                v.validate(name, value)

    def test_bounds_are_the_validators(self):
        prop = self.doc['properties']['epoch_ms']
        self.assertEqual('integer', prop['type'])
        self.assertEqual((ft_request.EPOCH_MS_MIN, ft_request.EPOCH_MS_MAX),
                         (prop['minimum'], prop['maximum']))
        low, high = prop['minimum'], prop['maximum']
        for value, valid in ((low, True), (high, True), (prop['default'],
                                                         True),
                             (low - 1, False), (high + 1, False)):
            self.assert_valid(ft_request.EPOCH_MS, str(value), valid)

    def test_choices_are_the_validators(self):
        prop = self.doc['properties']['disk_sync']
        self.assertEqual('string', prop['type'])
        self.assertEqual(sorted(ft_request.DISK_SYNC_CHOICES),
                         sorted(prop['enum']))
        self.assertIn(prop['default'], prop['enum'])
        for value in prop['enum']:
            self.assert_valid(ft_request.DISK_SYNC, value, True)
        self.assert_valid(ft_request.DISK_SYNC, 'rsync', False)

    def test_boolean_values_horizon_sends_are_accepted(self):
        prop = self.doc['properties']['enabled']
        self.assertEqual('boolean', prop['type'])
        for value in ('true', 'false', 'True', 'False'):
            self.assert_valid(ft_request.ENABLED, value, True)
        self.assert_valid(ft_request.ENABLED, 'maybe', False)


if __name__ == '__main__':
    unittest.main()
