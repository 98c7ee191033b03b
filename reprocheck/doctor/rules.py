"""The rule catalog: each known source of irreproducibility as data, in ruff's shape.

One list, :data:`RULES`, serves ``reprocheck explain CODE``, the findings in reports and
``docs/rules.md`` (``python -m reprocheck.doctor.rules`` regenerates it). Every claim
was checked on torch 2.13 (CPU) before it became a rule; where recent torch already fixed
a problem (torch seeds ``random``, torch and NumPy in DataLoader workers), the rule says
so and does not fire for it.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    what: str  # What it does
    why: str  # Why is this bad?
    example: str
    fix: str  # Use instead
    severity: str = "error"  # error | warning (a warning never changes an exit code)

    def explain(self) -> str:
        """The full text, as `reprocheck explain` prints it."""
        return (
            f"{self.code} {self.name}\n\n## What it does\n{self.what}\n\n"
            f"## Why is this bad?\n{self.why}\n\n## Example\n```python\n{self.example}\n```\n\n"
            f"## Use instead\n{self.fix}\n"
        )


RULES: tuple[Rule, ...] = (
    Rule(
        "RC001",
        "python-random-unseeded",
        "Flags an audit whose controls leave Python's `random` module unseeded.",
        "Shuffles and augmentations drawn from `random` differ in every process.",
        "import random\n\nrandom.shuffle(files)  # never seeded",
        "`random.seed(seed)` at start-up (reprocheck's `seeded` preset does it: "
        "`determinism.seed_python: true`).",
    ),
    Rule(
        "RC002",
        "numpy-unseeded",
        "Flags an audit whose controls leave NumPy's global generator unseeded.",
        "NumPy-based augmentation and sampling differ in every process.",
        "noise = np.random.randn(*shape)  # global generator, never seeded",
        "`np.random.seed(seed)`, or a `np.random.default_rng(seed)` passed around "
        "(`determinism.seed_numpy: true`).",
    ),
    Rule(
        "RC003",
        "torch-unseeded",
        "Flags an audit whose controls leave torch's CPU and CUDA generators unseeded.",
        "Initial weights, dropout masks and `randperm` shuffles differ in every process.",
        "model = Net()  # init draws from an unseeded generator",
        "`torch.manual_seed(seed)` (seeds every CUDA device too; "
        "`torch.cuda.manual_seed_all(seed)` where CUDA is initialised first).",
    ),
    Rule(
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
    ),
    Rule(
        "RC005",
        "cudnn-benchmark",
        "Flags `torch.backends.cudnn.benchmark = True` in the controls.",
        "cuDNN times several convolution algorithms per shape and keeps the fastest; the "
        "choice, and so the numerics, can change between runs.",
        "torch.backends.cudnn.benchmark = True",
        "`torch.backends.cudnn.benchmark = False` and `cudnn.deterministic = True` "
        "(the `strict` preset).",
    ),
    Rule(
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
    ),
    Rule(
        "RC007",
        "cublas-workspace-unset",
        "Flags a CUDA leg with deterministic algorithms on but no CUBLAS_WORKSPACE_CONFIG.",
        "cuBLAS may split reductions differently per call; with deterministic algorithms on "
        "and no workspace setting, torch raises in matmuls on CUDA ≥ 10.2.",
        "torch.use_deterministic_algorithms(True)  # CUBLAS_WORKSPACE_CONFIG unset",
        "`CUBLAS_WORKSPACE_CONFIG=:4096:8` (or `:16:8`) before CUDA starts "
        "(`determinism.cublas_workspace`).",
    ),
    Rule(
        "RC008",
        "dataloader-unseeded",
        "Flags a reprocheck-built DataLoader without a seeded generator "
        "(`determinism.dataloader_generator: false`) that shuffles or uses workers.",
        "The shuffle order comes from torch's global generator at iterator creation; any "
        "extra draw before it reorders every epoch. (Workers themselves are seeded by torch "
        "≥ 1.9 from the loader's base seed — `random`, torch and NumPy — checked on 2.13.)",
        "DataLoader(ds, shuffle=True, num_workers=2)",
        "`DataLoader(ds, shuffle=True, generator=torch.Generator().manual_seed(seed))`.",
    ),
    Rule(
        "RC009",
        "num-workers-sensitive",
        "Runs the config with `num_workers=0` and with its own value and compares them.",
        "Results that change with the worker count cannot be compared across machines or "
        "settings even when each setting reproduces.",
        "DataLoader(ds, num_workers=os.cpu_count())",
        "Keep `num_workers` fixed between runs that are compared; derive per-sample "
        "randomness from the sample index, not from the worker.",
    ),
    Rule(
        "RC010",
        "thread-count-sensitive",
        "Runs the config with 1 and 2 threads and compares them bit for bit.",
        "CPU reductions (sum, matmul, conv, index_put accumulation) split work by thread; "
        "another thread count gives other last bits, which training amplifies.",
        "torch.set_num_threads(os.cpu_count())",
        "Set `torch.set_num_threads(n)` once (the config's `threads`), and compare other thread "
        "counts under a tolerance, never bitwise.",
    ),
    Rule(
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
    ),
    Rule(
        "RC015",
        "entropy-seeded-generator",
        "Names a random op whose generator drew different values in runs with identical "
        "inputs and seeding: a generator seeded from time or OS entropy, or re-seeded.",
        "No global seed reaches a `torch.Generator()` seeded from `os.urandom`, "
        "`time.time()` or `uuid4`: every process draws other numbers.",
        "g = torch.Generator().manual_seed(int(time.time()))",
        "Derive every generator's seed from the configured one: "
        "`torch.Generator().manual_seed(seed + offset)`.",
    ),
    Rule(
        "RC017",
        "torch-compile",
        "Flags a model that runs through `torch.compile` (an `OptimizedModule` in the model).",
        "Compiled kernels may fuse and reorder float operations differently from eager mode "
        "and between compilations; autotuning makes choices per run.",
        'model = torch.compile(model, mode="max-autotune")',
        "Audit eager and compiled separately; for bitwise reproducibility avoid autotuning "
        "modes and pin the torch version.",
    ),
    Rule(
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
    ),
    Rule(
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
    ),
    Rule(
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
    ),
    Rule(
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
    ),
    Rule(
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
    ),
    Rule(
        "RC023",
        "replica-rank-dependent-update",
        "Flags a data-parallel job whose replicas' parameters (or optimizer state) differ "
        "after a step although their gradients agreed: the update itself depended on the "
        "rank.",
        "After DDP's all-reduce every replica holds the same gradients; parameters can "
        "only drift apart if the optimizer step differs — a learning-rate scheduler stepped "
        "on one rank, clipping or a loss scale computed per rank, an `if rank == 0:` around "
        "an update. The replicas then train different models while the job reports one.",
        "optimizer.step()\nif rank == 0:\n    scheduler.step()  # only rank 0's learning rate "
        "decays",
        "Run every part of the update on every rank: step schedulers, clip and scale "
        "identically everywhere; keep `rank == 0` for logging and checkpoints only.",
    ),
    Rule(
        "RC024",
        "replica-gradients-differ",
        "Flags a data-parallel job whose replicas hold different gradients at an optimizer "
        "step: gradients that were never all-reduced, or were changed per rank afterwards.",
        "Replicas stay equal only if they apply equal updates from equal gradients. "
        "Gradients differ after backward when the model is not wrapped in DDP (or the "
        "trained module is not the wrapped one), when the last micro-batch of an "
        "accumulation runs under `no_sync()`, or when a hook or clipping changes them per "
        "rank.",
        "with model.no_sync():\n    loss.backward()  # also on the micro-batch before "
        "optimizer.step()",
        "Change gradients after the all-reduce only the same way on every rank (clip and "
        "scale everywhere, never under `if rank == 0:`); wrap the trained module in "
        "`DistributedDataParallel` and call the model through the wrapper; leave `no_sync()` "
        "for the micro-batches before the last one of each update.",
    ),
    Rule(
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
    ),
    Rule(
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
    ),
    Rule(
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
    ),
    Rule(
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
    ),
    Rule(
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
    ),
    Rule(
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
    ),
    Rule(
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
    ),
)

BY_CODE = {rule.code: rule for rule in RULES}


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
