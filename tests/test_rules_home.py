"""One rule, one home: a rule's code, messages, triggers and fixes live with its catalog
entry (reprocheck/doctor/rules.py), and the zoom's causes are one enum
(reprocheck/causes.py). Checked here: no rule code is written as a string outside
reprocheck/doctor/, no cause text outside the enum, and every way a rule fires says exactly
what the reports say (the texts the end-to-end tests assert)."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from reprocheck.causes import Cause
from reprocheck.doctor import rules
from reprocheck.replicas import ReplicaDivergence
from reprocheck.replicas import finding as replica_finding

from .conftest import ROOT, script_line

PACKAGE = ROOT / "reprocheck"
CODE = re.compile(r"^RC\d{3}$")


def _strings(path: Path) -> list[tuple[int, str]]:
    """Every string constant of a file (f-strings' literal parts too), with its line."""
    tree = ast.parse(path.read_text(), str(path))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def _offenders(wanted, allowed) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} {text!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if not allowed(path)
        for line, text in _strings(path)
        if wanted(text)
    ]


def test_rule_codes_are_written_only_in_the_catalogs_home():
    doctor = PACKAGE / "doctor"
    offenders = _offenders(CODE.match, lambda path: doctor in path.parents)
    assert not offenders, "fire the rule from its entry (rules.RCxxx):\n" + "\n".join(offenders)


def test_cause_texts_are_written_only_in_the_enum():
    texts = {cause.value for cause in Cause}
    offenders = _offenders(texts.__contains__, lambda path: path == PACKAGE / "causes.py")
    assert not offenders, "name the cause by its member (Cause.X):\n" + "\n".join(offenders)


def test_the_scans_see_a_code_and_a_cause(tmp_path):
    # the checks above cannot pass for want of looking
    planted = tmp_path / "planted.py"
    planted.write_text('a = {"code": "RC015"}\nif b == f"{x}" "nondeterministic op":\n    pass\n')
    found = [text for _, text in _strings(planted)]
    assert "RC015" in found and Cause.NONDETERMINISTIC_OP.value in found


def test_every_rule_is_named_by_its_code_in_the_catalog():
    assert [getattr(rules, rule.code) for rule in rules.RULES] == list(rules.RULES)
    assert len(rules.BY_NAME) == len(rules.RULES)


def test_a_cause_is_its_text_wherever_it_is_written():
    import json

    assert json.dumps({"cause": Cause.RNG}) == '{"cause": "unseeded or re-seeded RNG"}'
    assert f"{Cause.RNG}" == str(Cause.RNG) == "unseeded or re-seeded RNG"
    assert Cause("nondeterministic op") is Cause.NONDETERMINISTIC_OP


# -- every way a rule fires, with the text a report of it shows ---------------------------

WHERE = {"step": 3, "phase": "grads", "tensor": "fc.weight"}
COLLATOR = script_line("collate_entropy.py", "else np.random.default_rng()")
RESEED = script_line("late_reseed.py", "            torch.seed()")
BUILT = script_line("late_seed.py", "model = Scorer()")
SEEDED = script_line("late_seed.py", "torch.manual_seed(0)")
TRAINER = script_line("hf_trainer.py", "trainer = Trainer(")
HF_BUILT = script_line("hf_trainer.py", "model = BertForSequenceClassification(config)")
GENERATOR = {"name": "torch.cpu", "runs": [[0], [1]], "step": 2}
AT = "step 0 · weights · body.0.weight"
HERE = os.getcwd()

# (rule, way, facts, message, fix: None for the catalog's own)
# a resume's first divergent record and the checkpoint's keys (RC032–RC038)
RESUMED = {
    "step": 5,
    "resumed_step": 1,
    "phase": "outputs",
    "tensor": "output",
    "kind": "value",
    "keys": "model, optimizer",
}

