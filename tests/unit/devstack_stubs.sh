#!/bin/bash
#
# Stand-ins for the DevStack functions that devstack/settings and
# devstack/plugin.sh call, for tests/unit/test_devstack_plugin.py.
#
# Each stub appends one line to $MFTVM_TEST_LOG: its name and arguments,
# separated by tabs. iniset and iniget work on real ini files (through
# $MFTVM_TEST_PYTHON), sudo runs its command as the current user, and the
# service list functions follow DevStack's rules (a service disabled in
# local.conf stays disabled when a plugin enables it).
#
# Inputs (environment): MFTVM_TEST_LOG, MFTVM_TEST_PYTHON,
# MFTVM_TEST_PLUGIN_DIR (the devstack/ directory), MFTVM_TEST_HOSTNAME,
# MFTVM_TEST_OS_PACKAGE (deb or rpm), MFTVM_TEST_EXEC_PREFIX,
# MFTVM_TEST_GROUPS (the system groups that exist, space-separated),
# MFTVM_TEST_LOCALRC (bash run before settings, like local.conf's localrc),
# and DevStack's own variables (ENABLED_SERVICES, HOST_IP, ...).
#
# A function that is not stubbed here fails the test: bash reports
# "command not found" and the harness runs under errexit.

function _record {
    local IFS=$'\t'
    printf '%s\n' "$*" >> "$MFTVM_TEST_LOG"
}

# inc/ini-config

function iniset {
    if [[ "$1" == "-sudo" ]]; then
        shift
    fi
    _record iniset "$@"
    "$MFTVM_TEST_PYTHON" - "$@" <<'PY'
import configparser
import sys

path, section, option, value = sys.argv[1:]
# [DEFAULT] as a section like the others (no inheritance)
conf = configparser.RawConfigParser(default_section='\0')
conf.optionxform = str
conf.read(path)
if not conf.has_section(section):
    conf.add_section(section)
conf.set(section, option, value)
with open(path, 'w') as f:
    conf.write(f)
PY
}

function iniget {
    _record iniget "$@"
    "$MFTVM_TEST_PYTHON" - "$@" <<'PY'
import configparser
import sys

path, section, option = sys.argv[1:]
conf = configparser.RawConfigParser(default_section='\0')
conf.optionxform = str
conf.read(path)
print(conf.get(section, option, fallback=''))
PY
}

# functions-common: services

function _cleanup_service_list {
    local list=$1
    list=$(printf '%s' "$list" | sed -e 's/,,*/,/g' -e 's/^,//' -e 's/,$//')
    printf '%s' "$list"
}

function is_service_enabled {
    local service
    for service in "$@"; do
        if [[ ",${ENABLED_SERVICES}," == *",${service},"* ]]; then
            return 0
        fi
    done
    return 1
}

function enable_service {
    _record enable_service "$@"
    local service
    for service in "$@"; do
        if [[ ",${DISABLED_SERVICES:-}," == *",${service},"* ]]; then
            continue
        fi
        if ! is_service_enabled "$service"; then
            ENABLED_SERVICES+=",$service"
        fi
    done
    ENABLED_SERVICES=$(_cleanup_service_list "$ENABLED_SERVICES")
}

function disable_service {
    _record disable_service "$@"
    local service
    local enabled=",${ENABLED_SERVICES},"
    for service in "$@"; do
        DISABLED_SERVICES="${DISABLED_SERVICES:-},$service"
        enabled=${enabled//,$service,/,}
    done
    DISABLED_SERVICES=$(_cleanup_service_list "$DISABLED_SERVICES")
    ENABLED_SERVICES=$(_cleanup_service_list "$enabled")
}

# functions-common: plugins, messages, processes, packages

function define_plugin {
    _record define_plugin "$@"
}

function plugin_requires {
    _record plugin_requires "$@"
}

function echo_summary {
    _record echo_summary "$@"
}

function warn {
    _record warn "$@"
}

function die {
    _record die "$@"
    shift
    echo "die: $*" >&2
    exit 1
}

function trueorfalse {
    local default=$1
    local value=${!2:-}
    case "$value" in
        "") echo "$default" ;;
        1|yes|Yes|YES|true|True|TRUE|on|On|ON) echo True ;;
        0|no|No|NO|false|False|FALSE|off|Off|OFF) echo False ;;
        *) echo "$default" ;;
    esac
}

function is_ubuntu {
    [[ "${MFTVM_TEST_OS_PACKAGE:-deb}" == "deb" ]]
}

function is_fedora {
    [[ "${MFTVM_TEST_OS_PACKAGE:-deb}" == "rpm" ]]
}

function exit_distro_not_supported {
    _record exit_distro_not_supported "$@"
    echo "exit_distro_not_supported: $*" >&2
    exit 1
}

function install_package {
    _record install_package "$@"
}

function add_user_to_group {
    _record add_user_to_group "$@"
}

function restart_service {
    _record restart_service "$@"
}

function run_process {
    _record run_process "$@"
}

function stop_process {
    _record stop_process "$@"
}

# inc/python, lib/rpc_backend, functions

function get_python_exec_prefix {
    echo "${MFTVM_TEST_EXEC_PREFIX:-/opt/stack/data/venv/bin}"
}

function setup_develop {
    _record setup_develop "$@"
}

function get_transport_url {
    _record get_transport_url "$@"
    local virtual_host=${1:-}
    if is_service_enabled rabbit || [[ -n "${RABBIT_HOST:-}" \
            && -n "${RABBIT_PASSWORD:-}" ]]; then
        local auth="$RABBIT_USERID:$RABBIT_PASSWORD"
        echo "rabbit://$auth@$RABBIT_HOST:5672/$virtual_host"
    fi
}

function setup_logging {
    _record setup_logging "$@"
}

# The system

function sudo {
    _record sudo "$@"
    "$@"
}

# getent group NAME: the groups in $MFTVM_TEST_GROUPS exist
function getent {
    _record getent "$@"
    [[ "$1" == "group" && " ${MFTVM_TEST_GROUPS:-} " == *" $2 "* ]] \
        && echo "$2:x:999:"
}

function hostname {
    echo "$MFTVM_TEST_HOSTNAME"
}

# Entry points for the tests

function devstack_load_settings {
    eval "${MFTVM_TEST_LOCALRC:-}"
    source "$MFTVM_TEST_PLUGIN_DIR/settings"
}

# devstack_print_settings - the plugin's variables, one NAME=value a line
function devstack_print_settings {
    devstack_load_settings
    local name
    for name in ${!MFTVM_@} ENABLED_SERVICES; do
        case "$name" in
            MFTVM_TEST_*) ;;
            *) printf '%s=%s\n' "$name" "${!name}" ;;
        esac
    done
}

# devstack_run_phase MODE [PHASE] - what stack.sh, unstack.sh or clean.sh
# do for one phase: settings, then plugin.sh sourced with the phase
function devstack_run_phase {
    devstack_load_settings
    source "$MFTVM_TEST_PLUGIN_DIR/plugin.sh" "$@"
    _record xtrace "$(set +o | grep xtrace)"
}
