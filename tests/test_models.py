"""Model shapes, user factories and checkpoint validation."""

import argparse
import importlib
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from repair_core import models
from repair_core.errors import CheckpointError, ConfigError


@pytest.mark.parametrize(
    ("name", "channels", "size", "features"),
    [("mnist-cnn", 1, 28, 64), ("small-resnet", 3, 32, 64), ("resnet50", 3, 32, 2048)],
)
def test_builtin_model_shapes(name, channels, size, features):
    torch.manual_seed(0)
    model = models.build_model(name, in_channels=channels, num_classes=10)
    images = torch.rand(2, channels, size, size)

    model.eval()
    logits = model(images)
    embedding = models.embed(model, images)

    assert logits.shape == (2, 10)
    assert embedding.shape == (2, features)


def test_mnist_cnn_layers():
    model = models.build_model("mnist-cnn", in_channels=1, num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]

    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert len(pools) == 2
    assert isinstance(model.classifier, nn.Linear)


def test_mean_subtraction_is_applied():
    model = models.build_model("mnist-cnn", in_channels=1, num_classes=10, mean=[0.5])
    image = torch.full((1, 1, 28, 28), 0.5)

    assert torch.equal(model.preprocess(image), torch.zeros_like(image))
    assert "preprocess.input_mean" in model.state_dict()


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="Unknown model 'vgg'"):
        models.build_model("vgg", in_channels=1, num_classes=10)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    source = textwrap.dedent(
        """
        import torch.nn as nn

        def build():
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(),
                                 nn.Linear(32, 10))

        def build_wide():
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(),
                                 nn.Linear(64, 10))

        def build_five():
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))

        def not_a_model():
            return 42
        """
    )
    (tmp_path / "user_nets.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_user_factory_loads_checkpoint(user_module):
    model = models.load_factory("user_nets:build")
    reference = models.load_factory("user_nets:build")
    path = user_module / "model.pt"
    torch.save(reference.state_dict(), path)

    models.load_checked_state(model, models.read_state_dict(path))

    images = torch.rand(3, 1, 28, 28)
    assert torch.equal(model(images), reference(images))


def test_checkpoint_shape_mismatch_names_layer(user_module):
    path = user_module / "wide.pt"
    torch.save(models.load_factory("user_nets:build_wide").state_dict(), path)
    model = models.load_factory("user_nets:build")

    with pytest.raises(
        CheckpointError, match=r"Layer '1.weight' has shape \(64, 784\)"
    ):
        models.load_checked_state(model, models.read_state_dict(path))


def test_output_size_mismatch_names_layer(user_module):
    model = models.load_factory("user_nets:build_five")

    with pytest.raises(CheckpointError, match=r"outputs shape \(1, 5\).*layer '1'"):
        models.check_output_size(model, torch.rand(1, 1, 28, 28), num_classes=10)


class _ReturnsExtra(nn.Module):
    """A model whose forward returns the logits together with another value."""

    def __init__(self, extra) -> None:
        super().__init__()
        self.linear = nn.Linear(784, 10)
        self.extra = extra

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        if self.extra == "dict":
            return {"logits": logits}
        return logits, self.extra


@pytest.mark.parametrize(
    ("extra", "returned"), [(0, "tuple (Tensor, int)"), ("dict", "dict")]
)
def test_output_not_a_tensor(extra, returned):
    model = _ReturnsExtra(extra)

    with pytest.raises(CheckpointError) as caught:
        models.check_output_size(model, torch.rand(1, 1, 28, 28), num_classes=10)

    message = str(caught.value)
    assert f"The model returned {returned}" in message
    assert "not a logits tensor of shape (batch, 10)" in message
    assert "return only the logits" in message


@pytest.mark.parametrize(
    ("last", "shape"),
    [(nn.Unflatten(1, (1, 10)), (1, 1, 10)), (nn.Flatten(0), (10,))],
)
def test_output_not_2d_names_shape(last, shape):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), last)

    with pytest.raises(CheckpointError) as caught:
        models.check_output_size(model, torch.rand(1, 1, 28, 28), num_classes=10)

    message = str(caught.value)
    assert f"The model outputs shape {shape}" in message
    assert "2-D" in message
    assert "(batch, 10)" in message
    assert "Give the last layer" not in message


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("user_nets", "Invalid model factory 'user_nets'"),
        ("missing_module_xyz:build", "Cannot import module 'missing_module_xyz'"),
        ("user_nets:nothing", "has no callable named 'nothing'"),
        ("user_nets:not_a_model", "returned int, not a torch.nn.Module"),
    ],
)
def test_bad_factory_messages(user_module, spec, message):
    with pytest.raises(CheckpointError, match=message):
        models.load_factory(spec)