CASES = [
    (rules.RC001, "config", {}, "Python's `random` is not seeded (determinism.seed_python)", None),
    (
        rules.RC002,
        "config",
        {},
        "NumPy's global generator is not seeded (determinism.seed_numpy)",
        None,
    ),
    (rules.RC003, "config", {}, "torch's generators are not seeded (determinism.seed_torch)", None),
    (
        rules.RC003,
        "all controls",
        {},
        "only all the controls together make the runs reproduce",
        None,
    ),
    (
        rules.RC005,
        "config",
        {},
        "cudnn.benchmark is on: cuDNN may pick other kernels per run",
        None,
    ),
    (
        rules.RC007,
        "config",
        {},
        "deterministic algorithms on a CUDA leg without CUBLAS_WORKSPACE_CONFIG",
        None,
    ),
    (
        rules.RC008,
        "config",
        {},
        "the DataLoader shuffles without a seeded generator "
        "(determinism.dataloader_generator: false)",
        None,
    ),
    # tests/test_doctor.py: attribution's hash-seed control
    (
        rules.RC004,
        "control",
        {"control": "PYTHONHASHSEED fixed"},
        "with PYTHONHASHSEED fixed the runs reproduce (RC004)",
        None,
    ),
    *[
        (
            rule,
            "control",
            {"control": "a control"},
            f"with a control the runs reproduce ({rule.code})",
            None,
        )
        for rule in rules.RULES
        if "control" in rule.ways and rule is not rules.RC004
    ],
    *[
        (
            rule,
            "probe",
            {"what": "1 and 2 threads", "where": WHERE},
            "1 and 2 threads differ from step 3 · grads · fc.weight",
            None,
        )
        for rule in (rules.RC004, rules.RC009, rules.RC010)
    ],
    (
        rules.RC020,
        "probe",
        {"what": "uninitialized memory filled with NaN and left as it is", "where": WHERE},
        "uninitialized memory filled with NaN and left as it is differ from step 3 · grads · "
        "fc.weight; the thread, hash-seed and worker probes are inconclusive while it is read",
        None,
    ),
    (
        rules.RC006,
        "op",
        {
            "op": "index_add",
            "does": "index_add_ accumulates with atomics",
            "source": "train.py:7",
            "backward": False,
        },
        "aten.index_add (index_add_ accumulates with atomics) at train.py:7 is "
        "nondeterministic on CUDA",
        None,
    ),
    (
        rules.RC006,
        "op",
        {"op": "index_put", "does": "the backward", "source": None, "backward": True},
        "aten.index_put (the backward) in the backward of the op at (no user frame) is "
        "nondeterministic on CUDA",
        None,
    ),
    (
        rules.RC011,
        "cause",
        {"prefix": "", "op": "aten.index_put_", "where": "train.py:9"},
        "aten.index_put_ at train.py:9 is nondeterministic",
        None,
    ),
    # tests/test_claims.py: a collator's generator built from entropy
    (
        rules.RC015,
        "entropy call",
        {"call": {"call": "np.random.default_rng", "where": COLLATOR}, "step": 1, "phase": "data"},
        f"`np.random.default_rng()` at {COLLATOR} builds a generator from entropy in every run: "
        "what it draws differs, and the runs part at step 1 · data",
        f"seed it: `np.random.default_rng(0)` at {COLLATOR} (or derive it from your seed)",
    ),
    # tests/test_claims.py: a re-seed from entropy mid-run (its fix)
    (
        rules.RC015,
        "generator",
        {
            "generator": GENERATOR,
            "seeding": f"every run re-seeded torch's CPU generator from entropy at {RESEED}",
            "where": "train.py:33",
            "step": 20,
            "call": {"call": "torch.seed", "value": "entropy", "where": RESEED},
        },
        "generator torch.cpu differed between runs #0 ≠ #1 from step 2: every run re-seeded "
        f"torch's CPU generator from entropy at {RESEED}; what is drawn from it (drawn at "
        "train.py:33) differs from step 20 on",
        f"`torch.seed()` at {RESEED} seeds from entropy, other in every run: remove it, or "
        "seed with a fixed value (`torch.manual_seed(0)`)",
    ),
    (
        rules.RC015,
        "generator",
        {
            "generator": GENERATOR,
            "seeding": None,
            "where": None,
            "step": 4,
            "call": {"call": "torch.manual_seed", "value": 17, "where": "train.py:5"},
        },
        "generator torch.cpu differed between runs #0 ≠ #1 from step 2; what is drawn from it "
        "differs from step 4 on",
        "`torch.manual_seed` at train.py:5 takes a value that differs between runs: pass it a "
        "fixed seed",
    ),
    (
        rules.RC015,
        "cause",
        {"prefix": "no control makes the runs reproduce: ", "op": None, "where": "nb.py:4"},
        "no control makes the runs reproduce: a generator seeded outside the configured seed "
        "draws at nb.py:4",
        None,
    ),
    (rules.RC017, "op scan", {}, "the model runs through torch.compile", None),
    (
        rules.RC018,
        "latent",
        {"generators": ["numpy"], "runs": [[0], [1]], "step": 0, "process": "main"},
        "generator numpy differs between runs #0 ≠ #1 from step 0, while nothing drawn from "
        "it differs",
        None,
    ),
    (
        rules.RC018,
        "latent",
        {"generators": ["numpy", "random"], "runs": [[0, 2], [1]], "step": 5, "process": "rank1"},
        "generators numpy, random differ between runs #0,#2 ≠ #1 from step 5 in process rank1, "
        "while nothing drawn from them differs",
        None,
    ),
    (
        rules.RC019,
        "observed",
        {
            "model": "RNNModel",
            "layers": ["drop (Dropout)"],
            "where": "train.py:40",
            "step": 12,
            "process": "main",
        },
        "RNNModel is evaluated under no_grad at train.py:40 after step 12 with drop (Dropout) "
        "in training mode",
        None,
    ),
    (
        rules.RC019,
        "observed",
        {
            "model": "Net",
            "layers": ["bn (BatchNorm1d)", "drop (Dropout)"],
            "where": "eval.py:3",
            "step": None,
            "process": "spawn1",
        },
        "Net is evaluated under no_grad at eval.py:3 in process spawn1 with bn (BatchNorm1d), "
        "drop (Dropout) in training mode",
        None,
    ),
    # tests/test_script_depth.py: a golden recorded under another NumPy
    (
        rules.RC021,
        "drift",
        {"packages": {"numpy": ["1.26.4", "2.1.0"], "torch": ["2.12.0", "2.13.0"]}},
        "the run imports other versions than the golden's did: numpy 1.26.4 → 2.1.0, "
        "torch 2.12.0 → 2.13.0",
        None,
    ),
    (
        rules.RC026,
        "compile call",
        {"where": "train.py:12", "text": "max-autotune"},
        "torch.compile at train.py:12 with max-autotune",
        None,
    ),
    (
        rules.RC027,
        "compile call",
        {"where": "train.py:12", "text": "reduce-overhead"},
        "torch.compile at train.py:12 with reduce-overhead",
        None,
    ),
    (
        rules.RC028,
        "observed",
        {"model": "GPT", "layers": ["drop (Dropout)"], "where": None, "step": 0},
        "GPT runs compiled with drop (Dropout) drawing from inductor's own generator "
        "(fallback_random off)",
        None,
    ),
    (
        rules.RC029,
        "recompiles",
        {"first": 2, "end": 5},
        "torch.compile made 3 more graph(s) after the first step (2 then, 5 at the end): "
        "recompiled while training",
        None,
    ),
    # tests/test_entrances.py: a model built before the script seeds
    (
        rules.RC030,
        "seeded late",
        {
            "at": AT,
            "call": {"call": "torch.manual_seed", "value": 0, "where": SEEDED},
            "drawn": {"model": "Scorer", "where": BUILT},
        },
        f"as its user runs it (no preset) the runs differ at {AT}: Scorer was built at {BUILT} "
        f"before `torch.manual_seed(0)` at {SEEDED} seeded torch — the preset seeded it before "
        "the script's first line",
        f"seed before building the model: move `torch.manual_seed(0)` at {SEEDED} above {BUILT}",
    ),
    # … and one a framework's set_seed seeds (its fix: tests/test_entrances.py)
    (
        rules.RC030,
        "seeded late",
        {
            "at": AT,
            "call": {
                "call": "torch.manual_seed",
                "value": 42,
                "where": f"{TRAINER} (in set_seed, transformers/trainer_utils.py:101)",
            },
            "drawn": {"model": None, "where": None},
        },
        f"as its user runs it (no preset) the runs differ at {AT}: torch's generator was drawn "
        f"from before `torch.manual_seed(42)` at {TRAINER} (in set_seed, "
        "transformers/trainer_utils.py:101) seeded torch — the preset seeded it before the "
        "script's first line",
        f"seed before torch's generator is first drawn from: call `set_seed(42)` (now reached "
        f"at {TRAINER}) earlier",
    ),
    (
        rules.RC030,
        "hash seed",
        {"at": AT},
        f"as its user runs it (no preset) the runs differ at {AT}, and with one fixed "
        "PYTHONHASHSEED they agree: the script depends on the hash seed (an order taken from a "
        "set or dict of strings)",
        "sort what is taken from a set or dict of strings, or set PYTHONHASHSEED in the launcher",
    ),
    (
        rules.RC030,
        "not the hash seed",
        {"at": AT},
        f"as its user runs it (no preset) the runs differ at {AT}; with one fixed PYTHONHASHSEED "
        "they still differ: what the preset fixes that the script leaves to chance was not found "
        "(rerun with `--as-is` to audit that way)",
        "rerun with `--as-is` to audit the script as its user runs it",
    ),
    (
        rules.RC030,
        "unknown",
        {"at": AT},
        f"as its user runs it (no preset) the runs differ at {AT}: the preset's seeding hides it "
        "(rerun with `--as-is` to audit that way)",
        "rerun with `--as-is` to audit the script as its user runs it",
    ),
    # tests/test_entrances.py: every run wrote one checkpoint folder
    (
        rules.RC031,
        "shared files",
        {
            "paths": [
                os.path.join(HERE, "checkpoints", "ckpt.pt"),
                os.path.join(HERE, "checkpoints", "train.log"),
                "/elsewhere/a.bin",
                "/elsewhere/b.bin",
                "/elsewhere/c.bin",
            ]
        },
        "every run wrote checkpoints/ckpt.pt, checkpoints/train.log, /elsewhere/a.bin and 2 "
        "more: the runs share a working directory, and a script that reads back what it wrote "
        "may read another run's file",
        None,
    ),
    # tests/test_resume.py: the state a resume's checkpoint failed to restore
    (
        rules.RC032,
        "resume",
        {**RESUMED, "phase": "data", "tensor": "input", "batch_of_step": 1},
        "the resumed run differs from the reference at step 5 · data · input (its step 1); "
        "the checkpoint held: model, optimizer; the resumed run read the batch of step 1 — "
        "the data stream's position was not restored",
        None,
    ),
    *(
        (
            rule,
            "resume",
            RESUMED,
            "the resumed run differs from the reference at step 5 · outputs · output (its step "
            f"1); the checkpoint held: model, optimizer — {tail}",
            None,
        )
        for rule, tail in (
            (rules.RC033, "the generators' state was not restored"),
            (rules.RC034, "the optimizer's state was not restored"),
            (rules.RC035, "the learning-rate scheduler was not restored"),
            (rules.RC036, "the loss scaler's state was not restored"),
            (rules.RC037, "the model's weights were not restored"),
            (rules.RC038, "no restored state explains it"),
        )
    ),
]


