"""Pipeline functions that store their results: sweeps and removal curves.

One tiny MNIST run (200 training and 100 test images, two epochs) is trained
once per module. Each test uses a failure set of its own, so the stored
records of one test never show up in another.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading

import pytest
import torch

from repair_core import pipeline
from repair_core.errors import ConfigError, WorkspaceError
from repair_core.evaluation import DEFAULT_STRENGTHS, evaluate_model
from repair_core.training import TrainConfig
from repair_core.treatments import default_config
from repair_core.workspace import Workspace
from tests.test_cli import _without_root_override


def _json(value) -> str:
    # NaN accuracies (of an empty subset) never compare equal, so tests compare
    # the JSON text, where NaN is written as NaN.
    return json.dumps(value, sort_keys=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    workspace = Workspace(root)
    config = pipeline.RunConfig(
        n_train=200,
        n_test=100,
        scenario="label-flip",
        device="cpu",
        train=TrainConfig(max_epochs=2, lr=5e-3),
    )
    summary = pipeline.train_run(workspace, config)
    return root, pipeline.load_run(workspace, summary["run_id"])


@pytest.fixture
def ranked(tiny):
    """A fresh failure set of the tiny run with a training-loss ranking."""
    root, run = tiny
    workspace = Workspace(root)
    failure_set_id, _ = pipeline.create_failure_set(workspace, run, seed=1)
    scores = pipeline.run_identification(
        workspace, run, "training-loss", failure_set_id=failure_set_id
    )
    return workspace, run, failure_set_id, scores["scores_id"]


def _top_ten(ranked) -> torch.Tensor:
    """Return the 10 highest-scoring training indices of the ranked fixture."""
    workspace, run, failure_set_id, scores_id = ranked
    causes, _ = pipeline.resolve_causes(
        workspace, run, failure_set_id=failure_set_id, scores_id=scores_id, top_k=10
    )
    return causes


def test_run_sweep_without_strengths_sweeps_default_grid(ranked):
    workspace, run, failure_set_id, _ = ranked

    summary = pipeline.run_sweep(
        workspace,
        run,
        "newton",
        _top_ten(ranked),
        failure_set_id=failure_set_id,
        config={"depth": 20, "scale": 50.0},
    )

    strengths = [point["strength"] for point in summary["points"]]
    assert strengths == list(DEFAULT_STRENGTHS["newton"])
    assert summary["strengths"] == strengths


def test_run_sweep_stores_summary(ranked):
    workspace, run, failure_set_id, scores_id = ranked
    causes, origin = pipeline.resolve_causes(
        workspace, run, failure_set_id=failure_set_id, scores_id=scores_id, top_k=10
    )

    summary = pipeline.run_sweep(
        workspace,
        run,
        "finetune",
        causes,
        failure_set_id=failure_set_id,
        strengths=[1, 2],
        causes_origin=origin,
    )

    assert [point["strength"] for point in summary["points"]] == [1, 2]
    # Epochs are whole numbers in the list of strengths as in each point.
    assert [type(value) for value in summary["strengths"]] == [int, int]
    assert summary["n_removed"] == 10
    # The swept setting, max_epochs, takes each strength in turn.
    expected = default_config("finetune").to_dict()
    del expected["max_epochs"]
    assert summary["config"] == expected
    stored = Workspace(workspace.root).get_sweep(summary["sweep_id"])
    assert stored["run_id"] == run.run_id
    assert stored["failure_set_id"] == failure_set_id
    assert stored["treatment"] == "finetune"
    assert stored["causes"] == f"top 10 of training-loss ranking {scores_id}"
    assert stored["n_removed"] == 10
    assert stored["strengths"] == [1.0, 2.0]
    assert stored["config"] == summary["config"]
    assert stored["device"] == summary["device"] == str(run.device)
    assert _json(stored["points"]) == _json(summary["points"])
    listed = workspace.list_sweeps(run.run_id, failure_set_id=failure_set_id)
    assert [record["id"] for record in listed] == [summary["sweep_id"]]


def _assert_measures(workspace, run, failure_set_id, model, record):
    """Check that ``model`` reproduces the accuracies stored in ``record``."""
    split = pipeline.load_failure_split(workspace, run.run_id, failure_set_id)
    test = run.data.test
    measured = evaluate_model(model, test.images, test.labels, split)
    for key in ("query_acc", "remaining_acc", "test_acc"):
        assert measured[key] == pytest.approx(record[key], abs=1e-12), key


def _files(workspace, run, folder):
    directory = workspace.path(run.run_id, folder)
    if not directory.is_dir():
        return set()
    return {path.relative_to(directory) for path in directory.rglob("*")}


def test_sweep_keeps_each_point_model(ranked):
    workspace, run, failure_set_id, scores_id = ranked
    causes = _top_ten(ranked)

    summary = pipeline.run_sweep(
        workspace,
        run,
        "newton",
        causes,
        failure_set_id=failure_set_id,
        strengths=[0.5, 8.0],
        config={"depth": 20, "scale": 50.0},
    )

    files = [point["model_file"] for point in summary["points"]]
    assert files == [
        f"sweeps/{summary['sweep_id']}/gamma-0.5.pt",
        f"sweeps/{summary['sweep_id']}/gamma-8.0.pt",
    ]
    models = [pipeline.load_model_file(workspace, run, file) for file in files]
    for model, point in zip(models, summary["points"], strict=True):
        _assert_measures(workspace, run, failure_set_id, model, point)
    first, second = (
        torch.nn.utils.parameters_to_vector(model.parameters()) for model in models
    )
    assert not torch.equal(first, second)


def test_repair_keeps_every_arm_and_seed(ranked):
    workspace, run, failure_set_id, scores_id = ranked
    causes = _top_ten(ranked)

    summary = pipeline.run_repair(
        workspace,
        run,
        "finetune",
        causes,
        failure_set_id=failure_set_id,
        scores_id=scores_id,
        seeds=(0, 1),
    )

    repair_id = summary["repair_id"]
    stored = workspace.get_repair(repair_id)["metrics"]
    assert stored["device"] == summary["device"] == str(run.device)
    assert summary["config"] == workspace.get_repair(repair_id)["config"]
    # The seeds are listed once, not beside a config seed of the first alone.
    assert summary["seeds"] == [0, 1]
    assert "seed" not in summary["config"]
    # Fine-tuning takes its optimiser settings from the run, and the record names them.
    train = run.config.train
    assert summary["config"] == {"max_epochs": None}
    assert (
        stored["training"]
        == summary["training"]
        == {
            "lr": train.lr,
            "betas": list(train.betas),
            "batch_size": train.batch_size,
            "max_epochs": train.max_epochs,
            "patience": train.patience,
            "val_fraction": train.val_fraction,
        }
    )
    assert list(summary["per_seed"]) == ["treatment", "nothing", "random"]
    for arm, records in summary["per_seed"].items():
        assert [record["seed"] for record in records] == [0, 1]
        for record in records:
            model = pipeline.load_repaired_model(
                workspace, run, repair_id, arm=arm, seed=record["seed"]
            )
            _assert_measures(workspace, run, failure_set_id, model, record)
    # The first treated model is also the repair's main checkpoint.
    assert summary["per_seed"]["treatment"][0]["model_file"] == (
        f"repairs/{repair_id}.pt"
    )
    assert _files(workspace, run, f"repairs/{repair_id}") == {
        pathlib.Path(name)
        for name in (
            "treatment-seed1.pt",
            "nothing-seed0.pt",
            "nothing-seed1.pt",
            "random-seed0.pt",
            "random-seed1.pt",
        )
    }
    with pytest.raises(ConfigError, match="ran no seed 5. Choose one of 0, 1"):
        pipeline.load_repaired_model(workspace, run, repair_id, seed=5)
    with pytest.raises(ConfigError, match="has no 'control' arm"):
        pipeline.load_repaired_model(workspace, run, repair_id, arm="control")


def test_identification_stores_resolved_settings(ranked):
    workspace, run, failure_set_id, _ = ranked

    summary = pipeline.run_identification(
        workspace,
        run,
        "linear-influence-lissa",
        failure_set_id=failure_set_id,
        config={"lissa_depth": 20},
    )

    # The searched scale is kept apart from the requested settings, so a
    # request with the same settings still finds this ranking.
    assert summary["config"]["lissa_scale"] is None
    scale = summary["resolved"]["lissa_scale"]
    assert scale > 0
    stored = workspace.get_scores(summary["scores_id"])
    assert stored["metrics"]["resolved"] == {"lissa_scale": scale}
    again = pipeline.run_identification(
        workspace,
        run,
        "linear-influence-lissa",
        failure_set_id=failure_set_id,
        config={"lissa_depth": 20},
    )
    assert again["reused"] is True
    assert again["resolved"] == {"lissa_scale": scale}


def test_repair_reuses_stored_fisher(ranked, monkeypatch):
    workspace, run, failure_set_id, _ = ranked
    scores = pipeline.run_identification(
        workspace,
        run,
        "ewc-influence",
        failure_set_id=failure_set_id,
        config={"max_steps": 20, "min_steps": 10},
    )
    assert workspace.path(run.run_id, "fisher.pt").is_file()
    causes, _ = pipeline.resolve_causes(
        workspace,
        run,
        failure_set_id=failure_set_id,
        scores_id=scores["scores_id"],
        top_k=10,
    )

    def no_recompute(*args, **kwargs):
        raise AssertionError("the Fisher was computed again")

    # Every place a treatment could compute the Fisher over D.
    monkeypatch.setattr("repair_core.evaluation.diagonal_fisher", no_recompute)
    monkeypatch.setattr("repair_core.treatments.diagonal_fisher", no_recompute)
    summary = pipeline.run_repair(
        workspace,
        run,
        "ewc-deletion",
        causes,
        failure_set_id=failure_set_id,
        scores_id=scores["scores_id"],
        config={"max_steps": 20},
        seeds=(0,),
    )

    assert summary["n_removed"] == 10


def test_fit_failures_reports_nothing_removed(ranked):
    workspace, run, failure_set_id, scores_id = ranked
    causes = _top_ten(ranked)

    summary = pipeline.run_repair(
        workspace,
        run,
        "fit-failures",
        causes,
        failure_set_id=failure_set_id,
        scores_id=scores_id,
        config={"fit": {"max_steps": 20, "min_steps": 10}},
        seeds=(0,),
    )

    assert summary["n_removed"] == 0
    assert summary["controls"] == {}
    assert summary["controls_note"].startswith("fit-failures removes nothing")


def test_interrupted_repair_leaves_no_files(ranked):
    workspace, run, failure_set_id, scores_id = ranked
    causes = _top_ten(ranked)
    before = _files(workspace, run, "repairs")

    def interrupt_at_random_arm(fraction, message):
        if "random arm" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run_repair(
            workspace,
            run,
            "finetune",
            causes,
            failure_set_id=failure_set_id,
            scores_id=scores_id,
            seeds=(0,),
            progress=interrupt_at_random_arm,
        )

    assert _files(workspace, run, "repairs") == before
    assert workspace.list_repairs(run.run_id, failure_set_id=failure_set_id) == []


def test_repair_takes_causes_as_a_plain_list(ranked):
    workspace, run, failure_set_id, scores_id = ranked

    summary = pipeline.run_repair(
        workspace,
        run,
        "ewc-deletion",
        [12, 3, 12],
        failure_set_id=failure_set_id,
        seeds=(0,),
        controls=(),
        config={"lr": 1e-12, "max_steps": 2},
    )

    assert summary["n_removed"] == 2
    stored = workspace.load_tensor(
        run.run_id, f"repairs/{summary['repair_id']}_causes.pt"
    )
    assert stored.tolist() == [3, 12]


@pytest.mark.parametrize("top_k", [True, 5.5])
def test_top_k_must_be_a_whole_number(ranked, top_k):
    workspace, run, failure_set_id, scores_id = ranked

    with pytest.raises(ConfigError, match="is not a whole number"):
        pipeline.resolve_causes(
            workspace,
            run,
            failure_set_id=failure_set_id,
            scores_id=scores_id,
            top_k=top_k,
        )


@pytest.mark.parametrize("kind", ["scores", "repair"])
def test_record_that_cannot_be_written_leaves_no_file(ranked, monkeypatch, kind):
    workspace, run, failure_set_id, scores_id = ranked
    folder = "scores" if kind == "scores" else "repairs"
    before = _files(workspace, run, folder)

    def reject_write(*args, **kwargs):
        raise WorkspaceError("The workspace database is read-only.")

    monkeypatch.setattr(workspace, f"add_{kind}", reject_write)
    with pytest.raises(WorkspaceError, match="read-only"):
        if kind == "scores":
            pipeline.run_identification(
                workspace, run, "random", failure_set_id=failure_set_id
            )
        else:
            pipeline.run_repair(
                workspace,
                run,
                "finetune",
                _top_ten(ranked),
                failure_set_id=failure_set_id,
                scores_id=scores_id,
                seeds=(0,),
                controls=(),
                config={"max_epochs": 1},
            )

    assert _files(workspace, run, folder) == before


def test_interrupt_before_the_record_leaves_no_file(tmp_path, monkeypatch):
    # Ctrl-C between the last file and the record must take the files back.
    workspace = Workspace(tmp_path / "ws")
    config = pipeline.RunConfig(
        n_train=100,
        n_test=60,
        scenario="label-flip",
        device="cpu",
        train=TrainConfig(max_epochs=1, lr=5e-3),
    )

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(workspace, "add_run", interrupt)
        with pytest.raises(KeyboardInterrupt):
            pipeline.train_run(workspace, config)
    runs = tmp_path / "ws" / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []

    run_id = pipeline.train_run(workspace, config)["run_id"]
    run = pipeline.load_run(workspace, run_id)
    checkpoint = tmp_path / "model.pt"
    torch.save(run.model.state_dict(), checkpoint)
    folder = runs / run_id
    before = sorted(path for path in folder.rglob("*") if path.is_file())
    assert not (folder / "fisher.pt").exists()
    with monkeypatch.context() as patch:
        patch.setattr(workspace, "add_scores", interrupt)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_identification(
                workspace, run, "ewc-influence", config={"max_steps": 2, "min_steps": 1}
            )
    # Neither the scores nor the Fisher computed on the way stay behind.
    assert sorted(path for path in folder.rglob("*") if path.is_file()) == before

    with monkeypatch.context() as patch:
        patch.setattr(workspace, "add_run", interrupt)
        with pytest.raises(KeyboardInterrupt):
            pipeline.import_run(
                workspace,
                dataclasses.replace(config, scenario="none", model="mnist-cnn"),
                checkpoint,
            )
    assert [path.name for path in runs.iterdir()] == [run_id]


def test_failed_sweep_stores_nothing(ranked):
    workspace, run, failure_set_id, scores_id = ranked
    causes = _top_ten(ranked)

    with pytest.raises(ConfigError, match="has no strength to sweep"):
        pipeline.run_sweep(
            workspace,
            run,
            "retrain",
            causes,
            failure_set_id=failure_set_id,
            strengths=[1],
        )
    assert workspace.list_sweeps(run.run_id, failure_set_id=failure_set_id) == []


def test_run_removal_curve_stores_summary(ranked):
    workspace, run, failure_set_id, scores_id = ranked

    with pytest.warns(UserWarning, match="Skipping k = 500"):
        summary = pipeline.run_removal_curve(
            workspace,
            run,
            scores_id,
            failure_set_id=failure_set_id,
            ks=(5, 500),
            seeds=(0,),
        )

    assert [point["k"] for point in summary["points"]] == [5]
    (run_record,) = summary["points"][0]["per_seed"]
    model_file = run_record["model_file"]
    assert model_file == f"removal_curves/{summary['removal_curve_id']}/k5-seed0.pt"
    model = pipeline.load_model_file(workspace, run, model_file)
    _assert_measures(workspace, run, failure_set_id, model, run_record)
    stored = Workspace(workspace.root).get_removal_curve(summary["removal_curve_id"])
    assert stored["run_id"] == run.run_id
    assert stored["failure_set_id"] == failure_set_id
    assert stored["scores_id"] == scores_id
    assert stored["ks"] == [5]
    assert summary["skipped_ks"] == [500]
    assert stored["skipped_ks"] == [500]
    assert stored["device"] == summary["device"] == str(run.device)
    assert stored["seeds"] == [0]
    assert _json(stored["points"]) == _json(summary["points"])
    listed = workspace.list_removal_curves(run.run_id, failure_set_id=failure_set_id)
    assert [record["id"] for record in listed] == [summary["removal_curve_id"]]


def test_removal_curve_rejects_only_large_ks(ranked):
    workspace, run, failure_set_id, scores_id = ranked

    with pytest.raises(ConfigError, match="Choose ks up to 198"):
        pipeline.run_removal_curve(
            workspace,
            run,
            scores_id,
            failure_set_id=failure_set_id,
            ks=(200, 500),
            seeds=(0,),
        )
    assert (
        workspace.list_removal_curves(run.run_id, failure_set_id=failure_set_id) == []
    )


@pytest.mark.parametrize(
    ("seeds", "message"),
    [(0, "seeds=0 is not a sequence of seeds"), ((), "At least one seed")],
)
def test_run_repair_rejects_bad_seeds_first(ranked, seeds, message):
    workspace, run, failure_set_id, _ = ranked
    before = workspace.list_repairs(run.run_id)

    with pytest.raises(ConfigError, match=message):
        pipeline.run_repair(
            workspace,
            run,
            "newton",
            torch.arange(3),
            failure_set_id=failure_set_id,
            seeds=seeds,
        )
    assert workspace.list_repairs(run.run_id) == before


def test_causes_reject_other_failure_set(ranked):
    workspace, run, scored_set, scores_id = ranked
    other_set, _ = pipeline.create_failure_set(workspace, run, seed=7)

    with pytest.raises(ConfigError, match="holdout failures may have been used"):
        pipeline.resolve_causes(
            workspace, run, failure_set_id=other_set, scores_id=scores_id, top_k=5
        )
    with pytest.raises(ConfigError, match=f"--failure-set {scored_set}"):
        pipeline.run_removal_curve(
            workspace, run, scores_id, failure_set_id=other_set, ks=(5,), seeds=(0,)
        )
    assert workspace.list_removal_curves(run.run_id, failure_set_id=other_set) == []


def test_causes_reject_other_runs_scores(ranked, tmp_path):
    workspace, run, failure_set_id, scores_id = ranked
    config = pipeline.RunConfig(
        n_train=200,
        n_test=100,
        scenario="label-flip",
        seed=3,
        device="cpu",
        train=TrainConfig(max_epochs=1, lr=5e-3),
    )
    other = pipeline.load_run(
        workspace, pipeline.train_run(workspace, config)["run_id"]
    )
    other_set = pipeline.default_failure_set(workspace, other.run_id)

    with pytest.raises(ConfigError, match=f"belong to run {run.run_id!r}"):
        pipeline.resolve_causes(
            workspace, other, failure_set_id=other_set, scores_id=scores_id, top_k=5
        )
    causes_file = tmp_path / "causes.txt"
    causes_file.write_text("1\n2\n")
    with pytest.raises(ConfigError, match=f"belong to run {run.run_id!r}"):
        pipeline.resolve_causes(
            workspace,
            other,
            failure_set_id=other_set,
            scores_id=scores_id,
            causes_file=causes_file,
        )
    # A CSV export names the ranking it came from. Both runs have 200
    # training images, so only that id distinguishes an export of the first run.
    export = tmp_path / "culprits.csv"
    export.write_text(f"train_index,scores_id\n1,{scores_id}\n2,{scores_id}\n")
    with pytest.raises(
        ConfigError,
        match=(
            rf"Line 2 of causes file .* names the ranking {scores_id!r} in its "
            rf"scores_id column, which belongs to run {run.run_id!r}, not "
            rf"{other.run_id!r}\. Export the causes of run {other.run_id!r}\.$"
        ),
    ):
        pipeline.resolve_causes(
            workspace, other, failure_set_id=other_set, causes_file=export
        )
    # The run is named even where the other run's index is out of range here.
    larger = tmp_path / "larger_run.csv"
    larger.write_text(f"train_index,scores_id\n500,{scores_id}\n")
    with pytest.raises(ConfigError, match=f"which belongs to run {run.run_id!r}"):
        pipeline.resolve_causes(
            workspace, other, failure_set_id=other_set, causes_file=larger
        )
    unknown = tmp_path / "repair_causes.csv"
    unknown.write_text("train_index,repair_id\n1,rp-00000000\n")
    with pytest.raises(ConfigError, match="'rp-00000000' .* does not hold"):
        pipeline.resolve_causes(
            workspace, other, failure_set_id=other_set, causes_file=unknown
        )
    causes, origin = pipeline.resolve_causes(
        workspace, run, failure_set_id=failure_set_id, causes_file=export
    )
    assert causes.tolist() == [1, 2]
    assert origin == f"file {export.resolve()}"
    # The ranking in the file was made on failure_set_id, whose query half may
    # hold the holdout failures of another split.
    second_set, _ = pipeline.create_failure_set(workspace, run, seed=7)
    with pytest.raises(
        ConfigError,
        match=(
            rf"which was made on failure set {failure_set_id!r}, but this repair is "
            rf"judged on failure set {second_set!r}, .* Add --failure-set "
            rf"{failure_set_id}\."
        ),
    ):
        pipeline.resolve_causes(
            workspace, run, failure_set_id=second_set, causes_file=export
        )
    other_ranking = pipeline.run_identification(
        workspace, run, "random", failure_set_id=failure_set_id
    )["scores_id"]
    with pytest.raises(
        ConfigError, match=rf"but --scores names {other_ranking!r}, and the repair"
    ):
        pipeline.resolve_causes(
            workspace,
            run,
            failure_set_id=failure_set_id,
            scores_id=other_ranking,
            causes_file=export,
        )
    long_id = tmp_path / "long_id.csv"
    long_id.write_text("train_index,scores_id\n1,sc-" + "a" * 5000 + "\n")
    with pytest.raises(ConfigError) as error:
        pipeline.resolve_causes(
            workspace, run, failure_set_id=failure_set_id, causes_file=long_id
        )
    assert f"'sc-{'a' * 37}…'" in str(error.value)
    assert len(str(error.value)) < 500


def test_top_k_leaves_two_examples(ranked):
    workspace, run, failure_set_id, scores_id = ranked
    n_train = len(run.data.train)

    causes, _ = pipeline.resolve_causes(
        workspace,
        run,
        failure_set_id=failure_set_id,
        scores_id=scores_id,
        top_k=n_train - 2,
    )

    assert len(causes) == n_train - 2
    with pytest.raises(ConfigError, match=f"between 1 and {n_train - 2}"):
        pipeline.resolve_causes(
            workspace,
            run,
            failure_set_id=failure_set_id,
            scores_id=scores_id,
            top_k=n_train - 1,
        )


def test_loaded_run_keeps_clean_labels(tiny):
    _, run = tiny

    changed = run.clean_train_labels != run.data.train.labels
    # A flipped label always differs from the clean one, and nothing else does.
    assert torch.equal(changed, run.corrupted_mask.bool())
    assert changed.any()


def test_failure_split_loads_from_run_or_its_id(ranked):
    workspace, run, failure_set_id, _ = ranked

    by_id = pipeline.load_failure_split(workspace, run.run_id, failure_set_id)
    by_run = pipeline.load_failure_split(workspace, run, failure_set_id)

    assert torch.equal(by_id.query, by_run.query)
    assert torch.equal(by_id.holdout, by_run.holdout)
    with pytest.raises(ConfigError, match="not a dict. Pass the run's id") as error:
        pipeline.load_failure_split(workspace, run.record, failure_set_id)
    assert len(str(error.value)) < 200


def test_implicated_matches_pair_loop(ranked):
    workspace, run, failure_set_id, _ = ranked
    split = pipeline.load_failure_split(workspace, run.run_id, failure_set_id)
    pairs = {
        (int(run.data.test.labels[i]), int(run.test_predictions[i]))
        for i in split.query
    }
    expected = [
        bool(run.corrupted_mask[i])
        and (int(run.clean_train_labels[i]), int(run.data.train.labels[i])) in pairs
        for i in range(len(run.data.train.labels))
    ]

    implicated = pipeline.implicated_by(run, split.query)

    assert implicated.tolist() == expected


def test_repair_warns_without_holdout_failures(tiny):
    root, run = tiny
    workspace = Workspace(root)
    failure_set_id, split = pipeline.create_failure_set(
        workspace, run, query_fraction=1.0, seed=2
    )
    scores_id = pipeline.run_identification(
        workspace, run, "training-loss", failure_set_id=failure_set_id
    )["scores_id"]
    causes, _ = pipeline.resolve_causes(
        workspace, run, failure_set_id=failure_set_id, scores_id=scores_id, top_k=5
    )

    with pytest.warns(UserWarning, match="has no holdout failures"):
        summary = pipeline.run_repair(
            workspace,
            run,
            "newton",
            causes,
            failure_set_id=failure_set_id,
            config={"depth": 10, "scale": 50.0},
            seeds=(0,),
        )

    assert len(split.holdout) == 0
    assert math.isnan(summary["after"]["holdout_acc"])
    # A spread of an undefined accuracy is undefined too, not 0.
    assert math.isnan(summary["spread"]["holdout_acc"])
    assert summary["spread"]["remaining_acc"] == 0.0


_KILLED_MID_REPAIR = """
import os, signal, sys
import torch
from repair_core import pipeline
from repair_core.workspace import Workspace

