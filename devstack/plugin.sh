#!/bin/bash
#
# devstack/plugin.sh - DevStack plugin for mftvm-openstack
#
# Fault-tolerant instances: one mftvm-agent on every hypervisor, Nova's
# compute driver set to mftvm.FTLibvirtDriver, DevStack's etcd as the fencing
# backend.
#
# stack.sh sources this file with the phase as arguments:
#
#   stack pre-install   QEMU packages (redis-server if asked for); the
#                       fencing store checked
#   stack install       the mftvm-openstack package (and Nova's
#                       nova.virt.mftvm shim); Redis started if asked
#   stack post-config   $MFTVM_CONF written; compute_driver in $NOVA_CONF
#   stack extra         mftvm-agent started; the Glance metadefs of the
#                       ft: flavor properties loaded where g-api runs
#   unstack             mftvm-agent stopped
#   clean               state and configuration removed
#
# Variables and their defaults are in devstack/settings.

# Save trace setting
_XTRACE_MFTVM=$(set +o | grep xtrace)
set -o xtrace


# Functions
# ---------

# _mftvm_on_service_host - true on the node that is $SERVICE_HOST
function _mftvm_on_service_host {
    case "$SERVICE_HOST" in
        "$HOST_IP"|"${HOST_IPV6:-}"|localhost|127.0.0.1|::1|"$(hostname)")
            return 0
            ;;
    esac
    return 1
}

# _mftvm_wants_redis - true where Redis is to be installed and run
function _mftvm_wants_redis {
    [[ "$MFTVM_INSTALL_REDIS" == "True" ]] \
        && [[ "$MFTVM_FENCING_URL" == redis://* ]] && _mftvm_on_service_host
}

# check_mftvm_fencing - stop early if the fencing store will not be there
function check_mftvm_fencing {
    # The default URL names DevStack's etcd on this node: it must run.
    if [[ "$MFTVM_FENCING_URL" == "etcd3+http://$SERVICE_HOST:"* ]] \
            && _mftvm_on_service_host && ! is_service_enabled etcd3; then
        die $LINENO "MFTVM_FENCING_URL is DevStack's etcd on this node," \
            "but the etcd3 service is disabled: enable_service etcd3, or" \
            "set MFTVM_FENCING_URL to your own store"
    fi
}

# install_mftvm_packages - QEMU for the agent, Redis for fencing
function install_mftvm_packages {
    if ! is_ubuntu; then
        exit_distro_not_supported "mftvm-openstack (Debian or Ubuntu only)"
    fi
    # the hash tracker's C extension (built by install_mftvm) links it
    install_package libxxhash-dev
    if is_service_enabled mftvm-agent; then
        # qemu-utils brings qemu-storage-daemon and qemu-img
        install_package qemu-system-x86 qemu-utils
    fi
    if _mftvm_wants_redis; then
        install_package redis-server
    fi
}

# configure_mftvm_redis - make Redis reachable from the other nodes
function configure_mftvm_redis {
    # Debian's redis.conf listens on the loopback only; the last bind line
    # wins, so append ours (replacing the one of an earlier run).
    local bind="127.0.0.1"
    case "$SERVICE_HOST" in
        localhost|127.0.0.1) ;;
        *) bind="$bind $SERVICE_HOST" ;;
    esac
    sudo sed -i '/^# mftvm-openstack$/,+1d' "$MFTVM_REDIS_CONF"
    printf '# mftvm-openstack\nbind %s\n' "$bind" \
        | sudo tee -a "$MFTVM_REDIS_CONF" >/dev/null
    restart_service redis-server
}

# _mftvm_python - the Python that has mftvm-openstack: DevStack's global
# venv (owned by $STACK_USER), else the system's
function _mftvm_python {
    local python=$MFTVM_BIN_DIR/python3
    if [[ -x "$python" ]]; then
        echo "$python"
    else
        echo python3
    fi
}

# _mftvm_shim - run the nova.virt.mftvm shim tool (install or remove)
function _mftvm_shim {
    local python
    python=$(_mftvm_python)
    if [[ "$python" == python3 ]]; then
        # Nova's directory belongs to root outside a venv
        sudo -H python3 -m mftvm_openstack.nova.virt_shim "$1"
    else
        "$python" -m mftvm_openstack.nova.virt_shim "$1"
    fi
}

# _mftvm_deploy - the project's own configuration writer (the cloud lab
# runs the same one): python -m mftvm_openstack.deploy agent|nova ...
function _mftvm_deploy {
    "$(_mftvm_python)" -m mftvm_openstack.deploy "$@"
}

# install_mftvm - the Python package (agent, Nova driver, validators)
function install_mftvm {
    setup_develop "$MFTVM_DIR"
    # Nova imports its driver as nova.virt.mftvm, which an editable
    # install cannot provide: put the shim where a wheel would.
    _mftvm_shim install
}

