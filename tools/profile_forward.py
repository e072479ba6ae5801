"""Where the paper architecture's forward spends GPU time: torch.profiler, one batch, top ops.

Usage (CUDA machine): python tools/profile_forward.py [BATCH] [PRECISION]  (default 32 bf16)
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from model.bench import paper_architecture_config
from model.pdd import build_model


def main(batch: int = 32, precision: str = "bf16") -> None:
    model = build_model(paper_architecture_config()).cuda().eval()
    size = model.config.image_size
    x = torch.rand(batch, 1, size, size, device="cuda")  # (B, 1, S, S)
    with torch.inference_mode():
        for _ in range(3):
            model.predict(x, precision=precision)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                model.predict(x, precision=precision)
            torch.cuda.synchronize()
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    )


if __name__ == "__main__":
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 32, sys.argv[2] if len(sys.argv) > 2 else "bf16"
    )
