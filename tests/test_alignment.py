"""align: planted recovery (MLP and CNN with BatchNorm), monotone objective, function
preservation, identity, equivariance, sign flips, self-coupled groups, input errors."""

import copy
import math
import pickle

import pyro
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from strategies import group_element, mlp_architectures, mlp_params, seeds
from torch import nn

import pyro_symmetry as ps
from pyro_symmetry.alignment import core
from pyro_symmetry.models import BayesianMLP

symmetries = st.sampled_from(["none", "sign", "scale"])
methods = st.sampled_from(["weights", "wasserstein"])


# ---------------------------------------------------------------------------- helpers
def _mlp(arch, sym):
    n_in, hidden, n_out = arch
    sizes = [n_in, *hidden, n_out]
    spec = ps.mlp_spec([f"fc{i + 1}" for i in range(len(sizes) - 1)], hidden, activation_symmetry=sym)
    return sizes, spec


def _gaussian(sizes, seed, dtype=torch.float64):
    mu = mlp_params(sizes, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 7)
    sd = {k: 0.5 + torch.rand(v.shape, generator=g, dtype=dtype) for k, v in mu.items()}
    return mu, sd


def _act(spec, mu, sd, perm):
    """``g.N(mu, sd^2)`` as a mapping of (loc, scale) pairs."""
    loc = spec.apply(mu, perm)
    scale = spec.apply(sd, {k: ps.decode_signed(p)[0] for k, p in perm.items()})
    return {k: (loc[k], scale[k]) for k in mu}


def _separation(spec, mu, sd=None):
    """``min_{h != e} ||w - h.w||`` lower bound: the closest pair of incoming rows over
    groups (the first group where ``h`` differs moves at least one such row).

    A width-1 group without sign flips has no element but the identity and adds no pair;
    ``inf`` if no group has another element (then any noise keeps the identity optimal)."""
    best = float("inf")

    def rows(params, grp):
        nd = {a.site: spec.site_moves(a.site)[0] for a in grp.incoming}
        blocks = [params[a.site].movedim(a.axis % nd[a.site], 0).reshape(grp.size, -1) for a in grp.incoming]
        return torch.cat(blocks, -1)

    for grp in spec.groups.values():
        n = grp.size
        m = rows(mu, grp)
        s = rows(sd, grp) if sd is not None else torch.zeros(n, 0, dtype=m.dtype)
        d_same = torch.cdist(m, m) ** 2 + torch.cdist(s, s) ** 2
        if n > 1:  # matching i to j != i
            d_same.fill_diagonal_(float("inf"))
            best = min(best, float(d_same.min()))
        if grp.signed:  # matching i to -j (and i to -i)
            d_flip = torch.cdist(m, -m) ** 2 + torch.cdist(s, s) ** 2
            best = min(best, float(d_flip.min()))
    return best**0.5


def _noise_norm(separation):
    """A noise norm well below half the separation (any norm when ``G`` is trivial)."""
    return 0.1 * separation if math.isfinite(separation) else 0.1


def _noise_like(params, norm, seed):
    g = torch.Generator().manual_seed(seed)
    eps = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    total = sum(float(e.pow(2).sum()) for e in eps.values()) ** 0.5
    return {k: e * (norm / total) for k, e in eps.items()}


