#!/usr/bin/env bash
# One call on a CUDA machine: the speed benchmark (fp16, all variants; bf16, the main ones), the
# torch.profiler comparison of a replace edit with plain generation, and the operator count.
#   bash benchmarks/gpu_bench.sh OUT_DIR      (diffusers importable; see DEVELOPERS.md for the wheels)
OUT=${1:?usage: gpu_bench.sh OUT_DIR}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
t0=$(date +%s)
timeout 190 python3 benchmarks/speed.py --model sd15-shape --device cuda --repeats 3 \
  --variants replace,refine,reweight,replace_localblend,three_targets,attention,none --json "$OUT/bench_sd15_fp16.json" 2>&1 | grep -v torchvision
echo "fp16 done after $(( $(date +%s) - t0 )) s"
timeout 60 python3 benchmarks/profile_edit.py --model sd15-shape --device cuda --steps 10 > "$OUT/profile_replace.txt" 2>&1
timeout 45 python3 benchmarks/profile_edit.py --model sd15-shape --device cuda --count-ops --steps 2 2>&1 | grep -v torchvision | tee "$OUT/count_ops_fp16.txt"
echo "profile done after $(( $(date +%s) - t0 )) s"
timeout 80 python3 benchmarks/speed.py --model sd15-shape --device cuda --dtype bfloat16 --repeats 3 \
  --variants replace,refine,none --json "$OUT/bench_sd15_bf16.json" 2>&1 | grep -v torchvision
echo "all done after $(( $(date +%s) - t0 )) s"
