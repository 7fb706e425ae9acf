"""Train a logistic-regression author probe on the SAE features of a saestore run.

    python examples/author_probe.py                      # extracts the built-in demo run first
    python examples/author_probe.py runs/demo/tiny/probe.zarr --layer 3 --level token

Documents are split into train and held-out sets by document (the same random doc positions are
held out for every author), the probe is a linear layer trained with Adam on standardized
features — per-document mean-pooled (``--level document``, :class:`saestore.torch.DocumentDataset`)
or per-token (``--level token``, :class:`saestore.torch.ShuffledTokenDataset`; documents are then
classified by summing their tokens' log-probabilities) — and held-out accuracy is printed next to
chance (1 / number of authors).

Without a run path it first extracts the built-in corpus with the built-in tiny model (offline):
``--model tiny --dataset_name demo --layers 1 3 --layer_types res --sae_features_width 1k
--use_error_term --n_docs_per_author 24 --max_seq_len 128`` into ``--output_dir`` (default ``runs``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch.utils.data import DataLoader

from saestore.torch import DocumentDataset, ShuffledTokenDataset, SparseBatch, TokenDataset

DEMO_ARGS = ["--model", "tiny", "--dataset_name", "demo", "--layers", "1", "3", "--layer_types", "res",
             "--sae_features_width", "1k", "--use_error_term", "--n_docs_per_author", "24", "--max_seq_len", "128"]


def split_docs(n_doc_positions: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) doc positions: a seeded random ``test_fraction`` of positions is held out."""
    perm = np.random.default_rng(seed).permutation(n_doc_positions)
    n_test = max(1, round(test_fraction * n_doc_positions))
    return sorted(perm[n_test:].tolist()), sorted(perm[:n_test].tolist())


def _scaled(batch: SparseBatch, inv_scale_F: torch.Tensor) -> SparseBatch:
    return replace(batch, values=batch.values * inv_scale_F[batch.col_indices],
                   dense=None if batch.dense is None else batch.dense * inv_scale_F)


def _feature_scale(loader: DataLoader, n_features: int) -> torch.Tensor:
    """1 / root-mean-square of each feature over the training rows (1 for features never active)."""
    sq, n = torch.zeros(n_features, dtype=torch.float64), 0
    for batch in loader:
        sq.index_add_(0, batch.col_indices, batch.values.double() ** 2)
        n += len(batch)
    rms = (sq / max(n, 1)).sqrt()
    return torch.where(rms > 0, 1.0 / rms, torch.ones_like(rms)).float()


