"""A lost secondary in the cloud lab: how soon an operator sees it, and
how soon the server is protected again.

Runs the e2e tier's lost-secondary steps
(``tests.e2e.test_reporting.ReportingTest``'s
``test_a_lost_secondary_shows_unprotected_then_protected_again``) with
``--rounds`` secondaries killed one after another, on one FT server, in
a lab of its own (``tests/e2e/lab.py``: up, three FT hosts, down at
exit). Each round kills the secondary (its host's agent, its instance
process and QEMU), sees Nova re-protect the server onto the other host,
and restarts the killed agent. For each round, seconds from the kill:

* to ``unprotected`` in the FT API (``GET /v1/servers/ID``, over HTTP),
  in the CLI (``openstack ft server show``, in one interactive
  ``openstack`` process) and on the notification bus
  (``mftvm.instance.secondary_lost``, when a listener got it);
* to the primary's own ``unprotected_since`` (when its side noticed);
* to protected again onto the new secondary (the FT API;
  ``mftvm.instance.reprotect.end``: its first epoch committed).

Prints each round, then min / median / max and how many rounds showed
``unprotected`` within 5 s (issue 14); writes
``results-lost-secondary.json``::

    .venv/bin/python benchmarks/lost_secondary.py [--rounds 4] [--out F]

Needs root and ``.cloud-venv`` (``tools/run.sh cloud`` makes it); takes
about 8 minutes for the lab and the server, then about a minute a round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.e2e import test_reporting  # noqa: E402

#: what each round measures, seconds from the kill
TIMES = ('api', 'cli', 'notification', 'unprotected since',
         'reprotected', 'reprotect.end')
#: issue 14: "unprotected within 5 s in the API, the CLI and the
#: notification stream"
WITHIN = 5.0


class Rounds(test_reporting.ReportingTest):
    """The reporting test, with as many rounds as asked."""


def summary(rounds: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for key in TIMES:
        values = [r[key] for r in rounds]
        out[key] = {'min': min(values), 'median': statistics.median(values),
                    'max': max(values)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=4)
    parser.add_argument('--out', default=os.path.join(
        ROOT, 'benchmarks', 'results-lost-secondary.json'))
    args = parser.parse_args()
    Rounds.rounds = args.rounds
    test = Rounds(
        'test_a_lost_secondary_shows_unprotected_then_protected_again')
    started = time.time()
    result = unittest.TextTestRunner(verbosity=2).run(
        unittest.TestSuite([test]))
    if not result.wasSuccessful():
        return 1
    rounds = test.lost_secondary
    for i, r in enumerate(rounds, 1):
        print(f'round {i}: {r["lost secondary"]} lost, '
              f'{r["new secondary"]} new; ' + ', '.join(
                  f'{key} {r[key]:.2f} s' for key in TIMES))
    sums = summary(rounds)
    for key, s in sums.items():
        print(f'kill -> {key}: min {s["min"]:.2f} s, median '
              f'{s["median"]:.2f} s, max {s["max"]:.2f} s')
    within = {key: sum(r[key] <= WITHIN for r in rounds)
              for key in ('api', 'cli', 'notification')}
    print(f'unprotected within {WITHIN:.0f} s: ' + ', '.join(
        f'{key} {n}/{len(rounds)}' for key, n in within.items()))
    with open(args.out, 'w') as f:
        json.dump({'started': started, 'load_average': os.getloadavg(),
                   'rounds': rounds, 'summary': sums,
                   f'within_{WITHIN:.0f}_s': within}, f, indent=1)
        f.write('\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
