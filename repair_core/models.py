"""Model builders, user model factories and checkpoint validation.

Built-in models take images in [0, 1] and subtract the per-channel training
mean themselves (a buffer named ``input_mean``), so every caller feeds the same
tensors and a saved checkpoint carries its own preprocessing.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import pickletools
import sys
import traceback
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from repair_core.data import check_path_name
from repair_core.errors import CheckpointError, ConfigError, looked_up_as

logger = logging.getLogger(__name__)

MODEL_CHOICES = ("mnist-cnn", "small-resnet", "resnet50")
#: File endings that the folder hint of :func:`read_state_dict` lists.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


class MeanSubtraction(nn.Module):
    """Subtracts a fixed per-channel mean, stored as a buffer in the state dict."""

    def __init__(self, channels: int, mean: Sequence[float] | None = None) -> None:
        super().__init__()
        values = torch.zeros(channels) if mean is None else torch.as_tensor(mean)
        self.register_buffer("input_mean", values.float().view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.input_mean


class MnistCNN(nn.Module):
    """Four 3x3 conv layers (32, 32, 64, 64 channels) with ReLU, 2x2 max-pool
    after the first two, global average pooling and one linear layer."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, mean=None) -> None:
        super().__init__()
        self.preprocess = MeanSubtraction(in_channels, mean)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64, num_classes)
        # He initialisation suits the ReLU stack without normalisation layers:
        # with PyTorch's default uniform initialisation the network stopped
        # early at 0.925 test accuracy on the embedded MNIST data (seed 0),
        # with He initialisation at 0.963.
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Return the penultimate features, shape (N, 64)."""
        return self.features(self.preprocess(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-8 for 32x32 colour images: three stages of one basic block with
    16, 32 and 64 channels, about 78k parameters, so it trains on a CPU."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, mean=None) -> None:
        super().__init__()
        self.preprocess = MeanSubtraction(in_channels, mean)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.stages = nn.Sequential(
            BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2)
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(64, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(self.preprocess(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class ResNet50(nn.Module):
    """torchvision's ResNet-50 with random initial weights and mean subtraction."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, mean=None) -> None:
        super().__init__()
        from torchvision.models import resnet50

        self.preprocess = MeanSubtraction(in_channels, mean)
        self.net = resnet50(weights=None, num_classes=num_classes)
        if in_channels != 3:
            self.net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = self.preprocess(x)
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return torch.flatten(net.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.fc(self.embed(x))


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mnist-cnn": MnistCNN,
    "small-resnet": SmallResNet,
    "resnet50": ResNet50,
}


def build_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    mean: Sequence[float] | None = None,
) -> nn.Module:
    """Build a built-in model with fresh weights.

    Args:
        name: one of ``MODEL_CHOICES``.
        in_channels: image channels (1 for MNIST, 3 for CIFAR-10).
        num_classes: size of the output layer.
        mean: per-channel training mean subtracted from every input.
    """
    if name not in _BUILDERS:
        raise ConfigError(
            f"Unknown model {name!r}. Use one of {', '.join(MODEL_CHOICES)}, or a "
            "user model given as 'module:callable'."
        )
    return _BUILDERS[name](in_channels=in_channels, num_classes=num_classes, mean=mean)


class FactoryModuleNotFoundError(CheckpointError):
    """The module of a ``module:callable`` model factory was not found in any
    folder that :func:`load_factory` searches."""

    def __init__(self, message: str, *, module_name: str, spec: str) -> None:
        super().__init__(message)
        self.module_name = module_name
        self.spec = spec


def load_factory(spec: str, search_path: str | Path | None = None) -> nn.Module:
    """Build a user model from ``module:callable``.

    Args:
        spec: for example ``my_models:build_net``. The callable takes no
            arguments and returns an ``nn.Module``.
        search_path: a folder searched for the module, so a module next to
            the checkpoint can be found. The current working directory is
            always searched.

    Both folders are on ``sys.path`` only while the module is imported and the
    callable runs. Left there, a module in the checkpoint's folder would hide
    a package of the same name from every later import in the process.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise CheckpointError(
            f"Invalid model factory {spec!r}. Write it as 'module:callable', for "
            "example 'my_models:build_net'."
        )
    if search_path is not None:
        check_path_name(search_path, "Model factory folder", CheckpointError)
    saved_path = list(sys.path)
    for folder in (search_path, Path.cwd()):
        if folder is not None and str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    try:
        return _build_from_factory(spec, module_name, attribute, search_path)
    finally:
        sys.path[:] = saved_path


def _build_from_factory(
    spec: str, module_name: str, attribute: str, search_path: str | Path | None
) -> nn.Module:
    try:
        module = _import_module(module_name, search_path)
    except ImportError as error:
        if not _is_missing(error, module_name):
            # The module was found, and an import inside it failed.
            raise CheckpointError(
                f"Importing module {module_name!r} of model factory {spec!r} "
                f"raised {_describe_user_error(error)}. Install the package it "
                "imports, or fix the import in the module."
            ) from error
        raise FactoryModuleNotFoundError(
            f"Cannot import module {module_name!r} from model factory {spec!r}: "
            f"{error}. {_module_places(search_path)}",
            module_name=module_name,
            spec=spec,
        ) from error
    except Exception as error:  # any error in the user's module-level code
        raise CheckpointError(
            f"Importing module {module_name!r} of model factory {spec!r} raised "
            f"{_describe_user_error(error)}. Fix the module so that it imports "
            "without errors."
        ) from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise CheckpointError(
            f"Module {module_name!r} has no callable named {attribute!r}. Check the "
            f"name after the colon in {spec!r}."
        )
    try:
        model = factory()
    except Exception as error:  # any error in the user's callable
        if isinstance(error, TypeError) and not _user_frames(error):
            # With no frame outside this module the call itself failed, usually
            # because the callable has parameters without default values.
            raise CheckpointError(
                f"Calling model factory {spec!r} without arguments raised "
                f"{_describe_user_error(error)}. Give each of its parameters a "
                "default value, or name a callable that takes no arguments and "
                "returns the model."
            ) from error
        raise CheckpointError(
            f"Model factory {spec!r} raised {_describe_user_error(error)}. Fix the "
            "factory so that, called without arguments, it returns the model."
        ) from error
    if not isinstance(model, nn.Module):
        raise CheckpointError(
            f"Model factory {spec!r} returned {type(model).__name__}, not a "
            "torch.nn.Module. Return the model instance from the callable."
        )
    return model


def _is_missing(error: ImportError, module_name: str) -> bool:
    """Return whether ``error`` is the failure to find ``module_name`` or a
    package above it, rather than a module that it imports."""
    missing = getattr(error, "name", None)
    if not isinstance(error, ModuleNotFoundError) or missing is None:
        return False
    return module_name == missing or module_name.startswith(f"{missing}.")


def _module_places(search_path: str | Path | None) -> str:
    """Return a sentence naming every folder that :func:`load_factory` searches."""
    places = [f"in the current folder ({str(Path.cwd())!r})"]
    if search_path is not None:
        places.append(f"beside the checkpoint ({str(search_path)!r})")
    places.append("or in a folder on PYTHONPATH")
    return f"Put the module {', '.join(places)}."


#: Folders that model factories were imported from, resolved.
_FACTORY_FOLDERS: set[Path] = set()


def _import_module(name: str, folder: str | Path | None) -> ModuleType:
    """Import ``name``, taking ``folder``'s own modules when modules of the same
    names from another factory folder are already loaded.

    Two runs may each have a ``models.py`` next to their checkpoint, and each
    may import a helper such as ``layers.py``. Python caches modules by name,
    so without this the second run would silently get the first run's classes.
    """
    if folder is None:
        return importlib.import_module(name)
    folder = Path(folder).resolve()
    _FACTORY_FOLDERS.add(folder)
    top = name.partition(".")[0]
    cached = sys.modules.get(top)
    if cached is not None and (_inside(cached, folder) or not _provides(folder, top)):
        return importlib.import_module(name)
    others = {
        key: module
        for key, module in sys.modules.items()
        if any(_inside(module, other) for other in _FACTORY_FOLDERS - {folder})
        or (cached is not None and (key == top or key.startswith(f"{top}.")))
    }
    if not others:
        return importlib.import_module(name)
    for key in others:
        del sys.modules[key]
    if str(folder) in sys.path:
        sys.path.remove(str(folder))
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name)
    finally:
        # Put the other folders' modules back, so code that imported them keeps
        # its classes; the module imported here keeps references to its own.
        sys.modules.update(others)


def _inside(module: ModuleType, folder: Path) -> bool:
    location = getattr(module, "__file__", None)
    return bool(location) and Path(location).resolve().is_relative_to(folder)


def _provides(folder: Path, top: str) -> bool:
    return (folder / f"{top}.py").is_file() or (folder / top).is_dir()


def _user_frames(error: Exception) -> list[traceback.FrameSummary]:
    """Return the traceback frames of ``error`` outside this module and outside
    frozen importlib code, outermost first."""
    return [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith("<") and frame.filename != __file__
    ]


def _describe_user_error(error: Exception) -> str:
    """Return "Type: message (file, line N)" for an error raised in user code.

    The location is the innermost frame of the traceback outside this module,
    which lies in a library when the user's code called one with bad arguments.
    It is left out when no such frame exists, as for a TypeError raised by
    calling the user's callable with the wrong number of arguments.
    """
    description = type(error).__name__
    if str(error):
        description += f": {error}"
    if isinstance(error, SyntaxError):
        return description  # its message already names the file and line
    frames = _user_frames(error)
    if frames:
        description += f" ({frames[-1].filename}, line {frames[-1].lineno})"
    return description


def _checkpoint_files_hint(folder: Path) -> str:
    """Return a sentence naming up to three checkpoint files in ``folder``, or ""
    when it has none."""
    try:
        names = sorted(
            entry.name
            for entry in folder.iterdir()
            if entry.is_file() and entry.suffix in CHECKPOINT_SUFFIXES
        )
    except OSError:
        return ""
    if not names:
        return ""
    listed = ", ".join(repr(name) for name in names[:3])
    more = _more_text(names, 3)
    return f" The folder contains {listed}{more}."


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a checkpoint file, with a clear error if it is bad."""
    path = Path(path)
    check_path_name(path, "Checkpoint", CheckpointError)
    if path.is_dir():
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is a folder, but a state-dict file is "
            "expected. Pass the file written by torch.save(model.state_dict(), "
            f"path).{_checkpoint_files_hint(path)}"
        )
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint {str(path)!r}{looked_up_as(path)} not found. Check the path."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as error:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} could not be read "
            f"({error.strerror or error}). Check that the file is readable."
        ) from error
    except Exception as error:  # torch raises many types for corrupt files
        if isinstance(error, pickle.UnpicklingError):
            # weights_only=True rejects every class outside torch's allowlist.
            _check_pickled_objects(path)
        # torch's own message suggests weights_only=False, which would run code
        # from the file, so only the exception type is shown.
        kind = type(error)
        name = (
            kind.__qualname__
            if kind.__module__ == "builtins"
            else f"{kind.__module__}.{kind.__qualname__}"
        )
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is not a readable state-dict file: "
            f"torch.load raised {name}, so the file is damaged or of another "
            "kind. It must be a file written by torch.save(model.state_dict(), "
            "path).",
        ) from error
    if _is_state_dict(state):
        return state
    if isinstance(state, dict) and not state:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} contains an empty dict, with no weights. Save "
            "the model with torch.save(model.state_dict(), path)."
        )
    if isinstance(state, dict):
        # A training checkpoint nests the weights beside the optimizer's state
        # and counters under a conventional key.
        for key in NESTED_STATE_KEYS:
            if _is_state_dict(state.get(key)):
                logger.info("Read the state dict under key %r of %s.", key, path)
                return state[key]
        for key in NESTED_STATE_KEYS:
            value = state.get(key)
            if not isinstance(value, dict):
                continue
            others = [
                str(name)
                for name, item in value.items()
                if not (isinstance(name, str) and isinstance(item, torch.Tensor))
            ]
            if others and len(others) < len(value):
                raise CheckpointError(
                    f"Checkpoint {str(path)!r} contains tensors under {key!r}, but "
                    f"also {', '.join(repr(name) for name in others[:3])}"
                    f"{_more_text(others, 3)}, which are not weights. Save the "
                    "weights alone, with torch.save(model.state_dict(), path)."
                )
        keys = [str(key) for key in state]
        listed = ", ".join(repr(key) for key in keys[:8])
        more = _more_text(keys, 8)
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is a dict with keys {listed}{more}, not a "
            "state dict of tensors, and none of "
            f"{', '.join(repr(key) for key in NESTED_STATE_KEYS)} contains one. Save "
            "the model's weights alone, for example torch.save(checkpoint[KEY], "
            "path) with the key that contains them, or torch.save(model.state_dict(), "
            "path)."
        )
    raise CheckpointError(
        f"Checkpoint {str(path)!r} contains a {type(state).__name__}, not a state "
        "dict of tensors. Save it with torch.save(model.state_dict(), path)."
    )


