"""The ``xorbit`` command line: demo, train, downscale, evaluate, info.

Errors are printed as one line and exit with status 1 (``--debug`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]

# `xorbit.engine.PRECISIONS`, written out so that parsing does not import torch
# (a test keeps the two equal)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_SPLIT_YEAR, format_table, run_demo

    print(
        "xorbit demo: HadCM3 SRES A1B annual air temperature (iris-sample-data), "
        "36x48 cells cell-averaged x4 to 9x12;\n"
        f"training on 1860-{DEMO_SPLIT_YEAR} with the default recipe, "
        f"scoring on {DEMO_SPLIT_YEAR + 1}-2099 (held out)."
    )
    result = run_demo(args.out, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    print(f"trained {result['downscaler']!r} in {result['train_seconds']:.0f} s")
    print()
    print(format_table(result["table"]))
    print()
    print(f"wrote {result['netcdf']}")
    print(f"wrote {result['png']}")
    print(f"wrote {result['report_png']}")
    return 0


def _open(path: str, chunks: dict | None = None):
    from .io import open_dataset

    return open_dataset(path, chunks)


def _parse_chunks(text: str | None) -> dict:
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not size:
            raise ValueError(f"--chunks expects dim=size[,dim=size], got {text!r}")
        out[name.strip()] = int(size)
    return out


def _keepbits(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--keepbits expects a number of bits or 'auto', got {text!r}"
        ) from None


def _pair(text: str | None):
    if text is None:
        return None
    parts = [int(v) for v in text.split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _assignments(flag: str):
    """A parser for repeatable ``NAME=VALUE`` options (``--transform pr=log1p``)."""

    def parse(text: str) -> tuple[str, str]:
        name, _, value = text.partition("=")
        if not name.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"{flag} expects NAME=VALUE, got {text!r}")
        return name.strip(), value.strip()

    return parse


def _mapping(pairs: list[tuple[str, str]] | None) -> dict[str, str] | None:
    return dict(pairs) if pairs else None


def _static(path: str | None):
    """The static fields of ``--static FILE``: its 2-D variables."""
    from .io import open_static

    return None if path is None else open_static(path)


def _select(ds, names):
    from .variables import select

    return select(ds, names, where="the file")


def _freeze(text: str | None) -> str | list[str] | None:
    """``--freeze``: a group name, or comma-separated parameter-name patterns."""
    from .training.finetune import FREEZE_GROUPS

    if text is None or text in FREEZE_GROUPS:
        return text
    return [p.strip() for p in text.split(",") if p.strip()]


def _train(args: argparse.Namespace) -> int:
    from .training.from_file import train_from_file

    overrides = {
        k: v
        for k, v in (
            ("epochs", args.epochs),
            ("seed", args.seed),
            ("transforms", _mapping(args.transform)),
            ("device", args.device),
            ("init", args.init),
            ("freeze", _freeze(args.freeze)),
        )
        if v is not None
    }
    dsr, out = train_from_file(
        args.config,
        progress=not args.quiet,
        overrides=overrides,
        static=args.static,
        output=args.output,
    )
    last = dsr.history[-1] if dsr.history else {}
    scores = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith("rmse"))
    print(f"wrote {out} ({dsr!r}); last epoch: {scores or 'no validation'}")
    return 0


def _downscale(args: argparse.Namespace) -> int:
    import dask
    from dask.diagnostics import ProgressBar

    from . import load

    dsr = load(args.model)
    ds = _open(args.input, _parse_chunks(args.chunks))
    out = ds.orbit.downscale(
        dsr,
        tile=_pair(args.tile),
        halo=_pair(args.halo),
        batch_size=args.batch_size,
        device=args.device,
        static=_static(args.static),
        periodic=args.periodic,
        units=_mapping(args.units),
        precision=args.precision,
        samples=args.samples,
        seed=args.seed,
        constrain=args.constrain,
    )
    target = Path(args.output)
    bar = ProgressBar() if not args.quiet else None
    with bar or dask.config.set():
        if target.suffix == ".zarr":
            out.orbit.to_zarr(target, keepbits=args.keepbits)
        else:
            out.orbit.to_netcdf(target, keepbits=args.keepbits)
    print(f"wrote {target}: {dict(out.sizes)}")
    return 0


# the columns of the table that compares methods (all scores: --scores all)
COMPARE_SCORES = (
    "rmse",
    "bias",
    "anomaly_r2",
    "trend_bias",
    "p99_bias",
    "p01_bias",
    "ralsd",
    "crps",
)


def _evaluate(args: argparse.Namespace) -> int:
    from . import baseline, coarsen, grid
    from .baselines import METHODS, TRAINED, _infer_factor
    from .metrics import evaluate

    def on_pred_grid(other, label):
        return grid.match_grid(other, pred, label=label, ref_label="prediction")

    pred, truth = _open(args.pred), _open(args.truth)
    ydim, xdim = grid.spatial_dims(pred)
    names = args.var or [v for v in pred.data_vars if {ydim, xdim} <= set(pred[v].dims)]
    pred = _select(pred, names)
    truth = on_pred_grid(_select(truth, names), "truth")
    methods = [b for b in args.baseline or [] if b in METHODS]
    files = [b for b in args.baseline or [] if b not in METHODS]
    if len(files) > 1:
        raise ValueError(f"--baseline takes one baseline file (got {files}) and any methods")
    base = on_pred_grid(_select(_open(files[0]), names), "baseline") if files else None
    if not methods:
        scores = evaluate(pred, truth, baseline=base).compute()
        # a column at least one wider than its name: "rmse_baseline" would run into its neighbour
        cols = {str(k): max(12, len(str(k)) + 1) for k in scores.data_vars}
        print("variable".ljust(18) + "".join(f"{c:>{w}}" for c, w in cols.items()))
        for v in scores.variable.values:
            row = scores.sel(variable=v)
            print(str(v).ljust(18) + "".join(f"{float(row[c]):>{w}.4g}" for c, w in cols.items()))
        return 0
    trained = [m for m in methods if m in TRAINED]
    if trained and not args.train:
        raise ValueError(
            f"baselines {trained} are learnt from data: pass --train COARSE FINE (the "
            "training period at both resolutions)"
        )
    pair = None
    factor = args.factor
    if args.train:
        pair = tuple(_select(_open(f), names) for f in args.train)
        factor = _infer_factor(pair[0], pair[1], None)
    # the coarse input of the scored period: given, or the truth cell-averaged
    coarse = _select(_open(args.coarse), names) if args.coarse else coarsen(truth, factor)
    predictions = {"prediction": pred}
    for m in methods:
        made = baseline(coarse, m, train=pair, factor=factor)
        predictions[m] = on_pred_grid(made, f"{m} baseline")
    scores = evaluate(predictions, truth, baseline=base).compute()
    # score names are strings (`evaluate`)
    wanted = [str(c) for c in scores.data_vars] if args.scores == "all" else args.scores.split(",")
    unknown = [c for c in wanted if c not in scores.data_vars and c not in COMPARE_SCORES]
    if unknown:
        raise ValueError(
            f"--scores: unknown scores {unknown}; known: {sorted(map(str, scores.data_vars))}"
        )
    cols = {c: max(12, len(c) + 2) for c in wanted if c in scores.data_vars}
    print("variable".ljust(18) + "method".ljust(14) + "".join(f"{c:>{w}}" for c, w in cols.items()))
    for v in scores.variable.values:
        for m in scores.method.values:
            row = scores.sel({"variable": v, "method": m})
            print(
                str(v).ljust(18)
                + str(m).ljust(14)
                + "".join(f"{float(row[c]):>{w}.4g}" for c, w in cols.items())
            )
    return 0


def _info(args: argparse.Namespace) -> int:
    from .model.checkpoint import read_metadata

    meta = read_metadata(args.model)
    from . import load

    dsr = load(args.model)
    c = dsr.config
    print(
        f"{args.model}: xorbit checkpoint (format {meta['format_version']}, "
        f"written by xorbit {meta['xorbit_version']})"
    )
    print(
        f"  model      Reslim x{c.factor}, {dsr.model.num_params():,} parameters, "
        f"embed_dim {c.embed_dim}, depth {c.depth}, heads {c.num_heads}, "
        f"patch {c.patch_size}, training grid {tuple(c.img_size)}"
    )
    inputs = ", ".join(f"{v} [{dsr.units.get(v) or '?'}]" for v in c.in_vars)
    print(f"  inputs     {inputs}")
    print(f"  outputs    {', '.join(c.out_vars)}")
    print(f"  weights    sha256 {meta['weights_sha256']}")
    g = dsr.grid
    if g:
        order = lambda asc: "ascending" if asc else "descending"  # noqa: E731
        print(
            f"  grid       coarse spacing {g.get('dy')} x {g.get('dx')}, latitude "
            f"{order(g.get('y_ascending', True))}, longitude {order(g.get('x_ascending', True))}"
            + (", several resolutions" if g.get("multi_resolution") else "")
        )
    else:
        print("  grid       not recorded (saved by xorbit < 0.2): inputs used as given")
    if dsr.output_climatology:
        field = next(iter(dsr.output_climatology.values()))
        span = ", ".join(
            f"{d} {float(field[d].min()):.4g}..{float(field[d].max()):.4g}" for d in field.dims
        )
        print(
            f"  anomalies  from stored climatologies of {sorted(dsr.output_climatology)}: "
            f"downscales inside {span} only"
        )
    if c.linear_window is not None:
        ny, nx = c.linear_window
        cells = "every cell" if c.linear_half is None else f"{2 * c.linear_half + 1}² cells"
        gate = float(dsr.model.gate)
        print(
            f"  linear     ridge path over {ny} x {nx} windows ({cells} each); the network's "
            f"correction {'kept' if gate else 'off'} (gate {gate:g})"
        )
    if c.noise_channels:
        print(
            f"  ensemble   stochastic model, {c.noise_channels} noise channels: "
            f"members (--samples) drawn {c.noise_members}"
        )
    if dsr.constraints:
        kinds = ", ".join(f"{v} {k}" for v, k in sorted(dsr.constraints.items()))
        print(f"  totals     coarse-consistency constraints: {kinds}")
    if dsr.static:
        kinds = ", ".join(f"{n} ({dsr.static_packing[n]} grid)" for n in sorted(dsr.static))
        print(f"  static     stored: {kinds}")
    prov = dsr.provenance
    if prov:
        frozen = prov.get("frozen", [])
        print(
            f"  pretrained fine-tuned from {prov.get('init')} (weights sha256 "
            f"{prov.get('init_weights_sha256')}, inputs {', '.join(prov.get('init_in_vars', []))}"
            f"): {len(prov.get('pretrained', []))} tensors copied whole, "
            f"{len(prov.get('partial', []))} in part, {len(prov.get('new', []))} new; "
            + (
                f"frozen {prov.get('freeze')!r} ({len(frozen)} tensors)"
                if frozen
                else "none frozen"
            )
            + f", pretrained lr x{prov.get('pretrained_lr_scale', 1.0):g}"
        )
    if dsr.history:
        last = dsr.history[-1]
        print("  trained    " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
        best = int(last.get("best_epoch", 0))
        if best:  # the weights in the file are this epoch's (keep_best)
            rec = next(h for h in dsr.history if int(h["epoch"]) == best)
            scores = ", ".join(f"{k} {v:.4g}" for k, v in rec.items() if k.startswith("rmse"))
            print(f"  best epoch {best} of {int(last['epoch'])} (the weights saved): {scores}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xorbit", description="ORBIT-2 climate downscaling for xarray data."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "demo", help="train on bundled HadCM3 data, downscale held-out years, print skill"
    )
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML: fine, [coarse], variables, model, train, static, output")
    p.add_argument("--epochs", type=int, help="training epochs (default: the config's, else 10)")
    p.add_argument("--seed", type=int, help="random seed (default: the config's, else 0)")
    p.add_argument(
        "--transform",
        action="append",
        type=_assignments("--transform"),
        metavar="VAR=KIND",
        help="train VAR transformed, e.g. pr=log1p (repeatable; added to the config's)",
    )
    p.add_argument(
        "--static",
        metavar="FILE",
        help="netCDF/zarr of static fields (orography ...) on the coarse or fine grid",
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda if visible)")
    p.add_argument("--output", help="the model file to write (default: the config's output)")
    p.add_argument("--init", help="fine-tune this pretrained .xorbit model (default: the config's)")
    p.add_argument(
        "--freeze",
        help="with --init: 'encoder', 'blocks' or comma-separated parameter-name patterns",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)

    p = sub.add_parser("downscale", help="downscale a netCDF/zarr file with a trained model")
    p.add_argument("input", help="coarse netCDF file or zarr store")
    p.add_argument("output", help="output path: .nc for netCDF, .zarr for zarr")
    p.add_argument("--model", required=True, help="a .xorbit model file")
    p.add_argument("--chunks", help="Dask chunks, e.g. time=10")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if visible)")
    p.add_argument(
        "--keepbits",
        type=_keepbits,
        default=None,
        help="lossy: keep this many mantissa bits, or 'auto' (99%% of the real information)",
    )
    p.add_argument("--tile", help="tile core size: n or ny,nx (default: from the model)")
    p.add_argument("--halo", help="tile halo: n or ny,nx (default: from the model)")
    p.add_argument("--batch-size", type=int, default=16, help="tiles per model call (default 16)")
    p.add_argument(
        "--static",
        metavar="FILE",
        help="netCDF/zarr of static fields the model reads, replacing the stored ones",
    )
    p.add_argument(
        "--periodic",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether longitude wraps around (default: detected from the grid)",
    )
    p.add_argument(
        "--units",
        action="append",
        type=_assignments("--units"),
        metavar="VAR=UNITS",
        help="units of an input whose units attribute is missing or wrong (repeatable)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (default auto)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="N ensemble members along a new 'sample' dimension (a stochastic model's, else MC dropout)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the ensemble members (default 0)")
    p.add_argument(
        "--constrain",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="coarse consistency: --constrain for every output, --no-constrain for none "
        "(default: the model's; multiplicative for precipitation, additive otherwise)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_downscale)

    p = sub.add_parser("evaluate", help="score a prediction file against a truth file")
    p.add_argument("pred", help="predicted netCDF/zarr")
    p.add_argument("truth", help="truth netCDF/zarr on the same grid")
    p.add_argument(
        "--baseline",
        action="append",
        help="a baseline method to compare with (nearest, bilinear, bicubic, conservative, "
        "climatology, ridge, qdm; repeatable), or one baseline file for skill scores",
    )
    p.add_argument(
        "--train",
        nargs=2,
        metavar=("COARSE", "FINE"),
        help="training period at both resolutions, for the climatology, ridge and qdm baselines",
    )
    p.add_argument(
        "--coarse",
        help="coarse input of the scored period (default: the truth cell-averaged by the factor)",
    )
    p.add_argument(
        "--factor", type=int, default=4, help="refinement factor without --train (default 4)"
    )
    p.add_argument(
        "--scores",
        default=",".join(COMPARE_SCORES),
        help="comma-separated scores of the method table, or 'all'",
    )
    p.add_argument("--var", action="append", help="variable to score (repeatable)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("info", help="describe a .xorbit model file")
    p.add_argument("model", help="a .xorbit model file")
    p.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        if args.debug:
            raise
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        line = " ".join(text.split()) or type(err).__name__
        print(f"xorbit {args.command}: error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