# configure_mftvm - write $MFTVM_CONF
function configure_mftvm {
    sudo install -d -o "$STACK_USER" "$MFTVM_CONF_DIR" "$MFTVM_STATE_PATH"
    if is_service_enabled mftvm-agent && getent group kvm >/dev/null; then
        # the agent runs QEMU as $STACK_USER: let it use KVM
        add_user_to_group "$STACK_USER" kvm
    fi

    # The agents must listen where nova-compute talks: its cell's vhost
    # (MFTVM_RPC_VHOST, see settings).
    local transport_url
    transport_url=$(get_transport_url "$MFTVM_RPC_VHOST")
    if [[ -z "$transport_url" ]] && is_service_enabled mftvm-agent; then
        die $LINENO "mftvm-agent needs RabbitMQ: enable rabbit here, or" \
            "set RABBIT_HOST and RABBIT_PASSWORD"
    fi

    # The URLs hold passwords: through the environment, not argv.
    MFTVM_TRANSPORT_URL=$transport_url \
        MFTVM_FENCING_URL=$MFTVM_FENCING_URL \
        _mftvm_deploy agent --conf "$MFTVM_CONF" --host "$MFTVM_HOST" \
        --nova-conf "$NOVA_CONF" --my-ip "$MFTVM_MY_IP" \
        --state-path "$MFTVM_STATE_PATH" --peers "$MFTVM_PEERS" \
        --lease "$MFTVM_LEASE" --epoch-ms "$MFTVM_EPOCH_MS" \
        --notification-driver "$MFTVM_NOTIFICATION_DRIVER" \
        --metrics-port "$MFTVM_METRICS_PORT" \
        --metrics-bind-address "$MFTVM_METRICS_BIND_ADDRESS" \
        --debug "$ENABLE_DEBUG_LOG_LEVEL" \
        || die $LINENO "could not write $MFTVM_CONF"
    setup_logging "$MFTVM_CONF"
}

# configure_mftvm_nova - Nova's compute driver on compute nodes
function configure_mftvm_nova {
    # DevStack writes the compute's configuration (nova-cpu.conf) from
    # $NOVA_CONF when it starts nova-compute, after this phase.
    if [[ "$MFTVM_SET_COMPUTE_DRIVER" != "True" ]] \
            || ! is_service_enabled n-cpu; then
        return
    fi
    if [[ "$VIRT_DRIVER" != "libvirt" ]]; then
        warn $LINENO "compute_driver left alone: $MFTVM_COMPUTE_DRIVER" \
            "needs VIRT_DRIVER=libvirt, not $VIRT_DRIVER"
        return
    fi
    _mftvm_deploy nova --nova-conf "$NOVA_CONF" \
        --compute-driver "$MFTVM_COMPUTE_DRIVER" \
        --file-backed-memory "${MFTVM_FILE_BACKED_MEMORY:-auto}" \
        || die $LINENO "could not set Nova's options in $NOVA_CONF"
}

# start_mftvm_agent - run the agent as a DevStack service
function start_mftvm_agent {
    run_process mftvm-agent \
        "$MFTVM_BIN_DIR/mftvm-agent --config-file $MFTVM_CONF"
}

# load_mftvm_metadefs - the ft: flavor properties into Glance's metadefs
# catalog (Horizon's "Update Metadata" dialog offers them from there)
function load_mftvm_metadefs {
    local manage=${GLANCE_BIN_DIR:-$MFTVM_BIN_DIR}/glance-manage
    local conf_dir=${GLANCE_CONF_DIR:-/etc/glance}
    local conf=${GLANCE_API_CONF:-$conf_dir/glance-api.conf}
    # --merge --overwrite: a second stack.sh replaces what the first
    # loaded (the ranges may have changed)
    "$manage" --config-file "$conf" db load_metadefs \
        --path "$MFTVM_DIR/etc/metadefs/mftvm-ft.json" --merge --overwrite
}

# stop_mftvm_agent - stop the agent (guests it started keep running)
function stop_mftvm_agent {
    stop_process mftvm-agent
}

# cleanup_mftvm - remove the agent's state and configuration, and the
# shim that install_mftvm put into Nova
function cleanup_mftvm {
    sudo rm -rf "${MFTVM_STATE_PATH:?}" "${MFTVM_CONF_DIR:?}"
    _mftvm_shim remove || true
}


# Dispatcher
# ----------

if [[ "$1" == "stack" && "$2" == "pre-install" ]]; then
    echo_summary "Installing packages for mftvm-openstack"
    check_mftvm_fencing
    install_mftvm_packages

elif [[ "$1" == "stack" && "$2" == "install" ]]; then
    echo_summary "Installing mftvm-openstack"
    install_mftvm
    if _mftvm_wants_redis; then
        echo_summary "Configuring Redis for mftvm fencing"
        configure_mftvm_redis
    fi

elif [[ "$1" == "stack" && "$2" == "post-config" ]]; then
    echo_summary "Configuring mftvm-openstack"
    configure_mftvm
    configure_mftvm_nova

elif [[ "$1" == "stack" && "$2" == "extra" ]]; then
    if is_service_enabled mftvm-agent; then
        echo_summary "Starting mftvm-agent"
        start_mftvm_agent
    fi
    if is_service_enabled g-api && [[ "$MFTVM_LOAD_METADEFS" == "True" ]]; then
        echo_summary "Loading the Glance metadefs of mftvm-openstack"
        load_mftvm_metadefs
    fi
fi

if [[ "$1" == "unstack" ]]; then
    if is_service_enabled mftvm-agent; then
        stop_mftvm_agent
    fi
fi

if [[ "$1" == "clean" ]]; then
    cleanup_mftvm
fi

# Restore xtrace
$_XTRACE_MFTVM

# Tell emacs to use shell-script-mode
## Local variables:
## mode: shell-script
## End:
