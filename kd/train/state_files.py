"""Every file of a saved state, checked before anything reads it: a run folder is often copied from a colleague or
a shared drive, and a pickle can run code when it is loaded."""

import dataclasses
import enum
import json
import pickle
from pathlib import Path

import accelerate.utils
import safetensors
import torch

from kd.errors import UserError


def check_files(last: Path) -> None:
    """Refuse the state in `last`, naming the file, when any file could run code or cannot be read: pickles must
    load with torch's weights_only unpickler, .safetensors and .json files must parse, FSDP's .distcp shards torch
    reads weights-only itself, and their pickled .metadata must unpickle to DCP's metadata classes alone."""
    for path in sorted(p for p in last.rglob("*") if p.is_file()):
        try:
            if path.name == ".metadata":
                check_dcp_metadata(path)
            elif path.suffix in (".bin", ".pkl", ".pt"):
                accelerate.utils.load(path, map_location="cpu", weights_only=True)
            elif path.suffix == ".safetensors":
                with safetensors.safe_open(str(path), "pt"):
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except pickle.UnpicklingError:  # torch's weights_only unpickler met an object it does not build
            problem = "holds more than tensors and plain data, and unpickling it could run code"
        except Exception as e:  # truncated, foreign or garbled
            first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
            problem = f"cannot be read ({type(e).__name__}: {first})"
        else:
            continue
        raise UserError(
            f"refused to resume from {last}: {path.relative_to(last)} {problem}. Resume only from run folders you "
            "made or trust; to start over, set checkpoint_dir to a new folder."
        )


DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}  # and dtypes


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Builds what torch.distributed.checkpoint pickles in its .metadata and refuses any other global."""

    def find_class(self, module: str, name: str):
        if module in DCP_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        elif (module, name) in DCP_GLOBALS:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not one of torch.distributed.checkpoint's")


def check_dcp_metadata(path: Path) -> None:
    """An FSDP state's .metadata, unpickled safely: torch itself unpickles it with no limit when the state loads."""
    with path.open("rb") as f:
        _DcpMetadataUnpickler(f).load()
