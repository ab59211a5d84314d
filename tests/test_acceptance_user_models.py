"""Issue 13's acceptance: the whole workflow on models users wrote themselves, with no
``functional`` method and no glue code.

Three models (``tests/user_models.py``): Pyro's BNN-tutorial ``PyroModule`` (tanh, learned
noise scale), a NumPyro-style functional model with ``(in, out)`` weights and a learned
precision, and a ``ModuleList`` ReLU classifier. For each: a spec (``from_module`` on the
model itself, or by hand for the functional model), a symmetrized guide trained a few SVI
steps in two runs, alignment, loss barriers before and after with ``ps.nll_loss``, an
ArviZ tree with a ``log_likelihood`` group checked against hand-written forward passes,
``arviz_stats.loo`` on it, and a report. ArviZ objects (a ``DataTree``, a legacy
``InferenceData``, a tree loaded from netCDF) go back in. The code blocks of
``docs/getting_started.md`` run here as they stand.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from user_models import DeepBNN, TutorialBNN, deep_spec, functional_model, functional_spec, tutorial_spec

import pyro_symmetry as ps

arviz_stats = pytest.importorskip("arviz_stats")
xr = pytest.importorskip("xarray")

DOCS = Path(__file__).resolve().parents[1] / "docs"
N = 40


def _functional():
    return functional_model


def _data(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if case == "tutorial":
        x = 4 * torch.rand(N, 1, generator=gen) - 2
        return x, torch.sin(2 * x[:, 0]) + 0.2 * torch.randn(N, generator=gen)
    if case == "functional":
        x = torch.randn(N, 3, generator=gen)
        return x, torch.tanh(x.sum(1)) + 0.1 * torch.randn(N, generator=gen)
    x = torch.randn(N, 8, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _hand_log_lik(case: str, w: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The pointwise log-likelihood of one draw ``w``, by a forward pass written by hand."""
    w = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in w.items()}
    x = x.double()
    if case == "tutorial":
        h = torch.tanh(x @ w["layer1.weight"].T + w["layer1.bias"])
        mu = (h @ w["layer2.weight"].T + w["layer2.bias"]).squeeze(-1)
        return torch.distributions.Normal(mu, w["sigma"]).log_prob(y.double())
    if case == "functional":
        z = (torch.tanh(torch.tanh(x @ w["w1"]) @ w["w2"]) @ w["w3"]).squeeze(-1)
        return torch.distributions.Normal(z, w["prec_obs"].rsqrt()).log_prob(y.double())
    h = x
    for i in range(2):
        h = torch.relu(h @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"])
    logits = h @ w["layers.2.weight"].T + w["layers.2.bias"]
    return torch.distributions.Categorical(logits=logits).log_prob(y)


CASES = {
    # name: (make_model, spec from what the user has, the hand-written spec it must equal)
    "tutorial": (TutorialBNN, lambda: ps.PermutationSpec.from_module(TutorialBNN()), tutorial_spec()),
    "functional": (_functional, functional_spec, functional_spec()),
    "deep": (DeepBNN, lambda: ps.PermutationSpec.from_module(DeepBNN()), deep_spec()),
}


def _same_group(a: ps.PermutationSpec, b: ps.PermutationSpec) -> None:
    assert sorted(a.sites) == sorted(b.sites)
    assert sorted(g.size for g in a.groups.values()) == sorted(g.size for g in b.groups.values())
    assert a.log_order == pytest.approx(b.log_order)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_whole_workflow_on_a_user_model(case, tmp_path):
    make_model, make_spec, hand_spec = CASES[case]
    x, y = _data(case)
    spec = make_spec()
    _same_group(spec, hand_spec)  # from_module on the model itself names the model's sites

    # two runs of a symmetrized guide, each in its own param store
    make_guide = functools.partial(ps.AutoSymmetrizedNormal, spec=spec, num_permutations=4)
    runs = ps.train_runs(make_model, make_guide, (x, y), 2, steps=25, progress=False)
    assert all(r.error is None and torch.isfinite(r.losses).all() for r in runs)
    model = runs[0].model

    # alignment: the objective never increases; the permutation is an exact symmetry of the
    # user's likelihood (nll_loss at a point in the model's space, moved by it)
    res = ps.align(runs[0], runs[1], spec)
    assert res.objective[-1] <= res.objective[0] + 1e-9
    loss = ps.nll_loss(model, x, y)
    point = {k: v.detach() for k, v in runs[1].guide.median().items()}
    assert loss(spec.apply(point, res.permutation)) == pytest.approx(loss(point), rel=1e-5, abs=1e-6)

    # loss barriers before and after: finite, >= 0, the same starting point
    before = ps.loss_barrier(loss, runs[0], runs[1], num_points=5)
    after = ps.loss_barrier(loss, runs[0], res.aligned, num_points=5)
    for b in (before, after):
        assert all(math.isfinite(v) for v in b.losses.tolist()) and b.barrier >= 0.0
    assert float(before.losses[0]) == float(after.losses[0])

    # ArviZ tree with a pointwise log-likelihood that equals the hand-written model
    tree = ps.diagnostics.to_inference_data(runs, num_samples=20, spec=spec, data=(x, y))
    obs = {"tutorial": "obs", "functional": "Y", "deep": "obs"}[case]
    ll = tree["log_likelihood"][obs]
    assert dict(ll.sizes) == {"chain": 2, "draw": 20, ll.dims[-1]: N}
    for c, d in ((0, 0), (1, 7)):
        w = {k: tree["posterior"][k].values[c, d] for k in tree["posterior"].data_vars}
        torch.testing.assert_close(
            torch.as_tensor(ll.values[c, d], dtype=torch.float64), _hand_log_lik(case, w, x, y), rtol=1e-4, atol=1e-4
        )
    torch.testing.assert_close(torch.as_tensor(tree["observed_data"][obs].values), y)
    elpd = arviz_stats.loo(tree)
    assert math.isfinite(float(elpd.elpd)) and elpd.n_data_points == N and elpd.n_samples == 40

    # the report: barriers computed (no note saying why not), a self-contained HTML
    report = ps.diagnostics.symmetry_report(
        runs, spec, data=(x, y), out_dir=tmp_path, num_samples=20, barrier_points=5, mmd_permutations=50, progress=False
    )
    assert len(report.barriers) == 1 and not any("barrier" in n.lower() for n in report.notes), report.notes
    html = next(tmp_path.rglob("report.html")).read_text()
    assert "data:image/png;base64," in html


@pytest.mark.slow
def test_arviz_objects_go_back_in(tmp_path):
    """A DataTree, the same tree loaded from netCDF and a legacy InferenceData are read as
    the same draws by as_posterior and the diagnostics, and can be re-aligned; the LOO of
    the re-aligned tree equals the original's (the log-likelihood is invariant)."""
    x, y = _data("tutorial")
    spec = tutorial_spec()
    runs = ps.train_runs(TutorialBNN, AutoNormal, (x, y), 2, steps=15, progress=False, vectorize=False)
    tree = ps.diagnostics.to_inference_data(runs, num_samples=15, spec=spec, data=(x, y))
    path = tmp_path / "draws.nc"
    tree.to_netcdf(path)
    loaded = xr.open_datatree(path)
    az = pytest.importorskip("arviz")
    idata = az.InferenceData(
        posterior=tree["posterior"].to_dataset(),
        log_likelihood=tree["log_likelihood"].to_dataset(),
        sample_stats=tree["sample_stats"].to_dataset(),
    )
    ref = ps.as_posterior(tree, spec).draws()
    ref_rhat = ps.diagnostics.rhat_ess(tree).rhat
    ref_after = ps.diagnostics.rhat_ess_before_after(tree, spec).after.rhat
    for form in (loaded, idata, tree["posterior"].to_dataset()):
        post = ps.as_posterior(form, spec)
        assert post.form == "draws" and set(post.draws()) == set(ref)
        for k, v in post.draws().items():
            torch.testing.assert_close(v, ref[k])
        rhat = ps.diagnostics.rhat_ess(form).rhat
        assert set(rhat) == set(ref_rhat) and all((rhat[k] == ref_rhat[k]).all() for k in rhat)
        after = ps.diagnostics.rhat_ess_before_after(form, spec).after.rhat
        assert all(np.array_equal(after[k], ref_after[k], equal_nan=True) for k in ref_after)
    for form in (loaded, idata):
        realigned = ps.diagnostics.to_inference_data(form, reference="barycenter", spec=spec)
        assert "log_likelihood" in realigned.children
        assert float(arviz_stats.loo(realigned).elpd) == pytest.approx(float(arviz_stats.loo(tree).elpd), rel=1e-9)
        moved = ps.as_posterior(realigned, spec).draws()
        assert not torch.equal(moved["layer1.weight"], ref["layer1.weight"])  # alignment moved the draws


# ----------------------------------------------------------------------------- the docs run
def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.slow
def test_getting_started_page_runs_as_written(capsys):
    """Every Python block of docs/getting_started.md, in order, in one namespace: what a
    reader copies runs, and its claims hold."""
    blocks = _python_blocks(DOCS / "getting_started.md")
    assert len(blocks) >= 7
    ns: dict = {"__name__": "getting_started"}
    for block in blocks:
        exec(compile(block, "docs/getting_started.md", "exec"), ns)  # noqa: S102 - the page's own code
    spec, runs = ns["spec"], ns["runs"]
    assert set(spec.sites) == {"layer1.weight", "layer1.bias", "layer2.weight"}
    assert spec.log_order == pytest.approx(math.lgamma(9) + 8 * math.log(2))  # 8 neurons, signed
    assert len(runs) == 2 and all(r.error is None for r in runs)
    assert ns["after"].barrier < ns["before"].barrier  # the page says it drops
    assert dict(ns["tree"]["log_likelihood"]["obs"].sizes) == {"chain": 2, "draw": 100, "data": 40}
    assert len(ns["report"].barriers) == 1
    assert (Path(ns["out_dir"]) / "report.html").exists() or any(Path(ns["out_dir"]).rglob("report.html"))
    out = capsys.readouterr().out
    assert "PermutationSpec({layer1: 8±}" in out and "elpd_loo" in out


def test_bring_your_own_model_page_runs_as_written(capsys):
    """docs/bring_your_own_model.md's example: a functional model with a hand spec, read by
    as_posterior as a density and as draws (the precision mapped to its support)."""
    ns: dict = {"__name__": "bring_your_own_model"}
    for block in _python_blocks(DOCS / "bring_your_own_model.md"):
        exec(compile(block, "docs/bring_your_own_model.md", "exec"), ns)  # noqa: S102 - the page's own code
    post, draws = ns["post"], ns["draws"]
    assert post.form == "gaussian" and set(post.sites) == {"w1", "w2", "prec_obs"}
    assert draws["w1"].shape == (1, 100, 3, 5) and bool((draws["prec_obs"] > 0).all())
    out = capsys.readouterr().out
    assert "Posterior(gaussian, {w1: (3, 5), w2: (5, 1), prec_obs: ()})" in out
