"""Checkpoint collections: formats, per-checkpoint transforms equal to the in-memory functions
bit for bit, resumption, corrupt files, bounded memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from memory import TrackedSource, peak_bytes
from strategies import dtypes, mlp_architectures, mlp_params, seeds

import pyro_symmetry as ps
from pyro_symmetry import collections as pc
from pyro_symmetry._state import snapshot
from pyro_symmetry.collections._formats import FileSource

SPEC = ps.mlp_spec(["fc1", "fc2", "fc3"], [6, 5], activation_symmetry="scale")


def _base(gen: torch.Generator, width: tuple[int, int] = (6, 5), inputs: int = 4) -> dict[str, torch.Tensor]:
    h1, h2 = width
    return {
        "fc1.weight": torch.randn(h1, inputs, generator=gen),
        "fc1.bias": torch.randn(h1, generator=gen),
        "fc2.weight": torch.randn(h2, h1, generator=gen),
        "fc2.bias": torch.randn(h2, generator=gen),
        "fc3.weight": torch.randn(3, h2, generator=gen),
        "fc3.bias": torch.randn(3, generator=gen),
        "temperature": torch.tensor([1.5]),  # a floating site the spec does not touch
        "steps": torch.tensor(7),  # an integer buffer
    }


def write_planted(d: Path, n: int, noise: float = 0.01, seed: int = 0, spec=SPEC, **kw):
    """``n`` files ``ck_{i}.pt``: a planted permutation (and rescaling) of one base network plus noise."""
    gen = torch.Generator().manual_seed(seed)
    base = _base(gen, **kw)
    perms = []
    for i in range(n):
        p = spec.sample(generator=gen)
        moved = spec.apply(base, p)
        ck = {k: v + noise * torch.randn(v.shape, generator=gen) if k in spec.sites else v for k, v in moved.items()}
        torch.save(ck, d / f"ck_{i}.pt")
        perms.append(p)
    torch.save(base, d / "base.pt")
    return base, perms


def load(path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, tuple):
            assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]), k
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), k


# ---------------------------------------------------------------------- transforms = in-memory
def test_align_equals_ps_align_bit_for_bit_and_recovers_planted_permutations(tmp_path):
    base, perms = write_planted(tmp_path, 8)
    coll = pc.from_files(tmp_path / "ck_*.pt", SPEC)
    before = snapshot()
    summary = coll.align(tmp_path / "base.pt", tmp_path / "out", progress=False)
    assert not snapshot().diff(before)  # RNGs, threads, dtype, param store untouched
    assert (summary.processed, summary.skipped, summary.failed) == (8, 0, 0)
    records = {r["input"]: r for r in summary.records()}
    for i in range(8):
        ck = load(tmp_path / f"ck_{i}.pt")
        ref = ps.align(base, ck, SPEC, method="weights", seed=0)
        out = load(tmp_path / "out" / f"ck_{i}.pt")
        assert_same(out, ref.aligned)
        assert torch.equal(out["temperature"], ck["temperature"]) and torch.equal(out["steps"], ck["steps"])
        rec = records[str(tmp_path / f"ck_{i}.pt")]
        assert rec["status"] == "done" and rec["permutation"] == {g: p.tolist() for g, p in ref.permutation.items()}
        inverse = {g: torch.argsort(p).tolist() for g, p in perms[i].items()}
        assert rec["permutation"] == inverse  # the planted permutation, recovered exactly
    assert summary.outputs == tuple(str(tmp_path / "out" / f"ck_{i}.pt") for i in range(8))


@pytest.mark.parametrize("permutation", ["align", "sort", None])
def test_canonicalize_equals_ps_canonicalize_bit_for_bit(tmp_path, permutation):
    write_planted(tmp_path, 5, noise=0.1)
    coll = pc.from_files(tmp_path / "ck_*.pt", SPEC)
    summary = coll.canonicalize(tmp_path / "out", permutation=permutation, progress=False)
    ref = None
    if permutation == "align":
        # The default reference: the first checkpoint in canonical scaling, its neurons sorted.
        ref = load(tmp_path / "out" / "_reference.pt")
        first = ps.canonicalize(load(tmp_path / "ck_0.pt"), SPEC, permutation="sort").params
        assert_same(ref, first)
    for i in range(5):
        want = ps.canonicalize(load(tmp_path / f"ck_{i}.pt"), SPEC, permutation=permutation, reference=ref)
        assert_same(load(tmp_path / "out" / f"ck_{i}.pt"), want.params)
    assert summary.processed == 5


def test_map_and_from_runs(tmp_path):
    gen = torch.Generator().manual_seed(1)
    runs = [_base(gen) for _ in range(3)]
    coll = pc.from_runs(runs, SPEC)
    summary = coll.map(double_floats, tmp_path / "out", progress=False)
    for i, r in enumerate(runs):
        assert_same(load(tmp_path / "out" / f"run_{i:05d}.pt"), double_floats(r))
    assert summary.processed == 3
    again = summary.collection(SPEC)
    assert len(again) == 3 and torch.equal(again[1].params["fc1.weight"], 2 * runs[1]["fc1.weight"])


@settings(max_examples=10)
@given(mlp_architectures(), st.sampled_from(["none", "sign", "scale"]), dtypes, seeds)
def test_property_transforms_equal_the_in_memory_functions(arch, symmetry, dtype, seed):
    """Random architectures, activation symmetries and dtypes: every output is the in-memory result."""
    import tempfile

    n_in, hidden, n_out = arch
    sizes = [n_in, *hidden, n_out]
    spec = ps.mlp_spec([f"fc{i + 1}" for i in range(len(sizes) - 1)], list(hidden), activation_symmetry=symmetry)
    runs = [mlp_params(sizes, dtype=dtype, seed=seed + k) for k in range(3)]
    coll = pc.from_runs(runs, spec)
    with tempfile.TemporaryDirectory() as d:
        coll.align(0, Path(d) / "a", progress=False)
        coll.canonicalize(Path(d) / "c", permutation="sort", progress=False)
        for k, r in enumerate(runs):
            assert_same(
                load(Path(d) / "a" / f"run_{k:05d}.pt"), ps.align(runs[0], r, spec, method="weights", seed=0).aligned
            )
            want = ps.canonicalize(r, spec, permutation="sort").params
            assert_same(load(Path(d) / "c" / f"run_{k:05d}.pt"), want)


def double_floats(params):
    return {k: v * 2 if v.is_floating_point() else v for k, v in params.items()}


def _barycenter_in_memory(paths, spec, passes):
    """The streaming algorithm written as a plain loop over in-memory checkpoints."""
    cks = [load(p) for p in paths]
    ref, prev = cks[0], None
    for _ in range(passes):
        res = [ps.align(ref, ck, spec, method="weights", seed=0) for ck in cks]
        total = None
        for r in res:
            part = {k: v.double() for k, v in r.aligned.items() if v.is_floating_point()}
            total = part if total is None else {k: total[k] + part[k] for k in total}
        ref = {k: (total[k] / len(cks)).to(v.dtype) if k in total else v for k, v in cks[0].items()}
        perms = [{g: p.tolist() for g, p in r.permutation.items()} for r in res]
        if perms == prev:
            break
        prev = perms
    return ref


def test_streaming_barycenter_equals_the_in_memory_loop_and_align_to_it(tmp_path):
    write_planted(tmp_path, 6, noise=0.05)
    paths = [tmp_path / f"ck_{i}.pt" for i in range(6)]
    coll = pc.from_files(paths, SPEC)
    bary = coll.barycenter(progress=False)
    assert bary.converged and bary.passes == 2
    assert_same(bary.params, _barycenter_in_memory(paths, SPEC, 5))
    summary = coll.align("barycenter", tmp_path / "out", progress=False)
    assert_same(load(tmp_path / "out" / "_reference.pt"), bary.params)
    perms = []
    for i, p in enumerate(paths):
        want = ps.align(bary.params, load(p), SPEC, method="weights", seed=0)
        assert_same(load(tmp_path / "out" / f"ck_{i}.pt"), want.aligned)
    # Planted copies of one network all land on the same labelling of it.
    aligned = [load(o) for o in summary.outputs]
    for a in aligned[1:]:
        assert all(torch.allclose(a[k], aligned[0][k], atol=0.5) for k in SPEC.sites)
    del perms


def _fitted_runs(num: int) -> list:
    """AutoNormal guides of a small BNN with random locs, as ``ps.train_runs`` records them."""
    import pyro
    from pyro.infer.autoguide import AutoNormal, init_to_sample

    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    runs = []
    for i in range(num):
        pyro.set_rng_seed(i)
        model = ps.models.BayesianMLP(4, [6, 5], 3, activation="relu")
        with pyro.get_param_store().scope() as state:
            guide = AutoNormal(model, init_loc_fn=init_to_sample, init_scale=0.05 * (i + 1))
            guide(x, y)
        runs.append(ps.TrainedRun(guide, model, torch.zeros(1), i, state))
    return runs


def test_param_store_files_gaussian_collection(tmp_path):
    import pyro

    runs = _fitted_runs(3)
    spec = runs[0].model.spec
    store = pyro.get_param_store()
    for i, run in enumerate(runs):
        with store.scope(run.state):
            store.save(str(tmp_path / f"run{i}.pt"))
    coll = pc.from_files(tmp_path / "run*.pt", spec)
    assert coll.gaussian
    for i, run in enumerate(runs):
        want = ps.gaussian_params(run.guide)
        ck = coll[i]
        for k, (loc, scale) in want.items():
            assert torch.equal(ck.params[k], loc) and torch.equal(ck.scales[k], scale)
    same = pc.from_runs(runs, spec)
    assert all(torch.equal(same[1].scales[k], coll[1].scales[k]) for k in spec.sites)
    summary = coll.align(0, tmp_path / "out", method="wasserstein", progress=False)
    ref = coll[0].posterior
    for i in range(3):
        want = ps.align(ref, coll[i].posterior, spec, method="wasserstein", seed=0).aligned
        got = pc.from_files(summary.outputs[i], spec)[0]
        assert got.scales is not None
        assert_same(got.posterior, want)


def test_key_selects_or_renames(tmp_path):
    gen = torch.Generator().manual_seed(0)
    b = _base(gen)
    torch.save({"model": b, "optimizer": {"lr": 0.1}, "epoch": 3}, tmp_path / "a.pt")
    assert torch.equal(pc.from_files(tmp_path / "a.pt", SPEC, key="model")[0].params["fc1.weight"], b["fc1.weight"])
    with pytest.raises(pc.CheckpointError, match=r"a\.pt.*key="):
        pc.from_files(tmp_path / "a.pt", SPEC)[0]
    renamed = {f"net.{k}": v for k, v in b.items()}
    torch.save(renamed, tmp_path / "b.pt")
    strip = pc.from_files(tmp_path / "b.pt", SPEC, key=lambda n: n.removeprefix("net."))
    assert set(strip[0].params) == set(b)
    mapping = {f"net.{k}": k for k in SPEC.sites}
    kept = pc.from_files(tmp_path / "b.pt", SPEC, key=mapping)[0]
    assert "net.temperature" in kept.params and "fc2.bias" in kept.params


def test_safetensors_files(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    gen = torch.Generator().manual_seed(0)
    cks = [{k: v for k, v in _base(gen).items() if k != "steps"} for _ in range(3)]
    for i, ck in enumerate(cks):
        st.save_file(ck, str(tmp_path / f"m{i}.safetensors"))
    coll = pc.from_files(tmp_path / "*.safetensors", SPEC)
    summary = coll.align(0, tmp_path / "out", progress=False)
    cks = [st.load_file(str(tmp_path / f"m{i}.safetensors")) for i in range(3)]  # keys sorted by name
    for i, ck in enumerate(cks):
        assert_same(load(tmp_path / "out" / f"m{i}.pt"), ps.align(cks[0], ck, SPEC, method="weights", seed=0).aligned)
    assert summary.processed == 3


# ---------------------------------------------------------------------- resumption
class Interrupt:
    """A map function that is interrupted (KeyboardInterrupt) after ``k`` checkpoints."""

    def __init__(self, k: int) -> None:
        self.k, self.calls = k, 0

    def __call__(self, params):
        self.calls += 1
        if self.k is not None and self.calls > self.k:
            raise KeyboardInterrupt
        return double_floats(params)


def _done_records(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in (out / "_manifest.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "entry" and r["status"] == "done":
            counts[r["output"]] = counts.get(r["output"], 0) + 1
    return counts


def test_interrupted_map_resumes_without_redoing_or_losing(tmp_path):
    write_planted(tmp_path, 10)
    coll = pc.from_files(tmp_path / "ck_*.pt", SPEC)
    out = tmp_path / "out"
    fn = Interrupt(4)
    with pytest.raises(KeyboardInterrupt):
        coll.map(fn, out, progress=False)
    first = {p.name: p.stat() for p in out.glob("ck_*.pt")}
    assert len(first) == 4
    fn.k = None  # the same function (same call), no longer interrupted
    summary = coll.map(fn, out, progress=False)
    assert (summary.processed, summary.skipped, summary.failed) == (6, 4, 0)
    assert fn.calls == 5 + 6  # the 4 finished checkpoints were not recomputed
    for name, before in first.items():  # and not rewritten
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert _done_records(out) == {f"ck_{i}.pt": 1 for i in range(10)}  # nothing duplicated
    for i in range(10):
        assert_same(load(out / f"ck_{i}.pt"), double_floats(load(tmp_path / f"ck_{i}.pt")))
    assert not list(out.glob(".*.tmp"))


class InterruptingSource(FileSource):
    """Counts reads; the ``stop_at``-th read raises KeyboardInterrupt (Ctrl-C half-way)."""

    reads = 0
    stop_at: int | None = None

    def read(self, mmap: bool = False):
        cls = type(self)
        cls.reads += 1
        if cls.stop_at is not None and cls.reads == cls.stop_at:
            raise KeyboardInterrupt
        return super().read(mmap)


def test_interrupted_align_to_the_barycenter_resumes_half_way(tmp_path):
    """Ctrl-C after half of the checkpoints of ``align("barycenter")``: the re-run reuses the
    barycenter and the 5 finished outputs (not re-read, not rewritten), does the other 5, and
    its outputs are byte-identical to an uninterrupted call's."""
    write_planted(tmp_path, 10, noise=0.1)
    make = lambda: pc.Collection([InterruptingSource(str(tmp_path / f"ck_{i}.pt")) for i in range(10)], SPEC)  # noqa: E731
    InterruptingSource.reads, InterruptingSource.stop_at = 0, None
    clean = make().align("barycenter", tmp_path / "clean", max_iters=2, progress=False)
    total = InterruptingSource.reads  # signature + barycenter passes + 10 alignments
    out = tmp_path / "out"
    InterruptingSource.reads, InterruptingSource.stop_at = 0, total - 4  # reading the 6th checkpoint to align
    with pytest.raises(KeyboardInterrupt):
        make().align("barycenter", out, max_iters=2, progress=False)
    first = {p.name: p.stat() for p in out.glob("ck_*.pt")}
    assert sorted(first) == [f"ck_{i}.pt" for i in range(5)]
    InterruptingSource.reads, InterruptingSource.stop_at = 0, None
    summary = make().align("barycenter", out, max_iters=2, progress=False)
    assert (summary.processed, summary.skipped, summary.failed) == (5, 5, 0)
    assert InterruptingSource.reads == 1 + 5  # the signature, then only the unfinished checkpoints
    for name, before in first.items():
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert _done_records(out) == {f"ck_{i}.pt": 1 for i in range(10)}
    sha = lambda s: {r["output"]: r["sha256"] for r in s.records()}  # noqa: E731
    assert sha(summary) == sha(clean)
    assert (out / "_reference.pt").read_bytes() == (tmp_path / "clean" / "_reference.pt").read_bytes()
    assert not list(out.glob(".*.tmp"))


