"""``reprocheck resume``: does training resumed from its own checkpoint match the run that
never stopped?

Three runs of the command, each in a working folder of its own: (1) the *reference*,
uninterrupted, to step N; (2) the *stopped* run, ended at the step boundary right after its
first checkpoint saved at a step ≥ K (the hooks see ``torch.save`` and safetensors, and
the step each save holds); (3) the *resumed* run — the command with the resume arguments
— in run (2)'s folder, to step N. Runs (1) and (2) go side by side, then (3) beside the
*control*: the resumed run again in a copy of (2)'s folder, with one part of the state
disturbed after the load (:mod:`reprocheck.child.script.saves`), which must diverge.

The resumed run is aligned to the reference by content: its weights at its first step
equal the reference's after step c. Its state there (weights, optimizer, generators) is
compared with the reference's at step c, then its steps with steps c+1…N, record by record.
The first divergent record names what the checkpoint failed to restore (:func:`missing`).
Run (2) is also a second run of the command up to the checkpoint: where it already differs
from the reference, the training itself is not reproducible and no resume is judged.

For a config (``reprocheck run CONFIG --resume-at K``) reprocheck's own checkpoints are
proven the same way: the reference saves at K, the resumed run starts from that file.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from ..compare import record_key
from ..config import Config
from ..contract import (
    OBSERVED,
    STATE_PHASES,
    CheckpointPlan,
    Recipe,
    ResumeRun,
    RunMeta,
    Script,
    Target,
)
from ..doctor import rules
from ..trace import Record, Trace, TraceError
from ..verdict import EXIT_DIVERGED, EXIT_FAILED, EXIT_INTERRUPTED
from ..verdict import EXIT_REPRODUCIBLE as EXIT_OK
from .audit import make_audit_dir
from .launch import Launcher, RunResult, plan_legs

CONTROLS = ("auto", "rng", "optimizer", "data", "none")

# the keys of a saved object, by the state they name (what the checkpoint holds)
_HOLDS = (
    ("weights", ("model", "state_dict", "weights", "params", "net")),
    ("optimizer", ("optim",)),
    ("scheduler", ("sched", "lr_scheduler")),
    ("scaler", ("scaler",)),
    ("rng", ("rng", "random", "generator", "seed", "numpy")),
    ("data", ("data", "sampler", "loader", "epoch", "iter", "step", "loops", "batch")),
)


@dataclass(frozen=True)
class ResumeOptions:
    """What ``reprocheck resume`` (and ``run --resume-at``) was asked."""

    at: int
    resume_args: tuple[str, ...] = ()  # a script's: the words that make it resume
    control: str = "auto"
    out: str = "reports"
    timeout: float | None = None


# the state dicts torch's own objects save, by their keys
_STATE_DICTS = (
    ("optimizer", {"state", "param_groups"}),
    ("scheduler", {"base_lrs", "last_epoch"}),
    ("scaler", {"scale", "growth_factor"}),
    ("rng", {"python", "numpy", "cpu"}),
)


def holds(keys: list[str], writer: str) -> list[str]:
    """The kinds of state a saved object's top-level keys name: a state dict of torch's
    own (an optimizer's, a scheduler's, a GradScaler's, transformers' generator states) by
    its keys, a checkpoint dict by the words in its keys; safetensors: weights."""
    if writer == "safetensors":
        return ["weights"]
    for kind, known in _STATE_DICTS:
        if known <= set(keys):
            return [kind]
    found = []
    for kind, words in _HOLDS:
        if any(word in key.lower() for key in keys for word in words):
            found.append(kind)
    return found


def absolute_words(words: tuple[str, ...], folder: str) -> tuple[str, ...]:
    """The command's words, each that names an existing file or folder of ``folder`` (the
    script, its data, its config files; ``--data=PATH`` too) made absolute: the runs work
    in folders of their own, and what the script writes by a relative path lands there."""
    out = []
    for word in words:
        flag, sep, value = word.partition("=") if word.startswith("-") else ("", "", word)
        if value and not os.path.isabs(value) and os.path.exists(os.path.join(folder, value)):
            value = os.path.abspath(os.path.join(folder, value))
        out.append(flag + sep + value)
    return tuple(out)


# ------------------------------------------------------------------ the comparison


def _state(records: list[Record], phase: str) -> list[Record]:
    return [r for r in records if r.phase == phase]


def _first_difference(a: list[Record], b: list[Record]) -> tuple[Record | None, str] | None:
    """The first record where two lists differ: (the reference's record or the resumed
    run's where the reference has none, value | structure); None when equal."""
    for x, y in zip(a, b):
        if record_key(x) != record_key(y):
            same = (x.phase, x.name, x.shape, x.dtype) == (y.phase, y.name, y.shape, y.dtype)
            return x, "value" if same else "structure"
    if len(a) != len(b):
        return (a[len(b)] if len(a) > len(b) else b[len(a)]), "structure"
    return None


def _state_at(ref: list[Record], res: list[Record]) -> dict[str, dict[str, Any]]:
    out = {}
    for phase in STATE_PHASES:
        a, b = _state(ref, phase), _state(res, phase)
        if not a and not b:
            out[phase] = {"status": "absent", "tensor": None}
            continue
        found = _first_difference(a, b)
        out[phase] = {
            "status": "differs" if found else "equal",
            "tensor": found[0].name if found and found[0] is not None else None,
        }
    return out


def _weights(trace: Trace, step: int) -> list[tuple]:
    return [record_key(r) for r in trace.records(step) if r.phase == "weights"]


def align(reference: Trace, resumed: Trace, first: int, expected: int) -> int | None:
    """The reference step whose weights the resumed run's first step holds (the expected
    one, the checkpoint's, tried first), or None."""
    wanted = _weights(resumed, first)
    if not wanted:
        return None
    steps = [expected] + [s for s in reference.steps if s != expected]
    for step in steps:
        if step <= (reference.last_step or 0) and _weights(reference, step) == wanted:
            return step
    return None


@dataclass(frozen=True)
class Comparison:
    """The resumed run against the reference from the resume point on."""

    aligned: int | None
    start: int  # the reference step the resumed run's first step stands for
    state: dict[str, dict[str, Any]]
    compared: dict[str, int] | None
    divergence: dict[str, Any] | None
    latent: dict[str, Any] | None
    evidence: dict[str, Any]


def _unbatched(name: str) -> str:
    return re.sub(r"^batch\d+\.", "", name)


def _data_key(record: Record) -> tuple:
    return (_unbatched(record.name), record.shape, record.dtype, record.digest)


def _first_batches(previous: list[Record], a: list[Record], b: list[Record]) -> list[Record]:
    """The resumed run's first step with its batches read as the reference read them.

    Where the two runs fetched their batches in different steps, the resumed run's first
    step holds the batches it read to get back to its place — a resume that skips the
    batches already used reads them through the loader; a loader that fetches one batch
    ahead (accelerate's, under transformers) read the first one during the reference's
    step c. Its last batches are then compared with the last the reference read by the end
    of step c+1; where they agree, its data is the reference's of that step. Unchanged
    where they do not (the comparison then finds the data differing)."""
    da = [r for r in a if r.phase == "data"]
    db = [r for r in b if r.phase == "data"]
    if len(da) == len(db):
        return b
    stream = [r for r in previous if r.phase == "data"] + da
    n = min(len(db), len(stream))
    if not n or [_data_key(r) for r in db[-n:]] != [_data_key(r) for r in stream[-n:]]:
        return b
    return da + [r for r in b if r.phase != "data"]


def compare(
    reference_path: str, resumed_path: str, checkpoint_step: int, first: int = 0
) -> Comparison:
    """The resumed run (its first step ``first``: 0 for a script, the checkpoint's step
    for a config's run) against the reference: alignment, state, steps.

    A script's step 0 is recorded at its first optimizer step, after its first forward
    drew from the generators: its generators are compared after its first step instead
    (the reference's after step c+1); a config's run records them right after the
    restore."""
    script = first == 0
    with Trace(reference_path, own=True) as reference, Trace(resumed_path, own=True) as resumed:
        aligned = align(reference, resumed, first, checkpoint_step)
        # the content decides where the resumed run stands, but for the initial weights:
        # a resume that starts from them restored no model (compared from the checkpoint)
        start = aligned if aligned else checkpoint_step
        offset = start - first
        phases = OBSERVED if script else STATE_PHASES
        at_start = list(reference.records(start))
        ref0 = [r for r in at_start if r.phase in phases]
        res0 = [r for r in resumed.records(first) if r.phase in phases]
        state = _state_at(ref0, res0)
        last = min(reference.last_step or 0, (resumed.last_step or first) + offset)
        divergence = latent = None
        evidence: dict[str, Any] = {}
        steps = [(start, first, ref0, res0)]
        for step in range(start + 1, last + 1):
            steps.append((step, step - offset, None, None))
        for step, own_step, ref_records, res_records in steps:
            a = ref_records if ref_records is not None else list(reference.records(step))
            b = res_records if res_records is not None else list(resumed.records(own_step))
            if step == start + 1:
                b = _first_batches(at_start, a, b)
                if script:  # the generators after the first resumed step
                    state["rng"] = _state_at(a, b)["rng"]
                    state["rng"]["step"] = step
            found = _first_difference(
                [r for r in a if not r.latent], [r for r in b if not r.latent]
            )
            if found is not None:
                record, kind = found
                divergence = {
                    "step": step,
                    "resumed_step": own_step,
                    "phase": record.phase if record else None,
                    "tensor": record.name if record else None,
                    "kind": kind,
                }
                evidence.update(_evidence(reference, resumed, step, own_step, record))
                break
            if latent is None:
                found = _first_difference([r for r in a if r.latent], [r for r in b if r.latent])
                if found is not None and found[0] is not None:
                    latent = {"step": step, "tensor": found[0].name}
        if "step" not in state["rng"]:
            if script:  # no step after the resume point: the generators went unseen
                state["rng"] = {"status": "not compared", "tensor": None}
            state["rng"]["step"] = start
        if resumed.last_step is not None and resumed.last_step + offset < (
            reference.last_step or 0
        ):
            evidence["resumed_ended"] = resumed.last_step + offset
        compared = {"from": start + 1, "to": last, "steps": last - start} if last > start else None
        return Comparison(aligned, start, state, compared, divergence, latent, evidence)


def _evidence(
    reference: Trace, resumed: Trace, step: int, own_step: int, record: Record | None
) -> dict[str, Any]:
    """What the missing state is read from: where the resumed run's batch came from, the
    two losses of the step."""
    out: dict[str, Any] = {}
    if record is not None and record.phase == "data":
        batch = [record_key(r) for r in resumed.records(own_step) if r.phase == "data"]
        for other in reference.steps:
            if (
                other != step
                and [record_key(r) for r in reference.records(other) if r.phase == "data"] == batch
            ):
                out["batch_of_step"] = other
                break
    losses_ref, losses_res = reference.losses(), resumed.losses()
    out["losses"] = [losses_ref.get(step), losses_res.get(own_step)]
    return out


def _power_of_two(a: float | None, b: float | None) -> bool:
    if not a or not b or not math.isfinite(a) or not math.isfinite(b) or a == b:
        return False
    mantissa, _ = math.frexp(abs(b / a))
    return mantissa == 0.5 and (a > 0) == (b > 0)


def missing(result: Comparison, keys: list[str]) -> dict[str, Any] | None:
    """The state the checkpoint failed to restore, from the first divergent record and the
    state at the resume point: a finding of its rule (None where the runs agree)."""
    d = result.divergence
    if d is None:
        return None
    state = {phase: item["status"] for phase, item in result.state.items()}
    rng_lost = state["rng"] == "differs"
    phase, evidence = d["phase"], result.evidence
    facts = {**d, "keys": ", ".join(keys) or "—"}
    if not result.aligned:  # no step's weights, or the initial ones
        what = "weights"
    elif d["step"] == result.start:  # the state the resumed run started from
        what = "optimizer" if phase == "optimizer" else "weights"
    elif phase == "data":
        if "batch_of_step" in evidence:
            what = "data"
            facts["batch_of_step"] = evidence["batch_of_step"]
        else:
            what = "rng" if rng_lost else "data"
    elif phase in ("outputs", "forward"):
        what = "rng" if rng_lost else "unknown"
    elif phase == "loss":
        if _power_of_two(*evidence.get("losses", [None, None])):
            what = "scaler"
        else:
            what = "rng" if rng_lost else "unknown"
    elif phase in OBSERVED:
        what = "optimizer" if state["optimizer"] == "differs" else "scheduler"
    else:
        what = "rng" if rng_lost else "unknown"
    rule = rules.resume_rule(what)
    finding = rule.fire("resume", {**evidence, "state_at_resume": state}, **facts)
    return {"state": what, **finding}


# ------------------------------------------------------------------ the audit


def _last_step(result: RunResult) -> int | None:
    """The run's last committed step (a config's resumed run skips to the checkpoint's)."""
    try:
        with Trace(result.trace, own=True) as trace:
            return trace.last_step
    except TraceError:
        return result.last_step


def _run_entry(result: RunResult, workdir: str | None) -> dict[str, Any]:
    return {
        "trace": result.trace,
        "log": result.log,
        "workdir": workdir,
        "status": result.status,
        "steps": _last_step(result),
        "seconds": round(result.seconds, 3),
        "error": result.error,
        "log_tail": list(result.log_tail),
    }


def _meta(path: str) -> RunMeta:
    try:
        with Trace(path, own=True) as trace:
            return trace.run_meta
    except TraceError:
        return RunMeta()


def _losses(path: str, offset: int = 0, first: int = 0) -> list[list[Any]]:
    try:
        with Trace(path, own=True) as trace:
            return [[s + offset, loss] for s, loss in trace.losses().items() if s >= first]
    except TraceError:
        return []


def _draws(path: str, a: int, b: int) -> tuple[bool, bool]:
    """(whether the generators moved between steps a and b, whether the optimizer holds
    state at step a) in the reference: the controls that apply."""
    with Trace(path, own=True) as trace:
        rng_a = [record_key(r) for r in trace.records(a) if r.phase == "rng"]
        rng_b = [record_key(r) for r in trace.records(b) if r.phase == "rng"]
        optimizer = any(r.phase == "optimizer" for r in trace.records(a))
    return rng_a != rng_b, optimizer


def choose_control(asked: str, reference: str, step: int, last: int) -> str | None:
    """The control that runs: the one asked, or (``auto``) the generators where the
    script draws from them after the checkpoint, else the optimizer where it keeps state,
    else the data stream."""
    if asked == "none":
        return None
    if asked != "auto":
        return asked
    draws, optimizer = _draws(reference, step, last)
    return "rng" if draws else "optimizer" if optimizer else "data"


# what reprocheck's own checkpoint of a config's run holds (:data:`checkpoint.SAVED_KEYS`)
_OWN_HOLDS = ["data", "weights", "optimizer", "rng"]


class ResumeAudit:
    """The runs of one resume audit and their report."""

    def __init__(
        self,
        config: Config,
        target: Target,
        options: ResumeOptions,
        progress: Callable[[RunResult, int, int], None] | None = None,
    ) -> None:
        self.config = config
        self.target = target
        self.options = options
        self.folder = make_audit_dir(options.out, f"resume-{config.name}")
        self.workdirs = self.folder / "workdirs"
        self.launcher = Launcher(
            config, self.folder, jobs=2, timeout=options.timeout, progress=progress, target=target
        )
        self.leg = next(leg for leg in plan_legs(config) if leg.status != "skipped")
        self.started = time.monotonic()
        self.runs: dict[str, dict[str, Any]] = {}

    def _run(
        self, runs: list[tuple[str, dict[str, Any], str | None]], until: int
    ) -> list[RunResult]:
        done = self.launcher.named_runs(self.leg, [(n, extra) for n, extra, _ in runs], until)
        for (name, _, workdir), result in zip(runs, done):
            self.runs[name] = _run_entry(result, workdir)
        return done

    def _workdir(self, name: str) -> str:
        return str((self.workdirs / name).resolve())

    def report(self) -> dict[str, Any]:
        try:
            return self._audit()
        except KeyboardInterrupt:
            return self._verdict(
                "not_verified", "interrupted (Ctrl-C): every run stopped", code=EXIT_INTERRUPTED
            )

    def _verdict(
        self, verdict: str, reason: str | None = None, code: int | None = None, **more: Any
    ) -> dict[str, Any]:
        from .. import __version__

        exit_code = (
            code
            if code is not None
            else {
                "equivalent": EXIT_OK,
                "diverged": EXIT_DIVERGED,
                "not_reproducible": EXIT_DIVERGED,
            }.get(verdict, EXIT_FAILED)
        )
        report: dict[str, Any] = {
            "schema": "reprocheck.resume/1",
            "version": __version__,
            "verdict": verdict,
            "exit_code": exit_code,
            "reason": reason,
            "command": self._shown(self.target),
            # a config's resumed run is reprocheck's own: no command of the user's
            "resume_command": None
            if isinstance(self.target, Recipe)
            else self._shown(self._resume_target()),
            "at": self.options.at,
            "steps": None,
            "out_dir": str(self.folder),
            "runs": self.runs,
            "checkpoint": None,
            "aligned_step": None,
            "state_at_resume": None,
            "compared": None,
            "first_divergence": None,
            "latent": None,
            "before_resume": None,
            "missing": None,
            "control": None,
            "losses": {},
            "findings": [],
        }
        report.update(more)
        report["seconds"] = round(time.monotonic() - self.started, 3)
        return report

    def _shown(self, target: Target) -> list[str]:
        if isinstance(target, Recipe):
            return [self.config.path or self.config.name]
        return target.shown()

    def _resume_target(self) -> Target:
        if isinstance(self.target, Script) and self.options.resume_args:
            argv = self.target.argv + self.options.resume_args
            command = (
                self.target.command + self.options.resume_args if self.target.command else None
            )
            return replace(self.target, argv=argv, command=command)
        return self.target

    # -- the runs ----------------------------------------------------------------------------
    def _audit(self) -> dict[str, Any]:
        first_wave = self._first_wave()
        done = self._run(first_wave, self.config.steps or 0)
        for (name, _, _), result in zip(first_wave, done):
            if result.status != "complete":
                why = result.error or result.status
                return self._verdict("not_verified", f"the {name} run failed: {why}")
        reference = done[0]
        last = _last_step(reference)
        if not last:
            return self._verdict(
                "not_verified", "the reference run trained no step: nothing to resume"
            )
        saved, problem = self._checkpoint(done, last)
        if problem is not None:
            return problem
        step = saved["step"]
        control = choose_control(self.options.control, reference.trace, step, last)
        second = self._run(self._second_wave(saved, control, last), last)
        return self._judge(reference, second, saved, control, last)

    def _first_wave(self) -> list[tuple[str, dict[str, Any], str | None]]:
        """The reference, and (a script's) the run stopped after its checkpoint."""
        at = self.options.at
        if isinstance(self.target, Recipe):  # reprocheck's own checkpoint at step K
            every = CheckpointPlan(every=at, keep=self.config.steps // at + 1, prefix=self._prefix)
            return [("reference", {"checkpoints": every, "resume_run": ResumeRun()}, None)]
        reference, stopped = self._workdir("reference"), self._workdir("stopped")
        return [
            ("reference", {"resume_run": ResumeRun(cwd=reference)}, reference),
            ("stopped", {"resume_run": ResumeRun(cwd=stopped, stop_after_save=at)}, stopped),
        ]

    @property
    def _prefix(self) -> str:
        return str((self.folder / "reference.ckpt-").resolve())

    def _checkpoint(
        self, done: list[RunResult], last: int
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The checkpoint the resumed run starts from (step, files, keys), or the report
        that says why there is none to resume from (or why no resume can be judged)."""
        at = self.options.at
        if isinstance(self.target, Recipe):
            from ..checkpoint import SAVED_KEYS, path_for

            found = path_for(self._prefix, at)
            keys = list(SAVED_KEYS)
            saved = {
                "step": at,
                "files": [
                    {"file": found, "writer": "torch.save", "keys": keys, "holds": _OWN_HOLDS}
                ],
                "loaded": [found],
            }
            if not os.path.exists(found):
                why = f"reprocheck kept no checkpoint of step {at} (too large for its budget)"
                return saved, self._verdict("not_verified", why, steps=last)
            return saved, None
        saves = [
            s
            for s in _meta(done[1].trace).saves or []
            if isinstance(s, dict) and isinstance(s.get("step"), int)
        ]
        later = [s for s in saves if s["step"] >= at]
        if not later:
            seen = sorted({s["step"] for s in saves})
            said = (
                f"it saved at step{'s' if len(seen) > 1 else ''} {', '.join(map(str, seen))}"
                if seen
                else "it saved none (torch.save, safetensors)"
            )
            why = f"no checkpoint saved at or after step {at}: {said}"
            return {}, self._verdict("not_verified", why, steps=last)
        step = later[0]["step"]
        files = []
        for entry in saves:
            if entry["step"] == step:
                keys = [k for k in entry.get("keys") or [] if isinstance(k, str)]
                files.append({**entry, "holds": holds(keys, str(entry.get("writer")))})
        saved = {"step": step, "files": files, "loaded": []}
        if step >= last:
            why = (
                f"the first checkpoint at or after step {at} holds step {step}, the "
                "reference's last: nothing after it to compare"
            )
            return saved, self._verdict("not_verified", why, steps=last, checkpoint=saved)
        from ..compare import first_divergence

        reference, stopped = done[0].trace, done[1].trace
        before = first_divergence([reference, stopped], last_step=step, own=True)
        if before is None:
            return saved, None
        return saved, self._verdict(
            "not_reproducible",
            "two runs of the command differ before the checkpoint: resume cannot be judged; "
            "audit it with `reprocheck exec`",
            steps=last,
            checkpoint=saved,
            before_resume={"step": before.step, "phase": before.phase, "tensor": before.tensor},
            losses={"reference": _losses(reference), "stopped": _losses(stopped)},
        )

    def _second_wave(
        self, saved: dict[str, Any], control: str | None, last: int
    ) -> list[tuple[str, dict[str, Any], str | None]]:
        """The resumed run, and beside it the control: a config's from reprocheck's
        checkpoint file; a script's with the resume arguments, in the stopped run's folder
        (the control in a copy of it made before the resumed run writes there)."""
        if isinstance(self.target, Recipe):
            start = saved["files"][0]["file"]
            runs = [("resumed", {"resume_run": ResumeRun(start_from=start)}, None)]
            if control:
                plan = ResumeRun(start_from=start, disturb=control)
                runs.append(("control", {"resume_run": plan}, None))
            return runs
        target = self._resume_target().with_steps(last - saved["step"])
        where = self._workdir("stopped")
        runs = [("resumed", {"target": target, "resume_run": ResumeRun(cwd=where)}, where)]
        if control:
            copy = self._workdir("control")
            shutil.copytree(where, copy, symlinks=True)
            plan = ResumeRun(cwd=copy, disturb=control)
            runs.append(("control", {"target": target, "resume_run": plan}, copy))
        return runs

    def _judge(
        self,
        reference: RunResult,
        second: list[RunResult],
        saved: dict[str, Any],
        control: str | None,
        last: int,
    ) -> dict[str, Any]:
        """The resumed run (and the control) against the reference: the verdict."""
        resumed, step = second[0], saved["step"]
        first = step if isinstance(self.target, Recipe) else 0  # its first recorded state
        if not isinstance(self.target, Recipe):
            saved["loaded"] = [p for p in _meta(resumed.trace).loads or [] if isinstance(p, str)]
        keys = sorted({k for f in saved["files"] for k in f["keys"] if isinstance(k, str)})
        losses = {"reference": _losses(reference.trace)}
        base = {"steps": last, "checkpoint": saved, "losses": losses}
        if resumed.status != "complete":
            why = f"the resumed run failed: {resumed.error or resumed.status}"
            return self._verdict("not_verified", why, **base)
        resumed_last = _last_step(resumed)
        if resumed_last is None or resumed_last <= first:
            why = "the resumed run trained no step: do the resume arguments make it train on?"
            return self._verdict("not_verified", why, **base)
        result = compare(reference.trace, resumed.trace, step, first)
        offset = result.start - first
        losses["resumed"] = _losses(resumed.trace, offset, first + 1)
        lost = missing(result, keys)
        more = {
            **base,
            "aligned_step": result.aligned,
            "state_at_resume": result.state,
            "compared": result.compared,
            "first_divergence": result.divergence,
            "latent": result.latent,
            "missing": lost,
            "findings": [lost] if lost else [],
        }
        if len(second) > 1:
            more["control"] = self._control(
                second[1], reference.trace, step, first, control, result
            )
            if second[1].status == "complete":
                losses["control"] = _losses(second[1].trace, offset, first + 1)
        if result.divergence is not None:
            return self._verdict("diverged", **more)
        if result.compared is None:
            why = "the resumed run has no step after the checkpoint to compare"
            return self._verdict("not_verified", why, **more)
        return self._verdict("equivalent", **more)

    def _control(
        self,
        run: RunResult,
        reference: str,
        step: int,
        first: int,
        what: str | None,
        resumed: Comparison,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "what": what,
            "applied": None,
            "reason": None,
            "diverged": None,
            "first_divergence": None,
        }
        if run.status != "complete":
            out["reason"] = f"the control run failed: {run.error or run.status}"
            out["statement"] = out["reason"]
            return out
        disturbed = _meta(run.trace).disturbed or {}
        out["applied"] = bool(disturbed.get("applied"))
        if not out["applied"]:
            out["reason"] = (
                disturbed.get("reason") or "the control run never reached its first step"
            )
            out["statement"] = f"the {what} control was not applied: {out['reason']}"
            return out
        result = compare(reference, run.trace, step, first)
        out["diverged"] = result.divergence is not None
        out["first_divergence"] = result.divergence
        if resumed.divergence is not None:
            out["statement"] = (
                f"the {what} control ran, but the resume itself diverged: the control "
                "says nothing more"
            )
        elif result.divergence is not None:
            d = result.divergence
            out["statement"] = (
                f"the {what} control diverged at step {d['step']} · {d['phase']} · {d['tensor']}: "
                f"the audit sees a resume that loses the {_STATE_NAMES[what]}"
            )
        else:
            out["statement"] = (
                f"the {what} control matched: the script does not depend on its "
                f"{_STATE_NAMES[what]} within the steps compared, so the match proves less"
            )
        return out


_STATE_NAMES = {
    "rng": "generators' state",
    "optimizer": "optimizer's state",
    "data": "data stream's position",
}
