"""Record the forward a module really executes: every torch call with its tensors.

A :class:`torch.overrides.TorchFunctionMode` sees every torch function and tensor method
called during the forward (functional calls, ``+``, ``view``, indexing ...), with its input
and output tensors identified by object identity. Module hooks keep a stack of the modules
being run (to name where an operation happened) and record ``nn.MultiheadAttention`` as one
operation, its internals unrecorded. Parameters and buffers are named by identity with their
state-dict names; the values of Pyro sample sites (``PyroSample`` priors) are named after their
sites from a ``poutine.trace`` of the same run. Because this records what ran, it reads modules
``torch.fx`` cannot trace: Pyro statements, data-dependent control flow, shared layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .spec import SpecError

__all__ = ["Node", "Op", "Recording", "Ref", "record"]

INPUT, PARAM, CONST, UNIFORM, VALUE, STATIC = "input", "param", "const", "uniform", "value", "static"

#: Modules recorded as one operation (their internals are not recorded op by op).
COMPOSITE = (nn.MultiheadAttention,)

# Factories whose output is the same at every entry (so any permutation leaves it alone).
_UNIFORM = {"zeros", "zeros_like", "new_zeros", "ones", "ones_like", "new_ones", "full", "full_like", "new_full"}
_UNIFORM |= {"fill", "zero"}
# Factories that read only their inputs' shapes: their output never depends on the inputs' values.
FACTORIES = _UNIFORM | {"empty_like", "rand_like", "randn_like", "randint_like", "new_empty", "new_tensor"}
_REFLECTED = {"add", "sub", "mul", "truediv", "div", "matmul", "pow", "floordiv", "mod", "and", "or", "xor"}
_PROPERTIES = {"T": "T", "mT": "mT", "H": "T", "mH": "mT", "data": "detach", "real": "detach"}


@dataclass(frozen=True)
class Ref:
    """A recorded tensor inside an operation's arguments or output."""

    node: int


@dataclass
class Node:
    """A recorded tensor: its shape, and what it is (an input, a named parameter, a value...)."""

    id: int
    shape: tuple[int, ...]
    kind: str
    names: tuple[str, ...] = ()
    zero: bool = False  # a uniform constant equal to zero

    @property
    def is_value(self) -> bool:
        """Whether the tensor depends on the network's input."""
        return self.kind in (INPUT, VALUE)


