"""``python -m saestore dashboard RUN --layer_type res --layer 3 [--feature F ...]
[--top_author_features N] --out DIR``: a static, self-contained feature dashboard of one SAE.

``DIR/index.html`` lists the chosen features (sortable by frequency, max and author specificity,
filtered by author); ``DIR/features/{id}.html`` is one page per feature: its top-k contexts with
every token shaded by the feature's activation (the value on hover), examples from activation
quantile bins, a log-binned histogram (inline SVG), its density, and its frequency and
specificity per author. Plain HTML with inline CSS and JS and the page's data as inline JSON: it
opens from disk, with no server and no network. The data is :func:`saestore.featuredata.feature_data`.

Author names, tokens and texts come from the corpus and are untrusted: every one is written through
:func:`html.escape` (HTML) or :func:`_json_script` (inline JSON), never as markup; the index's
script only sets ``textContent``.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saestore.errors import StatsError

__all__ = ["register", "write_dashboard", "choose_features", "render_feature_page", "render_index"]

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
a{color:#0b5cad;text-decoration:none} a:hover{text-decoration:underline}
.sub{color:#666;margin-bottom:14px} .row{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
dl.stats{display:grid;grid-template-columns:auto auto;gap:2px 14px;margin:0} dl.stats dt{color:#666} dl.stats dd{margin:0;font-weight:600}
table{border-collapse:collapse} th,td{padding:3px 10px;text-align:right;border-bottom:1px solid #eee}
th:first-child,td:first-child,th.l,td.l{text-align:left} th{background:#f6f6f6;cursor:default}
table.sortable th{cursor:pointer;user-select:none} table.sortable th:hover{background:#eaeaea}
.ex{display:flex;gap:10px;padding:3px 0;border-bottom:1px dotted #eee;align-items:baseline}
.ex .v{min-width:58px;text-align:right;font-weight:600;font-variant-numeric:tabular-nums}
.ex .m{min-width:150px;max-width:150px;color:#777;font-size:12px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;white-space:pre-wrap;word-break:break-word}
.ctx span{border-radius:2px} .ctx .hit{outline:2px solid #c33;outline-offset:0} .ctx .cont{display:inline-block;min-width:3px;min-height:1em;vertical-align:text-bottom}
.bin h3{font-size:14px;margin:14px 0 4px;color:#444} .empty{color:#999;font-style:italic}
svg text{font-size:10px;fill:#555} .bar{fill:#e8743b}
select,input{font:inherit;padding:2px 4px}
"""

INDEX_JS = """
const data = JSON.parse(document.getElementById('data').textContent);
const tbody = document.querySelector('#features tbody');
const sel = document.getElementById('author');
let key = 'frequency', dir = -1;
function zOf(r){ const a = sel.value; return a === '' ? r.top_z : r.z[data.authors.indexOf(a)]; }
function fmt(x, d){ return x === null || x === undefined ? '–' : Number(x).toPrecision(d); }
function render(){
  const a = sel.value;
  let rows = data.rows.filter(r => a === '' || r.top_author === a);
  const val = r => key === 'z' ? zOf(r) : r[key];
  rows.sort((p, q) => { const x = val(p), y = val(q);
    if (x === y) return p.feature - q.feature;
    if (x === null) return 1; if (y === null) return -1;
    return (x < y ? -1 : 1) * dir; });
  const frag = document.createDocumentFragment();
  for (const r of rows){
    const tr = document.createElement('tr'); tr.dataset.feature = r.feature;
    const td0 = document.createElement('td'); const link = document.createElement('a');
    link.href = 'features/' + r.feature + '.html'; link.textContent = r.feature; td0.appendChild(link); tr.appendChild(td0);
    for (const [v, d] of [[r.frequency, 3], [r.max, 4], [r.count, 0]]){
      const td = document.createElement('td'); td.textContent = d ? fmt(v, d) : v; tr.appendChild(td); }
    const tda = document.createElement('td'); tda.textContent = r.top_author; tda.style.textAlign = 'left'; tr.appendChild(tda);
    const tdz = document.createElement('td'); tdz.textContent = fmt(zOf(r), 3); tdz.className = 'z'; tr.appendChild(tdz);
    const tde = document.createElement('td'); tde.textContent = r.example; tde.className = 'ctx'; tde.style.textAlign = 'left'; tr.appendChild(tde);
    frag.appendChild(tr);
  }
  tbody.replaceChildren(frag);
  document.getElementById('shown').textContent = rows.length + ' of ' + data.rows.length + ' features';
}
for (const th of document.querySelectorAll('#features th[data-key]')){
  th.addEventListener('click', () => { const k = th.dataset.key;
    dir = (k === key) ? -dir : (k === 'feature' ? 1 : -1); key = k; save(); render(); });
}
sel.addEventListener('change', () => { save(); render(); });
// the view is in the address (#author=NAME&sort=KEY&dir=asc), so a filtered, sorted index can be linked
function save(){ const p = new URLSearchParams(); if (sel.value) p.set('author', sel.value);
  p.set('sort', key); p.set('dir', dir > 0 ? 'asc' : 'desc'); history.replaceState(null, '', '#' + p.toString()); }
const init = new URLSearchParams(location.hash.slice(1));
if (init.has('author') && data.authors.includes(init.get('author'))) sel.value = init.get('author');
if (['feature', 'frequency', 'max', 'count', 'z'].includes(init.get('sort'))) key = init.get('sort');
if (init.has('dir')) dir = init.get('dir') === 'asc' ? 1 : -1;
render();
"""


