"""How a script's models, optimizers and tensors are named, and the user's line that did
a thing.

**Models** are the outermost modules that own trained parameters (parameters in an
optimizer, or leaves that received gradients): a loss module, a frozen copy loaded for
evaluation, or a teacher in ``eval()`` is not one. With more than one, models and
optimizers are numbered by creation order (``model0.fc.weight``, ``opt1.``); the numbering
is fixed at step 0, and a model or optimizer first seen later gets the next number.
"""

from __future__ import annotations

import os
import sys
import traceback
import weakref
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .recorder import ProcessRecorder


# wrappers a framework puts around the user's model, and the attribute holding it
_WRAPPERS = {
    "OptimizedModule": "_orig_mod",  # torch.compile
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "FullyShardedDataParallel": "module",
    "_FabricModule": "_original_module",  # Lightning Fabric's setup()
    "DeepSpeedEngine": "module",
}


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The module a wrapper trains: ``torch.compile``'s ``_orig_mod``, DDP's ``module``,
    Fabric's ``_original_module``: every phase names a tensor by the user's model. Read
    from the instance's own ``__dict__``/``_modules`` (no ``__getattr__`` of the wrapper)."""
    while True:
        attribute = _WRAPPERS.get(type(module).__name__)
        if attribute is None and "_orig_mod" in module._modules:
            attribute = "_orig_mod"
        inner = None
        if attribute is not None:
            inner = module._modules.get(attribute, module.__dict__.get(attribute))
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner


class Created:
    """The modules and optimizers made so far, in creation order, held by identity.

    The registry is written from the ``__init__`` hook *before* the subclass's own
    ``__init__`` has run, so it must never call anything of the object's: no ``__hash__``
    or ``__eq__`` (torchmetrics' metrics hash their state, which does not exist yet), no
    ``__getattr__``, no ``__bool__``. Entries are keyed by ``id()`` and dropped by a weak
    reference's callback when the object dies, so a recycled id never names a dead object.
    An object that takes no weak reference (``__slots__`` without ``__weakref__``) is left
    unnumbered."""

    def __init__(self) -> None:
        # id → (a weak reference, its serial, the user's line that made it)
        self._entries: dict[int, tuple[weakref.ReferenceType[Any], int, str | None]] = {}
        self.count = 0  # how many were made so far (the next serial)

    def add(self, obj: Any) -> None:
        key = id(obj)
        if key in self._entries:  # a subclass's __init__ calling its parent's: made once
            return
        entries = self._entries

        def forget(ref: weakref.ReferenceType[Any], key: int = key) -> None:
            found = entries.get(key)
            if found is not None and found[0] is ref:
                del entries[key]

        try:
            ref = weakref.ref(obj, forget)
        except TypeError:
            return
        entries[key] = (ref, self.count, _construction_line(obj))
        self.count += 1

    def _live(self, kind: type, since: int = 0) -> list[tuple[Any, str | None]]:
        """(object, its line) of the live objects of ``kind`` made at or after serial
        ``since``, oldest first (``type()`` and the MRO only)."""
        found = []
        for ref, serial, where in sorted(self._entries.values(), key=lambda entry: entry[1]):
            obj = ref() if serial >= since else None
            if obj is not None and issubclass(type(obj), kind):
                found.append((obj, where))
        return found

    def of_type(self, kind: type) -> list[Any]:
        """The live objects of ``kind``, oldest first."""
        return [obj for obj, _ in self._live(kind)]

    def made_since(self, serial: int, kind: type) -> list[tuple[Any, str | None]]:
        """The live outermost objects of ``kind`` made at or after ``serial``, oldest
        first, with the user's line that made each."""
        made = self._live(kind, serial)
        roots = {id(m) for m in outermost([m for m, _ in made])}
        return [(obj, where) for obj, where in made if id(obj) in roots]


