#!/usr/bin/env bash
# docker/smoke.sh: the Docker files, run for real on one machine (as root), then removed.
#
#   sudo bash docker/smoke.sh          (CI: .ci/run; about 5 minutes, more on a first run)
#
# 1. Starts its own dockerd (own socket, data root and exec root; nothing of a Docker engine
#    already on the machine is used or touched) with every address in 198.18.0.0/15: docker0
#    198.18.240.1/24, local networks (docker_gwbridge) from 198.19.0.0/16, Swarm's overlay
#    networks (ingress, the stack's) from 198.18.0.0/17.
# 2. Builds a base image from Debian packages (docker/local-base.sh: debootstrap, docker import;
#    no registry is needed) and the Shoal image from docker/Dockerfile, with pip fed the wheels
#    this machine's pip resolves (torch, the CPU wheel, and the package's dependencies), served
#    to the build over docker0 only (PIP_NO_INDEX, PIP_FIND_LINKS build arguments).
# 3. `docker swarm init`, and deploys docker/compose.yaml as an operator would: the coordinator
#    first (SHOAL_PEERS=0), its fingerprint read from its log, then the peers with
#    SHOAL_COORDINATOR_FINGERPRINT set (the token is a read-only secret: see docker/README.md).
# 4. Waits for STEPS optimizer steps on the coordinator's /api/status (through the published
#    port on 127.0.0.1), scales the peers down by one (the removed peer must drain: its log says
#    "drained", the coordinator records its leave), back up, and checks that the step moved on.
# 5. Removes the stack, leaves the swarm, removes the images, volumes and networks, stops its
#    dockerd and deletes its data root (trap on EXIT: also after a failure). It checks that every
#    interface address it made is in 198.18.0.0/15 (or loopback), and that `ip -o addr` is the
#    same after as before.
#
# The last line: `docker swarm: peers = N, steps = S, drained = D`.
# Knobs: SHOAL_SMOKE_PEERS (3), SHOAL_SMOKE_STEPS (10), SHOAL_SMOKE_TIMEOUT (300 s per wait),
# SHOAL_SMOKE_EGRESS_MBIT=N (deploy with compose.caps.yaml and check the tbf and the drop),
# SHOAL_SMOKE_KEEP_LOGS=DIR (copy the service logs there), SHOAL_BASE_CACHE (local-base.sh).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=${SHOAL_SMOKE_PEERS:-3}
STEPS=${SHOAL_SMOKE_STEPS:-10}
TIMEOUT=${SHOAL_SMOKE_TIMEOUT:-300}
STACK=shoalsmoke
IMAGE=shoal:smoke
BASE=shoal-base:smoke
BRIDGE_IP=198.18.240.1
HTTP_PUBLISH=17980
GRPC_PUBLISH=17900

WORK=$(mktemp -d /tmp/shoal-smoke.XXXXXX)
DATA_ROOT=/var/lib/shoal-smoke-docker.$$
EXEC_ROOT=/run/shoal-smoke-docker.$$
export DOCKER_HOST=unix://$WORK/docker.sock
export DOCKER_BUILDKIT=0 # the engine's own builder: no buildx plugin needed
DOCKERD_PID=
HTTP_PID=
LOG_PIDS=()
SUMMARY= # printed last, after the clean-up, when everything passed

say() { printf 'smoke: %s\n' "$*" >&2; }
fail() {
  say "FAILED: $*"
  exit 1
}

# ------------------------------------------------------------------ address checks

in_range() { # whether an IPv4 address (no prefix) is in 198.18.0.0/15
  [[ $1 =~ ^198\.1[89]\.[0-9]+\.[0-9]+$ ]]
}

# Every address on an interface that is not in BEFORE (a file of `ip -o addr` lines) must be
# IPv4 in 198.18.0.0/15; the interfaces that were there must have the addresses they had.
addr_triples() { awk '{ print $2, $3, $4 }' "$@" | sort -u; }
check_addresses() {
  local before=$1 dev fam addr bad=0
  while read -r dev fam addr; do
    grep -q "^$dev " <(addr_triples "$before") && continue
    if [[ $fam != inet ]] || ! in_range "${addr%/*}"; then
      say "interface $dev has $fam $addr, outside 198.18.0.0/15"
      bad=1
    fi
  done < <(ip -o addr show | addr_triples)
  while read -r dev fam addr; do
    say "interface $dev lost $fam $addr"
    bad=1
  done < <(comm -23 <(addr_triples "$before") <(ip -o addr show | addr_triples))
  ((bad == 0))
}

