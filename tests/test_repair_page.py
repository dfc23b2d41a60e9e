"""Repair, Compare and Failures pages: widget state, charts and server logs.

The pages run under Streamlit's AppTest on the tiny MNIST run that
tests/test_app.py trains once per module, against a real workspace.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from streamlit.proto.Metric_pb2 import Metric as MetricProto
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

from repair_core import dashboard, pipeline
from repair_core.errors import ConfigError
from repair_core.evaluation import removal_curve
from tests import test_app
from tests.factories_treatment import tiny_problem
from tests.test_app import (
    add_repair_copy,
    chart_specs,
    check_clean,
    page,
    quick_repair,
)

# Fixtures of tests/test_app.py, bound here so that pytest finds them.
prepared = test_app.prepared
workspace_env = test_app.workspace_env


def test_repair_source_survives_new_confirmed_culprits(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("repair", **state).run()
    check_clean(app)
    labels = app.radio(key="repair_source").options
    assert app.radio(key="repair_source").value == "confirmed"
    assert any(c.value.startswith("0 confirmed culprits") for c in app.caption)

    # Another tab confirms culprits between two runs of this page.
    workspace.set_decisions(workspace_env.run_id, failure_set_id, [1, 2], "confirmed")
    app.run()
    check_clean(app)
    source = app.radio(key="repair_source")
    # The browser sends back the label of the selected option, so the labels
    # must not change between runs.
    assert source.options == labels
    assert source.value == "confirmed"
    assert any(c.value.startswith("2 confirmed culprits") for c in app.caption)
    assert any(c.value.startswith("C: 2 training examples") for c in app.caption)


# Compare ---------------------------------------------------------------------


def test_removal_curve_k0_removes_nothing():
    problem = tiny_problem()
    scores = torch.zeros(len(problem.train_labels))
    scores[problem.flipped] = 1.0
    data = (
        problem.model,
        (problem.train_images, problem.train_labels),
        (problem.test_images, problem.test_labels),
        problem.split,
    )

    with pytest.raises(ConfigError, match="k -1 in ks must be at least 0"):
        removal_curve(scores, *data, ks=(-1, 5), seeds=(0,))
    curve = removal_curve(
        scores, *data, ks=(5, 0), seeds=(0, 1), train_config=problem.train_config
    )
    assert [point["k"] for point in curve] == [0, 5]
    control = curve[0]
    assert [record["seed"] for record in control["per_seed"]] == [0, 1]
    for key in ("holdout_acc", "remaining_acc"):
        assert math.isfinite(control["mean"][key])
        assert math.isfinite(control["std"][key])


def test_compare_draws_nothing_removed_line(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    pipeline.run_identification(
        workspace_env.workspace, run, "training-loss", failure_set_id=failure_set_id
    )
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("compare", **state).run()
    app.text_input(key="compare_ks").set_value("5")
    app.number_input(key="compare_seeds").set_value(2)
    app.button(key="compare_run").click().run()
    check_clean(app)

    curves = workspace_env.workspace.list_removal_curves(
        workspace_env.run_id, failure_set_id=failure_set_id
    )
    assert len(curves) == 1
    assert curves[0]["ks"] == [0, 5]
    control = curves[0]["points"][0]
    assert [record["seed"] for record in control["per_seed"]] == [0, 1]

    # The detection chart comes first, then F_h and T\F.
    charts = chart_specs(app)[1:]
    for figure, key in zip(charts, ("holdout_acc", "remaining_acc"), strict=True):
        traces = {trace.get("name"): trace for trace in figure["data"]}
        label = "training-loss · 2 seeds"
        assert traces[label]["x"] == [5]
        line = traces[f"{label} · nothing removed (k = 0)"]
        assert line["y"] == [control["mean"][key]] * 2
        assert line["line"]["dash"] == "dot"
        # The line is left out of the legend, and a click on the curve's
        # entry hides both.
        assert line["showlegend"] is False
        assert line["legendgroup"] == traces[label]["legendgroup"]
        # The line spans the log axis, whose range is in decades.
        axis = figure["layout"]["xaxis"]
        assert axis["type"] == "log"
        assert math.log10(min(line["x"])) <= axis["range"][0]
        assert math.log10(max(line["x"])) >= axis["range"][1]
        bands = [trace for trace in figure["data"] if trace.get("fill") == "toself"]
        assert len(bands) == 1
        mean, spread = control["mean"][key], control["std"][key]
        assert max(bands[0]["y"]) == pytest.approx(min(1.0, mean + spread))
        assert min(bands[0]["y"]) == pytest.approx(max(0.0, mean - spread))


def test_compare_rejects_repeated_k(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
    }
    app = page("compare", **state).run()
    assert not app.button(key="compare_run").disabled
    app.text_input(key="compare_ks").set_value("10, 30, 10").run()
    assert not app.exception
    errors = [error.value for error in app.error]
    assert errors == ["k 10 is given 2 times in the k values. Give each k once."]
    assert app.button(key="compare_run").disabled


@pytest.mark.parametrize("text", ["10,,30", "10, 30,", ",10", " , "])
def test_compare_rejects_empty_k_entry(workspace_env, text):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
    }
    app = page("compare", **state).run()
    app.text_input(key="compare_ks").set_value(text).run()
    assert not app.exception
    errors = [error.value for error in app.error]
    assert errors == [
        f"Invalid k values {text!r}. Give whole numbers separated by single "
        "commas, with nothing empty between them."
    ]
    assert app.button(key="compare_run").disabled


# Repair results --------------------------------------------------------------


def stored_repair_copy(env: test_app.Prepared, change) -> tuple[str, str]:
    """Store a repair on a new failure set, then a copy whose metrics
    ``change`` edits in place. Return the failure set and the copy's id."""
    failure_set_id = env.new_failure_set()
    workspace = env.workspace
    run = pipeline.load_run(workspace, env.run_id)
    summary = quick_repair(workspace, run, failure_set_id)
    record = workspace.get_repair(summary["repair_id"])
    metrics = json.loads(json.dumps(record["metrics"]))
    change(metrics)
    return failure_set_id, add_repair_copy(workspace, record, metrics)