workspace = Workspace(sys.argv[1])
run_id, repair_id = sys.argv[2], sys.argv[3]
with pipeline._stored_models(
    workspace,
    run_id,
    f"repairs/{repair_id}",
    main_name="treatment-seed0",
    main_file=f"repairs/{repair_id}.pt",
) as store:
    model = torch.nn.Linear(2, 2)
    store("treatment-seed0", model)
    store("nothing-seed0", model)
    workspace.save_tensor(run_id, f"repairs/{repair_id}_causes.pt", torch.arange(3))
    # What a write cut short by the kill leaves: its temporary file.
    workspace.path(run_id, f"repairs/.{repair_id}.pt.x1y2z3").write_bytes(b"part")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_repair_files(root, run_id: str, repair_id: str) -> list[pathlib.Path]:
    """Start a process that saves a repair's models and is killed outright
    before it adds the record; return the files it left."""
    code = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_REPAIR, str(root), run_id, repair_id],
        cwd=pathlib.Path(__file__).resolve().parent.parent,
        capture_output=True,
        check=False,
    ).returncode
    assert code == -signal.SIGKILL
    repairs = pathlib.Path(root) / "runs" / run_id / "repairs"
    left = sorted(path for path in repairs.rglob("*") if repair_id in str(path))
    # The marker, the first model, the causes, a temporary file, and the
    # folder with the other model.
    assert len(left) == 6
    return left


