"""``reprocheck resume`` and ``run --resume-at``: real runs of scripts that checkpoint and
resume (tests/scripts/resume_*.py), each audit once per module and shared by its tests.
The default suite runs one real resume audit (a full checkpoint, with its control) and the
usage errors; every other case is ``slow`` (``make test-slow``)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import ROOT, SCRIPTS, CliResult, run_cli


class Resumes:
    """``reprocheck resume -q --json … -- python tests/scripts/SCRIPT ARGS``, each distinct
    command once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.done: dict[tuple[str, ...], CliResult] = {}

    def __call__(
        self, script: str, *args: str, resume: str = "--resume", at: int = 4, options=()
    ) -> CliResult:
        key = (script, *args, "|", resume, str(at), *options)
        if key not in self.done:
            index = len(self.done)
            self.done[key] = run_cli(
                "resume", "--at", str(at), "--with", resume, "-q",
                "--out", str(self.folder / f"out{index}"),
                "--json", str(self.folder / f"r{index}.json"),
                "--junit", str(self.folder / f"j{index}.xml"),
                *options, "--", "python", str(SCRIPTS / script), *args,
                cwd=self.folder,
            )  # fmt: skip
            assert self.done[key].report is not None, self.done[key].stderr
        return self.done[key]

    def junit(self, result: CliResult) -> ET.Element:
        index = list(self.done.values()).index(result)
        return ET.parse(self.folder / f"j{index}.xml").getroot()


@pytest.fixture(scope="module")
def resumes(tmp_path_factory) -> Resumes:
    return Resumes(tmp_path_factory.mktemp("resume"))


def _where(divergence: dict) -> tuple:
    return (
        divergence["step"],
        divergence["resumed_step"],
        divergence["phase"],
        divergence["tensor"],
    )


def test_a_checkpoint_of_every_state_resumes_bit_for_bit_and_the_rng_control_diverges(resumes):
    result = resumes("resume_plain.py")
    r = result.report
    assert (result.code, r["verdict"], r["exit_code"]) == (0, "equivalent", 0)
    assert r["checkpoint"]["step"] == 4
    (saved,) = r["checkpoint"]["files"]
    assert saved["keys"] == ["step", "model", "optimizer", "scheduler", "rng", "data"]
    assert saved["writer"] == "torch.save"
    # the stopped run's own folder: the resumed run read back what it wrote there
    stopped = r["runs"]["stopped"]["workdir"]
    assert saved["file"] == str(Path(stopped) / "ckpt.pt")
    assert r["checkpoint"]["loaded"] == [saved["file"]]
    assert r["runs"]["resumed"]["workdir"] == stopped
    assert r["runs"]["reference"]["workdir"] != stopped
    assert [r["runs"][n]["steps"] for n in ("reference", "stopped", "resumed")] == [12, 4, 8]
    assert r["aligned_step"] == 4
    assert {k: v["status"] for k, v in r["state_at_resume"].items()} == {
        "weights": "equal",
        "optimizer": "equal",
        "rng": "equal",
    }
    assert r["compared"] == {"from": 5, "to": 12, "steps": 8}
    assert r["first_divergence"] is None and r["missing"] is None
    # the script draws from the generators after the checkpoint (dropout): rng by default
    control = r["control"]
    assert (control["what"], control["applied"], control["diverged"]) == ("rng", True, True)
    assert _where(control["first_divergence"]) == (5, 1, "outputs", "output")
    # both loss curves, the resumed one placed at the reference's steps
    assert [step for step, _ in r["losses"]["resumed"]] == list(range(5, 13))
    assert r["losses"]["resumed"] == [p for p in r["losses"]["reference"] if p[0] >= 5]
    suite = resumes.junit(result)
    assert suite.get("failures") == "0" and suite.get("errors") == "0"
    assert Path(r["html"]).exists()


