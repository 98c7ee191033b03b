"""Strict JSON: what reprocheck writes parses under a strict reader (no bare Infinity/NaN)."""

from __future__ import annotations

import json
import math
from types import MappingProxyType

import pytest

from reprocheck import jsonout
from reprocheck.report.json import write_report

from .strict_json import load_strict

INF, NAN = float("inf"), float("nan")


def test_non_finite_dict_values_become_null_with_a_sibling_key():
    out = jsonout.strict({"a": INF, "b": -INF, "c": NAN, "d": 1.5})
    assert list(out) == ["a", "a_nonfinite", "b", "b_nonfinite", "c", "c_nonfinite", "d"]
    assert out["a"] is None and out["a_nonfinite"] == "inf"
    assert out["b"] is None and out["b_nonfinite"] == "-inf"
    assert out["c"] is None and out["c_nonfinite"] == "nan"
    assert out["d"] == 1.5


def test_non_finite_items_of_nested_lists_and_tuples_become_null():
    value = {"growth": [[1, 0.5], [2, INF]], "pair": (NAN, 2.0, (-INF,)), "top": [INF]}
    out = jsonout.strict(value)
    assert out == {"growth": [[1, 0.5], [2, None]], "pair": (None, 2.0, (None,)), "top": [None]}
    assert "growth_nonfinite" not in out  # only a dict value gets the sibling key
    assert jsonout.strict(INF) is None and jsonout.strict([NAN]) == [None]


def test_nested_dicts_inside_lists_get_their_own_sibling_keys():
    value = {"sketches": {"0": {"sum": NAN, "absmax": 3.0}}, "runs": [{"x": -INF}]}
    out = jsonout.strict(value)
    assert out["sketches"]["0"] == {"sum": None, "sum_nonfinite": "nan", "absmax": 3.0}
    assert out["runs"] == [{"x": None, "x_nonfinite": "-inf"}]


def test_finite_values_are_unchanged_and_the_input_is_not_modified():
    value = {
        "i": 3,
        "b": True,
        "f": -0.0,
        "tiny": 5e-324,
        "big": 1.7976931348623157e308,
        "s": "inf",
        "n": None,
        "l": [1, 2.5, "x", {"k": [0.1]}],
    }
    before = json.dumps(value)
    assert jsonout.strict(value) == value
    assert jsonout.dumps(value) == json.dumps(value)
    assert json.dumps(value) == before
    held = {"x": INF, "l": [NAN]}
    jsonout.strict(held)
    assert held["x"] == INF and math.isnan(held["l"][0]) and "x_nonfinite" not in held


def test_dumps_output_passes_a_strict_parser():
    value = {"a": INF, "b": [NAN, 1.0, (-INF, 2)], "c": {"d": NAN}}
    with pytest.raises(ValueError, match="Infinity"):
        load_strict(json.dumps(value))  # what plain json writes is refused
    parsed = load_strict(jsonout.dumps(value, indent=2, default=str))
    assert parsed == {
        "a": None,
        "a_nonfinite": "inf",
        "b": [None, 1.0, [None, 2]],
        "c": {"d": None, "d_nonfinite": "nan"},
    }


def test_dumps_refuses_what_it_cannot_make_finite():
    class Weird:
        def __repr__(self) -> str:
            return "weird"

    # default= runs after strict(): a non-finite float it returns is refused, never written
    with pytest.raises(ValueError):
        jsonout.dumps({"w": Weird()}, default=lambda obj: INF)
    assert load_strict(jsonout.dumps({"w": Weird()}, default=str)) == {"w": "weird"}


def test_dump_and_write_report_write_strict_files(tmp_path):
    report = {
        "first_divergence": {"max_abs_diff": INF, "max_rel_diff": NAN, "sketches": {}},
        "across_legs": [{"growth": [[1, INF]], "worst": {"max_rel_diff": -INF}}],
    }
    with open(tmp_path / "d.json", "w", encoding="utf-8") as handle:
        jsonout.dump(report, handle)
    write_report(report, tmp_path / "r.json")
    for name in ("d.json", "r.json"):
        data = load_strict(tmp_path / name)
        d = data["first_divergence"]
        assert d["max_abs_diff"] is None and d["max_abs_diff_nonfinite"] == "inf"
        assert d["max_rel_diff"] is None and d["max_rel_diff_nonfinite"] == "nan"
        leg = data["across_legs"][0]
        assert leg["growth"] == [[1, None]]
        assert leg["worst"] == {"max_rel_diff": None, "max_rel_diff_nonfinite": "-inf"}
    assert report["first_divergence"]["max_abs_diff"] == INF  # the caller's dict is untouched


def test_load_strict_reads_paths_and_text(tmp_path):
    (tmp_path / "x.json").write_text('{"a": 1}')
    assert load_strict(tmp_path / "x.json") == {"a": 1}
    assert load_strict(str(tmp_path / "x.json")) == {"a": 1}
    assert load_strict('[1, "two"]') == [1, "two"]
    assert load_strict(b'{"b": null}') == {"b": None}
    for bad in ("NaN", '{"a": Infinity}', "[-Infinity]"):
        with pytest.raises(ValueError, match="not strict JSON"):
            load_strict(bad)


def test_read_only_mappings_are_written_as_objects():
    value = {"kwargs": MappingProxyType({"lr": INF, "momentum": 0.9})}
    assert load_strict(jsonout.dumps(value)) == {
        "kwargs": {"lr": None, "lr_nonfinite": "inf", "momentum": 0.9}
    }
