"""Paired comparison of two evaluation runs (`fluxkit eval --compare`) and the pass-rate intervals of the table."""

from __future__ import annotations

import json

import pytest

from fluxkit.cli import main
from fluxkit.eval.checker import CheckResult
from fluxkit.eval.compare import compare, load_results, mcnemar_p, wilson_interval
from fluxkit.eval.run import format_table, summarize
from fluxkit.eval.suite import build_suite


def test_wilson_interval_matches_the_textbook_values():
    # By hand: 0/10 -> upper z^2 / (n + z^2) = 0.2775; 5/10 -> 0.5 +- z / (1 + z^2/n) * sqrt(1/40 + z^2/400).
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = wilson_interval(34, 298)
    assert lo < 34 / 298 < hi and 0.05 < hi - lo < 0.08  # ~+-3.6 points around 11.4% on the full suite
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0, 0)


def test_mcnemar_exact_p_is_the_two_sided_binomial_tail():
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64)  # six discordant items, all one way
    assert mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_p(9, 1) == mcnemar_p(1, 9)
    assert mcnemar_p(4, 4) == 1.0 and mcnemar_p(0, 0) == 1.0


def _results(folder, passed: dict[str, bool], categories: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    items = [{"id": i, "category": categories[i], "passed": ok} for i, ok in passed.items()]
    (folder / "results.json").write_text(json.dumps({"summary": {}, "items": items}))
    return folder


def test_compare_pairs_items_by_id_and_counts_the_discordant_ones(tmp_path):
    cats = {f"item-{i}": ("colour" if i < 6 else "shape") for i in range(10)}
    a = {i: i in ("item-0", "item-1", "item-6") for i in cats}
    b = {i: i in ("item-0", "item-2", "item-3", "item-7", "item-8") for i in cats}
    rows = compare(load_results(_results(tmp_path / "a", a, cats)), load_results(_results(tmp_path / "b", b, cats)))
    assert set(rows) == {"colour", "shape", "overall"}
    overall = rows["overall"]
    assert (overall.n, overall.rate_a, overall.rate_b) == (10, 0.3, 0.5)
    assert (overall.only_a, overall.only_b) == (2, 4)  # A alone: item-1, item-6; B alone: 2, 3, 7, 8
    assert overall.difference == pytest.approx(0.2)
    lo, hi = overall.interval
    assert lo < 0.2 < hi
    assert overall.p_value == pytest.approx(mcnemar_p(2, 4))
    assert (rows["colour"].only_a, rows["colour"].only_b) == (1, 2)


def test_compare_refuses_runs_of_different_items(tmp_path):
    a = _results(tmp_path / "a", {"x": True, "y": False}, {"x": "c", "y": "c"})
    b = _results(tmp_path / "b", {"x": True, "z": False}, {"x": "c", "z": "c"})
    with pytest.raises(ValueError, match="different items"):
        compare(load_results(a), load_results(b))
    with pytest.raises(ValueError, match="no evaluation results"):
        load_results(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a `fluxkit eval` results file"):
        load_results(tmp_path / "bad.json")


def test_cli_compare_prints_the_paired_table_and_rejects_a_missing_run(tmp_path, capsys):
    cats = {"p": "position", "q": "position", "r": "colour"}
    a = _results(tmp_path / "a", {"p": False, "q": False, "r": True}, cats)
    b = _results(tmp_path / "b", {"p": True, "q": True, "r": True}, cats)
    assert main(["eval", "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    overall = next(line for line in out.splitlines() if line.startswith("overall"))
    assert "33.3%" in overall and "100.0%" in overall and "+66.7p" in overall
    assert main(["eval", "--compare", str(a), str(tmp_path / "nope")]) == 2
    assert "no evaluation results" in capsys.readouterr().err
    assert main(["eval", "--compare", str(a), str(b), "--model", "fluxkit-tiny-dev"]) == 2
    assert "takes no --model" in capsys.readouterr().err


def test_suite_summary_carries_a_wilson_interval_per_row():
    suite = build_suite(quick=True, seeds=(0,))
    results = [CheckResult({"colour": i % 3 == 0}) for i in range(len(suite))]
    summary = summarize(suite, results)
    passed = sum(r.passed for r in results)
    assert summary["overall"]["ci95"] == pytest.approx(list(wilson_interval(passed, len(suite))))
    assert all(row["ci95"][0] <= row["pass_rate"] <= row["ci95"][1] for row in summary.values())
    assert "95% interval" in format_table(summary).splitlines()[0]


def test_summary_counts_the_items_that_fail_one_check_only():
    suite = build_suite(quick=True, seeds=(0,))[:6]
    results = [
        CheckResult({"colour": True, "shape": False}),
        CheckResult({"colour": True, "shape": False}),
        CheckResult({"colour": False, "shape": False}),  # two failures: counted nowhere
        CheckResult({"colour": False, "shape": True}),
        CheckResult({"text": False}),
        CheckResult({"colour": True, "shape": True}),
    ]
    summary = summarize(suite, results)
    assert summary["overall"]["fails_only_on"] == {"shape": 2, "colour": 1, "text": 1}
    assert list(summary["overall"]["fails_only_on"]) == ["shape", "colour", "text"]  # most first, then by name
    assert format_table(summary).splitlines()[-1] == "failing one check only: shape 2, colour 1, text 1"
