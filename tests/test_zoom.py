"""The zoom: from the divergent tensor to the module, the aten op, the source line and the
cause — on planted fixtures and on a real nondeterministic CPU op."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from reprocheck.localize import OpCapture, first_divergent_op, localize
from reprocheck.zoo import indexing, planted

from .conftest import CONFIGS, run_cli, write_config


def _source(function, needle: str) -> str:
    lines, start = inspect.getsourcelines(function)
    offset = next(i for i, line in enumerate(lines) if needle in line)
    path = inspect.getsourcefile(function)
    import os

    return f"{os.path.relpath(path)}:{start + offset}"


def test_forward_noise_names_module_op_and_line(audit):
    result = audit("planted-forward.yaml")
    assert result.code == 1, result.stderr
    d = result.report["first_divergence"]
    assert (d["step"], d["phase"], d["tensor"]) == (3, "outputs", "output")
    assert (d["module"], d["op"], d["stage"]) == ("ForwardNoise", "aten.randn", "forward")
    assert d["source"] == _source(planted.ForwardNoise.forward, "torch.randn")
    assert d["cause"] == "unseeded or re-seeded RNG"
    assert d["source_is_forward_line"] is False
    assert "zoom        module ForwardNoise → op aten.randn (forward)" in _terminal(result)
    # 6 steps: a checkpoint after every step; the replay of step 3 starts from step 1's,
    # proven by step 2 and step 3's data, and the audit folder keeps no checkpoint after
    assert (d["replay_from"], d["replays"], d["replays_diverged"]) == (1, 1, 1)
    folder = Path(result.report["legs"][0]["runs"][0]["trace"]).parent
    assert not list(folder.glob("*.ckpt-*"))


def test_state_no_checkpoint_holds_falls_back_to_a_replay_from_step_0(audit, tmp_path):
    """A model whose step counter is hidden from its state_dict: resumed from a checkpoint
    it would not misbehave at step 4, so the resumed pair agrees and the zoom replays
    from step 0 — with the same, exact answer."""
    (tmp_path / "hidden.py").write_text(
        "from reprocheck.zoo.planted import ForwardNoise\n\n"
        "class Hidden(ForwardNoise):\n"
        "    def get_extra_state(self):\n"
        "        return 0\n\n"
        "    def set_extra_state(self, state):\n"
        "        pass\n\n"
        "def model():\n"
        "    return Hidden(step=4)\n"
    )
    config = write_config(
        tmp_path,
        (CONFIGS / "planted-forward.yaml")
        .read_text()
        .replace("reprocheck.zoo.planted:forward_noise, kwargs: {step: 3}", "hidden.py:model"),
    )
    result = audit(config)
    assert result.code == 1, result.stderr
    d = result.report["first_divergence"]
    assert (d["step"], d["phase"], d["tensor"]) == (4, "outputs", "output")
    assert (d["op"], d["replay_from"], d["replays"]) == ("aten.randn", 0, 2)


def test_backward_noise_names_the_backward_op_and_its_line(audit):
    result = audit("planted-backward.yaml")
    assert result.code == 1, result.stderr
    d = result.report["first_divergence"]
    assert (d["step"], d["phase"], d["tensor"]) == (3, "grads", "fc1.weight")
    assert (d["op"], d["stage"]) == ("aten.randn", "backward")
    assert d["source"] == _source(planted._GradNoise.backward, "torch.randn")
    assert d["cause"] == "unseeded or re-seeded RNG"


def test_unseeded_init_is_initialisation_at_step_0(audit):
    result = audit("planted-init.yaml")
    assert result.code == 1, result.stderr
    d = result.report["first_divergence"]
    assert (d["step"], d["phase"], d["tensor"]) == (0, "weights", "fc1.weight")
    assert d["cause"] == "initialisation"
    assert d["op"] == "aten.randn"
    assert d["source"] == _source(planted.UnseededInit.__init__, "torch.randn")
    assert [v["tensor"] for v in d["variability"]] == [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    ]


def test_real_nondeterministic_index_put_is_named_with_its_forward_line(audit):
    # the audit tests/test_pool.py attributes (shared by the session): attribution runs
    # after the zoom and leaves the first divergence as it found it
    result = audit("nondeterministic-index.yaml", "--attribute")
    assert result.code == 1, result.stderr
    d = result.report["first_divergence"]
    assert (d["step"], d["phase"], d["tensor"]) == (1, "grads", "table")
    assert d["op"].startswith("aten.index_put")
    assert d["stage"] == "backward"
    assert d["module"] == "TableLookup"
    assert d["source"] == _source(indexing.TableLookup.forward, "self.table[idx]")
    assert d["source_is_forward_line"] is True
    assert d["cause"] == "nondeterministic op"
    assert d["variability"] == [
        {"phase": "grads", "tensor": "table", "distinct": 2, "runs": [[0], [1]]}
    ]


@pytest.mark.slow
def test_no_zoom_leaves_the_op_out(audit):
    result = audit("planted-forward.yaml", "--no-zoom")
    assert result.code == 1
    d = result.report["first_divergence"]
    assert d["op"] is None and d["cause"] is None
    assert d["elements_differing"] > 0  # still measured


def _terminal(result) -> str:
    """The terminal report of the same audit's JSON, as a user sees it."""
    from io import StringIO

    from rich.console import Console

    from reprocheck.report.terminal import render

    buffer = StringIO()
    render(result.report, Console(file=buffer, width=200, soft_wrap=True))
    return buffer.getvalue()


