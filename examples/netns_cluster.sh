#!/usr/bin/env bash
# Three test hosts on one Linux machine, for trying the cluster (and LAN discovery, which
# libp2p's mDNS never does over loopback) without three computers. Needs root and iproute2.
#
#   sudo examples/netns_cluster.sh up          # create the hosts (replacing any old ones)
#   sudo examples/netns_cluster.sh check       # prove unicast and multicast cross the bridge
#   sudo examples/netns_cluster.sh exec w1 CMD # run CMD on a host (coord, w1 or w2)
#   sudo examples/netns_cluster.sh down        # remove everything (idempotent)
#   sudo examples/netns_cluster.sh demo        # up, coordinator + 2 workers, one chat, down
#
# Layout: network namespaces $PLK_PREFIX-coord, -w1 and -w2 (the hosts, addresses
# $PLK_SUBNET.1, .2 and .3 /24 on their `eth0`), each wired by a veth pair to the bridge
# `br0` in a fourth namespace, $PLK_PREFIX-hub (the "switch"). The bridge lives in a
# namespace of its own rather than on the machine itself so that nothing of the machine's
# own network changes (no interface, no route, and its firewall never sees the hosts'
# traffic), two copies never clash, and `down` only has to delete namespaces. Multicast
# snooping is off, so the bridge floods multicast (mDNS) to every host like a home switch.
# Each host's eth0 gets `tc netem delay $PLK_DELAY rate $PLK_RATE`, so every packet
# crosses a link with a LAN's latency (2 ms each way by default) and bandwidth. A kernel
# without sch_netem (minimal VM kernels) gets the same delay from examples/delay_link.py,
# a userspace cable between two TAP devices (needs python3 and /dev/net/tun), and the rate
# from tbf. `check` measures the round trip between every two hosts.
#
# Environment (all optional):
#   PLK_PREFIX        namespace prefix (default plk); give each concurrent copy its own
#   PLK_SUBNET        first three octets of the hosts' /24 (default 10.77.0)
#   PLK_DELAY         netem delay per direction (default 2ms); PLK_RATE (default 1gbit)
#   PLK_SHAPING=0     no tc qdisc and no delay at all (plain veth pairs)
#   PLK_DELAY_LINK    netem (default: netem where the kernel has it, else the userspace
#                     delay link) or userspace (always examples/delay_link.py)
#   POTLUCK_BIN_DIR   where `coordinator` and `worker` are (default target/debug)
#   POTLUCK_MODEL     GGUF file for the demo (default: `coordinator fetch-model`)
#   PLK_TOKEN         join token for the demo (default: a random one)
#   PLK_COORD_ARGS    extra `coordinator serve` arguments for the demo (default
#                     --no-local-layers: on one machine the planner would rather keep every
#                     layer on the coordinator than pay the hops, and the demo is about the
#                     workers; set it to "" to let the planner choose)
#   PLK_WORKER_ARGS   extra `worker join` arguments for the demo (default none)
#   PLK_READY_TIMEOUT_S  how long the demo waits for the cluster to be ready (default 600)
#   PLK_CUT_LINK      a host (w1 or w2): instead of one chat, the demo streams a long greedy
#                     completion and pulls that host's cable (its link on the switch goes
#                     down) after 20 tokens; the stream must still finish with exactly the
#                     tokens of an undisturbed run (tests/e2e/disturb_midstream.py, which
#                     needs the `openai` Python package)
set -euo pipefail

PREFIX="${PLK_PREFIX:-plk}"
SUBNET="${PLK_SUBNET:-10.77.0}"
DELAY="${PLK_DELAY:-2ms}"
RATE="${PLK_RATE:-1gbit}"
SHAPING="${PLK_SHAPING:-1}"
DELAY_LINK="${PLK_DELAY_LINK:-netem}"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
READY_TIMEOUT_S="${PLK_READY_TIMEOUT_S:-600}"
COORD_ARGS="${PLK_COORD_ARGS---no-local-layers}"
WORKER_ARGS="${PLK_WORKER_ARGS:-}"
CUT_LINK="${PLK_CUT_LINK:-}"
DEMO_WORKERS=(w1 w2)
HOSTS=(coord w1 w2)
HUB="$PREFIX-hub"
COORD_IP="$SUBNET.1"
HTTP_PORT=8080
CLUSTER_PORT=7070

