"""The symmetry report as files, and its barriers for users' own models.

- ``report.html`` is one self-contained file: every figure a base64 PNG ``data:`` URI that
  decodes to a valid image, nothing pointing to a local file (parsed with ``html.parser``;
  and rendered in headless Chromium when it is installed, every image loaded);
- the draws before and after alignment are saved beside it (netCDF) and reopen in ArviZ;
- ``out_dir`` must be empty or new; ``overwrite=True`` replaces only the report's own files,
  and nothing stale (a figure, a draws file of an earlier report) is left looking current;
- ``progress`` reaches the long steps;
- barriers are computed whenever data are given, for any Pyro model (``ps.nll_loss``), and
  the notes say why when they cannot be.
"""

from __future__ import annotations

import base64
import io
import math
import shutil
import statistics
import subprocess
from html.parser import HTMLParser

import pyro
import pyro.distributions as dist
import pytest
import torch
import xarray as xr
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoNormal
from user_models import DeepBNN, TutorialBNN, deep_spec, tutorial_spec

import pyro_symmetry as ps

D = ps.diagnostics
FILES = {"report.md", "report.html", "draws.nc", "draws_aligned.nc"}
QUICK = dict(num_samples=12, mi_samples=4, mi_permutations=4, mmd_permutations=10, barrier_points=3, barrier_pairs=1)


def _gaussian_runs(num_runs=3, seed=0):
    model = ps.models.BayesianMLP(3, [4], 2)
    g = torch.Generator().manual_seed(seed)
    loc = {k: 2.0 * torch.randn(s, generator=g) for k, s in model.spec.shapes.items()}
    perms = model.spec.sample((num_runs,), generator=g)
    runs = []
    for r in range(num_runs):
        moved = model.spec.apply(loc, {k: v[r] for k, v in perms.items()})
        runs.append({k: (v, torch.full_like(v, 0.1)) for k, v in moved.items()})
    x = torch.randn(20, 3, generator=g)
    return model, runs, x, model.functional(loc, x).argmax(-1)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    pytest.importorskip("matplotlib")
    model, runs, x, y = _gaussian_runs()
    out = tmp_path_factory.mktemp("report")
    loss = ps.gaussian_nll_loss(model, x, y, num_samples=4)
    report = D.symmetry_report(runs, model.spec, loss_fn=loss, out_dir=out, progress=False, **QUICK)
    return report, out


# ---------------------------------------------------------------------------------- one self-contained page
class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links = [], []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "data", "poster", "srcset"):
                (self.images if tag == "img" and name == "src" else self.links).append((tag, name, value))


def test_html_embeds_every_figure_and_links_no_file(written):
    from matplotlib.image import imread

    report, out = written
    assert {p.name for p in out.iterdir()} == FILES
    text = (out / "report.html").read_text()
    parser = _Links()
    parser.feed(text)
    assert len(parser.images) == len(report.figures) == 4  # R-hat, marginals, ranks, barriers
    for _, _, src in parser.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = imread(io.BytesIO(png), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert parser.links == []  # no href/src to anything, local or not
    assert "url(" not in text
    assert (out / "report.md").read_text() == report.to_markdown()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed")
def test_html_renders_in_headless_chromium_with_every_image_loaded(written, tmp_path):
    _, out = written
    probe = (
        "<script>window.addEventListener('load', function () {var r = [];"
        "for (var i of document.images) {r.push(i.complete + ':' + i.naturalWidth + 'x' + i.naturalHeight);}"
        "document.body.setAttribute('data-images', r.join(','));});</script></body>"
    )
    page = tmp_path / "probe.html"
    page.write_text((out / "report.html").read_text().replace("</body>", probe))
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom"]
    dom = subprocess.run([*cmd, page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    images = dom.split('data-images="', 1)[1].split('"', 1)[0].split(",")
    assert len(images) == 4
    for image in images:
        complete, size = image.split(":")
        width, height = map(int, size.split("x"))
        assert complete == "true" and width > 100 and height > 100, image


def test_draws_before_and_after_alignment_reopen_in_arviz(written):
    report, out = written
    for name, draws in (
        ("draws.nc", report.convergence.draws_before),
        ("draws_aligned.nc", report.convergence.draws_after),
    ):
        tree = xr.open_datatree(out / name)
        for k, v in draws.samples.items():
            torch.testing.assert_close(torch.as_tensor(tree["posterior"][k].values), v)
        assert tree["posterior"].attrs["aligned"] == str(draws.aligned)
    again = D.symmetry_report(xr.open_datatree(out / "draws.nc"), report.convergence.draws_before.spec,
                              progress=False, **QUICK)  # fmt: skip
    assert again.info["runs"] == 3


# ---------------------------------------------------------------------------------- never overwrite
def test_a_non_empty_folder_is_refused_before_any_work_and_left_untouched(tmp_path):
    model, runs, _, _ = _gaussian_runs()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "report.md").write_text("my own report")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="not empty"):
        D.symmetry_report(runs, model.spec, out_dir=tmp_path, progress=False, **QUICK)
    with pytest.raises(FileExistsError, match="overwrite=True"):  # refused before reading the (bad) runs
        D.symmetry_report([3, 4], model.spec, out_dir=tmp_path, progress=False)
    report = D.symmetry_report(runs, model.spec, progress=False, **QUICK)
    with pytest.raises(FileExistsError):
        report.save(tmp_path)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before
    with pytest.raises(FileExistsError, match="not a folder"):
        report.save(tmp_path / "notes.txt")


def test_overwrite_replaces_only_the_reports_own_files_and_leaves_nothing_stale(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    model, runs, x, y = _gaussian_runs()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "barriers.png").write_bytes(b"a user's figure")
    first = D.symmetry_report(
        runs, model.spec, data=(x, y), model=model, out_dir=tmp_path, overwrite=True, progress=False, **QUICK
    )
    assert "barriers" in first.figures
    # A second report without data: no barriers. Its page must not show the first one's curve.
    second = D.symmetry_report(runs, model.spec, out_dir=tmp_path, overwrite=True, progress=False, **QUICK)
    assert "barriers" not in second.figures and second.barriers == []
    html = (tmp_path / "report.html").read_text()
    assert html == second.to_html() and html.count("<img ") == 3 and "alt='barriers'" not in html
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "barriers.png").read_bytes() == b"a user's figure"  # not the report's: untouched
    assert {p.name for p in tmp_path.iterdir()} == FILES | {"notes.txt", "barriers.png"}

    # A draws file that cannot be written: the earlier report's file of that name goes, the page says why.
    def fail(self, *args, **kwargs):
        raise RuntimeError("no netCDF engine")

    monkeypatch.setattr(xr.DataTree, "to_netcdf", fail)
    third = D.symmetry_report(runs, model.spec, out_dir=tmp_path, overwrite=True, progress=False, **QUICK)
    assert not (tmp_path / "draws.nc").exists() and not (tmp_path / "draws_aligned.nc").exists()
    assert "Saving draws.nc failed (RuntimeError: no netCDF engine)" in (tmp_path / "report.html").read_text()
    assert set(third.files) == {"markdown", "html"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_progress_reaches_alignment_mutual_information_and_barriers(capfd):
    model, runs, x, y = _gaussian_runs()
    D.symmetry_report(
        runs, model.spec, loss_fn=ps.gaussian_nll_loss(model, x, y, num_samples=4), progress=True, **QUICK
    )
    err = capfd.readouterr().err
    for desc in ("symmetry report", "alignment sweeps", "I(g; w)", "loss barrier"):
        assert desc in err, desc


# ---------------------------------------------------------------------------------- barriers of any model
class FixedNoiseBNN(TutorialBNN):
    """The tutorial network with a fixed noise scale: every latent is real-valued."""

    def forward(self, x, y=None):
        x = x.reshape(-1, 1) if x.dim() == 1 else x
        mu = self.layer2(self.activation(self.layer1(x))).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu, 0.3), obs=y)
        return mu


