# check_master_port PORT: on the node that hosts torchrun's store (node rank 0), fail with one
# line when something already listens on the port (another run on MASTER_PORT would otherwise
# end in a traceback of torchrun's rendezvous). Sourced by the launch scripts.
check_master_port() {
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
        echo "error: MASTER_PORT $1 is in use on this machine (another run?): set MASTER_PORT" \
             "to a free port" >&2
        exit 2
    fi
}