def repair_page(env: test_app.Prepared, failure_set_id: str, repair_id: str) -> AppTest:
    state = {
        "run_id": env.run_id,
        "failure_set_id": failure_set_id,
        "repair_id": repair_id,
    }
    return page("repair", **state).run()


def test_repair_names_missing_model_file(workspace_env):
    failure_set_id, repair_id = stored_repair_copy(workspace_env, lambda m: None)
    model = workspace_env.workspace.path(
        workspace_env.run_id, f"repairs/{repair_id}.pt"
    )
    model.unlink()

    app = repair_page(workspace_env, failure_set_id, repair_id)
    check_clean(app)
    keys = [button.proto.id for button in app.get("download_button")]
    assert not any(key.endswith("repair_download") for key in keys)
    warnings = [warning.value for warning in app.warning]
    assert any(
        f"The repaired model's file {model} is missing" in text for text in warnings
    )


def test_repair_names_unreadable_model_file(workspace_env):
    failure_set_id, repair_id = stored_repair_copy(workspace_env, lambda m: None)
    model = workspace_env.workspace.path(
        workspace_env.run_id, f"repairs/{repair_id}.pt"
    )
    model.unlink()
    model.mkdir()

    app = repair_page(workspace_env, failure_set_id, repair_id)
    check_clean(app)
    keys = [button.proto.id for button in app.get("download_button")]
    assert not any(key.endswith("repair_download") for key in keys)
    warnings = [warning.value for warning in app.warning]
    assert (
        f"The repaired model's file {model} cannot be read (Is a directory), so "
        "it cannot be downloaded. Run the repair again to store a new model."
    ) in warnings


