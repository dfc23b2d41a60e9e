"""Bad input gives one RepairError that names the value, and changes nothing stored.

Covers labels outside the model's classes, corrupt workspace files, user model
factories that raise or cannot be imported, a folder passed as a checkpoint,
and causes files that are pipes, devices or standard input. The workspace tests
share one imported run (an untrained linear model, so no training time) and
copy its folder per test.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from repair_core import models, pipeline
from repair_core.cli import main
from repair_core.cli_text import relocate_text
from repair_core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    RepairError,
    WorkspaceError,
)
from repair_core.identification import identify
from repair_core.identification.baselines import RandomConfig
from repair_core.identification.ewc_influence import EWCInfluenceConfig
from repair_core.identification.tracin import TracInConfig
from repair_core.training import TrainConfig
from repair_core.treatments import (
    apply_treatment,
    default_config,
    read_causes_file,
    repair,
)
from repair_core.treatments.ewc_deletion import EWCDeletionConfig
from repair_core.workspace import Workspace
from tests.factories import tiny_cnn, tiny_images, write_digit_folder

N_CLASSES = 3
#: Labels outside 0..N_CLASSES-1. The loss raises IndexError on the first two
#: and skips -100 (its ignore_index) without an error.
BAD_LABELS = (N_CLASSES, -1, -100)
IMPORT_DATA = ["--n-train", "100", "--n-test", "50", "--device", "cpu"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): _digest(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# Labels outside the model's classes ------------------------------------------


@pytest.fixture
def labelled():
    images, labels = tiny_images(24, n_classes=N_CLASSES)
    return tiny_cnn(n_classes=N_CLASSES), images, labels


@pytest.mark.parametrize("bad", BAD_LABELS)
@pytest.mark.parametrize("method", ["training-loss", "random"])
def test_identify_rejects_bad_training_label(labelled, method, bad):
    model, images, labels = labelled
    labels = labels.clone()
    labels[5] = bad

    with pytest.raises(ConfigError) as caught:
        identify(method, model, images, labels, images[:4], labels[:4])

    message = str(caught.value)
    assert isinstance(caught.value, RepairError)
    assert f"Training label {bad} at index 5" in message
    assert "valid range 0..2" in message
    assert "3 outputs" in message


@pytest.mark.parametrize("bad", BAD_LABELS)
def test_identify_rejects_bad_query_label(labelled, bad):
    model, images, labels = labelled
    query_labels = labels[:4].clone()
    query_labels[2] = bad

    with pytest.raises(ConfigError) as caught:
        identify("training-loss", model, images, labels, images[:4], query_labels)

    assert f"Query label {bad} at index 2" in str(caught.value)
    assert "valid range 0..2" in str(caught.value)


def test_identify_counts_further_bad_labels(labelled):
    model, images, labels = labelled
    labels = labels.clone()
    labels[[3, 8, 9]] = 7

    with pytest.raises(ConfigError) as caught:
        identify("training-loss", model, images, labels, images[:4], labels[:4])

    assert "Training label 7 at index 3" in str(caught.value)
    assert "and so are 2 more" in str(caught.value)


def test_identify_rejects_float_labels(labelled):
    model, images, labels = labelled

    with pytest.raises(ConfigError, match="Training labels have dtype torch.float32"):
        identify("training-loss", model, images, labels.float(), images[:4], labels[:4])


def test_identify_label_check_keeps_model_state():
    images, labels = tiny_images(24, n_classes=N_CLASSES)
    model = tiny_cnn(n_classes=N_CLASSES, batchnorm=True)
    model.train()
    before = {key: value.clone() for key, value in model.state_dict().items()}

    result = identify("training-loss", model, images, labels, images[:4], labels[:4])

    assert result.scores.shape == (24,)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("bad", BAD_LABELS)
def test_repair_rejects_bad_training_label(labelled, bad):
    model, images, labels = labelled
    labels = labels.clone()
    labels[6] = bad

    with pytest.raises(ConfigError) as caught:
        repair("finetune", model, images, labels, [0, 1], images[:4], labels[:4])

    assert f"Training label {bad} at index 6" in str(caught.value)
    assert "valid range 0..2" in str(caught.value)


def test_apply_treatment_rejects_bad_query_label(labelled):
    model, images, labels = labelled
    query_labels = labels[:4].clone()
    query_labels[1] = 5

    with pytest.raises(ConfigError, match="Query label 5 at index 1"):
        apply_treatment(
            "newton",
            model,
            images,
            labels,
            torch.tensor([0, 1]),
            images[:4],
            query_labels,
            default_config("newton"),
        )


# Corrupt workspace files ------------------------------------------------------


def _write_factory(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(body))


@pytest.fixture
def factory_folder(tmp_path, monkeypatch):
    """A folder on sys.path for user factory modules, removed afterwards."""
    folder = tmp_path / "factories"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        if name.startswith("bad_input_"):
            del sys.modules[name]


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
    """A workspace with one imported run of an untrained linear model."""
    root = tmp_path_factory.mktemp("imported")
    _write_factory(
        root,
        "bad_input_linear",
        """
        import torch.nn as nn

        def build():
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        """,
    )
    sys.path.insert(0, str(root))
    try:
        import bad_input_linear

        torch.manual_seed(0)
        checkpoint = root / "linear.pt"
        torch.save(bad_input_linear.build().state_dict(), checkpoint)
        workspace = Workspace(root / "ws")
        config = pipeline.RunConfig(
            model="bad_input_linear:build", n_train=100, n_test=50, device="cpu"
        )
        summary = pipeline.import_run(workspace, config, checkpoint)
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("bad_input_linear", None)
    return root / "ws", summary["run_id"], summary["failure_set_id"]


@pytest.fixture
def workspace_copy(imported_run, tmp_path):
    """A private copy of the imported run's workspace."""
    source, run_id, failure_set_id = imported_run
    root = tmp_path / "ws"
    shutil.copytree(source, root)
    return root, run_id, failure_set_id


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _overwrite_with_text(path: Path) -> None:
    path.write_text("garbage\n")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


