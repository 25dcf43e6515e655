"""CF-compliant netCDF and zarr output, written atomically.

`prepare` turns a downscaled object into a Dataset that CF checkers accept:
``Conventions``, ``title``, ``history``, ``source``; latitude / longitude with
``standard_name``, ``units``, ``axis`` and ``bounds``; no ``_FillValue`` on
coordinates; attribute names that netCDF allows.  `to_netcdf` writes it through
a temporary file in the same directory and renames it into place, so a crash
never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Hashable
from io import StringIO
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from numcodecs import BitRound

from . import grid
from ._files import atomic_write
from ._version import __version__

__all__ = [
    "CONVENTIONS",
    "bitround",
    "open_dataset",
    "open_static",
    "prepare",
    "to_netcdf",
    "to_zarr",
]

CONVENTIONS = "CF-1.10"
_VALID_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
#: `to_zarr`'s default ``regions_per_compute``: at most this many regions go into
#: one `dask.compute` call, so a long output (10 000 time steps) never becomes
#: one giant graph.
REGIONS_PER_COMPUTE = 256


def open_dataset(path: str | os.PathLike, chunks: dict | None = None) -> xr.Dataset:
    """Open a netCDF file or a zarr store lazily, with cftime dates (any calendar).

    Raises
    ------
    FileNotFoundError
        If nothing is at ``path``.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    kw: dict[str, Any] = dict(
        decode_times=xr.coders.CFDatetimeCoder(use_cftime=True), chunks=chunks or {}
    )
    if p.is_dir() or p.suffix == ".zarr":
        return xr.open_zarr(p, consolidated=False, **kw)
    return xr.open_dataset(p, **kw)


def open_static(path: str | os.PathLike) -> xr.Dataset:
    """The static fields of a file, loaded: its variables on both spatial dims only.

    Bounds, grid-mapping scalars and anything with a third dimension are left
    out, so a file xorbit wrote (with ``lat_bnds``) serves as ``static=``.

    Raises
    ------
    FileNotFoundError
        If nothing is at ``path``.
    ValueError
        If the file holds no 2-D field.
    """
    ds = open_dataset(path)
    ydim, xdim = grid.spatial_dims(ds)
    names = [n for n, v in ds.data_vars.items() if set(v.dims) == {ydim, xdim}]
    if not names:
        raise ValueError(
            f"{path}: no static field (a variable on exactly ({ydim!r}, {xdim!r})) among "
            f"{sorted(map(str, ds.data_vars))}"
        )
    return ds[names].load()


