# Checks the launch scripts run before they start anything (sourced by them):
#
# find_launcher: sets LAUNCHER to the command that starts the processes: $LAUNCHER when set
# (torchrun, or a wrapper of the cluster's), else paced-run (torchrun whose failures end in one
# line, megatron_paced/launch.py) from the active environment, else from the repository's
# .venv (what `make install` builds), so the examples run without activating it; else it fails
# in one line.
find_launcher() {
    [[ -z ${LAUNCHER:-} ]] || return 0
    local repo
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    if command -v paced-run >/dev/null 2>&1; then
        LAUNCHER=paced-run
    elif [[ -x ${repo}/.venv/bin/paced-run ]]; then
        LAUNCHER=${repo}/.venv/bin/paced-run
    else
        echo "error: paced-run not found: run make install (it builds ${repo}/.venv), activate" \
             "an environment with megatron-paced installed, or set LAUNCHER=torchrun" >&2
        exit 2
    fi
}

# check_master_port PORT: on the node that hosts torchrun's store (node rank 0), fail with one
# line when something already listens on the port (another run on MASTER_PORT would otherwise
# end in a traceback of torchrun's rendezvous).
check_master_port() {
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
        echo "error: MASTER_PORT $1 is in use on this machine (another run?): set MASTER_PORT" \
             "to a free port" >&2
        exit 2
    fi
}
