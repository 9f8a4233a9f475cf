#!/bin/bash
# Set up this machine for mftvm (Debian 12, as root) and run a job:
#
#   tools/run.sh demo    install what is needed, then run "mftvm demo"
#   tools/run.sh test    install what is needed, then lint and run the tests
#   tools/run.sh cloud   install what is needed, then bring up an OpenStack
#                        control plane (tools/cloud/cloudlab.py) and say how
#                        to use it; tools/run.sh cloud-down stops it
#
# Installs Debian packages with apt-get and the Python packages, pinned by
# constraints.txt, into .venv in the source tree; the cloud lab's services
# go into .cloud-venv, pinned by tools/cloud/constraints.txt. Safe to run
# again.
set -euo pipefail
cd "$(dirname "$0")/.."
job=${1:-}
case "$job" in
    demo|test|cloud) ;;
    cloud-down)
        exec .cloud-venv/bin/python tools/cloud/cloudlab.py down ;;
    *) echo "usage: tools/run.sh demo|test|cloud|cloud-down" >&2; exit 2 ;;
esac

APT_PACKAGES="qemu-system-x86 qemu-utils busybox-static linux-image-cloud-amd64
    gcc libc6-dev python3-venv python3-dev libxxhash-dev iproute2 zstd
    xz-utils"
# The agent's integration tests start their own broker and coordination
# backend (in a network namespace); nothing is started system-wide.
# The libvirt tier runs a real libvirtd (started by the test).
if [ "$job" = test ]; then
    APT_PACKAGES="$APT_PACKAGES rabbitmq-server redis-server etcd-server iptables
        libvirt-daemon-system libvirt-dev pkg-config"
    # The e2e tier's browser test: headless Chromium driven through
    # chromedriver (Selenium) against the lab's Horizon.
    APT_PACKAGES="$APT_PACKAGES chromium chromium-driver"
fi
# The cloud lab (and the end-to-end tier, which runs it) starts its own
# MariaDB, RabbitMQ, etcd and OVN central in a network namespace, and per
# compute host libvirtd, Open vSwitch (userspace), ovn-controller and
# mftvm-agent; with --with-cinder a single-node Ceph (mon, mgr, OSD) for
# Cinder's RBD driver, whose Python bindings (rados, rbd) only Debian
# ships, and QEMU's rbd block driver (qemu-block-extra).
if [ "$job" = test ] || [ "$job" = cloud ]; then
    APT_PACKAGES="$APT_PACKAGES mariadb-server rabbitmq-server etcd-server
        ovn-central ovn-host openvswitch-switch
        libvirt-daemon-system libvirt-dev pkg-config
        ceph-mon ceph-mgr ceph-osd ceph-common python3-rados python3-rbd
        qemu-block-extra"
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

# cloud_venv - .cloud-venv: the OpenStack services and client, pinned by
# tools/cloud/constraints.txt (the e2e tier installs mftvm-openstack into
# it itself)
function cloud_venv {
    if [ ! -x .cloud-venv/bin/python ]; then
        echo "== creating .cloud-venv"
        "$PY" -m venv .cloud-venv
    fi
    local stamp=.cloud-venv/.mftvm-installed
    local want
    want=$(cat tools/cloud/constraints.txt tools/cloud/requirements.txt \
        requirements.txt | sha256sum)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "== pip install into .cloud-venv" \
             "(pinned by tools/cloud/constraints.txt)"
        .cloud-venv/bin/pip install -q --disable-pip-version-check \
            -c tools/cloud/constraints.txt -r tools/cloud/requirements.txt \
            -r requirements.txt
        echo "$want" > "$stamp"
    fi
}

# cloud_wheel - mftvm-openstack into .cloud-venv as an operator installs
# it: from a built wheel
function cloud_wheel {
    echo "== mftvm-openstack into .cloud-venv from a built wheel"
    rm -rf build/cloud-wheel
    .cloud-venv/bin/pip wheel -q --disable-pip-version-check --no-deps \
        --no-build-isolation -w build/cloud-wheel .
    .cloud-venv/bin/pip install -q --disable-pip-version-check --no-deps \
        --force-reinstall build/cloud-wheel/mftvm_openstack-*.whl
}

if [ "$job" = cloud ]; then
    cloud_venv
    cloud_wheel
    exec .cloud-venv/bin/python tools/cloud/cloudlab.py up
fi

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.mftvm-installed-$job
# (setup.py and the C source: the editable install builds the extension)
want=$(cat constraints.txt requirements.txt test-requirements.txt \
    nova-requirements.txt setup.cfg setup.py mftvm_openstack/ft/_pagehash.c \
    | sha256sum)
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
# The end-to-end tier (tests/e2e) runs the cloud lab from .cloud-venv.
cloud_venv

echo "== ruff"
.venv/bin/ruff check mftvm_openstack tests benchmarks tools
echo "== mypy"
.venv/bin/mypy mftvm_openstack tools/cloud
echo "== stestr"
rm -rf .stestr
rc=0
.venv/bin/stestr run --concurrency "${MFTVM_TEST_CONCURRENCY:-2}" \
    --exclude-regex '^tests\.e2e\.' || rc=$?
# One plain closing line with the counts (skips are failures here: a
# skipped test proves nothing).
.venv/bin/python tools/summarize.py || rc=1
# The end-to-end tier runs its own cloud (about 3 GB in 30-odd
# processes) after the other tiers, not beside them: on 2 cores the two
# would starve each other's real-time bounds.
echo "== stestr: end-to-end tier"
.venv/bin/stestr run --concurrency 1 '^tests\.e2e\.' || rc=$?
.venv/bin/python tools/summarize.py || rc=1
exit $rc
