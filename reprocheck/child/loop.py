"""The training recipe one run follows: build, record step 0, then train and record.

Read top to bottom, this is what ``reprocheck run`` does to a config inside each run's
process, after :func:`reprocheck.determinism.apply_controls`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from .. import checkpoint
from ..config import Config, ConfigError
from ..contract import CheckpointPlan
from ..determinism import dataloader_generator, seed_worker
from ..localize import OpCapture, OpRecord
from ..recorder import StepRecorder, batch_tensors, flatten, parameter_names
from ..usercode import resolve_callable


def build_model(config: Config, device: torch.device) -> torch.nn.Module:
    factory = resolve_callable(config.model.factory, config.base_dir)
    model = factory(**dict(config.model.kwargs))
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"model: factory {config.model.factory} returned {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    return model.to(device)


def compile_in_place(model: torch.nn.Module, backend: str | None = None) -> None:
    """``model.compile()``: its forward through ``torch.compile`` (the default backend, or
    ``backend``) while the module, its parameters and their names stay what they are
    (torch ≥ 2.2)."""
    if not hasattr(model, "compile"):
        raise RuntimeError(
            f"compile legs need torch >= 2.2 (nn.Module.compile); this is torch {torch.__version__}"
        )
    from ..compiled import resolve

    model.compile(**({"backend": resolve(backend)} if backend else {}))


def build_dataset(config: Config) -> Any:
    """What the data factory returns (given the config's seed if it takes one)."""
    factory = resolve_callable(config.data.factory, config.base_dir)
    kwargs = dict(config.data.kwargs)
    try:
        accepts_seed = "seed" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepts_seed = False
    if accepts_seed and "seed" not in kwargs:
        kwargs["seed"] = config.seed  # synthetic data is made from the config's seed
    return factory(**kwargs)


def build_data(config: Config) -> Any:
    """A DataLoader over the factory's Dataset (seeded generator and worker seeding), or
    the factory's own DataLoader / iterable of batches, used as is."""
    data = build_dataset(config)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        seeded = config.determinism.dataloader_generator
        return DataLoader(
            data,
            batch_size=config.data.batch_size,
            shuffle=config.data.shuffle,
            num_workers=config.data.num_workers,
            drop_last=config.data.drop_last,
            generator=dataloader_generator(config.seed) if seeded else None,
            worker_init_fn=seed_worker if seeded and config.data.num_workers > 0 else None,
        )
    if isinstance(data, (DataLoader, Dataset)) or hasattr(data, "__iter__"):
        return data
    raise ConfigError(
        f"data: factory {config.data.factory} returned {type(data).__name__}; "
        "return a Dataset, a DataLoader or an iterable of batches"
    )


def build_optimizer(config: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    optimizer_class = getattr(torch.optim, config.optimizer.name)
    try:
        return optimizer_class(model.parameters(), **dict(config.optimizer.kwargs))
    except TypeError as exc:
        raise ConfigError(f"optimizer: {config.optimizer.name}: {exc}") from None


def resolve_loss(config: Config) -> Callable[..., torch.Tensor]:
    if ":" in config.loss:
        return resolve_callable(config.loss, config.base_dir)
    return getattr(torch.nn.functional, config.loss)


def batches(data: Any, device: torch.device) -> Iterator[Any]:
    """Batches on the run's device, epoch after epoch until the loop stops asking."""
    while True:
        produced = False
        for batch in data:
            produced = True
            yield to_device(batch, device)
        if not produced or iter(data) is data:  # empty, or a one-shot iterator now spent
            raise RuntimeError("the data ran out of batches before the last step")


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=False)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def split_batch(batch: Any) -> tuple[Any, Any]:
    """(input, target) for the default step."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "input" in batch and "target" in batch:
        return batch["input"], batch["target"]
    raise ConfigError(
        "the default step needs (input, target) batches; got "
        f"{type(batch).__name__} — write a custom `step: module:function(model, batch, optimizer)`"
    )


def train(
    config: Config,
    device: torch.device,
    recorder: StepRecorder,
    steps: int,
    zoom_step: int | None = None,
    depth: str = "step",
    checkpoints: CheckpointPlan | None = None,
    resume: str | None = None,
    compile: bool = False,
    backend: str | None = None,
    canary: dict[str, Any] | None = None,
    disturb: str | None = None,
    resume_point: bool = False,
) -> list[OpRecord]:
    """Run ``steps`` optimizer steps, recording step 0 and each step.

    ``zoom_step``: capture every aten op of that step (0: of building the model) and
    return them; the other steps run untouched. ``depth``: ``module`` also records every
    module's output and grad_output, ``op`` every aten op's output, inside each step.
    ``checkpoints``: save the state every few steps (:mod:`.checkpoint`); ``resume``: a
    replay that starts from that checkpoint instead of step 1. ``canary``: the canary
    run (:mod:`reprocheck.canary`): one bit of the first weight flipped right before step
    ``canary["step"]``'s weights are recorded; what was flipped is written into it.
    ``disturb``: a resume control (``run --resume-at K``) — after the restore, the
    generators re-seeded from entropy (``rng``), the optimizer's state zeroed
    (``optimizer``) or one batch skipped (``data``). ``resume_point``: a resume audit's
    run also records the state it resumed at (the checkpoint's step, after the restore).
    """
    capture = OpCapture(None) if zoom_step == 0 else None
    with capture.during("forward") if capture else contextlib.nullcontext():
        model = build_model(config, device)
    if compile:  # a compile leg: the model compiled in place, its names unchanged
        compile_in_place(model, backend)
    # torch.compile'd modules (the doctor's RC017); checked by type name, any torch version
    recorder.compiled = compile or any(
        type(m).__name__ == "OptimizedModule" for m in model.modules()
    )
    data = build_data(config)
    optimizer = build_optimizer(config, model)
    loss_fn = resolve_loss(config)
    custom_step = resolve_callable(config.step, config.base_dir) if config.step else None
    names = parameter_names(model)

    recorder.begin(0)
    _canary(canary, 0, model)
    recorder.state(model, [optimizer], names)
    recorder.commit(0, None)
    if depth == "module":
        hook_modules(model, recorder)

    model.train()
    stream = batches(data, device)
    first = 1
    if resume:  # the data stream is drawn up to the checkpoint, then the state restored
        state = checkpoint.load(resume)
        for _ in range(state["step"]):
            next(stream)
        checkpoint.restore(state, model, optimizer)
        first = state["step"] + 1
        if disturb is not None:
            recorder.writer.set_meta(disturbed=_disturb(disturb, optimizer, stream))
        if resume_point:
            recorder.begin(state["step"])
            recorder.state(model, [optimizer], names)
            recorder.commit(state["step"], None)
    saver = checkpoint.Checkpointer.planned(checkpoints) if checkpoints else None
    for step in range(first, steps + 1):
        recorder.begin(step)
        if step == zoom_step or depth == "op":
            capture = OpCapture(model)
        part = capture.during if capture and (step == zoom_step or depth == "op") else _untouched
        batch = next(stream)
        recorder.add_all("data", batch_tensors(batch))
        if custom_step is not None:
            with part("forward"):
                result = custom_step(model, batch, optimizer)
            loss, output = result if isinstance(result, tuple) else (result, None)
            if depth == "op":
                recorder.add_ops("forward", [op for op in capture.ops if op.stage == "forward"])
            if output is not None:
                recorder.add_all("outputs", flatten(output, "output"))
            recorder.add_all("loss", [("loss", loss)])
            if depth == "op":
                recorder.add_ops("backward", [op for op in capture.ops if op.stage == "backward"])
        else:
            inputs, target = split_batch(batch)
            with part("forward"):
                output = model(inputs)
                loss = loss_fn(output, target)
            if depth == "op":
                recorder.add_ops("forward", capture.ops)
            recorder.add_all("outputs", flatten(output, "output"))
            recorder.add_all("loss", [("loss", loss)])
            optimizer.zero_grad(set_to_none=True)
            forward_ops = len(capture.ops) if capture else 0
            with part("backward"):
                loss.backward()
            if depth == "op":
                recorder.add_ops("backward", capture.ops[forward_ops:])
        recorder.grads(model)
        if custom_step is None:
            with part("optimizer"):
                optimizer.step()
        _canary(canary, step, model)
        recorder.state(model, [optimizer], names)
        recorder.commit(step, loss)
        if saver:
            saver.after_step(step, steps, model, optimizer)
    return capture.ops if capture and zoom_step is not None else []


def _disturb(what: str, optimizer: torch.optim.Optimizer, stream: Iterator[Any]) -> dict[str, Any]:
    """A resume control's disturbance, right after the restore: what it did."""
    if what == "rng":
        checkpoint.reseed_from_entropy()
    elif what == "optimizer":
        if not checkpoint.zero_optimizer_state([optimizer]):
            return {"what": what, "applied": False, "reason": "the optimizer held no state"}
    else:
        next(stream)
    return {"what": what, "applied": True, "reason": None}


def _canary(canary: dict[str, Any] | None, step: int, model: torch.nn.Module) -> None:
    if canary is not None and canary["step"] == step and "planted" not in canary:
        from ..canary import plant

        canary["planted"] = plant(model.state_dict(keep_vars=True).items(), step)


def hook_modules(model: torch.nn.Module, recorder: StepRecorder) -> None:
    """``--depth module``: every module's output (forward) and grad_output (backward)."""
    for path, module in model.named_modules():
        name = path or type(module).__name__

        def forward(module, inputs, output, name=name):
            recorder.add_all("forward", flatten(output, f"module:{name}"))

        def backward(module, grad_input, grad_output, name=name):
            recorder.add_all("backward", flatten(grad_output, f"module:{name}.grad_output"))

        module.register_forward_hook(forward)
        module.register_full_backward_hook(backward)


def _untouched(stage: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()
