"""One house for the options: every audit command declares the same leg options (one flag,
one help text, one default), and they all go through reprocheck.options.audit_setup."""

from __future__ import annotations

import inspect
import json

import pytest
import typer.main

from reprocheck import cli
from reprocheck.options import DEFAULT_OUT, DEPTHS, REPEATS_RANGE, LegOptions
from reprocheck.trace import Trace

from .conftest import CONFIGS, run_cli

AUDITS = ("run", "exec", "record", "check")


def _commands() -> dict[str, object]:
    return typer.main.get_command(cli.app).commands  # type: ignore[attr-defined]


def _options(command: object) -> dict[str, object]:
    """Each option of a click command by its first name (``-n``, ``--steps``)."""
    found = {}
    for param in command.params:  # type: ignore[attr-defined]
        if param.param_type_name == "option":
            for name in param.opts:
                found[name] = param
    return found


def _range(param: object) -> tuple:
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if low is None and high is None:  # an older typer: click's IntRange/FloatRange
        bounds = getattr(param, "type", None)
        low, high = getattr(bounds, "min", None), getattr(bounds, "max", None)
    return low, high


def _kind(param: object) -> str:
    described = getattr(param, "type_descriptor", None)  # typer >= 0.20
    if described is not None:
        return repr(described.annotation)
    return param.type.name  # type: ignore[attr-defined]


def _shape(param: object) -> dict[str, object]:
    """What a user sees of an option and what the command receives from it."""
    return {
        "name": param.name,  # type: ignore[attr-defined]  # what LegOptions.from_cli reads
        "opts": sorted(param.opts),  # type: ignore[attr-defined]
        "secondary_opts": sorted(param.secondary_opts),  # type: ignore[attr-defined]
        "help": param.help,  # type: ignore[attr-defined]
        "default": param.default,  # type: ignore[attr-defined]
        "multiple": param.multiple,  # type: ignore[attr-defined]
        "is_flag": param.is_flag,  # type: ignore[attr-defined]
        "type": _kind(param),
        "range": _range(param),
    }


def test_every_audit_command_takes_the_same_leg_options():
    commands = _commands()
    shapes = {name: _options(commands[name]) for name in AUDITS}
    for option in cli.LEG_OPTIONS:
        seen = {name: _shape(shapes[name][option]) for name in AUDITS if option in shapes[name]}
        assert set(seen) == set(AUDITS), f"{option} is missing from {set(AUDITS) - set(seen)}"
        if option == "-n":  # exec checks -n's range itself (cli.SCRIPT_REPEATS); the
            # others have the config's overrides check it
            ranges = {name: shape.pop("range") for name, shape in seen.items()}
            assert ranges == {"run": (None, None), "exec": REPEATS_RANGE,
                              "record": (None, None), "check": (None, None)}  # fmt: skip
        first = seen["run"]
        for name, shape in seen.items():
            assert shape == first, f"{name} {option}: {shape} != run's {first}"
    # their help as the user reads it
    for name in AUDITS:
        shown = run_cli(name, "--help", env={"COLUMNS": "400"}).stdout
        for option in cli.LEG_OPTIONS:
            assert f" {option} " in shown, f"{name} --help does not list {option}"


def test_an_option_two_commands_share_has_one_help_text():
    helps: dict[str, dict[str, str]] = {}
    for name in (*AUDITS, "doctor"):
        for option, param in _options(_commands()[name]).items():
            if (name, option) in (("doctor", "--steps"), ("doctor", "--attribute")):
                continue  # the probes' steps and doctor's own audit: other options
            helps.setdefault(option, {})[name] = param.help  # type: ignore[attr-defined]
    for option, by_command in helps.items():
        assert len(set(by_command.values())) == 1, f"{option}: {by_command}"


def test_the_defaults_are_taken_from_one_place():
    from reprocheck.parent.audit import AuditOptions
    from reprocheck.pytest_plugin import audit_config

    assert (AuditOptions().out, AuditOptions().depth) == (DEFAULT_OUT, DEPTHS[0])
    assert inspect.signature(audit_config).parameters["out"].default == DEFAULT_OUT
    for name in (*AUDITS, "doctor"):
        options = _options(_commands()[name])
        assert options["--out"].default == DEFAULT_OUT  # type: ignore[attr-defined]
        if "--depth" in options:
            assert options["--depth"].default == DEPTHS[0]  # type: ignore[attr-defined]


def test_leg_options_read_the_command_line_as_every_command_does():
    params = {
        "repeats": 3,
        "steps": None,
        "device": ["cpu, cuda", "mps"],
        "threads": ["1,2"],
        "env": ["A=1"],
        "compile_": None,
        "python": None,
        "depth": "module",
        "record": "sparse",
        "every": 10,
        "out": "elsewhere",
        "jobs": 2,
        "timeout": None,
    }
    legs = LegOptions.from_cli(params, repeats=59)
    assert legs == LegOptions(
        repeats=59,
        devices=("cpu", "cuda", "mps"),
        threads=(1, 2),
        env=("A=1",),
        depth="module",
        record="sparse",
        every=10,
        out="elsewhere",
        jobs=2,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ("exec", "--depth", "module"),
        ("record", "-o", "{tmp}/g.sqlite", "--depth", "op"),
    ],
    ids=["exec", "record"],
)
def test_depth_inside_the_steps_of_a_script_is_one_line(tmp_path, argv):
    script = tmp_path / "train.py"
    script.write_text("print('never run')\n")
    out = tmp_path / "out"
    argv = [part.format(tmp=tmp_path) for part in argv]
    result = run_cli(*argv, "--out", str(out), "--", "python", str(script))
    depth = argv[-1]
    assert (result.code, result.stderr) == (
        2,
        f"reprocheck: error: --depth {depth} records inside a config's own loop: a script's "
        "runs are recorded step by step (after a divergence its step is replayed op by op)\n",
    )
    assert not out.exists()


def test_record_takes_an_environment_leg(tmp_path):
    # --env is new to record (and check): one more leg, compared with the config's own
    golden, out = tmp_path / "g.sqlite", tmp_path / "out"
    result = run_cli(
        "record", str(CONFIGS / "demo.yaml"), "-o", str(golden), "--steps", "2",
        "--device", "cpu", "--env", "REPROCHECK_LEG_FLAG=1", "--out", str(out), "-q",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert result.stdout.startswith(f"golden      {golden}  ")
    (folder,) = out.iterdir()
    report = json.loads((folder / "report.json").read_text())
    assert report["verdict"] == "reproducible"
    legs = [(leg["name"], leg["env"], [r["status"] for r in leg["runs"]]) for leg in report["legs"]]
    assert legs == [
        ("cpu-t1", {}, ["complete", "complete"]),
        ("cpu-t1-e1", {"REPROCHECK_LEG_FLAG": "1"}, ["complete", "complete"]),
    ]
    with Trace(golden) as trace:  # run 0 of the config's own leg: steps 0..2
        assert trace.steps == [0, 1, 2]
