"""Collections through the package's public entry points, as a new user meets them.

``ps.collections.from_files`` on the files a Pyro user saves (param-store states of a
guide, safetensors), ``ps.diagnostics.to_inference_data`` and ``ps.diagnostics.mmd``
dispatching to the streamed versions, and the permutation test of the streamed MMD.
"""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal

import pyro_symmetry as ps
from pyro_symmetry._state import isolated, snapshot

SPEC = ps.mlp_spec(["fc1", "fc2", "fc3"], [6, 5], activation_symmetry="scale")


def _network(gen: torch.Generator, centre: dict | None = None, noise: float = 0.3) -> dict[str, torch.Tensor]:
    shapes = {"fc1.weight": (6, 4), "fc1.bias": (6,), "fc2.weight": (5, 6), "fc2.bias": (5,),
              "fc3.weight": (3, 5), "fc3.bias": (3,)}  # fmt: skip
    if centre is None:
        return {s: torch.randn(shape, generator=gen, dtype=torch.float64) for s, shape in shapes.items()}
    return {s: v + noise * torch.randn(v.shape, generator=gen, dtype=v.dtype) for s, v in centre.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """16 checkpoints: 2 runs of 4 around network A, 2 runs of 4 around network B."""
    d = tmp_path_factory.mktemp("api")
    gen = torch.Generator().manual_seed(0)
    a, b = _network(gen), _network(gen)
    for r, centre in enumerate([a, a, b, b]):
        for k in range(4):
            torch.save(_network(gen, centre), d / f"run{r}_{k}.pt")
    return d


def stacked(coll) -> dict[str, torch.Tensor]:
    cks = list(coll)
    return {s: torch.stack([ck.params[s] for ck in cks]) for s in cks[0].params}


# ---------------------------------------------------------------------- the namespace
def test_ps_collections_is_public():
    # a subpackage like ps.diagnostics and ps.models: not in __all__, where a star import would
    # shadow the standard library's collections
    assert "collections" not in ps.__all__ and ps.collections.from_files is not None
    assert "collections" in ps.diagnostics.__all__ and ps.diagnostics.collections.rhat_ess is not None
    import collections  # the standard library's module is not shadowed by `import pyro_symmetry`

    assert collections.OrderedDict is not None


# ---------------------------------------------------------------------- to_inference_data dispatch
def test_to_inference_data_of_a_collection_is_dask_backed(files):
    import dask.array as da

    coll = ps.collections.from_files(files / "*.pt", SPEC)
    tree = ps.diagnostics.to_inference_data(coll, chains=4)
    post = tree["posterior"]
    assert isinstance(post["fc1.weight"].data, da.Array)  # read on demand, not loaded
    assert post["fc2.weight"].dims == ("chain", "draw", "fc2_neuron", "fc1_neuron")
    want = stacked(coll)["fc2.weight"].reshape(4, 4, 5, 6).numpy()
    assert np.array_equal(post["fc2.weight"].values, want)
    same = ps.diagnostics.collections.to_inference_data(coll, chains=4)
    assert np.array_equal(same["posterior"]["fc1.bias"].values, post["fc1.bias"].values)
    # R-hat of the dask-backed tree, block by block, equals the in-memory kernel on the loaded tree
    streamed = ps.diagnostics.collections.rhat_ess(tree, max_bytes=4 * 4 * 64 * 7)
    full = ps.diagnostics.rhat_ess(tree.compute())
    for v in full.rhat:
        assert np.array_equal(streamed.rhat[v], full.rhat[v], equal_nan=True), v
    assert ps.diagnostics.to_inference_data(coll, spec=SPEC)["posterior"].sizes["chain"] == 1


def test_to_inference_data_refuses_what_does_not_apply_to_a_collection(files):
    coll = ps.collections.from_files(files / "*.pt", SPEC)
    with pytest.raises(ValueError, match=r"does not take reference.*coll\.align"):
        ps.diagnostics.to_inference_data(coll, reference="barycenter")
    with pytest.raises(ValueError, match="does not take num_samples, data"):
        ps.diagnostics.to_inference_data(coll, num_samples=10, data=(torch.zeros(2, 4),))
    other = ps.mlp_spec(["fc1", "fc2", "fc3"], [6, 5], activation_symmetry="none")
    with pytest.raises(ps.SpecError, match="not the collection's spec"):
        ps.diagnostics.to_inference_data(coll, spec=other)
    with pytest.raises(ValueError, match="chains= applies to a Collection"):
        ps.diagnostics.to_inference_data([stacked(coll)], chains=2)


# ---------------------------------------------------------------------- mmd dispatch
def test_mmd_of_collections_dispatches_and_equals_the_in_memory_mmd(files):
    coll = ps.collections.from_files(files / "*.pt", SPEC)
    x, y = coll[:8], coll[8:]
    kw = {"kernel": "both", "num_permutations": 200, "seed": 5}
    exact = ps.diagnostics.mmd(stacked(x), stacked(y), **kw)
    got = ps.diagnostics.mmd(x, y, **kw)
    assert got.method == "memory"  # 16 small checkpoints fit: the in-memory function itself
    assert torch.equal(got.mmd2_grid, exact.mmd2_grid) and torch.equal(got.p_values, exact.p_values)
    assert got.p_value == exact.p_value and got.kernels == exact.kernels
    streamed = ps.diagnostics.mmd(x, y, method="streamed", max_bytes=16 * 8 * 3 * 2 * 10, **kw)  # 10 weights/pass
    assert streamed.method == "streamed"
    torch.testing.assert_close(streamed.mmd2_grid, exact.mmd2_grid, rtol=1e-9, atol=1e-14)
    assert torch.equal(streamed.p_values, exact.p_values) and streamed.p_value == exact.p_value
    assert exact.p_value < 0.05  # networks A against B


def test_mmd_dispatch_refusals(files):
    coll = ps.collections.from_files(files / "*.pt", SPEC)
    with pytest.raises(TypeError, match="both be Collections"):
        ps.diagnostics.mmd(coll[:8], stacked(coll[8:]))
    with pytest.raises(ValueError, match=r"symmetry_aware.*align\('barycenter'"):
        ps.diagnostics.mmd(coll[:8], coll[8:], symmetry_aware=True, spec=SPEC)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['num_feature'\\]"):
        ps.diagnostics.mmd(coll[:8], coll[8:], num_feature=10)
    with pytest.raises(TypeError, match="apply to Collections only"):
        ps.diagnostics.mmd(torch.randn(5, 3), torch.randn(5, 3), method="streamed")


# ---------------------------------------------------------------------- permutation test, streamed
@pytest.mark.parametrize("method", ["streamed", "random_features"])
def test_streamed_permutation_test_is_valid_under_the_null(method):
    """Permutation p-values of exchangeable samples are super-uniform whatever the statistic:
    over 40 null data sets the rate of p <= 0.1 stays within 4 standard errors of 0.1."""
    gen = torch.Generator().manual_seed(11)
    centre = _network(gen)
    rejections, trials = 0, 40
    for t in range(trials):
        runs = [_network(gen, centre, noise=1.0) for _ in range(12)]
        coll = ps.collections.from_runs(runs, SPEC)
        res = ps.diagnostics.mmd(coll[:6], coll[6:], method=method, num_permutations=49, seed=t, num_features=64)
        assert 0.0 < res.p_value <= 1.0
        rejections += res.p_value <= 0.1
    se = (0.1 * 0.9 / trials) ** 0.5
    assert rejections / trials <= 0.1 + 4 * se, rejections


def test_streamed_permutation_test_has_power(files):
    coll = ps.collections.from_files(files / "*.pt", SPEC)
    for method in ("streamed", "random_features"):
        res = ps.diagnostics.mmd(coll[:8], coll[8:], method=method, num_permutations=199, num_features=512)
        assert res.p_value <= 0.01, method  # two distinct networks: the smallest p-value is 1/200


# ---------------------------------------------------------------------- the files Pyro users save
def _train_and_save(path, guide_cls, seed: int) -> dict[str, torch.Tensor]:
    """A few SVI steps of a BNN with ``guide_cls``, saved as ``torch.save(store.get_state())``;
    returns the guide's (constrained) site values as the guide reads them."""
    with isolated():
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        model = ps.models.BayesianMLP(4, [6, 5], 3, activation="relu")
        guide = guide_cls(model)
        x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
        for _ in range(3):
            svi.step(x, y)
        torch.save(pyro.get_param_store().get_state(), path)
        if guide_cls is AutoDelta:
            return {k: v.detach().clone() for k, v in guide.median().items()}
        return {k: tuple(t.detach().clone() for t in v) for k, v in ps.gaussian_params(guide).items()}


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDelta])
def test_param_store_state_files_of_a_guide(tmp_path, guide_cls):
    before = snapshot()
    want = [_train_and_save(tmp_path / f"guide_{i}.pt", guide_cls, seed=i) for i in range(3)]
    assert not snapshot().diff(before)
    spec = ps.models.BayesianMLP(4, [6, 5], 3, activation="relu").spec
    coll = ps.collections.from_files(tmp_path / "guide_*.pt", spec)
    assert coll.gaussian == (guide_cls is AutoNormal)
    for i, w in enumerate(want):
        ck = coll[i]
        for site, value in w.items():
            if coll.gaussian:
                assert torch.equal(ck.params[site], value[0]) and torch.equal(ck.scales[site], value[1]), site
            else:
                assert torch.equal(ck.params[site], value), site
    summary = coll.align(0, tmp_path / "aligned", progress=False)
    assert (summary.processed, summary.failed) == (3, 0)
    method = "wasserstein" if coll.gaussian else "weights"
    for i in range(3):
        ref = ps.align(coll[0].posterior, coll[i].posterior, spec, method=method, seed=0).aligned
        got = ps.collections.from_files(summary.outputs[i], spec)[0].posterior
        for site in spec.sites:
            if coll.gaussian:
                assert torch.equal(got[site][0], ref[site][0]) and torch.equal(got[site][1], ref[site][1])
            else:
                assert torch.equal(got[site], ref[site])