die() { echo "netns_cluster: $*" >&2; exit 1; }
note() { echo "netns_cluster: $*" >&2; }

# Namespace names become file names under /run/netns; keep them to a safe alphabet.
[[ "$PREFIX" =~ ^[A-Za-z0-9_-]{1,40}$ ]] || die "PLK_PREFIX must be 1-40 of A-Z a-z 0-9 _ - (got '$PREFIX')"
[[ "$DELAY_LINK" =~ ^(netem|userspace)$ ]] || die "PLK_DELAY_LINK must be netem or userspace (got '$DELAY_LINK')"
[[ "$SUBNET" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "PLK_SUBNET must be three octets like 10.77.0 (got '$SUBNET')"

ns_of() { echo "$PREFIX-$1"; }
ip_of() {
  local i
  for i in "${!HOSTS[@]}"; do
    if [ "${HOSTS[$i]}" = "$1" ]; then echo "$SUBNET.$((i + 1))"; return; fi
  done
  die "unknown host '$1' (hosts: ${HOSTS[*]})"
}

need_root() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, veth, tc): run it with sudo"
  command -v ip >/dev/null || die "needs the 'ip' command (package iproute2)"
}

ns_exists() { ip netns list | awk '{print $1}' | grep -qxF "$1"; }

# Removes the hosts and the hub, and ends whatever still runs inside them (only processes
# in these namespaces: a crashed demo's coordinator and workers). Safe to run any time.
down() {
  local ns pids host namespaces=()
  for host in "${HOSTS[@]}"; do namespaces+=("$(ns_of "$host")"); done
  for ns in "${namespaces[@]}" "$HUB"; do
    ns_exists "$ns" || continue
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    if [ -n "$pids" ]; then
      # shellcheck disable=SC2086 # one pid per word
      kill $pids 2>/dev/null || true
      sleep 0.2
      # shellcheck disable=SC2086
      kill -9 $pids 2>/dev/null || true
    fi
    # Deleting a namespace destroys its interfaces, and with them the veth peers.
    ip netns del "$ns"
    rm -f "${TMPDIR:-/tmp}/potluck-netns-$ns-link.log"
  done
}

# Wires one host to the switch: a veth pair, its host end (eth0) delaying what leaves the
# host by $DELAY and limiting it to $RATE with netem. netem needs the sch_netem kernel
# module; without it (or with PLK_DELAY_LINK=userspace) the veth pair is replaced by
# examples/delay_link.py's two TAP devices, which add the same delay in userspace, and tbf
# limits the rate.
wire() {
  local host="$1" ns="$2"
  # Created directly inside the namespaces, so neither name ever exists on the machine.
  ip link add eth0 netns "$ns" type veth peer name "$host" netns "$HUB"
  [ "$SHAPING" = 0 ] && return
  if [ "$DELAY_LINK" = netem ] &&
    ip netns exec "$ns" tc qdisc replace dev eth0 root netem delay "$DELAY" rate "$RATE" 2>/dev/null; then
    return
  fi
  if [ -c /dev/net/tun ] && command -v python3 >/dev/null; then
    ip -n "$ns" link del eth0 # and with it its peer on the switch
    delay_link "$host" "$ns"
    [ "$DELAY_LINK" = netem ] && note "$ns: no netem in this kernel (modprobe sch_netem): $DELAY from examples/delay_link.py instead"
  else
    note "$ns: no netem in this kernel (modprobe sch_netem) and no python3 or /dev/net/tun for examples/delay_link.py: no added delay"
  fi
  if ! ip netns exec "$ns" tc qdisc replace dev eth0 root tbf rate "$RATE" burst 256kb latency 50ms 2>/dev/null; then
    note "$ns: no tbf in this kernel: the link's rate is not limited"
  fi
}

