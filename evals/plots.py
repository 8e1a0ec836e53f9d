"""PNG figures (matplotlib, Agg backend): drift heatmap, routing drift per layer, bit map, Pareto plot."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# one colour per storage width, shared by the bit map and the heatmap annotations
WIDTH_COLORS = {2: "#d73027", 3: "#fc8d59", 4: "#fee090", 8: "#91bfdb", 16: "#4575b4"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def drift_heatmap(
    layers: list[int], errors: list[list[float]], labels: list[list[str]], tokens: list[list[int]], path: Path
) -> Path:
    """Layers x experts, colour = relative output error, text = width and routed tokens."""
    plt = _plt()
    import numpy as np

    m = np.array(errors, dtype=float)  # [L, E]
    n_l, n_e = m.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.75 * n_e + 2), max(2.5, 0.5 * n_l + 1.5)))
    im = ax.imshow(np.ma.masked_invalid(m), cmap="magma_r", aspect="auto", vmin=0)
    for i in range(n_l):
        for j in range(n_e):
            txt = labels[i][j] + ("\n" + f"{tokens[i][j]}" if n_e <= 16 else "")
            v = m[i, j]
            dark = not math.isnan(v) and v > 0.6 * np.nanmax(m)
            ax.text(j, i, txt, ha="center", va="center", fontsize=6, color="white" if dark else "black")
    ax.set_xticks(range(n_e))
    ax.set_yticks(range(n_l), [str(l) for l in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(
        "per-expert relative output error ||y_q - y|| / ||y||\n(cell: width, routed calibration tokens)"
    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def routing_drift(rows: list[dict], path: Path) -> Path:
    """Per layer: top-k agreement / exact top-k match (left axis) and router KL (right axis)."""
    plt = _plt()
    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(layers) + 3), 3.2))
    ax.plot(layers, [r["topk_agreement"] for r in rows], "o-", label="top-k agreement")
    ax.plot(layers, [r["exact_match"] for r in rows], "s--", label="identical top-k set")
    low = min((r["exact_match"] for r in rows), default=0.0)
    ax.set_ylim(max(0.0, math.floor((low - 0.02) * 20) / 20), 1.005)  # zoom on the interesting range
    ax.set_xlabel("layer")
    ax.set_ylabel("agreement with the original")
    ax2 = ax.twinx()
    ax2.bar(layers, [r["kl"] for r in rows], alpha=0.3, color="tab:red", label="router KL")
    ax2.set_ylabel("KL(original || quantized), nats")
    ax.set_zorder(ax2.get_zorder() + 1)  # lines over the bars
    ax.patch.set_visible(False)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower left", fontsize=7)
    ax.set_title("routing drift per layer (upstream quantization error included)")
    return _save(fig, path)


def bit_map(layers: list[int], specs: list[list], path: Path) -> Path:
    """Layers x experts: the colour is each expert's gate/up width, the number its down width (bit_map_figure)."""
    return _save(bit_map_figure(layers, specs), path)


def down_label(spec) -> str:
    """The number a bit-map cell shows: the down projection's width ('nf4' / 'fp4' for bitsandbytes 4-bit)."""
    from moequant.config import Method, proj_specs

    dn = proj_specs(spec)[1]
    return {Method.BNB_NF4: "nf4", Method.BNB_FP4: "fp4"}.get(dn.method, str(dn.bits))


def bit_map_figure(layers: list[int], specs: list[list]):
    """The bit map's figure: one cell per expert (`specs[i][e]`, a QuantSpec or ExpertSpec), coloured by its
    gate/up width and labelled with its down width, with axis labels, a title and a legend that says which is
    which."""
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from moequant.config import proj_specs

    widths = sorted(WIDTH_COLORS)
    n_l, n_e = len(layers), max(len(r) for r in specs)
    nearest = lambda b: widths.index(min(widths, key=lambda w: abs(w - b)))
    idx = [[nearest(proj_specs(s)[0].bits) for s in row] for row in specs]  # gate/up width, [layers, experts]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * n_e + 2.6), max(2.2, 0.4 * n_l + 1.4)))
    ax.imshow(
        idx,
        cmap=ListedColormap([WIDTH_COLORS[w] for w in widths]),
        vmin=0,
        vmax=len(widths) - 1,
        aspect="auto",
    )
    if n_e * n_l <= 1024:
        for i in range(n_l):
            for j, s in enumerate(specs[i]):
                ax.text(j, i, down_label(s), ha="center", va="center", fontsize=6)
    ax.set_xticks(range(n_e) if n_e <= 32 else [])
    ax.set_yticks(range(n_l), [str(l) for l in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    used = sorted({widths[v] for row in idx for v in row})
    handles = [Patch(color=WIDTH_COLORS[w], label=f"{w} bit" if w < 16 else "16 bit (kept)") for w in used]
    handles.append(Patch(facecolor="none", edgecolor="none", label="number in a cell:\ndown bits"))
    ax.legend(
        handles=handles,
        title="colour: gate/up bits",
        title_fontsize=7,
        bbox_to_anchor=(1.02, 1),
        loc="upper left",
        fontsize=7,
    )
    ax.set_title("bits per expert (colour: gate/up width, number: down width)", fontsize=9)
    return fig


@dataclass(frozen=True)
class _ParetoScale:
    """What every panel of the Pareto plot shares: the quality key and the unit sizes are drawn in."""

    quality_key: str
    unit: str  # "GB" or "MB"
    scale: float  # from size_gb to `unit`


def pareto(
    points: list[dict],
    path: Path,
    quality_key: str = "ppl",
    quality_label: str = "perplexity",
    peers: list[dict] | tuple = (),
) -> Path:
    """Size vs quality, one series per method, the Pareto front (smaller and better) drawn through; the
    unquantized model (method "original") as a reference line. Left: every point; right: zoom on the points
    within 3% of the best quality. `peers`: recorded points of other tools (evals/sweep.py load_peers), open
    markers, one series per tool, outside the front."""
    plt = _plt()
    quant, ref = _pareto_split(points, quality_key)
    big = max(p["size_gb"] for p in [*points, *peers]) >= 1
    s = _ParetoScale(quality_key, *(("GB", 1.0) if big else ("MB", 1e3)))
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.3))
    front = pareto_front(quant, quality_key)
    peers = [p for p in peers if p.get(quality_key) is not None]
    best = min(p[quality_key] for p in quant + ([ref] if ref else []) + peers)  # the zoom shows peers too
    for ax, zoom in zip(axes, (False, True), strict=True):
        _plot_methods(ax, quant, s, annotate=zoom or len(quant) <= 6)
        _plot_peers(ax, peers, s, annotate=zoom)
        _plot_front_and_original(ax, front, ref, s)
        _style_pareto_panel(ax, s, quality_label, best if zoom else None)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _pareto_split(points: list[dict], quality_key: str) -> tuple[list[dict], dict | None]:
    """The quantized points with a quality value and the original's point; every point, no original, if none."""
    ref = next((p for p in points if p["method"] == "original"), None)
    quant = [p for p in points if p["method"] != "original" and p.get(quality_key) is not None]
    if not quant:
        quant, ref = [p for p in points if p.get(quality_key) is not None], None
    return quant, ref