def test_param_store_of_another_guide_is_reported_by_name(tmp_path):
    torch.save({"params": {"AutoDiagonalNormal.loc": torch.zeros(3)}, "constraints": {}}, tmp_path / "diag.pt")
    with pytest.raises(ps.collections.CheckpointError, match=r"diag\.pt.*AutoDiagonalNormal"):
        ps.collections.from_files(tmp_path / "diag.pt", SPEC)[0]


def test_safetensors_and_torch_files_give_one_collection(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    gen = torch.Generator().manual_seed(2)
    nets = [_network(gen) for _ in range(4)]
    for i, net in enumerate(nets):
        st.save_file({k: v.contiguous() for k, v in net.items()}, str(tmp_path / f"m{i}.safetensors"))
        torch.save(net, tmp_path / f"m{i}.pt")
    a = ps.collections.from_files(tmp_path / "*.safetensors", SPEC)
    b = ps.collections.from_files(tmp_path / "*.pt", SPEC)
    assert a.dtype == torch.float64 and len(a) == 4
    for i in range(4):
        for s in SPEC.sites:
            assert torch.equal(a[i].params[s], b[i].params[s])
    # safetensors stores the sites sorted by name: compare in one site order
    ra = ps.diagnostics.mmd(a[:2], a[2:], num_permutations=20, sites=SPEC.sites)
    rb = ps.diagnostics.mmd(b[:2], b[2:], num_permutations=20, sites=SPEC.sites)
    assert torch.equal(ra.mmd2_grid, rb.mmd2_grid)


def test_an_output_directory_reads_back_without_its_reference(tmp_path):
    gen = torch.Generator().manual_seed(4)
    centre = _network(gen)
    for i in range(4):
        torch.save(_network(gen, centre), tmp_path / f"m{i}.pt")
    coll = ps.collections.from_files(tmp_path / "m*.pt", SPEC)
    summary = coll.align("barycenter", tmp_path / "aligned", progress=False)
    assert (tmp_path / "aligned" / "_reference.pt").exists()
    for again in (tmp_path / "aligned", tmp_path / "aligned" / "*.pt"):  # a directory or a pattern
        back = ps.collections.from_files(again, SPEC)
        assert back.names == list(summary.outputs)  # the barycenter is not mixed in
    explicit = ps.collections.from_files([tmp_path / "aligned" / "_reference.pt"], SPEC)
    assert len(explicit) == 1  # named explicitly: read as given


def test_a_corrupt_file_is_named_by_the_generic_entry_points(files, tmp_path):
    for p in sorted(files.glob("*.pt")):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    data = (tmp_path / "run2_1.pt").read_bytes()
    (tmp_path / "run2_1.pt").write_bytes(data[: len(data) // 2])
    coll = ps.collections.from_files(tmp_path / "*.pt", SPEC)
    for method in ("memory", "streamed", "random_features"):
        with pytest.raises(ps.collections.CheckpointError, match=r"run2_1\.pt.*(corrupt|truncated)"):
            ps.diagnostics.mmd(coll[:8], coll[8:], method=method, num_permutations=10)
    tree = ps.diagnostics.to_inference_data(coll, chains=4)  # lazy: nothing read yet
    with pytest.raises(ps.collections.CheckpointError, match=r"run2_1\.pt"):
        tree["posterior"]["fc1.bias"].values
    skipping = ps.collections.from_files(tmp_path / "*.pt", SPEC, on_error="skip")
    with pytest.warns(UserWarning, match=r"run2_1\.pt"):
        res = ps.diagnostics.mmd(skipping[:8], skipping[8:], method="streamed", num_permutations=10)
    good = ps.collections.from_files([p for p in sorted(tmp_path.glob("*.pt")) if p.name != "run2_1.pt"], SPEC)
    want = ps.diagnostics.mmd(good[:8], good[8:], method="streamed", num_permutations=10)
    assert torch.equal(res.mmd2_grid, want.mmd2_grid) and res.p_value == want.p_value  # 8 against 7
