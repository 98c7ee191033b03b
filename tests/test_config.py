"""Config loading: the documented defaults, and one clear line for every malformed config."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reprocheck.config import (
    PHASES,
    Config,
    ConfigError,
    config_reference_markdown,
    config_to_dict,
)
from reprocheck.configfile import apply_overrides, config_from_dict, load_config
from reprocheck.usercode import resolve_callable

from .conftest import CONFIGS, run_cli

ROOT = Path(__file__).resolve().parent.parent
GOOD_TAIL = "model: reprocheck.zoo.models:mlp\ndata: reprocheck.zoo.data:classification\n"

DESIGN_EXAMPLE = """\
name: mlp-demo
seed: 0
repeats: 2
steps: 20
devices: [cpu, cuda]
threads: [1]
determinism:
  preset: seeded
  seed_python: true
  seed_numpy: true
  seed_torch: true
  pythonhashseed: 0
  dataloader_generator: true
  deterministic_algorithms: false
  cudnn_benchmark: null
  cudnn_deterministic: null
  cublas_workspace: null
model:     {factory: reprocheck.zoo.models:mlp, kwargs: {hidden: 64}}
data:      {factory: reprocheck.zoo.data:classification, kwargs: {n: 512},
            batch_size: 32, shuffle: true, num_workers: 0}
