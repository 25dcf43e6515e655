"""The ``xorbit`` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from . import Downscaler, ReslimConfig
    from .datasets import hadcm3_air_temperature

    fine = hadcm3_air_temperature()
    coarse = fine.coarsen(latitude=4, longitude=4).mean()
    train = coarse.sel(time=coarse.time.dt.year <= 2040)
    cfg = ReslimConfig.preset(
        "tiny", factor=4, in_vars=["tas"], out_vars=["tas"], img_size=coarse.shape[-2:]
    )
    dsr = Downscaler.from_config(
        cfg, mean={"tas": float(train.mean())}, std={"tas": float(train.std())}
    )
    x = torch.from_numpy(dsr.normalize(coarse.values[:, None], ["tas"]))
    with torch.no_grad():
        y = dsr.model(x, ["tas"]).numpy()
    out = dsr.denormalize(y, ["tas"])[:, 0]
    print(f"HadCM3 A1B air temperature: fine {fine.shape} -> coarse {coarse.shape}")
    print(f"{dsr!r}")
    print(f"untrained Reslim output {out.shape}, finite: {bool(np.isfinite(out).all())}")
    print("(training and skill scores arrive with the training issue)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xorbit", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="downscale bundled HadCM3 data end to end")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        if args.debug:
            raise
        print(f"xorbit {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
