"""Write (and with --execute, run in place) the notebooks in notebooks/.

The notebooks are generated from this file so that their code is reviewed like code; the test suite
executes the committed .ipynb files (tests/test_notebooks.py), so they cannot rot.

    python scripts/make_notebooks.py --execute
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]

SETUP = '''\
import os
from pathlib import Path

# The run to look at: $SAESTORE_RUN, or a run of the built-in tiny model on the built-in corpus,
# extracted here on first use (about a minute on 2 CPU cores; later runs find it complete).
RUN = os.environ.get("SAESTORE_RUN")
if RUN is None:
    from saestore.extract.launch import main as extract
    out = Path("runs")
    code = extract(["--model", "tiny", "--dataset_name", "demo", "--layers", "1", "3",
                    "--layer_types", "res", "mlp", "att", "--sae_features_width", "1k", "--max_seq_len", "64",
                    "--use_error_term", "--output_dir", str(out), "--run_name", "notebook", "--quiet"])
    assert code == 0
    RUN = str(out / "demo" / "tiny" / "notebook.zarr")
RUN'''


def open_a_run() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# 01 · Open a run\n\n"
            "A saestore run is one Zarr v3 store that opens as one xarray Dataset with plain `xr.open_zarr` — "
            "no `import saestore` needed, the `saestore.sparse_coo` codec is found through its entry point. "
            "This notebook looks at what is inside: coordinates, SAE activations, the valid mask, tokens and "
            "per-token metrics, and the sparse reader."),
        new_code_cell(SETUP),
        new_code_cell("import json\n\nimport numpy as np\nimport pandas as pd\nimport xarray as xr\n\n"
                      "ds = xr.open_zarr(RUN)\nds"),
        new_markdown_cell(
            "Run-level facts live in the root attribute `saestore` as plain JSON (PROTOCOL.md §4): the config, "
            "its hash, the SAEs per layer type and layer, library versions and the status."),
        new_code_cell('attrs = ds.attrs["saestore"]\n'
                      'print(json.dumps({k: attrs[k] for k in ("protocol_version", "status", "model", "setting", '
                      '"use_error_term", "storage")}, indent=1))\n'
                      'pd.DataFrame({f"{lt} {layer}": info for lt, by_layer in attrs["saes"].items() '
                      'for layer, info in by_layer.items()}).T[["hook_name", "width", "expected_l0", "architecture"]]'),
        new_markdown_cell(
            "## Selecting\n\nAuthors are coordinate values (never paths). Select an author, a layer type and a "
            "layer like any xarray object; nothing is read until values are needed."),
        new_code_cell('author = str(ds.author.values[-1])\n'
                      'acts = ds.res.sel(author=author, layer=3).isel(doc=0)   # (tok, feature)\n'
                      'acts'),
        new_markdown_cell(
            "## Tokens, the valid mask and the metrics\n\n`tok = 0` is the first document token after BOS (and "
            "after the prompt in the `prompted` setting). `ce_loss[t]` is the loss of predicting token `t` from "
            "everything before it; `entropy[t]` is the entropy of the model's prediction of the next token. "
            "Padding has `valid_mask == False`, exact zeros in the SAE variables and NaN metrics."),
        new_code_cell('doc = ds.sel(author=author).isel(doc=0)\n'
                      'n = int(doc.doc_length)\n'
                      'table = pd.DataFrame({\n'
                      '    "token": doc.token.values[:n],\n'
                      '    "ce_loss": doc.ce_loss.values[:n],\n'
                      '    "entropy": doc.entropy.values[:n],\n'
                      '    "res L0 (layer 3)": (acts.values[:n] > 0).sum(axis=1),\n'
                      '})\n'
                      'print(f"{n} valid tokens of {ds.sizes[\'tok\']}; text: {str(doc.text.values)[:80]!r}...")\n'
                      'table.head(12)'),
        new_code_cell('valid = doc.valid_mask.values\n'
                      'assert valid[:n].all() and not valid[n:].any()\n'
                      'assert not acts.values[n:].any() and np.isnan(doc.ce_loss.values[n:]).all()\n'
                      'import matplotlib.pyplot as plt\n'
                      'fig, ax = plt.subplots(figsize=(8, 2.6))\n'
                      'ax.plot(table.ce_loss, label="ce_loss"); ax.plot(table.entropy, label="entropy")\n'
                      'ax.set_xlabel("tok"); ax.set_ylabel("nats"); ax.legend(); ax.set_title(f"{author}, doc 0")\n'
                      'plt.show()'),
        new_markdown_cell(
            "## The sparse reader\n\n`saestore.open_run` returns the same Dataset, except that SAE variables are "
            "dask arrays whose blocks are `sparse.COO`, decoded straight from the chunk bytes — never densified. "
            "Use it for anything bigger than a few documents."),
        new_code_cell('import saestore\n\n'
                      'sp = saestore.open_run(RUN)\n'
                      'block = sp.res.sel(author=author, layer=3).isel(doc=0).data.compute()\n'
                      'print(type(block).__name__, block.shape, "nonzeros:", block.nnz)\n'
                      'assert np.array_equal(block.todense(), acts.values)\n'
                      'sp.res.data'),
        new_code_cell('# per-author totals over valid tokens, lazily: L0 = active features per valid token\n'
                      'valid = sp.valid_mask\n'
                      'active = (sp.res.data != 0).sum(axis=-1)          # (author, layer, doc, tok), sparse\n'
                      'n_active = active.sum(axis=(2, 3)).compute().todense()\n'
                      'pd.DataFrame(n_active / valid.sum(("doc", "tok")).values[:, None], index=sp.author.values,\n'
                      '             columns=[f"mean L0 res {l}" for l in sp.layer.values])'),
    ]
    return new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                              "language": "python"}})


def author_features() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# 02 · Which features belong to which author?\n\n"
            "Lazy statistics over the sparse chunks (`saestore.stats`, also as the `ds.sae` accessor): feature "
            "density, L0 per author, the most author-specific features (smoothed log-odds) and their top "
            "activating examples. Every statistic streams `sparse.COO` blocks through dask with bounded memory; "
            "the same code runs on a `dask.distributed` cluster."),
        new_code_cell(SETUP),
        new_code_cell('%matplotlib inline\nimport pandas as pd\n\nimport saestore\n'
                      'import saestore.stats as st\nfrom saestore import plots\n\n'
                      'ds = saestore.open_run(RUN)\nlayer = int(ds.layer.values[-1])\n'
                      'print(ds.sizes)'),
        new_markdown_cell("## Feature density\n\nFraction of valid tokens on which each feature fires, per SAE."),
        new_code_cell('freq = ds.sae.frequency(layer_type="res").compute()\n'
                      'display(plots.feature_density(freq))\n'
                      'dead = ds.sae.dead_features(layer_type="res").compute()\n'
                      'print("dead features per layer:", dead.sum("feature").values)'),
        new_markdown_cell("## L0 per author"),
        new_code_cell('hist = st.l0_histogram(ds, "res", by="author").compute()\n'
                      'display(plots.l0_distribution(hist))\n'
                      'st.l0_summary(ds, "res", by="author").compute().to_dataframe().round(1)'),
        new_markdown_cell(
            "## Author-specific features\n\nFor each author, the features whose firing frequency most separates "
            "that author from the others: smoothed log-odds `log((c+α)/(n−c+α)) − log((c'+α)/(n'−c'+α))`, with "
            "its z-score, where `c`, `n` are the author's active and valid token counts and `c'`, `n'` the rest's."),
        new_code_cell('spec = st.author_specificity(ds, "res", layer=layer).compute()\n'
                      'plots.author_heatmap(spec, n=4)'),
        new_code_cell('top = st.top_author_features(ds, "res", layer=layer, k=3).compute()\n'
                      'top.to_dataframe()[["feature", "z", "log_odds", "count", "frequency", "frequency_rest"]].round(3)'),
        new_markdown_cell("## What do they fire on?\n\nTop tokens and top activating examples of each author's most "
                          "specific feature; the built-in corpus gives each author a distinctive vocabulary, and "
                          "these features pick it up."),
        new_code_cell('best = {str(a): int(top.feature.sel(author=a, rank=0)) for a in top.author.values}\n'
                      'tokens = st.top_tokens(ds, "res", layer=layer, feature=list(best.values()), k=5, '
                      'min_count=2).compute()\n'
                      'pd.DataFrame({a: [str(t).strip() for t in tokens.token.sel(feature=f).values] '
                      'for a, f in best.items()})'),
        new_code_cell('author, feature = next(iter(best.items()))\n'
                      'examples = st.top_examples(ds, "res", layer=layer, feature=feature, k=6, window=6).compute()\n'
                      'plots.feature_card(examples, feature=feature)'),
        new_markdown_cell("## Loss where a feature fires\n\nMean per-token CE loss and entropy on tokens where "
                          "each author's top feature is active vs not."),
        new_code_cell('st.metric_by_activity(ds, "res", layer=layer, feature=list(best.values())).compute()'
                      '.to_dataframe().round(3)'),
    ]
    return new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                              "language": "python"}})


NOTEBOOKS = {"01_open_a_run.ipynb": open_a_run, "02_author_features.ipynb": author_features}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--execute", action="store_true", help="execute in notebooks/ and keep the outputs")
    args = parser.parse_args()
    out = ROOT / "notebooks"
    out.mkdir(exist_ok=True)
    for name, make in NOTEBOOKS.items():
        nb = make()
        if args.execute:
            from nbclient import NotebookClient

            NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(out)}}).execute()
        nbformat.write(nb, out / name)
        print("wrote", out / name)


if __name__ == "__main__":
    main()