def outermost(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The modules none of the others holds as a direct child, in their order."""
    inner = {id(child) for m in modules for child in m._modules.values() if child is not None}
    return [m for m in modules if id(m) not in inner]


def _construction_line(obj: Any) -> str | None:
    """The user's line that constructed ``obj``: the innermost user frame outside the
    ``__init__`` methods running on it (``model = Net()``, not ``super().__init__()``
    inside ``Net``); compared by identity alone."""
    from ...localize import _caller as user_line

    def constructing(frame: Any) -> bool:
        return frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is obj

    return user_line(skip=constructing)[0]


def _caller() -> str | None:
    """``file:line`` of the innermost frame of user code now running."""
    from ...localize import library_frame, user_frame
    from ..context import display_line

    stack = traceback.extract_stack()
    frame = user_frame(stack)
    if frame is None:
        return None
    where = display_line(frame.filename, frame.lineno)  # a notebook's: "nb.ipynb · cell 7, line 2"
    inner = library_frame(stack)  # the framework's own line (accelerate's set_seed …)
    if inner is not None and inner is not frame:
        where += f" (in {inner.name}, {_package_path(inner.filename)}:{inner.lineno})"
    return where


def _package_path(filename: str) -> str:
    """``accelerate/utils/random.py`` from its installed path."""
    parts = os.path.abspath(filename).split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(marker) :])
    return os.path.basename(filename)


def _parameters(optimizers: list[torch.optim.Optimizer]) -> dict[int, torch.Tensor]:
    """id → parameter, of every parameter the optimizers hold."""
    return {id(p): p for o in optimizers for group in o.param_groups for p in group["params"]}


def _known(item: Any, items: list[Any]) -> bool:
    return any(item is other for other in items)


def _freed(tensor: torch.Tensor) -> bool:
    """A tensor whose storage was freed under it (``storage.resize_(0)``: FSDP2 frees each
    unsharded parameter after backward); its bytes are no one's values."""
    try:
        needed = tensor.numel() * tensor.element_size()
        return needed > 0 and tensor.untyped_storage().nbytes() < needed
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def optimizers_created(rec: ProcessRecorder) -> list[torch.optim.Optimizer]:
    return rec.session.created.of_type(torch.optim.Optimizer)


def owners(rec: ProcessRecorder, wanted: set[int]) -> list[torch.nn.Module]:
    """The outermost modules (by creation order) that own any of these parameters."""
    roots = outermost(rec.session.created.of_type(torch.nn.Module))
    return [m for m in roots if any(id(p) in wanted for p in m.parameters())]


def add_models(rec: ProcessRecorder, modules: Any) -> None:
    """A model first called after step 0 that trains: the next number, prefixed."""
    for module in modules:
        if id(module) in rec.tags or not rec.started:
            continue
        named = tensor_names(rec)
        if any(id(p) in named for p in module.parameters()) and not _known(module, rec.models):
            continue  # a part of a model, called on its own: its model's records say it
        wanted = set(rec.trained) | set(_parameters(rec.optimizers))
        if any(id(p) in wanted for p in module.parameters()):
            rec.models.append(module)
            rec.tags[id(module)] = f"model{len(rec.models) - 1}."
        else:
            rec.tags.setdefault(-id(module), "")  # not trained: never asked again


def name_optimizer(rec: ProcessRecorder, optimizer: torch.optim.Optimizer) -> None:
    if id(optimizer) in rec.tags:
        return
    rec.optimizers.append(optimizer)  # created after step 0
    rec.tags[id(optimizer)] = f"opt{len(rec.optimizers) - 1}."
    wanted = set(_parameters([optimizer]))
    for module in owners(rec, wanted):
        if not _known(module, rec.models):
            rec.models.append(module)
            rec.tags[id(module)] = f"model{len(rec.models) - 1}."
    name_loose(rec, wanted)


def name_loose(rec: ProcessRecorder, wanted: set[int]) -> None:
    """Trained tensors no model owns (``W = torch.randn(..., requires_grad=True)``):
    named after the script's global that holds them, else ``param<i>``."""
    owned = {id(p) for m in rec.models for p in m.parameters()}
    tensors = _parameters(rec.optimizers)
    tensors.update(rec.trained)
    main = vars(sys.modules["__main__"]) if "__main__" in sys.modules else {}
    globals_by_id = {id(v): k for k, v in main.items() if isinstance(v, torch.Tensor)}
    for ident in wanted:
        if ident in owned or ident in rec.loose or ident not in tensors:
            continue
        if _freed(tensors[ident]):
            continue  # a framework's temporary (FSDP's unsharded parameter): no weight
        name = globals_by_id.get(ident) or f"param{len(rec.loose)}"
        rec.loose[ident] = (name, tensors[ident])


def tensor_names(rec: ProcessRecorder) -> dict[int, str]:
    names = {ident: name for ident, (name, _) in rec.loose.items()}
    for model in rec.models:
        tag = rec.tags[id(model)]
        names.update({id(p): tag + n for n, p in _unwrapped(model).named_parameters()})
    return names


def prefixes(rec: ProcessRecorder) -> dict[str, list[dict[str, str]]]:
    """What each prefix stands for: ``{"models": [{"prefix": "model0.", "type": ...}]}``."""
    return {
        group: [
            {"prefix": rec.tags.get(id(item), ""), "type": type(_unwrapped(item)).__name__}
            if isinstance(item, torch.nn.Module)
            else {"prefix": rec.tags.get(id(item), ""), "type": type(item).__name__}
            for item in items
        ]
        for group, items in (("models", rec.models), ("optimizers", rec.optimizers))
    }
