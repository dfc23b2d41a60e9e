"""The README's Python example runs as printed."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
JSON_DOC = README.parent / "docs" / "JSON.md"


def undocumented(record: dict) -> list[str]:
    """Return the keys of ``record`` that docs/JSON.md does not name in code
    quotes."""
    named = set(re.findall(r"`([a-z_0-9]+)`", JSON_DOC.read_text()))
    return [key for key in record if key not in named]


@pytest.mark.slow
def test_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)

    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)

    gain = float(capsys.readouterr().out.strip().splitlines()[-1])
    repair = namespace["repair"]
    assert gain == pytest.approx(repair["gain_over_nothing"]["mean"]["holdout_acc"])
    assert repair["n_removed"] == 60
    assert isinstance(namespace["repaired"], torch.nn.Module)
    stored = namespace["workspace"].get_repair(repair["repair_id"])
    assert stored["metrics"]["after"] == repair["after"]
    assert (tmp_path / "workspace" / "repair.sqlite").is_file()
    # The stored records read back as they were returned.
    assert namespace["stored"]["after"] == repair["after"]
    rankings = [record["id"] for record in namespace["rankings"]]
    assert rankings == [namespace["scores"]["scores_id"]]
    assert namespace["ranking"].shape == (600,)
    assert namespace["ranking"].dtype == torch.float64

    # The records that the CLI prints with --json are documented field by field.
    scores = namespace["scores"]
    assert undocumented(scores) == []
    assert undocumented(scores["detection"]) == []
    assert undocumented(repair) == []
    assert undocumented(repair["per_seed"]["treatment"][0]) == []
    assert undocumented(repair["gain_over_nothing"]) == []