@dataclass
class Op:
    """One recorded call: canonical name, arguments (tensors as :class:`Ref`), output nodes."""

    index: int
    name: str
    func: Any
    args: tuple
    kwargs: dict
    outs: list[int]
    out: Any
    where: str
    module: nn.Module | None = None

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional argument ``i`` or keyword ``name``."""
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def describe(self) -> str:
        where = f" in module {self.where}" if self.where else ""
        return f"operation {self.name!r}{where}"


@dataclass
class Recording:
    """What one forward executed."""

    nodes: dict[int, Node] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    sinks: list[int] = field(default_factory=list)  # outputs and the likelihood's parameters
    escapes: list[tuple[int, str]] = field(default_factory=list)  # values read out of torch (tolist, numpy)
    site_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    output: Any = None


def _canonical(func: Any) -> tuple[str, bool]:
    """``(name, reflected)``: ``__radd__`` -> ``("add", True)``, ``relu_`` -> ``("relu", False)``."""
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":
        prop = getattr(getattr(func, "__self__", None), "__name__", "?")
        return _PROPERTIES.get(prop, f"property {prop}"), False
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core.startswith("r") and core[1:] in _REFLECTED:
            return core[1:], True
        if core.startswith("i") and core[1:] in _REFLECTED:
            return core[1:], False
        return core, False
    if name.endswith("_") and not name.startswith("_"):
        return name[:-1], False
    return name.lstrip("_"), False


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


class _Recorder(TorchFunctionMode):
    """The torch-function mode and module hooks that build a :class:`Recording`."""

    def __init__(self, names: dict[int, tuple[torch.Tensor, tuple[str, ...]]]) -> None:
        super().__init__()
        self.rec = Recording()
        self.names = names
        self.by_id: dict[int, tuple[torch.Tensor, int]] = {}
        self.keep: list[torch.Tensor] = []
        self.stack: list[tuple[str, nn.Module]] = []
        self.quiet = 0
        self.stale: set[int] = set()
        self.pending: list[tuple[str, nn.Module, Any, Any]] = []

    # ---------------------------------------------------------------- nodes
    def _new(self, t: torch.Tensor, kind: str, names: tuple[str, ...] = (), zero: bool = False) -> int:
        i = len(self.rec.nodes)
        self.rec.nodes[i] = Node(i, tuple(t.shape), kind, names, zero)
        self.by_id[id(t)] = (t, i)
        self.keep.append(t)
        return i

    def node_of(self, t: torch.Tensor) -> int:
        hit = self.by_id.get(id(t))
        if hit is not None and hit[0] is t:
            if hit[1] in self.stale:
                raise SpecError(
                    f"in module {self.where()}, a tensor is read after an in-place operation on a view of it "
                    "changed it; from_module cannot follow that: write the update out of place"
                )
            return hit[1]
        named = self.names.get(id(t))
        if named is not None and named[0] is t:
            return self._new(t, PARAM, named[1])
        return self._new(t, CONST)  # may become a Pyro site once the trace is known

    def refs(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return Ref(self.node_of(x))
        if isinstance(x, (list, tuple)) and any(True for _ in _tensors(x)):
            return type(x)(self.refs(v) for v in x) if isinstance(x, list) else tuple(self.refs(v) for v in x)
        if isinstance(x, dict):
            return {k: self.refs(v) for k, v in x.items()}
        return x

    def where(self) -> str:
        if not self.stack:
            return ""
        name, m = self.stack[-1]
        return f"{name or '<root>'!r} ({type(m).__name__})"

    # ---------------------------------------------------------------- ops
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.quiet:
            return func(*args, **kwargs)
        name, reflected = _canonical(func)
        in_refs = self.refs(args), self.refs(kwargs)
        out = func(*args, **kwargs)
        if name == "setitem":
            out_struct: Any = args[0]
        else:
            out_struct = out
        if name in ("tolist", "numpy", "array"):
            self.rec.escapes.extend((r.node, self.where()) for r in _refs(in_refs[0]))
            return out
        outs = list(_tensors(out_struct))
        if not outs:
            return out
        a, kw = in_refs
        if reflected and len(a) >= 2:
            a = (a[1], a[0], *a[2:])
        raw = getattr(func, "__name__", "")
        if name == "setitem" or (raw.endswith("_") and not raw.startswith("_")) or raw.startswith("__i"):
            self._mark_stale_base(args, outs)
        self.record(name, func, a, kw, out_struct, outs)
        return out

    def _mark_stale_base(self, args: tuple, outs: list) -> None:
        """An in-place op (``add_``, ``+=``, ``x[i] = v``) on a view also changes its base, which
        no record follows: the base's node goes stale, and reading it again is refused rather
        than misread."""
        if not args or not isinstance(args[0], torch.Tensor) or not any(t is args[0] for t in outs):
            return
        base = args[0]._base
        hit = self.by_id.get(id(base)) if base is not None else None
        if hit is not None and hit[0] is base:
            self.stale.add(hit[1])

    def record(self, name: str, func: Any, args: tuple, kwargs: dict, out: Any, outs: list, module=None) -> None:
        in_nodes = [self.rec.nodes[r.node] for r in _refs((args, kwargs))]
        if name in _UNIFORM:
            kind = UNIFORM
            fill = args[1] if name in ("full", "full_like", "new_full", "fill") and len(args) > 1 else None
            zero = name in ("zeros", "zeros_like", "new_zeros", "zero")
            zero = zero or (isinstance(fill, (int, float)) and fill == 0)
        elif name in FACTORIES or not in_nodes:
            kind, zero = CONST, False
        elif any(n.is_value for n in in_nodes):
            kind, zero = VALUE, False
        elif any(n.kind in (PARAM, STATIC) for n in in_nodes):
            kind, zero = STATIC, False
        else:
            kind, zero = CONST, False
        out_nodes = [self._new(t, kind, zero=zero) for t in outs]
        it = iter(out_nodes)
        out_refs = _replace(out, it)
        op = Op(len(self.rec.ops), name, func, args, kwargs, out_nodes, out_refs, self.where(), module)
        self.rec.ops.append(op)

    # ---------------------------------------------------------------- module hooks
    def pre_hook(self, name: str) -> Any:
        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            self.stack.append((name, m))
            if isinstance(m, COMPOSITE) and not self.quiet:
                self.pending.append((name, m, self.refs(args), self.refs(kwargs)))
                self.quiet += 1
            elif isinstance(m, COMPOSITE):
                self.quiet += 1

        return hook

    def post_hook(self, name: str) -> Any:
        def hook(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            self.stack.pop()
            if isinstance(m, COMPOSITE):
                self.quiet -= 1
                if not self.quiet:
                    _, _, a, kw = self.pending.pop()
                    params = {k: self.refs(v) for k, v in _composite_params(m).items()}
                    self.stack.append((name, m))
                    extra = {"__params__": params, "__name__": name}
                    self.record("module:MultiheadAttention", m, a, {**kw, **extra}, out, list(_tensors(out)), m)
                    self.stack.pop()

        return hook


def _composite_params(m: nn.Module) -> dict[str, Any]:
    names = ["in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v"]
    out = {k: getattr(m, k, None) for k in names}
    out["out_proj.weight"] = m.out_proj.weight
    out["out_proj.bias"] = m.out_proj.bias
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _refs(x: Any) -> Iterator[Ref]:
    if isinstance(x, Ref):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _refs(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _refs(v)


def _replace(x: Any, it: Iterator[int]) -> Any:
    if isinstance(x, torch.Tensor):
        return Ref(next(it))
    if isinstance(x, (list, tuple)):
        return [_replace(v, it) for v in x] if isinstance(x, list) else tuple(_replace(v, it) for v in x)
    return x


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run a block with every submodule in eval mode; restore each training flag after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


@contextlib.contextmanager
def _fastpath_off() -> Iterator[None]:
    """Attention fast paths fuse whole layers into one opaque kernel call: turn them off."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:  # pragma: no cover
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def state_names(module: nn.Module) -> dict[int, tuple[torch.Tensor, tuple[str, ...]]]:
    """``id(tensor) -> (tensor, state-dict names)`` for parameters and persistent buffers."""
    keys = set(module.state_dict().keys())
    out: dict[int, tuple[torch.Tensor, tuple[str, ...]]] = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t is None or name not in keys:
            continue  # non-persistent buffers are constants: no spec can act on them
        prev = out.get(id(t))
        out[id(t)] = (t, (prev[1] if prev else ()) + (name,))
    return out


