#!/usr/bin/env bash
# One call on a CUDA machine: train the bundled shapes model (VAE, then UNet + text encoder),
# export it, and run the CUDA overhead benchmark on an SD-1.5-shaped random model.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [VAE_MINUTES] [UNET_MINUTES] [WORKERS]
#
# INIT=src/prompt2prompt/shapes/model continues training the shipped model instead (no VAE stage;
# the UNet stage gets a fresh optimizer and a new warm-up and decay); OFFSET=0.1 trains with offset
# noise (see train.py --offset-noise); MINSNR=5 weights the loss by Min-SNR-gamma (train.py
# --min-snr); GROUNDING=0.05 adds the token grounding loss on the cross-attention maps (train.py
# --grounding), SHARE=0.05 its pixel side (--grounding-share), SIDES=8,4 keeps both on the maps of
# those sides (--grounding-sides; default every layer), SHARE_WORDS=1 takes the pixel side's share among
# the caption's words only (--grounding-share-words); BATCH=2048 trains the UNet at that batch (default 512; LR=... sets the peak learning
# rate); BENCH=none skips the benchmark. Each stage prints how long it waited for rendered batches.
#
# Writes into OUT_DIR: loss.csv and state.json of the run, the exported model as
# model.tar.part-* (tar split into 15 MB pieces: `cat model.tar.part-* | tar x`), and
# bench_sd15_fp16.json. Needs diffusers and transformers importable (on the device machine they
# travel as wheels, see DEVELOPERS.md), and open_clip_torch for the benchmark's CLIP vocabulary.
set -u
OUT=${1:?usage: gpu_session.sh OUT_DIR [VAE_MINUTES] [UNET_MINUTES] [WORKERS]}
VAE_MIN=${2:-1.5}
UNET_MIN=${3:-5}
WORKERS=${4:-12}
BENCH=${BENCH:---model sd15-shape --device cuda --repeats 3}
RUN=${RUN:-/tmp/shapes_run}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1
t0=$(date +%s)
if [ -n "${INIT:-}" ]; then
  rm -rf "$RUN" "$RUN.model"  # a retry on the same machine starts from INIT again, not from the first try's run
  python3 -m prompt2prompt.shapes.train "$RUN" --init "$INIT" --stage unet --batch "${BATCH:-512}" --lr "${LR:-3e-4}" --warmup 200 --minutes "$UNET_MIN" --workers "$WORKERS" --offset-noise "${OFFSET:-0}" --min-snr "${MINSNR:-0}" --grounding "${GROUNDING:-0}" --grounding-share "${SHARE:-0}" ${SIDES:+--grounding-sides "$SIDES"} ${SHARE_WORDS:+--grounding-share-words} --export "$RUN.model" 2>&1 | grep --line-buffered -v -e torchvision -e "Writing model"
else
  python3 -m prompt2prompt.shapes.train "$RUN" --stage vae --batch 128 --minutes "$VAE_MIN" --workers "$WORKERS" 2>&1 | grep --line-buffered -v torchvision
  python3 -m prompt2prompt.shapes.train "$RUN" --stage unet --batch "${BATCH:-512}" --lr "${LR:-4e-4}" --warmup 500 --minutes "$UNET_MIN" --workers "$WORKERS" --offset-noise "${OFFSET:-0}" --min-snr "${MINSNR:-0}" --grounding "${GROUNDING:-0}" --grounding-share "${SHARE:-0}" ${SIDES:+--grounding-sides "$SIDES"} ${SHARE_WORDS:+--grounding-share-words} --export "$RUN.model" 2>&1 | grep --line-buffered -v -e torchvision -e "Writing model"
fi
echo "training took $(( $(date +%s) - t0 )) s"
cp "$RUN/state.json" "$OUT/"; cp "$RUN/loss.csv" "$OUT/" 2>/dev/null
tar -C "$(dirname "$RUN.model")" -cf - "$(basename "$RUN.model")" | split -b 15M - "$OUT/model.tar.part-"
[ "$BENCH" = none ] && { echo "all done after $(( $(date +%s) - t0 )) s"; exit 0; }
# shellcheck disable=SC2086
timeout 150 python3 benchmarks/speed.py $BENCH --variants replace,refine,reweight,replace_localblend,three_targets,attention,none --json "$OUT/bench_sd15_fp16.json" 2>&1 | grep --line-buffered -v torchvision
echo "all done after $(( $(date +%s) - t0 )) s"