@pytest.mark.parametrize("node_lookup", [True, False], ids=["current-node", "node-hooks"])
def test_capture_in_process_finds_the_nondeterministic_op(node_lookup, monkeypatch):
    """OpCapture itself, in this process: two backward passes of the same lookup with 2
    threads disagree at index_put, with identical inputs; the backward op gets its forward
    line both through torch's current-node query and through node hooks (older torch)."""
    import reprocheck.localize as localize_module

    if not node_lookup:
        monkeypatch.setattr(localize_module, "_CURRENT_NODE", None)
    torch.manual_seed(0)
    model = indexing.table_lookup(vocab=8, dim=16, seq_len=512)
    idx = torch.randint(0, 8, (32, 512))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        captures = []
        for _ in range(24):  # a race: under load, two passes agree more often
            model.zero_grad()
            capture = OpCapture(model)
            with capture.during("forward"):
                loss = model(idx).sum()
            with capture.during("backward"):
                loss.backward()
            captures.append(capture.ops)
    finally:
        torch.set_num_threads(previous)
    located = [localize(captures[0], other, 1, "grads") for other in captures[1:]]
    found = [loc for loc in located if loc is not None]
    assert found, "index_put accumulation agreed in 24 backward passes on 2 threads"
    assert all(loc["op"].startswith("aten.index_put") for loc in found)
    assert all(loc["cause"] == "nondeterministic op" for loc in found)
    line = _source(indexing.TableLookup.forward, "self.table[idx]")
    assert [loc["source"] for loc in found] == [line] * len(found)
    assert [loc["source_is_forward_line"] for loc in found] == [True] * len(found)
    assert first_divergent_op(captures[0], captures[0]) is None


def test_show_lists_a_step(audit):
    result = audit("planted-backward.yaml", "--no-measure")
    trace = result.report["legs"][0]["runs"][0]["trace"]
    shown = run_cli("show", trace, "--step", "1")
    assert shown.code == 0, shown.stderr
    rows = [line.split() for line in shown.stdout.splitlines()]
    grads = [row for row in rows if row[1:3] == ["grads", "fc1.weight"]]
    assert len(grads) == 1 and grads[0][3:5] == ["64×32", "float32"]
    phases = [row[1] for row in rows if row and row[0].isdigit()]
    assert phases == sorted(
        phases, key=["data", "outputs", "loss", "grads", "weights", "optimizer", "rng"].index
    )
    missing = run_cli("show", trace, "--step", "99")
    assert missing.code == 2
    assert missing.stderr.strip().endswith("has no step 99 (steps 0–6)")


@pytest.mark.parametrize("depth", ["module", "op"])
def test_depth_records_inside_the_step(audit, depth):
    result = audit("planted-forward.yaml", "--depth", depth, "--no-zoom", "--no-measure")
    assert result.code == 1
    d = result.report["first_divergence"]
    # at module/op depth the noise is seen inside forward, before the model's output
    assert (d["step"], d["phase"]) == (3, "forward")
    if depth == "module":
        # the noise goes into fc2's input: fc2 is the first module whose output differs
        assert d["tensor"] == "module:fc2"
    else:
        assert d["tensor"].startswith("op:") and "aten.randn" in d["tensor"]


def _ops(function, *args) -> list:
    capture = OpCapture(None)
    with capture.during("forward"):
        function(*args)
    return capture.ops


def test_view_ops_are_digested_from_their_inputs_and_in_place_ops_from_content():
    """A view op's output digest comes from its inputs' digests and arguments (no copy of
    a strided view); an in-place op on a view is hashed from what it wrote."""

    def step(x: torch.Tensor, bump: torch.Tensor) -> torch.Tensor:
        view = x.t()  # aten.t: a view
        view.add_(bump)  # in place, through the view
        return (view @ x).sum()

    x = torch.arange(16.0).reshape(4, 4)
    same = [_ops(step, x.clone(), torch.tensor(1.0)) for _ in range(2)]
    assert [op.op for op in same[0]] == [
        "aten.t.default",
        "aten.add_.Tensor",
        "aten.mm.default",
        "aten.sum.default",
    ]
    assert first_divergent_op(*same) is None

    bumped = _ops(step, x.clone(), torch.tensor(2.0))
    index = first_divergent_op(same[0], bumped)
    assert bumped[index].op == "aten.add_.Tensor"
    assert same[0][index].outputs != bumped[index].outputs

    other = x.clone()
    other[3, 0] += 1  # another input: the view op is the first to differ
    index = first_divergent_op(same[0], _ops(step, other, torch.tensor(1.0)))
    assert same[0][index].op == "aten.t.default"
