"""Local files of frozen-CLIP weights (``clip_weights=/path/to/file``), read without unpickling code.

Two kinds of file are accepted:

- a state dict of an open_clip model: ``.pt``/``.pth``/``.bin`` written by ``torch.save`` (e.g.
  open_clip's ``open_clip_pytorch_model.bin``) or a ``.safetensors`` file. It is read by
  ``open_clip.load_checkpoint`` with ``weights_only=True``: tensors and plain containers only,
  a file holding any other pickled object is refused.
- OpenAI's released ``.pt`` files (e.g. ``ViT-L-14-336px.pt``): TorchScript archives of
  OpenAI's CLIP module. An archive is recognised by its zip entries (``constants.pkl``)
  before anything is deserialised; ``torch.jit.load`` then gives its state dict, as open_clip's
  own OpenAI loader does. The archive's code is never run.

OpenAI's parameter names are those of open_clip's ``CLIP`` class (open_clip builds its OpenAI
models by loading these state dicts strictly, ``build_model_from_openai_state_dict``). The
archive also holds three metadata entries, which are dropped, and stores most matrices in
float16, which ``load_state_dict`` copies exactly into the float32 model. An archive loads
strictly: one of another architecture (width, depth, patch or input size) is an error. A state
dict goes through open_clip's loader, which resizes a position grid of another input size and
refuses every other difference.

Usage::

    clip = open_clip.create_model("ViT-L-14-336", pretrained=None, force_quick_gelu=True)
    load_weights_file(clip, Path("/models/ViT-L-14-336px.pt"), "ViT-L-14-336")
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

import open_clip
import torch

from pmoe.errors import CheckpointError

OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")  # not parameters of the model
SUFFIXES = ".pt, .pth, .bin or .safetensors"


def load_weights_file(clip, path: Path, name: str) -> None:
    """Load the weights file ``path`` into ``clip``, the open_clip model of architecture ``name``."""
    if not path.is_file():
        raise CheckpointError(
            f"CLIP weights file {path} does not exist; pass the path of a saved {name} checkpoint "
            f"({SUFFIXES}) or clip_weights='openai'."
        )
    try:
        if is_torchscript_archive(path):
            clip.load_state_dict(openai_state_dict(path), strict=True)
        else:
            open_clip.load_checkpoint(clip, str(path), weights_only=True)
    except pickle.UnpicklingError as error:
        refused = refused_global(error)
        if not refused:
            raise _unreadable(path, name, error) from error
        raise CheckpointError(
            f"CLIP weights file {path} holds pickled Python objects besides tensors ({refused}), "
            "which pmoe does not unpickle (they can run code). Save the weights as a state dict, "
            "torch.save(model.state_dict(), path) or safetensors, or pass OpenAI's original .pt file."
        ) from error
    except RuntimeError as error:
        if not str(error).startswith("Error(s) in loading state_dict"):
            raise _unreadable(path, name, error) from error
        raise CheckpointError(
            f"CLIP weights file {path} does not match the {name} architecture ({_first_words(error)}). "
            f"Pass weights of an open_clip {name} model or OpenAI's .pt file of {name}, "
            "or set clip_model to the file's architecture."
        ) from error
    except Exception as error:  # torch, zipfile and safetensors raise many types for a damaged file
        raise _unreadable(path, name, error) from error


def refused_global(error: Exception):
    """The Python object a weights-only ``torch.load`` refused to unpickle, as its message names it
    (``Unsupported global: GLOBAL module.Name``); None for any other failure."""
    found = re.search(r"GLOBAL (\S+)", str(error)) if isinstance(error, pickle.UnpicklingError) else None
    return found.group(1) if found else None


def is_torchscript_archive(path) -> bool:
    """Whether ``path`` is a TorchScript archive: a zip with a top-level ``<name>/constants.pkl``.

    Only the zip's table of contents is read.
    """
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(entry.count("/") == 1 and entry.endswith("/constants.pkl") for entry in archive.namelist())


def openai_state_dict(path) -> dict:
    """The parameters of an OpenAI TorchScript archive under their (open_clip) names, metadata dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
        archive = torch.jit.load(str(path), map_location="cpu")
    state = dict(archive.state_dict())
    for key in OPENAI_METADATA:
        state.pop(key, None)
    return state


def _first_words(error: Exception, limit: int = 300) -> str:
    """The error's message on one line, cut to ``limit`` characters."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + " ..."


def _unreadable(path: Path, name: str, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"cannot read CLIP weights file {path} ({type(error).__name__}: {_first_words(error)}). "
        f"Expected a state dict of an open_clip {name} model ({SUFFIXES}) or OpenAI's .pt file; "
        "the file may be truncated: download it again."
    )