def test_next_repair_removes_killed_files(tiny):
    root, run = tiny
    workspace = Workspace(root)
    left = _killed_repair_files(root, run.run_id, "rp-dead0001")
    failure_set_id, _ = pipeline.create_failure_set(workspace, run, seed=4)
    stored_before = len(workspace.list_repairs(run.run_id))

    summary = pipeline.run_repair(
        workspace,
        run,
        "newton",
        torch.arange(3),
        failure_set_id=failure_set_id,
        config={"depth": 10, "scale": 50.0},
        seeds=(0,),
    )

    assert not any(path.exists() for path in left)
    assert len(workspace.list_repairs(run.run_id)) == stored_before + 1
    repairs = workspace.run_dir(run.run_id) / "repairs"
    assert (repairs / f"{summary['repair_id']}.pt").is_file()
    assert not list(repairs.glob(f"*{pipeline.PENDING_SUFFIX}"))


def test_abandoned_files_of_live_or_recorded_results_stay(tiny):
    root, run = tiny
    workspace = Workspace(root)
    repairs = workspace.run_dir(run.run_id) / "repairs"
    # A repair this live process is still writing.
    live = repairs / f"rp-a1ce0001{pipeline.PENDING_SUFFIX}"
    live_model = repairs / "rp-a1ce0001.pt"
    live_model.write_bytes(b"model")
    paths = ["repairs/rp-a1ce0001", "repairs/rp-a1ce0001.pt"]
    live.write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "paths": paths})
    )
    # A repair whose process was killed after its record was added.
    recorded_id = pipeline.run_repair(
        workspace,
        run,
        "newton",
        torch.arange(3),
        failure_set_id=pipeline.create_failure_set(workspace, run, seed=5)[0],
        config={"depth": 10, "scale": 50.0},
        seeds=(0,),
    )["repair_id"]
    killed = _killed_repair_files(root, run.run_id, "rp-dead0002")
    killed_marker = repairs / f"rp-dead0002{pipeline.PENDING_SUFFIX}"
    marker = repairs / f"{recorded_id}{pipeline.PENDING_SUFFIX}"
    marker.write_text(killed_marker.read_text())
    # A marker deletes only the files of its own id, whatever it lists.
    owner = json.loads(killed_marker.read_text())
    owner["paths"] = [f"repairs/{recorded_id}", f"repairs/{recorded_id}.pt"]
    killed_marker.write_text(json.dumps(owner))
    # A marker that cannot be read.
    (repairs / f"rp-bad00001{pipeline.PENDING_SUFFIX}").write_text("{not json")
    # Markers whose names are not ids, which _stored_models never writes.
    odd_names = [f"{recorded_id}.pt", f"{recorded_id}_causes", "", "rp-1"]
    for name in odd_names:
        (repairs / f"{name}{pipeline.PENDING_SUFFIX}").write_text(json.dumps(owner))
    causes_file = repairs / f"{recorded_id}_causes.pt"
    assert causes_file.is_file()

    removed = pipeline.remove_abandoned_files(workspace)

    assert removed == ["rp-dead0002"]
    assert not any(path.exists() for path in killed)
    assert live.is_file()
    assert live_model.is_file()
    assert not marker.exists()
    assert (repairs / f"{recorded_id}.pt").is_file()
    assert pipeline.load_repaired_model(workspace, run, recorded_id) is not None
    assert (repairs / f"rp-bad00001{pipeline.PENDING_SUFFIX}").is_file()
    assert causes_file.is_file()
    for name in odd_names:
        assert (repairs / f"{name}{pipeline.PENDING_SUFFIX}").is_file()


