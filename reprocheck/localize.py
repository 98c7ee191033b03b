"""Op-level capture of one step, and the first divergent op between two captures.

During the captured step three layers watch the same computation:

* module hooks keep the stack of modules running (``encoder.layers.0.linear1``);
* a ``TorchFunctionMode`` sees each torch call *above* autograd: it finds the user's
  source line (first frame outside torch and reprocheck's machinery; the zoo counts as
  user code) and, for an output with a ``grad_fn``, remembers that line and module on the
  autograd node and puts a pre-hook on the node;
* a ``TorchDispatchMode`` sees every aten op *below* autograd, forward and backward, and
  digests its inputs and outputs. An op that runs while a node's pre-hook has fired is a
  backward op: it is given the forward line that created that node.

Only the divergent step is captured (see :mod:`reprocheck.parent.audit`), so the cost of
stacks and digests for every op is paid once, not at every step.
"""

from __future__ import annotations

import contextlib
import hashlib
import linecache
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import zip_longest
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .causes import Cause
from .fingerprint import fingerprint

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_ZOO_DIR = os.path.join(_PACKAGE_DIR, "zoo")
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _library_dirs() -> tuple[str, ...]:
    """Where installed packages and the standard library live: a frame there is a
    framework's (Lightning, transformers, accelerate) or Python's, not the user's."""
    import sysconfig

    found = set()
    for name in ("purelib", "platlib", "stdlib", "platstdlib"):
        with contextlib.suppress(KeyError):
            found.add(os.path.abspath(sysconfig.get_path(name)) + os.sep)
    for folder in getattr(sys, "path", []):
        if folder and os.path.basename(folder.rstrip(os.sep)) in ("site-packages", "dist-packages"):
            found.add(os.path.abspath(folder) + os.sep)
    return tuple(sorted(found))


_LIBRARY_DIRS = _library_dirs()

# aten ops whose output is drawn from a generator: a difference there is an RNG cause.
RANDOM_OPS = (
    "rand",
    "randn",
    "randint",
    "randperm",
    "normal",
    "uniform",
    "bernoulli",
    "dropout",
    "exponential",
    "geometric",
    "log_normal",
    "cauchy",
    "multinomial",
    "random_",
    "poisson",
    "native_dropout",
    "rrelu",
)


# Ops that return uninitialized memory: their output is not digested. ``set_`` points a
# tensor at a storage — another tensor's (digested where it was made) or a fresh
# ``UntypedStorage`` (torchmetrics' states, a DataLoader worker's batch in shared memory)
# whose bytes are whatever the allocator left; ``resize_`` grows into such bytes.
UNINITIALIZED = (
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "set_",
    "resize_",
)


@dataclass
class OpRecord:
    """One aten op of the captured step."""

    index: int
    op: str  # aten.index_put_.default
    stage: str  # forward | backward | optimizer
    module: str | None  # module path it ran under ('' for the model itself)
    source: str | None  # file:line of the user code that called it (backward: its forward line)
    code: str | None  # that line's text
    inputs: list[str] = field(default_factory=list)  # input digests (hex)
    outputs: list[str] = field(default_factory=list)  # output digests (hex)
    generator: bool = False  # drew from a random generator
    forward_line: bool = False  # a backward op: ``source`` is the forward line of its node
    scalars: list[str] = field(default_factory=list)  # its number arguments, as repr()
    shapes: list[list[int]] = field(default_factory=list)  # its tensor outputs' shapes

    @property
    def base(self) -> str:
        """``aten.index_put_`` from ``aten.index_put_.default``."""
        return self.op.rsplit(".", 1)[0] if self.op.count(".") >= 2 else self.op


_USER_FILE: dict[str, bool] = {}
_OUTSIDE: dict[str, bool] = {}