def _replicas(kind: str, tensor: str, **agreed: bool | None) -> ReplicaDivergence:
    phase = {"buffer": "weights", "parameter": "weights", "grad": "grads"}.get(kind, kind)
    return ReplicaDivergence("cpu", 0, 1, phase, tensor, kind, [[0], [1]], ["aa", "bb"], agreed)


# the replica check's divergence → its rule (tests/test_distributed.py asserts the codes)
REPLICAS = [
    (
        _replicas("buffer", "norm.running_mean", parameter=True),
        rules.RC022,
        "buffer norm.running_mean differs between replicas (ranks 0 ≠ 1) from step 1 · "
        "weights · norm.running_mean, while every parameter agrees: buffers are not "
        "synchronised across ranks",
    ),
    (
        _replicas("parameter", "fc1.weight", grad=True, parameter=False),
        rules.RC023,
        "parameter fc1.weight differs between replicas (ranks 0 ≠ 1) from step 1 · weights · "
        "fc1.weight, while their gradients agree: the update depends on the rank (a learning "
        "rate, clipping, a scheduler stepped on one rank)",
    ),
    (
        _replicas("optimizer", "state.0.exp_avg", grad=None),
        rules.RC023,
        "optimizer state state.0.exp_avg differs between replicas (ranks 0 ≠ 1) from step 1 · "
        "optimizer · state.0.exp_avg, while their gradients agree: the update depends on the "
        "rank (a learning rate, clipping, a scheduler stepped on one rank)",
    ),
    (
        _replicas("grad", "0.weight", comm=True, grad=False),
        rules.RC024,
        "gradient 0.weight differs between replicas (ranks 0 ≠ 1) at step 1 · grads · "
        "0.weight, while every collective's output agreed: changed per rank after "
        "communication (clipping, a hook, a rank-dependent scale)",
    ),
    (
        _replicas("parameter", "0.weight", grad=False),
        rules.RC024,
        "gradient 0.weight differs between replicas (ranks 0 ≠ 1) at step 1 · weights · "
        "0.weight: gradients not all-reduced, or changed per rank after backward",
    ),
]


