"""The rule catalog: each known source of irreproducibility as data, in ruff's shape.

One list, :data:`RULES`, serves ``reprocheck explain CODE``, the findings in reports and
``docs/rules.md`` (``python -m reprocheck.doctor.rules`` regenerates it). Every claim
was checked on torch 2.13 (CPU) before it became a rule; where recent torch already fixed
a problem (torch seeds ``random``, torch and NumPy in DataLoader workers), the rule says
so and does not fire for it.

One rule, one home: each entry also holds the ways it fires (:class:`Way`) — each way's
message, its trigger where the facts alone decide, and a fix where the facts name the
script's own call — so a check elsewhere gathers facts and says
``rules.RC015.fire("entropy call", evidence, **facts)``. No rule code or message is written
outside the doctor, no cause outside :mod:`reprocheck.causes` (tests/test_rules_home.py);
:func:`for_cause` is the one map from the zoom's cause to a rule.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..causes import Cause

if TYPE_CHECKING:
    from ..config import Config
    from ..replicas import ReplicaDivergence


@dataclass(frozen=True)
class Way:
    """One way a rule fires. ``message``: the finding's text from the facts that fired it
    (a template ``str.format``-ed with them and the rule's ``code``, or a function of
    them); ``when``: the trigger, where its facts alone decide; ``fix``: a fix naming the
    script's own call, from the message's facts (None, or none returned: the rule's)."""

    message: str | Callable[..., str]
    when: Callable[..., Any] | None = None
    fix: Callable[..., str | None] | None = None


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    what: str  # What it does
    why: str  # Why is this bad?
    example: str
    fix: str  # Use instead
    severity: str = "error"  # error | warning (a warning never changes an exit code)
    ways: Mapping[str, Way] = field(default_factory=dict, compare=False, repr=False)

    def explain(self) -> str:
        """The full text, as `reprocheck explain` prints it."""
        return (
            f"{self.code} {self.name}\n\n## What it does\n{self.what}\n\n"
            f"## Why is this bad?\n{self.why}\n\n## Example\n```python\n{self.example}\n```\n\n"
            f"## Use instead\n{self.fix}\n"
        )

    def fires(self, way: str, **facts: Any) -> bool:
        """Whether the trigger of ``way`` fires on ``facts`` (False for a way this rule
        lacks, or one whose trigger is an experiment run elsewhere)."""
        found = self.ways.get(way)
        return found is not None and found.when is not None and bool(found.when(**facts))

    def fire(self, way: str, evidence: Any = None, **facts: Any) -> dict[str, Any]:
        """This rule's finding, fired ``way`` on ``facts``, as reports carry it: code, rule
        name, severity, message, fix, evidence."""
        how = self.ways[way]
        if isinstance(how.message, str):
            message = how.message.format(code=self.code, **facts)
        else:
            message = how.message(**facts)
        fix = how.fix(**facts) if how.fix is not None else None
        return {
            "code": self.code,
            "name": self.name,
            "severity": self.severity,
            "message": message,
            "fix": fix or self.fix.split("\n")[0],
            "evidence": evidence,
        }


# -- ways several rules share, and what their messages have in common ----------------------

# the doctor's probes: a config run two ways (``what``) that differ (``where``: step, phase,
# tensor of the first difference)
_DIFFER = "{what} differ from step {where[step]} · {where[phase]} · {where[tensor]}"
PROBE = Way(_DIFFER)
# attribution: the one control (``control``) that makes the divergent runs reproduce
CONTROL = Way("with {control} the runs reproduce ({code})")


def _runs(groups: list[list[int]]) -> str:
    """Runs grouped by what they recorded: ``#0 ≠ #1,#2``."""
    return " ≠ ".join(",".join(f"#{run}" for run in group) for group in groups)


def _fixed(call: str) -> str:
    """The fixed-seed form of a seeding call: ``torch.seed`` → ``torch.manual_seed(0)``."""
    fixed = {
        "torch.seed": "torch.manual_seed(0)",
        "torch.cuda.seed": "torch.cuda.manual_seed(0)",
        "torch.cuda.seed_all": "torch.cuda.manual_seed_all(0)",
        "np.random.default_rng": "np.random.default_rng(0)",
        "np.random.SeedSequence": "np.random.SeedSequence(0)",
    }
    return fixed.get(call, f"{call}(0)")


RC001 = Rule(
    "RC001",
    "python-random-unseeded",
    "Flags an audit whose controls leave Python's `random` module unseeded.",
    "Shuffles and augmentations drawn from `random` differ in every process.",
    "import random\n\nrandom.shuffle(files)  # never seeded",
    "`random.seed(seed)` at start-up (reprocheck's `seeded` preset does it: "
    "`determinism.seed_python: true`).",
    ways={
        "config": Way(
            "Python's `random` is not seeded (determinism.seed_python)",
            when=lambda config: not config.determinism.seed_python,
        ),
    },
)

RC002 = Rule(
    "RC002",
    "numpy-unseeded",
    "Flags an audit whose controls leave NumPy's global generator unseeded.",
    "NumPy-based augmentation and sampling differ in every process.",
    "noise = np.random.randn(*shape)  # global generator, never seeded",
    "`np.random.seed(seed)`, or a `np.random.default_rng(seed)` passed around "
    "(`determinism.seed_numpy: true`).",
    ways={
        "config": Way(
            "NumPy's global generator is not seeded (determinism.seed_numpy)",
            when=lambda config: not config.determinism.seed_numpy,
        ),
    },
)

RC003 = Rule(
    "RC003",
    "torch-unseeded",
    "Flags an audit whose controls leave torch's CPU and CUDA generators unseeded.",
    "Initial weights, dropout masks and `randperm` shuffles differ in every process.",
    "model = Net()  # init draws from an unseeded generator",
    "`torch.manual_seed(seed)` (seeds every CUDA device too; "
    "`torch.cuda.manual_seed_all(seed)` where CUDA is initialised first).",
    ways={
        "config": Way(
            "torch's generators are not seeded (determinism.seed_torch)",
            when=lambda config: not config.determinism.seed_torch,
        ),
        "control": CONTROL,
        # attribution: no control alone, every control at once makes the runs reproduce
        "all controls": Way("only all the controls together make the runs reproduce"),
    },
)

RC004 = Rule(
    "RC004",
    "pythonhashseed-unset",
    "Flags runs whose order of `set`/`dict` iteration over strings changes with "
    "PYTHONHASHSEED: found by running with two hash seeds, and by attribution.",
    "String hashes are salted per process: vocabularies, label maps or file lists built by "
    "iterating a set come out in another order, so token ids and batches differ.",
    "vocab = {w: i for i, w in enumerate(set(words))}",
    "Set `PYTHONHASHSEED` in the environment before Python starts (reprocheck does: "
    "`determinism.pythonhashseed: 0`); setting `os.environ` inside the script is too late. "
    "Better: `sorted(set(words))`.",
    ways={"probe": PROBE, "control": CONTROL},
)

RC005 = Rule(
    "RC005",
    "cudnn-benchmark",
    "Flags `torch.backends.cudnn.benchmark = True` in the controls.",
    "cuDNN times several convolution algorithms per shape and keeps the fastest; the "
    "choice, and so the numerics, can change between runs.",
    "torch.backends.cudnn.benchmark = True",
    "`torch.backends.cudnn.benchmark = False` and `cudnn.deterministic = True` "
    "(the `strict` preset).",
    ways={
        "config": Way(
            "cudnn.benchmark is on: cuDNN may pick other kernels per run",
            when=lambda config: config.determinism.cudnn_benchmark,
        ),
        "control": CONTROL,
    },
)


def _cuda_op(op: str, does: str, source: str | None, backward: bool) -> str:
    at = "in the backward of the op at" if backward else "at"
    return f"aten.{op} ({does}) {at} {source or '(no user frame)'} is nondeterministic on CUDA"


RC006 = Rule(
    "RC006",
    "nondeterministic-cuda-op",
    "Lists every aten op the model runs (forward and backward, captured in one step on "
    "any device) that PyTorch documents as nondeterministic on CUDA, with the line that "
    "called it. Works on a CPU-only machine, where these ops run deterministically.",
    "Atomic adds in these kernels (index_add_, scatter_add_, interpolate backward, "
    "embedding_bag backward, ...) sum in a different order on every run of a GPU.",
    'out = F.interpolate(x, scale_factor=2, mode="bilinear")\nacc.index_add_(0, idx, src)',
    "`torch.use_deterministic_algorithms(True)` (raises where no deterministic kernel "
    "exists; `warn_only=True` to list them), or an equivalent deterministic formulation "
    "(e.g. a sort-then-segment reduction).",
    # the op scan (probe): an op captured in one step that is on the documented list
    ways={"op": Way(_cuda_op)},
)


def _cublas_unset(config: Config) -> bool:
    d = config.determinism
    cuda = any(device.startswith("cuda") for device in config.devices)
    workspace = d.cublas_workspace or os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    return cuda and bool(d.deterministic_algorithms) and not workspace


RC007 = Rule(
    "RC007",
    "cublas-workspace-unset",
    "Flags a CUDA leg with deterministic algorithms on but no CUBLAS_WORKSPACE_CONFIG.",
    "cuBLAS may split reductions differently per call; with deterministic algorithms on "
    "and no workspace setting, torch raises in matmuls on CUDA ≥ 10.2.",
    "torch.use_deterministic_algorithms(True)  # CUBLAS_WORKSPACE_CONFIG unset",
    "`CUBLAS_WORKSPACE_CONFIG=:4096:8` (or `:16:8`) before CUDA starts "
    "(`determinism.cublas_workspace`).",
    ways={
        "config": Way(
            "deterministic algorithms on a CUDA leg without CUBLAS_WORKSPACE_CONFIG",
            when=_cublas_unset,
        ),
        "control": CONTROL,
    },
)

RC008 = Rule(
    "RC008",
    "dataloader-unseeded",
    "Flags a reprocheck-built DataLoader without a seeded generator "
    "(`determinism.dataloader_generator: false`) that shuffles or uses workers.",
    "The shuffle order comes from torch's global generator at iterator creation; any "
    "extra draw before it reorders every epoch. (Workers themselves are seeded by torch "
    "≥ 1.9 from the loader's base seed — `random`, torch and NumPy — checked on 2.13.)",
    "DataLoader(ds, shuffle=True, num_workers=2)",
    "`DataLoader(ds, shuffle=True, generator=torch.Generator().manual_seed(seed))`.",
    ways={
        "config": Way(
            "the DataLoader shuffles without a seeded generator "
            "(determinism.dataloader_generator: false)",
            when=lambda config: (
                not config.determinism.dataloader_generator
                and (config.data.shuffle or config.data.num_workers)
            ),
        ),
        "control": CONTROL,
    },
)

RC009 = Rule(
    "RC009",
    "num-workers-sensitive",
    "Runs the config with `num_workers=0` and with its own value and compares them.",
    "Results that change with the worker count cannot be compared across machines or "
    "settings even when each setting reproduces.",
    "DataLoader(ds, num_workers=os.cpu_count())",
    "Keep `num_workers` fixed between runs that are compared; derive per-sample "
    "randomness from the sample index, not from the worker.",
    ways={"probe": PROBE, "control": CONTROL},
)

RC010 = Rule(
    "RC010",
    "thread-count-sensitive",
    "Runs the config with 1 and 2 threads and compares them bit for bit.",
    "CPU reductions (sum, matmul, conv, index_put accumulation) split work by thread; "
    "another thread count gives other last bits, which training amplifies.",
    "torch.set_num_threads(os.cpu_count())",
    "Set `torch.set_num_threads(n)` once (the config's `threads`), and compare other thread "
    "counts under a tolerance, never bitwise.",
    ways={"probe": PROBE, "control": CONTROL},
)

RC011 = Rule(
    "RC011",
    "nondeterministic-cpu-accumulation",
    "Names a CPU op whose result differs between runs with identical inputs (the zoom's "
    "`nondeterministic op`), e.g. advanced-indexing backward (`table[idx]`) through "
    "`index_put_(accumulate=True)` with more than one thread.",
    "The accumulation order over repeated indices depends on thread scheduling: every "
    "run sums in another order (seen on torch 2.13 CPU with 2 threads).",
    "vectors = table[idx]  # idx with many repeats; 2 threads",
    "`torch.use_deterministic_algorithms(True)` (makes this accumulation deterministic "
    "on CPU) or one thread.",
    ways={
        "control": CONTROL,
        # the zoom's op (``for_cause``); ``prefix``: what attribution tried first
        "cause": Way(
            "{prefix}{op} at {where} is nondeterministic",
            when=lambda cause: cause == Cause.NONDETERMINISTIC_OP,
        ),
    },
)


def _entropy_call(call: dict[str, Any], step: int, phase: str) -> str:
    return (
        f"`{call['call']}()` at {call['where']} builds a generator from entropy in every run: "
        f"what it draws differs, and the runs part at step {step} · {phase}"
    )


def _generator_differed(
    generator: dict[str, Any],
    seeding: str | None,
    where: str | None,
    step: int,
    call: dict[str, Any] | None,
) -> str:
    g = generator
    drawn = f" (drawn at {where})" if where else ""
    why = f": {seeding}" if seeding else ""
    return (
        f"generator {g['name']} differed between runs {_runs(g['runs'])} from step "
        f"{g['step']}{why}; what is drawn from it{drawn} differs from step {step} on"
    )


def _seeding_fix(call: dict[str, Any] | None, **facts: Any) -> str | None:
    """The script's own seeding call and line, where one made the generators differ."""
    if not call:
        return None
    if call.get("value") == "entropy":
        return (
            f"`{call['call']}()` at {call['where']} seeds from entropy, other in every "
            f"run: remove it, or seed with a fixed value (`{_fixed(call['call'])}`)"
        )
    return (
        f"`{call['call']}` at {call['where']} takes a value that differs between runs: pass "
        "it a fixed seed"
    )


RC015 = Rule(
    "RC015",
    "entropy-seeded-generator",
    "Names a random op whose generator drew different values in runs with identical "
    "inputs and seeding: a generator seeded from time or OS entropy, or re-seeded.",
    "No global seed reaches a `torch.Generator()` seeded from `os.urandom`, "
    "`time.time()` or `uuid4`: every process draws other numbers.",
    "g = torch.Generator().manual_seed(int(time.time()))",
    "Derive every generator's seed from the configured one: "
    "`torch.Generator().manual_seed(seed + offset)`.",
    ways={
        # a generator the script built from entropy (its seeding calls), in every run
        "entropy call": Way(
            _entropy_call,
            fix=lambda call, **facts: (
                f"seed it: `{_fixed(call['call'])}` at {call['where']} (or derive it from "
                "your seed)"
            ),
        ),
        # a generator whose state differed at or before the divergence, where the zoom
        # named no other cause
        "generator": Way(
            _generator_differed,
            when=lambda generator, cause: bool(generator) and cause in (None, Cause.RNG),
            fix=_seeding_fix,
        ),
        # the zoom's random op (``for_cause``); ``prefix``: what attribution tried first
        "cause": Way(
            "{prefix}a generator seeded outside the configured seed draws at {where}",
            when=lambda cause: cause == Cause.RNG,
        ),
    },
)

RC017 = Rule(
    "RC017",
    "torch-compile",
    "Flags a model that runs through `torch.compile` (an `OptimizedModule` in the model).",
    "Compiled kernels may fuse and reorder float operations differently from eager mode "
    "and between compilations; autotuning makes choices per run.",
    'model = torch.compile(model, mode="max-autotune")',
    "Audit eager and compiled separately; for bitwise reproducibility avoid autotuning "
    "modes and pin the torch version.",
    ways={
        "op scan": Way(
            "the model runs through torch.compile", when=lambda env: bool(env.get("compiled"))
        ),
    },
)


def _latent(generators: list[str], runs: list[list[int]], step: int, process: str) -> str:
    many = len(generators) > 1
    names = ("generators " if many else "generator ") + ", ".join(generators)
    inside = "" if process == "main" else f" in process {process}"
    return (
        f"{names} {'differ' if many else 'differs'} between runs {_runs(runs)} from step "
        f"{step}{inside}, while nothing drawn from {'them' if many else 'it'} differs"
    )


RC018 = Rule(
    "RC018",
    "generator-differs-latent",
    "Names a generator (torch's CPU or CUDA generator, NumPy's global one, Python's "
    "`random`) whose state differs between runs while every observable record — data, "
    "outputs, loss, gradients, weights, optimizer state — is identical. A warning: the "
    "runs reproduce today, and the verdict does not change.",
    "Nothing draws from the generator yet, so nothing differs; the first `np.random` "
    "augmentation, `random.shuffle` or dropout added to the script will differ in "
    "every run. When an observable divergence follows, this generator is its cause.",
    "torch.manual_seed(1337)  # the script seeds torch only\n"
    "# NumPy's and random's global generators start from OS entropy in every process",
    "Seed every generator the script or its libraries may draw from: "
    "`random.seed(seed)`, `np.random.seed(seed)`, `torch.manual_seed(seed)` (or run "
    "under reprocheck's `seeded` preset).",
    severity="warning",
    ways={"latent": Way(_latent)},
)


def _eval_in_training(
    model: str,
    where: str,
    layers: list[str],
    process: str,
    step: int | None = None,
    **seen: Any,
) -> str:
    after = f" after step {step}" if step is not None else ""
    inside = "" if process == "main" else f" in process {process}"
    return (
        f"{model} is evaluated under no_grad at {where}{after}{inside} with "
        f"{', '.join(layers)} in training mode"
    )


RC019 = Rule(
    "RC019",
    "eval-in-training-mode",
    "Flags an evaluation forward — a model called under `torch.no_grad()` or "
    "`torch.inference_mode()` — while its dropout or batch-norm layers are in training "
    "mode (`model.eval()` was never called, or `model.train()` came too early).",
    "`no_grad` turns off gradients, not training behaviour (checked on torch 2.13): "
    "dropout still drops units and draws from torch's generator, so every evaluation "
    "shifts the masks of all later training steps and its metric is noisy; batch norm "
    "normalises with the batch's statistics and moves its running statistics with "
    "evaluation data, so evaluating changes the model.",
    "@torch.no_grad()\ndef estimate_loss():\n"
    "    return model(x_val).loss  # the model is still in train()",
    "`model.eval()` before the evaluation and `model.train()` after it (nanoGPT's "
    "`estimate_loss` does both).",
    severity="warning",
    # noted by the script's hooks while it ran (``meta.observations``, by this rule's name)
    ways={"observed": Way(_eval_in_training)},
)

RC020 = Rule(
    "RC020",
    "uninitialized-memory-read",
    "Flags values of uninitialized memory (`torch.empty`, `empty_like`, `new_empty`, a "
    "`resize_` that grows) that reach a recorded tensor: a run with "
    "`torch.utils.deterministic.fill_uninitialized_memory` on differs from one with it "
    "off, deterministic algorithms on in both.",
    "Such memory holds whatever the allocator last left there: it can repeat on one "
    "machine and differ on the next, after a library update, or from run to run. With "
    "deterministic algorithms on, torch ≥ 2.1 fills it with NaN (floats) or the largest "
    "integer, which turns the silent read into a visible one.",
    "buffer = torch.empty(batch, 2 * dim)\nbuffer[:, :dim] = features  # the other half is "
    "never written\nlogits = head(buffer)",
    "Allocate with `torch.zeros`/`torch.full`, or write every element before reading; "
    "`torch.use_deterministic_algorithms(True)` (with `fill_uninitialized_memory`, its "
    "default) makes the read show as NaN.",
    ways={
        # what uninitialized memory holds follows the process's whole allocation history:
        # the probe reports it alone
        "probe": Way(
            _DIFFER + "; the thread, hash-seed and worker probes are inconclusive while it is read"
        ),
        "control": CONTROL,
    },
)


def _drift(packages: dict[str, list[str]]) -> str:
    moved = ", ".join(f"{name} {then} → {now}" for name, (then, now) in packages.items())
    return f"the run imports other versions than the golden's did: {moved}"


RC021 = Rule(
    "RC021",
    "version-drift",
    "Flags a golden check whose current run imports other versions of packages than "
    "the golden's run did (torch, NumPy, and every other distribution the run imported).",
    "A new release changes kernels, default algorithms and numerics: a golden trace "
    "recorded under one set of versions may not match bit for bit under another, and "
    "the report must say that the environment moved, not only that the numbers did.",
    "# golden recorded with numpy 1.26.4; CI now installs numpy 2.1.0",
    "Pin the versions in CI to those of the golden (a lock file), or re-record the "
    "golden after an intended upgrade: `reprocheck record … -o golden.sqlite`.",
    severity="warning",
    ways={"drift": Way(_drift)},
)


def _replicas(d: ReplicaDivergence) -> tuple[str, str]:
    """Where replicas split (``step s · phase · tensor``), and their ranks by digest."""
    return f"step {d.step} · {d.phase} · {d.tensor}", " ≠ ".join(
        ",".join(map(str, group)) for group in d.ranks
    )


def _buffers_unsynced(divergence: ReplicaDivergence) -> str:
    where, groups = _replicas(divergence)
    return (
        f"buffer {divergence.tensor} differs between replicas (ranks {groups}) from {where}, "
        "while every parameter agrees: buffers are not synchronised across ranks"
    )


RC022 = Rule(
    "RC022",
    "replica-buffers-unsynced",
    "Flags a data-parallel job whose replicas hold different buffers (batch norm's "
    "running statistics, counters) after a step while every parameter still agrees.",
    "DDP averages gradients, not buffers: with `broadcast_buffers=False`, or batch norm "
    "on each rank's own shard, every rank keeps its own running statistics, so the "
    "model each rank evaluates or saves depends on which rank saved it, and a restart "
    "from rank 0's checkpoint is not the job that ran.",
    "model = DDP(Net(), broadcast_buffers=False)  # each rank's BatchNorm stats drift",
    "Keep `broadcast_buffers=True` (DDP's default: rank 0's buffers at every forward), or "
    "synchronise the statistics themselves: "
    "`model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)` before `DDP(model)`.",
    # the replica check's first divergence; the first of RC022, RC023, RC024 it triggers
    ways={
        "replicas": Way(
            _buffers_unsynced,
            when=lambda divergence: (
                divergence.kind == "buffer" and divergence.agreed.get("parameter") is not False
            ),
        ),
    },
)


def _rank_dependent_update(divergence: ReplicaDivergence) -> str:
    where, groups = _replicas(divergence)
    what = "parameter" if divergence.kind == "parameter" else "optimizer state"
    return (
        f"{what} {divergence.tensor} differs between replicas (ranks {groups}) from {where}, "
        "while their gradients agree: the update depends on the rank (a learning rate, "
        "clipping, a scheduler stepped on one rank)"
    )


RC023 = Rule(
    "RC023",
    "replica-rank-dependent-update",
    "Flags a data-parallel job whose replicas' parameters (or optimizer state) differ "
    "after a step although their gradients agreed: the update itself depended on the "
    "rank.",
    "After DDP's all-reduce every replica holds the same gradients; parameters can "
    "only drift apart if the optimizer step differs — a learning-rate scheduler stepped "
    "on one rank, clipping or a loss scale computed per rank, an `if rank == 0:` around "
    "an update. The replicas then train different models while the job reports one.",
    "optimizer.step()\nif rank == 0:\n    scheduler.step()  # only rank 0's learning rate decays",
    "Run every part of the update on every rank: step schedulers, clip and scale "
    "identically everywhere; keep `rank == 0` for logging and checkpoints only.",
    ways={
        "replicas": Way(
            _rank_dependent_update,
            when=lambda divergence: (
                divergence.kind in ("parameter", "optimizer")
                and divergence.agreed.get("grad") is not False
            ),
        ),
    },
)


def _gradients_differ(divergence: ReplicaDivergence) -> str:
    where, groups = _replicas(divergence)
    said = f"gradient {divergence.tensor} differs between replicas (ranks {groups}) at {where}"
    if divergence.agreed.get("comm"):
        return (
            f"{said}, while every collective's output agreed: changed per rank after "
            "communication (clipping, a hook, a rank-dependent scale)"
        )
    return f"{said}: gradients not all-reduced, or changed per rank after backward"


RC024 = Rule(
    "RC024",
    "replica-gradients-differ",
    "Flags a data-parallel job whose replicas hold different gradients at an optimizer "
    "step: gradients that were never all-reduced, or were changed per rank afterwards.",
    "Replicas stay equal only if they apply equal updates from equal gradients. "
    "Gradients differ after backward when the model is not wrapped in DDP (or the "
    "trained module is not the wrapped one), when the last micro-batch of an "
    "accumulation runs under `no_sync()`, or when a hook or clipping changes them per "
    "rank.",
    "with model.no_sync():\n    loss.backward()  # also on the micro-batch before optimizer.step()",
    "Change gradients after the all-reduce only the same way on every rank (clip and "
    "scale everywhere, never under `if rank == 0:`); wrap the trained module in "
    "`DistributedDataParallel` and call the model through the wrapper; leave `no_sync()` "
    "for the micro-batches before the last one of each update.",
    # every replica divergence that RC022 and RC023 do not name
    ways={"replicas": Way(_gradients_differ, when=lambda divergence: True)},
)

RC025 = Rule(
    "RC025",
    "compiled-code-nondeterministic",
    "Flags a compiled model whose runs differ while the same training run eagerly "
    "reproduces (attribution's `compile off` control).",
    "`torch.compile` replaces torch's kernels with generated ones, and the generated "
    "code makes its own choices: inductor's CPU code accumulates scatters (an "
    "embedding's backward) with atomic adds across threads, and on CUDA may autotune "
    "kernels by timing or use its own random numbers. Checked on torch 2.13 (CPU): a "
    "compiled nanoGPT-style model on two threads differs run to run in the embedding's "
    "gradient from the first step, while eager repeats; deterministic algorithms, one "
    "thread, or compile off each make it repeat (attribution tries them all).",
    "model = torch.compile(model)  # wte's gradient: atomic adds in generated C++",
    "`torch.use_deterministic_algorithms(True)` before compiling (inductor then "
    "generates deterministic code for it), `torch._inductor.config.deterministic = "
    "True` where the installed torch has it (the `strict` preset sets both, with "
    "`fallback_random` and no autotuning), one thread for CPU code, or leave the part "
    "that scatters uncompiled (`torch.compiler.disable`).",
    ways={"control": CONTROL},
)

_AUTOTUNE = ("max-autotune", "max_autotune", "coordinate_descent_tuning")
_CUDAGRAPHS = ("reduce-overhead", "triton.cudagraphs")


RC026 = Rule(
    "RC026",
    "compile-autotune",
    "Flags a `torch.compile` call whose mode or options autotune: `max-autotune`, "
    "`max-autotune-no-cudagraphs`, `max_autotune`, `coordinate_descent_tuning`.",
    "Autotuning benchmarks candidate kernels and keeps the fastest one it timed. The "
    "choice depends on timing noise, on the machine and on its load, and a different "
    "kernel sums in a different order. Runs can then differ from one another, and from "
    "the run a golden trace recorded.",
    'model = torch.compile(model, mode="max-autotune")',
    "Compile audited and golden runs without autotuning (the default mode, or "
    "`max_autotune=False`; the `strict` preset turns it off), or cache the tuned choice "
    "and ship it with the golden.",
    severity="warning",
    # a script's torch.compile call (``meta.compile_options``): its mode and options as text
    ways={
        "compile call": Way(
            "torch.compile at {where} with {text}",
            when=lambda text: any(word in text for word in _AUTOTUNE),
        ),
    },
)


def _records_graphs(text: str) -> bool:
    # max-autotune also records CUDA graphs, unless -no-cudagraphs
    graphs_too = "max-autotune" in text and "no-cudagraphs" not in text
    return graphs_too or any(word in text for word in _CUDAGRAPHS)


RC027 = Rule(
    "RC027",
    "compile-cudagraphs",
    'Flags a `torch.compile` call that records CUDA graphs: `mode="reduce-overhead"` '
    "or `triton.cudagraphs`.",
    "CUDA graph trees replay captured kernels from static memory pools. An input "
    "changed in place outside the graph, or an output kept across replays, then reads "
    "memory that the next replay overwrites. The results depend on when tensors were "
    "kept and freed, not only on the values.",
    'model = torch.compile(model, mode="reduce-overhead")',
    "Audit with the default mode (the `strict` preset turns CUDA graphs off); in "
    "production, clone outputs that outlive the step "
    "(`torch.compiler.cudagraph_mark_step_begin()` between steps).",
    severity="warning",
    ways={"compile call": Way("torch.compile at {where} with {text}", when=_records_graphs)},
)


def _compiled_dropout(model: str, layers: list[str], **seen: Any) -> str:
    return (
        f"{model} runs compiled with {', '.join(layers)} drawing from inductor's own "
        "generator (fallback_random off)"
    )


RC028 = Rule(
    "RC028",
    "compiled-random-ops",
    "Flags a compiled model with dropout (or another random op) in training mode while "
    "inductor generates its own random numbers (`torch._inductor.config.fallback_random` "
    "off, the default).",
    "Inductor replaces the random ops of a compiled region with its own generator "
    "(Philox-based, seeded from torch's). The same seed then gives other dropout masks "
    "compiled than eager: an eager leg and a compiled leg differ from the first "
    "forward, and a model trained compiled cannot be reproduced eagerly, or the other "
    "way round.",
    "model = torch.compile(model)  # nn.Dropout(0.1) inside: inductor's own masks",
    "`torch._inductor.config.fallback_random = True` (the `strict` preset sets it) to "
    "draw from torch's generator as eager does, at some speed.",
    severity="warning",
    # noted by the script's hooks at step 0 (``meta.observations``, by this rule's name)
    ways={"observed": Way(_compiled_dropout)},
)


def _recompiled(first: int, end: int) -> str:
    return (
        f"torch.compile made {end - first} more graph(s) after the first step "
        f"({first} then, {end} at the end): recompiled while training"
    )


RC029 = Rule(
    "RC029",
    "compile-recompiles",
    "Flags a compiled run that made new graphs after its first step: torch.compile "
    "recompiled while training (a new input shape, a changed Python value it "
    "guards on, a last batch of another size).",
    "A recompiled graph is new generated code, often with dynamic shapes. Its kernels "
    "and their orders of summation can differ from the graph the first steps ran, so "
    "the same step computes other bits depending on what came before it. A golden "
    "trace recorded with other batch sizes or shapes, or a resumed run, then does not "
    "match, and each recompile costs seconds.",
    "for x, y in loader:  # the last batch is smaller: a new graph\n    loss = model(x).loss",
    "Keep shapes static (`drop_last=True`, padded sequences), mark the dimension that "
    "varies as dynamic from the start (`torch._dynamo.mark_dynamic`), or compile with "
    "`dynamic=False` and accept one graph per shape.",
    severity="warning",
    # dynamo's graph count after the first step and at the end (``meta.dynamo_graphs``)
    ways={
        "recompiles": Way(_recompiled, when=lambda first, end: bool(first and end and end > first)),
    },
)

_AS_IS = "as its user runs it (no preset) the runs differ at {at}"
_RERUN_AS_IS = "rerun with `--as-is` to audit the script as its user runs it"


def _seeded_late(at: str, call: dict[str, Any], drawn: dict[str, Any]) -> str:
    made = (
        f"{drawn['model']} was built at {drawn['where']}"
        if drawn.get("model")
        else "torch's generator was drawn from"
    )
    return _AS_IS.format(at=at) + (
        f": {made} before `{call['call']}({call['value']})` at {call['where']} seeded torch "
        "— the preset seeded it before the script's first line"
    )


def _seed_earlier(at: str, call: dict[str, Any], drawn: dict[str, Any]) -> str:
    line, _, inside = call["where"].partition(" (in ")
    if inside:  # the framework's function the user's line reached (set_seed …)
        seeding = f"call `{inside.split(',')[0]}({call['value']})` (now reached at {line})"
    else:
        seeding = f"move `{call['call']}({call['value']})` at {line}"
    if drawn.get("where"):
        return f"seed before building the model: {seeding} above {drawn['where']}"
    return f"seed before torch's generator is first drawn from: {seeding} earlier"


RC030 = Rule(
    "RC030",
    "preset-masks-script",
    "Flags a script that reproduces under reprocheck's preset but not as its user runs "
    "it: after a reproducible verdict, two more runs with no preset (the script's own "
    "seeding, the user's environment, a random `PYTHONHASHSEED` where the shell sets "
    "none) differ.",
    "The preset seeds every generator and fixes the hash seed before the script's first "
    "line, so it hides what the script leaves to chance: a model built before the "
    "script seeds (Lightning's `seed_everything` placed one line late, a transformers "
    "model built before `TrainingArguments(seed=…)` seeds), or an order taken from a "
    "`set()` of strings. Run the way its user runs it, every run then differs.",
    "model = Net()          # draws from torch's generator, not yet seeded\n"
    "seed_everything(42)    # seeds what is left",
    "Seed before anything draws: move the seeding call above the model's construction "
    "(or pass `seed=` where the framework builds the model). For a hash-seed "
    "difference, sort what you take from a `set` or `dict` of strings, or set "
    "`PYTHONHASHSEED` in the launcher. `--as-is` makes the as-is runs the verdict.",
    severity="warning",
    # the as-is pair's runs differ (``at``: step · phase · tensor), and what made them
    ways={
        # a generator drawn (``drawn``) before the script's seeding ``call``
        "seeded late": Way(_seeded_late, fix=_seed_earlier),
        # a pair with one fixed PYTHONHASHSEED agrees
        "hash seed": Way(
            _AS_IS + ", and with one fixed PYTHONHASHSEED they agree: the script depends on "
            "the hash seed (an order taken from a set or dict of strings)",
            fix=lambda at: (
                "sort what is taken from a set or dict of strings, or set "
                "PYTHONHASHSEED in the launcher"
            ),
        ),
        # … and still differs
        "not the hash seed": Way(
            _AS_IS + "; with one fixed PYTHONHASHSEED they still differ: what the preset "
            "fixes that the script leaves to chance was not found (rerun with `--as-is` to "
            "audit that way)",
            fix=lambda at: _RERUN_AS_IS,
        ),
        # the user's shell fixes the hash seed: no pair can tell
        "unknown": Way(
            _AS_IS + ": the preset's seeding hides it (rerun with `--as-is` to audit that way)",
            fix=lambda at: _RERUN_AS_IS,
        ),
    },
)


def _shared_files(paths: list[str]) -> str:
    # relative to the folder the audit ran in where below it (context.display_path's rule;
    # that module is the runs' and imports torch)
    shown = [p if (r := os.path.relpath(p)).startswith("..") else r for p in paths[:3]]
    more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
    return (
        f"every run wrote {', '.join(shown)}{more}: the runs share a working directory, and "
        "a script that reads back what it wrote may read another run's file"
    )


RC031 = Rule(
    "RC031",
    "shared-working-files",
    "Flags files that two runs of one audit both opened for writing at the same path "
    "(a checkpoint folder, a log, a `best.pt`): the runs share a working directory.",
    "The runs of an audit start in the folder the audit started in. A script that "
    "writes a file and reads it back later (a resume, a best-model reload, a cache) "
    "may read what the other run wrote, and two runs at once can overwrite each "
    "other's files: the runs are then not independent, and an agreement between them "
    "proves less.",
    "torch.save(model.state_dict(), 'checkpoints/best.pt')  # the same path in every run",
    "Give each run its own folder: `{run}` (the run's name) or `{run_dir}` (a fresh "
    "folder in the audit's) in the command's arguments is replaced per run — "
    "`reprocheck exec -- python train.py --output_dir out/{run}`.",
    severity="warning",
    # the files two runs of a leg both opened for writing (``meta.written``), sorted
    ways={"shared files": Way(_shared_files)},
)

# -- resume equivalence (``reprocheck resume``): what a checkpoint failed to restore ---------

# the resumed run's first divergent record (``step``, ``resumed_step``, ``phase``,
# ``tensor``) and the top-level keys the checkpoint held (``keys``)
_RESUMED = (
    "the resumed run differs from the reference at step {step} · {phase} · {tensor} "
    "(its step {resumed_step}); the checkpoint held: {keys}"
)


def _resumed_data(**facts: Any) -> str:
    text = _RESUMED.format(**facts)
    if facts.get("batch_of_step") is not None:
        text += f"; the resumed run read the batch of step {facts['batch_of_step']}"
    return text + " — the data stream's position was not restored"


RC032 = Rule(
    "RC032",
    "resume-data-position-lost",
    "Flags a resume whose first divergent record is the data: the resumed run read "
    "another batch than the run that never stopped (the data stream restarted, or was "
    "shuffled again).",
    "A checkpoint of weights and optimizer alone restarts the epoch: the resumed run "
    "trains on batches the reference already used, in another order, and never matches it.",
    "torch.save({'model': model.state_dict(), 'optimizer': opt.state_dict()}, path)\n"
    "...\nfor batch in loader:  # after a resume: the epoch starts over",
    "Save where the data stream is (epoch, batch index, the sampler's generator state) and "
    "skip to it on resume (`StatefulDataLoader` from torchdata, or Lightning/transformers' "
    "own resume, which do).",
    ways={"resume": Way(_resumed_data)},
)
RC033 = Rule(
    "RC033",
    "resume-rng-not-restored",
    "Flags a resume whose generators (torch, CUDA, NumPy, Python) differ from the run "
    "that never stopped, and whose first divergent record a random draw explains "
    "(dropout, a shuffle from the global generator, a sampled augmentation).",
    "Seeding at start-up gives the resumed run the generators of step 0, not of the "
    "checkpoint's step: every random draw after the resume differs.",
    "torch.manual_seed(0)\nmodel.load_state_dict(ckpt['model'])  # the generators start over",
    "Save `torch.get_rng_state()` (and `torch.cuda.get_rng_state_all()`, "
    "`np.random.get_state()`, `random.getstate()`) in the checkpoint and set them back "
    "after loading it.",
    ways={"resume": Way(_RESUMED + " — the generators' state was not restored")},
)
RC034 = Rule(
    "RC034",
    "resume-optimizer-not-restored",
    "Flags a resume whose optimizer state (moments, momentum buffers, step counts) "
    "differs from the run that never stopped, at the resume or in the first update.",
    "An optimizer rebuilt empty starts its moments at zero and its bias correction at "
    "step 1: the first update after the resume differs.",
    "torch.save(model.state_dict(), path)  # no optimizer state",
    "Save `optimizer.state_dict()` and load it with `optimizer.load_state_dict(...)` "
    "after the optimizer is built.",
    ways={"resume": Way(_RESUMED + " — the optimizer's state was not restored")},
)
RC035 = Rule(
    "RC035",
    "resume-scheduler-not-restored",
    "Flags a resume whose update differs with the same gradients and optimizer state: "
    "the learning rate differs (a scheduler rebuilt at its first epoch).",
    "A scheduler that is not restored sets the learning rate of its first steps again; "
    "the weights after the next update differ.",
    "scheduler = StepLR(opt, 2)  # after a resume: last_epoch starts at 0 again",
    "Save `scheduler.state_dict()` and load it after the scheduler is built.",
    ways={"resume": Way(_RESUMED + " — the learning-rate scheduler was not restored")},
)
RC036 = Rule(
    "RC036",
    "resume-scaler-not-restored",
    "Flags a resume whose loss, as `backward()` received it, differs from the reference's "
    "by a power of two with the same outputs: the loss scale (GradScaler) was not restored.",
    "A GradScaler rebuilt at its initial scale scales the loss differently: skipped steps "
    "and the scale's growth differ from the run that never stopped.",
    "scaler = torch.amp.GradScaler()  # after a resume: the initial scale again",
    "Save `scaler.state_dict()` and load it after the scaler is built.",
    ways={"resume": Way(_RESUMED + " — the loss scaler's state was not restored")},
)
RC037 = Rule(
    "RC037",
    "resume-weights-not-restored",
    "Flags a resume whose model state at its first step equals the reference's at no "
    "step: the weights (or buffers) were not loaded, or loaded from another checkpoint.",
    "Training continues from other weights than the checkpoint's.",
    "model.load_state_dict(ckpt['model'], strict=False)  # keys that do not match load nothing",
    "Load the model's state with `strict=True` from the checkpoint the run saved.",
    ways={"resume": Way(_RESUMED + " — the model's weights were not restored")},
)
RC038 = Rule(
    "RC038",
    "resume-divergence-unexplained",
    "Flags a resume that differs from the run that never stopped where no state's "
    "signature explains it (the generators, optimizer and weights were restored).",
    "The training may be nondeterministic after the checkpoint, or depend on state no "
    "checkpoint holds (a counter, a cache).",
    "self.calls += 1  # state of the script's own, never saved",
    "Audit the script's determinism first (`reprocheck exec -- python train.py`), then "
    "save the state it depends on.",
    ways={"resume": Way(_RESUMED + " — no restored state explains it")},
)

RESUME_RULES = {
    "data": RC032,
    "rng": RC033,
    "optimizer": RC034,
    "scheduler": RC035,
    "scaler": RC036,
    "weights": RC037,
    "unknown": RC038,
}


def resume_rule(state: str) -> Rule:
    """The rule naming the state a resume failed to restore (``unknown``: none explains it)."""
    return RESUME_RULES[state]


RULES: tuple[Rule, ...] = (
    RC001,
    RC002,
    RC003,
    RC004,
    RC005,
    RC006,
    RC007,
    RC008,
    RC009,
    RC010,
    RC011,
    RC015,
    RC017,
    RC018,
    RC019,
    RC020,
    RC021,
    RC022,
    RC023,
    RC024,
    RC025,
    RC026,
    RC027,
    RC028,
    RC029,
    RC030,
    RC031,
    RC032,
    RC033,
    RC034,
    RC035,
    RC036,
    RC037,
    RC038,
)

BY_CODE = {rule.code: rule for rule in RULES}
BY_NAME = {rule.name: rule for rule in RULES}  # what the script's hooks note a rule by


def for_cause(
    zoom: dict[str, Any] | None, tried: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The rule the zoom's cause names, where nothing more specific fired: a random op
    (RC015) or a nondeterministic op (RC011), else none. ``tried``: the controls
    attribution tried, none of which made the runs reproduce (None: it did not run)."""
    zoom = zoom or {}
    attributed = tried is not None
    facts = {
        "op": zoom.get("op"),
        "where": zoom.get("source"),
        "prefix": "no control makes the runs reproduce: " if attributed else "",
    }
    evidence = {"tried": tried} if attributed else None
    return [
        rule.fire("cause", evidence, **facts)
        for rule in RULES
        if rule.fires("cause", cause=zoom.get("cause"))
    ]


def find(code: str) -> Rule:
    """The rule with this code (case-insensitive); KeyError with a suggestion otherwise."""
    rule = BY_CODE.get(code.strip().upper())
    if rule is None:
        typed = code.strip().upper()
        number = typed[2:] if typed.startswith("RC") else ""
        padded = f"RC{int(number):03d}" if number.isdigit() else ""
        close = [padded] if padded in BY_CODE else difflib.get_close_matches(typed, BY_CODE, n=1)
        hint = f" — did you mean {close[0]}?" if close else f" (codes: {', '.join(BY_CODE)})"
        raise KeyError(f"unknown rule {code!r}{hint}")
    return rule


def markdown() -> str:
    """docs/rules.md, generated from :data:`RULES`."""
    lines = [
        "# Doctor rules",
        "",
        "Generated by `python -m reprocheck.doctor.rules` from `reprocheck/doctor/rules.py`; "
        "`reprocheck explain CODE` prints one.",
        "",
        "| code | name | what it does |",
        "|---|---|---|",
    ]
    lines += [f"| {r.code} | {r.name} | {r.what} |" for r in RULES]
    for rule in RULES:
        lines += [
            "",
            f"## {rule.code} {rule.name}",
            "",
            "**What it does.** " + rule.what,
            "",
            "**Why is this bad?** " + rule.why,
            "",
            "**Example**",
            "",
            "```python",
            rule.example,
            "```",
            "",
            "**Use instead.** " + rule.fix,
        ]
        if rule.severity != "error":
            lines += ["", f"**Severity.** {rule.severity}: reported, never an exit code."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
