#!/bin/bash
# Set up this machine for mftvm (Debian 12, as root) and run a job:
#
#   tools/run.sh demo    install what is needed, then run "mftvm demo"
#   tools/run.sh test    install what is needed, then lint and run the tests
#
# Installs Debian packages with apt-get and the Python packages, pinned by
# constraints.txt, into .venv in the source tree. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
job=${1:-}
case "$job" in
    demo|test) ;;
    *) echo "usage: tools/run.sh demo|test" >&2; exit 2 ;;
esac

APT_PACKAGES="qemu-system-x86 qemu-utils busybox-static linux-image-cloud-amd64
    gcc libc6-dev python3-venv python3-dev iproute2 zstd xz-utils"
# The agent's integration tests start their own broker and coordination
# backend (in a network namespace); nothing is started system-wide.
# The libvirt tier runs a real libvirtd (started by the test).
if [ "$job" = test ]; then
    APT_PACKAGES="$APT_PACKAGES rabbitmq-server redis-server etcd-server iptables
        libvirt-daemon-system libvirt-dev pkg-config"
fi

missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" \
        || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "tools/run.sh: missing Debian packages:$missing;" \
             "run as root (or sudo) to install them" >&2
        exit 1
    fi
    echo "== apt-get install$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.mftvm-installed-$job
want=$(cat constraints.txt requirements.txt test-requirements.txt \
    nova-requirements.txt setup.cfg | sha256sum)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "== pip install (pinned by constraints.txt)"
    # Nova (for its in-process functional harness) only for the tests.
    extra=""
    [ "$job" = test ] && extra="-r nova-requirements.txt"
    .venv/bin/pip install -q --disable-pip-version-check \
        -c constraints.txt -r requirements.txt -r test-requirements.txt \
        $extra
    .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt \
        --no-build-isolation -e .
    echo "$want" > "$stamp"
fi

if [ "$job" = demo ]; then
    exec .venv/bin/mftvm demo
fi

echo "== ruff"
.venv/bin/ruff check mftvm_openstack tests benchmarks
echo "== mypy"
.venv/bin/mypy mftvm_openstack
echo "== stestr"
rm -rf .stestr
rc=0
.venv/bin/stestr run --concurrency "${MFTVM_TEST_CONCURRENCY:-2}" || rc=$?
# One plain closing line with the counts (skips are failures here: a
# skipped test proves nothing).
.venv/bin/python tools/summarize.py || rc=1
exit $rc
