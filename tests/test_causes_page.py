"""Causes page: notes on small failure sets, decisions saved elsewhere, missing
packages and scores files, the look of review decisions, stored rankings
reused by a rerun, and the method settings of the ranking under review.

The AppTest tests use the tiny MNIST run that tests/test_app.py trains once
per module, against a real workspace. The browser test starts the dashboard
in headless Chromium, as tests/test_browser.py does.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from repair_core import dashboard, pipeline
from repair_core.identification import default_config
from repair_core.identification.base import MAX_SEED
from repair_core.metrics import ranking
from repair_core.training import TrainConfig
from repair_core.workspace import Workspace, new_id
from tests import test_app, test_browser
from tests.test_app import (
    TINY,
    _review_keys,
    check_clean,
    error_texts,
    image_count,
    page,
    ranked_failure_set,
)
from tests.test_browser import RUN_TIMEOUT, local_browser, wait_until_idle

# Fixtures of the other test modules, bound here so that pytest finds them.
prepared = test_app.prepared
workspace_env = test_app.workspace_env
browser_server = test_browser.server

INSTALL_ADVICE = "Install it with pip install -r requirements.txt"


def query_set(prepared, n_query: int) -> dict[str, str]:
    """Store a failure set whose query half is the first ``n_query`` failures;
    return the page state."""
    workspace = prepared.workspace
    run = pipeline.load_run(workspace, prepared.run_id)
    failures = torch.nonzero(run.test_predictions != run.data.test.labels).flatten()
    assert len(failures) >= n_query, f"the run has only {len(failures)} failures"
    failure_set_id, split = pipeline.create_failure_set(
        workspace, run, candidates=failures[:n_query], query_fraction=1.0
    )
    assert len(split.query) == n_query
    return {"run_id": prepared.run_id, "failure_set_id": failure_set_id}


def test_causes_page_number_out_of_range(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
        "scores_id": workspace_env.scores_id,
    }
    app = page("causes", **state).run()
    check_clean(app)
    # 200 training examples, 24 to a page.
    assert app.number_input(key="causes_page").label == "Page (of 9)"
    assert image_count(app) == 24

    for value in (10, 0):
        app.number_input(key="causes_page").set_value(value).run()
        assert not app.exception, value
        assert error_texts(app) == [
            f"Page = {value} is out of range. Enter a whole number from 1 to 9."
        ]
        assert image_count(app) == 0, value

    app.number_input(key="causes_page").set_value(9).run()
    check_clean(app)
    # The last page shows examples 193 to 200.
    assert image_count(app) == 8


def ewc_notes(app) -> list[str]:
    return [w.value for w in app.warning if "ewc-influence" in w.value]


def conflict_notes(app) -> list[str]:
    return [w.value for w in app.warning if "another tab" in w.value]


def test_ewc_note_names_small_failure_set(workspace_env):
    app = page("causes", **query_set(workspace_env, 29)).run()
    check_clean(app)
    assert app.multiselect(key="causes_methods").value == ["ewc-influence"]
    notes = ewc_notes(app)
    assert len(notes) == 1
    assert notes[0].startswith("F_q has 29 failures, fewer than 30.")
    assert "set lr to 0.0001 (1e-4)" in notes[0]

    # The note goes once the learning rate is lower, as it advises.
    app.number_input(key="causes_cfg_ewc-influence_lr").set_value(1e-4).run()
    assert ewc_notes(app) == []
    app.number_input(key="causes_cfg_ewc-influence_lr").set_value(1e-3).run()
    assert len(ewc_notes(app)) == 1
    # Fewer steps ranked worse than a lower lr, so they keep the note.
    app.number_input(key="causes_cfg_ewc-influence_min_steps").set_value(10).run()
    assert len(ewc_notes(app)) == 1
    app.number_input(key="causes_cfg_ewc-influence_min_steps").set_value(200).run()
    assert len(ewc_notes(app)) == 1
    app.multiselect(key="causes_methods").set_value(["training-loss"]).run()
    assert ewc_notes(app) == []


def test_ewc_note_beside_overshooting_ranking(workspace_env):
    state = query_set(workspace_env, 29)
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    gentle = pipeline.run_identification(
        workspace,
        run,
        "ewc-influence",
        failure_set_id=state["failure_set_id"],
        config={"lr": 1e-4},
    )
    default = pipeline.run_identification(
        workspace, run, "ewc-influence", failure_set_id=state["failure_set_id"]
    )

    # The settings form is folded away once a ranking exists, so the note
    # stands beside the ranking under review.
    app = page("causes", **state, scores_id=default["scores_id"]).run()
    check_clean(app)
    notes = [note for note in ewc_notes(app) if note.startswith("This ranking")]
    assert len(notes) == 1
    assert notes[0].startswith("This ranking may list clean images first. F_q has 29")
    assert "set lr to 0.0001 (1e-4)" in notes[0]

    app = page("causes", **state, scores_id=gentle["scores_id"]).run()
    check_clean(app)
    assert ewc_notes(app) == []


def test_ewc_note_absent_from_thirty_failures(workspace_env):
    app = page("causes", **query_set(workspace_env, 30)).run()
    check_clean(app)
    assert app.multiselect(key="causes_methods").value == ["ewc-influence"]
    assert ewc_notes(app) == []


def test_clear_names_other_tabs(workspace_env):
    workspace = workspace_env.workspace
    state = ranked_failure_set(workspace_env)
    run_id, failure_set_id = state["run_id"], state["failure_set_id"]
    workspace.set_decisions(run_id, failure_set_id, [0, 1, 2], "confirmed")
    app = page("causes", **state).run()
    app.checkbox(key="causes_clear_confirm").check().run()
    # Another tab changes one decision this tab drew and adds two.
    workspace.set_decisions(run_id, failure_set_id, [1, 5, 6], "rejected")

    app.button(key="causes_clear").click().run()

    check_clean(app)
    left = {1: "rejected", 5: "rejected", 6: "rejected"}
    assert workspace.get_decisions(run_id, failure_set_id) == left
    note = (
        "3 examples (train #1, #5, #6) were changed in another tab or session "
        "since this page was drawn, so they keep their saved decisions. The "
        "cards now show the saved decisions."
    )
    assert conflict_notes(app) == [note]
    assert [t.value for t in app.toast] == [note]


def test_confirm_top_k_names_other_tabs(workspace_env):
    workspace = workspace_env.workspace
    state = ranked_failure_set(workspace_env)
    run_id, failure_set_id = state["run_id"], state["failure_set_id"]
    scores_id = workspace.list_scores(run_id, failure_set_id=failure_set_id)[-1]["id"]
    order = ranking(pipeline.load_scores(workspace, scores_id))[:5].tolist()
    workspace.set_decisions(run_id, failure_set_id, [order[2]], "confirmed")
    app = page("causes", **state).run()
    app.number_input(key="causes_k").set_value(5).run()
    # Since this tab drew the page, another tab rejected an undecided example
    # of the top 5 and cleared a confirmed one.
    workspace.set_decisions(run_id, failure_set_id, [order[0]], "rejected")
    workspace.set_decisions(run_id, failure_set_id, [order[2]], None)

    app.button(key="causes_confirm_top").click().run()

    check_clean(app)
    decisions = workspace.get_decisions(run_id, failure_set_id)
    assert decisions == {
        order[0]: "rejected",
        order[1]: "confirmed",
        order[3]: "confirmed",
        order[4]: "confirmed",
    }
    assert conflict_notes(app) == [
        f"2 examples (train #{order[0]}, #{order[2]}) were changed in another tab "
        "or session since this page was drawn, so they keep their saved "
        "decisions. The cards now show the saved decisions."
    ]
    assert app.button(key="causes_undo_button").label == (
        "Undo: confirming 4 examples of the top 5"
    )


def test_card_conflict_note_also_toasts(workspace_env):
    workspace = workspace_env.workspace
    state = ranked_failure_set(workspace_env)
    app = page("causes", **state).run()
    key = _review_keys(app)[0]
    index = int(key.rsplit("_", 1)[1])
    workspace.set_decisions(
        state["run_id"], state["failure_set_id"], [index], "rejected"
    )

    app.segmented_control(key=key).set_value("confirmed").run()

    check_clean(app)
    notes = conflict_notes(app)
    assert len(notes) == 1
    assert notes[0].startswith(f"Train #{index} was changed")
    assert [t.value for t in app.toast] == notes
    app.run()
    assert not app.toast


def test_missing_package_shows_install_advice(workspace_env, monkeypatch):
    for module in ("cleanlab", "cleanlab.filter", "cleanlab.rank"):
        monkeypatch.setitem(sys.modules, module, None)
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.new_failure_set(),
    }
    app = page("causes", **state).run()
    app.multiselect(key="causes_methods").set_value(["confident-learning"])
    app.button(key="causes_run").click().run()

    assert not app.exception
    errors = error_texts(app)
    assert len(errors) == 1
    assert errors[0].startswith("Identification with confident-learning failed: ")
    assert "cleanlab" in errors[0]
    assert errors[0].endswith(INSTALL_ADVICE)
    assert "No ranking yet" in app.info[0].value


def test_missing_project_module_still_raises():
    def fail():
        raise ModuleNotFoundError(
            "No module named 'repair_core.gone'", name="repair_core.gone"
        )

    with pytest.raises(ModuleNotFoundError):
        dashboard.run_safely("Loading", fail)


def test_deleted_scores_file_stops_review(workspace_env):
    state = ranked_failure_set(workspace_env)
    workspace = workspace_env.workspace
    app = page("causes", **state).run()
    check_clean(app)
    assert _review_keys(app)
    scores_id = app.session_state["scores_id"]
    scores_file = workspace.path(state["run_id"], f"scores/{scores_id}.pt")

    scores_file.unlink()
    app.run()

    assert not app.exception
    errors = error_texts(app)
    assert len(errors) == 1
    assert errors[0].startswith("Loading the ranking failed: ")
    assert str(scores_file) in errors[0]
    assert "missing" in errors[0]
    assert "or rank the training examples again with training-loss." in errors[0]
    assert _review_keys(app) == []
    assert "causes_export" not in [b.key for b in app.get("download_button")]
    # The rankings stay listed, so that another one can be chosen.
    assert app.selectbox(key="causes_scores").value == scores_id


def test_compare_leaves_out_deleted_scores_file(workspace_env):
    state = ranked_failure_set(workspace_env)
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, state["run_id"])
    random_id = pipeline.run_identification(
        workspace, run, "random", failure_set_id=state["failure_set_id"]
    )["scores_id"]
    app = page("compare", **state).run()
    check_clean(app)
    assert "compare_detection" in [c.key for c in app.get("plotly_chart")]
    loss_id = workspace.list_scores(
        state["run_id"], failure_set_id=state["failure_set_id"]
    )[0]["id"]

    workspace.path(state["run_id"], f"scores/{loss_id}.pt").unlink()
    app.run()

    check_clean(app)
    warnings = [warning.value for warning in app.warning]
    assert (
        f"The scores file of `{loss_id}` (training-loss) was moved or deleted from "
        "the workspace, so it is left out here. Restore the file from a backup, or "
        "run the method again on Causes."
    ) in warnings
    # The other ranking is still drawn.
    (chart,) = [c for c in app.get("plotly_chart") if c.key == "compare_detection"]
    names = [trace["name"] for trace in json.loads(chart.proto.spec)["data"]]
    assert names == [f"random · {random_id}"]
    # Stored removal curves need no scores file, so the choice keeps it.
    options = app.multiselect(key="compare_rankings").options
    assert f"training-loss · {loss_id}" in options

    # The Causes page opens the ranking whose file is present.
    causes = page("causes", **state).run()
    check_clean(causes)
    assert causes.session_state["scores_id"] == random_id


def test_detection_columns_show_one_decimal(workspace_env):
    app = page("causes", **ranked_failure_set(workspace_env)).run()
    check_clean(app)
    columns = json.loads(app.dataframe[0].proto.columns)
    detection = [
        "found in top 10%",
        "found in top 20%",
        "precision at 100",
        "implicated in top 20%",
    ]
    for name in detection:
        settings = columns[name]["type_config"]
        assert settings["format"] == "percent", name
        assert settings["step"] == 0.001, name


# Browser ---------------------------------------------------------------------

#: Computed background colours of the chosen ✓ and ✗ options.
CONFIRMED_FILL = "rgb(44, 160, 44)"
REJECTED_FILL = "rgb(214, 39, 40)"


@pytest.mark.browser
def test_review_decisions_differ_in_chromium(browser_server):
    url, folder = browser_server
    workspace = Workspace(folder)
    config = pipeline.RunConfig(
        **TINY, scenario="label-flip", device="cpu", train=TrainConfig(max_epochs=1)
    )
    summary = pipeline.train_run(workspace, config)
    run = pipeline.load_run(workspace, summary["run_id"])
    pipeline.run_identification(
        workspace, run, "training-loss", failure_set_id=summary["failure_set_id"]
    )

    with local_browser(folder.parent / "chromium-profile", 1600) as (
        context,
        outside,
    ):
        tab = context.new_page()
        tab.goto(f"{url}/causes?run={summary['run_id']}&fs={summary['failure_set_id']}")
        tab.get_by_text("Ranking to review").wait_for(timeout=RUN_TIMEOUT * 1000)
        wait_until_idle(tab)
        controls = tab.locator('[class*="st-key-review_"]')
        # ✓ on the first card and ✗ on the second, from the keyboard.
        for card, option in ((0, 0), (1, 1)):
            controls.nth(card).locator("button").nth(option).focus()
            tab.keyboard.press("Space")
            wait_until_idle(tab)
        focused = tab.evaluate(
            """() => document.activeElement.closest('[class*="st-key-review_"]')
                ?.className ?? ''"""
        )
        second = controls.nth(1).get_attribute("class")
        assert focused == second
        tab.mouse.move(0, 0)
        fills = [
            controls.nth(card)
            .locator("button")
            .nth(option)
            .evaluate("button => getComputedStyle(button).backgroundColor")
            for card, option in ((0, 0), (1, 1))
        ]
        assert fills == [CONFIRMED_FILL, REJECTED_FILL]
    assert outside == []


# Seeds typed as text ---------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("x", "seed 'x' is not a whole number"),
        ("-2", "seed = -2 is out of range"),
        (str(MAX_SEED + 1), f"seed = {MAX_SEED + 1} is out of range"),
        ("9" * 5000, f"seed = {'9' * 20}…{'9' * 10} is out of range"),
        ("1_000", "seed '1_000' is not a whole number"),
        ("\u0663", "seed '\u0663' is not a whole number"),
    ],
)
def test_invalid_method_seed_blocks_run(workspace_env, entry, expected):
    failure_set_id = workspace_env.new_failure_set()
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("causes", **state).run()
    app.multiselect(key="causes_methods").set_value(["random"]).run()
    app.text_input(key="causes_cfg_random_seed").set_value(entry).run()
    assert not app.exception
    assert error_texts(app) == [
        f"Invalid random settings: {expected}. "
        f"Enter a whole number from 0 to {MAX_SEED}."
    ]
    assert app.button(key="causes_run").disabled


def test_method_keeps_seed_above_float_range(workspace_env):
    # 2**53 + 1 is the smallest integer that a float64, and so the front end
    # of a number input, cannot hold.
    failure_set_id = workspace_env.new_failure_set()
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("causes", **state).run()
    app.multiselect(key="causes_methods").set_value(["random"]).run()
    app.text_input(key="causes_cfg_random_seed").set_value(f"{2**53 + 1} ").run()
    app.button(key="causes_run").click().run()
    check_clean(app)
    (record,) = stored_rankings(workspace_env, failure_set_id)
    assert record["config"]["seed"] == 2**53 + 1


# Stored rankings reused ------------------------------------------------------


def stored_rankings(prepared, failure_set_id: str) -> list[dict]:
    return prepared.workspace.list_scores(
        prepared.run_id, failure_set_id=failure_set_id
    )


REUSED = "with the same settings, seed and device instead of computing again: "


def test_rerun_reuses_unchanged_rankings(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("causes", **state).run()
    app.multiselect(key="causes_methods").set_value(["training-loss", "random"])
    app.button(key="causes_run").click().run()
    check_clean(app)
    first = stored_rankings(workspace_env, failure_set_id)
    assert [record["method"] for record in first] == ["training-loss", "random"]
    assert "Reused" not in app.success[0].value

    # A new seed for random leaves the training-loss settings as they were.
    app.text_input(key="causes_cfg_random_seed").set_value("3").run()
    app.button(key="causes_run").click().run()
    check_clean(app)
    second = stored_rankings(workspace_env, failure_set_id)
    assert len(second) == 3
    assert second[-1]["method"] == "random"
    assert second[-1]["config"]["seed"] == 3
    message = app.success[0].value
    assert message.startswith("Ranked with random (")
    assert message.endswith(
        f"Reused 1 stored ranking {REUSED}training-loss ({first[0]['id']})."
    )
    # The first method chosen opens for review, stored or not.
    assert app.session_state["scores_id"] == first[0]["id"]

    app.button(key="causes_run").click().run()
    check_clean(app)
    assert stored_rankings(workspace_env, failure_set_id) == second
    assert app.success[0].value == (
        f"Reused 2 stored rankings {REUSED}training-loss ({first[0]['id']}), "
        f"random ({second[-1]['id']})."
    )


@pytest.mark.parametrize("device", ["cuda:0", None])
def test_rerun_ignores_ranking_of_other_device(workspace_env, device):
    workspace = workspace_env.workspace
    run_id = workspace_env.run_id
    failure_set_id = workspace_env.new_failure_set()
    # A ranking stored with the default settings on another device, or by a
    # version that recorded no device.
    other_id = new_id("sc")
    workspace.save_tensor(
        run_id, f"scores/{other_id}.pt", torch.zeros(TINY["n_train"]).double()
    )
    metrics = {"seconds": 1.0} if device is None else {"seconds": 1.0, "device": device}
    workspace.add_scores(
        other_id,
        run_id,
        failure_set_id,
        "training-loss",
        dataclasses.asdict(default_config("training-loss")),
        metrics,
    )
    state = {"run_id": run_id, "failure_set_id": failure_set_id}
    app = page("causes", **state).run()
    app.multiselect(key="causes_methods").set_value(["training-loss"])
    app.button(key="causes_run").click().run()

    check_clean(app)
    records = stored_rankings(workspace_env, failure_set_id)
    assert len(records) == 2
    assert records[-1]["metrics"]["device"] == "cpu"
    assert app.success[0].value.startswith("Ranked with training-loss (")
    assert "Reused" not in app.success[0].value


def test_rerun_recomputes_deleted_scores_file(workspace_env):
    state = ranked_failure_set(workspace_env)
    (stored,) = stored_rankings(workspace_env, state["failure_set_id"])
    workspace_env.workspace.path(state["run_id"], f"scores/{stored['id']}.pt").unlink()
    app = page("causes", **state).run()
    app.multiselect(key="causes_methods").set_value(["training-loss"])
    app.button(key="causes_run").click().run()

    check_clean(app)
    records = stored_rankings(workspace_env, state["failure_set_id"])
    assert len(records) == 2
    assert app.session_state["scores_id"] == records[-1]["id"]
    assert "Reused" not in app.success[0].value


# Settings of the ranking under review -----------------------------------------

EWC_KEY = "causes_cfg_ewc-influence"


def ewc_ranking(prepared, failure_set_id: str, **settings) -> str:
    """Store an EWC-influence ranking with a short fit and ``settings``;
    return its id."""
    run = pipeline.load_run(prepared.workspace, prepared.run_id)
    config = {"max_steps": 20, "min_steps": 10, **settings}
    summary = pipeline.run_identification(
        prepared.workspace,
        run,
        "ewc-influence",
        failure_set_id=failure_set_id,
        config=config,
    )
    return summary["scores_id"]


def test_reload_shows_settings_of_ranking(workspace_env):
    state = query_set(workspace_env, 49)
    scores_id = ewc_ranking(workspace_env, state["failure_set_id"], lr=1e-4)
    # A reload opens a new session on the address of the ranking.
    app = test_app._app()
    app.query_params = {
        "run": state["run_id"],
        "fs": state["failure_set_id"],
        "scores": scores_id,
    }
    app.run()
    app.switch_page("app_pages/causes.py").run()

    check_clean(app)
    assert app.selectbox(key="causes_scores").value == scores_id
    assert app.number_input(key=f"{EWC_KEY}_lr").value == pytest.approx(1e-4)
    assert app.number_input(key=f"{EWC_KEY}_max_steps").value == 20
    assert app.number_input(key=f"{EWC_KEY}_min_steps").value == 10
    assert app.text_input(key=f"{EWC_KEY}_seed").value == "0"
    # The form shows a gentler fit than the default, so the note on a small
    # F_q is absent.
    assert ewc_notes(app) == []


def test_settings_follow_ranking_until_changed(workspace_env):
    state = query_set(workspace_env, 49)
    first = ewc_ranking(workspace_env, state["failure_set_id"], lr=1e-4)
    second = ewc_ranking(workspace_env, state["failure_set_id"], max_steps=30)
    app = page("causes", **state, scores_id=first).run()
    check_clean(app)
    assert app.number_input(key=f"{EWC_KEY}_lr").value == pytest.approx(1e-4)

    app.selectbox(key="causes_scores").set_value(second).run()
    check_clean(app)
    assert app.number_input(key=f"{EWC_KEY}_lr").value == pytest.approx(1e-3)
    assert app.number_input(key=f"{EWC_KEY}_max_steps").value == 30

    # An entry typed in this session stays when another ranking opens.
    app.number_input(key=f"{EWC_KEY}_max_steps").set_value(40).run()
    app.selectbox(key="causes_scores").set_value(first).run()
    check_clean(app)
    assert app.number_input(key=f"{EWC_KEY}_max_steps").value == 40
    assert app.number_input(key=f"{EWC_KEY}_lr").value == pytest.approx(1e-3)


def test_method_setting_error_uses_form_labels(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("causes", **state).run()
    app.number_input(key=f"{EWC_KEY}_max_steps").set_value(10).run()

    assert not app.exception
    assert error_texts(app) == [
        "Invalid ewc-influence settings: EWC-influence min steps 100 exceeds max "
        "steps 10. Lower min steps or raise max steps."
    ]
    assert app.button(key="causes_run").disabled


def test_fraction_in_method_setting_blocks_run(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("causes", **state).run()
    app.number_input(key=f"{EWC_KEY}_max_steps").set_value(2.5).run()

    assert not app.exception
    assert error_texts(app) == [
        "Invalid ewc-influence settings: max steps = 2.5 is not a whole number. "
        "Enter a whole number."
    ]
    assert app.number_input(key=f"{EWC_KEY}_max_steps").value == 2.5
    assert app.button(key="causes_run").disabled
    # The fields after the invalid one are still drawn.
    assert app.text_input(key=f"{EWC_KEY}_seed").value == "0"
