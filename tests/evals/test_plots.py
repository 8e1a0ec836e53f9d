"""Figures: the bit map (colour gate/up, number down), the Pareto front of a sweep."""

from moequant.config import Method, QuantSpec
from moequant.evals.plots import pareto_front


def test_bitmap_says_colour_is_gate_up_and_the_number_is_down():
    from matplotlib.colors import to_hex

    from moequant.config import ExpertSpec
    from moequant.evals.plots import WIDTH_COLORS, _plt, bit_map_figure

    g2d4 = ExpertSpec(QuantSpec(Method.GPTQ, 2, 32), QuantSpec(Method.GPTQ, 4, 32))
    g4d8 = ExpertSpec(QuantSpec(Method.GPTQ, 4, 32), QuantSpec(Method.GPTQ, 8, 32))
    fig = bit_map_figure([0, 1], [[g2d4, QuantSpec(Method.RTN, 3, 32)], [g4d8, QuantSpec(Method.BNB_NF4)]])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "MoE layer"
    assert "gate/up" in ax.get_title() and "down" in ax.get_title()
    legend = ax.get_legend()
    assert legend.get_title().get_text() == "colour: gate/up bits"
    assert "down bits" in " ".join(t.get_text() for t in legend.get_texts())
    assert [t.get_text() for t in ax.texts] == ["4", "3", "8", "nf4"]  # each cell: its down width
    rgba = ax.images[0].to_rgba(ax.images[0].get_array())
    assert to_hex(rgba[0][0]) == WIDTH_COLORS[2] and to_hex(rgba[1][0]) == WIDTH_COLORS[4]  # gate/up widths
    _plt().close(fig)


def test_pareto_front():
    pts = [
        {"label": "a", "size_gb": 1.0, "ppl": 10.0},
        {"label": "b", "size_gb": 2.0, "ppl": 12.0},  # bigger and worse than a
        {"label": "c", "size_gb": 3.0, "ppl": 9.0},
        {"label": "d", "size_gb": 0.5, "ppl": 20.0},
    ]
    assert [p["label"] for p in pareto_front(pts)] == ["d", "a", "c"]