def _more_text(names: list[str], shown: int) -> str:
    """Return " and N more" for the names after the first ``shown``."""
    return f" and {len(names) - shown} more" if len(names) > shown else ""


#: Keys under which training checkpoints commonly store the model's state
#: dict: PyTorch Lightning's, the PyTorch tutorials' and other trainers'.
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "model_state")


def _is_state_dict(value: object) -> bool:
    """Return whether ``value`` is a non-empty dict of tensors by name."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(
            isinstance(key, str) and isinstance(item, torch.Tensor)
            for key, item in value.items()
        )
    )


#: Most bytes of a checkpoint's pickle that :func:`_pickled_globals` reads.
#: The tensors' data lie in other entries of the archive, so even the pickle
#: of a whole model is far smaller.
MAX_PICKLE_BYTES = 64 * 2**20
#: Modules whose classes and functions a state dict's pickle names.
_STATE_DICT_MODULES = ("torch", "collections", "builtins", "__builtin__", "_codecs")


def _pickled_globals(path: Path) -> tuple[list[str], str | None]:
    """List the classes and functions that a torch.save archive's pickle names.

    The pickle's opcodes are read with :mod:`pickletools`, which runs none of
    the file's code.

    Returns:
        (each "module.name" that the pickle imports, in order of first use, and
        the class of the first pickled ``nn.Module`` or None when it has none),
        or ([], None) when ``path`` is no such archive.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [
                name
                for name in archive.namelist()
                if name == "data.pkl" or name.endswith("/data.pkl")
            ]
            if len(entries) != 1:
                return [], None
            if archive.getinfo(entries[0]).file_size > MAX_PICKLE_BYTES:
                return [], None
            data = archive.read(entries[0])
        imported: list[str] = []
        module_class = None
        strings: list[str] = []
        last_global = constructed = None
        for opcode, argument, _position in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                last_global = ".".join(str(argument).split(" ", 1))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                last_global = f"{strings[-2]}.{strings[-1]}"
            elif opcode.name in ("NEWOBJ", "NEWOBJ_EX"):
                constructed = last_global
            if "GLOBAL" in opcode.name or opcode.name == "INST":
                if last_global is not None and last_global not in imported:
                    imported.append(last_global)
            if isinstance(argument, str):
                strings.append(argument)
                # Every nn.Module's __dict__ has the key "_modules", which the
                # pickle writes after the NEWOBJ that creates the module.
                if argument == "_modules" and module_class is None:
                    module_class = constructed
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return [], None
    return imported, module_class


