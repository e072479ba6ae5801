#!/usr/bin/env bash
# The one prepared run for a lent CUDA machine (docs/benchmarks.md, "H200"). Run from the repo
# root with the carried folder .device/ (see below); figures and logs go to $OUT (default
# runs/gpu). Steps: install the carried wheels, build mamba-ssm's forward kernel in the
# background, measure the paper architecture's forward with the torch scan meanwhile, then the
# GPU tests (kernel parity), the kernel check, the forward with the kernel, and the pipeline.
# Arguments name a subset of the steps after the build: tests kernel forward pipeline
# pipeline_fp32 profile forward_default train (default: tests kernel forward pipeline).
#
# .device/ is made by tools/prepare_device_carry.sh (none of it is committed): whl/ (pydicom,
# nibabel, jsonschema and its three dependencies, for Python 3.12), whl_default/ (the
# EfficientNet-Lite0 package, for forward_default), ray_trim.zip (the ray 2.60 cp312 wheel
# without its Java jars, rllib, serve, llm and dashboard client), mamba_ssm-*.tar.gz. Only 64 MiB
# travel per call: carry whl/, ray_trim.zip and the sdist, or whl/, whl_default/ and the sdist.
set -u
OUT=${OUT:-runs/gpu}
CARRY=${CARRY:-.device}
SITE=/tmp/pdd-site
MAMBA=/tmp/pdd-mamba
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo "== $(date +%T) $*"; }

step install
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$CARRY"/whl*/*.whl
if [ -f "$CARRY"/ray_trim.zip ]; then  # only the pipeline steps need ray
  python3 -m zipfile -e "$CARRY"/ray_trim.zip "$SITE"
  chmod +x "$SITE"/ray/core/src/ray/gcs/gcs_server "$SITE"/ray/core/src/ray/raylet/raylet
fi
export PYTHONPATH="$PWD:$SITE:$MAMBA/src:$MAMBA/build"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"

build_kernel() {  # runs in the background; the forward with the torch scan overlaps it
  timeout 300 python3 tools/build_mamba_fwd.py "$CARRY"/mamba_ssm-*.tar.gz "$MAMBA" 9.0 \
    >"$OUT"/build.log 2>&1
  echo "build exit $?" >>"$OUT"/build.log
}
tests() {
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_scan.py 2>&1 | tail -5
}
kernel() { timeout 90 python3 -m pdd_batch bench kernel 2>&1 | tee "$OUT"/kernel.log; }
forward() {
  timeout 120 python3 -m pdd_batch bench forward --batch 32 --seconds 5 2>&1 | tee "$OUT"/forward.log
}
pipeline_run() {  # precision
  timeout 200 python3 -m pdd_batch bench pipeline --paper --precision "$1" --seconds 8 2>&1 \
    | grep -v -E "INFO|WARNING|core_worker" | tee "$OUT"/pipeline_"$1".log
}
pipeline() { pipeline_run bf16; }
pipeline_fp32() { pipeline_run fp32; }
forward_default() {  # the embedded default model (needs the EfficientNet-Lite0 wheel in whl/)
  timeout 120 python3 -m pdd_batch bench forward --default-model --batch 64 --seconds 5 2>&1 \
    | tee "$OUT"/forward_default.log
}
profile() { timeout 90 python3 tools/profile_forward.py 32 bf16 2>&1 | tee "$OUT"/profile.log; }
train() {  # what one training run of the paper configuration costs on the GPU
  timeout 120 python3 -m pdd_batch bench train --steps 5 2>&1 | tee "$OUT"/train.log
}

STEPS=${*:-tests kernel forward pipeline}
step "build mamba-ssm forward kernel (background)"
build_kernel &
BUILD=$!
case " $STEPS " in
  *" forward "*)
    step "forward, torch scan on CUDA"
    PDD_SCAN_BACKEND=torch timeout 150 python3 -m pdd_batch bench forward --batch 32 \
      --seconds 5 2>&1 | tee "$OUT"/forward_torchscan.log
    ;;
esac
wait $BUILD
tail -3 "$OUT"/build.log
for s in $STEPS; do
  step "$s"
  "$s"
done
step done
