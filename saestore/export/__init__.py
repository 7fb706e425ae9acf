"""``python -m saestore export delphi|neuronpedia RUN OUT``: a run in another tool's input layout.

* ``delphi`` (:mod:`saestore.export.delphi`): EleutherAI delphi's latent cache, one folder per
  hookpoint of safetensors splits (needs the ``export`` extra: safetensors).
* ``neuronpedia`` (:mod:`saestore.export.neuronpedia`): Neuronpedia's bulk export batches,
  gzipped JSONL of features and of activations.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    if args.target == "delphi":
        from saestore.extras import require

        require("export", what="export delphi")
        from saestore.export.delphi import export_delphi

        paths = export_delphi(args.run, args.out, layer_type=args.layer_type, layer=args.layer,
                              n_splits=args.n_splits, model_name=args.model_name, pad_token_id=args.pad_token_id)
        print(f"wrote {len(paths)} delphi hookpoint folders to {args.out}: {', '.join(p.name for p in paths)}")
        return 0
    from saestore.export.neuronpedia import export_neuronpedia

    folder = export_neuronpedia(args.run, args.out, layer_type=args.layer_type, layer=args.layer,
                                features=args.feature, model_id=args.model_name, source_set=args.source_set,
                                batch_size=args.batch_size, k=args.k, window=args.window, creator_id=args.creator_id)
    print(f"wrote the Neuronpedia export to {folder}")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` sub-command."""
    p = subparsers.add_parser("export", help="write a run in delphi's or Neuronpedia's input layout",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=["delphi", "neuronpedia"])
    p.add_argument("run", help="run path or fsspec URL")
    p.add_argument("out", help="output folder")
    p.add_argument("--layer_type", nargs="+", help="delphi: layer types (default: all); neuronpedia: exactly one")
    p.add_argument("--layer", nargs="+", type=int, help="delphi: layers (default: all); neuronpedia: exactly one")
    p.add_argument("--model_name", help="model id written into the export (default: the run's model)")
    p.add_argument("--n_splits", type=int, default=5, help="delphi: latent splits per hookpoint (at least enough "
                   "for 65,536 latents per split; default: 5)")
    p.add_argument("--pad_token_id", type=int, default=0, help="delphi: token id written at padding (default: 0)")
    p.add_argument("--feature", nargs="+", type=int, help="neuronpedia: features (default: all)")
    p.add_argument("--source_set", help="neuronpedia: source set name (default: saestore-{layer_type})")
    p.add_argument("--batch_size", type=int, default=128, help="neuronpedia: features per batch file (default: 128)")
    p.add_argument("--k", type=int, default=20, help="neuronpedia: top activations per feature (default: 20)")
    p.add_argument("--window", type=int, default=24, help="neuronpedia: tokens each side (default: 24)")
    p.add_argument("--creator_id", default="", help="neuronpedia: the creatorId of every row (default: empty)")
    p.set_defaults(func=_run)
    return p