CORRUPTIONS = {
    "truncated": _truncate,
    "text": _overwrite_with_text,
    "empty": _empty,
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_failure_set_names_file(workspace_copy, corrupt):
    root, run_id, failure_set_id = workspace_copy
    workspace = Workspace(root)
    path = workspace.path(run_id, f"failure_sets/{failure_set_id}.pt")
    corrupt(path)

    with pytest.raises(WorkspaceError) as caught:
        pipeline.load_failure_split(workspace, run_id, failure_set_id)

    message = str(caught.value)
    assert f"File {str(path)!r} of run {run_id!r} is corrupt" in message
    assert "--failure-set" in message
    assert "--query-fraction" in message
    assert "backup" in message


def test_failure_set_of_wrong_content(workspace_copy):
    root, run_id, failure_set_id = workspace_copy
    workspace = Workspace(root)
    relative = f"failure_sets/{failure_set_id}.pt"
    workspace.save_tensor(run_id, relative, [1, 2])

    with pytest.raises(WorkspaceError) as caught:
        pipeline.load_failure_split(workspace, run_id, failure_set_id)

    assert "does not contain a failure split" in str(caught.value)
    assert str(workspace.path(run_id, relative)) in str(caught.value)


def test_cli_corrupt_failure_set_changes_nothing(workspace_copy, capsys):
    root, run_id, failure_set_id = workspace_copy
    workspace = Workspace(root)
    path = workspace.path(run_id, f"failure_sets/{failure_set_id}.pt")
    _truncate(path)
    files_before = _tree_digests(root / "runs")

    code = main(
        ["identify", "--workspace", str(root), "--run", run_id]
        + ["--method", "training-loss", "--device", "cpu"]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: File ")
    assert str(path) in err
    assert "Traceback" not in err
    assert workspace.list_scores(run_id) == []
    assert _tree_digests(root / "runs") == files_before


def test_corrupt_run_file_names_file(workspace_copy):
    root, run_id, _ = workspace_copy
    workspace = Workspace(root)
    path = workspace.path(run_id, "model.pt")
    _truncate(path)

    with pytest.raises(WorkspaceError) as caught:
        pipeline.load_run(workspace, run_id, device="cpu")

    message = str(caught.value)
    assert f"File {str(path)!r} of run {run_id!r} is corrupt" in message
    assert "create the run again" in message


def test_unreadable_run_file_shows_os_error(workspace_copy, monkeypatch):
    root, run_id, _ = workspace_copy
    workspace = Workspace(root)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "load", refuse)

    with pytest.raises(WorkspaceError) as caught:
        workspace.load_tensor(run_id, "model.pt")

    assert "could not be read: [Errno 13] Permission denied" in str(caught.value)
    assert "permissions" in str(caught.value)


# User model factories and checkpoints -----------------------------------------


def test_factory_error_names_spec_and_error(factory_folder):
    _write_factory(
        factory_folder,
        "bad_input_boom",
        """
        def build():
            raise RuntimeError("boom")
        """,
    )

    with pytest.raises(CheckpointError) as caught:
        models.load_factory("bad_input_boom:build")

    message = str(caught.value)
    assert "Model factory 'bad_input_boom:build' raised RuntimeError: boom" in message
    assert "bad_input_boom.py, line 3" in message
    assert "Fix the factory" in message


def test_factory_module_error_names_spec(factory_folder):
    _write_factory(
        factory_folder,
        "bad_input_import",
        """
        SIZES = {}
        WIDTH = SIZES["width"]
        """,
    )

    with pytest.raises(CheckpointError) as caught:
        models.load_factory("bad_input_import:build")

    message = str(caught.value)
    assert "Importing module 'bad_input_import'" in message
    assert "'bad_input_import:build'" in message
    assert "KeyError: 'width'" in message
    assert "Fix the module" in message


def test_factory_syntax_error_names_spec(factory_folder):
    _write_factory(factory_folder, "bad_input_syntax", "def build(:\n")

    with pytest.raises(CheckpointError) as caught:
        models.load_factory("bad_input_syntax:build")

    assert "raised SyntaxError" in str(caught.value)
    assert "bad_input_syntax.py" in str(caught.value)


def test_cli_import_factory_error(factory_folder, tmp_path, capsys):
    _write_factory(
        factory_folder,
        "bad_input_cli_boom",
        """
        def build():
            raise RuntimeError("boom")
        """,
    )
    checkpoint = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(1)}, checkpoint)
    workspace = tmp_path / "ws"

    code = main(
        ["import", "--workspace", str(workspace), "--model", "bad_input_cli_boom:build"]
        + ["--checkpoint", str(checkpoint), *IMPORT_DATA]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(
        "error: Model factory 'bad_input_cli_boom:build' raised RuntimeError: boom"
    )
    assert "Traceback" not in err
    assert Workspace(workspace).list_runs() == []


def test_cli_import_names_module_folders(tmp_path, capsys, monkeypatch):
    checkpoint_folder = tmp_path / "checkpoints"
    checkpoint_folder.mkdir()
    checkpoint = checkpoint_folder / "model.pt"
    torch.save({"weight": torch.zeros(1)}, checkpoint)
    current = tmp_path / "elsewhere"
    current.mkdir()
    monkeypatch.chdir(current)
    workspace = tmp_path / "ws"

    code = main(
        ["import", "--workspace", str(workspace), "--model", "bad_input_absent:build"]
        + ["--checkpoint", str(checkpoint), *IMPORT_DATA]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(
        "error: Cannot import module 'bad_input_absent' from model factory "
        "'bad_input_absent:build': No module named 'bad_input_absent'."
    )
    assert (
        f"Put the module in the current folder ({str(current.resolve())!r}), "
        f"beside the checkpoint ({str(checkpoint_folder.resolve())!r}), or in a "
        "folder on PYTHONPATH." in err
    )
    assert Workspace(workspace).list_runs() == []


def test_factory_missing_package_is_named(factory_folder):
    _write_factory(
        factory_folder,
        "bad_input_needs_package",
        """
        import bad_input_absent_package

        def build():
            return bad_input_absent_package.Net()
        """,
    )

    with pytest.raises(CheckpointError) as caught:
        models.load_factory("bad_input_needs_package:build")

    message = str(caught.value)
    assert message.startswith(
        "Importing module 'bad_input_needs_package' of model factory "
        "'bad_input_needs_package:build' raised ModuleNotFoundError: No module "
        "named 'bad_input_absent_package'"
    )
    assert "bad_input_needs_package.py, line 2" in message
    assert "Install the package it imports" in message
    assert "Put the module" not in message


def test_checkpoint_folder_is_named(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"weight": torch.zeros(1)}, folder / "model.pt")

    with pytest.raises(CheckpointError) as caught:
        models.read_state_dict(folder)

    message = str(caught.value)
    assert f"Checkpoint {str(folder)!r} is a folder" in message
    assert "a state-dict file is expected" in message
    assert "The folder contains 'model.pt'." in message


@pytest.mark.parametrize(
    ("model", "name", "message"),
    [
        ("mnist-cnn", "a" * 300 + ".pt", "is too long for the file system"),
        ("bad_input_linear:build", "a" * 300 + ".pt", "is too long for the file"),
        ("mnist-cnn", "model\0.pt", "contains a NUL character"),
        ("bad_input_linear:build", "model\0.pt", "contains a NUL character"),
    ],
    ids=["builtin-too-long", "factory-too-long", "builtin-nul", "factory-nul"],
)
def test_cli_import_unusable_checkpoint_path(
    workspace_copy, tmp_path, capsys, model, name, message
):
    workspace = workspace_copy[0]
    before = _tree_digests(workspace)
    checkpoint = f"{tmp_path}/{name}"

    code = main(
        ["import", "--workspace", str(workspace), "--model", model]
        + ["--checkpoint", checkpoint, *IMPORT_DATA]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: Checkpoint {checkpoint!r} {message}")
    assert err.count("\n") == 1
    assert "Check the path." in err
    assert _tree_digests(workspace) == before


@pytest.mark.parametrize(
    ("name", "problem"),
    [("a" * 300 + ".pt", "is too long"), ("a\0b.pt", "contains a NUL character")],
)
def test_import_run_unusable_checkpoint_name(workspace_copy, tmp_path, name, problem):
    workspace = workspace_copy[0]
    before = _tree_digests(workspace)
    checkpoint = tmp_path / name
    config = pipeline.RunConfig(model="mnist-cnn", n_train=100, n_test=50)

    with pytest.raises(CheckpointError) as caught:
        pipeline.import_run(Workspace(workspace), config, checkpoint)

    assert str(caught.value).startswith(f"Checkpoint {str(checkpoint)!r} {problem}")
    assert _tree_digests(workspace) == before


def test_cli_import_checkpoint_folder(workspace_copy, tmp_path, capsys):
    workspace = workspace_copy[0]
    runs_before = Workspace(workspace).list_runs()
    folder = tmp_path / "checkpoints"
    folder.mkdir()

    code = main(
        ["import", "--workspace", str(workspace), "--model", "mnist-cnn"]
        + ["--checkpoint", str(folder), *IMPORT_DATA]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: Checkpoint {str(folder)!r} is a folder")
    assert "state-dict file" in err
    assert "not found" not in err
    assert Workspace(workspace).list_runs() == runs_before


@pytest.mark.parametrize(
    "body",
    [
        "def build(width):\n    raise AssertionError('not reached')\n",
        "import torch.nn as nn\n\n"
        "class build(nn.Module):\n"
        "    def __init__(self, width):\n"
        "        super().__init__()\n",
    ],
    ids=["function", "class"],
)
def test_factory_needing_arguments(factory_folder, body):
    _write_factory(factory_folder, "bad_input_needs_width", body)

    with pytest.raises(CheckpointError) as caught:
        models.load_factory("bad_input_needs_width:build")

    message = str(caught.value)
    assert (
        "Calling model factory 'bad_input_needs_width:build' without arguments "
        "raised TypeError" in message
    )
    assert "missing 1 required positional argument: 'width'" in message
    assert "models.py" not in message
    assert ", line " not in message
    assert "default value" in message


def test_factory_type_error_keeps_location(factory_folder):
    _write_factory(
        factory_folder,
        "bad_input_inner_type",
        """
        def build():
            return len(5)
        """,
    )

    with pytest.raises(CheckpointError) as caught:
        models.load_factory("bad_input_inner_type:build")

    message = str(caught.value)
    assert "raised TypeError: object of type 'int' has no len()" in message
    assert "bad_input_inner_type.py, line 3" in message
    assert "Fix the factory" in message


def test_cli_import_strips_data_parallel_prefix(factory_folder, tmp_path, capsys):
    _write_factory(
        factory_folder,
        "bad_input_parallel",
        """
        import torch.nn as nn

        def build():
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        """,
    )
    reference = models.load_factory("bad_input_parallel:build")
    checkpoint = tmp_path / "parallel.pt"
    torch.save(nn.DataParallel(reference).state_dict(), checkpoint)
    workspace = Workspace(tmp_path / "ws")

    code = main(
        ["import", "--workspace", str(workspace.root), "--json"]
        + ["--model", "bad_input_parallel:build", "--checkpoint", str(checkpoint)]
        + IMPORT_DATA
    )

    captured = capsys.readouterr()
    assert code == 0, captured.err
    run = pipeline.load_run(workspace, json.loads(captured.out)["run_id"])
    images = run.data.test.images[:8]
    with torch.no_grad():
        assert torch.equal(run.model(images), reference(images))


def test_cli_import_names_pickled_model(factory_folder, tmp_path, capsys):
    _write_factory(
        factory_folder,
        "bad_input_pickled",
        """
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

            def forward(self, x):
                return self.body(x)

        def build():
            return Net()
        """,
    )
    checkpoint = tmp_path / "whole.pt"
    torch.save(models.load_factory("bad_input_pickled:build"), checkpoint)
    workspace = tmp_path / "ws"

    code = main(
        ["import", "--workspace", str(workspace), "--model", "bad_input_pickled:build"]
        + ["--checkpoint", str(checkpoint), *IMPORT_DATA]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(
        f"error: Checkpoint {str(checkpoint)!r} contains a whole pickled model "
        "(class 'bad_input_pickled.Net')"
    )
    assert "torch.save(model.state_dict(), path)" in err
    assert "damaged" not in err
    assert Workspace(workspace).list_runs() == []


@pytest.mark.parametrize("uploaded", [True, False])
def test_setup_import_names_module_folders(tmp_path, monkeypatch, uploaded):
    from streamlit.testing.v1 import AppTest

    checkpoint_folder = tmp_path / "checkpoints"
    checkpoint_folder.mkdir()
    checkpoint = checkpoint_folder / "model.pt"
    torch.save(nn.Linear(784, 10).state_dict(), checkpoint)
    current = tmp_path / "elsewhere"
    current.mkdir()
    monkeypatch.chdir(current)
    monkeypatch.setenv("REPAIR_WORKSPACE", str(tmp_path / "ws"))
    root = Path(__file__).resolve().parent.parent
    app = AppTest.from_file(str(root / "app_pages" / "setup.py"), default_timeout=120)
    app.run()
    app.number_input(key="setup_n_train").set_value(100)
    app.number_input(key="setup_n_test").set_value(50)
    app.text_input(key="setup_factory").set_value("bad_input_upload_absent:build")
    if uploaded:
        app.get("file_uploader")[0].upload("model.pt", checkpoint.read_bytes())
    else:
        app.text_input(key="setup_checkpoint").set_value(str(checkpoint))
    app.button(key="setup_import").click().run()

    assert not app.exception, [error.value for error in app.exception]
    assert len(app.error) == 1
    message = app.error[0].value
    assert str(current.resolve()) in message
    assert "PYTHONPATH" in message
    if uploaded:
        assert message.startswith(
            "Import failed: Module 'bad_input_upload_absent' of model factory "
            "'bad_input_upload_absent:build' was not found."
        )
        assert "An uploaded checkpoint is stored in the workspace" in message
        assert "beside the checkpoint" not in message
        assert "uploads" not in message
        assert list((tmp_path / "ws" / "uploads").glob("*")) == []
    else:
        assert f"beside the checkpoint ({str(checkpoint_folder)!r})" in message
    assert Workspace(tmp_path / "ws").list_runs() == []


# Changed data and user models ----------------------------------------------------


@pytest.fixture
def folder_run(factory_folder, tmp_path):
    """A run imported from an ImageFolder tree, with the tree's path."""
    _write_factory(
        factory_folder,
        "bad_input_folder_linear",
        """
        import torch.nn as nn

        def build():
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 2))
        """,
    )
    import bad_input_folder_linear

    data = tmp_path / "digits"
    write_digit_folder(data)
    checkpoint = tmp_path / "linear.pt"
    torch.save(bad_input_folder_linear.build().state_dict(), checkpoint)
    workspace = Workspace(tmp_path / "ws")
    config = pipeline.RunConfig(
        data="imagefolder",
        root=str(data),
        model="bad_input_folder_linear:build",
        device="cpu",
    )
    summary = pipeline.import_run(workspace, config, checkpoint)
    return workspace, summary["run_id"], data


@pytest.mark.parametrize("part", ["train", "test"])
def test_moved_image_stops_loading_the_run(folder_run, part):
    workspace, run_id, data = folder_run
    assert len(pipeline.load_run(workspace, run_id).data.train) == 12
    # Moving an image between class folders keeps the count but shifts every
    # stored index after it.
    (data / part / "a" / "5.png").rename(data / part / "b" / "9.png")

    with pytest.raises(DataError) as caught:
        pipeline.load_run(workspace, run_id)

    message = str(caught.value)
    assert f"The data of run {run_id!r}" in message
    assert f"the {part} part contains other images or labels" in message
    assert f"1 file added ({part}/b/9.png)" in message
    assert f"1 file removed ({part}/a/5.png)" in message
    assert "changed" not in message.split("stored: ")[1]
    assert "Restore the data as it was" in message


def test_moved_data_folder_names_relocate(folder_run, capsys, monkeypatch):
    workspace, run_id, data = folder_run
    stored = workspace.get_run(run_id)["config"]
    moved = data.with_name("digits-moved")
    data.rename(moved)

    with pytest.raises(DataError) as caught:
        pipeline.load_run(workspace, run_id)

    message = str(caught.value)
    assert f"Run {run_id!r} reads its imagefolder data from {str(data)!r}" in message
    assert "which is not a folder any more" in message
    assert f"relocate --workspace {workspace.root} --run {run_id}" in message
    assert "download" not in message

    # A folder of other images is refused and the stored root is kept.
    other = moved.with_name("other")
    write_digit_folder(other, per_class=7)
    assert (
        main(
            ["relocate", "--workspace", str(workspace.root)]
            + ["--run", run_id, "--root", str(other)]
        )
        == 2
    )
    error = capsys.readouterr().err
    assert f"Folder {str(other)!r} does not hold the data of run {run_id!r}" in error
    assert "the train part has 14 images, 12 when" in error
    assert f"The run still reads {str(data)!r}; nothing was changed." in error
    assert workspace.get_run(run_id)["config"] == stored

    # A relative path with '..' is stored absolute and normalised.
    relative = Path("..") / ".." / moved.name
    monkeypatch.chdir(moved / "train")
    assert (
        main(
            ["relocate", "--workspace", str(workspace.root)]
            + ["--run", run_id, "--root", str(relative), "--json"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result == {
        "run_id": run_id,
        "old_root": str(data),
        "root": str(moved),
        "other_runs": [],
    }
    assert relocate_text({**result, "other_runs": ["run-b", "run-c"]}) == (
        f"Run {run_id} now reads its data from {moved} (was {data}).\n"
        f"Runs run-b, run-c still read {data}; relocate each of them too."
    )
    assert relocate_text({**result, "other_runs": ["run-b"]}).endswith(
        f"Run run-b still reads {data}; relocate it too."
    )
    config = workspace.get_run(run_id)["config"]
    description = config["description"]
    assert str(moved) in description
    assert config == {**stored, "root": str(moved), "description": description}
    run = pipeline.load_run(workspace, run_id)
    assert len(run.data.train) == 12
    assert run.data.train.description == description


def test_train_stores_absolute_data_root(tmp_path, monkeypatch):
    data = tmp_path / "digits"
    write_digit_folder(data)
    workspace = Workspace(tmp_path / "ws")
    monkeypatch.chdir(data / "train")
    config = pipeline.RunConfig(
        data="imagefolder",
        root="../../digits/.",
        device="cpu",
        train=TrainConfig(max_epochs=1),
    )

    run_id = pipeline.train_run(workspace, config)["run_id"]

    assert workspace.get_run(run_id)["config"]["root"] == str(data)
    # The run opens from another working directory.
    monkeypatch.chdir(tmp_path / "ws")
    assert len(pipeline.load_run(workspace, run_id).data.train) == 12


def test_relocate_to_same_folder_changes_nothing(folder_run):
    workspace, run_id, data = folder_run
    stored = workspace.get_run(run_id)["config"]

    with pytest.raises(ConfigError, match="already reads its data from"):
        pipeline.relocate_run(workspace, run_id, data / "train" / "..")
    link = data.with_name("digits-link")
    link.symlink_to(data)
    with pytest.raises(ConfigError, match="nothing was changed"):
        pipeline.relocate_run(workspace, run_id, link)

    assert workspace.get_run(run_id)["config"] == stored


def test_relocate_rejects_renamed_class_folder(folder_run):
    workspace, run_id, data = folder_run
    moved = data.with_name("digits-renamed")
    shutil.copytree(data, moved)
    for part in ("train", "test"):
        (moved / part / "b").rename(moved / part / "c")

    with pytest.raises(DataError) as caught:
        pipeline.relocate_run(workspace, run_id, moved)

    assert "the class names are now 'a', 'c', not 'a', 'b'" in str(caught.value)
    assert workspace.get_run(run_id)["config"]["root"] == str(data)


def test_relocate_refuses_embedded_data_and_files(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    run_id = "run-embedded"
    workspace.add_run(run_id, "train", {"data": "mnist-embedded", "root": None}, {})
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")

    with pytest.raises(ConfigError, match="mnist-embedded data, which has no folder"):
        pipeline.relocate_run(workspace, run_id, tmp_path)
    workspace.add_run(
        "run-folder", "train", {"data": "imagefolder", "root": str(tmp_path)}, {}
    )
    with pytest.raises(DataError, match="file.txt' is not a folder"):
        pipeline.relocate_run(workspace, "run-folder", not_a_folder)


def test_edited_pixels_name_the_file(folder_run):
    from PIL import Image

    workspace, run_id, data = folder_run
    for name in ("1.png", "4.png"):
        path = data / "test" / "b" / name
        pixels = np.asarray(Image.open(path)).copy()
        pixels[0, 0] = 255 - pixels[0, 0]
        Image.fromarray(pixels).save(path)

    with pytest.raises(DataError) as caught:
        pipeline.load_run(workspace, run_id)

    message = str(caught.value)
    assert "the test part contains other images or labels" in message
    assert "2 files changed in pixels or label (test/b/1.png, test/b/4.png)" in message
    assert "added" not in message
    assert "removed" not in message


def test_colour_image_names_the_new_shape(folder_run):
    from PIL import Image

    workspace, run_id, data = folder_run
    path = data / "train" / "b" / "2.png"
    Image.open(path).convert("RGB").save(path)

    with pytest.raises(DataError) as caught:
        pipeline.load_run(workspace, run_id)

    message = str(caught.value)
    assert "the train images are now 3×28×28 (channels × height × width), not " in (
        message
    )
    assert "1×28×28" in message
    assert "files changed" not in message


def test_changed_positions_are_named_without_file_names():
    from repair_core.data import ImageDataset

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 4, 4, generator=generator)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    before = ImageDataset(images, labels, ["a", "b"], "six images")
    index = pipeline._data_index(
        pipeline.DataSplit(train=before, test=before, source="test")
    )
    edited = images.clone()
    edited[4, 0, 3, 3] += 1e-6
    relabelled = labels.clone()
    relabelled[1] = 0
    after = ImageDataset(edited, relabelled, ["a", "b"], "six images")

    changes = pipeline._part_changes("train", index, after)

    assert changes == ["2 train images changed in pixels or label, at positions 1, 4"]
    assert pipeline._part_changes("test", index, before) == []


def test_added_image_is_named_as_changed_data(folder_run):
    workspace, run_id, data = folder_run
    shutil.copy(data / "train" / "a" / "0.png", data / "train" / "a" / "new.png")

    with pytest.raises(DataError) as caught:
        pipeline.load_run(workspace, run_id)

    message = str(caught.value)
    assert "the train part has 13 images, 12 when the run was stored" in message
    assert "1 file added (train/a/new.png)" in message


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_import_rejects_non_finite_logits(factory_folder, tmp_path, bad):
    # The weights are finite; the forward pass scales the logits by NaN or inf.
    _write_factory(
        factory_folder,
        f"bad_input_nonfinite_{bad}",
        f"""
        import torch.nn as nn

        class Scale(nn.Module):
            def forward(self, x):
                return x * float("{bad}")

        def build():
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 10), Scale())
        """,
    )
    state = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).state_dict()
    checkpoint = tmp_path / "broken.pt"
    torch.save(state, checkpoint)
    workspace = Workspace(tmp_path / "ws")
    config = pipeline.RunConfig(
        model=f"bad_input_nonfinite_{bad}:build", n_train=100, n_test=50, device="cpu"
    )

    with pytest.raises(CheckpointError) as caught:
        pipeline.import_run(workspace, config, checkpoint)

    assert "NaN or infinite logits for 50 of the 50 test images" in str(caught.value)
    assert workspace.list_runs() == []
    assert list((tmp_path / "ws").rglob("*.pt")) == []


def test_import_rejects_non_finite_unused_weight(factory_folder, tmp_path):
    _write_factory(
        factory_folder,
        "bad_input_spare",
        """
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.head = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
                self.spare = nn.Linear(2, 2)

            def forward(self, x):
                return self.head(x)

        def build():
            return Net()
        """,
    )
    import bad_input_spare

    state = bad_input_spare.build().state_dict()
    state["spare.weight"][0, 0] = float("nan")
    checkpoint = tmp_path / "spare.pt"
    torch.save(state, checkpoint)
    workspace = Workspace(tmp_path / "ws")
    config = pipeline.RunConfig(
        model="bad_input_spare:build", n_train=100, n_test=50, device="cpu"
    )

    with pytest.raises(CheckpointError) as caught:
        pipeline.import_run(workspace, config, checkpoint)

    assert "NaN or infinite values in 'spare.weight'" in str(caught.value)
    assert workspace.list_runs() == []


def test_edited_factory_stops_loading_the_run(folder_run, factory_folder):
    workspace, run_id, _ = folder_run
    assert pipeline.load_run(workspace, run_id).model[1].out_features == 2
    # The same layers, but the forward pass now flips the two logits.
    _write_factory(
        factory_folder,
        "bad_input_folder_linear",
        """
        import torch.nn as nn

        class Flip(nn.Module):
            def forward(self, x):
                return x.flip(1)

        def build():
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 2), Flip())
        """,
    )
    sys.modules.pop("bad_input_folder_linear")

    with pytest.raises(CheckpointError) as caught:
        pipeline.load_run(workspace, run_id)

    message = str(caught.value)
    assert "Model factory 'bad_input_folder_linear:build' no longer rebuilds" in message
    assert "its test logits differ by up to" in message
    assert "its predicted class differs on " in message
    assert "Restore that code, or import the run again." in message


def test_factory_edit_that_keeps_predictions_is_still_caught(
    folder_run, factory_folder
):
    workspace, run_id, _ = folder_run
    # Doubling the logits keeps every predicted class but not the scores.
    _write_factory(
        factory_folder,
        "bad_input_folder_linear",
        """
        import torch.nn as nn

        class Double(nn.Module):
            def forward(self, x):
                return 2 * x

        def build():
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 2), Double())
        """,
    )
    sys.modules.pop("bad_input_folder_linear")

    with pytest.raises(CheckpointError) as caught:
        pipeline.load_run(workspace, run_id)

    message = str(caught.value)
    assert "its test logits differ by up to" in message
    assert "predicted class" not in message


@pytest.fixture
def isolated_imports(monkeypatch):
    """Restore sys.path and forget modules imported by the test afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_factories_of_same_name_in_two_folders(tmp_path, isolated_imports):
    folders = [tmp_path / "first", tmp_path / "second"]
    for folder, width in zip(folders, (3, 5), strict=True):
        folder.mkdir()
        _write_factory(
            folder,
            "bad_input_same_name",
            f"""
            import torch.nn as nn

            def build():
                return nn.Linear(4, {width})
            """,
        )
    widths = [
        models.load_factory("bad_input_same_name:build", folder).out_features
        for folder in (*folders, folders[0])
    ]

    assert widths == [3, 5, 3]


def test_factory_helpers_of_same_name_in_two_folders(tmp_path, isolated_imports):
    # Each factory imports its own helper module, and the helpers share a name.
    folders = [tmp_path / "first", tmp_path / "second"]
    for folder, width in zip(folders, (3, 5), strict=True):
        folder.mkdir()
        _write_factory(
            folder,
            "bad_input_helper",
            f"""
            import torch.nn as nn

            def head():
                return nn.Linear(4, {width})
            """,
        )
        _write_factory(
            folder,
            "bad_input_nets",
            """
            from bad_input_helper import head

            def build():
                return head()
            """,
        )
    widths = [
        models.load_factory("bad_input_nets:build", folder).out_features
        for folder in (*folders, folders[0], folders[1])
    ]

    assert widths == [3, 5, 3, 5]


def test_factory_folder_leaves_no_shadowing_module(tmp_path, isolated_imports):
    # A module beside the checkpoint that shares a package's name must not
    # replace that package for imports after the model is built.
    folder = tmp_path / "checkpoint_folder"
    folder.mkdir()
    _write_factory(
        folder,
        "bad_input_folder_net",
        """
        import torch.nn as nn

        def build():
            return nn.Linear(4, 2)
        """,
    )
    _write_factory(folder, "bad_input_shadowed", "SOURCE = 'checkpoint folder'\n")
    path_before = list(sys.path)

    models.load_factory("bad_input_folder_net:build", folder)

    assert sys.path == path_before
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("bad_input_shadowed")


def test_moved_factory_folder_is_named(tmp_path, isolated_imports):
    folder = tmp_path / "model_dir"
    folder.mkdir()
    _write_factory(
        folder,
        "bad_input_moved_net",
        """
        import torch.nn as nn

        def build():
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        """,
    )
    checkpoint = folder / "net.pt"
    torch.save(
        models.load_factory("bad_input_moved_net:build", folder).state_dict(),
        checkpoint,
    )
    workspace = Workspace(tmp_path / "ws")
    config = pipeline.RunConfig(
        model="bad_input_moved_net:build", n_train=100, n_test=50, device="cpu"
    )
    run_id = pipeline.import_run(workspace, config, checkpoint)["run_id"]
    folder.rename(tmp_path / "moved")
    sys.modules.pop("bad_input_moved_net")

    with pytest.raises(CheckpointError) as caught:
        pipeline.load_run(workspace, run_id)
    message = str(caught.value)
    assert message.startswith("Cannot import module 'bad_input_moved_net'")
    assert f"The run was imported from {str(folder)!r}" in message
    assert "that folder no longer exists" in message


# Causes files that are not regular files --------------------------------------


@pytest.fixture
def special_files(tmp_path):
    """A named pipe and a character device, keyed by the kind the error names."""
    fifo = tmp_path / "causes.fifo"
    os.mkfifo(fifo)
    return {"named pipe": fifo, "character device": Path(os.devnull)}


@pytest.mark.parametrize("kind", ["named pipe", "character device"])
def test_causes_file_not_regular(special_files, kind):
    path = special_files[kind]

    with pytest.raises(ConfigError) as caught:
        read_causes_file(path, 100)

    assert str(caught.value) == (
        f"Causes file {str(path)!r} is a {kind}, not a regular file. Pass a text "
        "file with one training index per line, or a CSV file with a "
        "'train_index' column."
    )


def test_causes_file_symlink_loop(tmp_path):
    path = tmp_path / "causes.txt"
    path.symlink_to(path)

    with pytest.raises(ConfigError) as caught:
        read_causes_file(path, 100)

    assert str(caught.value) == (
        f"Causes file {str(path)!r} could not be read (Too many levels of "
        "symbolic links). Check the path and the permissions of its folders."
    )


@pytest.mark.parametrize("kind", ["named pipe", "character device"])
def test_cli_causes_file_not_regular(workspace_copy, special_files, capsys, kind):
    root, run_id, _ = workspace_copy
    workspace = Workspace(root)
    path = special_files[kind]
    failure_sets_before = workspace.list_failure_sets(run_id)
    files_before = _tree_digests(root / "runs")

    code = main(
        ["repair", "--workspace", str(root), "--run", run_id, "--device", "cpu"]
        + ["--treatment", "finetune", "--causes-file", str(path)]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert f"error: Causes file {str(path)!r} is a {kind}, not a regular" in err
    assert "not found" not in err
    assert "Traceback" not in err
    assert workspace.list_repairs(run_id) == []
    assert workspace.list_failure_sets(run_id) == failure_sets_before
    assert _tree_digests(root / "runs") == files_before


@pytest.mark.parametrize("command", ["repair", "sweep"])
def test_cli_causes_file_rejects_standard_input(workspace_copy, command):
    root, run_id, _ = workspace_copy
    files_before = _tree_digests(root / "runs")

    # A command that read standard input would take these indices.
    result = subprocess.run(
        [sys.executable, "-m", "repair_core", command, "--workspace", str(root)]
        + ["--run", run_id, "--treatment", "newton", "--causes-file", "-"],
        input="0\n1\n",
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=120,
    )

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        "error: --causes-file - would read the causes from standard input, which "
        "is not supported"
    )
    assert "Save the training indices in a file" in result.stderr
    assert Workspace(root).list_repairs(run_id) == []
    assert Workspace(root).list_sweeps(run_id) == []
    assert _tree_digests(root / "runs") == files_before


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: EWCInfluenceConfig(l2=float("nan")),
            "'l2' of EWCInfluenceConfig is nan",
        ),
        (
            lambda: EWCInfluenceConfig(fisher_weight=math.inf),
            "'fisher_weight' of EWCInfluenceConfig is inf",
        ),
        (
            lambda: TracInConfig(learning_rate=math.inf),
            "'learning_rate' of TracInConfig is inf",
        ),
        (
            lambda: EWCDeletionConfig(max_steps="20"),
            "'max_steps' of EWCDeletionConfig is '20', not an integer",
        ),
        (lambda: RandomConfig(seed=-1), "seed -1 is outside"),
        (lambda: TrainConfig(lr=True), "'lr' of TrainConfig is True, not a number"),
        (lambda: TrainConfig(batch_size=2.5), "'batch_size' of TrainConfig is 2.5"),
        (lambda: TrainConfig(max_epochs=None), "'max_epochs' of TrainConfig is None"),
        (lambda: TrainConfig(betas=(0.9,)), r"Adam betas \(0.9,\) must be two numbers"),
        (lambda: TrainConfig(betas=(2, 0.999)), r"Adam betas \(2, 0.999\)"),
    ],
)
def test_config_names_wrong_value_when_built(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_config_stores_int_for_float_setting_as_float():
    config = EWCDeletionConfig(gamma=1)

    assert config.gamma == 1.0 and isinstance(config.gamma, float)
    assert TrainConfig(betas=[0.8, 0.99]).betas == (0.8, 0.99)


def test_config_takes_numpy_numbers_as_plain_numbers():
    config = TrainConfig(max_epochs=np.int64(5), lr=np.float32(0.5), seed=np.int64(2))

    assert (config.max_epochs, config.lr, config.seed) == (5, 0.5, 2)
    assert type(config.max_epochs) is int
    assert type(config.lr) is float
    assert type(config.seed) is int
    with pytest.raises(ConfigError, match="'lr' of TrainConfig is np.True_"):
        TrainConfig(lr=np.bool_(True))


def test_missing_relative_files_say_where_they_were_sought(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(
        ConfigError,
        match=re.escape(f"'good.txt' (looked up as {tmp_path / 'good.txt'}) not"),
    ):
        read_causes_file("good.txt", 10)
    with pytest.raises(ConfigError, match="The causes file path is empty"):
        read_causes_file("", 10)
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"'model.pt' (looked up as {tmp_path / 'model.pt'}) not"),
    ):
        models.read_state_dict("model.pt")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"data_seed": -1}, "data_seed -1 is outside"),
        ({"data_seed": 1.5}, "'data_seed' of RunConfig is 1.5, not an integer"),
        ({"query_fraction": True}, "'query_fraction' of RunConfig is True"),
        ({"download": "yes"}, "'download' of RunConfig is 'yes', not true or false"),
    ],
)
def test_run_config_names_wrong_value_when_built(values, message):
    with pytest.raises(ConfigError, match=message):
        pipeline.RunConfig(**values)


def test_run_config_builds_training_settings_from_dict():
    config = pipeline.RunConfig(seed=3, train={"lr": 0.01})

    assert config.train == TrainConfig(lr=0.01, seed=3)
