"""Quickstart: a Bayesian MLP on scikit-learn's digits and its symmetry group.

Trains ``ps.models.BayesianMLP`` with Pyro's ``AutoNormal`` and ``Trace_ELBO``, prints
the size of the network's permutation group ``log|G|``, and checks that a random group
element applied to the posterior (a push-forward ``g#q``) leaves the predictions
unchanged.

    python examples/quickstart.py            # about 20 s on 2 CPU cores
    python examples/quickstart.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import math

import pyro
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import trange

import pyro_symmetry as ps


def load_data(seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    as_t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return as_t(x_tr, torch.float32), as_t(y_tr, torch.long), as_t(x_te, torch.float32), as_t(y_te, torch.long)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 32], help="hidden widths")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="a short run (a few seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="unused: the quickstart writes no files")
    args = parser.parse_args(argv)
    steps = 200 if args.quick else args.steps

    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    x_tr, y_tr, x_te, y_te = load_data(args.seed)
    model = ps.models.BayesianMLP(64, args.hidden, 10, activation="relu", prior_scale=1.0)
    guide = AutoNormal(model, init_scale=0.05)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2}), Trace_ELBO())
    bar = trange(steps, desc="SVI", leave=False)
    for _ in bar:
        loss = svi.step(x_tr, y_tr)
        bar.set_postfix(elbo=f"{-loss:.1f}", refresh=False)

    spec = model.spec
    print(f"network            : 64 -> {' -> '.join(map(str, args.hidden))} -> 10, ReLU")
    print(f"symmetry group     : {spec}")
    print(
        f"log|G|             : {spec.log_order:.2f}  (= sum_l lgamma(n_l + 1) = "
        f"{sum(math.lgamma(n + 1) for n in args.hidden):.2f}; |G| ~ 10^{spec.log_order / math.log(10):.0f})"
    )
    print(f"final ELBO         : {-loss:.1f}")

    # Predictions of q and of g#q, with the same random numbers, must agree.
    perm = spec.sample(generator=torch.Generator().manual_seed(args.seed))
    moved = ps.pushforward_guide(guide, spec, perm)
    pyro.set_rng_seed(1)
    probs_q = Predictive(model, guide=guide, num_samples=100, return_sites=["_RETURN"])(x_te)["_RETURN"].softmax(-1)
    pyro.set_rng_seed(1)
    probs_g = Predictive(model, guide=moved, num_samples=100, return_sites=["_RETURN"])(x_te)["_RETURN"].softmax(-1)
    mean_q, mean_g = probs_q.mean(0), probs_g.mean(0)
    acc = (mean_q.argmax(-1) == y_te).float().mean().item()
    diff = (mean_q - mean_g).abs().max().item()
    w = guide.median()
    w_moved = spec.apply(w, perm)
    weights_moved = max((w[k] - w_moved[k]).abs().max().item() for k in spec.sites)
    print(f"test accuracy      : {acc:.3f}")
    print(f"random g           : moves the posterior means by up to {weights_moved:.3f}")
    print(f"max |p_q - p_g#q|  : {diff:.2e}  (predictions unchanged: {diff < 1e-5})")
    if diff >= 1e-5:
        raise SystemExit("predictions changed under a group element: this is a bug")
    return {"log_order": spec.log_order, "accuracy": acc, "max_diff": diff}


if __name__ == "__main__":
    main()
