"""Show a preset's configuration and parameter counts, or list every preset.

Examples:
    pmoe describe --presets
    pmoe describe --preset paper          # builds ViT-L-14-336 with random weights (~2 GB RAM)
    pmoe describe --preset table6-e16-k8 --base tiny
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="paper", help="preset name (default: paper)")
    parser.add_argument("--base", default="paper", help="base preset an ablation is laid over (default: paper)")
    parser.add_argument("--presets", action="store_true", help="list every preset and exit")
    parser.add_argument("--config-only", action="store_true", help="print the configuration without building the model")


def run(args) -> int:
    from pmoe.config import Config

    if args.presets:
        print("\n".join(Config.presets()))
        return 0
    config = Config.preset(args.preset, base=args.base)
    print(config.to_json())
    if args.config_only:
        return 0
    from pmoe.model import build_model

    # Parameter counts do not depend on the weights: build with random CLIP weights, offline.
    model = build_model(config.replace(clip_weights="random"))
    print(f"\nparameters of preset {args.preset!r} ({config.clip_model}):")
    for group, count in model.parameter_counts().items():
        print(f"  {group:<18} {count:>13,d}")
    return 0
