"""The command line: train, import and list runs, with JSON output and errors."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from repair_core.cli import main

TINY = ["--n-train", "200", "--n-test", "100", "--epochs", "2", "--device", "cpu"]
RUN_KEYS = {
    "run_id",
    "n_train",
    "n_test",
    "test_accuracy",
    "n_failures",
    "n_query",
    "n_holdout",
    "n_corrupted",
    "seconds",
}


def _run_json(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_train_prints_run_summary(tmp_path, capsys):
    workspace = tmp_path / "ws"

    summary = _run_json(
        capsys,
        ["train", "--workspace", str(workspace), "--scenario", "label-flip", "--json"]
        + TINY,
    )

    assert RUN_KEYS <= set(summary)
    assert summary["n_train"] == 200
    assert summary["n_test"] == 100
    assert summary["n_query"] + summary["n_holdout"] == summary["n_failures"]
    assert summary["n_corrupted"] > 0
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert (workspace / "runs" / summary["run_id"] / "model.pt").is_file()


def test_runs_lists_stored_run_after_restart(tmp_path, capsys):
    workspace = str(tmp_path / "ws")
    summary = _run_json(capsys, ["train", "--workspace", workspace, "--json"] + TINY)

    listing = _run_json(capsys, ["runs", "--workspace", workspace, "--json"])

    assert [run["run_id"] for run in listing["runs"]] == [summary["run_id"]]
    assert listing["runs"][0]["test_accuracy"] == summary["test_accuracy"]


def test_flip_matrix_file_rejects_bad_row(tmp_path, capsys):
    rows = [[1.0 if i == j else 0.0 for j in range(10)] for i in range(10)]
    rows[3][4] = 0.5
    matrix = tmp_path / "flips.csv"
    matrix.write_text("\n".join(",".join(str(v) for v in row) for row in rows))
    workspace = tmp_path / "ws"

    code = main(
        [
            "train",
            "--workspace",
            str(workspace),
            "--scenario",
            "label-flip",
            "--flip-matrix",
            str(matrix),
        ]
        + TINY
    )

    assert code == 2
    assert "row 3" in capsys.readouterr().err
    assert not (workspace / "runs").exists()


def test_unknown_run_is_clear_error(tmp_path, capsys):
    code = main(["runs", "--workspace", str(tmp_path), "--json"])
    assert code == 0
    capsys.readouterr()

    with pytest.raises(SystemExit):
        main(["train", "--data", "no-such-source"])
    assert "invalid choice: 'no-such-source'" in capsys.readouterr().err


@pytest.fixture
def user_model(tmp_path):
    (tmp_path / "deployed_net.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            def build():
                return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import deployed_net

        torch.manual_seed(0)
        model = deployed_net.build()
        checkpoint = tmp_path / "deployed.pt"
        torch.save(model.state_dict(), checkpoint)
        yield checkpoint
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("deployed_net", None)


def test_import_registers_user_model(tmp_path, capsys, user_model):
    workspace = str(tmp_path / "ws")

    summary = _run_json(
        capsys,
        [
            "import",
            "--workspace",
            workspace,
            "--model",
            "deployed_net:build",
            "--checkpoint",
            str(user_model),
            "--n-train",
            "200",
            "--n-test",
            "100",
            "--json",
        ],
    )

    assert RUN_KEYS <= set(summary)
    assert summary["n_failures"] > 0
    assert summary["n_corrupted"] is None
    listing = _run_json(capsys, ["runs", "--workspace", workspace, "--json"])
    assert listing["runs"][0]["kind"] == "import"


def test_import_rejects_wrong_output_size(tmp_path, capsys, user_model):
    small = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 3))
    bad = tmp_path / "bad.pt"
    torch.save(small.state_dict(), bad)

    code = main(
        [
            "import",
            "--workspace",
            str(tmp_path / "ws"),
            "--model",
            "deployed_net:build",
            "--checkpoint",
            str(bad),
            "--n-train",
            "200",
            "--n-test",
            "100",
        ]
    )

    assert code == 2
    assert "Layer '1.weight' has shape (3, 784)" in capsys.readouterr().err


def test_help_documents_options_with_defaults():
    result = subprocess.run(
        [sys.executable, "-m", "repair_core", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )

    for option in (
        "--workspace",
        "--scenario",
        "--epochs",
        "--patience",
        "--lr",
        "--batch-size",
        "--query-fraction",
        "--record-trajectory",
    ):
        assert option in result.stdout
    assert "(default: 100)" in result.stdout
    assert "(default: workspace)" in result.stdout
