"""Build mamba-ssm's selective-scan CUDA kernel (forward only) from its source archive.

For a lent GPU machine with no package index: PyPI ships mamba-ssm as source only, and a full
build (forward + backward, 10 CUDA files) takes longer than a device check can afford. pdd-batch
only runs the scan forward (the teachers are frozen), so this builds the three forward files for
one architecture, with the backward binding left out of ``selective_scan.cpp``, and replaces the
package's ``__init__`` (which imports the language-model modules) by its version line.

Usage: python tools/build_mamba_fwd.py mamba_ssm-X.tar.gz DEST [ARCH]   (ARCH default 9.0)
Then put ``DEST/src`` and ``DEST/build`` on PYTHONPATH: ``model.scan`` finds the kernel through
``mamba_ssm.ops.selective_scan_interface`` as with an installed package.
"""

from __future__ import annotations

import os
import sys
import tarfile
import time
from pathlib import Path

NVCC_FLAGS = [  # as mamba-ssm's setup.py, less the build-log options
    "-O3",
    "-std=c++17",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
]


def unpack(archive: Path, dest: Path) -> Path:
    """Extract the sdist under ``dest/src`` and return its top folder."""
    src = dest / "src"
    src.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    (top,) = [p for p in src.iterdir() if p.is_dir() and p.name.startswith("mamba_ssm-")]
    return top


def forward_only_binding(csrc: Path) -> Path:
    """``selective_scan.cpp`` without ``selective_scan_bwd`` and its ``bwd`` binding."""
    text = (csrc / "selective_scan.cpp").read_text()
    start = text.index("std::vector<at::Tensor>\nselective_scan_bwd(")
    end = text.index("PYBIND11_MODULE")
    text = text[:start] + text[end:]
    text = "\n".join(line for line in text.splitlines() if '"bwd"' not in line) + "\n"
    out = csrc / "selective_scan_fwd_only.cpp"
    out.write_text(text)
    return out


def main(archive: str, dest: str, arch: str = "9.0") -> None:
    from torch.utils.cpp_extension import load

    t0 = time.perf_counter()
    top = unpack(Path(archive), Path(dest))
    for pkg in ("mamba_ssm",):  # the package's modules stay; only the eager imports go
        (top / pkg / "__init__.py").write_text('__version__ = "forward-only build"\n')
    (Path(dest) / "src" / "mamba_ssm").symlink_to(top / "mamba_ssm")
    csrc = top / "csrc" / "selective_scan"
    build = Path(dest) / "build"
    build.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "4")
    code = arch.replace(".", "")
    load(
        name="selective_scan_cuda",
        sources=[
            str(forward_only_binding(csrc)),
            *(str(csrc / f"selective_scan_fwd_{t}.cu") for t in ("fp32", "fp16", "bf16")),
        ],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=[*NVCC_FLAGS, "-gencode", f"arch=compute_{code},code=sm_{code}"],
        extra_include_paths=[str(csrc)],
        build_directory=str(build),
        verbose=False,
    )
    print(f"selective_scan_cuda (forward) built for sm_{code} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
