"""Selective scan: the vectorised torch scan against the sequential reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.scan import (
    CUDA_BACKEND,
    TORCH_BACKEND,
    ScanShapeError,
    _chunk_plan,
    scan_backend,
    selective_scan,
    selective_scan_reference,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: many small ops on shared CI cores oversubscribe badly with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(
    bt: int, k: int, dn: int, n: int, length: int, seed: int = 0, dt_scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Random scan inputs shaped like VMamba's (A = -exp(A_logs), dt bias in softplus range)."""
    g = torch.Generator().manual_seed(seed)
    kd = k * dn
    a_logs = torch.log(torch.arange(1, n + 1, dtype=torch.float32)) + 0.3 * torch.randn(
        kd, n, generator=g
    )
    dt = torch.exp(torch.empty(kd).uniform_(-6.9, -2.3, generator=g))  # 1e-3 .. 0.1
    return {
        "u": torch.randn(bt, kd, length, generator=g),
        "delta": dt_scale * torch.randn(bt, kd, length, generator=g),
        "A": -torch.exp(a_logs),
        "B": torch.randn(bt, k, n, length, generator=g),
        "C": torch.randn(bt, k, n, length, generator=g),
        "D": torch.rand(kd, generator=g) + 0.5,
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
    }


SHAPES = [  # (Bt, K, Dn, N, L, chunk): L not divisible by chunk in most cases
    (1, 1, 3, 4, 1, 8),
    (2, 4, 5, 16, 37, 8),
    (1, 2, 8, 8, 100, 64),
    (3, 4, 4, 16, 65, 16),
    (1, 4, 6, 16, 130, 1),
]


@pytest.mark.parametrize(("bt", "k", "dn", "n", "length", "chunk"), SHAPES)
@pytest.mark.parametrize("with_d_bias", [True, False])
def test_torch_scan_matches_reference(bt, k, dn, n, length, chunk, with_d_bias) -> None:
    x = make_inputs(bt, k, dn, n, length, seed=length + k)
    if not with_d_bias:
        x["D"] = x["delta_bias"] = None
    ref = selective_scan_reference(**x)
    got = selective_scan(**x, chunk=chunk)
    assert got.shape == (bt, k * dn, length) and got.dtype == torch.float32
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_non_contiguous_inputs() -> None:
    x = make_inputs(2, 2, 4, 8, 30)
    x["u"] = x["u"].transpose(0, 2).contiguous().transpose(0, 2)  # same values, other strides
    x["B"] = x["B"].transpose(2, 3).contiguous().transpose(2, 3)
    assert not x["u"].is_contiguous() and not x["B"].is_contiguous()
    ref = selective_scan_reference(**{k: v.contiguous() for k, v in x.items()})
    torch.testing.assert_close(selective_scan(**x, chunk=8), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(selective_scan_reference(**x), ref, rtol=0, atol=0)


def test_without_softplus_matches_reference() -> None:
    x = make_inputs(2, 2, 4, 8, 50)
    x["delta"] = x["delta"].abs() * 0.1  # positive step sizes, as the caller must then give
    x["delta_bias"] = x["delta_bias"].abs()
    ref = selective_scan_reference(**x, delta_softplus=False)
    torch.testing.assert_close(selective_scan(**x, delta_softplus=False), ref, rtol=0, atol=1e-5)


def test_fast_decay_splits_chunks_and_stays_finite() -> None:
    # Steps of up to ~|A| * softplus(30) ~ 500 in log-decay: one position must be a chunk alone.
    x = make_inputs(1, 2, 4, 16, 70, dt_scale=10.0)
    x["delta"][:, :, 20:30] = 30.0
    ref = selective_scan_reference(**x)
    got = selective_scan(**x, chunk=32)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # |y| reaches ~10 here


def test_chunk_plan_covers_sequence_with_bounded_decay() -> None:
    from model.scan import _MAX_CHUNK_DECAY

    delta = torch.rand(1, 2, 3, 200) * 2.0
    delta[..., 50] = 100.0
    abs_a = torch.full((2, 3), 5.0)
    plan = _chunk_plan(delta, abs_a, 64)
    assert plan[0][0] == 0 and plan[-1][1] == 200
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:], strict=False))
    for s, e in plan:
        span = (delta[..., s + 1 : e].sum(-1) * 5.0).max().item()
        assert e - s == 1 or span <= _MAX_CHUNK_DECAY * (1 + 1e-5)
    assert any(s == 50 for s, _ in plan)  # the huge step only ever decays a carried state


def test_float64_inputs_give_tight_parity() -> None:
    x = {k: (v.double() if v is not None else None) for k, v in make_inputs(2, 2, 4, 8, 45).items()}
    ref = selective_scan_reference(**x)
    got = selective_scan(**x, chunk=16)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_backward_matches_reference_gradients() -> None:
    x = make_inputs(1, 2, 3, 4, 23)
    grads = []
    for fn in (selective_scan_reference, selective_scan):
        leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
        kwargs = {"chunk": 8} if fn is selective_scan else {}
        y = fn(**leaves, **kwargs)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for name in x:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)