@pytest.mark.parametrize(
    ("model_file", "message"),
    [
        ("/etc/passwd", "is not a path inside the folder of run"),
        ("../../repair.sqlite", "is not a path inside the folder of run"),
        ("scores/{scores_id}.pt", "contains a Tensor, not a model's state dict"),
    ],
)
def test_load_model_file_rejects_other_files(ranked, model_file, message):
    workspace, run, _, scores_id = ranked

    with pytest.raises(ConfigError, match=message):
        pipeline.load_model_file(workspace, run, model_file.format(scores_id=scores_id))


def test_ranking_stored_meanwhile_is_reused(tiny):
    root, run = tiny
    workspace = Workspace(root)
    failure_set_id, _ = pipeline.create_failure_set(workspace, run, seed=8)
    scores = workspace.run_dir(run.run_id) / "scores"
    before = set(scores.glob("*"))
    other: dict = {}

    def store_same_ranking(fraction, message):
        # Another command stores the same ranking while this one computes.
        if not other:
            other.update(
                pipeline.run_identification(
                    Workspace(root),
                    run,
                    "random",
                    failure_set_id=failure_set_id,
                    config={"seed": 4},
                )
            )

    summary = pipeline.run_identification(
        workspace,
        run,
        "random",
        failure_set_id=failure_set_id,
        config={"seed": 4},
        progress=store_same_ranking,
    )

    assert "reused" not in other
    assert summary["reused"] is True
    assert summary["scores_id"] == other["scores_id"]
    assert summary["config"] == other["config"]
    assert summary["n_positive"] == other["n_positive"]
    records = workspace.list_scores(run.run_id, failure_set_id=failure_set_id)
    assert [record["id"] for record in records] == [other["scores_id"]]
    assert set(scores.glob("*")) - before == {scores / f"{other['scores_id']}.pt"}

    # Another seed makes another ranking, which is stored beside it.
    reseeded = pipeline.run_identification(
        workspace, run, "random", failure_set_id=failure_set_id, config={"seed": 5}
    )
    assert "reused" not in reseeded
    records = workspace.list_scores(run.run_id, failure_set_id=failure_set_id)
    assert len(records) == 2


