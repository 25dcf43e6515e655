"""CUDA checks and timings of the model-level features of issue 13, for a GPU machine.

Needs only torch, numpy, PyYAML and safetensors (what a bare GPU image holds):
it loads ``xorbit.model`` without the package's top level (xarray, Dask, pint).
Prints markdown tables for docs/benchmarks.md.

1. Adaptive vs uniform tokens: forward time of the 9.5m preset on large
   windows, fp32 and bf16 autocast (median of timed runs after warm-up, CUDA
   synchronised), partition time.
2. Adaptive tokens train on CUDA: one backward, finite non-zero gradients.
3. MC dropout on CUDA: seeded members repeat, do not depend on batch-mates,
   leave no hooks; the resolution embedding takes one spacing per sample.

    python benchmarks/gpu_check.py [--rounds 5] [--sizes 128x256,256x512]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _model_package():
    """``xorbit.model`` without running ``xorbit/__init__`` (no xarray stack needed)."""
    if "xorbit" not in sys.modules:
        pkg = types.ModuleType("xorbit")
        pkg.__path__ = [str(ROOT / "xorbit")]
        sys.modules["xorbit"] = pkg
    import xorbit.model as model
    from xorbit.model import mc

    return model, mc


DEV = torch.device("cuda")


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, rounds: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(model_pkg, sizes, rounds: int) -> None:
    Reslim, ReslimConfig = model_pkg.Reslim, model_pkg.ReslimConfig
    dev = DEV
    print("\n| window | model | tokens | precision | forward s | speed-up | partition s |")
    print("|---|---|--:|---|--:|--:|--:|")
    for ny, nx in sizes:
        cfg = ReslimConfig.preset("9.5m", img_size=(ny, nx))
        uniform = Reslim(cfg).to(dev).eval()
        n = uniform.num_tokens((ny, nx))
        models = {"uniform": uniform}
        for frac in (2, 4):
            m = Reslim(cfg.replace(tokens="adaptive", max_tokens=n // frac)).to(dev).eval()
            m.load_state_dict(uniform.state_dict(), strict=False)
            models[f"adaptive L/{frac}"] = m
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(1, len(cfg.in_vars), ny, nx, device=dev, generator=gen)
        # a smooth field with one sharp front in the output channels: edges to find
        yy = torch.linspace(-1, 1, ny, device=dev)[:, None]
        xx = torch.linspace(-1, 1, nx, device=dev)[None, :]
        front = torch.tanh((xx - 0.3 * yy) * 40) + 0.2 * torch.sin(3 * yy)
        for i, v in enumerate(cfg.in_vars):
            if v in cfg.out_vars:
                x[0, i] = front
        for precision in ("fp32", "bf16"):
            amp = (
                torch.autocast(dev.type, dtype=torch.bfloat16)
                if precision == "bf16"
                else torch.autocast(dev.type, enabled=False)
            )
            base = None
            for label, m in models.items():
                with torch.inference_mode(), amp:
                    t = timed(lambda m=m, x=x: m(x), rounds)
                    part = ""
                    if label != "uniform":
                        pt = timed(
                            lambda m=m, x=x, v=cfg.in_vars: m.partition(m._pad(x), v), rounds
                        )
                        part = f"{pt:.4f}"
                base = base or t
                print(
                    f"| {ny} x {nx} | {label} | {m.num_tokens((ny, nx))} | {precision} | "
                    f"{t:.4f} | {base / t:.2f} | {part} |"
                )
        del models, uniform
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def adaptive_backward(model_pkg) -> None:
    Reslim, ReslimConfig = model_pkg.Reslim, model_pkg.ReslimConfig
    cfg = ReslimConfig.preset(
        "tiny",
        in_vars=["tas"],
        out_vars=["tas"],
        img_size=(32, 64),
        tokens="adaptive",
        max_tokens=128,
        interp_skip="none",
    )
    model = Reslim(cfg).to(DEV).train()
    x = torch.randn(4, 1, 32, 64, device=DEV)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        loss = model(x).float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    finite = all(g is not None and torch.isfinite(g).all() for g in grads.values())
    nonzero = sum(int(g is not None and bool(g.abs().sum() > 0)) for g in grads.values())
    print(
        f"\nadaptive backward on CUDA (bf16 autocast): loss {float(loss.detach()):.4f}, "
        f"gradients finite: {finite}, non-zero for {nonzero}/{len(grads)} parameters, "
        f"leaf_embed grad {float(model.leaf_embed.grad.abs().sum()):.3e}"
    )
    assert finite and float(model.leaf_embed.grad.abs().sum()) > 0


def mc_dropout_cuda(model_pkg, mc) -> None:
    Reslim, ReslimConfig = model_pkg.Reslim, model_pkg.ReslimConfig
    cfg = ReslimConfig.preset(
        "tiny", in_vars=["tas"], out_vars=["tas"], img_size=(8, 8), drop_rate=0.1, drop_path=0.1
    )
    model = Reslim(cfg).to(DEV).eval()
    with torch.no_grad():
        for last in (model.conv_out, model.path2[-1]):
            last.weight.normal_()
    x = torch.randn(3, 1, 8, 8, device=DEV)
    with torch.no_grad():
        plain = model(x)
        with mc.mc_dropout(model, [11, 12, 13]):
            a = model(x)
        with mc.mc_dropout(model, [11, 12, 13]):
            b = model(x)
        with mc.mc_dropout(model, [12]):
            alone = model(x[1:2])
        after = model(x)
        res = model(x, res_km=torch.tensor([50.0, 100.0, 400.0], device=DEV))
        res1 = model(x[2:3], res_km=400.0)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    print(
        "\nMC dropout on CUDA: members repeat exactly: "
        f"{torch.equal(a, b)}; differ from deterministic by {float((a - plain).abs().max()):.3e}; "
        f"sample 1 alone vs in a batch of 3: max diff {float((alone - a[1:2]).abs().max()):.2e}; "
        f"deterministic after sampling unchanged: {torch.equal(after, plain)}; hooks left: {hooks}; "
        f"per-sample res_km vs alone: max diff {float((res[2:3] - res1).abs().max()):.2e}"
    )
    assert torch.equal(a, b) and torch.equal(after, plain) and hooks == 0
    assert float((alone - a[1:2]).abs().max()) < 1e-4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default="128x256,256x512")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script")
    args = ap.parse_args()
    global DEV
    DEV = torch.device(args.device)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    model_pkg, mc = _model_package()
    name = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    mc_dropout_cuda(model_pkg, mc)
    adaptive_backward(model_pkg)
    speed(model_pkg, sizes, args.rounds)


if __name__ == "__main__":
    main()