def is_outside_machinery(filename: str) -> bool:
    """Not torch, not reprocheck's machinery (the zoo counts as the user's: its fixtures
    stand in for a user's model), not a frozen or generated module."""
    known = _OUTSIDE.get(filename)
    if known is None:
        path = os.path.abspath(filename)
        known = not (
            filename.startswith("<")
            or path.startswith(_TORCH_DIR)
            or (path.startswith(_PACKAGE_DIR) and not path.startswith(_ZOO_DIR))
            or os.path.basename(path) in ("contextlib.py", "runpy.py", "typing.py")
            or "importlib" in path
        )
        _OUTSIDE[filename] = known
    return known


def is_user_file(filename: str) -> bool:
    """Code of the user's: outside torch and reprocheck (:func:`is_outside_machinery`),
    and outside installed packages and the standard library — a framework's frame
    (Lightning's ``seed_everything``, accelerate's ``set_seed``) is not the user's line."""
    known = _USER_FILE.get(filename)
    if known is None:
        path = os.path.abspath(filename)
        known = is_outside_machinery(filename) and not path.startswith(_LIBRARY_DIRS)
        _USER_FILE[filename] = known
    return known


def user_frame(stack: Sequence[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    """The innermost frame of user code in a traceback's stack; where every frame outside
    torch and reprocheck is a library's (a script run from an installed package), the
    innermost of those."""
    frames = list(reversed(stack))
    found = next((frame for frame in frames if is_user_file(frame.filename)), None)
    if found is None:
        found = next((frame for frame in frames if is_outside_machinery(frame.filename)), None)
    return found


def library_frame(stack: Sequence[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    """The framework's own frame beside the user's: the innermost frame outside torch and
    reprocheck, where it is inside an installed package (None where the user's own line
    made the call directly)."""
    for frame in reversed(stack):
        if is_outside_machinery(frame.filename):
            return None if is_user_file(frame.filename) else frame
    return None


_LINES: dict[tuple[str, int], tuple[str, str | None]] = {}


_AUTOGRAD_DIR = os.path.join(_TORCH_DIR, "autograd")
_ENGINE_ENTRIES = frozenset(("_engine_run_backward", "backward", "grad"))


def _caller(
    inside_backward: bool = False, skip: Callable[[Any], bool] | None = None
) -> tuple[str | None, str | None]:
    """(file:line, code) of the innermost user frame now running. Walks the frames
    directly: far cheaper than formatting a traceback for every op.

    ``inside_backward``: only frames the autograd engine called (a custom Function's
    backward); the walk stops at the engine's entry (``torch.autograd.backward``), so
    the line that called ``loss.backward()`` is never taken for a backward op's.
    ``skip``: frames it is true of are passed over (the ``__init__`` frames of an object
    being built, for the line that built it)."""
    frame = sys._getframe(1)
    fallback = None  # the innermost library frame: the answer where no user frame runs
    while frame is not None:
        code_object = frame.f_code
        filename = code_object.co_filename
        if (
            inside_backward
            and code_object.co_name in _ENGINE_ENTRIES
            and filename.startswith(_AUTOGRAD_DIR)
        ):
            break
        if skip is not None and skip(frame):
            frame = frame.f_back
            continue
        if is_user_file(filename):
            return _line_of(filename, frame.f_lineno)
        if fallback is None and is_outside_machinery(filename):
            fallback = (filename, frame.f_lineno)
        frame = frame.f_back
    return _line_of(*fallback) if fallback else (None, None)


def _line_of(filename: str, lineno: int) -> tuple[str, str | None]:
    key = (filename, lineno)
    found = _LINES.get(key)
    if found is None:
        from .child.context import display_line  # a notebook's cell: "nb.ipynb · cell 7, line 2"

        code = linecache.getline(filename, lineno).strip() or None
        found = _LINES[key] = (display_line(filename, lineno), code)
    return found


def _leaves(values: Any, out: list[Any]) -> list[Any]:
    """The leaves of an op's arguments or results (tensors, generators, numbers):
    lists, tuples (named ones too) and dicts are walked; a plain walk, ~10× cheaper
    than torch's pytree for the shapes aten ops take."""
    if isinstance(values, dict):
        values = values.values()
    elif not isinstance(values, (list, tuple)):
        out.append(values)
        return out
    for value in values:
        if isinstance(value, (list, tuple, dict)):
            _leaves(value, out)
        else:
            out.append(value)
    return out


_Cache = dict[int, tuple[torch.Tensor, int, str]]  # id → (tensor, version, digest)


def _view_digest(value: torch.Tensor, cache: _Cache) -> str | None:
    """A view's digest from its base's (whose digest this step has, at the same version):
    the base's digest with the view's dtype, shape, strides and offset. Exact for
    comparing two runs — equal bases give equal views, and a view that differs comes
    from a base that differs, found at an earlier op — and it spares copying a strided
    view (a transpose, an expand) to hash it."""
    if not value._is_view():
        return None
    base = value._base
    known = cache.get(id(base))
    if known is None or known[0] is not base or known[1] != base._version:
        return None
    key = f"{known[2]}|{value.dtype}|{tuple(value.shape)}|{value.stride()}|{value.storage_offset()}"
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def _digests(
    values: Any,
    cache: dict[int, tuple[torch.Tensor, int, str]],
    fresh: bool = False,
    view_of: str | None = None,
) -> list[str]:
    """Digests of the tensors in ``values``. An input seen before in this step and not
    modified since (same object, same version counter) is not hashed again: an op's
    inputs are mostly earlier ops' outputs and the parameters. Outputs are always hashed
    (``fresh``): an in-place op's version counter is bumped above this mode, after it
    returns. The cache holds the tensors themselves, so no id is reused while it lives."""
    out = []
    for value in values if isinstance(values, list) else _leaves(values, []):
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            continue
        known = cache.get(id(value))
        version = value._version
        if not fresh and known is not None and known[1] == version:
            out.append(known[2])
            continue
        if view_of is not None:  # a view op's output: its inputs and arguments decide it
            # (with its place among the outputs: unbind's views differ by offset alone)
            meta = (
                f"{view_of}|{len(out)}|{value.dtype}|{tuple(value.shape)}|{value.stride()}"
                f"|{value.storage_offset()}"
            )
            digest = hashlib.blake2b(meta.encode(), digest_size=16).hexdigest()
        else:  # an input that is a view of a base hashed before: from the base's digest
            digest = (None if fresh else _view_digest(value, cache)) or fingerprint(value).hex()
        cache[id(value)] = (value, version, digest)
        out.append(digest)
    return out


class _Context:
    """What the three layers share while the step runs."""

    def __init__(self, model: torch.nn.Module | None) -> None:
        self.names = (
            {id(m): n or type(m).__name__ for n, m in model.named_modules()}
            if model is not None
            else {}
        )
        self.modules: list[str] = []
        self.calls: list[tuple[str | None, str | None, str | None]] = []  # (source, code, module)
        # the forward call (source, code, module) behind each autograd node made in the step
        self.node_where: dict[Any, tuple[str | None, str | None, str | None]] = {}
        self.backward_node: tuple[str | None, str | None, str | None] | None = None  # hooks
        self.stage = "forward"
        self.ops: list[OpRecord] = []
        self.raw: list[tuple] = []  # OpRecord fields, in order; made OpRecords when read
        self.digests: dict[int, tuple[torch.Tensor, int, str]] = {}

    def backward_where(self) -> tuple[str | None, str | None, str | None] | None:
        """In a node's backward: the forward call that made the node; else None."""
        if _CURRENT_NODE is None:  # torch without it: set by the node hooks
            return self.backward_node
        node = _CURRENT_NODE()
        return None if node is None else self.node_where.get(node)


class _Functions(TorchFunctionMode):
    def __init__(self, context: _Context) -> None:
        super().__init__()
        self.context = context

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        context = self.context
        backward = context.backward_where()
        source, code = _caller(inside_backward=backward is not None)
        if backward is not None:  # python code in a custom backward
            where = (source, code, backward[2]) if source else backward
        else:
            where = (source, code, context.modules[-1] if context.modules else None)
        context.calls.append(where)
        try:
            result = func(*args, **kwargs)
        finally:
            context.calls.pop()
        if backward is None:
            known = context.node_where
            for out in _leaves(result, []):
                node = _grad_fn(out) if isinstance(out, torch.Tensor) else None
                if node is not None and node not in known:
                    known[node] = where  # holds the node: its identity stays its own
                    if _CURRENT_NODE is None:
                        _hook_node(node, where, context)
        return result


def _grad_fn(tensor: torch.Tensor) -> Any:
    """The tensor's autograd node, or None where its autograd metadata cannot be read.

    Reading ``grad_fn`` of a view created under ``no_grad`` and since modified in place
    raises (torch regenerates a view's node on a read after an in-place op, and forbids it
    for such views): ``nn.Embedding(padding_idx=...)`` builds one in ``reset_parameters``
    (``self.weight[self.padding_idx].fill_(0)``). Such an op is captured without its node."""
    try:
        return tensor.grad_fn
    except RuntimeError:
        return None


# The autograd node running now (None outside backward): ties each backward op to the
# forward call that made its node, with no hook on any node. Hooks where torch lacks it.
_CURRENT_NODE = getattr(torch._C, "_current_autograd_node", None)


def _hook_node(node: Any, where: tuple, context: _Context) -> None:
    """Mark the ops of this node's backward with the forward line that created it."""

    def before(grad_outputs):  # runs just before the node's backward, in this thread on CPU
        context.backward_node = where
        return None

    def after(grad_inputs, grad_outputs):
        context.backward_node = None
        return None

    try:
        node.register_prehook(before)
        node.register_hook(after)
    except (AttributeError, RuntimeError):
        pass  # a node that takes no hooks: its ops keep the innermost frame instead


class _Dispatch(TorchDispatchMode):
    def __init__(self, context: _Context) -> None:
        super().__init__()
        self.context = context

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        context = self.context
        leaves = _leaves((args, kwargs), [])
        inputs = _digests(leaves, context.digests)
        out = func(*args, **kwargs)
        forward_line = False
        backward = context.backward_where()
        stage = "backward" if backward is not None else context.stage
        if context.calls:  # a torch call in progress
            source, code, module = context.calls[-1]
        elif stage == "backward":
            # python code of a custom Function's backward has a user frame; autograd's own
            # kernels have none: they get the forward line that created their node.
            source, code = _caller(inside_backward=True)
            module = backward[2] if backward else None
            if source is None and backward is not None:
                source, code, module = backward
                forward_line = True
        else:
            source, code = _caller()
            module = context.modules[-1] if context.modules else None
        name, uninitialized, random_op, view_op = _op_info(func)
        if uninitialized:
            out_digests: list[str] = []  # fresh memory: its bytes are whatever was there
        else:
            view_of = None
            if view_op:
                # a view op (transpose, expand, view ...): its output is a function of its
                # inputs' content and its arguments — digested from those, not copied and
                # hashed (a strided view costs a gather); equal iff they are equal
                others = [v for v in leaves if not isinstance(v, torch.Tensor)]
                view_of = f"{name}|{','.join(inputs)}|{others!r}"
            out_digests = _digests(out, context.digests, fresh=True, view_of=view_of)
        # a tuple now, an OpRecord when read (OpCapture.ops): ~1 µs less per op
        context.raw.append(
            (
                len(context.raw),
                name,
                stage,
                module,
                source,
                code,
                inputs,
                out_digests,
                random_op or any(isinstance(v, torch.Generator) for v in leaves),
                forward_line,
                # a Python number passed to the op (a scale, an epsilon, a dropout p): two
                # runs may differ there with every tensor input equal
                [repr(v) for v in leaves if type(v) in (int, float, complex)],
                [list(v.shape) for v in _leaves(out, []) if isinstance(v, torch.Tensor)],
            )
        )
        return out


_OP_INFO: dict[Any, tuple[str, bool, bool, bool]] = {}


def _op_info(func: Any) -> tuple[str, bool, bool, bool]:
    """(name, writes uninitialized memory, draws random numbers, is a view op), per op."""
    info = _OP_INFO.get(func)
    if info is None:
        name = str(func)
        # a c10d collective (gloo's all-reduce is asynchronous: its output is final only at
        # Work.wait()) is not digested when it returns: it would race the reduction
        uninitialized = name.startswith("c10d.") or any(
            name.startswith(f"aten.{e}.") or name.startswith(f"{e}.") for e in UNINITIALIZED
        )
        view_op = bool(getattr(func, "is_view", False)) and "as_strided" not in name
        info = (
            name if name.startswith(("aten.", "c10d.")) else f"aten.{name}",
            uninitialized,
            any(r in name for r in RANDOM_OPS),
            view_op,
        )
        _OP_INFO[func] = info
    return info


class OpCapture:
    """Capture the aten ops of one step, part by part (see the module docstring)::

        capture = OpCapture(model)
        with capture.during("forward"):
            loss = loss_fn(model(x), y)
        with capture.during("backward"):
            loss.backward()

    What runs between the parts (reprocheck's own recording) is not captured.
    """

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self.context = _Context(model)
        self._handles: list[Any] = []
        self._modes: list[Any] = []

    @property
    def ops(self) -> list[OpRecord]:
        context = self.context
        for fields in context.raw[len(context.ops) :]:
            context.ops.append(OpRecord(*fields))
        return context.ops

    @contextlib.contextmanager
    def during(self, stage: str) -> Iterator[OpCapture]:
        self.context.stage = stage
        with self:
            yield self

    def __enter__(self) -> OpCapture:
        # Backward runs without the function mode: a mode is switched off while its own
        # handler runs, so intercepting `loss.backward()` would blind it for the whole
        # backward pass. The dispatch mode and the node hooks see backward instead.
        context = self.context
        hooks = torch.nn.modules.module

        def push(module, inputs):
            context.modules.append(context.names.get(id(module), type(module).__name__))

        def pop(module, inputs, output):
            if context.modules:
                context.modules.pop()

        self._handles = [
            hooks.register_module_forward_pre_hook(push),
            hooks.register_module_forward_hook(pop),
        ]
        self._modes = [_Dispatch(context)]
        if context.stage != "backward":
            self._modes.insert(0, _Functions(context))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()


# ----------------------------------------------------------------- comparing two captures


# Ops whose trailing outputs are scratch space (a workspace the backward op reads again),
# not values: uninitialized bytes there differ from run to run while the op is exact. Only
# their leading outputs are compared.
SCRATCH_OUTPUTS = {"aten.mkldnn_rnn_layer": 3, "aten._cudnn_rnn": 3, "aten.miopen_rnn": 3}


def _differ(x: OpRecord, y: OpRecord) -> bool:
    """The two runs' op at one index differs: another op, or other (leading) outputs."""
    kept = slice(SCRATCH_OUTPUTS.get(x.base))
    return x.op != y.op or x.outputs[kept] != y.outputs[kept]


def _where(x: OpRecord) -> dict[str, Any]:
    """An op as a report names it: op, stage, module, its source line and code."""
    return {
        "op": x.base,
        "stage": x.stage,
        "module": x.module,
        "source": x.source,
        "code": x.code,
        "source_is_forward_line": x.stage == "backward" and x.forward_line,
    }


def first_divergent_op(a: Sequence[OpRecord], b: Sequence[OpRecord]) -> int | None:
    """Index of the first op whose name or output digests differ between two captures."""
    for index, (x, y) in enumerate(zip(a, b)):
        if _differ(x, y):
            return index
    if len(a) != len(b):
        return min(len(a), len(b))
    return None


def classify(a: OpRecord, b: OpRecord, step: int, phase: str) -> tuple[Cause, str]:
    """(cause class, the evidence for it) for a first divergent op."""
    if step == 0:
        return (
            Cause.INITIALISATION,
            "the initial weights differ: an op building the model drew other values",
        )
    if phase == "data":
        return Cause.DATA, "the batch differs before the model sees it"
    if a.op != b.op:
        return Cause.EARLIER_STATE, "the two runs executed different ops"
    # an in-place random op (`bernoulli_`, `uniform_` …) overwrites its first input, often
    # fresh uninitialized memory (dropout's mask): only its other inputs are inputs
    read = slice(1, None) if a.generator and a.base.endswith("_") else slice(None)
    if a.inputs[read] != b.inputs[read]:
        return Cause.EARLIER_STATE, "the op's inputs already differ when the step starts"
    if a.scalars != b.scalars:
        x, y = next(p for p in zip_longest(a.scalars, b.scalars, fillvalue="–") if p[0] != p[1])
        return (
            Cause.PYTHON_VALUE,
            f"{a.base}: its tensor inputs are identical, a number argument is {x} in one run "
            f"and {y} in the other",
        )
    if a.generator:
        return Cause.RNG, "a random op drew different values (inputs identical)"
    return Cause.NONDETERMINISTIC_OP, f"{a.base}: inputs identical, output differs"


def localize(
    a: Sequence[OpRecord],
    b: Sequence[OpRecord],
    step: int,
    phase: str,
    tensor: str | None = None,
    shape: Sequence[int] | None = None,
) -> dict[str, Any] | None:
    """module, op, source, cause and the op's index for the first divergent op. Where
    that op makes no tensor of the divergent tensor's ``shape`` (it belongs to another
    tensor: a bias's gradient before a weight's, in backward order), ``made_by`` names
    the first differing op that makes one too."""
    index = first_divergent_op(a, b)
    if index is None or index >= min(len(a), len(b)):
        return None
    x, y = a[index], b[index]
    cause, detail = classify(x, y, step, phase)
    made_by = _made_by(a, b, index, shape) if tensor is not None and shape is not None else None
    if made_by is not None:
        made_by["tensor"] = tensor
    return {
        "made_by": made_by,
        "op_index": index,
        "ops_captured": [len(a), len(b)],
        **_where(x),
        "cause": cause,
        "cause_detail": detail,
        "ops_window": _window(a, b, index),
    }


def _made_by(
    a: Sequence[OpRecord], b: Sequence[OpRecord], index: int, shape: Sequence[int]
) -> dict[str, Any] | None:
    """Where the first divergent op (``index``) makes no tensor of ``shape`` but records
    its output shapes, the first later op whose outputs differ and include one of that
    shape (None where the first divergent op makes such a tensor, or none is found)."""
    wanted = list(shape)
    if not a[index].shapes or wanted in a[index].shapes:
        return None
    for i in range(index + 1, min(len(a), len(b))):
        if wanted in a[i].shapes and _differ(a[i], b[i]):
            return {
                "op_index": i,
                **_where(a[i]),
                "shape": wanted,
                "first_shapes": a[index].shapes,
            }
    return None


OPS_AROUND = 5  # ops shown before and after the first divergent one (the HTML report)


def _window(a: Sequence[OpRecord], b: Sequence[OpRecord], index: int) -> list[dict[str, Any]]:
    """The ops around the first divergent one: each with whether the two runs agree on it."""
    out = []
    for i in range(max(0, index - OPS_AROUND), min(len(a), len(b), index + OPS_AROUND + 1)):
        x = a[i]
        out.append(
            {
                "index": i,
                "op": x.base,
                "stage": x.stage,
                "module": x.module,
                "source": x.source,
                "match": not _differ(x, b[i]),
            }
        )
    return out


def to_json(ops: Sequence[OpRecord]) -> list[dict[str, Any]]:
    return [asdict(op) for op in ops]


def from_json(items: Sequence[dict[str, Any]]) -> list[OpRecord]:
    return [OpRecord(**item) for item in items]