def test_corrupt_checkpoint_message(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")

    with pytest.raises(
        CheckpointError, match="is not a readable state-dict file"
    ) as caught:
        models.read_state_dict(path)
    assert "weights_only" not in str(caught.value)
    assert "torch.load raised _pickle.UnpicklingError" in str(caught.value)


def test_pickled_model_checkpoint_is_named(tmp_path, monkeypatch):
    # Importing the module writes a marker file, which shows whether reading
    # the checkpoint ran any of its code.
    marker = tmp_path / "imported"
    (tmp_path / "user_pickled_nets.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path

            import torch.nn as nn

            Path({str(marker)!r}).touch()

            class Net(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("user_pickled_nets")
    path = tmp_path / "whole.pt"
    torch.save(module.Net(), path)
    monkeypatch.delitem(sys.modules, "user_pickled_nets")
    marker.unlink()

    with pytest.raises(CheckpointError) as caught:
        models.read_state_dict(path)

    message = str(caught.value)
    assert message.startswith(
        f"Checkpoint {str(path)!r} contains a whole pickled model (class "
        "'user_pickled_nets.Net')"
    )
    assert "torch.save(model.state_dict(), path)" in message
    assert "damaged" not in message
    assert not marker.exists()


def test_checkpoint_with_other_objects_is_named(tmp_path):
    path = tmp_path / "training.pt"
    state = nn.Linear(3, 2).state_dict()
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, path)

    with pytest.raises(CheckpointError) as caught:
        models.read_state_dict(path)

    message = str(caught.value)
    assert "contains objects other than tensors ('argparse.Namespace')" in message
    assert "damaged" not in message


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_training_checkpoint_weights_are_found(tmp_path, key):
    state = nn.Linear(3, 2).state_dict()
    path = tmp_path / "training.pt"
    optimizer = torch.optim.Adam(nn.Linear(3, 2).parameters())
    torch.save(
        {"epoch": 4, key: state, "optimizer_state_dict": optimizer.state_dict()}, path
    )

    read = models.read_state_dict(path)

    assert list(read) == ["weight", "bias"]
    assert torch.equal(read["weight"], state["weight"])


def test_checkpoint_without_weights_lists_its_keys(tmp_path):
    path = tmp_path / "training.pt"
    torch.save({"epoch": 4, "weights": {"w": [1.0]}, "loss": torch.tensor(0.5)}, path)

    with pytest.raises(CheckpointError) as caught:
        models.read_state_dict(path)

    message = str(caught.value)
    assert "is a dict with keys 'epoch', 'weights', 'loss', not a state dict" in message
    assert "torch.save(checkpoint[KEY], path)" in message


def test_nested_weights_with_other_entries_are_named(tmp_path):
    path = tmp_path / "training.pt"
    state = {**nn.Linear(3, 2).state_dict(), "step": 5}
    torch.save({"model": state, "epoch": 4}, path)

    with pytest.raises(CheckpointError) as caught:
        models.read_state_dict(path)

    assert "contains tensors under 'model', but also 'step', which are not" in str(
        caught.value
    )


@pytest.mark.parametrize(
    ("value", "kind"),
    [({}, "contains an empty dict"), ([torch.zeros(2)], "contains a list")],
)
def test_checkpoint_of_other_shape_is_named(tmp_path, value, kind):
    path = tmp_path / "odd.pt"
    torch.save(value, path)

    with pytest.raises(CheckpointError, match=kind):
        models.read_state_dict(path)


def test_data_parallel_prefix_is_removed(user_module, caplog):
    reference = models.load_factory("user_nets:build")
    path = user_module / "parallel.pt"
    torch.save(nn.DataParallel(reference).state_dict(), path)
    model = models.load_factory("user_nets:build")
    state = models.read_state_dict(path)
    assert all(key.startswith("module.") for key in state)

    with caplog.at_level(logging.INFO, logger="repair_core.models"):
        models.load_checked_state(model, state)

    images = torch.rand(3, 1, 28, 28)
    assert torch.equal(model(images), reference(images))
    assert any("'module.'" in record.getMessage() for record in caplog.records)


def test_wrapper_attribute_prefix_is_removed(user_module):
    # A Lightning module that stores the network as self.net saves "net.0.weight".
    reference = models.load_factory("user_nets:build")
    state = {f"net.{key}": value for key, value in reference.state_dict().items()}
    model = models.load_factory("user_nets:build")

    models.load_checked_state(model, state)

    images = torch.rand(3, 1, 28, 28)
    assert torch.equal(model(images), reference(images))


def test_wrapper_prefix_named_when_keys_differ(user_module):
    other = models.load_factory("user_nets:build_five")
    state = {f"net.{key}": value for key, value in other.state_dict().items()}
    model = models.load_factory("user_nets:build")

    with pytest.raises(CheckpointError) as caught:
        models.load_checked_state(model, state)

    assert "Every key of the checkpoint starts with 'net.', and without" in str(
        caught.value
    )


def test_data_parallel_prefix_named_when_keys_differ(user_module):
    other = models.load_factory("user_nets:build_five")
    state = {f"module.{key}": value for key, value in other.state_dict().items()}
    model = models.load_factory("user_nets:build")

    with pytest.raises(CheckpointError) as caught:
        models.load_checked_state(model, state)

    message = str(caught.value)
    assert message.startswith(
        "The checkpoint lacks layer '3.weight' (and 1 more) that the model has."
    )
    assert "Every key of the checkpoint starts with 'module.'" in message


def test_missing_layer_message_counts_others(user_module):
    model = models.load_factory("user_nets:build")
    state = model.state_dict()
    del state["3.bias"]

    with pytest.raises(CheckpointError) as caught:
        models.load_checked_state(model, state)
    assert str(caught.value).startswith(
        "The checkpoint lacks layer '3.bias' that the model has. Use"
    )

    del state["3.weight"]
    with pytest.raises(CheckpointError) as caught:
        models.load_checked_state(model, state)
    assert "lacks layer '3.weight' (and 1 more) that" in str(caught.value)


def test_missing_checkpoint_message(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        models.read_state_dict(tmp_path / "absent.pt")


def test_checkpoint_name_too_long(tmp_path):
    path = tmp_path / ("a" * 300 + ".pt")

    with pytest.raises(CheckpointError) as caught:
        models.read_state_dict(path)

    message = str(caught.value)
    assert message.startswith(f"Checkpoint {str(path)!r} is too long for the file")
    assert "Check the path." in message


def test_checkpoint_nul_character(tmp_path):
    path = f"{tmp_path}/model\0.pt"

    with pytest.raises(CheckpointError) as caught:
        models.read_state_dict(path)

    assert str(caught.value) == (
        f"Checkpoint {path!r} contains a NUL character, which no file name can "
        "contain. Check the path."
    )


@pytest.mark.parametrize(
    ("folder_name", "message"),
    [("a" * 300, "is too long for the file system"), ("b\0c", "a NUL character")],
)
def test_factory_folder_unusable_name(tmp_path, folder_name, message):
    folder = f"{tmp_path}/{folder_name}"

    with pytest.raises(CheckpointError) as caught:
        models.load_factory("json:dumps", folder)

    assert str(caught.value).startswith(f"Model factory folder {folder!r}")
    assert message in str(caught.value)


def test_unreadable_checkpoint_message(tmp_path):
    path = tmp_path / "locked.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    path.chmod(0o000)
    # Root reads any file unless the capability to override permissions is
    # dropped, so the read runs in a child process without it.
    prefix = (
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]
        if os.geteuid() == 0
        else []
    )
    script = (
        "from repair_core import models\n"
        "from repair_core.errors import CheckpointError\n"
        "try:\n"
        f"    models.read_state_dict({str(path)!r})\n"
        "except CheckpointError as error:\n"
        "    print(error)\n"
    )
    try:
        result = subprocess.run(
            [*prefix, sys.executable, "-c", script],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
    finally:
        path.chmod(0o644)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"Checkpoint {str(path)!r} could not be read (Permission denied). Check "
        "that the file is readable."
    )