def test_concurrent_jobs_leave_shared_model_intact(tiny):
    # The dashboard shares one loaded run between sessions, so two rankings
    # may differentiate it while a third session copies it.
    root, _ = tiny
    workspace = Workspace(root)
    run = pipeline.load_run(workspace, tiny[1].run_id)
    failure_set_id, _ = pipeline.create_failure_set(workspace, run, seed=10)
    errors: list[BaseException] = []

    def rank(seed: int) -> None:
        try:
            for method in ("ewc-influence", "linear-influence-gd"):
                pipeline.run_identification(
                    workspace,
                    run,
                    method,
                    failure_set_id=failure_set_id,
                    config={"seed": seed, "max_steps": 20, "min_steps": 10}
                    if method == "ewc-influence"
                    else {"seed": seed, "gd_steps": 20},
                )
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=rank, args=(seed,)) for seed in (1, 2)]
    for worker in workers:
        worker.start()
    copies = 0
    while any(worker.is_alive() for worker in workers) or not copies:
        try:
            copy.deepcopy(run.model)
        except BaseException as error:
            errors.append(error)
            break
        copies += 1
    for worker in workers:
        worker.join()

    assert errors == []
    for name, parameter in run.model.named_parameters():
        assert type(parameter) is torch.nn.Parameter, name
    stored = workspace.list_scores(run.run_id, failure_set_id=failure_set_id)
    assert len(stored) == 4


