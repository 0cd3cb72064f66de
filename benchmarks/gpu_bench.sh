#!/usr/bin/env bash
# One call on a CUDA machine, most important first: the speed benchmark (fp16, all variants), the
# SDXL speed benchmark (sdxl-shape: SDXL base's architecture, random weights, fp16, 1024 px, 30
# steps), null-text inversion with and without CUDA graphs (time, and the null embeddings compared),
# the torch.profiler comparison of a replace edit with plain generation, and (only when named) the
# speed benchmark in bf16.
# (Operator counts do not depend on the device: profile_edit.py --count-ops on a CPU gives them.)
#   bash benchmarks/gpu_bench.sh OUT_DIR [STAGES]    (diffusers importable; see DEVELOPERS.md for the wheels)
# STAGES: a space-separated subset of "sd15 sdxl inversion profile bf16", run in that order (default
# "sd15 sdxl inversion profile": their timeouts, 190 + 200 + 150 + 60 s, fill one 600 s device call).
OUT=${1:?usage: gpu_bench.sh OUT_DIR [STAGES]}
STAGES=" ${2:-sd15 sdxl inversion profile} "
want() { [[ "$STAGES" == *" $1 "* ]]; }
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
t0=$(date +%s)
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null
if want sd15; then
  timeout 190 python3 benchmarks/speed.py --model sd15-shape --device cuda --repeats 3 \
    --variants replace,refine,reweight,replace_localblend,three_targets,attention,none --json "$OUT/bench_sd15_fp16.json" 2>&1 | grep --line-buffered -v torchvision
  echo "fp16 done after $(( $(date +%s) - t0 )) s"
fi
if want sdxl; then  # estimated 4-5 s a call (batch 4 at 1024 px, 30 steps): 4 variants x 3 pairs x 2 calls + building
  timeout 200 python3 benchmarks/speed.py --model sdxl-shape --device cuda --steps 30 --repeats 2 \
    --variants replace,refine,replace_localblend,none --json "$OUT/bench_sdxl_fp16.json" 2>&1 | grep --line-buffered -v torchvision
  echo "sdxl done after $(( $(date +%s) - t0 )) s"
fi
if want inversion; then
  timeout 150 python3 benchmarks/inversion.py --model sd15-shape --device cuda --dtype float16 --images 1 --steps 50 \
    --methods null-text,null-text-graph --json "$OUT/inversion_sd15_fp16_graph.json" 2>&1 | grep --line-buffered -v torchvision
  echo "inversion done after $(( $(date +%s) - t0 )) s"
fi
if want profile; then
  timeout 60 python3 benchmarks/profile_edit.py --model sd15-shape --device cuda --steps 10 > "$OUT/profile_replace.txt" 2>&1
  echo "profile done after $(( $(date +%s) - t0 )) s"
fi
if want bf16; then
  timeout 80 python3 benchmarks/speed.py --model sd15-shape --device cuda --dtype bfloat16 --repeats 3 \
    --variants replace,refine,none --json "$OUT/bench_sd15_bf16.json" 2>&1 | grep --line-buffered -v torchvision
fi
echo "all done after $(( $(date +%s) - t0 )) s"