def _equal_perm(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _direct_cost(q0, q1):
    """``||mu0 - mu1||^2 + ||s0 - s1||^2`` (or point distance) in float64."""
    total = 0.0
    for k in q0:
        a, b = q0[k], q1[k]
        if isinstance(a, tuple):
            total += float((a[0].double() - b[0].double()).pow(2).sum() + (a[1].double() - b[1].double()).pow(2).sum())
        else:
            total += float((a.double() - b.double()).pow(2).sum())
    return total


@given(
    hidden=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    sym=symmetries,
    wass=st.booleans(),
    seed=seeds,
)
def test_separation_is_a_lower_bound_on_the_orbit_distance(hidden, sym, wass, seed):
    """The noise scale of the planted tests: ``_separation(w) <= min_{h != e} ||w - h.w||``
    by enumeration (``inf`` exactly when ``G`` is trivial, e.g. all widths 1 without signs)."""
    sizes, spec = _mlp((2, tuple(hidden), 2), sym)
    mu, sd = _gaussian(sizes, seed)
    elements = spec.elements()

    def sq(moved, w):  # per element; sites no group moves stay unbatched (and add 0)
        return sum(
            (moved[k] - w[k]).pow(2).reshape(moved[k].shape[: moved[k].dim() - w[k].dim()] + (-1,)).sum(-1) for k in w
        )

    dist = sq(spec.apply(mu, elements), mu) + torch.zeros(spec.order, dtype=torch.float64)
    if wass:
        dist = dist + sq(spec.apply(sd, {k: ps.decode_signed(p)[0] for k, p in elements.items()}), sd)
    others = dist[1:]  # elements() starts with the identity
    assert float(dist[0]) == 0.0
    delta = _separation(spec, mu, sd if wass else None)
    if spec.order == 1:
        assert delta == math.inf and math.isfinite(_noise_norm(delta))
    else:
        assert delta <= float(others.min()) ** 0.5 * (1 + 1e-12)
        assert _noise_norm(delta) < delta / 2


# ---------------------------------------------------------------------------- planted recovery
@example(arch=(1, (1,), 1), sym="none", method="weights", seed=0, noisy=True)  # trivial G: no finite separation
@example(arch=(2, (1, 1), 3), sym="scale", method="wasserstein", seed=3, noisy=True)
@given(arch=mlp_architectures(), sym=symmetries, method=methods, seed=seeds, noisy=st.booleans())
def test_planted_permutation_recovered_mlp(arch, sym, method, seed, noisy):
    """``q1 = g.q0 (+ noise below half the separation)`` gives back exactly ``g^{-1}``."""
    sizes, spec = _mlp(arch, sym)
    mu, sd = _gaussian(sizes, seed)
    g = group_element(spec, seed)
    wass = method == "wasserstein"
    q0 = {k: (mu[k], sd[k]) for k in mu} if wass else mu
    q1 = _act(spec, mu, sd, g) if wass else spec.apply(mu, g)
    if noisy:
        eps = _noise_like(mu, _noise_norm(_separation(spec, mu, sd if wass else None)), seed + 1)
        # |sd + e| stays >= 0 and moves no farther than e does.
        q1 = {k: (v[0] + eps[k], v[1]) for k, v in q1.items()} if wass else {k: v + eps[k] for k, v in q1.items()}
    res = ps.align(q0, q1, spec, method=method, seed=seed)
    assert _equal_perm(res.permutation, spec.inverse(g))
    assert res.converged and res.sweeps == len(res.objective) - 1
    if not noisy:
        assert res.objective[-1] == pytest.approx(0.0, abs=1e-18)


def _cnn(channels, act, n_out, seed):
    layers, c_in = [], 2
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), act()]
        c_in = c
    net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * 9, n_out))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            if t.dtype.is_floating_point:
                new = torch.randn(t.shape, generator=g)
                t.copy_(new.abs() + 0.5 if name.endswith("running_var") else new)
    return net.eval().double()


