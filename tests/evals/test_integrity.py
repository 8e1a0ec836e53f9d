"""The integrity check of a quantized folder against its original (conftest.q3)."""

import json

from moequant.checkpoint.loading import load_model


def test_integrity_check_catches_misread_experts(q3, tmp_path):
    """Swap the stored codes of two same-width experts: the folder still loads, the check flags both."""
    import shutil

    from safetensors.torch import load_file, save_file

    from moequant.evals.integrity import check

    bad = tmp_path / "swapped"
    shutil.copytree(q3, bad)
    rep = json.loads((bad / "quant_report.json").read_text())
    rows = [r for r in rep["experts"] if r["layer"] == 0]
    a, b = next(
        (x, y) for x in rows for y in rows if x["expert"] < y["expert"] and x["planned"] == y["planned"]
    )
    shard = bad / "model-layer-00000.safetensors"
    t = load_file(shard)
    pa, pb = (f"model.layers.0.mlp.experts.{r['expert']}.gate_up.qweight" for r in (a, b))
    t[pa], t[pb] = t[pb], t[pa]
    save_file(t, shard, metadata={"format": "pt"})
    res = check(load_model(None), load_model(str(bad)), rep)
    assert res["ok"] is False and res["checked"] == 32
    assert {(m["layer"], m["expert"]) for m in res["mismatches"]} == {(0, a["expert"]), (0, b["expert"])}
