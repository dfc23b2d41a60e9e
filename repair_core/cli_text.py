"""Plain-text views of the command line's results, for reading in a terminal.

``--json`` prints every field of a result. Without it, each command prints
what a user reads first. A repair is one table of accuracies per arm, with
the gain over the nothing-removed control. A sweep or removal curve is one
row per point, and any other result is one ``name: value`` line per field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

# Accuracy fields of a model, with the short names the tables use.
ACCURACY_COLUMNS = (
    ("query_acc", "F_q"),
    ("holdout_acc", "F_h"),
    ("remaining_acc", "T\\F"),
    ("test_acc", "test"),
)


def _more_or_fewer(difference: float) -> str:
    """Return a count difference as "3 more", "6.5 fewer" or "as many": whole
    for one seed, and to one decimal for a mean over seeds."""
    if round(difference, 1) == 0:
        return "as many"
    size = abs(difference)
    text = f"{size:.0f}" if round(size, 1) == round(size) else f"{size:.1f}"
    return f"{text} {'more' if difference > 0 else 'fewer'}"


def _counted(difference: float, noun: str) -> str:
    """Return :func:`_more_or_fewer` with ``noun``, singular for a difference
    of exactly one."""
    plural = "" if abs(difference) == 1 else "s"
    return f"{_more_or_fewer(difference)} {noun}{plural}"


def number(value: Any, signed: bool = False) -> str:
    """Format one value for a table cell; missing and non-finite values read '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        sign = "+" if signed else ""
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:{sign}.3f}"
        return f"{value:{sign}.3g}"
    if isinstance(value, list | tuple):
        return ", ".join(number(item) for item in value) or "-"
    return str(value)


