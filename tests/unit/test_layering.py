"""The house's layering: who may import whom.

Direction of dependencies (doc/architecture.rst): ``cmd`` -> ``agent`` /
``nova`` -> ``local`` / ``instance`` -> ``ft``; ``fencing``, ``contract``
and the small shared modules sit below all of them. The import graph is
read from the source (every import, lazy ones inside functions too), so a
cycle cannot hide behind an import that only runs later. That nova-api
stays light is checked with Nova's tier (tests/nova/test_light_import.py).
"""

import ast
import functools
import os
import unittest

import mftvm_openstack

ROOT = os.path.dirname(mftvm_openstack.__file__)

#: what each package may import of ours, besides itself
ALLOWED = {
    'contract': set(),
    'files': set(),
    'waiting': set(),
    'conf': {'contract'},
    # writes a compute host's configuration (DevStack, the cloud lab)
    'deploy': {'contract', 'files'},
    'fencing': {'files', 'waiting'},
    'images': {'ft', 'contract'},
    'ft': {'contract', 'files', 'waiting'},
    'instance': {'ft', 'contract', 'fencing', 'files', 'waiting'},
    'local': {'instance', 'ft', 'contract', 'images', 'files', 'waiting'},
    'agent': {'instance', 'ft', 'contract', 'conf', 'fencing', 'files',
              'waiting'},
    # Cinder attachments and RBD volumes of FT servers (doc/volumes.rst)
    'cinder': {'contract'},
    'nova': {'agent', 'cinder', 'contract', 'conf', 'files', 'waiting'},
    # the FT API: Nova's FT request rules (nova/ft_request.py, light),
    # the agents' RPC client
    'api': {'agent', 'nova', 'contract', 'conf', 'files', 'waiting'},
    # the openstack CLI plugin: nothing but the records it reads
    'osc': {'contract'},
    'cmd': {'agent', 'api', 'local', 'instance', 'ft', 'contract', 'conf',
            'fencing', 'files', 'waiting'},
}

#: OpenStack's parts, which the engine must not know
OPENSTACK = ('oslo_', 'oslo.', 'nova', 'keystone', 'tooz', 'cinder',
             'glance', 'neutron', 'os_', 'openstack')


def _modules():
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                yield rel, path


def _package(rel):
    return rel[0]


def _imports(path, rel):
    """Absolute module names imported anywhere in the file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ['mftvm_openstack', *rel[:-1]]
                base = base[:len(base) - node.level + 1]
                module = '.'.join(base + ([node.module] if node.module
                                          else []))
            else:
                module = node.module or ''
            yield module
            for alias in node.names:
                yield f'{module}.{alias.name}'


@functools.lru_cache(maxsize=1)
def package_graph():
    graph = {}
    third_party = {}
    for rel, path in _modules():
        pkg = _package(rel)
        deps = graph.setdefault(pkg, set())
        other = third_party.setdefault(pkg, set())
        for name in _imports(path, rel):
            parts = name.split('.')
            if parts[0] == 'mftvm_openstack':
                if len(parts) > 1 and parts[1] != pkg:
                    deps.add(parts[1])
            else:
                other.add(name)
    return graph, third_party


def find_cycle(graph):
    state = {}

    def visit(node, path):
        state[node] = 'open'
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 'open':
                return path + [node, dep]
            if dep not in state:
                found = visit(dep, path + [node])
                if found:
                    return found
        state[node] = 'done'
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


class LayeringTest(unittest.TestCase):

    def test_every_package_is_placed(self):
        graph, _ = package_graph()
        self.assertEqual(set(), set(graph) - set(ALLOWED) - {'__init__'},
                         'a new package needs its place in ALLOWED')

    def test_imports_follow_the_layers(self):
        graph, _ = package_graph()
        wrong = {pkg: sorted(deps - ALLOWED[pkg])
                 for pkg, deps in graph.items()
                 if pkg in ALLOWED and deps - ALLOWED[pkg]}
        self.assertEqual({}, wrong)

    def test_no_cycle_between_packages(self):
        graph, _ = package_graph()
        self.assertIsNone(find_cycle(graph))

    def test_cycle_finder_finds_one(self):
        # The check above must be able to fail.
        self.assertEqual(['a', 'b', 'a'],
                         find_cycle({'a': {'b'}, 'b': {'a'}}))
        self.assertIsNone(find_cycle({'a': {'b'}, 'b': set()}))

    def test_engine_knows_nothing_of_openstack(self):
        _, third_party = package_graph()
        for pkg in ('ft', 'contract', 'files', 'waiting'):
            known = sorted(n for n in third_party[pkg]
                           if n.startswith(OPENSTACK))
            self.assertEqual([], known, pkg)