_KILLED = """
import sys, time, torch
import pyro_symmetry as ps
from pyro_symmetry import collections as pc
spec = ps.mlp_spec(["fc1", "fc2", "fc3"], [6, 5], activation_symmetry="scale")
def slow(params):
    time.sleep(0.15)
    return {k: v + 1 if v.is_floating_point() else v for k, v in params.items()}
slow.__qualname__ = "slow"
pc.from_files(sys.argv[1] + "/ck_*.pt", spec).map(slow, sys.argv[2], progress=False)
"""


def test_killed_run_resumes(tmp_path):
    write_planted(tmp_path, 24)
    out = tmp_path / "out"
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(_KILLED))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(out)])
    deadline = time.time() + 60
    while len(list(out.glob("ck_*.pt"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(out.glob("ck_*.pt")))
    assert 3 <= finished < 24

    def slow(params):
        return {k: v + 1 if v.is_floating_point() else v for k, v in params.items()}

    slow.__module__, slow.__qualname__ = "__main__", "slow"
    summary = pc.from_files(tmp_path / "ck_*.pt", SPEC).map(slow, out, progress=False)
    assert summary.skipped >= finished - 1 and summary.processed + summary.skipped == 24 and summary.failed == 0
    for i in range(24):
        assert_same(load(out / f"ck_{i}.pt"), slow(load(tmp_path / f"ck_{i}.pt")))
    assert not list(out.glob(".*.tmp"))


def test_changed_output_or_input_is_redone(tmp_path):
    write_planted(tmp_path, 4)
    coll = pc.from_files(tmp_path / "ck_*.pt", SPEC)
    out = tmp_path / "out"
    coll.map(double_floats, out, progress=False)
    torch.save({"tampered": torch.zeros(1)}, out / "ck_1.pt")
    ck = load(tmp_path / "ck_2.pt")
    ck["fc1.bias"] += 1
    time.sleep(0.01)
    torch.save(ck, tmp_path / "ck_2.pt")
    summary = coll.map(double_floats, out, progress=False)
    assert (summary.processed, summary.skipped) == (2, 2)
    assert_same(load(out / "ck_1.pt"), double_floats(load(tmp_path / "ck_1.pt")))
    assert_same(load(out / "ck_2.pt"), double_floats(ck))


def test_other_call_or_foreign_files_are_refused_and_untouched(tmp_path):
    base, _ = write_planted(tmp_path, 3)
    coll = pc.from_files(tmp_path / "ck_*.pt", SPEC)
    out = tmp_path / "out"
    coll.align(tmp_path / "base.pt", out, progress=False)
    with pytest.raises(ValueError, match="another call"):
        coll.align(tmp_path / "base.pt", out, seed=1, progress=False)
    with pytest.raises(ValueError, match="another call"):
        coll.map(double_floats, out, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "ck_1.pt").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="ck_1.pt"):
        coll.align(tmp_path / "base.pt", foreign, progress=False)
    assert (foreign / "ck_1.pt").read_bytes() == b"precious"
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "_manifest.jsonl").write_text("not ours\n")
    with pytest.raises(FileExistsError, match="not written by"):
        coll.align(tmp_path / "base.pt", tmp_path / "alien", progress=False)