def _e(x: Any) -> str:
    """HTML-escaped text of anything (quotes too, so it is safe in attributes)."""
    return html.escape(str(x), quote=True)


def _json_script(obj: Any, id_: str) -> str:
    """``obj`` as an inline ``<script type="application/json">``: ``<``, ``>`` and ``&`` are
    written as JSON escapes, so no string can close the element or open a comment."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f'<script type="application/json" id="{_e(id_)}">{text}</script>'


def _fmt(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def _page(title: str, body: str, script: str = "") -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            f"{f'<script>{script}</script>' if script else ''}</body></html>\n")


def _shown_token(tok: str) -> str:
    """A token's text as shown: newlines and tabs made visible, everything else as it is in the document
    (an empty piece, a token continuing a character begun by the one before, adds no text)."""
    return tok.replace("\n", "↵").replace("\t", "⇥")


def _example_html(ex: dict[str, Any], vmax: float) -> str:
    """One example: value, author · doc id, then the window's tokens shaded by activation."""
    spans = []
    for i, (tok, act) in enumerate(zip(ex["tokens"], ex["acts"], strict=True)):
        a = 0.0 if act is None or vmax <= 0 else max(0.0, min(1.0, act / vmax))
        classes = " ".join(c for c, on in (("hit", i == ex["center"]), ("cont", not tok)) if on)
        attrs = f' class="{classes}"' if classes else ""
        if act:  # active (nonzero): the value on hover, shaded by value / the feature's max
            attrs += f' title="{act:.4g}"' + (f' style="background:#e8743b{round(a * 230):02x}"' if a > 0 else "")
        spans.append(f"<span{attrs}>{_e(_shown_token(tok))}</span>")
    meta = f"{ex['author']} · doc {ex['doc_id']} · tok {ex['tok']}"
    return (f'<div class="ex" data-author="{_e(ex["author"])}" data-doc-id="{ex["doc_id"]}" data-tok="{ex["tok"]}">'
            f'<span class="v">{_fmt(ex["value"])}</span><span class="m" title="{_e(meta)}">{_e(meta)}</span>'
            f'<span class="ctx">{"".join(spans)}</span></div>')


