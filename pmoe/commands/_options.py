"""Options shared by several sub-commands (this module is not a command itself)."""

from __future__ import annotations


def add_cache_options(parser, what: str = "compute CLIP features without caching") -> None:
    """--cache-dir / --no-cache for the frozen-feature cache."""
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--cache-dir", help="frozen-feature cache folder (default $PMOE_CACHE or ~/.cache/pmoe/features)")
    cache.add_argument("--no-cache", action="store_true", help=what)


def cache_dir(args):
    """The cache folder the options ask for (None with --no-cache)."""
    from pmoe.features import default_cache_dir

    return None if args.no_cache else (args.cache_dir or default_cache_dir())


def add_device_options(parser, batch_size: int | None, workers_help: str = "data-loading worker processes",
                       auto_workers: bool = False) -> None:
    """--batch-size (when given a default), --workers, --device, --quiet.

    With ``auto_workers`` --workers defaults to None: the library picks the number from the CPUs
    on a GPU, and 0 on the CPU (:func:`pmoe.runtime.data_workers`); else it defaults to 0.
    """
    if batch_size is not None:
        parser.add_argument("--batch-size", type=int, default=batch_size,
                            help=f"images per forward pass (default {batch_size})")
    default = "on a GPU one per CPU core less one, at most 16; 0 on the CPU" if auto_workers else "0"
    parser.add_argument("--workers", type=int, default=None if auto_workers else 0,
                        help=f"{workers_help} (default: {default})")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: this process's GPU, else the CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_model_options(parser) -> None:
    """--checkpoint RUN_DIR, or --preset NAME (and --base) for a training-free model."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="run directory written by `pmoe train` or `pmoe import-anomalyclip`")
    model.add_argument("--preset", help="a training-free preset instead of a run (clip-zero-shot: CLIP weights only)")
    parser.add_argument("--base", default="paper", help="base preset --preset is laid over (paper, tiny, demo)")


def model_source(args):
    """The run directory, or the Config of the training-free preset, the options name."""
    from pmoe.config import Config

    return args.checkpoint if args.checkpoint else Config.preset(args.preset, base=args.base)


def add_compile_option(parser) -> None:
    """--compile [BACKEND]: torch.compile the trainable step (inductor unless a backend is named)."""
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="run the trainable step through torch.compile (backend inductor unless named; "
                        "results agree with the plain path to floating-point tolerance)")
