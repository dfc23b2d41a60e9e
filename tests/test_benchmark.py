"""The benchmark harness: a tiny quick run writes a complete, finite page."""

import dataclasses
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from repair_core.benchmark import quick_settings, render_page, run_benchmark
from repair_core.benchmark.bars import QualityBars
from repair_core.benchmark.experiments import (
    BenchContext,
    complete_detection,
    planned_units,
)
from repair_core.benchmark.report import removed_counts
from repair_core.benchmark.settings import BenchSettings
from repair_core.benchmark.store import ResultsStore
from repair_core.benchmark.summary import Results, paired_difference
from repair_core.cli import main
from repair_core.errors import ConfigError, DataError
from repair_core.workspace import Workspace
from tests.factories import make_idx_files
from tests.test_cli import _without_root_override

PLOTS = (
    "detection_label_flip.png",
    "removal_curve_label_flip.png",
    "tradeoff.png",
    "cost.png",
)
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d+|\d+|nan|inf)(?![\w.])", re.I)


def tiny_settings(tmp_path):
    """Quick mode, shrunk further so the whole run takes about a minute."""
    return quick_settings(
        n_train=100,
        n_test=100,
        max_epochs=1,
        ks=(10, 20),
        noise_k=20,
        ewc_gammas=(0.03,),
        newton_gammas=(1.0,),
        method_overrides={"ewc-influence": {"max_steps": 6, "min_steps": 3}},
        treatment_overrides={
            "ewc-deletion": {"max_steps": 6, "patience": 3},
            "newton": {"depth": 5},
        },
        mnist_root=str(tmp_path / "no-mnist-here"),
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bench")
    out = tmp_path / "docs" / "benchmarks"
    page = run_benchmark(
        tiny_settings(tmp_path),
        out,
        workspace=tmp_path / "ws",
        device="cpu",
        command="python -m repair_core bench --quick",
    )
    return out, page


def table_cells(text):
    """Yield every cell of every Markdown table row except the separator rows."""
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= {"|", "-"}:
            continue
        yield from (cell.strip() for cell in line.strip("|").split("|"))


def test_quick_run_writes_page_above_out(quick_run):
    out, page = quick_run

    assert page == out.parent / "BENCHMARKS.md"
    assert page.is_file()
    assert (out / "results.json").is_file()
    # The bar names the seed count the run planned, with the noun agreeing.
    seeds = json.loads((out / "results.json").read_text())["settings"]["seeds"]
    assert len(seeds) == 1
    assert "top 20% (mean of 1 seed)" in page.read_text()


def test_quick_run_writes_plots(quick_run):
    out, page = quick_run
    text = page.read_text()

    for name in PLOTS:
        assert (out / name).is_file(), name
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"benchmarks/{name}" in text, name


def test_quick_run_tables_hold_only_finite_numbers(quick_run):
    _, page = quick_run
    cells = list(table_cells(page.read_text()))

    numbers = [m for cell in cells for m in NUMBER.findall(cell)]
    assert numbers
    for number in numbers:
        assert math.isfinite(float(number)), number
    assert not any("nan" in cell.lower() for cell in cells)


def test_quick_run_finishes_every_planned_unit(quick_run):
    out, _ = quick_run
    data = json.loads((out / "results.json").read_text())
    settings = BenchSettings.from_dict(data["settings"])

    for experiment, data_key, seed in planned_units(settings):
        key = f"exp{experiment}/{data_key}/seed{seed}"
        if data_key == "mnist":
            assert key in data["skipped"]
            continue
        assert data["units"][key]["status"] == "done", key
    assert data["finished"] is True


def test_quick_run_page_reports_sections(quick_run):
    _, page = quick_run
    text = page.read_text()

    for heading in (
        "## Quality bars",
        "## 1. Label flips",
        "## 2. Random input noise",
        "## 3. FGSM poisoning",
        "## 4. Treatment trade-off",
        "## 5. Cost",
        "## 6. The published setup",
    ):
        assert heading in text, heading
    assert "python -m repair_core bench --quick" in text
    # The tiny settings train on 100 images for 1 epoch.
    assert (
        "**Quick mode**: the models train on 100 images for at most 1 epoch(s)"
    ) in text
    assert "Not measured: no MNIST/raw folder" in text
    assert "Tanno et al. 2022" in text
    assert "embedded MNIST, the failures: " in text


def test_quick_run_records_detection_of_every_method(quick_run):
    out, _ = quick_run
    data = json.loads((out / "results.json").read_text())
    steps = data["units"]["run/label-flip/embedded/seed0"]["steps"]

    for method in quick_settings().methods:
        record = steps[f"identify/{method}"]
        assert "error" not in record, record.get("error")
        assert 0.0 <= record["detection"]["found_at_20pct"] <= 1.0
        assert "n_implicated" in record["detection"], method
        assert record["seconds"] >= 0.0
    assert steps["identify/oracle"]["detection"]["found_at_10pct"] > 0.5


def test_render_only_rebuilds_page(quick_run, capsys):
    out, page = quick_run
    before = page.read_text()
    page.unlink()

    code = main(["bench", "--out", str(out), "--render-only", "--json"])

    assert code == 0, capsys.readouterr().err
    assert page.read_text() == before


def test_rerun_skips_finished_units(quick_run, tmp_path):
    out, _ = quick_run
    data = json.loads((out / "results.json").read_text())
    settings = BenchSettings.from_dict(data["settings"])
    updated = data["units"]["exp1/embedded/seed0"]["finished"]

    run_benchmark(settings, out, workspace=tmp_path / "unused", device="cpu")

    again = json.loads((out / "results.json").read_text())
    assert again["units"]["exp1/embedded/seed0"]["finished"] == updated
    assert len(again["invocations"]) == len(data["invocations"]) + 1


def test_complete_detection_from_stored_scores(quick_run):
    out, _ = quick_run
    store = ResultsStore(out / "results.json")
    steps = store.units["run/label-flip/embedded/seed0"]["steps"]
    expected = {
        name: dict(step["detection"])
        for name, step in steps.items()
        if "detection" in step
    }
    for name in expected:
        steps[name]["detection"].pop("n_implicated")
        steps[name]["detection"].pop("implicated_found_at_20pct")
    settings = BenchSettings.from_dict(store.data["settings"])
    context = BenchContext(
        settings=settings,
        store=store,
        workspace=Workspace(out.parent.parent / "ws"),
    )

    complete_detection(context)

    assert expected
    for name, detection in expected.items():
        assert steps[name]["detection"] == detection, name


def test_results_of_other_settings_are_rejected(tmp_path):
    path = tmp_path / "results.json"
    ResultsStore(path, settings=quick_settings().to_dict(), command="first")

    with pytest.raises(ConfigError, match="other settings"):
        ResultsStore(path, settings=quick_settings(n_train=100).to_dict())


def test_experiment_subset_resumes_results(tmp_path):
    path = tmp_path / "results.json"
    store = ResultsStore(path, settings=quick_settings(experiments=(1, 2)).to_dict())
    store.unit("exp1/embedded/seed0").finish()

    again = ResultsStore(path, settings=quick_settings(experiments=(6,)).to_dict())

    assert again.units["exp1/embedded/seed0"]["status"] == "done"
    assert again.data["settings"]["experiments"] == [1, 2, 6]
    assert len(again.data["invocations"]) == 2


def test_render_without_results_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        render_page(tmp_path / "benchmarks")


def test_unknown_experiment_is_rejected():
    with pytest.raises(ConfigError, match="Unknown experiment 7"):
        quick_settings(experiments=(1, 7))


def test_plan_order_of_units():
    settings = quick_settings(seeds=(0, 1))

    plan = planned_units(settings)

    assert plan == [
        (1, "embedded", 0),
        (4, "embedded", 0),
        (2, "embedded", 0),
        (3, "embedded", 0),
        (1, "embedded", 1),
        (6, "mnist", 0),
        (6, "mnist", 1),
        (4, "embedded", 1),
        (2, "embedded", 1),
        (3, "embedded", 1),
        (4, "mnist", 0),
        (4, "mnist", 1),
    ]


def test_plan_skips_mnist_tradeoff_without_6():
    plan = planned_units(quick_settings(experiments=(1, 4)))

    assert (4, "mnist", 0) not in plan
    assert (4, "embedded", 0) in plan


def test_full_mnist_units_run_on_idx_files(tmp_path):
    make_idx_files(tmp_path / "datasets", "MNIST", n_train=200, n_test=100)
    settings = dataclasses.replace(
        tiny_settings(tmp_path),
        experiments=(4, 6),
        mnist_root=str(tmp_path / "datasets"),
        mnist_n_train=100,
        mnist_n_test=60,
    )
    out = tmp_path / "docs" / "benchmarks"

    page = run_benchmark(settings, out, workspace=tmp_path / "ws", device="cpu")

    data = json.loads((out / "results.json").read_text())
    assert data["units"]["exp6/mnist/seed0"]["status"] == "done"
    assert data["units"]["exp4/mnist/seed0"]["status"] == "done"
    points = data["units"]["exp4/mnist/seed0"]["steps"]["sweep/newton"]["points"]
    assert [p["strength"] for p in points] == [1.0]
    text = page.read_text()
    assert "### Treatment trade-off on full MNIST" in text
    assert "benchmarks/tradeoff_full_mnist.png" in text
    assert (out / "tradeoff_full_mnist.png").is_file()
    numbers = [m for cell in table_cells(text) for m in NUMBER.findall(cell)]
    for number in numbers:
        assert math.isfinite(float(number)), number


def test_removed_counts_shows_range():
    assert removed_counts([{"n_removed": 384}, {"n_removed": 384}]) == "384"
    assert removed_counts([{"n_removed": 432}, {"n_removed": 384}]) == "384–432"
    assert removed_counts([{}]) == "?"


def removal_results(holdout):
    """A results file whose experiment 1 contains top-10 removal runs.

    ``holdout`` maps a method to {(base seed, fine-tuning seed): F_h accuracy}.
    """
    units = {}
    for base_seed, _ in holdout["ewc-influence"]:
        units.setdefault(
            f"exp1/embedded/seed{base_seed}",
            {"status": "done", "seed": base_seed, "steps": {}},
        )
    for method, runs in holdout.items():
        for (base_seed, finetune_seed), value in runs.items():
            steps = units[f"exp1/embedded/seed{base_seed}"]["steps"]
            point = steps.setdefault(
                f"curve/{method}/k10", [{"k": 10, "per_seed": []}]
            )[0]
            point["per_seed"].append(
                {"seed": finetune_seed, "holdout_acc": value, "remaining_acc": 0.97}
            )
    return Results({"settings": {}, "units": units})


def test_paired_difference_pairs_by_seed():
    results = removal_results(
        {
            "ewc-influence": {(0, 0): 0.5, (0, 1): 0.3, (1, 0): 0.6},
            "random": {(0, 1): 0.4, (0, 0): 0.2, (1, 0): 0.9, (1, 1): 0.1},
        }
    )
    mine = results.curve_runs_by_seed(1, "embedded", "ewc-influence", 10)
    theirs = results.curve_runs_by_seed(1, "embedded", "random", 10)

    difference = paired_difference(mine, theirs, "holdout_acc")

    # Pairs (0, 0), (0, 1) and (1, 0); the random run (1, 1) has no partner.
    expected = np.array([0.5 - 0.2, 0.3 - 0.4, 0.6 - 0.9])
    assert difference.n == 3
    assert difference.mean == pytest.approx(expected.mean())
    assert difference.std == pytest.approx(expected.std(ddof=1))
    assert difference.standard_error == pytest.approx(
        expected.std(ddof=1) / math.sqrt(3)
    )


def test_removal_bar_reports_paired_difference(tmp_path):
    results = removal_results(
        {
            "ewc-influence": {(0, 0): 0.5, (0, 1): 0.3, (1, 0): 0.6, (1, 1): 0.2},
            "random": {(0, 0): 0.4, (0, 1): 0.4, (1, 0): 0.7, (1, 1): 0.3},
            "training-loss": {(0, 0): 0.1, (0, 1): 0.2, (1, 0): 0.3, (1, 1): 0.1},
        }
    )
    page = QualityBars(results, tmp_path / "benchmarks")

    page.removal_bars()

    bars = {name: (measured, verdict) for name, measured, verdict in page.bars}
    random_bar = bars[
        "EWC-influence top-k removal beats random removal on F_h at every k"
    ]
    differences = np.array([0.1, -0.1, -0.1, -0.1])
    error = differences.std(ddof=1) / 2
    assert random_bar[1] == "fail so far, incomplete"
    assert random_bar[0] == (
        "ties or loses at k=10: 0.400 vs 0.450 (paired difference -0.050, "
        f"standard error {error:.3f} over 4 pairs)"
    )
    loss_bar = bars[
        "EWC-influence top-k removal beats highest training loss removed on F_h "
        "at every k"
    ]
    assert loss_bar[1] == "pass so far, incomplete"
    assert loss_bar[0].endswith(
        "narrowest at k=10 (paired difference +0.225, standard error 0.075 over "
        "4 pairs)"
    )


# Experiment 6 without --mnist-root skips its units, so a run that passed the
# checks would reach its first write at once instead of after minutes.
RUN_ARGUMENTS = ["--quick", "--experiments", "6", "--device", "cpu"]


def folder_listing(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.mark.parametrize("render_only", [False, True])
@pytest.mark.parametrize(
    "content, problem",
    [
        ("{bad json", "is not valid JSON"),
        ("", "is empty"),
        ("  \n", "is empty"),
        ("[1, 2]", "contains a JSON array, but it must contain an object"),
        ('"text"', "contains a JSON string, but it must contain an object"),
        ("{}", "has no 'settings' entry, so the benchmark did not write it"),
        ('{"units": {}}', "has no 'settings' entry"),
        ('{"settings": null}', "is invalid: its 'settings' entry is null"),
        ('{"settings": {}}', "is invalid: it lacks the setting 'mode'"),
    ],
)
def test_bench_rejects_corrupt_results(tmp_path, capsys, content, problem, render_only):
    out = tmp_path / "docs" / "benchmarks"
    out.mkdir(parents=True)
    results = out / "results.json"
    results.write_text(content)
    workspace = tmp_path / "ws"
    # --render-only refuses a workspace, since it runs nothing.
    argv = (
        ["--render-only"]
        if render_only
        else [*RUN_ARGUMENTS, "--workspace", str(workspace)]
    )

    code = main(["bench", "--out", str(out), *argv])

    err = capsys.readouterr().err
    assert code == 2
    assert f"The results file {str(results)!r} {problem}" in err
    assert "--fresh" in err
    assert "another --out folder" in err
    assert "Traceback" not in err
    assert results.read_text() == content
    assert folder_listing(tmp_path / "docs") == [
        "benchmarks",
        "benchmarks/results.json",
    ]
    assert not workspace.exists()


@pytest.mark.parametrize(
    "content, entry",
    [
        ('{"settings": 3}', "its 'settings' entry is a JSON number"),
        ('{"units": [1]}', "its 'units' entry is a JSON array"),
        ('{"invocations": {}}', "its 'invocations' entry is a JSON object"),
        ('{"units": {"exp1/embedded/seed0": null}}', "unit 'exp1/embedded/seed0'"),
    ],
)
def test_results_entry_of_wrong_type_is_rejected(tmp_path, content, entry):
    path = tmp_path / "results.json"
    path.write_text(content)

    with pytest.raises(DataError, match=re.escape(entry)):
        ResultsStore(path, settings=quick_settings().to_dict())
    with pytest.raises(DataError, match=re.escape(entry)):
        render_page(tmp_path)
    assert path.read_text() == content


@pytest.mark.parametrize(
    ("name", "value"),
    [("seeds", 1), ("seeds", "abc"), ("mode", None), ("tradeoff_fraction", True)],
)
def test_results_setting_of_wrong_type_is_rejected(tmp_path, name, value):
    path = tmp_path / "results.json"
    ResultsStore(path, settings=quick_settings().to_dict())
    data = json.loads(path.read_text())
    data["settings"][name] = value
    path.write_text(json.dumps(data))
    content = path.read_text()

    with pytest.raises(DataError, match=re.escape(f"its setting {name!r} is")):
        render_page(tmp_path)
    assert path.read_text() == content


def test_fresh_replaces_corrupt_results(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{bad json")

    store = ResultsStore(path, settings=quick_settings().to_dict(), resume=False)

    assert store.units == {}
    assert json.loads(path.read_text())["settings"] == store.data["settings"]


@pytest.mark.parametrize("below_file", [True, False])
def test_bench_rejects_out_that_is_a_file(tmp_path, capsys, below_file):
    file = tmp_path / "notes.txt"
    file.write_text("notes\n")
    out = file / "benchmarks" if below_file else file
    workspace = tmp_path / "ws"

    code = main(
        ["bench", "--out", str(out), *RUN_ARGUMENTS, "--workspace", str(workspace)]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert f"--out {str(out)!r} must be a folder" in err
    assert "Traceback" not in err
    assert file.read_text() == "notes\n"
    assert not workspace.exists()


@pytest.mark.parametrize(
    "read_only, render_only, message",
    [
        ("docs/benchmarks", False, "Folder {out!r} is not writable"),
        ("docs", False, "Folder {page_folder!r} is not writable"),
        ("docs", True, "Folder {page_folder!r} is not writable"),
        ("", False, "Cannot create the --out folder {out!r}"),
    ],
)
def test_bench_rejects_read_only_out_before_work(
    tmp_path, read_only, render_only, message
):
    page_folder = tmp_path / "docs"
    out = page_folder / "benchmarks"
    if read_only:
        out.mkdir(parents=True)
    if render_only:
        ResultsStore(out / "results.json", settings=quick_settings().to_dict())
    locked = tmp_path / read_only if read_only else tmp_path
    before = folder_listing(tmp_path)
    workspace = tmp_path / "ws"
    # --render-only refuses a workspace, since it runs nothing.
    argv = (
        ["--render-only"]
        if render_only
        else [*RUN_ARGUMENTS, "--workspace", str(workspace)]
    )
    locked.chmod(0o555)
    try:
        result = subprocess.run(
            [*_without_root_override(), sys.executable, "-m", "repair_core", "bench"]
            + ["--out", str(out), *argv],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        locked.chmod(0o755)

    expected = message.format(out=str(out), page_folder=str(page_folder))
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "writable" in result.stderr
    assert "another --out folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert folder_listing(tmp_path) == before