def test_repair_download_survives_deleted_file(workspace_env, monkeypatch):
    # The bytes that Streamlit's media storage receives, by file id.
    stored: dict[str, bytes] = {}
    load = MemoryMediaFileStorage.load_and_get_id

    def load_and_record(storage, data, mimetype, kind, filename=None):
        file_id = load(storage, data, mimetype, kind, filename)
        stored[file_id] = data
        return file_id

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", load_and_record)
    failure_set_id, repair_id = stored_repair_copy(workspace_env, lambda m: None)
    model = workspace_env.workspace.path(
        workspace_env.run_id, f"repairs/{repair_id}.pt"
    )
    expected = model.read_bytes()

    app = repair_page(workspace_env, failure_set_id, repair_id)
    check_clean(app)
    (button,) = [
        button
        for button in app.get("download_button")
        if button.proto.id.endswith("repair_download")
    ]
    # The button contains the model's bytes read while the page was drawn, so a
    # click after the file was deleted still downloads them.
    assert not button.proto.deferred_file_id
    model.unlink()
    (file_id,) = [key for key in stored if key in button.proto.url]
    assert stored[file_id] == expected


def test_repair_error_bars_clipped_to_range(workspace_env):
    def wide_spread(metrics):
        metrics["seeds"] = [0, 1]
        metrics["after"]["holdout_acc"] = 0.373
        metrics["spread"]["holdout_acc"] = 0.547
        metrics["after"]["remaining_acc"] = 0.98
        metrics["spread"]["remaining_acc"] = 0.05

    failure_set_id, repair_id = stored_repair_copy(workspace_env, wide_spread)
    app = repair_page(workspace_env, failure_set_id, repair_id)
    check_clean(app)

    figure = next(
        spec for spec in chart_specs(app) if spec["data"][0].get("type") == "bar"
    )
    treatment = next(t for t in figure["data"] if t["name"] == "treatment")
    subsets = list(treatment["x"])
    errors = treatment["error_y"]
    assert errors["symmetric"] is False
    plus = dict(zip(subsets, errors["array"], strict=True))
    minus = dict(zip(subsets, errors["arrayminus"], strict=True))
    assert plus["F_h"] == pytest.approx(0.547)
    assert minus["F_h"] == pytest.approx(0.373)
    assert plus["T\\F"] == pytest.approx(0.02)
    assert minus["T\\F"] == pytest.approx(0.05)
    for trace in figure["data"]:
        if "error_y" not in trace:
            continue
        errors = trace["error_y"]
        bars = zip(trace["y"], errors["array"], errors["arrayminus"], strict=True)
        for value, up, down in bars:
            assert value + up <= 1.0 + 1e-9
            assert value - down >= -1e-9
    # Room above a full bar and its error bar.
    assert figure["layout"]["yaxis"]["range"][1] > 1.05


@pytest.mark.parametrize("controls", [True, False])
@pytest.mark.parametrize(
    ("reference", "after", "delta", "colour"),
    [
        # 93.7% and 93.7%: no change at the precision shown.
        (0.9374, 0.9372, "0.0 pts", "off"),
        # 93.8% and 93.7%: the change of the figures shown.
        (0.9375, 0.9373, "-0.1 pts", "normal"),
        (0.90, 0.95, "+5.0 pts", "normal"),
    ],
)
def test_test_accuracy_delta_matches_figures(
    workspace_env, controls, reference, after, delta, colour
):
    # With controls the change is over nothing removed, else over θ̂.
    def accuracies(metrics):
        metrics["after"]["test_acc"] = after
        if controls:
            metrics["before"]["test_acc"] = 0.5
            metrics["controls"]["nothing"]["mean"]["test_acc"] = reference
        else:
            metrics["before"]["test_acc"] = reference
            metrics["controls"] = {}
            metrics["gain_over_nothing"] = None

    failure_set_id, repair_id = stored_repair_copy(workspace_env, accuracies)
    app = repair_page(workspace_env, failure_set_id, repair_id)
    check_clean(app)
    metric = next(m for m in app.metric if m.label == "Test accuracy after")
    assert metric.value == f"{after:.1%}"
    # The change names the control it is measured against.
    assert metric.delta == (f"{delta} vs nothing removed" if controls else delta)
    if controls:
        assert metric.help == (
            f"Change over nothing removed ({reference:.1%}); the original model "
            "had 50.0%."
        )
    else:
        assert metric.help == f"Change over the original model ({reference:.1%})."
    table = next(
        frame.value for frame in app.dataframe if "subset" in frame.value.columns
    ).set_index("subset")
    test_row = table.loc["T (whole test set)"]
    assert test_row["before"] == ("50.0%" if controls else f"{reference:.1%}")
    if colour == "off":
        assert metric.proto.color == MetricProto.MetricColor.GRAY
        assert metric.proto.direction == MetricProto.MetricDirection.NONE
    else:
        assert metric.proto.color != MetricProto.MetricColor.GRAY
        assert metric.proto.direction != MetricProto.MetricDirection.NONE


