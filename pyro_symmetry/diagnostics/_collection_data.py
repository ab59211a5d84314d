"""A checkpoint collection as ArviZ data backed by dask arrays, and statistics streamed over it.

:func:`to_inference_data` builds an ``xarray.DataTree`` whose posterior variables are dask
arrays: one chunk per (checkpoint, site), read on demand from the memory-mapped file. R-hat
and bulk ESS (:func:`rhat_ess`) are computed with the package's vectorized kernel
(:mod:`pyro_symmetry.diagnostics._rank`) one block of weights at a time, so memory holds
``chains x draws x block`` values, never the whole collection; posterior means and
variances (:func:`posterior_moments`) are dask reductions.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..collections import Collection
from ..collections._formats import CheckpointError
from .convergence import ConvergenceSummary
from .inference_data import site_dims

__all__ = ["chain_groups", "column_passes", "posterior_moments", "rhat_ess", "to_inference_data", "usable_indices"]

_DEFAULT_BYTES = 256 << 20


def usable_indices(collection: Collection) -> list[int]:
    """Indices of the checkpoints to use: all, or (``on_error="skip"``) those that validate."""
    if collection.on_error == "skip":
        collection.validate()
        bad = set(collection.errors)
        return [i for i, n in enumerate(collection.names) if n not in bad]
    return list(range(len(collection)))


def chain_groups(collection: Collection, chains: Any = None) -> list[list[int]]:
    """Checkpoint indices per chain, ``(chains, draws)``.

    Parameters
    ----------
    collection : Collection
    chains : None, int, sequence of sequences of int, or callable
        ``None``: one chain of every checkpoint; ``k``: ``k`` consecutive equal groups;
        explicit index lists; or ``name -> label`` (e.g. the run a checkpoint file belongs
        to), chains in order of first appearance. Every chain needs the same number of
        draws. With ``on_error="skip"`` bad checkpoints are found first (one read of every
        file) and left out.
    """
    use = usable_indices(collection)
    if chains is None:
        groups = [use]
    elif isinstance(chains, int) and not isinstance(chains, bool):
        if chains < 1 or len(use) % chains:
            raise ValueError(f"chains={chains} does not divide the {len(use)} usable checkpoints into equal chains")
        d = len(use) // chains
        groups = [use[c * d : (c + 1) * d] for c in range(chains)]
    elif callable(chains):
        by: dict[Any, list[int]] = {}
        for i in use:
            by.setdefault(chains(collection.names[i]), []).append(i)
        groups = list(by.values())
    elif isinstance(chains, Sequence):
        ok = set(use)
        groups = [[int(i) for i in g] for g in chains]
        dropped = [collection.names[i] for g in groups for i in g if i not in ok]
        if dropped:
            raise ValueError(f"chains lists checkpoints that failed to read: {dropped[:3]}")
    else:
        raise TypeError(f"chains must be None, an int, index lists or a callable, got {type(chains).__name__}")
    sizes = sorted({len(g) for g in groups})
    if len(sizes) != 1 or sizes[0] == 0:
        raise ValueError(f"every chain needs the same number of draws (>= 1); got chain lengths {sizes}")
    return groups


class _SiteArray:
    """One site of every checkpoint as a lazy ``(chain, draw, *site_shape)`` array for
    ``dask.array.from_array``: indexing reads only the checkpoints and entries asked for (the
    file memory-mapped), so slices of the dask array read slices of the files."""

    def __init__(self, collection: Collection, site: str, groups: list[list[int]]) -> None:
        sig = collection.signature
        self.collection, self.site, self.groups = collection, site, groups
        self.shape = (len(groups), len(groups[0]), *sig.shapes[site])
        self.dtype = torch.empty((), dtype=sig.dtypes[site]).numpy().dtype
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        chains = range(self.shape[0])[key[0]]
        draws = range(self.shape[1])[key[1]]
        rest = key[2:]
        out = []
        for c in np.atleast_1d(chains):
            row = []
            for d in np.atleast_1d(draws):
                index = self.groups[int(c)][int(d)]
                ck = self.collection.load(index, mmap=True, finite=False)
                if ck is None:  # on_error="skip" and the file went bad after validation
                    name = self.collection.names[index]
                    raise CheckpointError(name, self.collection.errors[name])
                row.append(np.array(ck.params[self.site].numpy()[rest]))  # a copy: the file can be closed
                del ck
            out.append(np.stack(row) if row else np.empty((0,) + self.shape[2:], self.dtype))
        arr = np.stack(out)
        if isinstance(key[1], int | np.integer):
            arr = arr[:, 0]
        if isinstance(key[0], int | np.integer):
            arr = arr[0]
        return arr


def to_inference_data(collection: Collection, *, chains: Any = None, sites: Sequence[str] | None = None) -> Any:
    """The collection as an ArviZ ``xarray.DataTree`` backed by dask arrays.

    Parameters
    ----------
    collection : Collection
        The draws are the checkpoints' points (the means of Gaussian checkpoints).
    chains : see :func:`chain_groups`
    sites : sequence of str, optional
        Variables to include (default: every floating-point site).

    Returns
    -------
    xarray.DataTree
        Group ``posterior``: one variable per site, dims ``(chain, draw, *site_dims)`` (named
        after neuron groups, see :func:`~pyro_symmetry.diagnostics.site_dims`), dask arrays
        with one chunk per checkpoint, read when computed; coordinate ``checkpoint``
        ``(chain, draw)`` names each draw's file.
    """
    import dask.array as da
    import xarray as xr

    sig = collection.signature
    floating = [s for s in sig.shapes if sig.dtypes[s].is_floating_point]
    sites = floating if sites is None else list(sites)
    unknown = [s for s in sites if s not in floating]
    if unknown:
        raise ValueError(f"sites {unknown} are not floating-point sites of the collection (have {floating})")
    groups = chain_groups(collection, chains)
    num_chains, num_draws = len(groups), len(groups[0])
    dims = site_dims({s: sig.shapes[s] for s in sites}, collection.spec)
    data = {}
    for s in sites:
        lazy = _SiteArray(collection, s, groups)
        meta = np.empty((0,) * lazy.ndim, lazy.dtype)
        name = f"collection-{s}-{uuid.uuid4().hex}"  # a unique key: the array reads files, not values
        arr = da.from_array(lazy, chunks=(1, 1, *sig.shapes[s]), lock=False, meta=meta, name=name)
        data[s] = (("chain", "draw", *dims[s]), arr)
    names = np.array([[collection.names[i] for i in g] for g in groups], dtype=object)
    coords = {"chain": np.arange(num_chains), "draw": np.arange(num_draws), "checkpoint": (("chain", "draw"), names)}
    attrs = {"source": "pyro_symmetry.collections", "spec": repr(collection.spec), "num_checkpoints": len(collection)}
    posterior = xr.Dataset(data, coords=coords, attrs=attrs)
    return xr.DataTree.from_dict({"posterior": posterior})


def _posterior(data: Any, chains: Any, sites: Sequence[str] | None = None) -> Any:
    if isinstance(data, Collection):
        data = to_inference_data(data, chains=chains, sites=sites)
    elif chains is not None:
        raise ValueError("chains= applies to a Collection; a DataTree already has its chains")
    if hasattr(data, "children") and "posterior" in data.children:
        return data["posterior"].to_dataset()
    if hasattr(data, "data_vars"):
        return data
    raise TypeError(
        f"expected a Collection, a DataTree with a 'posterior' group or a Dataset; got {type(data).__name__}"
    )


def _blocks(n: int, width: int) -> Iterator[tuple[int, int]]:
    for a in range(0, n, width):
        yield a, min(n, a + width)


def rhat_ess(
    data: Any,
    *,
    chains: Any = None,
    var_names: Sequence[str] | None = None,
    layers: Mapping[str, str] | None = None,
    max_bytes: int = _DEFAULT_BYTES,
    progress: bool = False,
) -> ConvergenceSummary:
    """Rank-normalized split R-hat and bulk ESS of every weight, a block of weights at a time.

    The same numbers as :func:`ps.diagnostics.rhat_ess <pyro_symmetry.diagnostics.rhat_ess>`
    (the vectorized kernel, equal to ``arviz-stats``), computed on blocks of
    ``max_bytes / (chains * draws * 96)`` weights (the block in float64 and the kernel's work
    arrays, :data:`_KERNEL_BYTES`), so that
    a collection larger than memory is never loaded whole. A Collection is read in passes
    that each read every (memory-mapped) file once, for as many weights of every site as the
    budget allows; a dask-backed DataTree is computed a block of rows of one variable at a time.

    Parameters
    ----------
    data : Collection, or a DataTree / Dataset (e.g. from :func:`to_inference_data`)
    chains : see :func:`chain_groups` (for a Collection)
    var_names : sequence of str, optional
    layers : mapping ``site -> layer``, optional
    max_bytes : int
        Working-memory budget of one block.
    progress : bool

    Returns
    -------
    ConvergenceSummary
    """
    from ._layout import layer_of

    if isinstance(data, Collection):
        sig = data.signature
        floating = [s for s in sig.shapes if sig.dtypes[s].is_floating_point]
        names = floating if var_names is None else list(var_names)
        missing = [v for v in names if v not in floating]
        if missing:
            raise ValueError(f"var_names {missing} are not floating-point sites of the collection (have {floating})")
        flat, num_chains, num_draws = _rhat_passes(data, chains, names, max_bytes, progress)
        shapes = {v: sig.shapes[v] for v in names}
    else:
        ds = _posterior(data, chains, var_names)
        names = list(ds.data_vars) if var_names is None else list(var_names)
        missing = [v for v in names if v not in ds.data_vars]
        if missing:
            raise ValueError(f"var_names {missing} are not in the posterior (have {list(ds.data_vars)})")
        flat, num_chains, num_draws = _rhat_dataset(ds, names, max_bytes, progress)
        shapes = {v: tuple(ds[v].shape[2:]) for v in names}
    rhat = {v: flat[v][0].reshape(shapes[v]) for v in names}
    degen = {v: flat[v][2].reshape(shapes[v]) for v in names}
    ess = {v: np.where(degen[v], np.nan, flat[v][1].reshape(shapes[v])) for v in names}
    layers = dict(layers) if layers is not None else {}
    return ConvergenceSummary(
        rhat=rhat,
        ess=ess,
        layers={v: layers.get(v, layer_of(v)) for v in names},
        num_chains=num_chains,
        num_draws=num_draws,
        degenerate=degen,
    )


#: Bytes per value of an R-hat/ESS block: the float64 block itself (8) and the kernel's work
#: arrays (rank normalization, folding, FFT autocorrelation: 74 measured with tracemalloc,
#: ``tests/test_collections_diagnostics.py``), rounded up.
_KERNEL_BYTES = 96


def _check_sizes(num_chains: int, num_draws: int) -> None:
    if num_chains < 2 or num_draws < 4:
        hint = (
            " (pass chains=: which checkpoints form each chain, e.g. a run per file-name prefix)"
            if num_chains < 2
            else ""
        )
        raise ValueError(f"R-hat needs >= 2 chains of >= 4 draws, got {num_chains} chains of {num_draws} draws{hint}")


def _kernel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from ._rank import degenerate, ess_bulk, rhat_rank  # scipy.stats: imported on first use

    return rhat_rank(x), ess_bulk(x), degenerate(x)


def _rhat_passes(collection: Collection, chains: Any, names: list[str], max_bytes: int, progress: bool):
    """``site -> (rhat, ess, degenerate)`` flat, by passes over the files (chains x draws order)."""
    from tqdm.auto import tqdm

    groups = chain_groups(collection, chains)
    num_chains, num_draws = len(groups), len(groups[0])
    _check_sizes(num_chains, num_draws)
    ordered = collection[[i for g in groups for i in g]]
    sig = collection.signature
    out = {v: (np.empty(math.prod(sig.shapes[v])), np.empty(math.prod(sig.shapes[v])),
               np.empty(math.prod(sig.shapes[v]), dtype=bool)) for v in names}  # fmt: skip
    width = max(1, int(max_bytes) // (num_chains * num_draws * _KERNEL_BYTES))
    bar = tqdm(desc="R-hat/ESS", unit="pass", disable=not progress)
    for segments, z in column_passes([ordered], names, width, lambda p, t: bar.update(1)):
        parts = _kernel(z.reshape(num_chains, num_draws, -1))
        col = 0
        for site, a, b in segments:
            for target, values in zip(out[site], parts):
                target[a:b] = values[col : col + b - a]
            col += b - a
    bar.close()
    return out, num_chains, num_draws


def _rhat_dataset(ds: Any, names: list[str], max_bytes: int, progress: bool):
    """``site -> (rhat, ess, degenerate)`` flat, computing a (dask) Dataset a block of rows at a time."""
    from tqdm.auto import tqdm

    num_chains, num_draws = int(ds.sizes.get("chain", 0)), int(ds.sizes.get("draw", 0))
    _check_sizes(num_chains, num_draws)
    width = max(1, int(max_bytes) // (num_chains * num_draws * _KERNEL_BYTES))
    out = {}
    bar = tqdm(total=sum(math.prod(ds[v].shape[2:]) for v in names), desc="R-hat/ESS", disable=not progress)
    for v in names:
        arr = ds[v].transpose("chain", "draw", ...)
        shape = tuple(arr.shape[2:])
        n = math.prod(shape)
        res = (np.empty(n), np.empty(n), np.empty(n, dtype=bool))
        # Blocks of whole rows of the first site axis: rectangular slices, which a lazily
        # loaded array reads as slices of the files (a flat reshape would read whole sites).
        rows, per_row = (shape[0], n // shape[0]) if shape and shape[0] else (1, n)
        for a, b in _blocks(rows, max(1, width // max(1, per_row))):
            block = arr.data[:, :, a:b] if shape else arr.data
            x = np.asarray(block, dtype=float).reshape(num_chains, num_draws, -1)  # computes a dask block
            lo, hi = a * per_row, b * per_row
            _check_finite(x, v, lo, ds)
            for target, values in zip(res, _kernel(x)):
                target[lo:hi] = values
            bar.update(hi - lo)
        out[v] = res
    bar.close()
    return out, num_chains, num_draws


def _check_finite(x: np.ndarray, var: str, start: int, ds: Any) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        c, d, k = (int(t[0]) for t in np.nonzero(bad))
        where = ds["checkpoint"].values[c, d] if "checkpoint" in ds.coords else f"chain {c}, draw {d}"
        raise ValueError(
            f"the draws of {var!r} hold {int(bad.sum())} NaN or Inf values (first: weight {start + k} of "
            f"{where}): R-hat/ESS of non-finite draws are meaningless"
        )


def posterior_moments(data: Any, *, chains: Any = None, per_chain: bool = False) -> dict[str, tuple[Any, Any]]:
    """Posterior mean and variance (``ddof=1``) of every site, streamed in float64.

    A Collection is read once, one checkpoint at a time (Welford's updates); a DataTree /
    Dataset is reduced by dask.

    Parameters
    ----------
    data : Collection, or a DataTree / Dataset
    chains : see :func:`chain_groups` (for a Collection)
    per_chain : bool
        Reduce over draws only: ``(chain, *site_shape)`` per site.

    Returns
    -------
    dict ``site -> (mean, variance)`` of numpy arrays
    """
    if isinstance(data, Collection):
        return _welford(data, chain_groups(data, chains), per_chain)
    import dask

    ds = _posterior(data, chains)
    axes = ("draw",) if per_chain else ("chain", "draw")
    lazy = {}
    for v in ds.data_vars:
        x = ds[v].astype("float64")
        lazy[v] = (x.mean(axes).data, x.var(axes, ddof=1).data)
    (computed,) = dask.compute(lazy)
    return {v: (np.asarray(m), np.asarray(s)) for v, (m, s) in computed.items()}


def _welford(collection: Collection, groups: list[list[int]], per_chain: bool) -> dict[str, tuple[Any, Any]]:
    sig = collection.signature
    sites = [s for s in sig.shapes if sig.dtypes[s].is_floating_point]
    parts = groups if per_chain else [[i for g in groups for i in g]]
    out: dict[str, tuple[list, list]] = {s: ([], []) for s in sites}
    for members in parts:
        count, mean, m2 = 0, {}, {}
        for i in members:
            ck = collection.load(i)
            if ck is None:
                raise CheckpointError(collection.names[i], collection.errors[collection.names[i]])
            count += 1
            for s in sites:
                x = ck.params[s].double()
                if count == 1:
                    mean[s], m2[s] = x.clone(), torch.zeros_like(x)
                    continue
                delta = x - mean[s]
                mean[s] += delta / count
                m2[s] += delta * (x - mean[s])
        for s in sites:
            out[s][0].append(mean[s].numpy())
            out[s][1].append((m2[s] / (count - 1)).numpy() if count > 1 else np.full(mean[s].shape, np.nan))
    pick = (lambda a: np.stack(a)) if per_chain else (lambda a: a[0])
    return {s: (pick(m), pick(v)) for s, (m, v) in out.items()}


def column_passes(
    collections: Sequence[Collection], sites: Sequence[str], max_weights: int, on_pass: Callable[[int, int], None]
) -> Iterator[tuple[list[tuple[str, int, int]], np.ndarray]]:
    """Blocks of columns of the flattened ``sites`` of every checkpoint, one file read per pass.

    Yields ``(segments, Z)``: ``segments`` lists ``(site, start, stop)`` (flat indices), ``Z``
    float64 ``(checkpoints, width)`` their values for every checkpoint of ``collections`` in
    order. Each pass reads every (memory-mapped) file once; ``width <= max_weights``.
    """
    sig = collections[0].signature
    sizes = [(s, math.prod(sig.shapes[s])) for s in sites]
    passes: list[list[tuple[str, int, int]]] = [[]]
    room = max_weights
    for s, n in sizes:
        a = 0
        while a < n:
            if room == 0:
                passes.append([])
                room = max_weights
            b = min(n, a + room)
            passes[-1].append((s, a, b))
            room -= b - a
            a = b
    members = [(c, i) for c in collections for i in range(len(c))]
    for p, segments in enumerate(passes):
        width = sum(b - a for _, a, b in segments)
        z = np.empty((len(members), width))
        for row, (c, i) in enumerate(members):
            ck = c.load(i, mmap=True, finite=False)
            if ck is None:
                raise CheckpointError(c.names[i], c.errors[c.names[i]])
            col = 0
            for s, a, b in segments:
                z[row, col : col + b - a] = ck.params[s].reshape(-1)[a:b].numpy()
                col += b - a
            del ck
        if not np.isfinite(z).all():
            row, col = (int(t[0]) for t in np.nonzero(~np.isfinite(z)))
            ends = np.cumsum([b - a for _, a, b in segments])
            site = segments[int(np.searchsorted(ends, col, side="right"))][0]
            c, i = members[row]
            raise ValueError(
                f"{c.names[i]}: site {site!r} holds NaN or Inf values; a statistic of non-finite draws is meaningless"
            )
        on_pass(p, len(passes))
        yield segments, z
