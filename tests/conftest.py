"""Shared fixtures and the Hypothesis profiles.

CI runs the ``ci`` profile (the default): no deadline, derandomized, so every run
draws the same examples. ``explore`` (``tox -e explore``, or
``HYPOTHESIS_PROFILE=explore``) draws fresh random examples, 500 per property: run it
before resolving an issue. ``dev`` is a quicker random profile for local work.

``global_state_unchanged`` checks that the library leaves the caller's global state
(torch/numpy/Python RNGs, thread count, default dtype, Pyro's param store) as it found it.
"""

import contextlib
import os

import pyro
import pytest
import torch
from hypothesis import HealthCheck, settings

from pyro_symmetry._state import GlobalState, snapshot

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.register_profile(
    "explore",
    deadline=None,
    derandomize=False,
    max_examples=500,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "changes_global_state(*fields): fields of pyro_symmetry._state.GlobalState the test's own code "
        "changes (global_state_unchanged does not hold the library to them around the whole test)",
    )


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts with an empty param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture
def digits_small():
    """A small standardized slice of scikit-learn's digits (ships with sklearn)."""
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x[:200], dtype=torch.float32) / 16.0
    y = torch.tensor(y[:200])
    return x, y


def _state_change(before, after, what, allowed=()):
    changed = [f for f in before.diff(after) if f not in allowed]
    assert not changed, f"{what} changed the global state: {changed}"


@pytest.fixture
def global_state_unchanged(request, monkeypatch):
    """Fail a test when the library changes the global state (:func:`pyro_symmetry._state.snapshot`).

    Two checks:

    * the whole test leaves it alone, except the fields named by
      ``@pytest.mark.changes_global_state(field, ...)``: what the *test's own code* changes
      legitimately, e.g. ``"param_store"`` when the test fits a guide (a guide creates its
      parameters when the user calls it) and ``"torch_rng"`` when it calls a guide (its
      set-up traces the model, and it draws ``w ~ q``);
    * every ``with pytest.raises(...)`` block of the test, i.e. the library call that is
      expected to fail, leaves all of it alone except the marked RNGs (a user's guide call
      in the block may draw): in particular a failing call leaves no parameters behind,
      whatever the marker says.
    """
    raises = pytest.raises

    marker = request.node.get_closest_marker("changes_global_state")
    allowed = set(marker.args) if marker else set()
    unknown = allowed - set(GlobalState.__dataclass_fields__)
    assert not unknown, f"changes_global_state names unknown fields {sorted(unknown)}"
    allowed_in_raises = allowed & {"torch_rng", "numpy_rng", "python_rng"}

    @contextlib.contextmanager
    def checked_block(args, kwargs):
        before = snapshot()
        with raises(*args, **kwargs) as info:
            yield info
        _state_change(before, snapshot(), f"a call expected to raise {args[0]}", allowed_in_raises)

    def checked_raises(*args, **kwargs):
        if len(args) > 1:  # pytest.raises(Error, fn, *fn_args): a call, not a block
            with checked_block(args[:1], kwargs) as info:
                args[1](*args[2:])
            return info
        return checked_block(args, kwargs)

    monkeypatch.setattr(pytest, "raises", checked_raises)
    before = snapshot()
    yield
    _state_change(before, snapshot(), "the test (mark it changes_global_state if its own code does)", allowed)