# Sweeps ----------------------------------------------------------------------


def stored_sweep_page(env: test_app.Prepared, name: str, points: list) -> AppTest:
    """Store a fine-tuning sweep with ``points`` on a new failure set and run
    the Repair page on it."""
    failure_set_id = env.new_failure_set()
    env.workspace.add_sweep(
        f"sw-{name}-{failure_set_id}",
        env.run_id,
        failure_set_id,
        "finetune",
        "top 10",
        10,
        [point["strength"] for point in points],
        {},
        points,
    )
    state = {"run_id": env.run_id, "failure_set_id": failure_set_id}
    app = page("repair", **state).run()
    check_clean(app)
    return app


def test_sweep_axes_fit_close_points(workspace_env):
    accuracies = [(0.98, 0.40), (0.97, 0.45), (0.96, 0.50)]
    points = [
        {"strength": strength, "remaining_acc": kept, "holdout_acc": fixed}
        for strength, (kept, fixed) in zip((1.0, 2.0, 4.0), accuracies, strict=True)
    ]
    app = stored_sweep_page(workspace_env, "close", points)

    figure = chart_specs(app)[-1]
    x_axis, y_axis = figure["layout"]["xaxis"], figure["layout"]["yaxis"]
    # A margin of 15% of the span on each side: 0.003 on T\F, 0.015 on F_h.
    assert x_axis["range"] == pytest.approx([0.957, 0.983])
    assert y_axis["range"] == pytest.approx([0.385, 0.515])
    # Ticks half a point apart need a decimal to differ.
    assert x_axis["tickformat"] == ".1%"
    assert y_axis["tickformat"] == ".0%"
    # The points are far apart on the fitted axes, so each keeps its label.
    assert figure["data"][0]["text"] == ["1", "2", "4"]


def test_sweep_axes_stay_within_full_range(workspace_env):
    points = [
        {"strength": 1.0, "remaining_acc": 1.0, "holdout_acc": 0.0},
        {"strength": 2.0, "remaining_acc": 0.2, "holdout_acc": 1.0},
        {"strength": 4.0, "remaining_acc": 0.5, "holdout_acc": float("nan")},
    ]
    app = stored_sweep_page(workspace_env, "wide", points)
    layout = chart_specs(app)[-1]["layout"]
    assert layout["xaxis"]["range"] == pytest.approx([0.08, 1.07])
    assert layout["yaxis"]["range"] == pytest.approx([-0.04, 1.1])