# ---------------------------------------------------------------------- bad files
def test_corrupt_file_is_reported_by_name_and_the_others_are_kept(tmp_path):
    write_planted(tmp_path, 6)
    data = (tmp_path / "ck_3.pt").read_bytes()
    (tmp_path / "ck_3.pt").write_bytes(data[: len(data) // 2])  # truncated
    bad_shape = load(tmp_path / "ck_4.pt")
    bad_shape["fc3.bias"] = torch.zeros(4)
    torch.save(bad_shape, tmp_path / "ck_4.pt")
    nan = load(tmp_path / "ck_5.pt")
    nan["fc2.weight"][0, 0] = float("nan")
    torch.save(nan, tmp_path / "ck_5.pt")
    coll = pc.from_files(tmp_path / "ck_*.pt", SPEC)
    with pytest.raises(pc.CheckpointError, match=r"ck_3\.pt.*(corrupt|truncated)"):
        coll[3]
    with pytest.raises(pc.TransformError, match=r"3 checkpoint\(s\) failed.*ck_3\.pt") as info:
        coll.align(tmp_path / "base.pt", tmp_path / "out", progress=False)
    summary = info.value.summary
    assert (summary.processed, summary.failed) == (3, 3)
    assert set(summary.failures) == {str(tmp_path / f"ck_{i}.pt") for i in (3, 4, 5)}
    assert "fc3.bias" in summary.failures[str(tmp_path / "ck_4.pt")]
    assert "NaN" in summary.failures[str(tmp_path / "ck_5.pt")]
    assert sorted(p.name for p in (tmp_path / "out").glob("ck_*.pt")) == ["ck_0.pt", "ck_1.pt", "ck_2.pt"]
    skipping = pc.from_files(tmp_path / "ck_*.pt", SPEC, on_error="skip")
    with pytest.warns(UserWarning, match=r"ck_3\.pt"):
        names = [ck.name for ck in skipping]
    assert names == [str(tmp_path / f"ck_{i}.pt") for i in range(3)]
    assert set(skipping.errors) == set(summary.failures)
    summary2 = skipping.align(tmp_path / "base.pt", tmp_path / "out2", progress=False)
    assert (summary2.processed, summary2.failed) == (3, 3)


def test_first_file_corrupt(tmp_path):
    write_planted(tmp_path, 3)
    (tmp_path / "ck_0.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(pc.CheckpointError, match=r"ck_0\.pt"):
        pc.from_files(tmp_path / "ck_*.pt", SPEC).signature
    with pytest.warns(UserWarning, match=r"ck_0\.pt"):
        coll = pc.from_files(tmp_path / "ck_*.pt", SPEC, on_error="skip")
        assert coll.shapes["fc1.weight"] == (6, 4)
    with pytest.raises(ps.SpecError, match="fc1"):
        pc.from_files(tmp_path / "ck_1.pt", ps.mlp_spec(["fc1", "fc2", "fc3"], [7, 5])).signature


def test_bad_arguments(tmp_path):
    write_planted(tmp_path, 2)
    with pytest.raises(ValueError, match="matches no file"):
        pc.from_files(tmp_path / "nothing_*.pt", SPEC)
    with pytest.raises(ValueError, match="on_error"):
        pc.from_files(tmp_path / "ck_*.pt", SPEC, on_error="ignore")
    coll = pc.from_files(tmp_path / "ck_*.pt", SPEC)
    with pytest.raises(TypeError, match="submit"):
        coll.align(0, tmp_path / "o", executor=object(), progress=False)
    with pytest.raises(ValueError, match="wasserstein"):
        coll.align(0, tmp_path / "o2", method="wasserstein", progress=False)
    with pytest.raises(ValueError, match="reference is only used"):
        coll.canonicalize(tmp_path / "o3", permutation="sort", reference=0, progress=False)


# ---------------------------------------------------------------------- executors
def test_thread_pool_equals_in_process_and_a_failed_task_keeps_the_others(tmp_path):
    write_planted(tmp_path, 9)
    coll = pc.from_files(tmp_path / "ck_*.pt", SPEC)
    a = coll.align(tmp_path / "base.pt", tmp_path / "a", progress=False)
    with ThreadPoolExecutor(2) as ex:
        b = coll.align(tmp_path / "base.pt", tmp_path / "b", executor=ex, batch_size=2, progress=False)
    sha = lambda s: {r["output"]: r["sha256"] for r in s.records()}  # noqa: E731
    assert sha(a) == sha(b) and len(sha(a)) == 9

    class Flaky:
        """Runs tasks in-process; the second task's future fails (a lost worker)."""

        def __init__(self):
            self.n = 0

        def submit(self, fn, *args):
            self.n += 1
            fut = Future()
            if self.n == 2:
                fut.set_exception(RuntimeError("worker lost"))
            else:
                fut.set_result(fn(*args))
            return fut

    with pytest.raises(pc.TransformError, match="worker lost") as info:
        coll.align(tmp_path / "base.pt", tmp_path / "c", executor=Flaky(), batch_size=3, progress=False)
    s = info.value.summary
    assert (s.processed, s.failed) == (6, 3)
    again = coll.align(tmp_path / "base.pt", tmp_path / "c", executor=Flaky(), batch_size=3, progress=False)
    assert (again.processed, again.skipped, again.failed) == (3, 6, 0)


# ---------------------------------------------------------------------- memory
@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """16 checkpoints of ~0.26 MB read through :class:`TrackedSource` (4 MB in all)."""
    d = tmp_path_factory.mktemp("big")
    spec = ps.mlp_spec(["fc1", "fc2", "fc3"], [32, 16], activation_symmetry="scale")
    write_planted(d, 16, spec=spec, width=(32, 16), inputs=2000)
    size = sum(v.numel() * v.element_size() for v in load(d / "ck_0.pt").values())
    coll = pc.Collection([TrackedSource(str(d / f"ck_{i}.pt")) for i in range(16)], spec)
    return d, coll, size


def test_memory_of_transforms_stays_bounded(big):
    d, coll, size = big
    budget = 5 * size  # a few checkpoints at a time; the collection holds 16 (6 for the barycenter)
    run = lambda c, out: lambda: c.map(double_floats, d / out, progress=False)  # noqa: E731
    assert peak_bytes(run(coll, "all"), run(coll[:2], "warm")) < budget
    align = lambda c, out: lambda: c.align(0, d / out, progress=False)  # noqa: E731
    assert peak_bytes(align(coll, "aligned"), align(coll[:2], "warm_align")) < budget
    canon = lambda c, out: lambda: c.canonicalize(d / out, permutation="sort", progress=False)  # noqa: E731
    assert peak_bytes(canon(coll, "canonical"), canon(coll[:2], "warm_canon")) < budget
    bary = lambda c: lambda: c.barycenter(progress=False, max_iters=1)  # noqa: E731
    assert peak_bytes(bary(coll[:6]), bary(coll[:2])) < budget


def test_memory_of_streamed_diagnostics_stays_bounded(big):
    from pyro_symmetry.diagnostics import collections as dc

    d, coll, size = big
    budget = 5 * size
    small = ["fc2.weight", "fc3.weight", "fc3.bias"]  # every file is still read whole by TrackedSource
    rhat = lambda c: lambda: dc.rhat_ess(c, chains=2, var_names=small, max_bytes=size)  # noqa: E731
    assert peak_bytes(rhat(coll), rhat(coll[:8])) < budget
    half = lambda c: (c[: len(c) // 2], c[len(c) // 2 :])  # noqa: E731
    mmd = lambda c: lambda: dc.mmd(*half(c), sites=small, method="streamed", max_bytes=size)  # noqa: E731
    assert peak_bytes(mmd(coll), mmd(coll[:4])) < budget

    def tree(c):  # the dask-backed tree, block by block
        return lambda: dc.rhat_ess(ps.diagnostics.to_inference_data(c, chains=2), var_names=small, max_bytes=size)

    assert peak_bytes(tree(coll), tree(coll[:8])) < budget

    def rff(c):
        kw = {"sites": small, "method": "random_features", "max_bytes": size, "num_features": 256}
        return lambda: ps.diagnostics.mmd(*half(c), **kw)

    assert peak_bytes(rff(coll), rff(coll[:4])) < budget
    moments = lambda c: lambda: dc.posterior_moments(c)  # noqa: E731
    assert peak_bytes(moments(coll), moments(coll[:4])) < budget


def test_env_unchanged_by_executor_threads(tmp_path):
    write_planted(tmp_path, 2)
    coll = pc.from_files(tmp_path / "ck_*.pt", SPEC)
    threads = torch.get_num_threads()
    coll.align(0, tmp_path / "o", num_threads=1, progress=False)
    assert torch.get_num_threads() == threads
    assert os.path.exists(tmp_path / "o" / "_manifest.jsonl")