# Starts examples/delay_link.py inside host namespace $2: it creates the host's eth0 and an
# uplink device there, which then moves to the switch's namespace under the host's name. The
# program lives as long as the namespace's processes (`down` ends it, which pulls the cable).
delay_link() {
  local host="$1" ns="$2" waited=0 pid
  local log="${TMPDIR:-/tmp}/potluck-netns-$ns-link.log"
  ip netns exec "$ns" python3 "$SCRIPT_DIR/delay_link.py" --inside eth0 --outside uplink --delay "$DELAY" \
    </dev/null >"$log" 2>&1 &
  pid=$!
  until ip -n "$ns" link show uplink >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || die "$ns: examples/delay_link.py failed: $(cat "$log")"
    [ "$waited" -lt 200 ] || die "$ns: examples/delay_link.py made no uplink in 10 s: $(cat "$log")"
    sleep 0.05
    waited=$((waited + 1))
  done
  ip -n "$ns" link set uplink netns "$HUB"
  ip -n "$HUB" link set uplink name "$host"
}

undo_failed_up() {
  local status=$?
  trap - EXIT
  if [ "$status" != 0 ]; then
    note "setup failed; removing it"
    down
  fi
  exit "$status"
}

up() {
  need_root
  command -v tc >/dev/null || [ "$SHAPING" = 0 ] || die "needs 'tc' (iproute2) for link shaping, or set PLK_SHAPING=0"
  down
  # Undo a half-built setup if any step fails.
  trap undo_failed_up EXIT
  ip netns add "$HUB"
  ip -n "$HUB" link set lo up
  ip -n "$HUB" link add br0 type bridge mcast_snooping 0
  ip -n "$HUB" link set br0 up
  local host ns
  for host in "${HOSTS[@]}"; do
    ns="$(ns_of "$host")"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    wire "$host" "$ns"
    ip -n "$HUB" link set "$host" master br0
    ip -n "$HUB" link set "$host" up
    ip -n "$ns" addr add "$(ip_of "$host")/24" dev eth0
    ip -n "$ns" link set eth0 up
    # Multicast (mDNS is 224.0.0.251) leaves through eth0, whatever other routes appear.
    ip -n "$ns" route add 224.0.0.0/4 dev eth0
  done
  trap - EXIT
  note "up: $(for h in "${HOSTS[@]}"; do printf '%s=%s ' "$(ns_of "$h")" "$(ip_of "$h")"; done)(bridge br0 in $HUB)"
}

# The round trip from host $1 to host $2 in ms (the median of 7 TCP connections to a closed
# port: the SYN out, the far kernel's RST back), as the hosts' programs see it.
rtt_ms() {
  ip netns exec "$(ns_of "$1")" python3 - "$(ip_of "$2")" <<'PY'
import socket, statistics, sys, time
samples = []
for _ in range(7):
    s = socket.socket()
    s.settimeout(3)
    start = time.perf_counter()
    try:
        s.connect((sys.argv[1], 9))
    except ConnectionRefusedError:
        samples.append((time.perf_counter() - start) * 1e3)
    finally:
        s.close()
print(f"{statistics.median(samples):.2f}" if samples else "unreachable")
PY
}