def test_sweep_done_message_links_chart(workspace_env):
    state = test_app.ranked_repair_state(workspace_env)
    failure_set_id = state["failure_set_id"]
    app = page("repair", **state).run()
    app.radio(key="repair_source").set_value("top-k").run()
    app.selectbox(key="repair_treatment").set_value("finetune").run()
    app.segmented_control(key="repair_mode").set_value("sweep").run()
    app.text_input(key="repair_sweep_finetune").set_value("1").run()
    app.button(key="repair_run").click().run()
    check_clean(app)

    sweeps = workspace_env.workspace.list_sweeps(
        workspace_env.run_id, failure_set_id=failure_set_id
    )
    assert len(sweeps) == 1
    messages = [success.value for success in app.success]
    assert messages == [
        f"Sweep {sweeps[0]['id']} is done. Its trade-off is drawn below, under "
        "[Trade-off from sweeps](#trade-off-from-sweeps)."
    ]
    heading = next(h for h in app.subheader if h.value == "Trade-off from sweeps")
    assert heading.proto.anchor == "trade-off-from-sweeps"


# Failures map ----------------------------------------------------------------


def test_failures_map_draws_no_class_in_grey(workspace_env):
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    generator = torch.Generator().manual_seed(0)
    # A stored map, as the first request for the map writes it.
    workspace.save_tensor(
        workspace_env.run_id,
        dashboard.MAP_FILE,
        {
            "train": torch.rand(len(run.data.train), 2, generator=generator).numpy(),
            "test": torch.rand(len(run.data.test), 2, generator=generator).numpy(),
        },
    )
    state = {"run_id": workspace_env.run_id, "failure_set_id": None}
    app = page("failures", **state).run()
    check_clean(app)

    figure = chart_specs(app)[-1]
    names = [trace["name"] for trace in figure["data"]]
    # The D3 palette draws class 7 in grey, so the check needs a failure of
    # class 7 to mean something.
    assert "true 7" in names
    colours = [trace["marker"]["color"] for trace in figure["data"][1:]]
    assert len(set(colours)) == len(colours)
    for name, colour in zip(names[1:], colours, strict=True):
        red, green, blue = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
        assert max(red, green, blue) - min(red, green, blue) > 40, (name, colour)


# Server log ------------------------------------------------------------------


def long_job_script() -> None:
    """Run a long job that ends the way session state "outcome" names."""
    import streamlit as st

    from repair_core import dashboard
    from repair_core.errors import ConfigError

    def reject() -> None:
        raise ConfigError("Setting x is invalid.")

    outcome = st.session_state["outcome"]
    with dashboard.long_job("test", "test job"):
        if outcome == "user error":
            dashboard.run_safely("Step", reject)
        elif outcome == "crash":
            raise RuntimeError("crash")
        elif outcome == "stop":
            st.stop()


@pytest.mark.parametrize(
    ("outcome", "level", "end"),
    [
        ("finish", logging.INFO, "Finished test job in "),
        ("user error", logging.WARNING, "test job failed after "),
        ("crash", logging.ERROR, "test job failed after "),
        ("stop", logging.WARNING, "Stopped test job after "),
    ],
)
def test_long_job_logs_start_and_end(caplog, outcome, level, end):
    app = AppTest.from_function(long_job_script)
    app.session_state["outcome"] = outcome
    app.session_state["run_id"] = "run-1"
    app.session_state["failure_set_id"] = "fs-1"
    with caplog.at_level(logging.INFO, logger="repair_core"):
        app.run()

    ids = "(run run-1, failure set fs-1)"
    records = [r for r in caplog.records if r.name == "repair_core.dashboard"]
    assert records[0].levelno == logging.INFO
    assert records[0].getMessage() == f"Started test job on the test page {ids}."
    assert records[-1].levelno == level
    assert records[-1].getMessage().startswith(end)
    assert ids in records[-1].getMessage()
    if outcome == "user error":
        assert records[1].getMessage() == "Step failed: Setting x is invalid."
        assert records[-1].getMessage().endswith(": Step failed.")
    # Only a finished job clears its mark, and the page reports the others.
    assert ("_job_running_test" in app.session_state) == (outcome in ("stop", "crash"))


