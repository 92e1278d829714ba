#!/usr/bin/env bash
# The same hello function on two versions of Nimbus, side by side on this machine, in one
# run: warm req/s through the gateway (wrk, alternating rounds) and cold starts
# (bench/seqclient.py, keep_warm 0, 50 requests 50 ms apart, alternating rounds).
#
#   bench/ab_commits.sh <old commit> [<new commit, default: the working tree>]
#
# Each version runs from a git worktree of its own (PYTHONPATH), with the repository's
# .venv; both servers are up for the whole run. Loopback only; every process it starts is
# stopped by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
OLD=${1:?usage: bench/ab_commits.sh <old commit> [<new commit>]}
NEW=${2:-}
TMP=$(mktemp -d /tmp/nimbus-ab.XXXXXX)
# The control plane needs a key since API keys landed; a version from before ignores it.
NIMBUS_ADMIN_KEY=nmb_ab_$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
export NIMBUS_ADMIN_KEY
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  git worktree remove --force "$TMP/old" 2>/dev/null || true
  [ -n "$NEW" ] && git worktree remove --force "$TMP/new" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
git worktree add -q --detach "$TMP/old" "$OLD"
if [ -n "$NEW" ]; then git worktree add -q --detach "$TMP/new" "$NEW"; NEWSRC=$TMP/new/src; else NEWSRC=$ROOT/src; fi

port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start() { # src port data
  PYTHONPATH=$1 $PY -m nimbus up --port "$2" --data-dir "$3" >"$3.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 600); do curl -sf "localhost:$2/healthz" >/dev/null && return; sleep 0.1; done
  echo "nimbus on $2 did not start: $(tail -5 "$3.log")" >&2; exit 1
}
deploy() { # src port name keep_warm
  PYTHONPATH=$1 $PY - "$2" "$3" "$4" <<'PY'
import json, os, sys
from pathlib import Path
import httpx, yaml
from nimbus.packaging import package_directory
port, name, keep_warm = sys.argv[1], sys.argv[2], float(sys.argv[3])
d = Path("bench/functions/hello")
spec = yaml.safe_load((d / "nimbus.yaml").read_text())
spec.update(name=name, scaling={"min": 0, "max": 16, "keep_warm": keep_warm})
r = httpx.post(f"http://127.0.0.1:{port}/v1/functions", data={"spec": json.dumps(spec)},
               files={"code": ("c.zip", package_directory(d), "application/zip")}, timeout=120,
               headers={"authorization": "Bearer " + os.environ["NIMBUS_ADMIN_KEY"]})
r.raise_for_status()
PY
}
P_OLD=$(port); start "$TMP/old/src" "$P_OLD" "$TMP/data-old"
P_NEW=$(port); start "$NEWSRC" "$P_NEW" "$TMP/data-new"
for p_src in "$P_OLD $TMP/old/src" "$P_NEW $NEWSRC"; do
  set -- $p_src
  deploy "$2" "$1" hello 300
  deploy "$2" "$1" hello-cold 0
done
echo "old: $OLD ($(git log -1 --format=%h "$OLD")), new: ${NEW:-working tree}"
echo "## warm: wrk -t1 -c16 -d5s /function/hello (after a 3 s warm-up each)"
for p in $P_OLD $P_NEW; do wrk -t1 -c16 -d3s "http://127.0.0.1:$p/function/hello" >/dev/null; done
for round in 1 2 3 4; do
  order="$P_OLD $P_NEW"; [ $((round % 2)) = 0 ] && order="$P_NEW $P_OLD"  # no order bias
  for p in $order; do
    who=old; [ "$p" = "$P_NEW" ] && who=new
    echo "round $round $who $(wrk -t1 -c16 -d5s "http://127.0.0.1:$p/function/hello" | grep Requests/sec)"
  done
done
echo "## cold: bench/seqclient.py -n 50 --pause 0.05 /function/hello-cold (keep_warm 0)"
for round in 1 2 3 4; do
  order="$P_OLD $P_NEW"; [ $((round % 2)) = 0 ] && order="$P_NEW $P_OLD"
  for p in $order; do
    who=old; [ "$p" = "$P_NEW" ] && who=new
    $PY bench/seqclient.py --url "http://127.0.0.1:$p/function/hello-cold" -n 50 --pause 0.05 |
      $PY -c "import json,sys,statistics as s; d=json.load(sys.stdin); l=sorted(d['latencies_ms']); print('round $round $who p50 %.2f ms p90 %.2f ms p99 %.2f ms, unexpected %d' % (s.median(l), l[44], l[-1], d['unexpected']))"
  done
done