def _clean_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attribute names netCDF / CF accept: invalid characters become ``_``."""
    out = {}
    for key, value in attrs.items():
        name = key if _VALID_NAME.match(key) else re.sub(r"[^A-Za-z0-9_]", "_", key)
        if not name[:1].isalpha():
            name = "attr_" + name
        if value is None:
            continue
        out[name] = value
    return out


def bitround(a: np.ndarray, keepbits: int) -> np.ndarray:
    """Round float32 mantissas to ``keepbits`` bits (round to nearest, ties to even).

    The rounding is numcodecs' `BitRound` codec (the one zarr stores use).  The
    relative error is at most ``2 ** -(keepbits + 1)``; the zeroed trailing
    bits compress well.  NaN and infinities are kept as they are.

    Raises
    ------
    ValueError
        If ``keepbits`` is not between 0 and 23.
    """
    if not 0 <= keepbits <= 23:
        raise ValueError(f"keepbits must be between 0 and 23 for float32, got {keepbits}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if keepbits == 23:
        return a
    rounded = BitRound(int(keepbits)).encode(a).view(np.float32).reshape(a.shape)
    # BitRound rounds the payload bits of a NaN as if they were a mantissa: a NaN
    # can come out as an infinity, -0.0 or even +0.0 (0xFFFFFFFF wraps to zero),
    # so the non-finite values are put back untouched
    return np.where(np.isfinite(a), rounded, a)


def _information_keepbits(var: xr.DataArray, ydim: str, xdim: str) -> int:
    """Mantissa bits that keep 99 % of the real information of ``var`` (xbitinfo).

    The information is measured along latitude and longitude (the larger of the
    two counts is kept; a variable without them along its own dimensions) on
    float32 values, as they will be written; Dask data
    are measured on a sample: the first chunk of every other dimension (e.g. of
    time), computed once more here.
    """
    try:
        import xbitinfo
    except ImportError as err:
        raise ImportError(
            f"keepbits='auto' (variable {var.name!r}) needs xbitinfo: pip install 'xorbit[bitinfo]'"
        ) from err
    dims: list[Hashable] = [d for d in (ydim, xdim) if d in var.dims] or list(var.dims)
    if not dims:
        return 23  # a scalar: nothing to measure, nothing to gain
    sample = var
    if isinstance(var.data, da.Array):
        sample = var.isel(
            {
                d: slice(0, c[0])
                for d, c in zip(var.dims, var.data.chunks, strict=True)
                if d not in dims
            }
        )
    sample = sample.astype(np.float32).compute()
    ds = sample.to_dataset(name="v")
    # xbitinfo draws a tqdm progress bar on stderr for every call
    with contextlib.redirect_stderr(StringIO()):
        info = xbitinfo.get_bitinformation(ds, dim=dims, implementation="python")
    if not float(info["v"].sum()) > 0:
        # a constant (or all-NaN) field carries no information and xbitinfo's
        # answer is meaningless (negative); it costs nothing to keep it exact
        return 23
    keep = xbitinfo.get_keepbits(info, inflevel=0.99)["v"]
    return int(np.clip(int(keep.max()), 0, 23))


def _resolve_keepbits(ds: xr.Dataset, keepbits: int | str | None) -> dict[str, int]:
    """Mantissa bits per floating-point data variable of ``ds`` ({} if lossless).

    ``keepbits`` is ``None`` (lossless), an int in 0..23 for every variable, or
    ``"auto"``: per variable, the bits that keep 99 % of its real information
    (`_information_keepbits`, needs the ``bitinfo`` extra).

    Raises
    ------
    ValueError
        If ``keepbits`` is none of these.
    ImportError
        For ``"auto"`` without xbitinfo installed.
    """
    if keepbits is None:
        return {}
    # bounds are data variables in CF but geometry, not data: rounding them to a
    # few bits would move the cell edges
    aux = _auxiliary(ds)
    floats = [
        n for n, v in ds.data_vars.items() if n not in aux and np.issubdtype(v.dtype, np.floating)
    ]
    if isinstance(keepbits, str):
        if keepbits != "auto":
            raise ValueError(f"keepbits must be an int in 0..23, 'auto' or None, got {keepbits!r}")
        ydim, xdim = grid.spatial_dims(ds)
        return {str(n): _information_keepbits(ds[n], ydim, xdim) for n in floats}
    if isinstance(keepbits, bool) or not 0 <= keepbits <= 23:
        raise ValueError(f"keepbits must be between 0 and 23 for float32, got {keepbits!r}")
    return {str(n): int(keepbits) for n in floats}


def _round(ds: xr.Dataset, bits: dict[str, int], *, auto: bool) -> xr.Dataset:
    """``ds`` with each named variable bit-rounded (as float32) and the rounding recorded."""
    for name, keep in bits.items():
        var = ds[name]
        data = var.data
        if isinstance(data, da.Array):
            data = data.astype(np.float32).map_blocks(bitround, keep, dtype=np.float32)
        else:
            data = bitround(np.asarray(data), keep)
        ds[name] = var.copy(data=data)
        note = f"mantissa rounded to {keep} bits (relative error <= 2**-{keep + 1})"
        if auto:
            note += ", chosen by xbitinfo to keep 99% of the real information"
        old = var.attrs.get("comment")
        ds[name].attrs["xorbit_keepbits"] = keep
        # the variable's own comment is kept in front, not overwritten
        ds[name].attrs["comment"] = f"{old}; {note}" if old else note
    return ds


def _complete_grid_mappings(ds: xr.Dataset, ydim: str, xdim: str) -> xr.Dataset:
    """Give every ``grid_mapping`` attribute the variable it names (CF requires it).

    A DataArray taken out of a Dataset keeps its ``grid_mapping`` attribute but
    not the variable the attribute names.  On a latitude-longitude grid that
    variable can be written from nothing but its ``grid_mapping_name`` (the
    figure of the Earth is not known, so it is left out); on any other grid it
    cannot, and the dangling attribute is dropped with a warning.
    """
    latlon = (
        ds[ydim].attrs.get("standard_name") == "latitude"
        and ds[xdim].attrs.get("standard_name") == "longitude"
    )
    created: dict[str, xr.DataArray] = {}
    for name, var in ds.data_vars.items():
        mapping = var.attrs.get("grid_mapping")
        if not isinstance(mapping, str):
            continue
        # the extended form "crs: lat lon crs2: x y" names several variables
        names = re.findall(r"([A-Za-z][A-Za-z0-9_]*):", mapping) or [mapping.strip()]
        missing = [n for n in names if n not in ds.variables and n not in created]
        if not missing:
            continue
        if latlon and len(names) == 1 and _VALID_NAME.match(names[0]):
            created[names[0]] = xr.DataArray(
                np.int32(0), attrs={"grid_mapping_name": "latitude_longitude"}
            )
            continue
        warnings.warn(
            f"variable {name!r} names grid_mapping {mapping!r}, which the dataset does not "
            f"hold, on a grid that is not plain latitude-longitude ({ydim!r}, {xdim!r}): "
            "dropping the attribute rather than writing a dangling reference",
            UserWarning,
            stacklevel=3,
        )
        ds[name].attrs.pop("grid_mapping")
    return ds.assign(created) if created else ds


def prepare(
    obj: xr.DataArray | xr.Dataset,
    *,
    title: str | None = None,
    source: str | None = None,
    references: str | None = None,
    keepbits: int | str | None = None,
) -> xr.Dataset:
    """A CF-ready copy of ``obj`` (lazy data stay lazy).

    ``keepbits`` (``None``, an int in 0..23 or ``"auto"``) bit-rounds the float
    data variables as `to_netcdf` describes.
    """
    ds = obj.to_dataset(name=obj.name or "data") if isinstance(obj, xr.DataArray) else obj.copy()
    ydim, xdim = grid.spatial_dims(ds)
    for dim, (sn, units, axis) in (
        (ydim, ("latitude", "degrees_north", "Y")),
        (xdim, ("longitude", "degrees_east", "X")),
    ):
        coord = ds[dim]
        attrs = _clean_attrs({k: v for k, v in coord.attrs.items() if k != "_FillValue"})
        attrs.setdefault("standard_name", sn)
        attrs.setdefault("units", units)
        attrs.setdefault("axis", axis)
        bname = attrs.get("bounds") or f"{dim}_bnds"
        if bname not in ds.variables:
            bounds = grid.cell_bounds(coord)
            ds = ds.assign_coords({bname: ((dim, "bnds"), bounds)})
        attrs["bounds"] = bname
        ds[dim].attrs = attrs
        ds[bname].attrs = {}
    # grid mappings and bounds are variables of their own in CF, not coordinates
    mappings = {v.attrs.get("grid_mapping") for v in ds.data_vars.values()} - {None}
    bound_names = {ds[d].attrs["bounds"] for d in (ydim, xdim)}
    ds = ds.reset_coords([n for n in ds.coords if n in mappings | bound_names])
    ds = _complete_grid_mappings(ds, ydim, xdim)
    for name in mappings & set(ds.variables):
        ds[name].attrs.setdefault("long_name", "coordinate reference system")
    for name in list(ds.variables):
        ds[name].attrs = _clean_attrs(dict(ds[name].attrs))
        ds[name].encoding.pop("_FillValue", None)
    ds = _round(ds, _resolve_keepbits(ds, keepbits), auto=keepbits == "auto")
    attrs = _clean_attrs(dict(ds.attrs))
    attrs["Conventions"] = CONVENTIONS
    attrs["title"] = title or attrs.get("title") or "Downscaled fields (xorbit)"
    attrs["source"] = source or attrs.get("source") or f"xorbit {__version__} (ORBIT-2 Reslim)"
    if references or "references" not in attrs:
        attrs["references"] = references or "ORBIT-2, arXiv:2505.04802"
    history = [h for v in ds.data_vars.values() for h in [v.attrs.get("history")] if h]
    if "history" not in attrs:
        # CF asks for an audit trail: the data's own, else a line saying who wrote it
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        attrs["history"] = history[0] if history else f"{now}: written by xorbit {__version__}"
    ds.attrs = attrs
    return ds


def _auxiliary(ds: xr.Dataset) -> set:
    """Coordinates, bounds and grid mappings: never a _FillValue (CF forbids it)."""
    aux = set(ds.coords)
    for var in ds.variables.values():
        aux |= {var.attrs[a] for a in ("bounds", "grid_mapping") if a in var.attrs}
    return aux


def _encoding(ds: xr.Dataset, complevel: int) -> dict[Hashable, dict[str, Any]]:
    enc: dict[Hashable, dict[str, Any]] = {}
    aux = _auxiliary(ds)
    for name, var in ds.variables.items():
        if name in aux or var.ndim == 0:
            enc[name] = {"_FillValue": None}
            continue
        e: dict[str, Any] = {"zlib": True, "complevel": complevel, "shuffle": True}
        if isinstance(var.data, da.Array):
            e["chunksizes"] = tuple(max(c) for c in var.data.chunks)
        if np.issubdtype(var.dtype, np.floating):
            e["_FillValue"] = np.array(np.nan, dtype=var.dtype)
        enc[name] = e
    return enc


def to_netcdf(
    obj: xr.DataArray | xr.Dataset,
    path: str | os.PathLike,
    *,
    complevel: int = 4,
    keepbits: int | str | None = None,
    **cf: Any,
) -> Path:
    """Write a CF-compliant, compressed netCDF4 file atomically; returns its path.

    Parameters
    ----------
    complevel
        zlib level (lossless).
    keepbits
        If an int (0..23), round float mantissas to this many bits first, as
        float32 (lossy: relative error <= ``2 ** -(keepbits + 1)``).  ``"auto"``
        chooses, per variable, the bits that keep 99 % of its real information
        (xbitinfo's bit information along latitude and longitude; needs the
        ``bitinfo`` extra).  Dask data are measured on a sample, the first chunk
        along time (every non-spatial dimension), which is computed once more for
        it.  Either way the variable records ``xorbit_keepbits`` and a comment.
    **cf
        ``title``, ``source``, ``references`` for the global attributes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = prepare(obj, keepbits=keepbits, **cf)
    encoding = _encoding(ds, complevel)
    return atomic_write(
        path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=encoding)
    )