def _plot_methods(ax, quant: list[dict], s: _ParetoScale, annotate: bool) -> None:
    """One line per method through its points by size, each point labelled when `annotate`."""
    markers = "osD^vP*X"
    for k, m in enumerate(dict.fromkeys(p["method"] for p in quant)):
        pts = sorted((p for p in quant if p["method"] == m), key=lambda p: p["size_gb"])
        ax.plot(
            [p["size_gb"] * s.scale for p in pts],
            [p[s.quality_key] for p in pts],
            marker=markers[k % len(markers)],
            linestyle="-" if len(pts) > 1 else "none",
            label=m,
        )
        if annotate:
            for p in pts:
                ax.annotate(
                    p["label"],
                    (p["size_gb"] * s.scale, p[s.quality_key]),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )


def _plot_peers(ax, peers: list[dict], s: _ParetoScale, annotate: bool) -> None:
    """Recorded peer points: one series of open markers per method (tool and version), labelled as recorded."""
    markers = "^vD<>ph"
    for k, m in enumerate(dict.fromkeys(p["method"] for p in peers)):
        pts = [p for p in peers if p["method"] == m]
        ax.scatter(
            [p["size_gb"] * s.scale for p in pts],
            [p[s.quality_key] for p in pts],
            marker=markers[k % len(markers)],
            facecolors="none",
            edgecolors=f"C{(k + 5) % 10}",
            label=f"{m} (recorded)",
        )
        if annotate:
            for p in pts:
                ax.annotate(
                    p["label"].removeprefix(p["tool"]).strip(),
                    (p["size_gb"] * s.scale, p[s.quality_key]),
                    fontsize=5,
                    xytext=(3, -7),
                    textcoords="offset points",
                    alpha=0.8,
                )


def _plot_front_and_original(ax, front: list[dict], ref: dict | None, s: _ParetoScale) -> None:
    """The Pareto front as a step line (when it has two points or more) and the original as a dashed line."""
    if len(front) > 1:
        ax.step(
            [p["size_gb"] * s.scale for p in front],
            [p[s.quality_key] for p in front],
            where="post",
            color="black",
            alpha=0.3,
            linewidth=3,
            label="Pareto front",
        )
    if ref is not None:
        ax.axhline(
            ref[s.quality_key],
            color="gray",
            linestyle="--",
            label=f"original: {ref['size_gb'] * s.scale:.3g} {s.unit}, {ref[s.quality_key]:.4g}",
        )


def _style_pareto_panel(ax, s: _ParetoScale, quality_label: str, zoom_best: float | None) -> None:
    """Title, axis labels and grid of one panel; `zoom_best`: zoom to within 3% of this best quality."""
    if zoom_best is not None:
        ax.set_ylim(zoom_best * 0.997, zoom_best * 1.03)
        ax.set_title(f"zoom: within 3% of the best {quality_label}")
    else:
        ax.set_title("size vs quality")
    ax.set_xlabel(f"model size ({s.unit}, weight files on disk)")
    ax.set_ylabel(quality_label + " (lower is better)")
    ax.grid(alpha=0.3)


def pareto_front(points: list[dict], quality_key: str = "ppl") -> list[dict]:
    """Points no other point beats on both size and quality (lower is better for both), by size."""
    pts = sorted(
        (p for p in points if p.get(quality_key) is not None), key=lambda p: (p["size_gb"], p[quality_key])
    )
    front, best = [], math.inf
    for p in pts:
        if p[quality_key] < best:
            front.append(p)
            best = p[quality_key]
    return front
