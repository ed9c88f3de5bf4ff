#!/bin/bash
# Session 23 lease 5: each opcode's bodies alone in the kernel, compiled (no launch), with ptxas' report.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
ALL=EMBED+GEMV+KV_WRITE+IK_WRITE+INDEX_SCORE+INDEX_TOPK+ABSORB+ATTN+UV+ROUTER_SELECT+SWIGLU_UP+SWIGLU_DOWN+MOE_COMBINE
timeout 560 python3 experiments/persistent_lowering.py --config glm5_slice --ptxas \
  --ops skeleton,GEMV,SWIGLU_UP,SWIGLU_DOWN,INDEX_TOPK,ATTN,INDEX_SCORE,UV,ABSORB,ROUTER_SELECT,KV_WRITE,IK_WRITE,MOE_COMBINE,EMBED,$ALL \
  --out $OUT --name s23_lowering_ptxas > $OUT/s23_lowering_ptxas.log 2>&1
echo "rc=$?"
python3 - <<'PY'
import json, os
r = json.load(open(os.environ["OUT"] + "/s23_lowering_ptxas.json"))
for row in r["rows"]:
    p = row.get("ptxas", {})
    f = (p.get("functions") or [{}])[0]
    print(row["ops"][:40], row.get("compile_s"), f.get("registers"), f.get("spill_stores_bytes"), f.get("spill_loads_bytes"),
          [n["note"][:60] for n in p.get("notes", []) if "spilled" not in n["note"]], p.get("error"))
PY