def test_stored_ranking_is_reused_without_computing(tiny):
    root, run = tiny
    workspace = Workspace(root)
    failure_set_id, _ = pipeline.create_failure_set(workspace, run, seed=9)
    first = pipeline.run_identification(
        workspace, run, "training-loss", failure_set_id=failure_set_id
    )
    steps = []

    again = pipeline.run_identification(
        workspace,
        run,
        "training-loss",
        failure_set_id=failure_set_id,
        config={"batch_size": first["config"]["batch_size"]},
        progress=lambda fraction, message: steps.append(message),
    )

    # Reusing computes nothing, so the one report is the end.
    assert steps == [f"training-loss: reused stored ranking {first['scores_id']}"]
    assert again["reused"] is True
    assert again["scores_id"] == first["scores_id"]
    assert again["seconds"] == first["seconds"]
    records = workspace.list_scores(run.run_id, failure_set_id=failure_set_id)
    assert [record["id"] for record in records] == [first["scores_id"]]

    # Without its scores file the ranking is computed and stored again.
    workspace.path(run.run_id, f"scores/{first['scores_id']}.pt").unlink()
    computed = pipeline.run_identification(
        workspace, run, "training-loss", failure_set_id=failure_set_id
    )
    assert "reused" not in computed
    assert computed["scores_id"] != first["scores_id"]

    # A damaged scores file, whose error advises ranking again, is not reused.
    workspace.path(run.run_id, f"scores/{computed['scores_id']}.pt").write_text("x")
    with pytest.raises(WorkspaceError, match="rank the training examples again"):
        pipeline.load_scores(workspace, computed["scores_id"])
    recomputed = pipeline.run_identification(
        workspace, run, "training-loss", failure_set_id=failure_set_id
    )
    assert "reused" not in recomputed
    assert recomputed["scores_id"] not in (first["scores_id"], computed["scores_id"])
    assert pipeline.load_scores(workspace, recomputed["scores_id"]).shape == (
        len(run.data.train),
    )

    # So is a file that loads but does not hold this ranking's scores.
    current = recomputed["scores_id"]
    n_train = len(run.data.train)
    for content, problem in (
        (torch.zeros(5, dtype=torch.float64), "holds 5 scores, not the ranking's"),
        (torch.full((n_train,), math.nan, dtype=torch.float64), "holds NaN"),
        (torch.arange(n_train), "holds a torch.int64 tensor"),
        ({"a": 1}, "holds a dict"),
    ):
        torch.save(content, workspace.path(run.run_id, f"scores/{current}.pt"))
        with pytest.raises(WorkspaceError, match=f"is damaged: it {problem}"):
            pipeline.load_scores(workspace, current)
        again = pipeline.run_identification(
            workspace, run, "training-loss", failure_set_id=failure_set_id
        )
        assert "reused" not in again
        current = again["scores_id"]


