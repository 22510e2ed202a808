#!/usr/bin/env bash
# One-shot GPU check of wsi-pipeline (5-7 minutes on one H200 with 16 cores; hard budget 7 min).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   GPU_CHECK_BUDGET=300 bash benchmarks/gpu_check.sh   # steps stop being started after 300 s
#   bash benchmarks/gpu_check.sh --cpu      # rehearsal on a CPU: same steps, tiny sizes, no compile
#
# Data: the demo cohort is generated there (`wsi-pipeline make-demo`, 12 slides) and so is the
# benchmark slide of benchmarks/read_bench.py (`write_large_svs`). ../shared does not travel:
# carry `.gpu_data`, an ignored copy of ../shared/data (slides/ + images/, 11 MB), and the
# `gpu` tests read its real slides, the real Aperio slide cmu_small_region.svs is segmented and
# extracted on the GPU, and the benchmark slide gets the real texture on white glass (the
# fast-decoding slide); without it those tests skip and the texture is procedural.
# Wheels: when .whl/ holds them (openslide-python, openslide-bin, imagecodecs, submitit: missing
# on the GPU machine's image), they are installed into /tmp/site first; carry `.whl`.
#
# Writes to $OUT (6 files): log.txt (this whole log), env.txt, pytest_gpu.txt, demo.txt
# (segment / extract / train / evaluate on CUDA), bench.jsonl (one JSON line per
# extract_bench.py configuration) and summary.txt (one line per step: ok/FAILED and seconds, then
# the throughput table). Every step has its own time limit inside a total budget, so one hang
# cannot eat the others' time.

MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
OUT=${OUT:-/tmp/gpu_check_out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PS4='+ [$(date -u +%H:%M:%S)] '
set -x

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import openslide, imagecodecs" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WSI_BENCH_CACHE="$WORK/bench_cache"
GPU_DATA=${GPU_DATA:-.gpu_data}
[ -d "$GPU_DATA/slides" ] && export WSI_TEST_DATA="$(cd "$GPU_DATA" && pwd)"
START=$(date +%s)

if [ "$MODE" = gpu ]; then
  DEV=cuda; SLIDES=12; WORKERS=12; DEMO_WORKERS=4; BENCH_SIZE=80000x60000; N=3000; NU=1500; EPOCHS=2  # 80k x 60k: the 40k x 30k slide gave only 389 patches in its largest tissue piece on the first H200 run
  ENC2=uni; FP16=fp16; BF16=bf16; XLIMIT=120; BUDGET=${GPU_CHECK_BUDGET:-420}
else  # rehearsal: a ViT-S stands in for UNI's ViT-L (the same timm ViT code path);
  # fp32 (CPU autocast in half precision is slower than fp32)
  DEV=cpu; SLIDES=8; WORKERS=1; DEMO_WORKERS=1; BENCH_SIZE=20000x15000; N=32; NU=8; EPOCHS=1
  ENC2=kaiko_vits16; FP16=fp32; BF16=fp32; XLIMIT=600; BUDGET=1800
fi
CLI=("$PY" -m pipeline.cli)

step() {  # step NAME SECONDS COMMAND...: run with a time limit, one line in summary.txt
  local name=$1 limit=$2; shift 2
  local t0 left
  t0=$(date +%s)
  left=$(( BUDGET - t0 + START ))
  if [ "$left" -lt 20 ]; then
    printf '%-34s SKIPPED (budget of %ss spent)\n' "$name" "$BUDGET" >> "$OUT/summary.txt"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout --kill-after=10 "$limit" "$@"
  local rc=$? state=ok
  [ $rc -ne 0 ] && state="FAILED rc=$rc"
  [ $rc -eq 124 ] && state="TIMED OUT after ${limit}s"
  printf '%-34s %-24s %4ss  (t=%ss)\n' "$name" "$state" "$(( $(date +%s) - t0 ))" "$(( $(date +%s) - START ))" \
    >> "$OUT/summary.txt"
  return 0
}

# (a) the machine and the stack
{
  date -u; uptime; nproc; free -g | head -2
  nvidia-smi || true
  "$PY" - <<'PYEOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
if torch.cuda.is_available():
    print("bf16 supported", torch.cuda.is_bf16_supported(), "free/total GiB", [round(v / 2**30, 1) for v in torch.cuda.mem_get_info()])
for name in ("timm", "numpy", "cv2", "h5py", "tifffile", "imagecodecs", "openslide", "skimage", "sklearn", "pandas", "submitit"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as exc:
        print(name, "MISSING", exc)
import openslide
print("libopenslide", openslide.__library_version__)
PYEOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# (b) tests marked gpu (they skip without CUDA)
step "pytest -m gpu" 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu $(grep -rl "mark.gpu" tests --include='test_*.py') \
  > "$OUT/pytest_gpu.txt" 2>&1
tail -5 "$OUT/pytest_gpu.txt"

# (b) + (d) the product on CUDA: generated demo cohort -> segment -> extract (two encoders in one
# read pass: resnet18 + UNI's ViT-L/16, random weights) -> MHIM(AB-MIL) train in bf16 and in
# fp16 (GradScaler) -> evaluate
cat > "$WORK/gpu_check.yaml" <<YAMLEOF
name: gpu_check
manifest: demo/slides/manifest.csv
workspace: ws
segment: {preset: bwh_biopsy, target_mpp: 1.0, patch_px: 224}
extract: {backbone: resnet18, weights: random, batch_size: 64, num_workers: $DEMO_WORKERS, device: $DEV}
train: {recipe: mhim_abmil_c16, experiment: gpu_bf16, folds: 2, seeds: [2021], epochs: $EPOCHS,
        lr: 1.0e-3, val_ratio: 0.2, feature_norm: standardize, precision: bf16, device: $DEV}
evaluate: {heatmaps: 0}
YAMLEOF
sed -e 's/experiment: gpu_bf16/experiment: gpu_fp16/' -e 's/precision: bf16/precision: fp16/' \
  "$WORK/gpu_check.yaml" > "$WORK/gpu_check_fp16.yaml"
{
  if [ -n "${WSI_TEST_DATA:-}" ]; then  # a real Aperio slide (CMU-1-Small-Region, 50 patches at level 0)
    printf 'slide_id,path\ncmu,%s\n' "$WSI_TEST_DATA/slides/cmu_small_region.svs" > "$WORK/real.csv"
    step "real slide: segment" 60 "${CLI[@]}" segment --manifest "$WORK/real.csv" --workspace "$WORK/ws_real" \
      --preset bwh_biopsy --patch-level 0 -q
    step "real slide: extract r50,$ENC2 ($DEV)" 90 "${CLI[@]}" extract --manifest "$WORK/real.csv" \
      --workspace "$WORK/ws_real" --backbone "resnet50_trunc,$ENC2" --weights random --device $DEV -q
  fi
  step "make-demo ($SLIDES slides)" 90 "${CLI[@]}" make-demo --out "$WORK/demo/slides" --slides $SLIDES --seed 0 -q
  step "segment" 90 "${CLI[@]}" segment --config "$WORK/gpu_check.yaml" -q
  step "extract resnet18,$ENC2 ($DEV)" $XLIMIT "${CLI[@]}" extract --config "$WORK/gpu_check.yaml" \
    --backbone "resnet18,$ENC2" --weights random -q
  FEATURES="$WORK/ws/features/resnet18-random/mpp1.00_224px_bwh_biopsy"
  step "train MHIM bf16 ($DEV)" 120 "${CLI[@]}" train --config "$WORK/gpu_check.yaml" --features "$FEATURES" -q
  step "train MHIM fp16 ($DEV)" 120 "${CLI[@]}" train --config "$WORK/gpu_check_fp16.yaml" --features "$FEATURES" -q
  step "evaluate ($DEV)" 90 "${CLI[@]}" evaluate --config "$WORK/gpu_check.yaml" --experiment gpu_bf16 --device $DEV -q
  "$PY" - "$WORK" <<'PYEOF'
import glob, sys, h5py
root = sys.argv[1]
for bag in sorted(glob.glob(f"{root}/ws_real/features/*/*/*.h5")) + sorted(glob.glob(f"{root}/ws/features/*/*/*.h5"))[:1]:
    with h5py.File(bag) as f:
        print(bag, {k: f[k].shape for k in f}, {k: f.attrs[k] for k in ("backbone", "weights", "precision") if k in f.attrs})
for status in sorted(glob.glob(f"{root}/ws*/**/status.csv", recursive=True)):
    text = open(status).read()
    print(status, text.count("\n") - 1, "rows;", "HAS FAILED ROWS" if ",failed," in text else "no failed rows")
for log in sorted(glob.glob(f"{root}/ws/experiments/**/*.log", recursive=True))[:2]:
    print(log)
    print("".join(open(log).readlines()[-8:]))
PYEOF
} > "$OUT/demo.txt" 2>&1
tail -30 "$OUT/demo.txt"

# (c) extraction throughput of the product loop, per encoder (benchmarks/extract_bench.py)
bench() {  # bench NAME SECONDS ARGS...
  local name=$1 limit=$2
  shift 2
  step "bench $name" "$limit" "$PY" benchmarks/extract_bench.py --device $DEV --size $BENCH_SIZE --workers $WORKERS \
    --label "$name" --jsonl "$OUT/bench.jsonl" "$@"
}
bench "resnet50_trunc fp16"            150 --backbones resnet50_trunc --precision $FP16 --patches $N --batch-size 256 --repeats 2
bench "resnet50_trunc bf16"            90  --backbones resnet50_trunc --precision $BF16 --patches $N --batch-size 256 --repeats 2
bench "$ENC2 bf16"                     90  --backbones $ENC2 --precision $BF16 --patches $NU --batch-size 256 --repeats 2
bench "resnet50_trunc,$ENC2 bf16"      90  --backbones resnet50_trunc,$ENC2 --precision $BF16 --patches $NU --batch-size 256
bench "$ENC2 bf16 batch auto"          90  --backbones $ENC2 --precision $BF16 --patches $NU --batch-size auto
if [ "$MODE" = gpu ]; then
  bench "resnet50_trunc bf16 compiled" 150 --backbones resnet50_trunc --precision $BF16 --patches $N --batch-size 256 --compile
fi
bench "resnet50_trunc bf16 in-process" 90  --backbones resnet50_trunc --precision $BF16 --patches $NU --batch-size 256 --workers 0
if [ -f "$OUT/bench.jsonl" ]; then
  "$PY" - "$OUT/bench.jsonl" <<'PYEOF' | tee -a "$OUT/summary.txt"
import json, sys
print(f"\n{'configuration':32s} {'patches/s':>9s} {'batch':>5s} {'read wait s':>11s} {'transfer s':>10s}  model s per encoder")
for line in open(sys.argv[1]):
    r = json.loads(line)
    models = ", ".join(f"{k} {v['model_s']} ({v['precision']})" for k, v in r["encoders"].items())
    print(f"{r['label']:32s} {r['patches_per_s']:9.1f} {r['batch_size']:5d} {r['read_wait_s']:11.2f} {r['transfer_s']:10.2f}  {models}")
PYEOF
fi
echo "total $(( $(date +%s) - START )) s" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
