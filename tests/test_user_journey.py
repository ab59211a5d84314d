"""What a new user does after reading the README and docs/getting_started.md, end to end
at a small scale: train a symmetrized guide, estimate I(g; w), align two runs and compare
their loss barriers, write a symmetry report."""

import math

import pyro
import pytest
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import pyro_symmetry as ps


def _train(model, guide, x, y, steps, seed):
    pyro.set_rng_seed(seed)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(steps):
        svi.step(x, y)
    return guide


@pytest.mark.slow
def test_getting_started_journey(digits_small, tmp_path):
    x, y = digits_small
    x_tr, y_tr, x_te, y_te = x[:150], y[:150], x[150:], y[150:]
    model = ps.models.BayesianMLP(64, [6], 10)

    # 1. a symmetrized guide, plain SVI
    guide = ps.AutoSymmetrizedNormal(model, num_permutations=8)
    _train(model, guide, x_tr, y_tr, 30, seed=0)
    mi = ps.mutual_information(guide, model.spec, estimator="permanent", num_samples=64)
    assert 0.0 <= mi.value <= model.spec.log_order + 3 * mi.stderr
    assert model.spec.log_order == pytest.approx(math.lgamma(7))

    # 2. two independent runs, aligned; the W2 objective only goes down
    runs = []
    for seed in range(3):
        pyro.clear_param_store()
        runs.append(_train(model, AutoNormal(model), x_tr, y_tr, 30, seed=seed))
    res = ps.align(runs[0], runs[1], model.spec)
    assert res.objective[-1] <= res.objective[0]
    loss = ps.gaussian_nll_loss(model, x_te, y_te)
    before = ps.loss_barrier(loss, runs[0], runs[1], num_points=5)
    after = ps.loss_barrier(loss, runs[0], res.aligned, num_points=5)
    assert math.isfinite(before.barrier) and math.isfinite(after.barrier)

    # 3. a report, written to a folder
    report = ps.diagnostics.symmetry_report(
        runs,
        model.spec,
        data=(x_te, y_te),
        out_dir=tmp_path,
        num_samples=20,
        barrier_points=5,
        mmd_permutations=50,
        progress=False,
    )
    md = report.to_markdown()
    assert "R-hat" in md and "MMD" in md
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.html").exists()
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html  # one self-contained file, figures embedded
