"""AnomalyCLIP (Zhou et al., ICLR 2024) as a second prompt learner: its object-agnostic
prompts, its checkpoint format (read, written, imported as a pmoe run) and its published numbers.

Usage::

    from pmoe.anomalyclip import AnomalyCLIPPromptLearner, import_run, load_checkpoint, load_published
    learner = AnomalyCLIPPromptLearner(clip)              # clip: an open_clip CLIP (frozen)
    load_checkpoint(learner, "checkpoints/9_12_4_multiscale/epoch_15.pth")
    text_features = learner()                             # (2, D): [normal, abnormal], unit norm
    published = load_published("mvtec")                  # their per-class log as a tidy frame
    import_run("checkpoints/9_12_4_multiscale/epoch_15.pth", "runs/anomalyclip-visa",
               pmoe.Config.preset("anomalyclip"))         # a pmoe run directory (pmoe import-anomalyclip)

In the model (``prompt_mode="anomalyclip"``, presets ``anomalyclip`` and ``anomalyclip-4layers``)
the learner is wrapped by :class:`pmoe.prompt_learners.AnomalyCLIPPrompts`.

The prompts are the same for every image and class (object-agnostic)::

    normal:   [SOS] V_1 ... V_E object . [EOT]
    abnormal: [SOS] W_1 ... W_E damaged object . [EOT]

with separate learnable contexts V (``normal_context``) and W (``abnormal_context``), E = 12.
Inside the frozen text transformer, learnable tokens t'_m (``deep_tokens``, depth - 1 sets of
4) replace the four tokens after [SOS] before text blocks 2 .. depth (1-indexed): block 1 sees
the prompt itself (its first four context vectors), block m + 1 sees set m, and the blocks
after ``depth`` carry on whatever block ``depth`` made of the last set. Both prompts share the
deep tokens. The causal mask makes the EOT feature independent of later positions, so the
transformer runs only up to the last EOT (exactly as :class:`pmoe.text.TextEncoder` does).

Their code runs this path in fp16 on CUDA; here it runs in the dtype of the CLIP weights (fp32).
Their checkpoint holds frozen buffers (the [SOS] and suffix token embeddings and the token
ids) that are checked against this CLIP and tokenizer, and ``compound_prompt_projections``
(one ``Linear(width, 896)`` per deep set, never used in their forward pass), which is
shape-checked and ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import pmoe
from pmoe.clip_weights import refused_global
from pmoe.errors import CheckpointError, ConfigError, DataError
from pmoe.io import atomic_dir, atomic_path, write_text
from pmoe.text import PAD_TOKEN, TextEncoder, clip_tokenizer

CONTEXT_PLACEHOLDER = "X"  # their prompt text holds one "X" per learnable context vector
NORMAL_TEMPLATE = "{}."
ABNORMAL_TEMPLATE = "damaged {}."
PROJECTION_WIDTH = 896  # out_features of their unused compound_prompt_projections
STATES = ("pos", "neg")  # their suffixes for the normal and the abnormal prompt
PUBLISHED_COLUMNS = ["checkpoint", "train_set", "dataset", "cls", "metric", "value"]


class DeepTokenTransformer(nn.Module):
    """The frozen CLIP text transformer with learnable tokens t'_m inserted before blocks 2 .. depth."""

    def __init__(self, transformer: nn.Module, depth: int, length: int, width: int):
        super().__init__()
        self.resblocks = transformer.resblocks
        self.tokens = nn.Parameter(torch.empty(depth - 1, length, width))
        nn.init.normal_(self.tokens, std=0.02)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the blocks on batch-first ``x`` (N, T, width); set m replaces positions 1..length before block m + 1."""
        length = self.tokens.shape[1]
        for index, block in enumerate(self.resblocks):
            if 1 <= index <= len(self.tokens):
                deep = self.tokens[index - 1].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], deep, x[:, 1 + length:]], dim=1)
            x = block(x, attn_mask=attn_mask)
        return x


class AnomalyCLIPPromptLearner(nn.Module):
    """Object-agnostic learnable prompts and deep text tokens; ``forward()`` gives F_T (2, D)."""

    def __init__(self, clip: nn.Module, n_ctx: int = 12, depth: int = 9, deep_len: int = 4,
                 class_name: str = "object", truncate: bool = True):
        """``clip``: the frozen text tower, as an open_clip CLIP or a :class:`pmoe.text.TextEncoder`."""
        super().__init__()
        self.text = TextEncoder(clip, truncate)
        blocks = len(clip.transformer.resblocks)
        if not 1 <= depth <= blocks or not 1 <= deep_len <= n_ctx:
            raise ConfigError(
                f"AnomalyCLIP needs 1 <= depth <= {blocks} (text blocks) and 1 <= deep_len <= n_ctx; "
                f"got depth={depth}, deep_len={deep_len}, n_ctx={n_ctx} (their setting: 9, 4, 12; config fields "
                "deep_prompt_depth, deep_prompt_len, ctx_len)."
            )
        self.n_ctx, self.depth, self.deep_len = n_ctx, depth, deep_len
        width = self.text.width
        self.normal_context = nn.Parameter(torch.empty(n_ctx, width))
        self.abnormal_context = nn.Parameter(torch.empty(n_ctx, width))
        nn.init.normal_(self.normal_context, std=0.02)
        nn.init.normal_(self.abnormal_context, std=0.02)
        self.text.transformer = DeepTokenTransformer(clip.transformer, depth, deep_len, width)
        ids = prompt_token_ids(n_ctx, class_name, self.text.context_length)
        self.register_buffer("token_ids", ids, persistent=False)

    @property
    def deep_tokens(self) -> nn.Parameter:
        """The learnable text tokens t'_m, (depth - 1, deep_len, width)."""
        return self.text.transformer.tokens

    def frozen_embeddings(self) -> torch.Tensor:
        """Token embeddings (2, context_length, width) of the two prompts with the placeholders in place."""
        with torch.no_grad():
            return self.text.token_embedding(self.token_ids)

    def prompt_embeddings(self) -> torch.Tensor:
        """The two prompts (2, context_length, width) with the learnable contexts after [SOS]."""
        frozen = self.frozen_embeddings()
        context = torch.stack([self.normal_context, self.abnormal_context]).to(frozen.dtype)
        return torch.cat([frozen[:, :1], context, frozen[:, 1 + self.n_ctx:]], dim=1)

    def forward(self) -> torch.Tensor:
        """Normalised text features F_T (2, D_embed): row 0 normal, row 1 abnormal."""
        return self.text(self.prompt_embeddings(), self.token_ids.argmax(dim=-1))

    def checkpoint_shapes(self) -> dict:
        """The keys and shapes of an AnomalyCLIP checkpoint made for these settings."""
        return checkpoint_shapes(self.text.width, self.n_ctx, self.depth, self.deep_len, self.text.context_length)