def test_gradcheck_float64() -> None:
    x = {k: v.double() for k, v in make_inputs(1, 1, 2, 3, 9).items()}
    names = ["u", "delta", "A", "B", "C", "D", "delta_bias"]

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        return selective_scan(**dict(zip(names, tensors, strict=True)), chunk=4)

    inputs = tuple(x[n].requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_bad_shapes_raise() -> None:
    x = make_inputs(1, 2, 3, 4, 10)
    with pytest.raises(ScanShapeError, match="B must be"):
        selective_scan(**{**x, "B": x["B"][..., :5]})
    with pytest.raises(ScanShapeError, match="A must be"):
        selective_scan_reference(**{**x, "A": x["A"][:3]})
    with pytest.raises(ScanShapeError, match="D must be"):
        selective_scan(**{**x, "D": x["D"][:2]})
    with pytest.raises(ValueError, match="A must be <= 0"):
        selective_scan(**{**x, "A": x["A"].abs()})
    with pytest.raises(ValueError, match="delta must be >= 0"):
        selective_scan(**x, delta_softplus=False)


def test_backend_is_torch_on_cpu() -> None:
    assert scan_backend("cpu") == TORCH_BACKEND
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        assert scan_backend("cuda") == TORCH_BACKEND  # no kernel: the torch scan also on CUDA
    else:
        assert scan_backend("cuda") == CUDA_BACKEND


def test_backend_env_forces_the_torch_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDD_SCAN_BACKEND", "torch")
    assert scan_backend("cuda") == TORCH_BACKEND
    monkeypatch.setenv("PDD_SCAN_BACKEND", "kernel")
    with pytest.raises(ValueError, match="PDD_SCAN_BACKEND must be 'auto' or 'torch'"):
        scan_backend("cuda")
    assert scan_backend("cpu") == TORCH_BACKEND  # CPU never consults the choice


def test_import_does_not_probe_mamba_ssm() -> None:
    code = "import json, sys, model.scan, model.vmamba; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "mamba_ssm" not in json.loads(out.stdout)
    assert out.stderr == ""


@pytest.mark.gpu
def test_cuda_matches_reference() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = make_inputs(2, 4, 8, 16, 300)
    ref = selective_scan_reference(**x)
    got = selective_scan(**{k: v.cuda() for k, v in x.items()}).cpu()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_cuda_bf16_inputs_match_reference() -> None:
    """Under bf16 autocast the scan receives bf16 u/delta/B/C and fp32 A/D: both backends
    accept the mix and stay close to the fp32 reference on the bf16-rounded inputs."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = make_inputs(2, 4, 8, 16, 300)
    low = {k: (v.bfloat16() if k in ("u", "delta", "B", "C") else v) for k, v in x.items()}
    ref = selective_scan_reference(**{k: v.float() for k, v in low.items()})
    got = selective_scan(**{k: v.cuda() for k, v in low.items()}).cpu()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)  # kernel output is bf16-rounded


def test_scan_benchmark_smoke() -> None:
    from model.bench import run_scan_benchmark

    lines: list[str] = []
    speedup = run_scan_benchmark(print_fn=lines.append, repeats=1, side=8)
    assert lines[-1].startswith("scan speedup: ") and float(lines[-1].split(": ")[1]) > 0
    assert speedup > 0 and any(line.startswith("max abs difference") for line in lines)
    diff = next(line for line in lines if line.startswith("max abs difference"))
    assert float(diff.split(": ")[1]) <= 1e-5


def test_forward_benchmark_smoke() -> None:
    from model.bench import run_forward_benchmark
    from model.config import get_config

    lines: list[str] = []
    rates = run_forward_benchmark(
        print_fn=lines.append, batch=2, device="cpu", seconds=0.01, config=get_config("test")
    )
    assert set(rates) == {"fp32", "bf16"} and all(r > 0 for r in rates.values())
    assert lines[0].startswith("config test") and "scan backend torch" in lines[0]
    bf16 = next(line for line in lines if line.startswith("forward bf16"))
    assert float(bf16.split("vs first ")[1].rstrip(")")) < 0.05  # bf16 scores near fp32's


def test_forward_benchmark_runs_a_checkpoint(tmp_path: Path) -> None:
    from screen_support import make_checkpoint

    from model.bench import run_forward_benchmark

    lines: list[str] = []
    ckpt = make_checkpoint(tmp_path / "ckpt")
    rates = run_forward_benchmark(
        print_fn=lines.append, batch=2, device="cpu", seconds=0.01, model_path=ckpt
    )
    assert rates["fp32"] > 0 and lines[0].startswith("config test (resnet18")


def test_mamba_forward_only_binding_drops_the_backward(tmp_path) -> None:
    """tools/build_mamba_fwd.py cuts mamba-ssm's backward out of its binding source."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        from build_mamba_fwd import forward_only_binding
    finally:
        sys.path.pop(0)
    (tmp_path / "selective_scan.cpp").write_text(
        "#include <x>\nstd::vector<at::Tensor>\nselective_scan_fwd(int u) { return {}; }\n"
        "std::vector<at::Tensor>\nselective_scan_bwd(int u) { return {}; }\n"
        "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n"
        '    m.def("fwd", &selective_scan_fwd, "Selective scan forward");\n'
        '    m.def("bwd", &selective_scan_bwd, "Selective scan backward");\n}\n'
    )
    text = forward_only_binding(tmp_path).read_text()
    assert "selective_scan_fwd(int u)" in text and '"fwd"' in text
    assert "selective_scan_bwd" not in text and '"bwd"' not in text


def test_train_benchmark_smoke_and_its_estimate_adds_up() -> None:
    from model.bench import run_train_benchmark
    from model.config import get_config

    lines: list[str] = []
    got = run_train_benchmark(
        print_fn=lines.append, images=10, epochs=2, batch=4, steps=1, config=get_config("test")
    )
    assert got["feature_s_per_image"] > 0 and got["step_s"] > 0
    # 10 images: features once each; ceil(10 / 4) = 3 steps per epoch, 2 epochs
    expected = got["feature_s_per_image"] * 10 + got["step_s"] * 3 * 2
    assert abs(got["estimate_s"] - expected) < 1e-9
    assert lines[0].startswith("config test") and lines[-1].startswith("estimated train run")
