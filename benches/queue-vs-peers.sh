#!/usr/bin/env bash
# Runs Herald's queue benchmark and the peers' (graphile-worker, BullMQ) back to back on this
# machine, then prints the ratios. Figures drift between runs and machines: only ratios measured
# in one run are worth quoting.
#
#   bash benches/queue-vs-peers.sh [JOBS]      (default 100000)
#
# Needs PostgreSQL (DATABASE_URL, default postgres://postgres@127.0.0.1:5432/test), Redis for
# BullMQ, Node.js and npm for the peers, and ../shared/peers beside the repository.
set -euo pipefail
JOBS=${1:-100000}
here=$(cd "$(dirname "$0")/.." && pwd)
peers=${PEERS_DIR:-$here/../shared/peers}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}

cargo build --release --quiet --manifest-path "$here/Cargo.toml"
herald="$here/target/release/herald"

json_field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

echo "== herald (postgres)"
pg=$("$herald" bench queue --backend postgres --jobs "$JOBS" --enqueue-batch 20000 | tail -n 1)
echo "$pg"
echo "== herald (sqlite)"
lite=$("$herald" bench queue --backend sqlite --jobs "$JOBS" --enqueue-batch 20000 | tail -n 1)
echo "$lite"
echo "== graphile-worker (2 processes)"
gw=$(bash "$peers/graphile-worker.sh" "$JOBS" 2 | tail -n 1)
echo "$gw"
echo "== bullmq (concurrency 50)"
bq=$(bash "$peers/bullmq.sh" "$JOBS" 50 | tail -n 1)
echo "$bq"

gw_rate=$(sed -E 's/.*=> ([0-9]+) jobs\/s.*/\1/' <<<"$gw")
bq_rate=$(sed -E 's/.*=> ([0-9]+) jobs\/s.*/\1/' <<<"$bq")
gw_enq_ms=$(sed -E 's/.*enqueue [0-9]+ in ([0-9]+) ms.*/\1/' <<<"$gw")
bq_enq_ms=$(sed -E 's/.*enqueue [0-9]+ in ([0-9]+) ms.*/\1/' <<<"$bq")
python3 - "$pg" "$lite" "$gw_rate" "$bq_rate" "$gw_enq_ms" "$bq_enq_ms" "$JOBS" <<'PY'
import json, sys
pg, lite = json.loads(sys.argv[1]), json.loads(sys.argv[2])
gw, bq, gw_ms, bq_ms, n = (float(x) for x in sys.argv[3:8])
gw_enq, bq_enq = n * 1000 / max(gw_ms, 1), n * 1000 / max(bq_ms, 1)
print(f"drain   jobs/s: herald-pg {pg['jobs_per_sec']:.0f}  herald-sqlite {lite['jobs_per_sec']:.0f}  "
      f"graphile {gw:.0f}  bullmq {bq:.0f}")
print(f"enqueue jobs/s: herald-pg {pg['enqueue_per_sec']:.0f}  herald-sqlite {lite['enqueue_per_sec']:.0f}  "
      f"graphile {gw_enq:.0f}  bullmq {bq_enq:.0f}")
print(f"ratios: pg/graphile drain {pg['jobs_per_sec']/gw:.2f}x, enqueue {pg['enqueue_per_sec']/gw_enq:.2f}x; "
      f"pg/bullmq drain {pg['jobs_per_sec']/bq:.2f}x; sqlite/graphile drain {lite['jobs_per_sec']/gw:.2f}x")
PY
