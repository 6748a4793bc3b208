"""The inference engine on CPU: the optimised network computes what the reference path computes."""

from __future__ import annotations

import torch

from oftsr.engine import EngineConfig, fast_student
from oftsr.infer import upscale
from oftsr.metrics import psnr
from tests.helpers import perturbed_unet


def student(seed: int = 0):
    torch.manual_seed(seed)
    return perturbed_unet(0.05).eval()


def test_the_engine_computes_the_reference_network_on_cpu():
    net = student()
    fast = fast_student(net, "cpu")
    from oftsr.nets.blocks import AttentionBlock

    assert fast.dtype == torch.float32 and not fast.compiled
    assert {m.impl for m in fast.net.modules() if isinstance(m, AttentionBlock)} == {"sdpa"}
    assert {m.impl for m in net.modules() if isinstance(m, AttentionBlock)} == {"legacy"}  # original untouched
    x, t = torch.randn(3, 6, 32, 32), torch.rand(3) * 999
    with torch.no_grad():
        assert torch.allclose(fast(x, t), net(x, t), atol=1e-4)


def test_static_batch_padding_returns_only_the_real_rows():
    net = student(1)
    fast = fast_student(net, "cpu", EngineConfig(static_batch=4))
    x, t = torch.randn(3, 6, 32, 32), torch.rand(3) * 999
    with torch.no_grad():
        out = fast(x, t)
        assert out.shape == (3, 6, 32, 32) and torch.allclose(out, net(x, t), atol=1e-4)


def test_tiled_upscaling_through_the_engine_matches_the_reference_within_45_db():
    net = student(2)
    lr = torch.rand(2, 3, 24, 40) * 2 - 1
    noise = torch.randn(2, 3, 96, 160)
    kw = dict(sigma_p=0.2, sf=4, tile=64, overlap=16, noise=noise)
    reference = upscale(net, lr, 0.5, **kw)
    fast = upscale(fast_student(net, "cpu", EngineConfig(static_batch=8)), lr, 0.5, **kw)
    assert psnr(fast.clamp(-1, 1), reference.clamp(-1, 1)).min() >= 45
    assert not fast_student(net, "cpu").training  # dropout never switches on


def test_bf16_autocast_free_engine_stays_close_on_cpu():
    net = student(3)
    fast = fast_student(net, "cpu", EngineConfig(precision="bf16"))
    x, t = torch.randn(2, 6, 32, 32), torch.rand(2) * 999
    with torch.no_grad():
        ref = net(x, t)
        diff = (fast(x, t) - ref).abs()
    assert diff.max() < 0.1 * ref.abs().max() + 1e-3  # bf16 weights and activations: a coarse bound on CPU


def test_the_gpu_check_script_runs_end_to_end_on_cpu(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_infer.py"
    spec = importlib.util.spec_from_file_location("gpu_infer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu_check.json"
    small = ["--device", "cpu", "--preset", "tiny", "--size", "32", "--batch", "2", "--train-batch", "2"]
    module.main([*small, "--quick", "--no-compile", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["inference"]["images_per_s"] > 0 and result["inference"]["speedup_over_eager"] > 0
    assert result["numerics"]["ok"] and result["numerics"]["max_abs_diff"] < 1e-3
    assert {"teacher", "distill"} <= set(result["train"]) and "cpu" in result["machine"]
    assert result["train"]["teacher"]["optimised_host_syncs_per_step"] is None  # counted on CUDA only
    checks = result["targets"]
    assert {"inference_images_per_s", "numerics_psnr_db", "teacher_step_speedup", "distill_step_speedup"} <= set(checks)
    assert checks["numerics_psnr_db"]["ok"]
    assert checks["all_ok"] == all(c["ok"] for k, c in checks.items() if k != "all_ok")
