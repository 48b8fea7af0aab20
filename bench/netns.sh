# Shared by the benchmarks that run hosts as network namespaces; sourced,
# not run. The caller defines die() and deletes the namespaces on exit.

# bridge_hosts SWITCH SUBNET HOST...: namespace SWITCH holds a bridge; the
# Nth HOST (from 1) gets its own namespace with eth0 = SUBNET.N/24 on it.
bridge_hosts() {
    local sw=$1 subnet=$2 i=1 h
    shift 2
    ip netns add "$sw"
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" link set br0 up
    for h in "$@"; do
        ip netns add "$h"
        ip -n "$sw" link add v$i type veth peer name eth0 netns "$h"
        ip -n "$sw" link set v$i master br0 up
        ip -n "$h" addr add "$subnet.$i/24" dev eth0
        ip -n "$h" link set eth0 up
        ip -n "$h" link set lo up
        i=$((i + 1))
    done
}

# waitfor SECONDS WHAT COMMAND...: polls every 0.1 s; dies naming WHAT.
waitfor() {
    local secs=$1 what=$2
    shift 2
    for _ in $(seq $((secs * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "timed out after ${secs} s waiting for $what"
}