def _check_pickled_objects(path: Path) -> None:
    """Raise a CheckpointError naming what a checkpoint holds besides tensors,
    when torch.load(weights_only=True) rejected its pickle.

    Returns without raising when the file is no torch.save archive or its
    pickle names only what a state dict uses.
    """
    names, module_class = _pickled_globals(path)
    if module_class is not None:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} contains a whole pickled model (class "
            f"{module_class!r}), which is not loaded because unpickling it would "
            "run code from the file. Save the weights alone with "
            "torch.save(model.state_dict(), path) and import that file."
        )
    others = [
        name for name in names if name.partition(".")[0] not in _STATE_DICT_MODULES
    ]
    if others:
        listed = ", ".join(repr(name) for name in others[:3])
        raise CheckpointError(
            f"Checkpoint {str(path)!r} contains objects other than tensors "
            f"({listed}), which are not loaded because unpickling them would run "
            "code from the file. Save the weights alone with "
            "torch.save(model.state_dict(), path) and import that file."
        )


#: Prefix that DataParallel and DistributedDataParallel add to every key of
#: the state dict of the model they wrap.
PARALLEL_PREFIX = "module."


def _shared_prefix(state: dict[str, torch.Tensor]) -> str | None:
    """Return the first dotted part of the keys, with its dot, when every key
    of ``state`` starts with the same one and goes on after it, else None."""
    parts = {key.partition(".")[0] for key in state}
    if len(parts) != 1 or not all("." in key for key in state):
        return None
    return f"{parts.pop()}."