_NUMERIC = re.compile(r"^[+-]?[\d.]+(e[+-]?\d+)?( ± [\d.]+(e[+-]?\d+)?)?$|^-$")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Align rows of cells under a header: numbers right, text left."""
    widths = [
        max(len(str(row[column])) for row in [header, *rows])
        for column in range(len(header))
    ]
    numeric = [
        all(_NUMERIC.match(str(row[column])) for row in rows)
        for column in range(len(header))
    ]
    lines = []
    for row in [header, *rows]:
        cells = [
            str(cell).rjust(width) if right else str(cell).ljust(width)
            for cell, width, right in zip(row, widths, numeric, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _cell(column: str, value: Any) -> str:
    if column == "created_at" and isinstance(value, str):
        # An ISO time to the second reads as "2026-12-05 06:30:14".
        return value[:19].replace("T", " ")
    return number(value)


def _mean_std(mean: dict[str, Any], std: dict[str, Any] | None, key: str) -> str:
    text = number(mean.get(key))
    if std is not None and std.get(key) is not None and text != "-":
        text += f" ± {number(std[key])}"
    return text


def repair_text(summary: dict[str, Any]) -> str:
    """Describe one repair: what was removed, a table of arms, and the gain."""
    seeds = summary.get("seeds") or []
    several = len(seeds) > 1
    lines = [
        f"repair {summary['repair_id']}: {summary['treatment']} on run "
        f"{summary['run_id']}, failure set {summary['failure_set_id']}",
        f"causes: {summary.get('causes') or '-'} ({summary['n_removed']} removed); "
        f"{'seeds' if several else 'seed'} {number(seeds)}; "
        f"{summary.get('seconds', math.nan):.1f} s",
        "",
    ]
    keys = [key for key, _ in ACCURACY_COLUMNS]
    header = ["", *(name for _, name in ACCURACY_COLUMNS)]
    rows = [["before", *(number(summary["before"].get(key)) for key in keys)]]
    # One seed has no spread to show.
    spread = summary.get("spread") if several else None
    rows.append(["treatment", *(_mean_std(summary["after"], spread, k) for k in keys)])
    for arm, values in (summary.get("controls") or {}).items():
        label = {"nothing": "nothing removed", "random": "random removed"}.get(arm, arm)
        std = values.get("std") if several else None
        rows.append([label, *(_mean_std(values["mean"], std, k) for k in keys)])
    gain = summary.get("gain_over_nothing")
    if gain:
        rows.append(
            [
                "gain over nothing",
                *(number(gain["mean"].get(k), signed=True) for k in keys),
            ]
        )
    lines.append(table(header, rows))

    lines.append("")
    legend = (
        "F_q: query failures, F_h: holdout failures, T\\F: the rest of the test set."
    )
    if several:
        legend += f" Means over {len(seeds)} seeds ± their standard deviation."
    lines.append(legend)
    if summary.get("training"):
        from repair_core.treatments import training_text

        lines.append(training_text(summary["training"]))
    if summary.get("controls_note"):
        lines.append(f"No controls: {summary['controls_note']}")
    lines.extend(summary.get("notes") or [])
    gain_mean = gain["mean"] if gain else {}
    fixed = gain_mean.get("holdout_fixed")
    broken = gain_mean.get("remaining_broken")
    holdout = summary["before"].get("holdout_acc")
    has_holdout = isinstance(holdout, float) and math.isfinite(holdout)
    if fixed is not None and broken is not None:
        fixed_text = (
            f"{_counted(fixed, 'holdout failure')} fixed, " if has_holdout else ""
        )
        lines.append(
            f"Against the nothing-removed control: {fixed_text}"
            f"{_counted(broken, 'remaining example')} broken"
            + (" (means over seeds)." if several else ".")
        )
    first = (summary.get("per_seed") or {}).get("treatment") or [{}]
    model_file = first[0].get("model_file")
    if model_file and model_file not in summary.get("missing_model_files", ()):
        lines.append(
            f"Repaired model: runs/{summary['run_id']}/{model_file} in the "
            "workspace; --json lists every seed and arm."
        )
    return "\n".join(lines)


#: Missing model files named one by one before the rest are counted.
MISSING_FILES_SHOWN = 3


def missing_files_text(result: dict[str, Any]) -> str:
    """Name the model files of a stored result that are no longer on disk."""
    missing = result.get("missing_model_files") or []
    if not missing:
        return ""
    names = ", ".join(
        f"runs/{result['run_id']}/{name}" for name in missing[:MISSING_FILES_SHOWN]
    )
    more = len(missing) - MISSING_FILES_SHOWN
    if more > 0:
        names += f" and {more} more"
    return (
        f"Missing: {len(missing)} model file(s) of this record were moved or "
        f"deleted from the workspace ({names}). The figures above stand, but "
        "these models cannot be loaded."
    )


def points_text(
    title: str,
    first_column: str,
    key: str,
    points: list[dict[str, Any]],
    spread: bool = True,
    extra: Sequence[tuple[str, str]] = (),
) -> str:
    """Tabulate a sweep or removal curve, one row of accuracies per point.

    A point with ``mean`` and ``std`` shows "mean ± std" unless ``spread`` is
    False, as for a single seed. ``extra`` adds a column per (key, heading)
    before the seconds.
    """
    keys = [k for k, _ in ACCURACY_COLUMNS]
    header = [
        first_column,
        *(name for _, name in ACCURACY_COLUMNS),
        *(heading for _, heading in extra),
        "seconds",
    ]
    rows = []
    for point in points:
        mean = point.get("mean", point)
        std = point.get("std") if spread else None
        rows.append(
            [
                f"{point[key]:g}",
                *(_mean_std(mean, std, k) for k in keys),
                *(number(point.get(k)) for k, _ in extra),
                number(mean.get("seconds")),
            ]
        )
    return f"{title}\n\n{table(header, rows)}"


#: Early-stopping fields of sweep points: (kept, run, name of the unit).
KEPT_FIELDS = (
    ("best_epoch", "epochs_run", "epoch"),
    ("best_step", "steps_run", "step"),
)


def sweep_text(summary: dict[str, Any]) -> str:
    """Tabulate a sweep, one row per value of the swept setting."""
    from repair_core.evaluation import SWEEPABLE, unchanged_sweep_note

    field = SWEEPABLE.get(summary["treatment"], "strength")
    title = (
        f"sweep {summary['sweep_id']}: {summary['treatment']} on run "
        f"{summary['run_id']}, failure set {summary['failure_set_id']}\n"
        f"causes: {summary.get('causes') or '-'} ({summary['n_removed']} removed)"
    )
    from repair_core.treatments.ewc_deletion import STOP_LABELS, STOP_REASONS

    points = [
        {**point, "stopped_by": STOP_LABELS.get(point["stopped_by"])}
        if "stopped_by" in point
        else point
        for point in summary["points"]
    ]
    # Strengths whose runs kept the same epoch or step give the same model.
    extra = next(
        (
            [(best, f"kept {unit}"), (run, f"{unit}s run")]
            for best, run, unit in KEPT_FIELDS
            if any(best in point for point in points)
        ),
        [],
    )
    reasons = [
        point["stopped_by"] for point in summary["points"] if "stopped_by" in point
    ]
    if reasons:
        extra.append(("stopped_by", "stopped by"))
    text = points_text(title, field, "strength", points, extra=extra)
    for reason in dict.fromkeys(reasons):
        text += f"\nstopped by {STOP_LABELS[reason]}: {STOP_REASONS[reason]}."
    note = unchanged_sweep_note(summary["treatment"], summary["points"])
    return f"{text}\n{note}" if note else text


def curve_text(summary: dict[str, Any]) -> str:
    """Tabulate a removal curve, one row per k, under its changed settings."""
    seeds = summary.get("seeds") or []
    several = len(seeds) > 1
    title = (
        f"removal curve {summary['removal_curve_id']}: top k of "
        f"{summary['scores_id']} removed, then fine-tuned, on run "
        f"{summary['run_id']}\n"
        + (
            f"seeds {number(seeds)}; means ± standard deviation over seeds"
            if several
            else f"seed {number(seeds)}"
        )
    )
    from repair_core.identification.base import changed_settings
    from repair_core.treatments import default_config

    changed = changed_settings(
        summary.get("config") or {}, default_config("finetune").to_dict()
    )
    if changed:
        pairs = ", ".join(f"{name}={value}" for name, value in changed)
        title += f"\nfine-tuning settings: {pairs}"
    points = summary["curve"]
    text = points_text(title, "k", "k", points, spread=several)
    if summary.get("skipped_ks"):
        text += (
            f"\nSkipped k {number(summary['skipped_ks'])}: "
            "too few examples would remain."
        )
    return text


def runs_text(result: dict[str, Any]) -> str:
    """Tabulate the runs of a workspace, or the stored records of one run."""
    if "runs" in result:
        if not result["runs"]:
            return f"No runs in {result['workspace']} yet."
        columns = {
            "run_id": "run",
            "created_at": "created_at",
            "data": "data",
            "scenario": "scenario",
            "model": "model",
            "test_accuracy": "test_accuracy",
            "n_failures": "failures",
        }
        rows = [[_cell(key, run.get(key)) for key in columns] for run in result["runs"]]
        return (
            f"workspace {result['workspace']}\n\n{table(list(columns.values()), rows)}"
        )
    sections = [f"run {result['run_id']} in {result['workspace']}"]
    for name, records in result.items():
        if not isinstance(records, list):
            continue
        title = name.replace("_", " ")
        if not records:
            sections.append(f"{title}: none")
            continue
        sections.append(f"{title}:\n{_records_table(records)}")
    return "\n\n".join(sections)


def _records_table(records: list[dict[str, Any]]) -> str:
    """Tabulate records with a column per key that any of them has."""
    header = list(dict.fromkeys(key for record in records for key in record))
    rows = [[_cell(key, record.get(key)) for key in header] for record in records]
    return table(header, rows)


def _flat_record(value: Any) -> bool:
    return isinstance(value, dict) and not any(
        isinstance(v, dict | list) for v in value.values()
    )


def _matrix(value: Any) -> bool:
    """Return whether ``value`` is a list of equally long lists of numbers."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(row, list) and row for row in value)
        and len({len(row) for row in value}) == 1
        and all(isinstance(v, int | float) for row in value for v in row)
    )