@example(channels=[2, 1], act=nn.Tanh, seed=0, noisy=False)  # passive conv rows: flipped by mistake
@given(
    channels=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    act=st.sampled_from([nn.ReLU, nn.Tanh]),
    seed=seeds,
    noisy=st.booleans(),
)
def test_planted_permutation_recovered_cnn_with_batchnorm(channels, act, seed, noisy):
    """Conv kernels, biases, BatchNorm weights/biases/running stats and flattened
    blocks all enter the similarity; state-dict tensors are the point params."""
    net = _cnn(channels, act, 3, seed)
    spec = ps.PermutationSpec.from_module(net)
    w0 = dict(net.state_dict())
    g = group_element(spec, seed)
    w1 = spec.apply(w0, g)
    if noisy:
        floats = {k: v for k, v in w1.items() if v.is_floating_point()}
        eps = _noise_like(floats, _noise_norm(_separation(spec, w0)), seed + 1)
        w1 = {k: v + eps[k] if k in eps else v for k, v in w1.items()}
    res = ps.align(w0, w1, spec, method="weights", seed=seed)
    assert _equal_perm(res.permutation, spec.inverse(g))
    assert res.objective[-1] == pytest.approx(_direct_cost(w0, res.aligned), rel=1e-9, abs=1e-12)
    # The aligned state dict is a network computing what the target computes.
    net1, net_al = copy.deepcopy(net), copy.deepcopy(net)
    net1.load_state_dict(w1)
    net_al.load_state_dict(res.aligned)
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(net_al(x), net1(x), atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------- objective
@given(arch=mlp_architectures(), sym=symmetries, method=methods, seed=seeds, f32=st.booleans())
def test_objective_never_increases_and_matches_the_cost(arch, sym, method, seed, f32):
    sizes, spec = _mlp(arch, sym)
    dtype = torch.float32 if f32 else torch.float64
    mu0, sd0 = _gaussian(sizes, seed, dtype)
    mu1, sd1 = _gaussian(sizes, seed + 1, dtype)
    wass = method == "wasserstein"
    q0 = {k: (mu0[k], sd0[k]) for k in mu0} if wass else mu0
    q1 = {k: (mu1[k], sd1[k]) for k in mu1} if wass else mu1
    for init in ("greedy", "identity"):
        res = ps.align(q0, q1, spec, method=method, seed=seed, init=init)
        obj = res.objective
        assert all(b <= a for a, b in zip(obj, obj[1:]))
        assert len(obj) == res.sweeps + 1 and res.converged
        # The recorded cost is the actual distance between q0 and g.q1.
        assert obj[-1] == pytest.approx(_direct_cost(q0, res.aligned), rel=1e-5 if f32 else 1e-10)
        if init == "identity":
            assert obj[0] == pytest.approx(_direct_cost(q0, q1), rel=1e-5 if f32 else 1e-10)
        al = res.aligned["fc1.weight"]
        assert (al[0] if wass else al).dtype == dtype


def test_descent_ends_at_a_coordinatewise_optimum_checked_by_enumeration():
    """On 3-3-3-1 tanh MLPs (|G| = 48^2), the final element beats every element that
    differs from it in one group only, and no element of G beats the recorded cost."""
    sizes, spec = _mlp((3, (3, 3), 1), "sign")
    elements = spec.elements()
    for seed in range(6):
        mu0, mu1 = mlp_params(sizes, seed=seed), mlp_params(sizes, seed=seed + 100)
        res = ps.align(mu0, mu1, spec, method="weights", seed=seed)
        moved = spec.apply(mu1, elements)
        sq = {k: (mu0[k] - moved[k]).pow(2) for k in mu0}
        costs = sum(d.reshape(d.shape[: d.dim() - mu0[k].dim()] + (-1,)).sum(-1) for k, d in sq.items())
        assert res.objective[-1] >= float(costs.min()) - 1e-9
        for g in spec.groups:
            same_others = torch.ones(len(costs), dtype=torch.bool)
            for h in spec.groups:
                if h != g:
                    same_others &= (elements[h] == res.permutation[h]).all(-1)
            assert int(same_others.sum()) == 48
            assert float(costs[same_others].min()) >= res.objective[-1] - 1e-9


# ---------------------------------------------------------------------------- invariances
@given(arch=mlp_architectures(), act=st.sampled_from(["tanh", "relu"]), seed=seeds)
def test_aligned_network_computes_what_q1_computes(arch, act, seed):
    n_in, hidden, n_out = arch
    model = BayesianMLP(n_in, hidden, n_out, activation=act)
    sizes = model.sizes
    mu0, sd0 = _gaussian(sizes, seed)
    mu1, sd1 = _gaussian(sizes, seed + 1)
    q0 = {k: (mu0[k], sd0[k]) for k in mu0}
    q1 = {k: (mu1[k], sd1[k]) for k in mu1}
    res = ps.align(q0, q1, model.spec, seed=seed)
    x = torch.randn(6, n_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    aligned_means = {k: v[0] for k, v in res.aligned.items()}
    assert torch.allclose(model.functional(aligned_means, x), model.functional(mu1, x), atol=1e-10)
    # standard deviations move with the permutation and never change sign
    assert all(bool((v[1] > 0).all()) for v in res.aligned.values())


@given(arch=mlp_architectures(), sym=symmetries, method=methods, seed=seeds)
def test_align_with_itself_is_the_identity(arch, sym, method, seed):
    sizes, spec = _mlp(arch, sym)
    mu, sd = _gaussian(sizes, seed)
    q = {k: (mu[k], sd[k]) for k in mu} if method == "wasserstein" else mu
    res = ps.align(q, q, spec, method=method, seed=seed)
    assert _equal_perm(res.permutation, spec.identity())
    assert res.objective == [0.0, 0.0] and res.converged


@example(arch=(1, (3, 3), 2), sym="none", method="weights", seed=8)  # the identity start broke it
@given(arch=mlp_architectures(), sym=symmetries, method=methods, seed=seeds)
def test_alignment_is_equivariant(arch, sym, method, seed):
    """``align(q0, h.q1)`` returns ``g h^{-1}`` where ``g = align(q0, q1)``, with the same
    objective trajectory; the one exception is a descent from the greedy start that ends
    above the identity's cost, which is redone from the identity (a privileged element)."""
    sizes, spec = _mlp(arch, sym)
    mu0, sd0 = _gaussian(sizes, seed)
    mu1, sd1 = _gaussian(sizes, seed + 1)
    wass = method == "wasserstein"
    q0 = {k: (mu0[k], sd0[k]) for k in mu0} if wass else mu0
    ident = spec.identity()
    h = group_element(spec, seed + 2)
    q1 = _act(spec, mu1, sd1, ident) if wass else mu1
    q1h = _act(spec, mu1, sd1, h) if wass else spec.apply(mu1, h)
    fallbacks = []
    merge = getattr(core, "_merge", None)
    with pytest.MonkeyPatch.context() as mp:
        spy = lambda sol, sub, idx: fallbacks.append(len(idx)) or merge(sol, sub, idx)  # noqa: E731
        mp.setattr(core, "_merge", spy, raising=False)
        a = ps.align(q0, q1, spec, method=method, seed=seed)
        b = ps.align(q0, q1h, spec, method=method, seed=seed)
    for res, q in ((a, q1), (b, q1h)):
        assert res.objective[-1] <= _direct_cost(q0, q) * (1 + 1e-12)
    if not fallbacks:
        assert _equal_perm(b.permutation, spec.compose(a.permutation, spec.inverse(h)))
        assert b.objective == pytest.approx(a.objective, rel=1e-9, abs=1e-12)


def test_sign_flips_are_needed_for_tanh_and_can_be_disabled():
    sizes, spec = _mlp((4, (6, 5), 2), "sign")
    mu = mlp_params(sizes, seed=3)
    g = group_element(spec, 11)
    assert any(bool((p < 0).any()) for p in g.values())
    signed = ps.align(mu, spec.apply(mu, g), spec, method="weights", seed=0)
    plain = ps.align(mu, spec.apply(mu, g), spec, method="weights", seed=0, signs=False)
    assert signed.objective[-1] == pytest.approx(0.0, abs=1e-20)
    assert plain.objective[-1] > 1.0
    assert all(bool((p >= 0).all()) for p in plain.permutation.values())
    # plain permutations on a spec without sign symmetry never flip either
    unsigned = ps.align(mu, spec.apply(mu, g), spec.without_signs(), method="weights", seed=0)
    assert _equal_perm(unsigned.permutation, plain.permutation)


@given(n=st.integers(2, 6), seed=seeds)
def test_self_coupled_group_recovered_and_monotone(n, seed):
    """A group acting on both axes of one weight (a tied residual stream): the step is no
    longer linear, yet the objective never increases and a planted element is found."""
    spec = ps.PermutationSpec(
        {
            "h": ps.NeuronGroup(
                n,
                incoming=[("inp.weight", -2), ("mid.weight", -2)],
                outgoing=[("mid.weight", -1), ("out.weight", -1)],
            )
        },
        {"inp.weight": (n, 3), "mid.weight": (n, n), "out.weight": (2, n)},
    )
    gen = torch.Generator().manual_seed(seed)
    w = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in spec.shapes.items()}
    g = group_element(spec, seed)
    res = ps.align(w, spec.apply(w, g), spec, method="weights", seed=seed)
    assert _equal_perm(res.permutation, spec.inverse(g))
    other = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in spec.shapes.items()}
    res = ps.align(w, other, spec, method="weights", seed=seed, init="identity")
    assert all(b <= a for a, b in zip(res.objective, res.objective[1:]))
    assert res.objective[-1] == pytest.approx(_direct_cost(w, res.aligned), rel=1e-10)


