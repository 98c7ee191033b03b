"""A resume audit's runs (``reprocheck resume``): the checkpoints a script saves and loads,
the stop right after its first save at or after step K, and the control's disturbance.

**Saves.** ``torch.save`` and safetensors' ``save_file``/``save_model`` are noted with the
step the saved state holds (the steps committed when it was written), the file (a save
into a buffer — Lightning's — takes the next file the process opens for writing), the
writer and the saved object's top-level keys, read by ``dict.keys`` on the object as it
is: no method of the user's object is called. Loads (``torch.load``, safetensors'
``load_file``/``load_model``) are noted by file.

**The stop.** Once a checkpoint is saved at a step ≥ K the run ends at the next step
boundary — the next outermost model call, ``backward()`` or optimizer step — so every
file of that checkpoint (a transformers checkpoint is five) is written when it stops.

**The control.** One part of the state is disturbed after the script's load, before its
first training step: ``rng`` re-seeds every global generator from entropy and
``optimizer`` zeroes every tensor of the optimizers' state, both at the first model call
in training mode with gradients on; ``data`` skips the first batch a DataLoader hands out
with gradients on (a sanity-check validation's batches come under ``no_grad``).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import shutil
from typing import TYPE_CHECKING, Any

import torch

from ... import checkpoint
from .naming import optimizers_created

if TYPE_CHECKING:
    from .recorder import ProcessRecorder
    from .session import Session

MAX_KEYS = 64  # a saved object's top-level keys kept (a state dict's can be thousands)
MAX_NOTED = 256  # saves and loads kept per process


def saved_keys(obj: Any) -> list[str]:
    """The top-level keys of a saved object (a dict's, as ``dict.keys`` finds them; a key
    that is not a string by its type's name), else []: nothing of the object's own runs."""
    if not isinstance(obj, dict):
        return []
    keys = []
    for key in dict.keys(obj):
        keys.append(key if type(key) is str else f"<{type(key).__name__}>")
        if len(keys) == MAX_KEYS:
            break
    return keys


def file_path(file: Any) -> str | None:
    """A path's absolute form; an open file's (``io`` and fsspec files: their ``name`` or
    ``path``), else None."""
    if isinstance(file, io.IOBase):
        for attribute in ("name", "path"):
            value = getattr(file, attribute, None)
            if isinstance(value, str):
                return os.path.abspath(value)
        return None
    if isinstance(file, (str, bytes, os.PathLike)):
        try:
            return os.path.abspath(os.fsdecode(file))
        except (TypeError, ValueError):
            return None
    return None


class Saves:
    """One process's saves, loads, stop and disturbance (:class:`Session` holds it)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        plan = session.settings.resume_run
        self.stop_at = plan.stop_after_save if plan else None
        self.disturb = plan.disturb if plan else None
        self.saves: list[dict[str, Any]] = []
        self.loads: list[str] = []
        self.stop_due: int | None = None  # the step of the save the run stops after
        self.awaiting_file: dict[str, Any] | None = None  # a save into a buffer
        self.disturbed: dict[str, Any] | None = None

    # -- what the hooks report -------------------------------------------------------------
    def saved(self, obj: Any, file: Any, writer: str) -> None:
        rec = self.session.recorder()
        if rec is not None and rec.snapshot is not None:
            from .steps import hand_update_step

            hand_update_step(rec)  # an update by hand right before the save is its step
        step = rec.step if rec is not None and rec.started else 0
        entry = {"step": step, "file": file_path(file), "writer": writer, "keys": saved_keys(obj)}
        if len(self.saves) < MAX_NOTED:
            self.saves.append(entry)
        self.awaiting_file = entry if entry["file"] is None else None
        if self.stop_at is not None and self.stop_due is None and step >= self.stop_at:
            self.stop_due = step
        self._write(rec, saves=self.saves)

    def opened_for_writing(self, path: str) -> None:
        """A save into a buffer is written to the next file opened for writing."""
        if self.awaiting_file is not None:
            self.awaiting_file["file"] = path
            self.awaiting_file = None
            self._write(self.session.recorders.get(os.getpid()), saves=self.saves)

    def moved(self, source: Any, destination: Any) -> None:
        """A file written elsewhere and moved into place (an atomic save: fsspec's, a
        ``.tmp`` and ``os.replace``): the save's file is where it landed."""
        before, after = file_path(source), file_path(destination)
        if before is None or after is None:
            return
        if os.path.isdir(after):
            after = os.path.join(after, os.path.basename(before))
        changed = False
        for entry in self.saves:
            if entry["file"] == before:
                entry["file"], changed = after, True
        if changed:
            self._write(self.session.recorders.get(os.getpid()), saves=self.saves)

    def loaded(self, file: Any) -> None:
        path = file_path(file)
        if len(self.loads) < MAX_NOTED:
            self.loads.append(path or "<a file object>")
        self._write(self.session.recorders.get(os.getpid()), loads=self.loads)

    def _write(self, rec: ProcessRecorder | None, **meta: Any) -> None:
        # into the trace as it happens: a run that crashes keeps what it saved
        if rec is not None and rec.context is not None and not rec.finished:
            rec.context.writer.set_meta(**meta)

    # -- the stop ----------------------------------------------------------------------------
    def boundary(self, rec: ProcessRecorder) -> None:
        """A step boundary (a model call, ``backward()``, an optimizer step): the run ends
        here if it has saved its checkpoint."""
        if self.stop_due is None or rec.finished:
            return
        if rec.context is not None:
            rec.context.writer.set_meta(stopped_after_save=self.stop_due)
        rec.stop()

    # -- the control ---------------------------------------------------------------------------
    def before_forward(self, rec: ProcessRecorder, module: torch.nn.Module) -> None:
        """The first model call that trains: disturb the generators or the optimizer."""
        if (
            self.disturb not in ("rng", "optimizer")
            or self.disturbed is not None
            or rec.started
            or not module.training
            or not torch.is_grad_enabled()
        ):
            return
        if self.disturb == "rng":
            self.disturbed = {"what": "rng", "applied": True, "reason": None}
            checkpoint.reseed_from_entropy()
        else:
            zeroed = checkpoint.zero_optimizer_state(optimizers_created(rec))
            self.disturbed = {
                "what": "optimizer",
                "applied": zeroed > 0,
                "reason": None
                if zeroed
                else "the optimizer held no state to disturb (plain SGD keeps none)",
                "tensors": zeroed,
            }
        self._write(rec, disturbed=self.disturbed)

    def skips_batch(self, rec: ProcessRecorder | None) -> bool:
        """Whether this DataLoader batch is the one the data control skips."""
        if (
            self.disturb != "data"
            or self.disturbed is not None
            or rec is None
            or rec.started
            or not torch.is_grad_enabled()
        ):
            return False
        self.disturbed = {"what": "data", "applied": True, "reason": None}
        self._write(rec, disturbed=self.disturbed)
        return True

    def closing(self) -> dict[str, Any]:
        """What the trace's meta says at its end."""
        if self.session.settings.resume_run is None:
            return {}
        disturbed = self.disturbed
        if self.disturb and disturbed is None:
            why = (
                "the run fetched no DataLoader batch before its first step"
                if self.disturb == "data"
                else "the run made no model call in training mode before its first step"
            )
            disturbed = {"what": self.disturb, "applied": False, "reason": why}
        return {"saves": self.saves, "loads": self.loads, "disturbed": disturbed}


def watch_saves(session: Session) -> None:
    """Note a resume audit's checkpoint saves and loads (nothing for any other run)."""
    if session.settings.resume_run is None:
        return
    saves = session.saves
    save, load = torch.save, torch.load

    @functools.wraps(save)
    def saving(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        result = save(obj, f, *args, **kwargs)
        saves.saved(obj, f, "torch.save")
        return result

    @functools.wraps(load)
    def loading(f: Any, *args: Any, **kwargs: Any) -> Any:
        saves.loaded(f)
        return load(f, *args, **kwargs)

    torch.save = torch.serialization.save = saving
    torch.load = torch.serialization.load = loading
    for owner, name in ((os, "replace"), (os, "rename"), (shutil, "move")):
        setattr(owner, name, _moving(getattr(owner, name), saves))
    if importlib.util.find_spec("safetensors") is None:
        return
    safe = importlib.import_module("safetensors.torch")
    for name, kind in (
        ("save_file", "save"),
        ("save_model", "save"),
        ("load_file", "load"),
        ("load_model", "load"),
    ):
        original = getattr(safe, name, None)
        if original is None:
            continue
        setattr(safe, name, _safetensors(original, kind, saves))


def _moving(original: Any, saves: Saves) -> Any:
    @functools.wraps(original)
    def move(source: Any, destination: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(source, destination, *args, **kwargs)
        saves.moved(source, destination)
        return result

    return move


def _safetensors(original: Any, kind: str, saves: Saves) -> Any:
    """``save_file(tensors, filename, …)``, ``save_model(model, filename, …)``,
    ``load_file(filename, …)``, ``load_model(model, filename, …)``, noted."""
    name = original.__name__
    where = 0 if name == "load_file" else 1  # the filename's position

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        file = args[where] if len(args) > where else kwargs.get("filename")
        if kind == "load":
            saves.loaded(file)
            return original(*args, **kwargs)
        result = original(*args, **kwargs)
        saves.saved(None, file, "safetensors")  # its keys are tensor names: weights
        return result

    return wrapped