# Every subnet and gateway in the engine's networks' IPAM must be in 198.18.0.0/15.
check_ipam() {
  local net subnet
  for net in $(docker network ls -q); do
    for subnet in $(docker network inspect -f \
      '{{range .IPAM.Config}}{{.Subnet}} {{.Gateway}} {{end}}' "$net"); do
      in_range "${subnet%/*}" ||
        fail "network $(docker network inspect -f '{{.Name}}' "$net") has $subnet"
    done
  done
}

# ------------------------------------------------------------------ clean up (trap EXIT)

# Delete the iptables rules and chains that are not in BEFORE (`iptables -S` per table, saved
# at the start): dockerd adds its chains and NAT rules and leaves them when it stops. Rules
# anyone else added meanwhile stay unless they sit in a chain this engine made.
restore_iptables() {
  local before=$1 table rule chain
  for table in filter nat; do
    [[ -f $before.$table ]] || continue
    while read -r rule; do
      grep -qxF -- "$rule" "$before.$table" && continue
      read -r -a words <<<"${rule#-A }"
      iptables -t "$table" -D "${words[@]}" 2>/dev/null
    done < <(iptables -t "$table" -S | grep '^-A ')
    while read -r chain; do
      grep -qxF -- "-N $chain" "$before.$table" && continue
      iptables -t "$table" -F "$chain" 2>/dev/null
      iptables -t "$table" -X "$chain" 2>/dev/null
    done < <(iptables -t "$table" -S | sed -n 's/^-N //p')
  done
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT
  if [[ -n ${SHOAL_SMOKE_KEEP_LOGS:-} && -S $WORK/docker.sock ]]; then
    mkdir -p "$SHOAL_SMOKE_KEEP_LOGS"
    docker service logs --raw "${STACK}_coordinator" >"$SHOAL_SMOKE_KEEP_LOGS/coordinator.log" 2>&1
    docker service logs --raw "${STACK}_peer" >"$SHOAL_SMOKE_KEEP_LOGS/peers.log" 2>&1
  fi
  if ((rc != 0)) && [[ -S $WORK/docker.sock ]]; then
    say "last coordinator and peer log lines:"
    docker service logs --tail 15 "${STACK}_coordinator" 2>&1 | sed 's/^/  /' >&2
    docker service logs --tail 30 "${STACK}_peer" 2>&1 | sed 's/^/  /' >&2
  fi
  [[ -n $HTTP_PID ]] && kill "$HTTP_PID" 2>/dev/null && wait "$HTTP_PID" 2>/dev/null
  ((${#LOG_PIDS[@]})) && kill "${LOG_PIDS[@]}" 2>/dev/null
  if [[ -n $DOCKERD_PID ]] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    docker stack rm "$STACK" >/dev/null 2>&1
    for _ in $(seq 60); do
      [[ -z $(docker ps -aq) ]] && break
      sleep 1
    done
    docker ps -aq | xargs -r docker rm -f >/dev/null 2>&1
    docker swarm leave --force >/dev/null 2>&1
    docker volume ls -q | xargs -r docker volume rm >/dev/null 2>&1
    docker network prune -f >/dev/null 2>&1
    docker image rm -f "$IMAGE" "$BASE" >/dev/null 2>&1
    docker image prune -af >/dev/null 2>&1
    say "left behind in this engine: $(docker ps -aq | wc -l) containers," \
      "$(docker volume ls -q | wc -l) volumes, $(docker images -q | wc -l) images," \
      "networks: $(docker network ls --format '{{.Name}}' | tr '\n' ' ')"
    kill "$DOCKERD_PID"
    for _ in $(seq 30); do
      kill -0 "$DOCKERD_PID" 2>/dev/null || break
      sleep 1
    done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID"
  fi
  # dockerd removes docker0's address but not the bridges it made; they are ours to delete
  for dev in docker0 docker_gwbridge; do
    grep -q "^[0-9]*: $dev:" "$WORK/links.before" 2>/dev/null && continue
    ip link show "$dev" >/dev/null 2>&1 && ip link delete "$dev"
  done
  # dockerd turned on forwarding and set FORWARD's policy to DROP: as they were
  [[ -s $WORK/ip_forward.before ]] && sysctl -qw "net.ipv4.ip_forward=$(cat "$WORK/ip_forward.before")"
  [[ -s $WORK/forward_policy.before ]] && iptables -P FORWARD "$(cat "$WORK/forward_policy.before")"
  restore_iptables "$WORK/iptables"
  umount -R "$DATA_ROOT" "$EXEC_ROOT" 2>/dev/null
  rm -rf "$DATA_ROOT" "$EXEC_ROOT"
  [[ -s $WORK/ipv6_default.before ]] &&
    sysctl -qw "net.ipv6.conf.default.disable_ipv6=$(cat "$WORK/ipv6_default.before")"
  if [[ -f $WORK/addr.before ]]; then
    diff <(addr_triples "$WORK/addr.before") <(ip -o addr show | addr_triples) >&2 ||
      { say "the host's addresses differ from before"; rc=1; }
  fi
  rm -rf "$WORK"
  ((rc == 0)) && [[ -n $SUMMARY ]] && echo "$SUMMARY"
  exit "$rc"
}

# ------------------------------------------------------------------ 0. preflight, dockerd

[[ $(id -u) == 0 ]] || fail "run as root (it starts its own dockerd)"
for cmd in dockerd docker ip python3 pip debootstrap curl; do
  command -v "$cmd" >/dev/null 2>&1 || fail "$cmd not found (Debian: apt-get install docker.io" \
    "debootstrap iproute2 curl)"
done
for dev in docker0 docker_gwbridge; do
  ! ip link show "$dev" >/dev/null 2>&1 ||
    fail "$dev exists already (another Docker engine?): this test makes its own"
done
ip -o addr show >"$WORK/addr.before"
ip -o link show >"$WORK/links.before"
sysctl -n net.ipv4.ip_forward >"$WORK/ip_forward.before"
# Interfaces made while this runs (docker0, docker_gwbridge, the containers' veths) get no IPv6,
# so no link-local fe80:: address either: every address they have is one Docker gave them
sysctl -n net.ipv6.conf.default.disable_ipv6 >"$WORK/ipv6_default.before"
sysctl -qw net.ipv6.conf.default.disable_ipv6=1
iptables -S FORWARD | awk '$1 == "-P" { print $3 }' >"$WORK/forward_policy.before"
iptables -t filter -S >"$WORK/iptables.filter"
iptables -t nat -S >"$WORK/iptables.nat"
trap cleanup EXIT
trap 'say "failed at line $LINENO: $BASH_COMMAND"' ERR

t0=$SECONDS
say "starting dockerd ($DOCKER_HOST, data root $DATA_ROOT)"
dockerd --host "$DOCKER_HOST" --data-root "$DATA_ROOT" --exec-root "$EXEC_ROOT" \
  --pidfile "$WORK/dockerd.pid" --bip "$BRIDGE_IP/24" \
  --default-address-pool base=198.19.0.0/16,size=24 --iptables=true --ip-masq=true \
  --log-level warn >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 60); do
  docker info >/dev/null 2>&1 && break
  kill -0 "$DOCKERD_PID" 2>/dev/null || { cat "$WORK/dockerd.log" >&2; fail "dockerd exited"; }
  sleep 1
done
docker info >/dev/null 2>&1 || fail "dockerd did not answer within 60 s"

# ------------------------------------------------------------------ 1. images

bash "$REPO/docker/local-base.sh" "$BASE" 2>"$WORK/base.log" ||
  { cat "$WORK/base.log" >&2; fail "base image"; }

# the wheels pip would install here: torch as the Dockerfile asks for it, the package's
# dependencies and its build requirements, resolved by this machine's pip (its indexes, its CA)
mkdir -p "$WORK/wheels"
python3 - "$REPO/pyproject.toml" >"$WORK/requirements.txt" <<'EOF'
import sys, tomllib
doc = tomllib.load(open(sys.argv[1], "rb"))
print("torch==2.13.0")
print("\n".join(doc["project"]["dependencies"] + doc["build-system"]["requires"] + ["wheel"]))
EOF
pip download --quiet --dest "$WORK/wheels" --only-binary=:all: --implementation cp \
  --python-version 3.11 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -r "$WORK/requirements.txt" 2>"$WORK/pip.log" ||
  { cat "$WORK/pip.log" >&2; fail "pip download"; }
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("198.18.240.1", 0)); print(s.getsockname()[1])')
python3 -m http.server --bind "$BRIDGE_IP" --directory "$WORK/wheels" "$port" \
  >"$WORK/http.log" 2>&1 &
HTTP_PID=$!

mkdir -p "$WORK/ctx/docker"
(cd "$REPO" && tar -c --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
  pyproject.toml README.md peer coordinator protocols optim bench shoal \
  docker/Dockerfile docker/entrypoint.sh docker/healthcheck.py) | tar -C "$WORK/ctx" -x
cp "$REPO/docker/Dockerfile.dockerignore" "$WORK/ctx/.dockerignore"
say "building $IMAGE"
docker build --quiet -t "$IMAGE" -f "$WORK/ctx/docker/Dockerfile" \
  --build-arg PYTHON_IMAGE="$BASE" --build-arg PIP_NO_INDEX=1 \
  --build-arg PIP_FIND_LINKS="http://$BRIDGE_IP:$port/" --build-arg PIP_TRUSTED_HOST="$BRIDGE_IP" \
  "$WORK/ctx" >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; fail "docker build"; }