def _passive_spec(n):
    """A signed group whose linear rows feed a norm layer: the rows are only permuted
    (passive); the norm's affine weight and bias carry the sign flips."""
    group = ps.NeuronGroup(
        n,
        incoming=[("norm.weight", -1), ("norm.bias", -1)],
        outgoing=[("out.weight", -1)],
        activation_symmetry="sign",
        passive=[("lin.weight", -2), ("lin.bias", -1)],
    )
    shapes = {"lin.weight": (n, 3), "lin.bias": (n,), "norm.weight": (n,), "norm.bias": (n,), "out.weight": (2, n)}
    return ps.PermutationSpec({"h": group}, shapes)


@given(n=st.integers(1, 6), seed=seeds, method=methods, init=st.sampled_from(["greedy", "identity"]))
def test_passive_axes_are_permuted_not_flipped(n, seed, method, init):
    """The engine reads which axes a sign flip negates from the spec's action: a planted
    signed element is recovered, and the recorded cost is the distance to ``g.q1`` as
    ``spec.apply`` computes it (flipping the passive rows too gave neither)."""
    spec = _passive_spec(n)
    gen = torch.Generator().manual_seed(seed)
    mu = {k: torch.randn(v, generator=gen, dtype=torch.float64) for k, v in spec.shapes.items()}
    sd = {k: 0.5 + torch.rand(v, generator=gen, dtype=torch.float64) for k, v in spec.shapes.items()}
    wass = method == "wasserstein"
    q0 = {k: (mu[k], sd[k]) for k in mu} if wass else mu
    g = group_element(spec, seed)
    q1 = _act(spec, mu, sd, g) if wass else spec.apply(mu, g)
    res = ps.align(q0, q1, spec, method=method, init=init, seed=seed)
    assert _equal_perm(res.permutation, spec.inverse(g)) and res.objective[-1] < 1e-20
    other = {k: torch.randn(v, generator=gen, dtype=torch.float64) for k, v in spec.shapes.items()}
    q2 = {k: (other[k], sd[k]) for k in mu} if wass else other
    res = ps.align(q0, q2, spec, method=method, init=init, seed=seed)
    assert res.objective[-1] == pytest.approx(_direct_cost(q0, res.aligned), rel=1e-10)
    # every element at once (6! * 2^6 = 46080 of them at n = 6): one batched apply, not a loop
    moved = _act(spec, other, sd, spec.elements()) if wass else spec.apply(other, spec.elements())
    costs = 0.0
    for k in q0:
        pairs = zip(q0[k], moved[k]) if wass else [(q0[k], moved[k])]
        for a, b in pairs:
            costs = costs + (a.double() - b.double()).pow(2).flatten(1).sum(1)
    best = float(costs.min())
    assert res.objective[-1] == pytest.approx(best, rel=1e-10)  # one group: one exact assignment


