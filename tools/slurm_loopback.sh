#!/usr/bin/env bash
# A one-node Slurm cluster on 127.0.0.1, for tests/test_slurm.py and for trying the examples'
# sbatch scripts on one machine. Installs Debian's slurmctld, slurmd, slurm-client and munge
# (apt-get, as root), writes /etc/slurm/slurm.conf, and starts munged (as user munge),
# slurmctld and slurmd without systemd.
#
# Idempotent: exits 0 at once when `sinfo` already answers. Exits non-zero with one line on
# stderr saying why when it cannot (not root, no apt-get, packages not installable, a daemon
# that does not come up).
#
#   sudo tools/slurm_loopback.sh && sbatch --wait --wrap hostname
#
# Knobs: SLURM_LOOPBACK_TIMEOUT (seconds to wait for apt-get and for the node, default 300).
set -euo pipefail
TIMEOUT=${SLURM_LOOPBACK_TIMEOUT:-300}
CONF=/etc/slurm/slurm.conf

die() { echo "slurm_loopback: $*" >&2; exit 1; }
answers() { command -v sinfo >/dev/null && timeout 10 sinfo -h >/dev/null 2>&1; }
node_state() { timeout 10 sinfo -h -N -o %T 2>/dev/null | head -n1; }
# A state with a trailing * (not responding), down or drained cannot run jobs.
node_up() { [[ "$1" =~ ^(idle|mixed|allocated|completing)$ ]]; }

if answers && node_up "$(node_state)"; then
    echo "slurm_loopback: Slurm already answers (node $(node_state)); nothing to do"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || die "needs root (apt-get install and the Slurm daemons); run it with sudo"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "needs apt-get (a Debian/Ubuntu machine) to install Slurm"
    export DEBIAN_FRONTEND=noninteractive
    timeout "${TIMEOUT}" apt-get update -q >/dev/null 2>&1 \
        || die "apt-get update failed (no network or no package mirror?)"
    # policy-rc.d 101: the packages' postinst must not try to start services (no systemd here).
    policy=/usr/sbin/policy-rc.d
    had_policy=0; [[ -e ${policy} ]] && had_policy=1
    [[ ${had_policy} -eq 1 ]] || printf '#!/bin/sh\nexit 101\n' >"${policy}"
    chmod +x "${policy}"
    status=0
    timeout "${TIMEOUT}" apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge >/tmp/slurm_loopback_apt.log 2>&1 || status=$?
    [[ ${had_policy} -eq 1 ]] || rm -f "${policy}"
    [[ ${status} -eq 0 ]] || die "apt-get install slurmctld slurmd slurm-client munge failed" \
        "(exit ${status}; see /tmp/slurm_loopback_apt.log)"
fi

# munge: a key, its runtime folder, and the daemon as user munge.
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile /etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! timeout 5 munge -n </dev/null >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge)"
    timeout 5 munge -n </dev/null >/dev/null 2>&1 || die "munged started but munge -n fails"
fi

# slurm.conf: this host as controller and only node, on 127.0.0.1.
host=$(hostname -s)
num_cpus=$(nproc)
MARK="# Written by tools/slurm_loopback.sh: a one-node cluster on 127.0.0.1."
if [[ -e ${CONF} ]] && ! grep -qxF "${MARK}" "${CONF}"; then
    die "${CONF} exists and is not ours; not touching a real cluster's configuration"
fi
install -d -m 0755 /etc/slurm /var/log/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
cat >"${CONF}" <<EOF
${MARK}
ClusterName=loopback
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${num_cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# The daemons fork into the background; -i: ignore state left by an earlier cluster.
pgrep -x slurmctld >/dev/null || slurmctld -i || die "slurmctld did not start (see /var/log/slurm)"
pgrep -x slurmd >/dev/null || slurmd || die "slurmd did not start (see /var/log/slurm)"

deadline=$((SECONDS + TIMEOUT))
while (( SECONDS < deadline )); do
    state=$(node_state || true)
    if node_up "${state}"; then
        echo "slurm_loopback: node ${host} (${num_cpus} CPUs) is ${state}"
        exit 0
    fi
    case "${state}" in
        down|drained|draining)  # left over from an earlier run of the daemons
            timeout 10 scontrol update nodename="${host}" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
die "node ${host} did not become idle in ${TIMEOUT} s (state: ${state:-none}; see /var/log/slurm)"