def _histogram_svg(h: dict[str, list[Any]], width: int = 460, height: int = 150) -> str:
    """The log-binned histogram of active values as an inline SVG bar chart (log x axis)."""
    counts = h["count"]
    if not counts:
        return '<p class="empty">never active</p>'
    lo = [x if x is not None else h["upper"][0] / 10 for x in h["lower"]]
    hi = [x if x is not None else h["lower"][-1] * 10 for x in h["upper"]]
    x0, x1 = math.log10(lo[0]), math.log10(hi[-1])
    span = max(x1 - x0, 1e-9)
    top = max(counts)
    pad_l, w, hh = 34, width - 44, height - 26
    bars = []
    for a, b, c in zip(lo, hi, counts, strict=True):
        if c == 0:
            continue
        xa = pad_l + (math.log10(a) - x0) / span * w
        xb = pad_l + (math.log10(b) - x0) / span * w
        bh = c / top * hh
        bars.append(f'<rect class="bar" x="{xa:.1f}" y="{8 + hh - bh:.1f}" width="{max(xb - xa - 1, 1):.1f}" '
                    f'height="{bh:.1f}"><title>[{a:.3g}, {b:.3g}): {c}</title></rect>')
    ticks = []
    for p in range(math.floor(x0), math.ceil(x1) + 1):
        if x0 - 1e-9 <= p <= x1 + 1e-9:
            x = pad_l + (p - x0) / span * w
            ticks.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{8 + hh}" y2="{12 + hh}" stroke="#999"/>'
                         f'<text x="{x:.1f}" y="{height - 2}" text-anchor="middle">{10.0 ** p:g}</text>')
    ticks.append(f'<text x="{pad_l}" y="{height - 2}" text-anchor="start">{lo[0]:.3g}</text>'
                 f'<text x="{pad_l + w}" y="{height - 2}" text-anchor="end">{hi[-1]:.3g}</text>'
                 if len(ticks) < 2 else "")
    return (f'<svg id="histogram" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="histogram of active values">'
            f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{8 + hh}" y2="{8 + hh}" stroke="#999"/>'
            f'<text x="{pad_l - 4}" y="14" text-anchor="end">{top}</text>'
            f'<text x="{pad_l - 4}" y="{8 + hh}" text-anchor="end">0</text>{"".join(bars)}{"".join(ticks)}</svg>')


def _logits_html(logits: dict[str, Any] | None) -> str:
    """The promoted and suppressed output tokens (runs made with ``--logit_k``), else nothing."""
    if not logits:
        return ""
    cols = []
    for side, title in (("positive", "promoted"), ("negative", "suppressed")):
        rows = "".join(f'<tr><td class="l ctx">{_e(_shown_token(r["token"]) or "∅")}</td><td>{_fmt(r["value"], 3)}</td></tr>'
                       for r in logits[side])
        cols.append(f'<div><table id="logits-{side}"><thead><tr><th class="l">{title} token</th><th>logit</th></tr>'
                    f"</thead><tbody>{rows}</tbody></table></div>")
    return f'<h2>Logit effects (W_dec · W_U)</h2><div class="row">{"".join(cols)}</div>'


def render_feature_page(data: dict[str, Any], f: dict[str, Any], run_name: str, prev_next: tuple[Any, Any]) -> str:
    """The HTML of one feature page (``f`` one entry of ``data["features"]``)."""
    lt, layer = data["layer_type"], data["layer"]
    vmax = f["max"] or 0.0
    authors = "".join(
        f'<tr data-author="{_e(a["author"])}"><td>{_e(a["author"])}</td><td>{a["count"]}</td>'
        f'<td>{_fmt(a["frequency"])}</td><td>{_fmt(a["log_odds"], 3)}</td><td>{_fmt(a["z"], 3)}</td></tr>'
        for a in sorted(f["authors"], key=lambda a: -(a["z"] if a["z"] is not None else -math.inf)))
    top = "".join(_example_html(ex, vmax) for ex in f["top"]) or '<p class="empty">never active</p>'
    bins = []
    for b in reversed(f["bins"]):
        exs = "".join(_example_html(ex, vmax) for ex in b["examples"]) or '<p class="empty">no examples</p>'
        rng = f"{_fmt(b['lower'], 3) if b['lower'] is not None else '0'} – {_fmt(b['upper'], 3) if b['upper'] is not None else _fmt(f['max'], 3)}"
        bins.append(f'<div class="bin"><h3>{round(100 * b["q_lower"])}–{round(100 * b["q_upper"])}th percentile of '
                    f"active values (activation {_e(rng)})</h3>{exs}</div>")
    prev, nxt = prev_next
    nav = " · ".join(x for x in (
        '<a href="../index.html">all features</a>',
        f'<a href="{prev}.html">← feature {prev}</a>' if prev is not None else "",
        f'<a href="{nxt}.html">feature {nxt} →</a>' if nxt is not None else "") if x)
    body = f"""<div class="sub">{nav}</div>
<h1>{_e(lt)} layer {layer} · feature {f["feature"]}</h1>
<div class="sub">{_e(run_name)}</div>
<div class="row"><div><h2>Density</h2><dl class="stats" id="summary">
<dt>frequency</dt><dd id="frequency">{_fmt(f["frequency"])}</dd><dt>active tokens</dt><dd id="count">{f["count"]:,} of {data["n_valid"]:,}</dd>
<dt>max</dt><dd id="max">{_fmt(f["max"])}</dd><dt>mean when active</dt><dd>{_fmt(f["mean_active"])}</dd></dl></div>
<div><h2>Activation histogram</h2>{_histogram_svg(f["histogram"])}</div></div>
<h2>Authors</h2><table id="authors"><thead><tr><th>author</th><th>active tokens</th><th>frequency</th><th>log-odds</th><th>z</th></tr></thead>
<tbody>{authors}</tbody></table>
{_logits_html(f.get("logits"))}<h2>Top activations</h2><section id="top">{top}</section>
<h2>Examples by activation quantile</h2><section id="bins">{"".join(bins)}</section>
{_json_script(f, "data")}"""
    return _page(f"{lt} L{layer} feature {f['feature']} · {run_name}", body)