def _claims(root, failure_set_id: str) -> int:
    connection = sqlite3.connect(pathlib.Path(root) / "repair.sqlite")
    try:
        return connection.execute(
            "SELECT COUNT(*) FROM failure_set_claims WHERE failure_set_id = ?",
            (failure_set_id,),
        ).fetchone()[0]
    finally:
        connection.close()


@pytest.mark.parametrize(("command", "seed"), [("identify", 9), ("sweep", 10)])
def test_used_failure_set_survives_cleanup(tiny, command, seed):
    root, run = tiny
    # The command that creates the failure set, as identify --query-fraction
    # does, and another command that uses it.
    creator = Workspace(root)
    failure_set_id, _ = pipeline.create_failure_set(creator, run, seed=seed)
    user = Workspace(root)
    taken_back = []

    def stop_creator(fraction, message):
        # The creator is interrupted and takes its failure set back.
        taken_back.append(creator.delete_unused_failure_set(run.run_id, failure_set_id))

    if command == "identify":
        summary = pipeline.run_identification(
            user, run, "random", failure_set_id=failure_set_id, progress=stop_creator
        )
        stored = user.list_scores(run.run_id, failure_set_id=failure_set_id)
        assert [record["id"] for record in stored] == [summary["scores_id"]]
    else:
        summary = pipeline.run_sweep(
            user,
            run,
            "finetune",
            torch.arange(3),
            failure_set_id=failure_set_id,
            strengths=[1],
            progress=stop_creator,
        )
        stored = user.list_sweeps(run.run_id, failure_set_id=failure_set_id)
        assert [record["id"] for record in stored] == [summary["sweep_id"]]

    assert taken_back
    assert not any(taken_back)
    assert user.get_failure_set(failure_set_id)["run_id"] == run.run_id
    assert user.path(run.run_id, f"failure_sets/{failure_set_id}.pt").is_file()
    assert _claims(root, failure_set_id) == 0


