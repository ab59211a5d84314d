"""Diagnostics of checkpoint collections, streamed (bounded memory).

The in-memory diagnostics (:func:`~pyro_symmetry.diagnostics.to_inference_data`,
:func:`~pyro_symmetry.diagnostics.rhat_ess`, :func:`~pyro_symmetry.diagnostics.mmd`,
:mod:`~pyro_symmetry.diagnostics.metrics`) take every draw at once. For a
:class:`~pyro_symmetry.collections.Collection` larger than memory use these::

    from pyro_symmetry.diagnostics import collections as dc
    tree = dc.to_inference_data(coll, chains=4)        # DataTree of dask arrays
    summary = dc.rhat_ess(coll, chains=4)              # vectorized kernel, block by block
    res = dc.mmd(coll[:500], coll[500:])               # exact, streamed, or random features
    pred = dc.predictive(coll, predict, x, y)          # ensemble metrics, disagreement, MI
"""

from ._collection_data import chain_groups, posterior_moments, rhat_ess, to_inference_data
from ._collection_mmd import CollectionMMD, mmd
from ._collection_predictive import PredictiveSummary, predictive

__all__ = [
    "CollectionMMD",
    "PredictiveSummary",
    "chain_groups",
    "mmd",
    "posterior_moments",
    "predictive",
    "rhat_ess",
    "to_inference_data",
]
