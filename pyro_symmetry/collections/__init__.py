"""Collections of checkpoints beyond one machine's memory.

Thousands of independently trained networks (deep ensembles, multi-run VI, MCMC
checkpoints; Laurent, Aldea, Franchi, ICLR 2024 study 1,024 to 9,216 ResNet-18s per data
set) do not fit in memory at once. A :class:`Collection` reads them lazily, one at a time,
checked against one signature; its transforms (:meth:`Collection.align`,
:meth:`Collection.canonicalize`, :meth:`Collection.map`) apply the package's in-memory
functions to every checkpoint in-process or on any executor with ``submit`` (a
``concurrent.futures`` pool, a ``dask.distributed.Client``), write each result atomically
with a manifest, and resume where an interrupted call stopped::

    coll = ps.collections.from_files("ckpts/*.pt", spec)
    summary = coll.align("barycenter", "aligned/", executor=client)
    aligned = summary.collection(spec)

Streamed diagnostics of collections (ArviZ data backed by dask arrays, R-hat/ESS, MMD,
predictive metrics) live in :mod:`pyro_symmetry.diagnostics.collections`.
"""

from ._driver import TransformError, TransformSummary
from ._formats import Checkpoint, CheckpointError
from .collection import Collection, from_files, from_runs
from .transforms import Barycenter, align, barycenter, canonicalize, map_collection

__all__ = [
    "Barycenter",
    "Checkpoint",
    "CheckpointError",
    "Collection",
    "TransformError",
    "TransformSummary",
    "align",
    "barycenter",
    "canonicalize",
    "from_files",
    "from_runs",
    "map_collection",
]
