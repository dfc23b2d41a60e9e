"""The benchmark: how well cause identification and repair work on MNIST.

``run_benchmark`` runs the experiments unit by unit, saving each finished
step to ``<out>/results.json``, and renders the page ``<out>/../BENCHMARKS.md``
with PNG plots in ``out`` after every unit. ``render_page`` rebuilds the page
from the results file alone, so a run that was stopped can still be reported.

1. Label flips on the embedded MNIST split: detection by every method and
   removal curves (top k removed, then fine-tuning on D\\C).
2. Salt-and-pepper input noise: detection and removal of the top k.
3. FGSM poisoning: the same.
4. Treatment trade-off: EWC-deletion and Newton removal sweeps beside
   fine-tuning and random removal.
5. Cost: wall time and peak memory of every method and treatment.
6. Experiment 1 on full MNIST (3000 training images, the 10,000 test images).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from repair_core.benchmark.experiments import (
    BenchContext,
    complete_detection,
    planned_units,
    run_unit,
)
from repair_core.benchmark.report import (
    check_page_is_ours,
    page_path,
    prepare_out_folder,
    render_page,
)
from repair_core.benchmark.settings import (
    EXPERIMENTS,
    BenchSettings,
    full_settings,
    quick_settings,
)
from repair_core.benchmark.store import RESULTS_NAME, ResultsStore, machine_info
from repair_core.devices import select_device
from repair_core.workspace import Workspace

__all__ = [
    "EXPERIMENTS",
    "BenchSettings",
    "default_workspace",
    "full_settings",
    "page_path",
    "quick_settings",
    "render_page",
    "run_benchmark",
]

logger = logging.getLogger(__name__)


def default_workspace(mode: str) -> Path:
    """Return the workspace used when none is given, one per mode."""
    return Path(tempfile.gettempdir()) / "repair_core_bench" / mode


def run_benchmark(
    settings: BenchSettings,
    out: str | Path,
    *,
    workspace: str | Path | None = None,
    device: str = "auto",
    command: str = "",
    fresh: bool = False,
) -> Path:
    """Run the benchmark's planned units and render the page after each one.

    Units already done in ``out/results.json`` with the same settings are
    skipped, and a unit that stopped part-way resumes from its last saved
    step when ``workspace`` still holds its base model.

    Args:
        settings: what to run.
        out: folder of the plots and results.json; the page is written one
            level above it.
        workspace: where base models and scores are stored; a folder under
            the system temporary folder when None.
        device: auto, cpu, cuda or mps.
        command: the command line, recorded on the page.
        fresh: discard an existing results file instead of resuming it.

    Returns:
        The path of the rendered page.

    Raises:
        FileExistsError: a file that the benchmark did not render is at the
            page's path.
        ConfigError: ``out`` is not a writable folder, or its results file
            contains other settings and ``fresh`` is not set.
        DataError: the results file is unreadable or not a results file, and
            ``fresh`` is not set.
    """
    out = Path(out)
    # Before any work, rather than at the first render after an hour's run.
    check_page_is_ours(out)
    prepare_out_folder(out)
    chosen = str(select_device(device))
    store = ResultsStore(
        out / RESULTS_NAME,
        settings=settings.to_dict(),
        command=command,
        machine=machine_info(chosen),
        resume=not fresh,
    )
    context = BenchContext(
        settings=settings,
        store=store,
        workspace=Workspace(workspace or default_workspace(settings.mode)),
        device=chosen,
    )
    complete_detection(context)
    for experiment, data_key, seed in planned_units(settings):
        key = f"exp{experiment}/{data_key}/seed{seed}"
        if store.units.get(key, {}).get("status") == "done":
            logger.info("%s is done already", key)
            continue
        if data_key == "mnist" and not mnist_available(settings.mnist_root):
            reason = (
                "no --mnist-root given"
                if settings.mnist_root is None
                else f"no MNIST/raw folder under {settings.mnist_root}"
            )
            logger.warning("Skipping %s: %s", key, reason)
            store.data.setdefault("skipped", {})[key] = reason
            store.save()
            continue
        logger.info("Starting %s", key)
        try:
            run_unit(context, experiment, data_key, seed)
        except Exception as error:  # noqa: BLE001
            # One failed unit must not cost the units after it; the error is
            # logged with its traceback, stored and shown on the page.
            logger.exception("%s failed", key)
            store.unit(key).fail(error)
        render_page(out)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    store.data["finished"] = True
    store.save()
    return render_page(out)


def mnist_available(root: str | Path | None) -> bool:
    """Return whether ``root`` contains MNIST/raw in torchvision's layout."""
    if root is None:
        return False
    return (Path(root) / "MNIST" / "raw").is_dir()
