"""The configuration reference stays in step with the registered options.

``etc/mftvm/mftvm.conf.sample`` is generated from the option definitions
(``mftvm_openstack/conf``) and the libraries' own options; these tests fail
when it is stale, when an option has no help text, or when an option is
registered on ``CONF`` but missing from ``list_opts`` (and so from the
sample), or the other way round.
"""

import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from importlib import metadata

import testtools

from mftvm_openstack import conf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
GENERATOR_CONF = os.path.join('etc', 'mftvm', 'mftvm-config-generator.conf')
SAMPLE = os.path.join('etc', 'mftvm', 'mftvm.conf.sample')
REGENERATE = (
    'Regenerate it and commit the result:\n'
    '    tox -e genconfig\n'
    'or, without tox, from the top of the source tree:\n'
    f'    .venv/bin/oslo-config-generator --config-file {GENERATOR_CONF}\n')
MAX_DIFF_LINES = 80


def _namespaces():
    """The namespaces the generator config lists, in order."""
    with open(os.path.join(ROOT, GENERATOR_CONF)) as f:
        return re.findall(r'^\s*namespace\s*=\s*(\S+)\s*$', f.read(), re.M)


def _group_name(group):
    if group is None:
        return 'DEFAULT'
    return getattr(group, 'name', group)


def _listed(list_opts):
    """{group: {opt dest, ...}} from a list_opts() result."""
    listed = {}
    for group, opts in list_opts:
        listed.setdefault(_group_name(group), set()).update(
            opt.dest for opt in opts)
    return listed


def _run(args, what):
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise AssertionError(
            f'{what} failed (exit {proc.returncode}):\n'
            f'{proc.stdout}{proc.stderr}')
    return proc.stdout


# Imports every module of the package in a fresh interpreter (so that
# neither the other tests nor the modules' import side effects interfere)
# and prints what ended up registered on the global CONF, less what every
# ConfigOpts holds (oslo.config's own config_source, shell_completion).
_REGISTERED = textwrap.dedent('''
    import importlib, json, pkgutil
    from oslo_config import cfg
    import mftvm_openstack
    from mftvm_openstack import conf
    for mod in pkgutil.walk_packages(mftvm_openstack.__path__,
                                     'mftvm_openstack.'):
        # The Nova driver runs inside nova-compute, with Nova's options.
        if not mod.name.startswith('mftvm_openstack.nova'):
            importlib.import_module(mod.name)
    builtin = set(cfg.ConfigOpts())
    registered = {'DEFAULT': []}
    for name in conf.CONF:
        if name in builtin:
            continue
        try:
            value = conf.CONF[name]
        except Exception:
            value = None
        if isinstance(value, cfg.ConfigOpts.GroupAttr):
            registered[name] = sorted(value)
        else:
            registered['DEFAULT'].append(name)
    print(json.dumps(registered))
''')


class TestConfigSample(testtools.TestCase):

    def _check_namespaces(self):
        namespaces = _namespaces()
        self.assertIn('mftvm', namespaces)
        available = {ep.name: ep.value for ep in
                     metadata.entry_points(group='oslo.config.opts')}
        missing = [ns for ns in namespaces if ns not in available]
        self.assertEqual(
            [], missing,
            f'{GENERATOR_CONF} lists namespaces that no installed package '
            'provides (entry point group oslo.config.opts). For "mftvm", '
            'reinstall the package: .venv/bin/pip install '
            '--no-build-isolation -e .')
        self.assertEqual('mftvm_openstack.conf:list_opts',
                         available['mftvm'])

    def test_generator_config_namespaces_exist(self):
        self._check_namespaces()

    def test_sample_is_up_to_date(self):
        # Without the entry point the generator silently leaves the mftvm
        # sections out; say so instead of reporting a stale sample.
        self._check_namespaces()
        with tempfile.TemporaryDirectory() as tmp:
            fresh = os.path.join(tmp, 'mftvm.conf.sample')
            _run([sys.executable, '-m', 'oslo_config.generator',
                  '--config-file', GENERATOR_CONF,
                  '--output-file', fresh], 'oslo-config-generator')
            with open(fresh) as f:
                expected = f.read()
        try:
            with open(os.path.join(ROOT, SAMPLE)) as f:
                committed = f.read()
        except FileNotFoundError:
            self.fail(f'{SAMPLE} is missing. {REGENERATE}')
        if committed == expected:
            return
        diff = list(difflib.unified_diff(
            committed.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            fromfile=f'{SAMPLE} (committed)',
            tofile=f'{SAMPLE} (generated now)'))
        if len(diff) > MAX_DIFF_LINES:
            diff = diff[:MAX_DIFF_LINES] + [
                f'... ({len(diff) - MAX_DIFF_LINES} more diff lines)\n']
        self.fail(
            f'{SAMPLE} is stale: it does not match what '
            f'oslo-config-generator writes from the current options (or '
            f'from the oslo.log/oslo.messaging versions in constraints.txt). '
            f'{REGENERATE}\n' + ''.join(diff))

    def test_every_option_has_help(self):
        no_help = [f'[{_group_name(group)}] {opt.dest}'
                   for group, opts in conf.list_opts()
                   for opt in opts
                   if not (opt.help or '').strip()]
        self.assertEqual(
            [], no_help,
            'options without help text (the sample is the operators\' '
            'reference): give each a help= string in mftvm_openstack/conf')

    def test_list_opts_matches_registered(self):
        listed = _listed(conf.list_opts())
        registered = {group: set(names) for group, names in json.loads(
            _run([sys.executable, '-c', _REGISTERED],
                 'importing mftvm_openstack').strip().splitlines()[-1]
        ).items()}

        # The options the other namespaces of the sample document.
        others = {}
        for ep in metadata.entry_points(group='oslo.config.opts'):
            if ep.name != 'mftvm' and ep.name in _namespaces():
                for group, names in _listed(ep.load()()).items():
                    others.setdefault(group, set()).update(names)

        # Each of our groups holds exactly the options list_opts gives;
        # [DEFAULT] may also hold the libraries' options.
        for group, names in sorted(listed.items()):
            have = registered.get(group, set())
            self.assertEqual(
                set(), names - have,
                f'[{group}]: in list_opts() but not registered on CONF')
            extra = have - names
            if group == 'DEFAULT':
                extra -= others.get('DEFAULT', set())
            self.assertEqual(
                set(), extra,
                f'[{group}]: registered on CONF but missing from '
                'list_opts(), so from the sample; add them to GROUPS in '
                'mftvm_openstack/conf')

        # Nothing registered anywhere else goes undocumented, except the
        # libraries' own internal groups (oslo_*: metrics, tracing and
        # lock settings that tooz and oslo.messaging register for
        # themselves).
        unlisted = {
            group: sorted(names - others.get(group, set()))
            for group, names in registered.items()
            if group not in listed and not group.startswith('oslo_')}
        unlisted = {g: n for g, n in unlisted.items() if n}
        self.assertEqual(
            {}, unlisted,
            'options registered on CONF that no namespace of '
            f'{GENERATOR_CONF} lists: add them to mftvm_openstack/conf '
            'list_opts() or add their library\'s namespace to '
            f'{GENERATOR_CONF}')
