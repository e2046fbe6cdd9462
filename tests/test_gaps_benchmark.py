"""benchmarks/gaps.py's GPyTorch column (issue 22 item 6) on a tiny grid: it runs, it is the same
model as GridGP's (GPyTorch's exact Cholesky setting reproduces the dense reference), and a
setting past the budgets is skipped with the reason instead of run."""

import math

import pytest

from _helpers import benchmark_module


@pytest.fixture(scope="module")
def gaps():
    return benchmark_module("gaps")


BASE = ["--n", "5", "--no-fit", "--repeats", "1", "--dense-max", "1000"]


def test_gpytorch_column_matches_the_reference_and_names_its_setting(gaps, tmp_path):
    out = gaps.main(BASE + ["--patterns", "scatter-20", "block-10", "block-1+cell-noise",
                            "--out", str(tmp_path / "gaps.json")])
    assert len(out["rows"]) == 3
    for row in out["rows"]:
        assert row["lml_ref_by"] == "dense"
        settings = row["gpytorch_settings"]
        assert set(settings) == {"scale_toeplitz_on", "scale_toeplitz_off", "noscale_toeplitz_on",
                                 "noscale_toeplitz_off", "dense_cholesky"}
        assert all("step_s" in rec for rec in settings.values()), settings
        best = row["gpytorch_setting"]
        assert row["gpytorch_step_s"] == min(rec["step_s"] for rec in settings.values())
        assert row["gpytorch_step_s"] == settings[best]["step_s"]
        assert math.isclose(row["speedup"], row["gpytorch_step_s"] / row["step_s"], rel_tol=1e-12)
        # GPyTorch's Cholesky on the observed cells at GridGP's hyperparameters is the dense
        # reference: the hyperparameters, units and noise carried over (to ~√ε: GPyTorch forms
        # distances from x² + y² − 2xy)
        assert settings["dense_cholesky"]["lml_rel_err"] <= 1e-6, (row["pattern"], settings["dense_cholesky"])
        # the grid settings (under GPyTorch's max_cholesky_size at 5³, so factored densely): missing
        # cells by a fixed noise 1e4 × the signal variance, its ½ log 2πv per cell taken out; what
        # is left is O(1e-4) per missing cell (without the correction: ~5.5 nats per cell)
        for name in ("scale_toeplitz_off", "noscale_toeplitz_on"):
            assert settings[name]["lml_rel_err"] <= 1e-4, (row["pattern"], name, settings[name])
        # at equal accuracy: the fastest setting within max(ours, the floor 1e-6), Cholesky at worst
        acc = row["gpytorch_accurate_setting"]
        assert settings[acc]["lml_rel_err"] <= row["gpytorch_accuracy_tol"] == max(row["lml_rel_err"], 1e-6)
        assert row["gpytorch_accurate_step_s"] == min(r["step_s"] for r in settings.values()
                                                      if r["lml_rel_err"] <= row["gpytorch_accuracy_tol"])
        assert math.isclose(row["speedup_equal_accuracy"], row["gpytorch_accurate_step_s"] / row["step_s"], rel_tol=1e-12)
    assert (tmp_path / "gaps.json").exists()


def test_gpytorch_settings_past_the_budgets_are_skipped_with_the_reason(gaps, capsys):
    out = gaps.main(BASE + ["--patterns", "scatter-10", "--gpytorch-memory-gib", "1e-9"])
    row = out["rows"][0]
    assert "gpytorch_step_s" not in row and "speedup" not in row
    assert all("GiB budget" in rec["skipped"] for rec in row["gpytorch_settings"].values())
    assert "dense_cholesky: est." in row["gpytorch_skipped"]
    printed = capsys.readouterr().out
    assert "GPyTorch dense_cholesky: skipped, est." in printed and " skipped " in printed

    out = gaps.main(BASE + ["--patterns", "scatter-10", "--gpytorch-timeout", "1e-9"])
    assert all("s budget" in rec["skipped"] for rec in out["rows"][0]["gpytorch_settings"].values())