# Unicast: a TCP connection to a closed port is refused by the far kernel, which proves the
# path works without a listener. Multicast: one host sends to a group, the others must hear
# it (python3, if present; otherwise `discovery_probe` across hosts is the multicast check).
check() {
  need_root
  local from to answer
  for from in "${HOSTS[@]}"; do
    ns_exists "$(ns_of "$from")" || die "host $from is not up (run: $0 up)"
    for to in "${HOSTS[@]}"; do
      [ "$from" = "$to" ] && continue
      answer="$(ip netns exec "$(ns_of "$from")" timeout 3 bash -c "exec 3<>/dev/tcp/$(ip_of "$to")/9" 2>&1 || true)"
      [[ "$answer" == *refused* ]] || die "unicast $from -> $to failed: ${answer:-no answer in 3 s}"
      if command -v python3 >/dev/null; then
        echo "unicast $from -> $to ok, round trip $(rtt_ms "$from" "$to") ms"
      else
        echo "unicast $from -> $to ok"
      fi
    done
  done
  if ! command -v python3 >/dev/null; then
    note "no python3: multicast not checked"
    return
  fi
  local group=239.255.77.1 port=5977 receivers=() host
  for host in w1 w2; do
    ip netns exec "$(ns_of "$host")" python3 - "$group" "$port" "$(ip_of "$host")" <<'PY' &
import socket, sys
group, port, local = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", port))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton(local))
s.settimeout(5)
s.recvfrom(64)
PY
    receivers+=($!)
  done
  sleep 0.5
  ip netns exec "$(ns_of coord)" python3 - "$group" "$port" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(10):
    s.sendto(b"potluck", (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.1)
PY
  local i
  for i in "${!receivers[@]}"; do
    if wait "${receivers[$i]}"; then
      echo "multicast coord -> w$((i + 1)) ok"
    else
      die "multicast coord -> w$((i + 1)) failed"
    fi
  done
}

# Ready once every demo worker has joined (is listed in /health's nodes, not gone), none is
# still loading, and every stage of the active plan runs on the coordinator or on a worker
# in state "ready" -- and, with --no-local-layers, on workers only (until the split is
# active the coordinator runs every layer). Not "every worker ready": the planner may
# leave a worker out when it would slow the pipeline.
health_is_ready() {
  local workers_only=0
  [[ " $COORD_ARGS " == *" --no-local-layers "* ]] && workers_only=1
  python3 - "${#DEMO_WORKERS[@]}" "$workers_only" "$1" <<'PY'
import json, sys
try:
    health = json.loads(sys.argv[3])
except ValueError:
    sys.exit(1)
nodes = {n["node_id"]: n["state"] for n in health.get("nodes", [])}
joined = [s for s in nodes.values() if not s.startswith("gone")]
stages = [s["node_id"] for s in health.get("stages", [])]
ok = (
    len(joined) >= int(sys.argv[1])
    and not any(s.startswith("loading") for s in joined)
    and stages
    and all(s == "coordinator" or nodes.get(s) == "ready" for s in stages)
    and not (sys.argv[2] == "1" and "coordinator" in stages)
)
sys.exit(0 if ok else 1)
PY
}

# On any exit of the demo: stop the processes it started, remove the hosts, say where the
# logs are.
end_demo() {
  local status=$? p
  trap - EXIT
  for p in "${DEMO_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  down
  note "logs in $DEMO_STATE"
  exit "$status"
}

demo() {
  need_root
  command -v curl >/dev/null || die "the demo needs curl"
  command -v python3 >/dev/null || die "the demo needs python3 (to read /health)"
  local bin="${POTLUCK_BIN_DIR:-target/debug}"
  for b in coordinator worker; do
    [ -x "$bin/$b" ] || die "$bin/$b not found: build it (cargo build) or set POTLUCK_BIN_DIR"
  done
  # Fetched here, on the machine's own network: the hosts cannot reach the internet.
  local model="${POTLUCK_MODEL:-}"
  [ -n "$model" ] || model="$("$bin/coordinator" fetch-model)"
  local token="${PLK_TOKEN:-plk-demo-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')}"
  local state
  state="$(mktemp -d -t potluck-netns-demo.XXXXXX)"

  up
  DEMO_PIDS=()
  DEMO_STATE="$state"
  trap end_demo EXIT
  echo "link round trip coord -> w1: $(rtt_ms coord w1) ms"

  # Each host gets its own config dir (so its own node key) and cache, like a real machine.
  mkdir -p "$state/coord"
  # shellcheck disable=SC2086 # PLK_COORD_ARGS is a list of words
  ip netns exec "$(ns_of coord)" env POTLUCK_CONFIG_DIR="$state/coord" \
    "$bin/coordinator" serve --model "$model" --listen "$COORD_IP:$HTTP_PORT" --allow-open \
    --cluster-listen "0.0.0.0:$CLUSTER_PORT" --token "$token" --workers "${#DEMO_WORKERS[@]}" \
    $COORD_ARGS >"$state/coord/log" 2>&1 &
  DEMO_PIDS+=($!)
  local host
  for host in "${DEMO_WORKERS[@]}"; do
    mkdir -p "$state/$host"
    # No coordinator address: the worker finds it by mDNS.
    # shellcheck disable=SC2086 # PLK_WORKER_ARGS is a list of words
    ip netns exec "$(ns_of "$host")" env POTLUCK_CONFIG_DIR="$state/$host" \
      POTLUCK_CACHE_DIR="$state/$host/cache" XDG_CACHE_HOME="$state/$host/cache" \
      "$bin/worker" join --token "$token" $WORKER_ARGS >"$state/$host/log" 2>&1 &
    DEMO_PIDS+=($!)
  done

  local url="http://$COORD_IP:$HTTP_PORT" health="" waited=0
  note "waiting up to ${READY_TIMEOUT_S}s for $url/health to report ready"
  while :; do
    health="$(ip netns exec "$(ns_of coord)" curl -fsS --max-time 2 "$url/health" 2>/dev/null || true)"
    health_is_ready "$health" && break
    for p in "${DEMO_PIDS[@]}"; do
      kill -0 "$p" 2>/dev/null || die "a cluster process exited early; see the logs in $state"
    done
    [ "$waited" -lt "$READY_TIMEOUT_S" ] || die "not ready after ${READY_TIMEOUT_S}s (last /health: ${health:-none}); see $state"
    sleep 1
    waited=$((waited + 1))
  done
  echo "health: $health"

  if [ -n "$CUT_LINK" ]; then
    ip_of "$CUT_LINK" >/dev/null
    local client="$state/client.log" client_pid
    ip netns exec "$(ns_of coord)" python3 "$(dirname "$0")/../tests/e2e/disturb_midstream.py" "$url" notify 300 \
      >"$client" 2>&1 &
    client_pid=$!
    until grep -q "disturb now" "$client" 2>/dev/null; do
      kill -0 "$client_pid" 2>/dev/null || { cat "$client" >&2; die "the streaming client ended before the cut"; }
      sleep 0.05
    done
    ip -n "$HUB" link set "$CUT_LINK" down
    note "cut the link of $CUT_LINK"
    local status=0
    wait "$client_pid" || status=$?
    sed 's/^/client: /' "$client"
    echo "health after: $(ip netns exec "$(ns_of coord)" curl -fsS --max-time 2 "$url/health" 2>/dev/null || true)"
    return "$status"
  fi

  ip netns exec "$(ns_of coord)" curl -fsS --max-time 300 "$url/v1/chat/completions" \
    -H 'Content-Type: application/json' \
    -d '{"model":"any","max_tokens":48,"temperature":0,"messages":[{"role":"user","content":"Say hello to the potluck cluster in one sentence."}]}'
  echo
}

case "${1:-}" in
  up) up ;;
  down) need_root; down; note "down" ;;
  check) check ;;
  exec)
    need_root
    [ $# -ge 3 ] || die "usage: $0 exec HOST CMD [ARGS...]"
    host_ns="$(ns_of "$2")"
    ip_of "$2" >/dev/null
    shift 2
    exec ip netns exec "$host_ns" "$@"
    ;;
  demo) demo ;;
  *)
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