def train_author_probe(
    run_path: str | Path,
    layer_type: str | Sequence[str] = "res",
    layer: int | Sequence[int] | None = None,
    *,
    level: str = "document",
    pool: str = "mean",
    test_fraction: float = 0.25,
    epochs: int = 30,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    batch_size: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Train the probe and return its held-out accuracy (documents) and the facts around it.

    ``level="document"``: one example per document (features pooled with ``pool``);
    ``level="token"``: one example per token, documents classified by summed log-probabilities
    (``test_token_accuracy`` is also reported). ``layer=None`` uses every layer of the run.
    """
    if level not in ("document", "token"):
        raise ValueError(f"level must be 'document' or 'token', not {level!r}")
    torch.manual_seed(seed)
    n_doc_positions = zarr.open_group(str(run_path), mode="r")["doc"].shape[0]
    train_docs, test_docs = split_docs(n_doc_positions, test_fraction, seed)
    sel = {"layer_type": layer_type, "layer": layer}
    if level == "document":
        bs = batch_size or 16
        # pooled document vectors are far less sparse than tokens: densify the (small) batches
        train = DocumentDataset(run_path, pool=pool, doc=train_docs, shuffle=True, seed=seed, batch_size=bs,
                                dense=True, **sel)
        test = DocumentDataset(run_path, pool=pool, doc=test_docs, batch_size=256, dense=True, **sel)
    else:
        bs = batch_size or 256
        train = ShuffledTokenDataset(run_path, doc=train_docs, seed=seed, batch_size=bs, **sel)
        test = TokenDataset(run_path, doc=test_docs, batch_size=4096, **sel)
    n_authors, n_features = len(train.authors), train.n_features

    def loader(ds: Any) -> DataLoader:
        return DataLoader(ds, batch_size=None, num_workers=num_workers)

    inv_scale = _feature_scale(loader(train), n_features)
    weight_FC = torch.zeros(n_features, n_authors, requires_grad=True)
    bias_C = torch.zeros(n_authors, requires_grad=True)
    opt = torch.optim.Adam([weight_FC, bias_C], lr=lr, weight_decay=weight_decay)
    losses = []
    for epoch in range(epochs):
        train.set_epoch(epoch)
        total, n = 0.0, 0
        for batch in loader(train):
            loss = F.cross_entropy(_scaled(batch, inv_scale).linear(weight_FC, bias_C), batch.author)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(batch), n + len(batch)
        losses.append(total / max(n, 1))

    def evaluate(ds: Any) -> tuple[float, float | None, int]:
        """(document accuracy, token accuracy or None, number of documents)."""
        doc_logp: dict[tuple[int, int], torch.Tensor] = {}
        correct_tokens = n_tokens = 0
        with torch.no_grad():
            for batch in loader(ds):
                logp = F.log_softmax(_scaled(batch, inv_scale).linear(weight_FC, bias_C), -1)
                correct_tokens += int((logp.argmax(-1) == batch.author).sum())
                n_tokens += len(batch)
                for i, key in enumerate(zip(batch.author.tolist(), batch.doc.tolist(), strict=True)):
                    doc_logp[key] = doc_logp.get(key, 0) + logp[i]
        doc_acc = float(np.mean([int(v.argmax()) == a for (a, _), v in doc_logp.items()]))
        return doc_acc, (correct_tokens / n_tokens if level == "token" else None), len(doc_logp)

    test_acc, test_tok_acc, n_test = evaluate(test)
    train_eval = DocumentDataset(run_path, pool=pool, doc=train_docs, batch_size=256, **sel) \
        if level == "document" else TokenDataset(run_path, doc=train_docs, batch_size=4096, **sel)
    train_acc, _, n_train = evaluate(train_eval)
    out = {"run_path": str(run_path), "blocks": train.blocks, "level": level,
           "pool": pool if level == "document" else None,
           "authors": train.authors, "n_authors": n_authors, "n_features": n_features,
           "n_train_docs": n_train, "n_test_docs": n_test, "epochs": epochs,
           "test_accuracy": test_acc, "train_accuracy": train_acc, "chance": 1.0 / n_authors,
           "final_train_loss": losses[-1] if losses else None}
    if test_tok_acc is not None:
        out["test_token_accuracy"] = test_tok_acc
    return out


def _demo_run(output_dir: str) -> Path:
    from saestore.extract.launch import main

    code = main([*DEMO_ARGS, "--output_dir", output_dir, "--run_name", "probe", "--quiet"])
    if code != 0:
        raise SystemExit(code)
    return Path(output_dir) / "demo" / "tiny" / "probe.zarr"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_path", nargs="?", help="a saestore run (default: extract the built-in demo first)")
    parser.add_argument("--output_dir", default="runs", help="where the demo run is extracted")
    parser.add_argument("--layer_type", default="res")
    parser.add_argument("--layer", type=int, nargs="*", help="layers (default: all)")
    parser.add_argument("--level", choices=["document", "token"], default="document")
    parser.add_argument("--pool", choices=["mean", "max", "sum"], default="mean")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--test_fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=0)
    args = parser.parse_args(argv)
    run_path = Path(args.run_path) if args.run_path else _demo_run(args.output_dir)
    result = train_author_probe(run_path, args.layer_type, args.layer or None, level=args.level, pool=args.pool,
                                epochs=args.epochs, lr=args.lr, test_fraction=args.test_fraction, seed=args.seed,
                                num_workers=args.num_workers)
    print(json.dumps(result, indent=2, default=str))
    print(f"held-out accuracy {result['test_accuracy']:.3f} over {result['n_test_docs']} documents "
          f"vs chance {result['chance']:.3f} ({result['n_authors']} authors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