optimizer: {name: SGD, lr: 0.1, momentum: 0.9}
loss: cross_entropy
step: null
record: [data, outputs, loss, grads, weights, optimizer, rng]
tolerance: {across_legs: {rtol: 1.0e-5, atol: 1.0e-6}}
"""


def _write(tmp_path: Path, text: str | bytes, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_design_example_loads_exactly(tmp_path):
    config = load_config(_write(tmp_path, DESIGN_EXAMPLE))
    assert (config.name, config.seed, config.repeats, config.steps) == ("mlp-demo", 0, 2, 20)
    assert config.devices == ("cpu", "cuda")
    assert config.threads == (1,)
    assert config.determinism.preset == "seeded"
    assert config.determinism.pythonhashseed == 0
    assert config.model.factory == "reprocheck.zoo.models:mlp"
    assert dict(config.model.kwargs) == {"hidden": 64}
    assert (config.data.batch_size, config.data.shuffle, config.data.num_workers) == (32, True, 0)
    assert dict(config.data.kwargs) == {"n": 512}
    assert config.optimizer.name == "SGD"
    assert dict(config.optimizer.kwargs) == {"lr": 0.1, "momentum": 0.9}
    assert config.loss == "cross_entropy"
    assert config.step is None
    assert config.record == PHASES
    assert (config.tolerance.rtol, config.tolerance.atol) == (1e-5, 1e-6)
    assert config.base_dir == str(tmp_path)
    assert len(config.sha256) == 64


def test_defaults_when_omitted(tmp_path):
    config = load_config(_write(tmp_path, "name: x\n" + GOOD_TAIL))
    assert (config.seed, config.repeats, config.steps) == (0, 2, 20)
    assert config.devices == ("cpu",)
    assert config.threads == (None,)
    assert config.determinism == dataclasses.replace(config.determinism, preset="seeded")
    assert config.optimizer.name == "SGD"
    assert config.record == PHASES


def test_presets_and_overrides(tmp_path):
    strict = load_config(_write(tmp_path, "name: x\ndeterminism: {preset: strict}\n" + GOOD_TAIL))
    d = strict.determinism
    assert (d.deterministic_algorithms, d.cudnn_benchmark, d.cudnn_deterministic) == (
        True,
        False,
        True,
    )
    assert (d.cublas_workspace, d.fill_uninitialized_memory) == (":4096:8", True)
    none = load_config(_write(tmp_path, "name: x\ndeterminism: none\n" + GOOD_TAIL, "n.yaml"))
    d = none.determinism
    assert (d.seed_python, d.seed_numpy, d.seed_torch) == (False, False, False)
    assert (d.pythonhashseed, d.dataloader_generator) == (None, False)
    mixed = load_config(
        _write(
            tmp_path,
            "name: x\ndeterminism: {preset: none, seed_torch: true, pythonhashseed: 7}\n"
            + GOOD_TAIL,
            "m.yaml",
        )
    )
    assert (mixed.determinism.seed_torch, mixed.determinism.pythonhashseed) == (True, 7)
    assert mixed.determinism.seed_numpy is False


def test_round_trip_and_overrides():
    config = load_config(ROOT / "configs" / "demo.yaml")
    rebuilt = config_from_dict(config_to_dict(config), path=config.path, base_dir=config.base_dir)
    assert rebuilt == dataclasses.replace(config, sha256=None)
    changed = apply_overrides(config, repeats=3, steps=5, devices=["cpu"], threads=[1, 2])
    assert (changed.repeats, changed.steps, changed.devices, changed.threads) == (
        3,
        5,
        ("cpu",),
        (1, 2),
    )
    with pytest.raises(ConfigError, match=r"--device.*unknown device 'gpu'"):
        apply_overrides(config, devices=["gpu"])
    with pytest.raises(ConfigError, match=r"-n: 0 is out of range 1\.\.1000"):
        apply_overrides(config, repeats=0)


def test_file_factory_relative_to_config(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\ndef build(width=3):\n    return torch.nn.Linear(width, 2)\n"
    )
    config = load_config(
        _write(
            tmp_path,
            "name: x\nmodel: {factory: mymodels.py:build, kwargs: {width: 5}}\n"
            "data: reprocheck.zoo.data:classification\n",
        )
    )
    model = resolve_callable(config.model.factory, config.base_dir)(**config.model.kwargs)
    assert model.in_features == 5


def test_reference_lists_every_key():
    text = config_reference_markdown()
    for key in (
        "`name`",
        "`determinism.pythonhashseed`",
        "`data.num_workers`",
        "`tolerance.across_legs.rtol`",
        "`optimizer.name`",
    ):
        assert key in text


# (content, expected line or None, text that must appear in the message)
BAD = {
    "empty": ("", None, "empty config"),
    "only-comment": ("# nothing\n", None, "empty config"),
    "scalar": ("just a string\n", None, "expected a mapping"),
    "list": ("- a\n- b\n", None, "expected a mapping"),
    "syntax-bracket": ("name: [x\nmodel: y\n", 2, "YAML syntax error"),
    "syntax-indent": ("name: x\n  model: y\n", 2, "YAML syntax error"),
    "syntax-colon": ("name: x\nmodel: : :\n", 2, "YAML syntax error"),
    "tabs": ("name: x\nmodel:\n\tfactory: a:b\n", 3, "tab used for indentation"),
    "unknown-top": (
        "name: x\noptimiser: {name: SGD}\n" + GOOD_TAIL,
        2,
        "unknown key 'optimiser' — did you mean 'optimizer'?",
    ),
    "optimizer-kwarg-typo": (
        "name: x\noptimizer: {name: SGD, lr: 0.1, momentun: 0.9}\n" + GOOD_TAIL,
        2,
        "torch.optim.SGD takes no argument 'momentun' — did you mean 'momentum'?",
    ),
    "optimizer-kwarg-of-another-optimizer": (
        "name: x\noptimizer: {name: Adam, momentum: 0.9}\n" + GOOD_TAIL,
        2,
        "torch.optim.Adam takes no argument 'momentum'",
    ),
    "unknown-determinism": (
        "name: x\ndeterminism: {seed_pyton: true}\n" + GOOD_TAIL,
        2,
        "did you mean 'seed_python'?",
    ),
    "unknown-data": (
        "name: x\nmodel: reprocheck.zoo.models:mlp\ndata: {factory: "
        "reprocheck.zoo.data:classification, batchsize: 3}\n",
        3,
        "did you mean 'batch_size'?",
    ),
    "unknown-model": (
        "name: x\nmodel: {factory: reprocheck.zoo.models:mlp, kwarg: {}}\n"
        "data: reprocheck.zoo.data:classification\n",
        2,
        "did you mean 'kwargs'?",
    ),
    "unknown-tolerance": (
        "name: x\ntolerance: {across_leg: {}}\n" + GOOD_TAIL,
        2,
        "did you mean 'across_legs'?",
    ),
    "unknown-tolerance-inner": (
        "name: x\ntolerance:\n  across_legs: {rtl: 1}\n" + GOOD_TAIL,
        3,
        "did you mean 'rtol'?",
    ),
    "duplicate-top": (
        "name: x\nseed: 1\nseed: 2\n" + GOOD_TAIL,
        3,
        "duplicate key 'seed' (first at line 2)",
    ),
    "duplicate-nested": (
        "name: x\noptimizer:\n  lr: 1\n  lr: 2\n" + GOOD_TAIL,
        4,
        "duplicate key 'lr'",
    ),
    "missing-name": (GOOD_TAIL, None, "missing required key 'name'"),
    "missing-model": (
        "name: x\ndata: reprocheck.zoo.data:classification\n",
        None,
        "missing required key 'model'",
    ),
    "missing-data": (
        "name: x\nmodel: reprocheck.zoo.models:mlp\n",
        None,
        "missing required key 'data'",
    ),
    "model-no-factory": (
        "name: x\nmodel: {kwargs: {}}\ndata: reprocheck.zoo.data:classification\n",
        2,
        "missing key 'factory'",
    ),
    "data-no-factory": (
        "name: x\nmodel: reprocheck.zoo.models:mlp\ndata: {batch_size: 2}\n",
        3,
        "missing key 'factory'",
    ),
    "name-list": ("name: [a]\n" + GOOD_TAIL, 1, "expected a non-empty string"),
    "name-empty": ("name: ''\n" + GOOD_TAIL, 1, "expected a non-empty string"),
    "seed-bool": ("name: x\nseed: true\n" + GOOD_TAIL, 2, "expected an integer, got a boolean"),
    "seed-negative": ("name: x\nseed: -1\n" + GOOD_TAIL, 2, "out of range"),
    "seed-huge": ("name: x\nseed: 99999999999999999999\n" + GOOD_TAIL, 2, "out of range"),
    "seed-float": ("name: x\nseed: 1.5\n" + GOOD_TAIL, 2, "expected an integer"),
    "seed-string": ("name: x\nseed: abc\n" + GOOD_TAIL, 2, "expected an integer"),
    "repeats-zero": ("name: x\nrepeats: 0\n" + GOOD_TAIL, 2, "out of range 1..1000"),
    "repeats-huge": ("name: x\nrepeats: 5000\n" + GOOD_TAIL, 2, "out of range 1..1000"),
    "steps-negative": ("name: x\nsteps: -3\n" + GOOD_TAIL, 2, "out of range"),
    "steps-string": ("name: x\nsteps: many\n" + GOOD_TAIL, 2, "expected an integer"),
    "device-unknown": ("name: x\ndevices: [cpu, gpu]\n" + GOOD_TAIL, 2, "unknown device 'gpu'"),
    "device-twice": ("name: x\ndevices: [cpu, cpu]\n" + GOOD_TAIL, 2, "listed twice"),
    "device-int": ("name: x\ndevices: 3\n" + GOOD_TAIL, 2, "expected a device"),
    "devices-empty": ("name: x\ndevices: []\n" + GOOD_TAIL, 2, "expected a device"),
    "threads-zero": ("name: x\nthreads: [0]\n" + GOOD_TAIL, 2, "out of range 1..1024"),
    "threads-string": ("name: x\nthreads: two\n" + GOOD_TAIL, 2, "expected a thread count"),
    "threads-twice": ("name: x\nthreads: [1, 1]\n" + GOOD_TAIL, 2, "listed twice"),
    "preset-unknown": (
        "name: x\ndeterminism: {preset: strcit}\n" + GOOD_TAIL,
        2,
        "unknown preset 'strcit' — did you mean 'strict'?",
    ),
    "determinism-list": ("name: x\ndeterminism: [a]\n" + GOOD_TAIL, 2, "expected a mapping"),
    "hashseed-string": (
        "name: x\ndeterminism: {pythonhashseed: random}\n" + GOOD_TAIL,
        2,
        "expected an integer",
    ),
    "hashseed-range": (
        "name: x\ndeterminism: {pythonhashseed: 4294967296}\n" + GOOD_TAIL,
        2,
        "out of range",
    ),
    "deterministic-bad": (
        "name: x\ndeterminism: {deterministic_algorithms: maybe}\n" + GOOD_TAIL,
        2,
        "expected true, false or warn",
    ),
    "cublas-bad": ("name: x\ndeterminism: {cublas_workspace: big}\n" + GOOD_TAIL, 2, "':4096:8'"),
    "seed-torch-int": (
        "name: x\ndeterminism: {seed_torch: 1}\n" + GOOD_TAIL,
        2,
        "expected true or false",
    ),
    "cudnn-string": (
        "name: x\ndeterminism: {cudnn_benchmark: 'no'}\n" + GOOD_TAIL,
        2,
        "expected true or false or null",
    ),
    "optimizer-unknown": (
        "name: x\noptimizer: {name: Adamw}\n" + GOOD_TAIL,
        2,
        "did you mean 'AdamW'?",
    ),
    "optimizer-not-class": (
        "name: x\noptimizer: lr_scheduler\n" + GOOD_TAIL,
        2,
        "unknown optimizer",
    ),
    "optimizer-list": ("name: x\noptimizer: [SGD]\n" + GOOD_TAIL, 2, "expected a mapping"),
    "lr-negative": ("name: x\noptimizer: {name: SGD, lr: -1}\n" + GOOD_TAIL, 2, "finite number"),
    "lr-string": (
        "name: x\noptimizer: {name: SGD, lr: fast}\n" + GOOD_TAIL,
        2,
        "expected a number",
    ),
    "loss-unknown": (
        "name: x\nloss: crossentropy\n" + GOOD_TAIL,
        2,
        "did you mean 'cross_entropy'?",
    ),
    "loss-bad-factory": (
        "name: x\nloss: 'not a path:fn'\n" + GOOD_TAIL,
        2,
        "is not `module:function`",
    ),
    "record-unknown": (
        "name: x\nrecord: [data, grad]\n" + GOOD_TAIL,
        2,
        "unknown phase 'grad' — did you mean 'grads'?",
    ),
    "record-empty": ("name: x\nrecord: []\n" + GOOD_TAIL, 2, "expected a list of phases"),
    "record-string": ("name: x\nrecord: data\n" + GOOD_TAIL, 2, "expected a list of phases"),
    "factory-no-colon": (
        "name: x\nmodel: reprocheck.zoo.models.mlp\ndata: reprocheck.zoo.data:classification\n",
        2,
        "is not `module:function`",
    ),
    "factory-bad-ident": (
        "name: x\nmodel: 'reprocheck.zoo.models:1mlp'\ndata: reprocheck.zoo.data:classification\n",
        2,
        "is not `module:function`",
    ),
    "factory-missing-file": (
        "name: x\nmodel: nothere.py:build\ndata: reprocheck.zoo.data:classification\n",
        2,
        "nothere.py not found",
    ),
    "factory-int": (
        "name: x\nmodel: {factory: 3}\ndata: reprocheck.zoo.data:classification\n",
        2,
        "expected a non-empty string",
    ),
    "kwargs-list": (
        "name: x\nmodel: {factory: reprocheck.zoo.models:mlp, kwargs: [1]}\n"
        "data: reprocheck.zoo.data:classification\n",
        2,
        "keyword arguments",
    ),
    "batch-zero": (
        "name: x\nmodel: reprocheck.zoo.models:mlp\ndata: {factory: "
        "reprocheck.zoo.data:classification, batch_size: 0}\n",
        3,
        "out of range",
    ),
    "workers-negative": (
        "name: x\nmodel: reprocheck.zoo.models:mlp\ndata: {factory: "
        "reprocheck.zoo.data:classification, num_workers: -1}\n",
        3,
        "out of range",
    ),
    "shuffle-string": (
        "name: x\nmodel: reprocheck.zoo.models:mlp\ndata: {factory: "
        "reprocheck.zoo.data:classification, shuffle: sometimes}\n",
        3,
        "expected true or false",
    ),
    "rtol-negative": (
        "name: x\ntolerance: {across_legs: {rtol: -1}}\n" + GOOD_TAIL,
        2,
        "finite number",
    ),
    "atol-nan": (
        "name: x\ntolerance: {across_legs: {atol: .nan}}\n" + GOOD_TAIL,
        2,
        "finite number",
    ),
    "python-tag": (
        'name: !!python/object/apply:os.system ["touch {canary}"]\n' + GOOD_TAIL,
        1,
        "is not allowed",
    ),
    "python-name-tag": ("name: !!python/name:os.system\n" + GOOD_TAIL, 1, "is not allowed"),
    "custom-tag": ("name: !custom x\n" + GOOD_TAIL, 1, "is not allowed"),
}


def test_at_least_fifty_malformed_configs():
    assert len(BAD) >= 50


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_config_is_one_clear_line(tmp_path, case):
    text, line, needle = BAD[case]
    canary = tmp_path / "pwned"
    path = _write(tmp_path, text.replace("{canary}", str(canary)), f"{case}.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert needle in message, message
    assert message.startswith(f"{path}:{line}:" if line else f"{path}:"), message
    assert not canary.exists()


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("binary.yaml", b"\x00\x01\x02name: x", "binary file"),
        ("latin1.yaml", "name: caf\xe9\n".encode("latin-1"), "not UTF-8"),
        ("missing.yaml", None, "no such config file"),
    ],
)
def test_unreadable_files(tmp_path, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_alias_bomb_fails_fast(tmp_path):
    rows = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for level, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[level]
        rows.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    path = _write(tmp_path, "\n".join(rows) + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="alias bomb"):
        load_config(path)
    assert time.monotonic() - started < 2


def test_function_missing_from_file(tmp_path):
    (tmp_path / "m.py").write_text("def build():\n    pass\n")
    path = _write(tmp_path, "name: x\nmodel: m.py:buld\ndata: reprocheck.zoo.data:classification\n")
    with pytest.raises(
        ConfigError, match=r":2: model.factory: m.py defines no 'buld' — did you mean 'build'\?"
    ):
        load_config(path)


def test_resolve_callable_errors():
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg'"):
        resolve_callable("no_such_pkg.mod:fn")
    with pytest.raises(ConfigError, match="has no function 'mpl' — did you mean 'mlp'"):
        resolve_callable("reprocheck.zoo.models:mpl")


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
KEYS = [
    "name",
    "seed",
    "repeats",
    "steps",
    "devices",
    "threads",
    "determinism",
    "model",
    "data",
    "optimizer",
    "loss",
    "step",
    "record",
    "tolerance",
]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=200))
def test_fuzz_text_never_crashes(tmp_path, text):
    path = _write(tmp_path, text.encode("utf-8", "replace"), "fuzz.yaml")
    try:
        assert isinstance(load_config(path), Config)
    except ConfigError as exc:
        assert "\n" not in str(exc)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.dictionaries(st.sampled_from(KEYS), yaml_values, max_size=8))
def test_fuzz_structures_never_crash(tmp_path, data):
    path = _write(tmp_path, yaml.safe_dump(data), "fuzz.yaml")
    try:
        assert isinstance(load_config(path), Config)
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_readme_reference_is_generated_from_the_dataclasses():
    assert config_reference_markdown() in (ROOT / "docs" / "config.md").read_text()


def test_an_optimizer_kwarg_typo_stops_the_cli_before_any_run(tmp_path):
    config = _write(
        tmp_path,
        (CONFIGS / "demo.yaml").read_text().replace("momentum: 0.9", "momentun: 0.9"),
        "typo.yaml",
    )
    out = tmp_path / "out"
    result = run_cli("run", str(config), "--quiet", "--out", str(out))
    assert result.code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "optimizer.momentun" in line and "did you mean 'momentum'?" in line
    assert result.stdout == ""
    assert not out.exists()  # refused before any run started


def test_the_optimizers_read_from_torchs_source_are_its_classes_and_keywords():
    # a config is validated before its runs start, without importing torch: each
    # torch.optim optimizer's keywords as read from the installed source (AdamW's
    # inherited base included) are what its signature says
    import torch

    from reprocheck.configfile import _optimizer_keywords, _static_optimizer_keywords

    names = [
        name
        for name in dir(torch.optim)
        if isinstance(getattr(torch.optim, name), type)
        and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)
        and name != "Optimizer"
    ]
    assert {"SGD", "Adam", "AdamW", "LBFGS"} <= set(names)
    for name in names:
        runtime = _optimizer_keywords(getattr(torch.optim, name))
        assert _static_optimizer_keywords(name) in (runtime, None), name
    assert _static_optimizer_keywords("AdamW") == _optimizer_keywords(torch.optim.AdamW)
    for other in ("Optimizer", "lr_scheduler", "Adamw", "swa_utils"):
        assert _static_optimizer_keywords(other) is None  # checked on the imported torch
