"""Text-encoder speed: full 77-token context vs exact truncation, one batched call each.

Usage:
    python benchmarks/text_encoder.py                 # ViT-L-14-336 text tower, random weights
    python benchmarks/text_encoder.py --images 4 --repeats 1   # quicker
    python benchmarks/text_encoder.py --device cuda   # on a GPU

All prompts of a training step (images x layers x states) go through the frozen text
transformer. The feature at EOT does not depend on later tokens (causal mask), so running only
up to the last EOT gives the same features. Both variants run side by side in one process;
the script prints each time, the speed ratio and the largest feature difference.
"""

from __future__ import annotations

import argparse
import time

import torch

import pmoe


def time_call(fn, repeats: int) -> tuple:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    config = pmoe.Config.preset(args.preset).replace(clip_weights="random")
    model = pmoe.build_model(config).to(args.device).eval()
    count = args.images * config.num_layers * 2
    width = model.text.width
    torch.manual_seed(0)
    states = torch.randn(count, config.normal_len + config.abnormal_len, width, device=args.device) * 0.02
    context = torch.randn(count, config.ctx_len, width, device=args.device) * 0.02
    ids = model.assembler.class_token_ids([config.class_name]) * count
    sequences, eot = model.assembler(states, context, ids)
    print(f"{config.clip_model} text tower, {args.images} images x {config.num_layers} layers x 2 states "
          f"= {count} prompts, longest EOT at position {int(eot.max())}, device {args.device}")

    model.text.truncate = False
    full_time, full = time_call(lambda: model.text(sequences, eot), args.repeats)
    model.text.truncate = True
    short_time, short = time_call(lambda: model.text(sequences, eot), args.repeats)
    print(f"full 77-token context : {full_time * 1000:9.1f} ms")
    print(f"truncated to {int(eot.max()) + 1:>2} tokens : {short_time * 1000:9.1f} ms")
    print(f"speed ratio           : {full_time / short_time:9.2f}x")
    print(f"max |difference|      : {(full - short).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
