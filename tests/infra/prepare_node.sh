#!/usr/bin/env bash
# Get the real-node tests' tools ready in the background while other work runs in the foreground:
# the node's Go binaries (build_bins.sh node) and the test images (images.py), both cached, so a warm
# machine is done in seconds. `make test` starts it before the venv install and waits for it before
# the node tests; on a fresh machine the downloads and builds overlap the install and the fast tests.
#
#   bash tests/infra/prepare_node.sh start   # returns at once; output goes to the log below
#   bash tests/infra/prepare_node.sh wait    # blocks until done; exit 1 (with the log's tail) on failure
#   bash tests/infra/prepare_node.sh run     # both, in the foreground
#
# The Debian packages come first (install_node_deps.sh, in the foreground of `start`: apt must not
# run beside another apt). Only the stdlib of the machine's python3 is needed: no venv yet.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

state=${XDG_CACHE_HOME:-$HOME/.cache}/clusterfit/prepare-node
log=$state/prepare.log
say() { echo "prepare_node: $*" >&2; }

work() {
  local rc=0 bins images
  bash tests/infra/build_bins.sh node >/dev/null &
  bins=$!
  python3 -m tests.infra.images build pause tools base step cluster controller &
  images=$!
  wait "$bins" || rc=$?
  wait "$images" || rc=$((rc ? rc : $?))
  return "$rc"
}

start() {
  mkdir -p "$state"
  bash tests/infra/install_node_deps.sh
  rm -f "$state/rc"
  say "building the node's binaries and images in the background (log: $log)"
  (
    started=$SECONDS
    rc=0
    work >"$log" 2>&1 || rc=$?
    echo "prepare_node: done in $((SECONDS - started))s, exit $rc" >>"$log"
    echo "$rc" >"$state/rc"
  ) </dev/null &
  echo $! >"$state/pid"
}

wait_done() {
  local pid
  pid=$(cat "$state/pid" 2>/dev/null || echo "")
  [[ -n $pid ]] || { say "nothing was started (run: bash tests/infra/prepare_node.sh start)"; exit 1; }
  say "waiting for the background build (log: $log)"
  while kill -0 "$pid" 2>/dev/null; do sleep 2; done
  if [[ $(cat "$state/rc" 2>/dev/null || echo 1) != 0 ]]; then
    say "failed; the end of its log:"
    tail -n 60 "$log" >&2
    exit 1
  fi
  tail -n 1 "$log" >&2
}

case ${1:-} in
  start) start ;;
  wait) wait_done ;;
  run) start && wait_done ;;
  *) say "usage: bash tests/infra/prepare_node.sh start|wait|run"; exit 2 ;;
esac
