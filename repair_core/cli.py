"""Command-line interface: ``python -m repair_core COMMAND [options]``.

Every command reads and writes the same workspace format as the dashboard.
With ``--json`` a command prints exactly one JSON object on standard output;
progress and logs go to standard error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from repair_core.errors import RepairError
from repair_core.workspace import DEFAULT_WORKSPACE, Workspace

logger = logging.getLogger("repair_core.cli")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults and keeps the line breaks of the description."""

    def _fill_text(self, text, width, indent):
        return "".join(indent + line for line in text.splitlines(keepends=True))


def _add_workspace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workspace",
        default=DEFAULT_WORKSPACE,
        help="workspace folder holding the database and files",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout"
    )
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
        type=int,
        default=None,
        help="use a seeded class-balanced subset of this many training images "
        "(default: all)",
    )
    group.add_argument(
        "--n-test",
        type=int,
        default=None,
        help="use a seeded class-balanced subset of this many test images "
        "(default: all)",
    )
    group.add_argument(
        "--data-seed", type=int, default=0, help="seed of the train/test split"
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
        type=float,
        default=None,
        help="input-noise and fgsm: share of each target class corrupted (default 0.3)",
    )
    group.add_argument(
        "--noise-amount",
        type=float,
        default=None,
        help="input-noise: share of pixels set to 0 or 1 (greyscale) or the "
        "standard deviation of Gaussian noise in [0, 1] pixel units (colour)",
    )
    group.add_argument(
        "--epsilon",
        type=float,
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
    parser.add_argument("--seed", type=int, default=0, help="seed of noise and model")
    parser.add_argument(
        "--query-fraction",
        type=float,
        default=0.5,
        help="share of the failures used as the query set F_q (the rest is the "
        "holdout set F_h)",
    )


def _build_parser() -> argparse.ArgumentParser:
    from repair_core.models import MODEL_CHOICES

    parser = argparse.ArgumentParser(
        prog="python -m repair_core",
        description="Find the training examples behind a classifier's failures "
        "and repair the model.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages"
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
        "--epochs", type=int, default=100, help="maximum number of epochs"
    )
    group.add_argument(
        "--patience",
        type=int,
        default=5,
        help="epochs without a lower validation loss before stopping",
    )
    group.add_argument(
        "--batch-size", type=int, default=64, help="examples per Adam step"
    )
    group.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    group.add_argument(
        "--val-fraction",
        type=float,
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
        "--checkpoint", required=True, help="state-dict file saved by torch.save"
    )

    runs = commands.add_parser(
        "runs", help="list the runs of a workspace", formatter_class=_HelpFormatter
    )
    _add_workspace(runs)
    return parser


def _scenario_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if args.flip_matrix is not None:
        params["matrix_file"] = str(Path(args.flip_matrix).expanduser().resolve())
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
    return params


def _run_config(args: argparse.Namespace, **train_values: Any):
    from repair_core.pipeline import RunConfig
    from repair_core.training import TrainConfig

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
    summary = train_run(Workspace(args.workspace), config, progress=_print_epoch)
    summary.pop("history", None)
    return summary


def _command_import(args: argparse.Namespace) -> dict[str, Any]:
    from repair_core.pipeline import import_run

    config = _run_config(args)
    return import_run(Workspace(args.workspace), config, args.checkpoint)


def _command_runs(args: argparse.Namespace) -> dict[str, Any]:
    workspace = Workspace(args.workspace)
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


_COMMANDS = {
    "train": _command_train,
    "import": _command_import,
    "runs": _command_runs,
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


def _print_summary(result: dict[str, Any]) -> None:
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, list | dict):
            value = json.dumps(_finite(value))
        print(f"{key:>16}: {value}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code (0 success, 2 bad input)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        result = _COMMANDS[args.command](args)
    except (RepairError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(_finite(result)))
    else:
        _print_summary(result)
    return 0
