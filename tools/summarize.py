"""Print 'N passed, N failed, N skipped' for the last stestr run.

Exits non-zero when a test failed, was skipped, or none ran: a skipped
test proves nothing, so it must not pass silently.
"""

import subprocess
import sys

import subunit
import testtools


def main() -> int:
    stream = subprocess.run(['.venv/bin/stestr', 'last', '--subunit'],
                            capture_output=True, check=True).stdout
    import io
    case = subunit.ByteStreamToStreamResult(io.BytesIO(stream))
    counts = {'success': 0, 'fail': 0, 'skip': 0}
    skipped = []

    class Tally(testtools.StreamResult):
        def status(self, test_id=None, test_status=None, **kwargs):
            if test_status in ('success', 'xfail'):
                counts['success'] += 1
            elif test_status in ('fail', 'uxsuccess'):
                counts['fail'] += 1
            elif test_status == 'skip':
                counts['skip'] += 1
                skipped.append(test_id)

    tally = Tally()
    tally.startTestRun()
    case.run(tally)
    tally.stopTestRun()
    for test_id in skipped:
        print(f'SKIPPED (counts as a failure): {test_id}')
    print(f"{counts['success']} passed, {counts['fail']} failed, "
          f"{counts['skip']} skipped")
    ok = counts['success'] > 0 and counts['fail'] == 0 and \
        counts['skip'] == 0
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