def test_limit_mode_prices_and_times_each_way_with_the_grid_size(gaps):
    """--limit (the calibration of kronegp.models.costs): every row names N and Σn_k, what auto
    chose, and each way's predicted and measured step; a way predicted past --limit-max-s is not run."""
    out = gaps.main(["--limit", "--n", "6", "--limit-m", "8", "--repeats", "1"])
    rows = out["limit"]
    assert [r["kind"] for r in rows] == ["hole", "scatter"]
    for r in rows:
        assert r["N"] == 216 and r["sum_n"] == 18 and r["auto"] == "exact-missing"
        assert set(r["measured"]) == set(r["predicted"]) == {"exact-missing", "cg", "cg-exact-traces"}
        assert all(t > 0 for t in r["measured"].values())
    skipped = gaps.main(["--limit", "--n", "6", "--limit-m", "8", "--repeats", "1", "--limit-max-s", "0"])
    assert all(not r["measured"] for r in skipped["limit"])


def test_air_mode_times_the_hole_against_the_full_grid(gaps, tmp_path):
    out = gaps.main(["--air", "--air-grids", "corner", "--repeats", "1", "--out", str(tmp_path / "air.json")])
    (row,) = out["air"]
    assert row["grid"] == "20x25x49" and row["missing"] == 576
    assert row["full_path"] == "exact" and row["hole_path"] == "exact-missing"
    assert math.isclose(row["ratio_min"], row["hole_min_s"] / row["full_min_s"], rel_tol=1e-12)
    assert (tmp_path / "air.json").exists()


def test_the_predictions_warnings_are_counted_in_the_row(gaps, monkeypatch, capsys):
    """A prediction whose solve falls short of its tolerance shows in the row (it was silenced)."""
    import kronegp.models._masked as masked

    monkeypatch.setattr(masked, "MIXED_ROUNDS", 0)  # float32 without refinement falls short
    monkeypatch.setattr(masked, "REFINE_ROUNDS", 0)
    build = gaps.build  # the cg path (on 12³ the exact-missing one would be chosen)
    monkeypatch.setattr(gaps, "build", lambda *a, **kw: build(*a, **{"path": "cg", **kw}))
    out = gaps.main(BASE + ["--patterns", "scatter-50", "--no-gpytorch", "--dtype", "float32", "--n", "12"])
    row = out["rows"][0]
    assert row["path"] == "cg" and row["predict_warnings"] >= 1
    assert any("observed cells reached a relative residual" in t for t in row["predict_warning_text"])
    assert f"{row['warnings']}/{row['predict_warnings']}" in capsys.readouterr().out


def test_a_setting_slower_than_its_estimate_is_timed_once(monkeypatch):
    """``fastest_setting`` times the warm-up step: a setting whose first step shows that the repeats would
    overrun the budget (its estimate was short) keeps that one step, with a note, instead of running them."""
    import time

    import torch

    gm = benchmark_module("gpytorch_models")
    calls = {"slow": 0, "fast": 0}

    class Setting:
        def __init__(self, name, seconds):
            self.name, self.seconds = name, seconds

        def estimate(self):
            return 1e-4, 1  # both estimated fast

        def step(self):
            calls[self.name] += 1
            time.sleep(self.seconds)

        def lml(self):
            return 1.0

    out = gm.fastest_setting([("slow", lambda: Setting("slow", 0.3)), ("fast", lambda: Setting("fast", 0.01))],
                             torch.device("cpu"), repeats=3, budget_s=0.5, lml_ref=1.0)
    slow, fast = out["settings"]["slow"], out["settings"]["fast"]
    assert calls == {"slow": 1, "fast": 4}
    assert slow["step_s"] >= 0.3 and "one step only" in slow["note"]
    assert "note" not in fast and fast["step_s"] < 0.3 and out["best"] == "fast"