def test_app_logs_with_time_and_level(tmp_path):
    script = (
        "import logging\n"
        "from streamlit.testing.v1 import AppTest\n"
        "app = AppTest.from_file('app.py', default_timeout=120)\n"
        "app.run()\n"
        "app.run()\n"
        "logger = logging.getLogger('repair_core.dashboard')\n"
        "logger.info('probe info')\n"
        "logger.warning('probe warning')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=test_app.ROOT,
        env={**os.environ, "REPAIR_WORKSPACE": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
    lines = result.stderr.splitlines()
    for level, text in (("INFO", "probe info"), ("WARNING", "probe warning")):
        pattern = re.compile(f"{stamp} {level} repair_core.dashboard: {text}")
        # One handler, although app.py ran twice.
        assert sum(bool(pattern.fullmatch(line)) for line in lines) == 1, lines


def sweep_form(env: test_app.Prepared, treatment: str) -> AppTest:
    """Open the Repair page with the top-k causes and ``treatment`` in sweep mode."""
    app = page("repair", **test_app.ranked_repair_state(env)).run()
    app.radio(key="repair_source").set_value("top-k").run()
    app.selectbox(key="repair_treatment").set_value(treatment).run()
    app.segmented_control(key="repair_mode").set_value("sweep").run()
    return app


@pytest.mark.parametrize("text", ["1e-5,,0.1", "1e-5, 0.1,", ",0.1", " , 0.1"])
def test_sweep_rejects_empty_value_entry(workspace_env, text):
    app = sweep_form(workspace_env, "ewc-deletion")
    app.text_input(key="repair_sweep_ewc-deletion").set_value(text).run()
    assert not app.exception
    errors = [error.value for error in app.error]
    assert errors == [
        f"Invalid sweep values {text!r}. Give numbers separated by single "
        "commas, with nothing empty between them."
    ]
    assert app.button(key="repair_run").disabled


def test_sweep_rejects_empty_values_field(workspace_env):
    app = sweep_form(workspace_env, "ewc-deletion")
    app.text_input(key="repair_sweep_ewc-deletion").set_value(" ").run()
    assert not app.exception
    errors = [error.value for error in app.error]
    assert errors == ["The sweep values field is empty. Give at least one strength γ."]
    assert app.button(key="repair_run").disabled


def test_sweep_names_value_that_overflows(workspace_env):
    app = sweep_form(workspace_env, "ewc-deletion")
    app.text_input(key="repair_sweep_ewc-deletion").set_value("0.1, 1e400").run()
    assert not app.exception
    errors = [error.value for error in app.error]
    assert errors == [
        "Sweep value '1e400' is too large: it overflows to infinity. Give finite "
        "positive values of gamma."
    ]
    assert app.button(key="repair_run").disabled


def test_sweep_table_shows_kept_epoch(workspace_env):
    points = [
        {
            "strength": strength,
            "remaining_acc": 0.9,
            "holdout_acc": 0.4,
            "best_epoch": 1,
            "epochs_run": strength,
        }
        for strength in (1, 2)
    ]
    app = stored_sweep_page(workspace_env, "kept", points)

    table = app.dataframe[-1].value
    assert list(table["strength"]) == ["1", "2"]
    assert list(table["kept epoch"]) == ["1", "1"]
    assert "kept step" not in table.columns
    captions = [caption.value for caption in app.caption]
    assert any(
        caption.startswith("Kept epoch: the fine-tuning epoch") for caption in captions
    )


def test_sweep_table_names_what_stopped_each_run(workspace_env):
    points = [
        {
            "strength": strength,
            "remaining_acc": 0.9,
            "holdout_acc": 0.4,
            "best_step": 60,
            "steps_run": steps,
            "stopped_by": reason,
        }
        for strength, steps, reason in (
            (1e-5, 260, "patience"),
            (0.1, 70, "retain_drop"),
        )
    ]
    app = stored_sweep_page(workspace_env, "stopped", points)

    table = app.dataframe[-1].value
    assert list(table["stopped by"]) == ["patience", "D\\C drop"]
    assert list(table["kept step"]) == ["60", "60"]
    captions = " ".join(caption.value for caption in app.caption)
    assert (
        "D\\C drop: accuracy on a sample of D\\C fell by more than retain_drop"
        in captions
    )


def test_sweep_table_leaves_unrecorded_epoch_empty(workspace_env):
    points = [{"strength": 1, "remaining_acc": 0.9, "holdout_acc": 0.4}]
    app = stored_sweep_page(workspace_env, "old", points)

    table = app.dataframe[-1].value
    assert "kept epoch" not in table.columns
    captions = [caption.value for caption in app.caption]
    assert not any(caption.startswith("Kept epoch") for caption in captions)


def stored_curve_page(env: test_app.Prepared, ks: list[int]) -> AppTest:
    """Store a one-seed removal curve with ``ks`` on a new failure set and run
    the Compare page on it."""
    failure_set_id = env.new_failure_set()
    workspace = env.workspace
    run = pipeline.load_run(workspace, env.run_id)
    ranking = pipeline.run_identification(
        workspace, run, "training-loss", failure_set_id=failure_set_id
    )
    metrics = {"holdout_acc": 0.5, "remaining_acc": 0.9, "seconds": 1.0}
    points = [
        {
            "k": k,
            "mean": metrics,
            "std": dict.fromkeys(metrics, 0.0),
            "per_seed": [{**metrics, "seed": 0}],
        }
        for k in ks
    ]
    workspace.add_removal_curve(
        f"rc-close-{failure_set_id}",
        env.run_id,
        failure_set_id,
        ranking["scores_id"],
        ks,
        [0],
        points,
    )
    state = {"run_id": env.run_id, "failure_set_id": failure_set_id}
    app = page("compare", **state).run()
    check_clean(app)
    return app


def test_compare_drops_colliding_k_labels(workspace_env):
    app = stored_curve_page(workspace_env, [10, 30, 590, 598])

    # The detection chart comes first, then F_h and T\F.
    for figure in chart_specs(app)[1:]:
        axis = figure["layout"]["xaxis"]
        assert axis["tickvals"] == [10, 30, 590, 598]
        assert axis["ticktext"] == ["10", "30", "", "598"]
    captions = [caption.value for caption in app.caption]
    assert any(caption.startswith("A tick without a label") for caption in captions)


def test_compare_keeps_distant_k_labels(workspace_env):
    app = stored_curve_page(workspace_env, [10, 100, 1000])

    for figure in chart_specs(app)[1:]:
        assert figure["layout"]["xaxis"]["ticktext"] == ["10", "100", "1000"]
    captions = [caption.value for caption in app.caption]
    assert not any(caption.startswith("A tick without") for caption in captions)


#: Plot-area width and digit width, in pixels, that the Compare page spaces
#: its k labels for.
PLOT_WIDTH = 250
DIGIT_WIDTH = 7


@pytest.mark.parametrize(
    "ks",
    [
        [590, 598],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        [10, 30, 100, 300, 590, 598, 1000, 1010, 2990],
        list(range(100, 2901, 100)),
    ],
)
def test_compare_k_labels_never_overlap(workspace_env, ks):
    app = stored_curve_page(workspace_env, ks)

    axis = chart_specs(app)[1]["layout"]["xaxis"]
    assert axis["tickvals"] == ks
    labels = axis["ticktext"]
    assert labels[-1] == str(ks[-1])
    shown = [(k, label) for k, label in zip(ks, labels, strict=True) if label]
    assert all(label == str(k) for k, label in shown)
    low, high = axis["range"]
    for (left, left_text), (right, right_text) in zip(shown, shown[1:], strict=False):
        distance = math.log10(right / left) / (high - low) * PLOT_WIDTH
        overlap = (len(left_text) + len(right_text)) * DIGIT_WIDTH / 2
        assert distance > overlap, (left, right)
