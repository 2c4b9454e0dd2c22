#!/usr/bin/env bash
# The whole GPU comparison in one table (markdown), sized to run in about 6 minutes on one H200:
#   parity b64, mazes 39x39 b64, imagenet 224px T=50 b32 and b128, parity b512: ours eager and
#   compiled (bf16 autocast), against the reference when --reference DIR is given;
#   imagenet b32 with recompute_nlms and tick_checkpointing=5;
#   DeepSpeed ZeRO-2 vs ZeRO-3 on one GPU (NCCL, WORLD_SIZE=1), parity b64, bf16 parameters.
#
#   bench/gpu.sh [--reference DIR] [--device cuda|cpu] [--smoke]
#
# --smoke runs every row with tiny models (--set below), 2 ticks and one timed step; with
# --device cpu it checks the script on a machine without a GPU. STEPS (default 3) sets the
# timed steps per row. The ZeRO rows need deepspeed importable: on a machine without it, carry
# build/wheels from bench/gpu-wheels.sh and this script installs them into /tmp/site; without
# either they are left out, with a note.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

device=cuda smoke=0 reference=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --reference) reference=(--reference "$2"); shift 2 ;;
    --smoke) smoke=1; shift ;;
    *) echo "gpu.sh: unknown argument $1 (expected --device cpu|cuda, --reference DIR, --smoke)" >&2; exit 2 ;;
  esac
done

steps=${STEPS:-3}
compile=off,on
sizes=()
if [ "$smoke" = 1 ]; then
  steps=1
  sizes=(--iterations 2 --set d_model=32 --set d_input=16 --set heads=2 --set n_synch_out=16
         --set n_synch_action=16 --set n_random_pairing_self=0 --set memory_length=3
         --set memory_hidden_dims=2 --set synapse_depth=2 --set imagenet.backbone_type=resnet18-1
         --set mazes.backbone_type=resnet18-1)
  # inductor's CPU code generation takes minutes on a small machine: the smoke test compiles on CUDA only
  [ "$device" = cpu ] && compile=off
fi
if [ "$smoke" = 1 ]; then big=2 huge=4 image=32; else big=64 huge=512 image=224; fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$SECONDS

python bench/step.py --device "$device" --dtype bf16 --compile "$compile" --steps "$steps" "${reference[@]}" \
  "${sizes[@]}" --case "parity:$big" --case "mazes:$big:$([ "$smoke" = 1 ] && echo 16 || echo 39)" \
  --case "imagenet:$([ "$smoke" = 1 ] && echo 2 || echo 32):$image:$([ "$smoke" = 1 ] && echo 2 || echo 50)" \
  --case "imagenet:$([ "$smoke" = 1 ] && echo 4 || echo 128):$image:$([ "$smoke" = 1 ] && echo 2 || echo 50)" \
  --case "parity:$huge" | tee -a "$log" | grep -v '^note:'
python bench/step.py --device "$device" --dtype bf16 --steps "$steps" "${reference[@]}" "${sizes[@]}" \
  --checkpointing 0,5,nlms --no-header \
  --case "imagenet:$([ "$smoke" = 1 ] && echo 2 || echo 32):$image:$([ "$smoke" = 1 ] && echo 2 || echo 50)" \
  | tee -a "$log" | grep '^|'
if ! python -c "import deepspeed" >/dev/null 2>&1 && ls build/wheels/deepspeed-*.whl >/dev/null 2>&1; then
  bench/gpu-wheels.sh --install && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if python -c "import deepspeed" >/dev/null 2>&1; then
  python bench/zero.py --device "$device" --ranks 1 --preset parity --batch "$big" --steps "$steps" \
    --precision bf16 --per-module --step-rows "${sizes[@]}" 2>>"$log" | grep '^|'
else
  echo "note: ZeRO rows left out: deepspeed is not importable" >> "$log"
fi
grep '^note:' "$log" || true
echo "gpu.sh: $((SECONDS - start)) s on $device"
