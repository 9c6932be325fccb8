"""The one metric-table renderer of every report (run closing table, comparison.md,
models_strategies.md, MODEL_CARD.md)."""

import pytest

from fedldt.results import fmt_metric, markdown_table, metric_rows, summary_table


def test_markdown_table_known_answer():
    lines = markdown_table(["method", "MAE h3"], [["model", "1.250"], ["persistence", ""]], right=[1])
    assert lines == ["| method | MAE h3 |", "|---|---:|", "| model | 1.250 |", "| persistence | |"]
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        markdown_table(["a", "b", "c"], [["1", "2"]])


def test_metric_cells_and_rows():
    assert [fmt_metric(None), fmt_metric(3.14159), fmt_metric(3.14159, 4), fmt_metric(0.0625, percent=True)] == \
        ["n/a", "3.142", "3.1416", "6.25%"]
    block = {"mae": {"h3": 1.0, "all": None}, "rmse": {"h3": 2.0, "all": 2.5}}
    rows = metric_rows({"model": block, "persistence": block}, ["h3", "all"], metrics=("mae", "rmse"))
    assert rows == [["MAE model", "1.0000", "n/a"], ["MAE persistence", "1.0000", "n/a"],
                    ["RMSE model", "2.0000", "2.5000"], ["RMSE persistence", "2.0000", "2.5000"]]


def test_run_closing_table_is_rendered_by_the_same_function():
    block = {m: {"h3": 1.5, "all": 2.0} for m in ("mae", "rmse", "mape", "wape")}
    null = {m: {"h3": None, "all": None} for m in ("mae", "rmse", "mape", "wape")}
    summary = {"pilot": "p", "mode": "local", "rounds": 1, "test": block, "persistence": block,
               "historical_average": block, "seasonal_naive_day": null, "seasonal_naive_week": block,
               "test_per_territory": {"t0": block}}
    text = summary_table(summary)
    assert "test metrics of pilot 'p' (local, 1 round)" in text
    assert "| MAE model | 1.5000 | 2.0000 |" in text and "| MAPE hist. average | 1.5000 | 2.0000 |" in text
    assert "| MAE seasonal naive (day) | n/a | n/a |" in text and "| RMSE seasonal naive (week) | 1.5000 | 2.0000 |" in text
    # a summary written before the seasonal references existed still renders
    assert "seasonal naive" not in summary_table({k: v for k, v in summary.items() if not k.startswith("seasonal")})
    assert "| t0 | 1.5000 | 2.0000 |" in text
