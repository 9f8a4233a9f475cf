"""What nova-api loads of ours stays light.

nova-api imports the flavor validators (entry point
``nova.api.extra_spec_validators``) and with them ``conf``: neither may
pull in the engine (numpy, stevedore, qemu.qmp).
"""

import subprocess
import sys
import textwrap
import unittest

_LIGHT = textwrap.dedent('''
    import sys
    import oslo_config.cfg
    from nova.api.validation.extra_specs import base
    before = set(sys.modules)
    import mftvm_openstack.conf
    import mftvm_openstack.nova.extra_specs
    added = set(sys.modules) - before
    heavy = sorted(m for m in added
                   if m.split('.')[0] in ('numpy', 'stevedore', 'qemu')
                   or m.startswith('mftvm_openstack.ft'))
    heavy += [m for m in ('numpy', 'qemu.qmp') if m in sys.modules]
    print(','.join(heavy))
''')


class LightImportTest(unittest.TestCase):

    def test_flavor_validators_and_options_import_no_engine(self):
        # nova-api loads the flavor validators and conf: neither may pull
        # in the engine (numpy, stevedore, qemu.qmp). oslo.config itself
        # imports stevedore, so what counts is what our import adds.
        out = subprocess.run([sys.executable, '-c', _LIGHT],
                             capture_output=True, text=True, check=True)
        self.assertEqual('', out.stdout.strip())


_SCHEDULER = textwrap.dedent('''
    import sys
    from nova.scheduler import filters
    before = set(sys.modules)
    import mftvm_openstack.nova.scheduler_filter
    added = set(sys.modules) - before
    heavy = sorted(m for m in added
                   if m.split('.')[0] in ('numpy', 'qemu', 'libvirt')
                   or m.startswith(('mftvm_openstack.ft',
                                    'mftvm_openstack.agent',
                                    'mftvm_openstack.nova.driver',
                                    'nova.virt.libvirt')))
    print(','.join(heavy))
''')


class SchedulerFilterImportTest(unittest.TestCase):

    def test_filter_imports_no_driver_nor_engine(self):
        # nova-scheduler loads FTHostFilter: it must not pull in the
        # compute driver (libvirt) nor the agent or the engine
        out = subprocess.run([sys.executable, '-c', _SCHEDULER],
                             capture_output=True, text=True, check=True)
        self.assertEqual('', out.stdout.strip())