def _index_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for f in data["features"]:
        zs = [a["z"] for a in f["authors"]]
        best = max(range(len(zs)), key=lambda i: -math.inf if zs[i] is None else zs[i]) if zs else None
        ex = f["top"][0] if f["top"] else None
        rows.append({"feature": f["feature"], "frequency": f["frequency"], "max": f["max"], "count": f["count"],
                     "z": zs, "top_author": f["authors"][best]["author"] if best is not None else "",
                     "top_z": zs[best] if best is not None else None,
                     "example": "".join(ex["tokens"]).replace("\n", "↵") if ex else ""})
    return rows


def render_index(data: dict[str, Any], run_name: str) -> str:
    """The HTML of the index page (rows built by its script from the inline JSON)."""
    options = "".join(f'<option value="{_e(a)}">{_e(a)}</option>' for a in data["authors"])
    body = f"""<h1>{_e(data["layer_type"])} layer {data["layer"]}: {len(data["features"])} features</h1>
<div class="sub">{_e(run_name)} · {data["n_valid"]:,} valid tokens · click a column to sort</div>
<p><label>author <select id="author"><option value="">all authors</option>{options}</select></label>
<span class="sub" id="shown"></span></p>
<table id="features" class="sortable"><thead><tr><th data-key="feature">feature</th><th data-key="frequency">frequency</th>
<th data-key="max">max</th><th data-key="count">active tokens</th><th class="l">most specific author</th>
<th data-key="z">specificity z</th><th class="l">top example</th></tr></thead><tbody></tbody></table>
{_json_script({"authors": data["authors"], "rows": _index_rows(data)}, "data")}"""
    return _page(f"{data['layer_type']} L{data['layer']} · {run_name}", body, INDEX_JS)


def choose_features(ds: Any, layer_type: str, layer: int, features: Sequence[int] | None,
                    top_author_features: int | None, alpha: float = 0.5,
                    author: Sequence[str] | None = None) -> list[int]:
    """``features`` plus, per author, the ``top_author_features`` features with the highest
    specificity ``z`` (default 10 when no feature is named; with one author, its most frequent
    features), sorted by id."""
    import numpy as np

    from saestore.stats._select import make_selection
    from saestore.stats.core import frequency
    from saestore.stats.relations import author_specificity

    chosen = {int(f) for f in features or ()}
    n = top_author_features if top_author_features is not None else (0 if chosen else 10)
    if n < 0:
        raise StatsError(f"--top_author_features must be >= 0, got {n}")
    if n:
        if make_selection(ds, layer_type, author=author).authors.size >= 2:
            score = author_specificity(ds, layer_type, alpha=alpha, layer=layer, author=author)["z"].compute()
        else:
            score = frequency(ds, layer_type, by="author", layer=layer, author=author).compute()
        zz = np.where(np.isnan(score.values), -np.inf, score.values).reshape(-1, score.sizes["feature"])
        ids = np.asarray(score["feature"].values)
        for row in zz:
            chosen |= {int(ids[i]) for i in np.argsort(-row, kind="stable")[:n]}
    return sorted(chosen)