kill "$HTTP_PID"
wait "$HTTP_PID" 2>/dev/null || true # killed: 143
HTTP_PID=
say "images ready after $((SECONDS - t0)) s"

# ------------------------------------------------------------------ 2. swarm, stack

docker swarm init --advertise-addr "$BRIDGE_IP" --listen-addr "$BRIDGE_IP:2377" \
  --data-path-addr "$BRIDGE_IP" --default-addr-pool 198.18.0.0/17 \
  --default-addr-pool-mask-length 24 >/dev/null

docker run --rm "$IMAGE" token new >"$WORK/join.token"
chmod 0600 "$WORK/join.token"
# A tiny model, 3 pipeline stages (stage 0 + 2 block stages): one peer each, as SHOAL_PEERS=3
# gives. The peer the scale-down removes leaves its stage empty until the new one rebuilds it.
cat >"$WORK/run.toml" <<'EOF'
[run]
name = "shoal-docker-smoke"
seed = 0
steps = 0

[model]
d_model = 64
n_layers = 2
n_heads = 4
seq_len = 32

[pipeline]
stages = 2
microbatch = 4
target_batch = 8

[membership]
heartbeat_s = 2.0
lease_s = 15.0
EOF

CAPS=${SHOAL_SMOKE_EGRESS_MBIT:-}
files=(-c "$REPO/docker/compose.yaml")
[[ -n $CAPS ]] && files+=(-c "$REPO/docker/compose.caps.yaml")
deploy() { # deploy PEERS [FINGERPRINT]
  SHOAL_EGRESS_MBIT=$CAPS SHOAL_IMAGE=$IMAGE SHOAL_PEERS=$1 SHOAL_COORDINATOR_FINGERPRINT=${2:-} \
    SHOAL_TOKEN_FILE=$WORK/join.token SHOAL_RUN_SPEC=$WORK/run.toml \
    SHOAL_HTTP_PUBLISH=$HTTP_PUBLISH SHOAL_GRPC_PUBLISH=$GRPC_PUBLISH \
    SHOAL_PEER_CPUS=1 SHOAL_PEER_MEMORY=2G SHOAL_TORCH_THREADS=1 \
    docker stack deploy --resolve-image never "${files[@]}" "$STACK" \
    >>"$WORK/deploy.log" 2>&1 || { cat "$WORK/deploy.log" >&2; fail "docker stack deploy"; }
}

