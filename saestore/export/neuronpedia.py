"""A run's SAE as Neuronpedia's bulk export batches (the layout of SAEDashboard's
``neuronpedia_export.py`` and Neuronpedia's ``convert-saedashboard-to-neuronpedia-export.py``)::

    OUT/{model_id}/{source_id}/features/batch-{n}.jsonl.gz      # one Neuron row per feature
    OUT/{model_id}/{source_id}/activations/batch-{n}.jsonl.gz   # one Activation row per example
    OUT/{model_id}/{source_id}/skipped_indexes.json             # features never active (no rows)
    OUT/{model_id}/{source_id}/model.jsonl, sourceset.jsonl, source.jsonl   # one row each

with ``source_id = "{layer}-{source_set}"``. Feature rows carry ``modelId``, ``layer`` (the source
id), ``index`` (a string), ``hookName``, ``maxActApprox``, ``frac_nonzero`` (the density) and the
activation histogram ``freq_hist_data_bar_values`` (geometric bin centres) /
``freq_hist_data_bar_heights`` (counts); the weight-derived fields (logits, vectors, neuron
alignment, correlations) are empty lists, since a run stores activations only. Activation rows
carry ``tokens``, ``values`` (the feature's activation on every token), ``maxValue``,
``maxValueTokenIndex``, ``minValue``, ``binMin``/``binMax``/``binContains`` (top activations:
``-1``/max/``-1``; quantile bins: the bin's value range and the fraction of active values in it)
and ``dataSource`` / ``dataIndex`` (saestore's author and doc id). The rows have the fields of
SAEDashboard's ``Activation``, ``Feature``, ``Model``, ``SourceSet`` and ``Source`` dataclasses
(mirrors of ``neuronpedia_utils.db_models``); ``creatorId`` is ``--creator_id`` (Neuronpedia's
bulk import wants the id of an existing user). Features are computed and written
``batch_size`` at a time (:func:`saestore.featuredata.feature_data`), so memory is one batch's.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from saestore.errors import StatsError
from saestore.protocol import ATTRS_KEY

__all__ = ["export_neuronpedia", "feature_row", "activation_rows"]

#: Neuronpedia Neuron fields a run cannot fill (they come from the SAE's and the model's weights)
WEIGHT_FIELDS = ("vector", "topkCosSimIndices", "topkCosSimValues", "neuron_alignment_indices",
                 "neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_indices",
                 "correlated_neurons_l1", "correlated_neurons_pearson", "correlated_features_indices",
                 "correlated_features_l1", "correlated_features_pearson", "neg_str", "neg_values", "pos_str",
                 "pos_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "decoder_weights_dist")


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat()


def _id(*parts: Any) -> str:
    """A stable 25-character id in cuid style ("c" + 24 hex digits) for an activation row."""
    return "c" + hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:24]


def feature_row(f: dict[str, Any], *, model_id: str, source_id: str, hook_name: str, source_set: str,
                creator_id: str = "", created_at: str = "") -> dict[str, Any]:
    """The Neuron row of one feature of :func:`saestore.featuredata.feature_data`."""
    h = f["histogram"]
    centres = [math.sqrt(lo * hi) if lo and hi and lo > 0 else (hi or lo or 0.0) / 2
               for lo, hi in zip(h["lower"], h["upper"], strict=True)]
    row: dict[str, Any] = {"modelId": model_id, "layer": source_id, "index": str(f["feature"]),
                           "creatorId": creator_id, "createdAt": created_at or _now(), "maxActApprox": f["max"] or 0.0,
                           "hasVector": False, "vectorLabel": None, "vectorDefaultSteerStrength": 10,
                           "hookName": hook_name,
                           "frac_nonzero": f["frequency"] or 0.0, "freq_hist_data_bar_values": centres,
                           "freq_hist_data_bar_heights": h["count"], "sourceSetName": source_set}
    row.update({name: [] for name in WEIGHT_FIELDS})
    if f.get("logits"):  # a run extracted with --logit_k: the promoted and suppressed tokens
        for side, prefix in (("positive", "pos"), ("negative", "neg")):
            row[f"{prefix}_str"] = [r["token"] for r in f["logits"][side]]
            row[f"{prefix}_values"] = [r["value"] for r in f["logits"][side]]
    return row


def _activation(ex: dict[str, Any], f: dict[str, Any], base: dict[str, Any], bin_min: float, bin_max: float,
                bin_contains: float, key: tuple[Any, ...]) -> dict[str, Any]:
    values = [0.0 if v is None else v for v in ex["acts"]]
    return {"id": _id(*key), "tokens": ex["tokens"], "index": str(f["feature"]), **base,
            "maxValue": max(values), "maxValueTokenIndex": int(np.argmax(values)), "minValue": min(values),
            "values": values, "dataSource": ex["author"], "dataIndex": str(ex["doc_id"]),
            "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None, "lossValues": [], "logitContributions": None,
            "binMin": bin_min, "binMax": bin_max, "binContains": bin_contains, "qualifyingTokenIndex": ex["center"],
            "zIndices": None, "zValues": None}


def activation_rows(f: dict[str, Any], *, model_id: str, source_id: str, creator_id: str = "",
                    created_at: str = "") -> list[dict[str, Any]]:
    """The Activation rows of one feature: its top activations, then its quantile-bin examples."""
    base = {"layer": source_id, "modelId": model_id, "creatorId": creator_id, "createdAt": created_at or _now()}
    rows = [_activation(ex, f, base, -1, f["max"] or 0.0, -1, (model_id, source_id, f["feature"], "top", r))
            for r, ex in enumerate(f["top"])]
    for b, bin_ in enumerate(f["bins"]):
        lo = 0.0 if bin_["lower"] is None else max(bin_["lower"], 0.0)
        hi = f["max"] if bin_["upper"] is None else bin_["upper"]
        rows += [_activation(ex, f, base, lo, hi, bin_["q_upper"] - bin_["q_lower"],
                             (model_id, source_id, f["feature"], b, r)) for r, ex in enumerate(bin_["examples"])]
    return rows


def _write_jsonl_gz(path: Path, rows: list[dict[str, Any]]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")


def export_neuronpedia(run: str, out: str | Path, *, layer_type: Sequence[str] | str | None, layer: Sequence[int] | int | None,
                       features: Sequence[int] | None = None, model_id: str | None = None,
                       source_set: str | None = None, batch_size: int = 128, k: int = 20, window: int = 24,
                       creator_id: str = "", show_progress: bool | None = None) -> Path:
    """Write the ``layer_type`` SAE at ``layer`` of ``run`` (its ``features``, default all) as
    Neuronpedia export batches under ``out``; returns the source folder."""
    from saestore.featuredata import feature_data
    from saestore.reader import open_run

    lts = [layer_type] if isinstance(layer_type, str) else list(layer_type or [])
    layers = [layer] if isinstance(layer, int) else list(layer or [])
    if len(lts) != 1 or len(layers) != 1:
        raise StatsError("export neuronpedia writes one SAE: give exactly one --layer_type and one --layer")
    lt, L = lts[0], int(layers[0])
    if batch_size < 1:
        raise StatsError(f"--batch_size must be >= 1, got {batch_size}")
    out = Path(out)
    if not out.parent.expanduser().resolve().is_dir():
        raise StatsError(f"cannot write {out}: the folder {out.parent} does not exist; create it or choose another OUT")
    ds = open_run(run)
    from saestore.stats._select import make_selection

    make_selection(ds, lt, layer=L, feature=features)  # names a layer type, layer or feature the run lacks
    attrs = ds.attrs.get(ATTRS_KEY, {})
    model = model_id or str(attrs.get("model") or "model")
    model_dir = "".join(c if c.isalnum() or c in "._-" else "-" for c in model.split("/")[-1])
    source_set = source_set or f"saestore-{lt}"
    source_id = f"{L}-{source_set}"
    hook_name = str(attrs.get("saes", {}).get(lt, {}).get(str(L), {}).get("hook_name") or "")
    feats = [int(f) for f in (features if features is not None else ds["feature"].values)]
    folder = out / model_dir / "".join(c if c.isalnum() or c in "._-" else "-" for c in source_id)
    (folder / "features").mkdir(parents=True, exist_ok=True)
    (folder / "activations").mkdir(parents=True, exist_ok=True)
    now = _now()
    meta = {
        "model": {"id": model, "instruct": model.endswith("-it"), "creatorId": creator_id, "displayNameShort": model,
                  "displayName": model, "tlensId": None, "dimension": None, "visibility": "PUBLIC",
                  "defaultSourceSetName": None, "defaultSourceId": None, "inferenceEnabled": False,
                  "layers": int(ds.sizes["layer"]), "neuronsPerLayer": int(ds.sizes["feature"]), "createdAt": now,
                  "owner": "", "updatedAt": now, "website": None},
        "sourceset": {"modelId": model, "name": source_set, "creatorId": creator_id, "hasDashboards": True,
                      "visibility": "PUBLIC", "description": f"saestore {lt} SAEs", "type": "", "creatorName": "",
                      "urls": [], "creatorEmail": None, "releaseName": None, "defaultOfModelId": None,
                      "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
                      "showHeadAttribution": False, "showUmap": False, "createdAt": now},
        "source": {"id": source_id, "modelId": model, "setName": source_set, "creatorId": creator_id,
                   "hasDashboards": True, "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None,
                   "saelensRelease": None, "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None,
                   "visibility": "PUBLIC", "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False,
                   "hasUmapClusters": False, "num_prompts": int(ds["n_docs"].values.sum()),
                   "num_tokens_in_prompt": int(ds.sizes["tok"]), "dataset": None, "notes": "exported by saestore",
                   "createdAt": now},
    }
    for name, row in meta.items():
        (folder / f"{name}.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    skipped: list[int] = []
    batches = [feats[i:i + batch_size] for i in range(0, len(feats), batch_size)]
    for n, batch in enumerate(tqdm(batches, desc="neuronpedia batches", unit="batch",
                                   disable=None if show_progress is None else not show_progress)):
        data = feature_data(ds, lt, L, batch, k=k, window=window, show_progress=False)
        live = [f for f in data["features"] if f["count"] > 0]
        skipped += [f["feature"] for f in data["features"] if f["count"] == 0]
        _write_jsonl_gz(folder / "features" / f"batch-{n}.jsonl.gz",
                        [feature_row(f, model_id=model, source_id=source_id, hook_name=hook_name,
                                     source_set=source_set, creator_id=creator_id, created_at=now) for f in live])
        _write_jsonl_gz(folder / "activations" / f"batch-{n}.jsonl.gz",
                        [r for f in live for r in activation_rows(f, model_id=model, source_id=source_id,
                                                                  creator_id=creator_id, created_at=now)])
    (folder / "skipped_indexes.json").write_text(json.dumps(skipped), encoding="utf-8")
    return folder