def _regression(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g)
    return x, torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n, generator=g)


def _classification(n=24):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _check_default_barriers(make_model, spec, data, progress=False):
    runs = ps.train_runs(make_model, AutoNormal, data, 2, steps=10, progress=False, vectorize=False)
    report = D.symmetry_report(runs, spec, data=data, progress=progress, **QUICK)
    assert not any("barrier" in n.lower() for n in report.notes), report.notes
    assert len(report.barriers) == 1
    _, before, after = report.barriers[0]
    assert all(math.isfinite(v) for v in [*before.losses.tolist(), *after.losses.tolist()])
    # The curve starts at run 0's own predictive NLL (model run by Pyro, 32 draws): within 5
    # standard deviations of that Monte Carlo estimate, measured over 8 seeds.
    values = [ps.nll_loss(runs[0].model, *data, seed=s)(runs[0]) for s in range(8)]
    tol = 5 * statistics.stdev(values) * math.sqrt(1 + 1 / 8)
    assert abs(float(before.losses[0]) - statistics.fmean(values)) < tol
    return report


def test_barriers_of_user_models_without_functional():
    _check_default_barriers(FixedNoiseBNN, tutorial_spec(), _regression())
    _check_default_barriers(DeepBNN, deep_spec(), _classification())


def test_barriers_of_a_model_with_a_constrained_latent():
    _check_default_barriers(TutorialBNN, tutorial_spec(), _regression())


def test_the_notes_say_why_barriers_were_not_computed():
    x, y = _regression()
    runs = ps.train_runs(TutorialBNN, AutoNormal, (x, y), 2, steps=3, progress=False, vectorize=False)
    spec = tutorial_spec()
    report = D.symmetry_report(runs, spec, progress=False, **QUICK)
    assert any("need held-out data (data=(x, y)) or a loss (loss_fn=)" in n for n in report.notes)
    mappings = [{k: (v.detach(), torch.full_like(v, 0.1)) for k, v in r.guide.median().items()} for r in runs]
    report = D.symmetry_report(mappings, spec, data=(x, y), progress=False, **QUICK)
    assert any("no model is known" in n and "model=" in n for n in report.notes)
    weights = [{k: v for k, v in m.items() if k != "sigma"} for m in mappings]
    report = D.symmetry_report(weights, spec, data=(x, y), model=runs[0].model, progress=False, **QUICK)
    assert any("latent sites ['sigma'] are not in the runs" in n for n in report.notes)
    model = FixedNoiseBNN()
    mcmc = MCMC(NUTS(model), num_samples=8, warmup_steps=4, num_chains=1, disable_progbar=True)
    chains = []
    for seed in range(2):
        pyro.set_rng_seed(seed)
        mcmc.run(x, y)
        chains.append({k: v for k, v in mcmc.get_samples().items()})
    report = D.symmetry_report(chains, spec, data=(x, y), model=model, progress=False, **QUICK)
    assert report.barriers == [] and any("these runs are draws" in n for n in report.notes)
    assert "barrier_before" not in report.rows[-1]