status() { # the coordinator's /api/status, through the published port
  curl -fsS --max-time 5 "http://127.0.0.1:$HTTP_PUBLISH/api/status"
}

field() { # field EXPR: a Python expression over the status document `s`
  python3 -c "import json, sys; s = json.load(sys.stdin); print($1)"
}

wait_for() { # wait_for WHAT COMMAND...: until COMMAND succeeds, at most TIMEOUT seconds
  local what=$1 deadline=$((SECONDS + TIMEOUT))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "timed out after $TIMEOUT s waiting for $what"
    sleep 2
  done
}

fingerprint() {
  docker service logs --raw "${STACK}_coordinator" 2>/dev/null |
    grep -o 'fingerprint sha256:[0-9a-f]*' | head -n 1 | cut -d' ' -f2
}

say "deploying the coordinator"
deploy 0
have_fingerprint() { [[ -n $(fingerprint) ]]; }
wait_for "the coordinator's fingerprint in its log" have_fingerprint
fp=$(fingerprint)
say "coordinator fingerprint $fp; deploying $PEERS peers"
deploy "$PEERS" "$fp"

live_at_least() { (($(status | field 's["totals"]["live_peers"]') >= $1)); }
step_at_least() { (($(status | field 's["totals"]["step"]') >= $1)); }
wait_for "$PEERS live peers" live_at_least "$PEERS"
wait_for "$STEPS training steps" step_at_least "$STEPS"
if [[ -n $CAPS ]]; then # compose.caps.yaml: the cap is on eth0, the daemon has no capability
  cid=$(docker ps -q --filter "label=com.docker.swarm.service.name=${STACK}_peer" | head -n 1)
  qdisc=$(docker exec "$cid" tc qdisc show dev eth0)
  [[ $qdisc == *"tbf"*"rate ${CAPS}Mbit"* ]] || fail "no ${CAPS} Mbit/s tbf on eth0: $qdisc"
  # the daemon: the process named shoal (the console script), tini's child
  daemon=$(docker exec "$cid" sh -c 'for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = shoal ] && grep -E "^(Uid|CapEff)" "$p/status"; done' |
    tr -s '\t\n' '  ')
  [[ $daemon == "Uid: 10001 10001 10001 10001 CapEff: 0000000000000000 " ]] ||
    fail "the capped peer's daemon kept root or capabilities: $daemon"
  say "egress cap: $(head -n 1 <<<"$qdisc"); daemon: $daemon"