@pytest.mark.parametrize(
    ("rule", "way", "facts", "message", "fix"),
    CASES,
    ids=[f"{case[0].code}-{case[1]}-{i}" for i, case in enumerate(CASES)],
)
def test_each_way_says_what_the_report_says(rule, way, facts, message, fix):
    found = rule.fire(way, {"kept": True}, **facts)
    assert found == {
        "code": rule.code,
        "name": rule.name,
        "severity": rule.severity,
        "message": message,
        "fix": fix if fix is not None else rule.fix.split("\n")[0],
        "evidence": {"kept": True},
    }


@pytest.mark.parametrize(("divergence", "rule", "message"), REPLICAS)
def test_a_replica_divergence_fires_the_first_rule_it_triggers(divergence, rule, message):
    found = replica_finding(divergence)
    assert (found["code"], found["message"]) == (rule.code, message)
    d = divergence
    assert found["evidence"] == {"step": d.step, "tensor": d.tensor, "ranks": d.ranks}


def test_every_way_of_every_rule_has_a_case():
    ways = {(rule.code, way) for rule in rules.RULES for way in rule.ways}
    covered = {(case[0].code, case[1]) for case in CASES}
    covered |= {(rule.code, "replicas") for _, rule, _ in REPLICAS}
    assert ways == covered