def prompt_token_ids(n_ctx: int, class_name: str, context_length: int) -> torch.Tensor:
    """Token ids (2, context_length) of "X .. X object." and "X .. X damaged object.", as they tokenize them."""
    tokenizer = clip_tokenizer()
    placeholders = " ".join([CONTEXT_PLACEHOLDER] * n_ctx)
    rows = []
    for template in (NORMAL_TEMPLATE, ABNORMAL_TEMPLATE):
        text = f"{placeholders} {template.format(class_name.replace('_', ' '))}"
        ids = [tokenizer.sot_token_id, *tokenizer.encode(text), tokenizer.eot_token_id]
        if len(ids) > context_length:
            raise ConfigError(f"the prompt {text!r} needs {len(ids)} tokens; the context holds {context_length}.")
        rows.append(ids + [PAD_TOKEN] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def checkpoint_shapes(width: int, n_ctx: int = 12, depth: int = 9, deep_len: int = 4,
                      context_length: int = 77) -> dict:
    """Every key of their ``prompt_learner`` state dict with its shape (ViT-L-14-336: width 768)."""
    shapes = {}
    for state in STATES:
        shapes[f"ctx_{state}"] = (1, 1, n_ctx, width)
        shapes[f"token_prefix_{state}"] = (1, 1, 1, width)
        shapes[f"token_suffix_{state}"] = (1, 1, context_length - 1 - n_ctx, width)
        shapes[f"tokenized_prompts_{state}"] = (1, 1, context_length)
    for index in range(depth - 1):
        shapes[f"compound_prompts_text.{index}"] = (deep_len, width)
        shapes[f"compound_prompt_projections.{index}.weight"] = (PROJECTION_WIDTH, width)
        shapes[f"compound_prompt_projections.{index}.bias"] = (PROJECTION_WIDTH,)
    return shapes


def read_checkpoint(path) -> dict:
    """The ``prompt_learner`` state dict of an AnomalyCLIP checkpoint file (tensors only, never unpickled objects)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"AnomalyCLIP checkpoint {path} does not exist; pass the path of their epoch_15.pth.")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, KeyError, EOFError... for other files
        refused = refused_global(error)
        if refused is None:
            raise CheckpointError(
                f"{path} is not a readable torch checkpoint ({type(error).__name__}); pass AnomalyCLIP's epoch_15.pth."
            ) from error
        raise CheckpointError(
            f"{path} holds a pickled Python object ({refused}) that weights-only loading refuses to run. "
            "AnomalyCLIP's checkpoints hold tensors only: re-save it as "
            "{'prompt_learner': prompt_learner.state_dict()} from a source you trust."
        ) from error
    if not isinstance(content, dict) or not isinstance(content.get("prompt_learner"), dict):
        found = f"keys {sorted(map(str, content))}" if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(
            f"{path} is not an AnomalyCLIP checkpoint: expected a dict with a 'prompt_learner' state dict, "
            f"found {found}."
        )
    return content["prompt_learner"]


def check_state_shapes(state: dict, shapes: dict, path) -> None:
    """Raise a :class:`CheckpointError` naming missing, unexpected, non-tensor and mis-shaped entries."""
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match AnomalyCLIP's prompt learner: missing keys {missing}, unexpected keys "
            f"{unexpected}. Build AnomalyCLIPPromptLearner with the checkpoint's n_ctx and depth (theirs: 12, 9)."
        )
    for key, shape in shapes.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(
                f"{path}: {key} has shape {got}, expected {shape}. The checkpoint was made for another "
                "text width / n_ctx / deep_len (theirs: ViT-L-14-336, width 768, n_ctx 12, deep_len 4)."
            )


def check_frozen_buffers(state: dict, learner: AnomalyCLIPPromptLearner, path) -> None:
    """Their saved token ids and [SOS]/suffix embeddings must be this tokenizer's and this CLIP's."""
    frozen = learner.frozen_embeddings()
    for row, state_name in enumerate(STATES):
        saved_ids = state[f"tokenized_prompts_{state_name}"].reshape(-1).long()
        if not torch.equal(saved_ids, learner.token_ids[row].cpu()):
            raise CheckpointError(
                f"{path}: tokenized_prompts_{state_name} differs from the tokens of the "
                f"{'normal' if row == 0 else 'abnormal'} prompt this learner builds; it was made with another "
                "prompt text or class word (theirs: 'object')."
            )
        saved = torch.cat([state[f"token_prefix_{state_name}"], state[f"token_suffix_{state_name}"]], dim=2)[0, 0]
        ours = torch.cat([frozen[row, :1], frozen[row, 1 + learner.n_ctx:]])
        if not torch.allclose(saved.to(ours), ours, rtol=1e-3, atol=1e-6):
            raise CheckpointError(
                f"{path}: its frozen token embeddings (token_prefix/suffix_{state_name}) differ from this CLIP's: "
                "it was trained on other CLIP weights (AnomalyCLIP: OpenAI ViT-L-14-336). Load those weights, or "
                "pass check_frozen=False to load the learnable tensors anyway."
            )


def load_checkpoint(learner: AnomalyCLIPPromptLearner, path, check_frozen: bool = True) -> AnomalyCLIPPromptLearner:
    """Load their ``ctx_pos``/``ctx_neg``/``compound_prompts_text.*`` into ``learner`` after checking the file."""
    return load_state(learner, read_checkpoint(path), path, check_frozen)


def load_state(learner: AnomalyCLIPPromptLearner, state: dict, path, check_frozen: bool = True):
    """Load the ``prompt_learner`` state dict read from ``path`` (named in errors) after checking it."""
    check_state_shapes(state, learner.checkpoint_shapes(), path)
    if check_frozen:
        check_frozen_buffers(state, learner, path)
    deep = [state[f"compound_prompts_text.{index}"] for index in range(learner.depth - 1)]
    with torch.no_grad():
        learner.normal_context.copy_(state["ctx_pos"][0, 0])
        learner.abnormal_context.copy_(state["ctx_neg"][0, 0])
        if deep:
            learner.deep_tokens.copy_(torch.stack(deep))
    return learner


def save_checkpoint(learner: AnomalyCLIPPromptLearner, path, dtype=torch.float32) -> Path:
    """Write ``learner`` as their train.py saves it: ``{"prompt_learner": state}``, their key names.

    The frozen buffers are this CLIP's [SOS] and suffix embeddings and int32 token ids; the
    ``compound_prompt_projections`` their forward pass never uses are written as zeros. ``dtype``
    is that of the floating tensors (their CUDA runs save fp16). Written atomically.
    """
    frozen = learner.frozen_embeddings()
    state = {}
    for row, (name, context) in enumerate(zip(STATES, (learner.normal_context, learner.abnormal_context))):
        state[f"ctx_{name}"] = context.detach()[None, None]
        state[f"token_prefix_{name}"] = frozen[row, :1][None, None]
        state[f"token_suffix_{name}"] = frozen[row, 1 + learner.n_ctx:][None, None]
        state[f"tokenized_prompts_{name}"] = learner.token_ids[row].to(torch.int32)[None, None]
    width = learner.text.width
    for index, tokens in enumerate(learner.deep_tokens.detach()):
        state[f"compound_prompts_text.{index}"] = tokens
        state[f"compound_prompt_projections.{index}.weight"] = torch.zeros(PROJECTION_WIDTH, width)
        state[f"compound_prompt_projections.{index}.bias"] = torch.zeros(PROJECTION_WIDTH)
    state = {key: (value.to(dtype) if value.is_floating_point() else value).cpu().contiguous()
             for key, value in state.items()}
    with atomic_path(path) as tmp:
        torch.save({"prompt_learner": state}, tmp)
    return Path(path)


# --- their checkpoints as pmoe runs ---------------------------------------------------------------
# The folders of their released checkpoints and the set each was trained on (their train.sh; the
# "_visa" suffix names the set it is evaluated on).
CHECKPOINT_TRAIN_SETS = {"9_12_4_multiscale": "visa", "9_12_4_multiscale_visa": "mvtec"}


def checkpoint_train_set(path) -> str:
    """The training set of one of their released checkpoints, from its folder's name."""
    folder = Path(path).expanduser().resolve().parent.name
    if folder not in CHECKPOINT_TRAIN_SETS:
        known = ", ".join(f"{name}/ ({train_set})" for name, train_set in CHECKPOINT_TRAIN_SETS.items())
        raise ConfigError(f"cannot tell what {path} was trained on from its folder {folder!r} (theirs: {known}); "
                          "pass the training set (--train-set visa or mvtec).")
    return CHECKPOINT_TRAIN_SETS[folder]


def import_run(path, out_dir, config, train_set: str | None = None, overwrite: bool = False) -> Path:
    """Import their checkpoint ``path`` as a pmoe run directory ``out_dir``; returns it.

    ``config`` is an ``anomalyclip`` preset (with the CLIP weights to use: their frozen buffers
    are checked against them). ``train_set`` defaults to the one their folder name implies. The run
    directory holds config.json, provenance.json, model.safetensors and identity.json (the
    training set, the source file and its SHA-1); ``pmoe evaluate``/``pmoe infer`` take it. It is
    written under a temporary name and renamed, so a failed import leaves no run directory.
    """
    from pmoe.checkpoint import WEIGHTS, save_weights, write_run_metadata
    from pmoe.data import dataset_info
    from pmoe.identity import file_sha1, package_version
    from pmoe.model import build_model
    from pmoe.training import IDENTITY

    path, out_dir = Path(path).expanduser(), Path(out_dir).expanduser()
    if config.prompt_mode != "anomalyclip":
        raise ConfigError(f"importing an AnomalyCLIP checkpoint needs prompt_mode 'anomalyclip' (preset anomalyclip "
                          f"or anomalyclip-4layers), got {config.prompt_mode!r}.")
    train_set = dataset_info(train_set or checkpoint_train_set(path)).name
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already exists; pass --overwrite to replace it, or choose another --out.")
    state = read_checkpoint(path)
    model = build_model(config)
    load_state(model.prompt_learner.learner, state, path)
    identity = {"train_set": train_set, "source": "AnomalyCLIP checkpoint", "source_file": str(path.resolve()),
                "source_sha1": file_sha1(path), "pmoe_version": package_version()}
    with atomic_dir(out_dir) as scratch:
        write_run_metadata(scratch, config)
        write_text(scratch / IDENTITY, json.dumps(identity, indent=2) + "\n")
        save_weights(model, scratch / WEIGHTS)
    return out_dir


# --- their published numbers --------------------------------------------------------------------
def published_dir() -> Path:
    """The folder of their published numbers: ``results/anomalyclip/`` of the source checkout."""
    return Path(pmoe.__file__).resolve().parents[1] / "results" / "anomalyclip"


def load_published(dataset: str | None = None) -> pd.DataFrame:
    """Their published per-class and mean numbers (percent, as logged), optionally of one evaluated dataset."""
    paths = sorted(published_dir().glob("zero_shot_*.csv"))
    if not paths:
        raise DataError(f"no zero_shot_*.csv under {published_dir()}: restore results/anomalyclip/ from git.")
    frames = [pd.read_csv(path, dtype=str, keep_default_na=False) for path in paths]
    for path, frame in zip(paths, frames):
        if list(frame.columns) != PUBLISHED_COLUMNS:
            raise DataError(f"{path} has columns {list(frame.columns)}, not {PUBLISHED_COLUMNS}: restore it from git.")
    frame = pd.concat(frames, ignore_index=True)
    values = pd.to_numeric(frame["value"], errors="coerce")
    if values.isna().any():
        bad = frame.loc[values.isna(), "value"].tolist()
        raise DataError(f"{published_dir()} holds non-numeric values {bad[:5]}: restore the CSVs from git.")
    frame["value"] = values
    if dataset is None:
        return frame
    if dataset not in set(frame["dataset"]):
        available = sorted(set(frame["dataset"]))
        raise DataError(f"no published AnomalyCLIP numbers for {dataset!r}; available: {available}.")
    return frame[frame["dataset"] == dataset].reset_index(drop=True)