fi
step_before=$(status | field 's["totals"]["step"]')
say "step $step_before with $PEERS peers after $((SECONDS - t0)) s; scaling down to $((PEERS - 1))"

# Swarm deletes the container of a task it scales away, and its log with it: follow every
# peer's log now, to read what the removed one said
for cid in $(docker ps -q --filter "label=com.docker.swarm.service.name=${STACK}_peer"); do
  docker logs -f "$cid" >"$WORK/peer-$cid.log" 2>&1 &
  LOG_PIDS+=($!)
done
t_scale=$(date +%s)
docker service scale --detach "${STACK}_peer=$((PEERS - 1))" >/dev/null
leaves() { # leave events after the scale-down with a SIGTERM reason
  status | field "sum(1 for e in s['events'] if e['kind'] == 'leave' and e['t'] >= $t_scale
    and 'SIGTERM' in e['detail'])"
}
left_at_least() { (($(leaves) >= $1)); }
running_peers() { docker ps -q --filter "label=com.docker.swarm.service.name=${STACK}_peer" | wc -l; }
stopped_one() { (($(running_peers) == PEERS - 1)); }
wait_for "a peer's leave (SIGTERM) after the scale-down" left_at_least 1
wait_for "the removed peer's container to stop" stopped_one
drained_logs=$(cat "$WORK"/peer-*.log | grep -c 'drained in' || true)
drained=$(leaves)
((drained_logs >= 1)) || fail "no peer log says it drained after the scale-down"
((drained == drained_logs)) ||
  fail "$drained SIGTERM leaves at the coordinator, but $drained_logs 'drained' log lines"
say "the removed peer (stage $(status | field "[e['stage'] for e in s['events'] if e['kind'] == 'leave'][-1]")):" \
  "$(grep -h 'drain' "$WORK"/peer-*.log | tr -s ' ' | paste -sd ';')"

step_mid=$(status | field 's["totals"]["step"]')
docker service scale --detach "${STACK}_peer=$PEERS" >/dev/null
wait_for "$PEERS live peers again" live_at_least "$PEERS"
wait_for "training to go on after scaling back up" step_at_least "$((step_mid + STEPS))"
steps=$(status | field 's["totals"]["step"]')
((steps > step_before)) || fail "the step did not move on ($step_before -> $steps)"

check_ipam
check_addresses "$WORK/addr.before" || fail "an interface this test made has an address outside 198.18.0.0/15"
say "addresses: every network and interface this engine made is in 198.18.0.0/15"
say "passed in $((SECONDS - t0)) s; cleaning up"
SUMMARY="docker swarm: peers = $PEERS, steps = $steps, drained = $drained"