_UNDER_READ_ONLY_FOLDER = """
import sys
import torch
from repair_core import pipeline
from repair_core.errors import WorkspaceError
from repair_core.workspace import Workspace

workspace = Workspace(sys.argv[1])
run = pipeline.load_run(workspace, sys.argv[2])
failure_set_id = sys.argv[3]


def report(fraction, message):
    print("progress:", message, flush=True)


if sys.argv[4] == "identify":
    try:
        pipeline.run_identification(
            workspace, run, "random", failure_set_id=failure_set_id, progress=report
        )
    except WorkspaceError as error:
        print("identify error:", error)
else:
    summary = pipeline.run_sweep(
        workspace,
        run,
        "finetune",
        torch.arange(3),
        failure_set_id=failure_set_id,
        strengths=[1],
    )
    print("sweep:", summary["sweep_id"])
    try:
        pipeline.run_repair(
            workspace,
            run,
            "newton",
            torch.arange(3),
            failure_set_id=failure_set_id,
            config={"depth": 10, "scale": 50.0},
            seeds=(0,),
            progress=report,
        )
    except WorkspaceError as error:
        print("repair error:", error)
"""


def _run_in_read_only_folder(root, run_id, failure_set_id, action, folder):
    """Run ``action`` of _UNDER_READ_ONLY_FOLDER in a process for which the
    run's ``folder`` is read-only, even as root. Return the finished process."""
    folder.chmod(0o555)
    try:
        return subprocess.run(
            [*_without_root_override(), sys.executable, "-c"]
            + [_UNDER_READ_ONLY_FOLDER, str(root), run_id, failure_set_id, action],
            cwd=pathlib.Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        folder.chmod(0o755)


def test_identify_checks_scores_folder_first(tiny, tmp_path):
    root, run = tiny
    failure_set_id, _ = pipeline.create_failure_set(Workspace(root), run, seed=11)
    copy = tmp_path / "workspace"
    shutil.copytree(root, copy)
    scores = copy / "runs" / run.run_id / "scores"
    scores.mkdir(exist_ok=True)
    before = sorted(scores.iterdir())

    result = _run_in_read_only_folder(
        copy, run.run_id, failure_set_id, "identify", scores
    )

    assert result.returncode == 0, result.stderr
    assert (
        f"identify error: Folder {str(scores)!r} of run {run.run_id!r} is not "
        "writable (Permission denied)"
    ) in result.stdout
    assert f"Make the folder {str(scores)!r} writable" in result.stdout
    # The check came before the ranking, which reports its progress.
    assert "progress:" not in result.stdout
    assert sorted(scores.iterdir()) == before
    assert Workspace(copy).list_scores(run.run_id, failure_set_id=failure_set_id) == []


def test_undeletable_leftover_only_warns(tiny, tmp_path):
    root, run = tiny
    failure_set_id, _ = pipeline.create_failure_set(Workspace(root), run, seed=12)
    copy = tmp_path / "workspace"
    shutil.copytree(root, copy)
    left = _killed_repair_files(copy, run.run_id, "rp-dead0003")
    repairs = copy / "runs" / run.run_id / "repairs"
    before = sorted(repairs.iterdir())

    result = _run_in_read_only_folder(
        copy, run.run_id, failure_set_id, "sweep", repairs
    )

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "Could not delete " in result.stderr
    assert "saved models of rp-dead0003" in result.stderr
    # The sweep writes into another folder, so it is stored.
    sweep_id = result.stdout.split("sweep: ", 1)[1].split()[0]
    assert Workspace(copy).get_sweep(sweep_id)["failure_set_id"] == failure_set_id
    # A repair would write into the read-only folder, so it stops before work.
    assert f"repair error: Folder {str(repairs)!r}" in result.stdout
    assert "progress:" not in result.stdout
    # The files directly in the read-only folder stay, marker included.
    assert sorted(repairs.iterdir()) == before
    assert (repairs / f"rp-dead0003{pipeline.PENDING_SUFFIX}").is_file()

    # Once the folder is writable, the next cleanup deletes the leftover.
    assert pipeline.remove_abandoned_files(Workspace(copy)) == ["rp-dead0003"]
    assert not any(path.exists() for path in left)