def test_groups_on_axis_slices_are_aligned():
    """A group on a slice of an axis (was refused): the entries outside the slice stay put and a
    planted permutation is recovered (nested groups: tests/test_alignment_real.py)."""
    spec = ps.PermutationSpec(
        {"q": ps.NeuronGroup(2, incoming=[("qkv.weight", -2, 1, None, 0)], outgoing=[("out.weight", -1)])},
        {"qkv.weight": (6, 3), "out.weight": (3, 2)},
    )
    w = {"qkv.weight": torch.randn(6, 3), "out.weight": torch.randn(3, 2)}
    planted = {"q": torch.tensor([1, 0])}
    res = ps.align(w, spec.apply(w, planted), spec, method="weights")
    assert _equal_perm(res.permutation, spec.inverse(planted))
    torch.testing.assert_close(res.aligned["qkv.weight"], w["qkv.weight"])


# ---------------------------------------------------------------------------- inputs and outputs
def _fit_guide(guide_cls, model, x, y, seed):
    pyro.set_rng_seed(seed)
    guide = guide_cls(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    for _ in range(3):
        svi.step(x, y)
    return guide


def test_fitted_guides_align_and_give_loc_scale_mappings():
    from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

    model = BayesianMLP(3, [4], 2, activation="tanh")
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    for cls in (AutoNormal, AutoDiagonalNormal):
        pyro.clear_param_store()
        guide = _fit_guide(cls, model, x, y, 0)
        res = ps.align(guide, guide, model.spec)
        gp = ps.gaussian_params(guide)
        assert _equal_perm(res.permutation, model.spec.identity())
        assert set(res.aligned) == set(gp)
        assert all(torch.equal(res.aligned[k][0], gp[k][0]) and torch.equal(res.aligned[k][1], gp[k][1]) for k in gp)
        # a planted element of the guide's posterior is recovered from the guide
        g = group_element(model.spec, 5)
        moved = _act(model.spec, {k: v[0] for k, v in gp.items()}, {k: v[1] for k, v in gp.items()}, g)
        res = ps.align(guide, moved, model.spec)
        assert _equal_perm(res.permutation, model.spec.inverse(g))


def test_init_mapping_warm_start_and_result_pickles():
    sizes, spec = _mlp((3, (4, 3), 2), "none")
    mu = mlp_params(sizes, seed=1)
    g = group_element(spec, 2)
    res = ps.align(mu, spec.apply(mu, g), spec, method="weights", init=spec.inverse(g), seed=0)
    assert res.sweeps == 1 and res.objective == [0.0, 0.0]
    back = pickle.loads(pickle.dumps(res))
    assert _equal_perm(back.permutation, res.permutation) and back.objective == res.objective


def test_bad_inputs_are_rejected_with_clear_errors():
    sizes, spec = _mlp((3, (4,), 2), "none")
    mu = mlp_params(sizes, seed=1)
    sd = {k: v.abs() for k, v in mu.items()}
    gauss = {k: (mu[k], sd[k]) for k in mu}
    with pytest.raises(ValueError, match="method must be one of"):
        ps.align(mu, mu, spec, method="sinkhorn")
    with pytest.raises(ValueError, match="q1 is a mapping of point tensors"):
        ps.align(gauss, mu, spec)
    with pytest.raises(ps.SpecError, match="fc2.weight"):
        ps.align(mu, {k: v for k, v in mu.items() if k != "fc2.weight"}, spec, method="weights")
    with pytest.raises(ps.SpecError, match="fc1.weight"):
        ps.align(mu, {**mu, "fc1.weight": torch.zeros(4, 5, dtype=torch.float64)}, spec, method="weights")
    with pytest.raises(ps.SpecError, match="q0"):
        ps.align([1, 2], mu, spec, method="weights")
    with pytest.raises(TypeError, match="PermutationSpec"):
        ps.align(mu, mu, {"fc1": 4}, method="weights")
    with pytest.raises(ValueError, match="max_sweeps"):
        ps.align(mu, mu, spec, method="weights", max_sweeps=-1)
    with pytest.raises(ValueError, match="init"):
        ps.align(mu, mu, spec, method="weights", init="random")
    with pytest.raises(TypeError, match=r"init\['fc1'\] must hold integer indices"):  # not truncated to [1, 0, 2, 3]
        ps.align(mu, mu, spec, method="weights", init={"fc1": torch.tensor([1.9, 0.2, 2.0, 3.0])})
