#!/usr/bin/env bash
# One call on a CUDA machine, most important first: the speed benchmark (fp16, all variants),
# null-text inversion with and without CUDA graphs (time, and the null embeddings compared), the
# torch.profiler comparison of a replace edit with plain generation, and the speed benchmark in bf16.
# (Operator counts do not depend on the device: profile_edit.py --count-ops on a CPU gives them.)
#   bash benchmarks/gpu_bench.sh OUT_DIR      (diffusers importable; see DEVELOPERS.md for the wheels)
OUT=${1:?usage: gpu_bench.sh OUT_DIR}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
t0=$(date +%s)
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null
timeout 190 python3 benchmarks/speed.py --model sd15-shape --device cuda --repeats 3 \
  --variants replace,refine,reweight,replace_localblend,three_targets,attention,none --json "$OUT/bench_sd15_fp16.json" 2>&1 | grep --line-buffered -v torchvision
echo "fp16 done after $(( $(date +%s) - t0 )) s"
timeout 150 python3 benchmarks/inversion.py --model sd15-shape --device cuda --dtype float16 --images 1 --steps 50 \
  --methods null-text,null-text-graph --json "$OUT/inversion_sd15_fp16_graph.json" 2>&1 | grep --line-buffered -v torchvision
echo "inversion done after $(( $(date +%s) - t0 )) s"
timeout 60 python3 benchmarks/profile_edit.py --model sd15-shape --device cuda --steps 10 > "$OUT/profile_replace.txt" 2>&1
echo "profile done after $(( $(date +%s) - t0 )) s"
timeout 80 python3 benchmarks/speed.py --model sd15-shape --device cuda --dtype bfloat16 --repeats 3 \
  --variants replace,refine,none --json "$OUT/bench_sd15_bf16.json" 2>&1 | grep --line-buffered -v torchvision
echo "all done after $(( $(date +%s) - t0 )) s"
