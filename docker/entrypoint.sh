#!/usr/bin/env bash
# shoal-entrypoint: what a Shoal container runs under tini (PID 1), before it becomes `shoal`.
#
#   ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/shoal-entrypoint"]
#   shoal-entrypoint peer --coordinator coordinator:7000      -> exec shoal peer ...
#   shoal-entrypoint bash                                      -> exec bash (any other command)
#
# In order, and every step ends in `exec`, so the process that finally runs is tini's direct
# child and gets `docker stop`'s SIGTERM itself (tini forwards it; no shell sits in between):
#
# 1. Bandwidth caps, when asked for (needs root and CAP_NET_ADMIN: docker/compose.caps.yaml
#    gives the peers `user: "0:0"` and `cap_add: [NET_ADMIN]`; without it they start as uid
#    10001 and a cap asked for stops the container, exit 3, with a message saying so):
#      SHOAL_EGRESS_MBIT=25   tbf on the container's interface:
#                             tc qdisc replace dev eth0 root tbf rate 25mbit burst B latency 50ms
#      SHOAL_INGRESS_MBIT=50  the same tbf on an ifb device that eth0's ingress is redirected to
#                             (the host kernel needs the ifb module: `sudo modprobe ifb`)
#    B (bytes) is one 10 ms tick of data at the rate, at least 32768. SHOAL_NET_DEV (eth0),
#    SHOAL_TBF_BURST (bytes) and SHOAL_TBF_LATENCY (50ms) override the defaults. A cap that
#    cannot be applied stops the container (exit 3): a test network that silently runs
#    uncapped measures the wrong thing.
# 2. Privilege drop: when running as root and SHOAL_RUN_AS names a user (the image sets
#    SHOAL_RUN_AS=shoal), re-exec this script as that user with setpriv (no capabilities, no
#    new privileges). Unset or empty SHOAL_RUN_AS to keep root.
# 3. Checks and defaults for `shoal peer` / `shoal coordinator`:
#      SHOAL_TOKEN_FILE must be a readable file (a missing Docker secret is bind-mounted as an
#        empty directory, and a 0600 file owned by the host user is unreadable in here);
#      peer: adds `--host 0.0.0.0`, `--port $SHOAL_PEER_PORT` (7100) and `--advertise ADDR`
#        unless given; ADDR is from SHOAL_ADVERTISE: `hostname` (default: the container's
#        hostname, which Docker's DNS resolves on user-defined and overlay networks), `ip` (this
#        container's address on the route to the coordinator), or a literal host name / address;
#      SHOAL_EXTRA_ARGS: more arguments, split on whitespace (no quoting), appended.
#    Arguments are recognised in the `--flag VALUE` and `--flag=VALUE` forms, not abbreviated.
# 4. exec shoal "$@" (a first argument that is neither a shoal subcommand nor an option is run
#    as a command of its own: `docker run --rm -it shoal bash`).
set -euo pipefail

PROG=shoal-entrypoint
SUBCOMMANDS=" demo coordinator peer status export generate identity token lab "

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
  local code=$1
  shift
  log "$*"
  exit "$code"
}

# --------------------------------------------------------------------------- 1. bandwidth caps

# Whether $1 is a positive number of Mbit/s (25, 0.5).
valid_mbit() {
  [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]] && [[ ! $1 =~ ^0*([.]0*)?$ ]]
}