def _more(names: list[str]) -> str:
    """Return " (and N more)" for the names after the first, or "" for one."""
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def load_checked_state(
    model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "checkpoint"
) -> None:
    """Load ``state`` into ``model`` after checking every key and shape.

    A state dict saved from a model wrapped in DataParallel or
    DistributedDataParallel has the prefix "module." on every key. One saved
    by a training wrapper has the name of the attribute that stores the
    network, such as "net." for ``self.net`` in a PyTorch Lightning module. A
    prefix shared by every key is removed when the keys without it are exactly
    the model's.

    Raises:
        CheckpointError: naming the first missing, unexpected or mis-shaped layer.
    """
    expected = model.state_dict()
    prefix_note = ""
    prefix = _shared_prefix(state)
    if (
        prefix is not None
        and set(state) != set(expected)
        # A model whose own keys all share the prefix keeps it.
        and prefix != _shared_prefix(expected)
    ):
        stripped = {key[len(prefix) :]: value for key, value in state.items()}
        if set(stripped) == set(expected):
            logger.info(
                "Removed the prefix %r from every key of the %s.", prefix, source
            )
            state = stripped
        elif prefix == PARALLEL_PREFIX:
            prefix_note = (
                f" Every key of the {source} starts with {PARALLEL_PREFIX!r}, as "
                "DataParallel and DistributedDataParallel save them, so the keys "
                "were compared without that prefix."
            )
            state = stripped
        else:
            prefix_note = (
                f" Every key of the {source} starts with {prefix!r}, and without "
                "that prefix the keys still differ from the model's."
            )
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing:
        raise CheckpointError(
            f"The {source} lacks layer {missing[0]!r}{_more(missing)} that the "
            f"model has.{prefix_note} Use the checkpoint saved from this "
            "architecture."
        )
    if unexpected:
        raise CheckpointError(
            f"The {source} has layer {unexpected[0]!r}{_more(unexpected)} that the "
            f"model does not have.{prefix_note} Use the checkpoint saved from this "
            "architecture."
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"Layer {key!r} has shape {tuple(state[key].shape)} in the {source} "
                f"but {tuple(tensor.shape)} in the model. Use the checkpoint saved "
                "from this architecture."
            )
    model.load_state_dict(state)


def check_output_size(model: nn.Module, sample: torch.Tensor, num_classes: int) -> None:
    """Check that the model maps ``sample`` (1, C, H, W) to ``num_classes`` logits."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(sample)
    except Exception as error:
        raise CheckpointError(
            f"The model failed on an input of shape {tuple(sample.shape)}: {error}. "
            "Make sure it accepts images of this data set."
        ) from error
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor):
        raise CheckpointError(
            f"The model returned {_describe_type(logits)}, not a logits tensor of "
            f"shape (batch, {num_classes}). Make its forward method return only "
            "the logits."
        )
    if logits.ndim != 2:
        raise CheckpointError(
            f"The model outputs shape {tuple(logits.shape)}, but logits must be "
            f"2-D with shape (batch, classes), which is (batch, {num_classes}) for "
            "this data. Make its forward method return a tensor of that shape."
        )
    if logits.shape[1] != num_classes:
        last = _last_layer_name(model)
        raise CheckpointError(
            f"The model outputs shape {tuple(logits.shape)} but the data has "
            f"{num_classes} classes (layer {last!r}). Give the last layer "
            f"{num_classes} outputs."
        )


def _describe_type(value: object) -> str:
    """Return the type name of ``value``, with its item types for a short tuple
    or list, for example "tuple (Tensor, int)"."""
    name = type(value).__name__
    if isinstance(value, tuple | list) and 0 < len(value) <= 4:
        items = ", ".join(type(item).__name__ for item in value)
        return f"{name} ({items})"
    return name


def _last_layer_name(model: nn.Module) -> str:
    names = [name for name, p in model.named_parameters() if p.ndim >= 1]
    return names[-1].rsplit(".", 1)[0] if names else type(model).__name__


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Return penultimate features: ``model.embed`` if defined, else the input
    to the last ``nn.Linear`` layer, captured with a forward hook."""
    if hasattr(model, "embed"):
        return model.embed(images)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return model(images)
    captured: list[torch.Tensor] = []
    handle = linears[-1].register_forward_hook(
        lambda _m, inputs, _o: captured.append(inputs[0].flatten(1))
    )
    try:
        model(images)
    finally:
        handle.remove()
    return captured[0]
