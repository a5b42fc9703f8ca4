"""List or clear the frozen-feature cache (one folder per encoder setting, one file per image).

The cache holds the CLIP features of training sets (read every epoch) and of the evaluation
sets the ablations read again; at 518 px an image takes 10.7 MiB (ViT-L-14-336, four taps,
fp16). A folder made by other code (a changed encoder, preprocessing or library version) is
never read again: it is marked stale and `pmoe cache clear --stale` removes it.

Usage:
    pmoe cache list                              # folders, settings, entries, sizes
    pmoe cache clear --stale                     # remove what the current code cannot use
    pmoe cache clear 3f9c2a...                   # remove one folder (its key, from `list`)
    pmoe cache clear --all --cache-dir /scratch/pmoe-cache
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=["list", "clear"], help="list the cache folders, or clear some")
    parser.add_argument("keys", nargs="*", metavar="KEY", help="folders to clear (keys as `pmoe cache list` shows)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--stale", action="store_true", help="clear only the folders made by other code")
    which.add_argument("--all", action="store_true", help="clear every folder")
    parser.add_argument("--cache-dir", help="cache folder (default $PMOE_CACHE or ~/.cache/pmoe/features)")


def run(args) -> int:
    from pmoe.errors import PmoeError
    from pmoe.features import cache_listing, clear_cache, default_cache_dir

    root = args.cache_dir or default_cache_dir()
    if args.action == "list":
        print(listing_text(cache_listing(root), root))
        return 0
    if not (args.keys or args.stale or args.all):
        raise PmoeError("say what to clear: folder keys (see `pmoe cache list`), --stale or --all")
    if args.keys and args.all:
        raise PmoeError("pass folder keys or --all, not both")
    removed = clear_cache(root, args.keys, stale=args.stale)
    print(f"removed {len(removed)} folder(s) from {root}" + (f": {', '.join(removed)}" if removed else ""))
    return 0


def listing_text(rows: list, root) -> str:
    """The listing as a table with a total line."""
    if not rows:
        return f"the feature cache {root} is empty"
    lines = [f"{'key':<26}{'model':<16}{'px':>5}  {'layers':<16}{'prec':<6}{'entries':>8}{'size':>10}  state"]
    for row in rows:
        layers = ",".join(map(str, row["layers"] or [])) or "?"
        lines.append(f"{row['key']:<26}{str(row['clip_model']):<16}{str(row['image_size']):>5}  {layers:<16}"
                     f"{str(row['precision']):<6}{row['entries']:>8}{row['bytes'] / 1e9:>8.2f} GB  "
                     f"{'current' if row['current'] else 'stale'}")
    total = sum(row["bytes"] for row in rows)
    lines.append(f"{len(rows)} folder(s), {total / 1e9:.2f} GB in {root}")
    return "\n".join(lines)