def _zarr_encoding(ds: xr.Dataset, level: int) -> dict[Hashable, dict[str, Any]]:
    import zarr.codecs

    enc: dict[Hashable, dict[str, Any]] = {}
    for name, var in ds.data_vars.items():
        # zstd behind a byte shuffle (as netCDF's zlib + shuffle): float bytes of
        # equal significance sit together and compress better
        itemsize = max(1, np.dtype(var.dtype).itemsize)
        codec = zarr.codecs.BloscCodec(
            cname="zstd", clevel=level, shuffle="shuffle", typesize=itemsize
        )
        e: dict[str, Any] = {"compressors": [codec]}
        if isinstance(var.data, da.Array):
            e["chunks"] = tuple(max(c) for c in var.data.chunks)
        enc[name] = e
    return enc


def _regions(ds: xr.Dataset) -> tuple[str | None, list[slice]]:
    """Chunk-aligned slices of the first dimension that is neither lat nor lon."""
    ydim, xdim = grid.spatial_dims(ds)
    for var in ds.data_vars.values():
        if not isinstance(var.data, da.Array):
            continue
        for dim, chunks in zip(var.dims, var.data.chunks, strict=True):
            if dim not in (ydim, xdim):
                edges = np.cumsum((0, *chunks))
                return str(dim), [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]
    return None, [slice(None)]


