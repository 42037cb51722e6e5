#!/usr/bin/env bash
# Copies the finished runs (a distill phase in results.json) of queue_ibd.sh's run directory
# (/work/runs/ibd) into this directory: config.json, metrics.jsonl, results.json, and the
# queue's log of the run as train.log; appends the run's walltimes.txt line. Run from the repo root.
R=${R:-/work/runs/ibd}; D=benchmarks/results/ibd_cpu
for wd in "$R"/*_s[0-9]_*/; do
  [ -d "$wd" ] || continue
  n=$(basename "$wd")
  python -c "import json,sys; sys.exit('distill' not in json.load(open('$wd/results.json'))['phases'])" \
    2>/dev/null || continue
  cmp -s "$wd/results.json" "$D/$n/results.json" && continue  # already collected
  mkdir -p "$D/$n"
  cp "$wd/config.json" "$wd/metrics.jsonl" "$wd/results.json" "$D/$n/"
  cp "$R/$n.log" "$D/$n/train.log"
  grep -q "^$n rc" "$D/walltimes.txt" || grep "^$n rc" "$R/walltimes.txt" >> "$D/walltimes.txt"
  echo "collected $n"
done