def _fields(result: dict[str, Any], prefix: str = "") -> list[tuple[str, str, bool]]:
    """Flatten ``result`` into (name, text, is_table) entries, nested names dotted."""
    entries = []
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            entries.extend(_fields(value, prefix=f"{name}."))
        elif isinstance(value, list) and value and all(map(_flat_record, value)):
            entries.append((name, _records_table(value), True))
        elif _matrix(value):
            header = ["", *(str(column) for column in range(len(value[0])))]
            rows = [[str(i), *map(number, row)] for i, row in enumerate(value)]
            entries.append((name, table(header, rows), True))
        elif isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
            entries.append((name, json.dumps(value), False))
        else:
            entries.append((name, number(value), False))
    return entries


def generic_text(result: dict[str, Any]) -> str:
    """Format one ``name: value`` line per field.

    Nested fields get dotted names, and a list of flat records becomes a table
    under its name. Names are right-aligned so that the values line up.
    """
    entries = _fields(result)
    width = max((len(name) for name, _, is_table in entries if not is_table), default=0)
    lines = [
        f"{name}:\n{text}" if is_table else f"{name:>{width}}: {text}"
        for name, text, is_table in entries
    ]
    return "\n".join(lines)


def result_text(command: str, result: dict[str, Any]) -> str:
    """Return the text view of one command's result."""
    # A stored record printed by show has the same id key as its command's result.
    for key, render in (
        ("repair_id", repair_text),
        ("sweep_id", sweep_text),
        ("removal_curve_id", curve_text),
    ):
        if key in result:
            missing = missing_files_text(result)
            return render(result) + (f"\n{missing}" if missing else "")
    if command == "runs":
        return runs_text(result)
    if command == "relocate":
        return relocate_text(result)
    if "missing_scores_file" in result:
        fields = {k: v for k, v in result.items() if k != "missing_scores_file"}
        return generic_text(fields) + (
            f"\nMissing: the scores file runs/{result['run_id']}/"
            f"{result['missing_scores_file']} was moved or deleted from the "
            "workspace. The figures above stand, but the ranking cannot be used. "
            f"Run identify --method {result['method']} again to rank the training "
            "examples anew."
        )
    return generic_text(result)


def relocate_text(result: dict[str, Any]) -> str:
    """Say where a relocated run now reads its data, and which runs still
    read the old folder."""
    text = (
        f"Run {result['run_id']} now reads its data from {result['root']} "
        f"(was {result['old_root']})."
    )
    others = result["other_runs"]
    if len(others) == 1:
        text += f"\nRun {others[0]} still reads {result['old_root']}; relocate it too."
    elif others:
        text += (
            f"\nRuns {', '.join(others)} still read {result['old_root']}; "
            "relocate each of them too."
        )
    return text