class _Quiet:
    """A Pyro messenger that stops recording while a sample site draws its value."""

    def __init__(self, recorder: _Recorder) -> None:
        from pyro.poutine.messenger import Messenger

        class _M(Messenger):
            def _process_message(self, msg: dict) -> None:
                if msg["type"] == "sample":
                    recorder.quiet += 1

            def _postprocess_message(self, msg: dict) -> None:
                if msg["type"] == "sample":
                    recorder.quiet -= 1

        self.messenger = _M()


def record(module: nn.Module, inputs: tuple) -> Recording:
    """Run ``module(*inputs)`` once (eval mode, under a Pyro trace) and record it.

    Raises
    ------
    SpecError
        If the forward raises, naming the module that was running.
    """
    import pyro.poutine as poutine

    rec = _Recorder(state_names(module))
    for x in inputs:
        for t in _tensors(x):
            rec.rec.inputs.append(rec._new(t, INPUT))
    handles = []
    for name, m in module.named_modules():
        handles.append(m.register_forward_pre_hook(rec.pre_hook(name), with_kwargs=True))
        handles.append(m.register_forward_hook(rec.post_hook(name), with_kwargs=True))
    try:
        with eval_mode(module), _fastpath_off(), torch.no_grad(), _Quiet(rec).messenger, rec:
            trace = poutine.trace(module).get_trace(*inputs)
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward is reported with its place
        msg = str(e).split("\nTrace Shapes:")[0]  # Pyro's trace appends its site shapes
        if isinstance(e, SpecError):
            raise SpecError(msg) from e
        where = rec.where() or f"{type(module).__name__}"
        shapes = [tuple(t.shape) for x in inputs for t in _tensors(x)]
        raise SpecError(
            f"the forward of {type(module).__name__} failed on example inputs of shapes {shapes}, in module "
            f"{where}: {type(e).__name__}: {msg}. Pass example_inputs=(...) that the module accepts"
        ) from e
    finally:
        for h in handles:
            h.remove()
    _name_sites(rec, trace)
    out = trace.nodes["_RETURN"]["value"]
    rec.rec.output = rec.refs(out)
    rec.rec.sinks.extend(r.node for r in _refs(rec.rec.output))
    return rec.rec


def _name_sites(rec: _Recorder, trace: Any) -> None:
    """Name the values of latent sample sites; make the likelihood's parameters sinks."""
    from pyro.poutine.util import site_is_subsample

    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        value = site["value"]
        hit = rec.by_id.get(id(value)) if isinstance(value, torch.Tensor) else None
        if not site["is_observed"] and hit is not None and hit[0] is value:
            node = rec.rec.nodes[hit[1]]
            if node.kind == CONST:
                node.kind, node.names = PARAM, (name,)
                rec.rec.site_shapes[name] = tuple(value.shape)
        for t in _dist_tensors(site["fn"], 0):
            hit = rec.by_id.get(id(t))
            if hit is not None and hit[0] is t:
                rec.rec.sinks.append(hit[1])


def _dist_tensors(d: Any, depth: int) -> Iterator[torch.Tensor]:
    """Tensors a distribution holds (its parameters), through wrappers such as ``Independent``."""
    if depth > 4:
        return
    for v in getattr(d, "__dict__", {}).values():
        if isinstance(v, torch.Tensor):
            yield v
        elif hasattr(v, "batch_shape") and hasattr(v, "__dict__"):
            yield from _dist_tensors(v, depth + 1)