@pytest.mark.slow
def test_a_checkpoint_without_the_generators_names_them(resumes):
    result = resumes("resume_plain.py", "--omit", "rng", options=("--control", "none"))
    r = result.report
    assert (result.code, r["verdict"]) == (1, "diverged")
    assert _where(r["first_divergence"]) == (5, 1, "outputs", "output")
    assert (r["missing"]["state"], r["missing"]["code"]) == ("rng", "RC033")
    assert r["state_at_resume"]["rng"]["status"] == "differs"
    assert r["checkpoint"]["files"][0]["keys"] == [
        "step",
        "model",
        "optimizer",
        "scheduler",
        "data",
    ]
    assert r["control"] is None
    suite = resumes.junit(result)
    assert suite.get("failures") == "1"
    assert "RC033" in ET.tostring(suite, encoding="unicode")


@pytest.mark.slow
def test_no_checkpoint_at_or_after_the_step_is_not_verified(resumes):
    result = resumes("resume_plain.py", at=20)
    r = result.report
    assert (result.code, r["verdict"]) == (3, "not_verified")
    assert r["reason"] == "no checkpoint saved at or after step 20: it saved at steps 4, 8, 12"
    assert "resumed" not in r["runs"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "omit, where, state, code",
    [
        ("optimizer", (4, 0, "optimizer", "net.0.weight.exp_avg"), "optimizer", "RC034"),
        ("data", (5, 1, "data", "input"), "data", "RC032"),
        ("scheduler", (6, 2, "weights", "net.0.weight"), "scheduler", "RC035"),
        ("weights", (4, 0, "weights", "net.0.weight"), "weights", "RC037"),
    ],
)
def test_the_state_a_checkpoint_leaves_out_is_named(resumes, omit, where, state, code):
    result = resumes("resume_plain.py", "--omit", omit, options=("--control", "none"))
    r = result.report
    assert (result.code, r["verdict"]) == (1, "diverged")
    assert _where(r["first_divergence"]) == where
    assert (r["missing"]["state"], r["missing"]["code"]) == (state, code)


@pytest.mark.slow
def test_a_loss_scale_not_restored_is_named(resumes):
    # the scale doubles every step: the loss backward() receives differs by a power of two
    result = resumes(
        "resume_plain.py", "--scaler", "--omit", "scaler", options=("--control", "none")
    )
    r = result.report
    assert _where(r["first_divergence"]) == (5, 1, "loss", "loss")
    assert (r["missing"]["state"], r["missing"]["code"]) == ("scaler", "RC036")


@pytest.mark.slow
def test_the_data_control_skips_a_batch(resumes):
    r = resumes("resume_plain.py", options=("--control", "data")).report
    assert r["verdict"] == "equivalent"
    assert (r["control"]["what"], r["control"]["diverged"]) == ("data", True)
    assert _where(r["control"]["first_divergence"]) == (5, 1, "data", "input")


@pytest.mark.slow
def test_a_lightning_ckpt_path_resume_restarts_the_epoch(resumes):
    # Lightning restores weights, optimizer and the loops' counters, but neither the global
    # generators nor the position inside the epoch: the resumed run reads step 1's batch again
    result = resumes(
        "resume_lightning.py", resume="--ckpt-path ckpts/step=4.ckpt", options=("--control", "none")
    )
    r = result.report
    assert (result.code, r["verdict"]) == (1, "diverged")
    saved = r["checkpoint"]["files"][0]
    assert saved["file"].endswith("workdirs/stopped/ckpts/step=4.ckpt")
    assert {"state_dict", "optimizer_states", "loops"} <= set(saved["keys"])
    assert r["checkpoint"]["loaded"] == [saved["file"]]
    assert {k: v["status"] for k, v in r["state_at_resume"].items() if k != "rng"} == {
        "weights": "equal",
        "optimizer": "equal",
    }
    assert _where(r["first_divergence"]) == (5, 1, "data", "batch.0")
    assert (r["missing"]["state"], r["missing"]["code"]) == ("data", "RC032")
    assert r["missing"]["evidence"]["batch_of_step"] == 1


