"""Finding a model's variables in xarray objects: by name, by CF standard_name, from coordinates.

xarray only: nothing here knows of torch.  `gather` is the one lookup that both
``.orbit.downscale`` and `xorbit.train` use, so a variable that downscales also
trains and the other way round, with the same error when it is missing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

__all__ = [
    "COORDINATE_FIELDS",
    "as_dataset",
    "coordinate_fields",
    "find_variable",
    "gather",
    "select",
    "var_names",
]

# Static inputs a model may ask for by these names; they are made from the grid's
# coordinates when the data do not hold them.  They let a model learn where it is.
COORDINATE_FIELDS = ("coord_latitude", "coord_sinlon", "coord_coslon")


def coordinate_fields(
    obj: xr.DataArray | xr.Dataset, names: Sequence[str], ydim: str, xdim: str
) -> dict[str, xr.DataArray]:
    """The `COORDINATE_FIELDS` in ``names`` as ``(ydim, xdim)`` arrays on ``obj``'s grid."""
    lat, lon = xr.broadcast(obj[ydim].astype(np.float64), obj[xdim].astype(np.float64))
    rad = np.deg2rad(lon)
    made = {"coord_latitude": lat, "coord_sinlon": np.sin(rad), "coord_coslon": np.cos(rad)}
    return {
        name: made[name]
        .transpose(ydim, xdim)
        .astype(np.float32)
        .rename(name)
        .drop_vars([ydim, xdim])
        .assign_coords({ydim: obj[ydim], xdim: obj[xdim]})
        for name in names
        if name in made
    }


def var_names(obj: xr.DataArray | xr.Dataset) -> list[str]:
    """Data-variable names of a Dataset, or the one name of a DataArray (``"var"`` if none)."""
    if isinstance(obj, xr.DataArray):
        return [str(obj.name or "var")]
    return [str(v) for v in obj.data_vars]


def as_dataset(
    obj: xr.DataArray | xr.Dataset,
    names: Sequence[str],
    candidates: Sequence[str] | None = None,
) -> xr.Dataset:
    """A DataArray as a one-variable Dataset named after the model variable it is.

    Its own name if that is one of ``names``, else its ``standard_name`` if that
    is.  Otherwise (an unnamed array, or a name the model does not know) it is
    taken as the model variable only when there is exactly one candidate:
    ``candidates`` (default ``names``) less the coordinate fields, which are
    never guessed.  A Dataset is returned as it is.

    Raises
    ------
    KeyError
        If the array matches no variable and the guess would be ambiguous.
    """
    if isinstance(obj, xr.Dataset):
        return obj
    name = obj.name
    if name not in names:
        sn = obj.attrs.get("standard_name")
        if sn in names:
            name = sn
        else:
            pool = [v for v in (candidates or names) if v not in COORDINATE_FIELDS]
            if len(pool) != 1:
                raise KeyError(
                    f"cannot tell which model variable the DataArray named {obj.name!r} "
                    f"(standard_name {sn!r}) is: the model reads {list(names)}; "
                    "name it (da.rename('...')) or pass a Dataset"
                )
            name = pool[0]
    return obj.to_dataset(name=name)


def find_variable(ds: xr.Dataset, name: str) -> xr.DataArray | None:
    """``ds[name]``, else the one variable whose ``standard_name`` is ``name``, else None."""
    if name in ds.data_vars:
        return ds[name]
    hits = [v for v in ds.data_vars if ds[v].attrs.get("standard_name") == name]
    return ds[hits[0]] if len(hits) == 1 else None


def gather(
    sources: Sequence[xr.Dataset | None],
    names: Sequence[str],
    *,
    ydim: str,
    xdim: str,
    role: str = "input",
    where: str = "the data",
) -> dict[str, xr.DataArray]:
    """Model variable name → data variable, looked up in ``sources`` in order.

    By name, then by CF ``standard_name``; names in `COORDINATE_FIELDS` that no
    source holds are made from the first source's coordinates.

    Raises
    ------
    KeyError
        Naming every missing variable and listing what the sources hold.
    """
    srcs = [s for s in sources if s is not None]
    found: dict[str, xr.DataArray] = {}
    for name in names:
        for src in srcs:
            var = find_variable(src, name)
            if var is not None:
                found[name] = var
                break
    coords = [v for v in names if v not in found and v in COORDINATE_FIELDS]
    if coords:
        found.update(coordinate_fields(srcs[0], coords, ydim, xdim))
    missing = [v for v in names if v not in found]
    if missing:
        avail = [str(v) for s in srcs for v in s.data_vars]
        what = (
            f"{role} variable {missing[0]!r} is"
            if len(missing) == 1
            else f"{role} variables {', '.join(map(repr, missing))} are"
        )
        raise KeyError(
            f"{what} not in {where}, by name or by standard_name (it holds {sorted(avail)}; "
            f"coordinate fields {list(COORDINATE_FIELDS)} are made from the grid); rename "
            "them, or pass static fields as static=..."
        )
    return {name: found[name] for name in names}


def select(ds: xr.Dataset, names: Sequence[str] | None, where: str = "the data") -> xr.Dataset:
    """The data variables ``names`` of ``ds`` (all when empty), by exact name.

    Raises
    ------
    KeyError
        Naming the missing variables and listing what ``ds`` holds.
    """
    if not names:
        return ds
    missing = [v for v in names if v not in ds.data_vars]
    if missing:
        raise KeyError(f"variables {missing} not in {where} (has {sorted(map(str, ds.data_vars))})")
    return xr.Dataset({v: ds[v] for v in names}, attrs=ds.attrs)