def test_a_cause_names_its_rule_once_for_the_audit_and_attribution():
    zoom = {"cause": Cause.NONDETERMINISTIC_OP, "op": "aten.index_put_", "source": "t.py:9"}
    (plain,) = rules.for_cause(zoom)
    assert (plain["code"], plain["message"], plain["evidence"]) == (
        "RC011",
        "aten.index_put_ at t.py:9 is nondeterministic",
        None,
    )
    # after attribution (no control helped; here none could be tried), from a cause read
    # back from JSON: a plain string still names its rule
    (after,) = rules.for_cause({**zoom, "cause": Cause.RNG.value}, [])
    assert (after["code"], after["evidence"]) == ("RC015", {"tried": []})
    assert after["message"] == (
        "no control makes the runs reproduce: a generator seeded outside the configured seed "
        "draws at t.py:9"
    )
    assert rules.for_cause({"cause": Cause.DATA}) == rules.for_cause(None) == []


@pytest.mark.parametrize(
    ("text", "codes"),
    [
        ("max-autotune", ["RC026", "RC027"]),
        ("max-autotune-no-cudagraphs", ["RC026"]),
        ("reduce-overhead", ["RC027"]),
        ("coordinate_descent_tuning=True", ["RC026"]),
        ("triton.cudagraphs=True", ["RC027"]),
        ("default", []),
    ],
)
def test_a_compile_call_triggers_by_its_mode_and_options(text, codes):
    fired = [rule.code for rule in rules.RULES if rule.fires("compile call", text=text)]
    assert fired == codes