def write_dashboard(run: str, out: str | Path, *, layer_type: str, layer: int, features: Sequence[int] | None = None,
                    top_author_features: int | None = None, k: int = 20, window: int = 10, n_bins: int = 5,
                    per_bin: int = 5, author: Sequence[str] | None = None,
                    show_progress: bool | None = None) -> Path:
    """Compute and write the dashboard of ``run`` (its ``author`` documents, default all) into the
    folder ``out`` (created; its ``index.html`` and ``features/`` replaced). Nothing is written
    until everything is computed."""
    from tqdm.auto import tqdm

    from saestore.featuredata import feature_data
    from saestore.reader import open_run

    out = Path(out)
    if not out.parent.expanduser().resolve().is_dir():
        raise StatsError(f"cannot write {out}: the folder {out.parent} does not exist; create it or choose another --out")
    if out.exists() and not out.is_dir():
        raise StatsError(f"cannot write the dashboard to {out}: it is a file; choose a folder for --out")
    ds = open_run(run)
    feats = choose_features(ds, layer_type, layer, features, top_author_features, author=author)
    data = feature_data(ds, layer_type, layer, feats, k=k, window=window, n_bins=n_bins, per_bin=per_bin,
                        author=author, show_progress=show_progress)
    run_name = Path(str(run).rstrip("/")).name
    (out / "features").mkdir(parents=True, exist_ok=True)
    for old in (out / "features").glob("*.html"):  # a previous dashboard's pages (names are feature ids)
        if old.stem.isdigit():
            old.unlink()
    ids = [f["feature"] for f in data["features"]]
    for i, f in enumerate(tqdm(data["features"], desc="feature pages", unit="page",
                               disable=None if show_progress is None else not show_progress)):
        prev_next = (ids[i - 1] if i else None, ids[i + 1] if i + 1 < len(ids) else None)
        page = render_feature_page(data, f, run_name, prev_next)
        (out / "features" / f"{int(f['feature'])}.html").write_text(page, encoding="utf-8")
    (out / "index.html").write_text(render_index(data, run_name), encoding="utf-8")
    return out


def _run(args: argparse.Namespace) -> int:
    out = write_dashboard(args.run, args.out, layer_type=args.layer_type, layer=args.layer, features=args.feature,
                          top_author_features=args.top_author_features, k=args.k, window=args.window,
                          n_bins=args.n_bins, per_bin=args.per_bin, author=args.author)
    n = len(list((out / "features").glob("*.html")))
    print(f"wrote a dashboard of {n} features to {out}{os.sep}index.html")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``dashboard`` sub-command."""
    p = subparsers.add_parser("dashboard", help="write a static HTML dashboard of an SAE's features",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run path or fsspec URL")
    p.add_argument("--layer_type", required=True, help="the SAE's layer type: res, mlp or att")
    p.add_argument("--layer", required=True, type=int, help="the SAE's layer")
    p.add_argument("--feature", nargs="+", type=int, help="feature ids to show")
    p.add_argument("--top_author_features", type=int,
                   help="also show each author's N most specific features (default 10 when no --feature)")
    p.add_argument("--author", nargs="+", help="only these authors' documents (default: all)")
    p.add_argument("--k", type=int, default=20, help="top examples per feature (default: 20)")
    p.add_argument("--window", type=int, default=10, help="tokens each side of an example (default: 10)")
    p.add_argument("--n_bins", type=int, default=5, help="activation quantile bins (default: 5)")
    p.add_argument("--per_bin", type=int, default=5, help="examples per quantile bin (default: 5)")
    p.add_argument("--out", required=True, help="output folder (index.html and features/)")
    p.set_defaults(func=_run)
    return p


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m saestore.dashboard")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["dashboard", *sys.argv[1:]])
    sys.exit(ns.func(ns))