def _values_hash(var: xr.Variable) -> str:
    """sha256 of a (small, in-memory) variable's values; cftime objects by their text."""
    values = np.asarray(var.values)
    raw = str(values.tolist()).encode() if values.dtype == object else values.tobytes()
    return hashlib.sha256(raw).hexdigest()[:16]


def _signature_keepbits(bits: dict[str, int]) -> int | dict[str, int] | None:
    """The rounding as the resume signature records it: one number when every
    variable shares it (so ``"auto"`` that chose 7 matches ``keepbits=7``), else
    a number per variable; ``None`` when lossless."""
    if len(set(bits.values())) == 1:
        return next(iter(bits.values()))
    return dict(sorted(bits.items())) or None


def _resume_signature(
    ds: xr.Dataset, *, level: int, keepbits: int | dict[str, int] | None
) -> dict[str, Any]:
    """Everything that decides the bytes a region writes, to compare before resuming.

    Regions of an interrupted write are kept only if the new call would write
    the same bytes: same rounding and compression, same variables, dtypes,
    shapes and chunks, same coordinate values (hashed), and the same lazy
    computation: the Dask token of each lazy variable, which names its inputs
    and, for a downscaled field, the model's weights (another model means other
    values).  Attributes are left out: ``history`` carries a timestamp that
    differs on every call.
    """
    dim, regions = _regions(ds)
    encoding = _zarr_encoding(ds, level)
    variables = {}
    for name, var in ds.variables.items():
        entry: dict[str, Any] = {
            "dims": list(map(str, var.dims)),
            "shape": list(var.shape),
            "dtype": str(var.dtype),
            "units": str(var.attrs.get("units", var.encoding.get("units", ""))),
            "calendar": str(var.attrs.get("calendar", var.encoding.get("calendar", ""))),
        }
        if isinstance(var.data, da.Array):
            entry["chunks"] = [list(c) for c in var.data.chunks]
            entry["graph"] = dask.base.tokenize(var.data)
        else:
            entry["values"] = _values_hash(var)
        if name in encoding:
            entry["codecs"] = [c.to_dict() for c in encoding[name]["compressors"]]
        variables[str(name)] = entry
    return {
        "format": 2,
        "keepbits": keepbits,
        "level": level,
        "variables": variables,
        "region_dim": dim,
        "regions": [[r.start, r.stop] for r in regions],
    }


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out |= _flat(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def _signature_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["keepbits (4 -> None)", "variables.tas.dtype (float32 -> float64)", ...]``."""
    a, b = _flat(old), _flat(new)
    return [
        f"{k} ({a.get(k)} -> {b.get(k)})"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]


def _mark_done(written: None, marker: str) -> None:
    """Touch ``marker``.  The task takes its region's write (``written``) as its
    argument, so it runs only once that write has finished."""
    del written
    Path(marker).touch()


def _lazy_static(ds: xr.Dataset, dim: str | None) -> list[str]:
    """Dask-backed variables without the region dimension ``dim`` (a lazy static
    field; every Dask-backed variable when there is no region dimension)."""
    return [
        str(name)
        for name, var in ds.variables.items()
        if dim not in var.dims and var.chunks is not None  # Dask, never `.data`: no load
    ]


def _region_write(
    ds: xr.Dataset, partial: Path, dim: str | None, region: slice | None, marker: Path
) -> Any:
    """One region's lazy write, then the task that touches its marker (a Delayed).

    ``region=None`` writes the lazy variables without ``dim`` (the first,
    ``compute=False`` write of the store wrote only the in-memory ones).
    In-memory (numpy) variables are written when the write is built, the Dask
    ones when the Delayed is computed.
    """
    if dim is None or region is None:
        # what the first write (compute=False) left out, the lazy variables
        # without the region dimension; and all the data without one
        keep = {*_lazy_static(ds, dim), *(ds.data_vars if dim is None else ())}
        part = ds.drop_vars([v for v in ds.variables if v not in keep])
        write = part.to_zarr(partial, mode="r+", consolidated=False, compute=False)
    else:
        part = ds.isel({dim: region})
        part = part.drop_vars([v for v in part.variables if dim not in part[v].dims])
        write = part.to_zarr(partial, region={dim: region}, consolidated=False, compute=False)
    return dask.delayed(_mark_done, pure=False)(write, os.fspath(marker))


def to_zarr(
    obj: xr.DataArray | xr.Dataset,
    store: str | os.PathLike,
    *,
    level: int = 3,
    keepbits: int | str | None = None,
    resume: bool = True,
    regions_per_compute: int = REGIONS_PER_COMPUTE,
    **cf: Any,
) -> Path:
    """Write CF-ready, compressed zarr (v3: Blosc zstd + shuffle), atomically and resumably.

    The data are written region by region (one Dask chunk of the leading
    dimension, e.g. time) into ``<store>.partial``.  The regions are Dask tasks
    written concurrently, ``regions_per_compute`` of them per `dask.compute`
    call, by the active scheduler (a distributed ``Client`` if one is set, else
    threads); each region, once written, marks itself done with a file in
    ``<store>.partial-done`` (lazy variables without that dimension get a
    marker of their own).  A run that is interrupted can be called again with
    the same arguments: the marked regions are not recomputed, the others are.
    A call that would write other bytes (other rounding, compression, dtypes,
    chunks, variables or coordinates: `_resume_signature`) warns, naming what
    changed, and starts afresh, so one store never mixes two encodings.  When
    every region is marked done the folder is renamed to ``store``.  Markers
    are plain files at absolute paths: Dask workers must share this machine's
    file system (as they must to write the store).

    Parameters
    ----------
    level
        zstd level (lossless).
    keepbits
        Round float mantissas to this many bits first, or ``"auto"``: the bits
        that keep 99 % of the information (as in `to_netcdf`; Dask data are
        measured on their first chunk along time).  ``"auto"`` is resolved to
        numbers before the resume signature is compared, so calling again with
        ``"auto"`` resumes, and so does the explicit number it chose.
    resume
        Continue a ``<store>.partial`` left by an interrupted call (default);
        ``False`` starts afresh.
    regions_per_compute
        At most this many regions go into one `dask.compute` call (concurrent
        within it; the calls follow one another), bounding the graph's size.

    Raises
    ------
    FileExistsError
        If ``store`` already exists (remove it first; nothing is overwritten).
    ValueError
        If ``regions_per_compute`` is less than 1.
    """
    store = Path(store)
    if store.exists():
        raise FileExistsError(f"{str(store)!r} exists; remove it or choose another path")
    if regions_per_compute < 1:
        raise ValueError(f"regions_per_compute must be at least 1, not {regions_per_compute}")
    # absolute: the writes and markers may run in a worker with another cwd
    partial = store.resolve().with_name(store.name + ".partial")
    # the markers live beside the store, not in it: zarr warns about folders it
    # does not know on every write
    done_dir = store.resolve().with_name(store.name + ".partial-done")
    ds = prepare(obj, **cf)
    # "auto" becomes numbers here, before the signature: a second "auto" call
    # compares the bits it chose, not the word
    bits = _resolve_keepbits(ds, keepbits)
    ds = _round(ds, bits, auto=keepbits == "auto")
    dim, regions = _regions(ds)
    signature = _resume_signature(ds, level=level, keepbits=_signature_keepbits(bits))
    if partial.exists() and resume:
        try:
            previous = json.loads((done_dir / "signature.json").read_text())
        except (OSError, ValueError):
            previous = None
        changes = (
            ["no readable signature"]
            if previous is None
            else _signature_changes(previous, signature)
        )
        if changes:
            shown = "; ".join(changes[:6]) + ("; ..." if len(changes) > 6 else "")
            warnings.warn(
                f"{str(partial)!r} cannot be resumed ({shown}): starting afresh rather "
                "than mixing two encodings in one store",
                UserWarning,
                stacklevel=2,
            )
            shutil.rmtree(partial)
    elif partial.exists():
        shutil.rmtree(partial)
    if not partial.exists():
        shutil.rmtree(done_dir, ignore_errors=True)
        ds.to_zarr(
            partial,
            mode="w",
            compute=False,
            encoding=_zarr_encoding(ds, level),
            consolidated=False,
            zarr_format=3,
        )
        done_dir.mkdir()
        (done_dir / "signature.json").write_text(json.dumps(signature, sort_keys=True))
        # the markers of this store's writes, in a folder of their own: a task
        # still running from an abandoned store (a crashed run's worker) finds
        # its folder gone instead of marking a region of this one done
        (done_dir / f"run-{uuid.uuid4().hex[:16]}").mkdir()
    runs = sorted(done_dir.glob("run-*"))
    markers = runs[0] if runs else done_dir  # a store begun by xorbit 0.2: no run folder
    todo: list[tuple[slice | None, Path]] = [
        (region, markers / f"region-{i}") for i, region in enumerate(regions)
    ]
    if dim is not None and _lazy_static(ds, dim):
        todo.append((None, markers / "static"))
    todo = [(region, marker) for region, marker in todo if not marker.exists()]
    for first in range(0, len(todo), regions_per_compute):
        # built group by group: a region's write holds its slice of the graph
        group = todo[first : first + regions_per_compute]
        dask.compute(*[_region_write(ds, partial, dim, r, m) for r, m in group])
    missing = [m.name for _, m in todo if not m.exists()]
    if missing:  # a worker that wrote elsewhere (another machine's disk)
        raise RuntimeError(
            f"{str(partial)!r}: computed, yet not marked done: {', '.join(missing[:6])}"
        )
    os.replace(partial, store)
    shutil.rmtree(done_dir)
    return store