# tbf's bucket, in bytes: at least one 10 ms kernel tick of data at the rate (HZ=100 is the
# slowest timer a kernel has), and never under 32 KiB.
tbf_burst() {
  if [[ -n ${SHOAL_TBF_BURST:-} ]]; then
    printf '%s' "$SHOAL_TBF_BURST"
    return
  fi
  local whole=${1%%.*}
  local bytes=$((10#${whole:-0} * 1250))
  ((bytes < 32768)) && bytes=32768
  printf '%s' "$bytes"
}

run_tc() {
  if ! "$@"; then
    die 3 "'$*' failed. Bandwidth caps need the container to start as root with NET_ADMIN" \
      "(add -f docker/compose.caps.yaml: user: \"0:0\", cap_add: [NET_ADMIN]; the entrypoint drops to" \
      "\$SHOAL_RUN_AS after applying them). Unset SHOAL_EGRESS_MBIT/SHOAL_INGRESS_MBIT to run" \
      "without caps."
  fi
}

apply_caps() {
  local dev=${SHOAL_NET_DEV:-eth0}
  local latency=${SHOAL_TBF_LATENCY:-50ms}
  local egress=${SHOAL_EGRESS_MBIT:-} ingress=${SHOAL_INGRESS_MBIT:-}
  [[ -z $egress && -z $ingress ]] && return 0
  if [[ $(id -u) != 0 ]]; then
    die 3 "SHOAL_EGRESS_MBIT/SHOAL_INGRESS_MBIT are set but the container started as uid" \
      "$(id -u): bandwidth caps need root and NET_ADMIN at start (add -f" \
      "docker/compose.caps.yaml; the entrypoint drops both after applying the caps)"
  fi
  command -v tc >/dev/null 2>&1 || die 3 "tc not found (Debian package iproute2)"
  if [[ -n $egress ]]; then
    valid_mbit "$egress" || die 3 "SHOAL_EGRESS_MBIT=$egress: write a positive number of Mbit/s"
    run_tc tc qdisc replace dev "$dev" root tbf rate "${egress}mbit" \
      burst "$(tbf_burst "$egress")" latency "$latency"
    log "egress of $dev capped at ${egress} Mbit/s"
  fi
  if [[ -n $ingress ]]; then
    valid_mbit "$ingress" || die 3 "SHOAL_INGRESS_MBIT=$ingress: write a positive number of Mbit/s"
    local ifb=${SHOAL_IFB_DEV:-shoal-ifb}
    if ! ip link show "$ifb" >/dev/null 2>&1; then
      ip link add "$ifb" type ifb ||
        die 3 "cannot create the ifb device $ifb for SHOAL_INGRESS_MBIT: load the ifb module on" \
          "the host (sudo modprobe ifb) and give the container NET_ADMIN"
    fi
    run_tc ip link set "$ifb" up
    run_tc tc qdisc replace dev "$dev" handle ffff: ingress
    run_tc tc filter add dev "$dev" parent ffff: protocol all prio 1 u32 match u32 0 0 \
      action mirred egress redirect dev "$ifb"
    run_tc tc qdisc replace dev "$ifb" root tbf rate "${ingress}mbit" \
      burst "$(tbf_burst "$ingress")" latency "$latency"
    log "ingress of $dev capped at ${ingress} Mbit/s (through $ifb)"
  fi
}

# --------------------------------------------------------------------------- 2. privilege drop

drop_privileges() {
  local user=${SHOAL_RUN_AS:-}
  [[ $(id -u) == 0 && -n $user ]] || return 0
  id "$user" >/dev/null 2>&1 || die 2 "SHOAL_RUN_AS=$user: no such user in this image"
  local uid gid home
  uid=$(id -u "$user")
  gid=$(id -g "$user")
  home=$(getent passwd "$user" | cut -d: -f6)
  export HOME=${home:-/tmp} USER=$user SHOAL_ENTRYPOINT_CAPS_DONE=1
  exec setpriv --reuid="$uid" --regid="$gid" --clear-groups --inh-caps=-all --no-new-privs \
    -- "$0" "$@"
}

# --------------------------------------------------------------------------- 3. checks, defaults

# The shoal subcommand in "$@" (after global options such as --log-format json), or empty.
subcommand() {
  while (($#)); do
    case $1 in
      --log-format | --log-level) shift 2 || return 0 ;;
      -*) shift ;;
      *)
        printf '%s' "$1"
        return
        ;;
    esac
  done
}

has_flag() {
  local flag=$1
  shift
  local a
  for a in "$@"; do
    [[ $a == "$flag" || $a == "$flag="* ]] && return 0
  done
  return 1
}

check_token_file() {
  local f=${SHOAL_TOKEN_FILE:-}
  [[ -z $f ]] && return 0
  if [[ -d $f ]]; then
    die 2 "SHOAL_TOKEN_FILE=$f is a directory: the join token file was missing on the host when" \
      "the container was created (Docker then mounts an empty directory). Create it, e.g." \
      "'docker run --rm shoal:latest token new > docker/join.token', and recreate the container."
  fi
  [[ -e $f ]] || die 2 "SHOAL_TOKEN_FILE=$f does not exist (mount the join token there)"
  if [[ ! -r $f ]]; then
    die 2 "SHOAL_TOKEN_FILE=$f is not readable by uid $(id -u): on the host," \
      "'sudo chown $(id -u) docker/join.token' (keeps it 0600) or 'chmod 0644 docker/join.token'"
  fi
}

advertise_address() {
  local mode=${SHOAL_ADVERTISE:-hostname} coordinator=${1:-} host addr
  case $mode in
    hostname) hostname ;;
    ip)
      host=${coordinator%:*}
      addr=$(getent ahostsv4 "$host" 2>/dev/null | awk 'NR == 1 { print $1 }') || true
      if [[ -n $addr ]] && command -v ip >/dev/null 2>&1; then
        ip -o -4 route get "$addr" 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n 1
      else
        hostname -i | awk '{ print $1 }'
      fi
      ;;
    *) printf '%s\n' "$mode" ;;
  esac
}

# The value of --coordinator in "$@", else $SHOAL_COORDINATOR.
coordinator_arg() {
  while (($#)); do
    case $1 in
      --coordinator)
        printf '%s' "${2:-}"
        return
        ;;
      --coordinator=*)
        printf '%s' "${1#--coordinator=}"
        return
        ;;
    esac
    shift
  done
  printf '%s' "${SHOAL_COORDINATOR:-}"
}

main() {
  if [[ -z ${SHOAL_ENTRYPOINT_CAPS_DONE:-} ]]; then
    apply_caps
    drop_privileges "$@"
  fi
  unset SHOAL_ENTRYPOINT_CAPS_DONE

  if (($# == 0)); then
    set -- --help
  fi
  case $1 in
    -*) ;;
    *) [[ $SUBCOMMANDS == *" $1 "* ]] || exec "$@" ;;
  esac

  local cmd
  cmd=$(subcommand "$@")
  if [[ $cmd == peer || $cmd == coordinator ]]; then
    check_token_file
    if [[ -n ${SHOAL_EXTRA_ARGS:-} ]]; then
      local extra
      read -r -a extra <<<"$SHOAL_EXTRA_ARGS"
      set -- "$@" "${extra[@]}"
    fi
  fi
  if [[ $cmd == peer ]]; then
    has_flag --host "$@" || set -- "$@" --host 0.0.0.0
    has_flag --port "$@" || set -- "$@" --port "${SHOAL_PEER_PORT:-7100}"
    if ! has_flag --advertise "$@"; then
      local addr
      addr=$(advertise_address "$(coordinator_arg "$@")")
      [[ -n $addr ]] || die 2 "SHOAL_ADVERTISE=${SHOAL_ADVERTISE:-hostname} gave no address"
      set -- "$@" --advertise "$addr"
    fi
  fi
  exec shoal "$@"
}

main "$@"
