"""Write and read a profile: profile.json, moments.safetensors and routing.png (+ routing_by_source.png)."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moequant.calibration.profiler import Profile
from moequant.calibration.stats import LayerStats, js_divergence
from moequant.errors import CalibrationError

logger = logging.getLogger(__name__)

PROFILE_VERSION = 1


def profile_to_json(profile: Profile) -> dict:
    coverage = profile.coverage()
    layers = {}
    for i, s in sorted(profile.layers.items()):
        entry = {
            "top_k": s.top_k,
            "tokens": s.tokens,
            "num_experts": s.num_experts,
            "cv": round(s.cv(), 6),
            "entropy": round(s.entropy(), 6),
            "experts": [
                {"tokens": int(c), "weight_mass": float(m), "load": round(float(p), 6)}
                for c, m, p in zip(s.counts, s.weight_mass, s.load(), strict=True)
            ],
            "coactivation": s.coact.tolist(),
            "coverage": coverage[i],
        }
        if len(s.by_source) > 1:
            entry["by_source"] = {k: v.tolist() for k, v in sorted(s.by_source.items())}
            entry["source_js_divergence"] = {
                f"{a}|{b}": round(js_divergence(s.by_source[a].double(), s.by_source[b].double()), 6)
                for a, b in itertools.combinations(sorted(s.by_source), 2)
            }
        layers[str(i)] = entry
    return {
        "version": PROFILE_VERSION,
        "model_id": profile.model_id,
        "calibration": profile.calibration,
        "tokens": profile.tokens,
        "min_tokens": profile.min_tokens,
        "layers": layers,
        "under_covered_experts": sum(len(v) for v in coverage.values()),
    }


def save_profile(profile: Profile, out_dir: str | Path, plots: bool = True) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    moments = {}
    for i, s in profile.layers.items():
        moments[f"layers.{i}.gate_up"] = s.moments_in().contiguous()  # [E, H]
        moments[f"layers.{i}.down"] = s.moments_mid().contiguous()  # [E, I]
        moments[f"layers.{i}.all"] = (s.sq_all / max(s.tokens, 1)).float()  # [H]
    save_file(moments, str(out / "moments.safetensors"), metadata={"version": str(PROFILE_VERSION)})
    (out / "profile.json").write_text(json.dumps(profile_to_json(profile), indent=1))
    if plots:
        plot_routing(profile, out)
    return out / "profile.json"


def load_profile(path: str | Path) -> Profile:
    """Read a profile folder (or its profile.json) back. Moments are restored as sums = mean x count."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        meta = json.loads((folder / "profile.json").read_text())
        moments = load_file(str(folder / "moments.safetensors"))
    except FileNotFoundError as err:
        raise CalibrationError(
            f"no profile at {folder}: {err.filename} is missing (run `moequant profile`)"
        ) from None
    if meta.get("version") != PROFILE_VERSION:
        raise CalibrationError(
            f"{folder}/profile.json has version {meta.get('version')}, expected {PROFILE_VERSION}"
        )
    layers = {}
    for key, entry in meta["layers"].items():
        i = int(key)
        m_in, m_mid = moments[f"layers.{i}.gate_up"].double(), moments[f"layers.{i}.down"].double()
        counts = torch.tensor([e["tokens"] for e in entry["experts"]], dtype=torch.int64)
        s = LayerStats(
            entry["num_experts"], entry["top_k"], m_in.shape[1], m_mid.shape[1], tokens=entry["tokens"]
        )
        s.counts = counts
        s.weight_mass = torch.tensor([e["weight_mass"] for e in entry["experts"]], dtype=torch.float64)
        s.coact = torch.tensor(entry["coactivation"], dtype=torch.int64)
        s.sq_in = m_in * counts[:, None]
        s.sq_mid = m_mid * counts[:, None]
        s.sq_all = moments[f"layers.{i}.all"].double() * entry["tokens"]
        s.by_source = {k: torch.tensor(v) for k, v in entry.get("by_source", {}).items()}
        layers[i] = s
    return Profile(meta["model_id"], meta["calibration"], meta["tokens"], layers, meta["min_tokens"])


def plot_routing(profile: Profile, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = sorted(profile.layers)
    load = torch.stack(
        [profile.layers[i].load().float() * profile.layers[i].num_experts for i in idx]
    )  # [L, E]
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * load.shape[1] + 2), max(2.5, 0.35 * len(idx) + 1.5)))
    im = ax.imshow(load.numpy(), aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(idx)), [str(i) for i in idx])
    ax.set_title("expert load (1.0 = uniform share)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "routing.png", dpi=110)
    plt.close(fig)

    sources = sorted({k for i in idx for k in profile.layers[i].by_source})
    if len(sources) < 2:
        return
    fig, axes = plt.subplots(
        1, len(idx), figsize=(3.2 * len(idx) + 1, 0.45 * len(sources) + 1.8), squeeze=False
    )
    for ax, i in zip(axes[0], idx, strict=True):
        s = profile.layers[i]
        mat = torch.stack(
            [s.by_source[k].double() / s.by_source[k].sum().clamp(min=1) for k in sources]
        )  # [S, E]
        ax.imshow((mat * s.num_experts).numpy(), aspect="auto", cmap="magma")
        ax.set_title(f"layer {i}")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(sources)), sources if ax is axes[0][0] else [""] * len(sources))
    fig.suptitle("expert load by calibration source")
    fig.tight_layout()
    fig.savefig(out / "routing_by_source.png", dpi=110)
    plt.close(fig)