@pytest.mark.slow
def test_a_configs_own_checkpoints_resume_bit_for_bit(tmp_path):
    result = run_cli(
        "run", str(ROOT / "configs" / "demo.yaml"), "--resume-at", "4", "-q",
        "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json"),
    )  # fmt: skip
    r = result.report
    assert (result.code, r["verdict"]) == (0, "equivalent"), result.stderr
    assert set(r["runs"]) == {"reference", "resumed", "control"}
    assert r["checkpoint"]["step"] == 4 and r["aligned_step"] == 4
    assert r["resume_command"] is None
    assert r["compared"] == {"from": 5, "to": 20, "steps": 16}
    assert {v["status"] for v in r["state_at_resume"].values()} == {"equal"}
    # the demo's loader shuffles from a generator of its own: the optimizer's state applies
    control = r["control"]
    assert (control["what"], control["applied"], control["diverged"]) == ("optimizer", True, True)
    assert _where(control["first_divergence"])[2] == "optimizer"


@pytest.mark.parametrize(
    "args, message",
    [
        (("resume", "--with", "x", "--", "python", "t.py"), "Missing option '--at'"),
        (("resume", "--at", "0", "--", "python", "t.py"), "--at"),
        (("resume", "--at", "4", "--control", "all", "--", "python", "t.py"), "--control takes"),
        (("resume", "--at", "4", "--with", "'--resume", "--", "python", "t.py"), "--with:"),
        (("resume", "--at", "4", "--", "python", "missing.py"), "missing.py"),
        (("run", "configs/demo.yaml", "--resume-at", "20"), "the config trains 20 steps"),
        (
            ("resume", "--at", "4", "--", "torchrun", "--nproc_per_node", "2", "t.py"),
            "torchrun job is not supported",
        ),
    ],
)
def test_a_bad_resume_command_is_one_line_and_exit_2(args, message, tmp_path):
    (tmp_path / "t.py").write_text("print('never run')\n")
    if args[0] == "run":
        args = ("run", str(ROOT / args[1]), *args[2:])
    for quiet in ((), ("-q",)):
        result = run_cli(*args[:1], *quiet, *args[1:], cwd=tmp_path)
        assert result.code == 2, (result.stdout, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_a_transformers_trainer_resume_from_checkpoint_is_exact(resumes):
    # the Trainer saves weights (safetensors), optimizer, scheduler and generators, and
    # skips the batches already used: bit for bit; its loader fetches one batch ahead
    result = resumes("resume_hf.py", resume="--resume out/checkpoint-4")
    r = result.report
    assert (result.code, r["verdict"]) == (0, "equivalent"), r["reason"]
    files = {Path(f["file"]).name: (f["writer"], f["holds"]) for f in r["checkpoint"]["files"]}
    assert files["model.safetensors"] == ("safetensors", ["weights"])
    assert files["optimizer.pt"] == ("torch.save", ["optimizer"])
    assert files["scheduler.pt"] == ("torch.save", ["scheduler"])
    assert files["rng_state.pth"] == ("torch.save", ["rng"])
    assert all("checkpoint-4" in f["file"] for f in r["checkpoint"]["files"])
    assert r["compared"] == {"from": 5, "to": 12, "steps": 8}
    control = r["control"]
    assert (control["what"], control["diverged"]) == ("rng", True)
    assert _where(control["first_divergence"]) == (5, 1, "outputs", "output.loss")


@pytest.mark.slow
def test_a_nanogpt_style_init_from_resume_misses_the_generators(resumes):
    # nanoGPT's checkpoint holds model, optimizer, iter_num: get_batch's torch.randint draws
    # from a generator seeded at start-up, so the resumed run samples other batches
    result = resumes(
        "nanogpt_style.py", "--out_dir=out", resume="--init_from=resume", at=5,
        options=("--control", "none"),
    )  # fmt: skip
    r = result.report
    assert (result.code, r["verdict"]) == (1, "diverged")
    assert r["checkpoint"]["step"] == 5 and r["aligned_step"] == 5
    assert r["checkpoint"]["files"][0]["keys"] == [
        "model", "optimizer", "model_args", "iter_num", "best_val_loss", "config",
    ]  # fmt: skip
    assert _where(r["first_divergence"]) == (6, 1, "outputs", "output0.0")
    assert (r["missing"]["state"], r["missing"]["code"]) == ("rng", "RC033")
