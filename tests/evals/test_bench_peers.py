"""evals/bench/peers.py: the pieces that do not need the peer tools (names, checks, GPTQ unpacking, the moequant
command, the recorded file that `moequant sweep --peers` reads)."""

import argparse
import json

import pytest
import torch

from moequant.evals.bench import peers
from moequant.evals.bench.gptq_v1 import dequantize_gptq_v1
from moequant.evals.sweep import load_peers


def test_projection_names_of_every_tool_map_to_one_scheme():
    e = "model.layers.2.mlp.experts.5.gate_proj"
    assert peers.projection_name("model.layers.2.block_sparse_moe.experts.5.w1.weight") == e
    assert peers.projection_name("model.layers.2.block_sparse_moe.experts.5.gate_proj.weight") == e
    assert peers.projection_name(e) == e
    assert (
        peers.projection_name("model.layers.0.mlp.experts.1.w2") == "model.layers.0.mlp.experts.1.down_proj"
    )
    assert peers.projection_name("model.layers.0.mlp.experts.1.w3") == "model.layers.0.mlp.experts.1.up_proj"
    assert (
        peers.projection_name("model.layers.3.self_attn.o_proj.weight") == "model.layers.3.self_attn.o_proj"
    )
    assert peers.projection_name("model.layers.3.mlp.gate.weight") is None  # the router
    assert peers.projection_name("model.embed_tokens.weight") is None


def test_distinct_values_per_group():
    w = torch.arange(4 * 256, dtype=torch.float32).reshape(4, 256) % 3  # 3 values per group
    assert peers.max_distinct_per_group(w) == 3
    w[2, 130] = 17.0
    assert peers.max_distinct_per_group(w) == 4  # one group of row 2 gains a fourth value


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_v1_unpacking_at_every_width(bits):
    from moequant.checkpoint.export_gptq import pack_zeros_v1
    from moequant.quantizers.packing import pack

    g = torch.Generator().manual_seed(bits)
    k, n, gs = 256, 64, 128
    codes = torch.randint(0, 2**bits, (k, n), generator=g)  # [K, N]
    zeros = torch.randint(1, 2**bits, (k // gs, n), generator=g)  # [G, N]; v1 cannot store zero 0
    scales = torch.rand(k // gs, n, generator=g).half()  # [G, N]
    t = {
        "m.qweight": pack(codes, bits),
        "m.qzeros": pack_zeros_v1(zeros, bits),
        "m.scales": scales,
        "m.g_idx": torch.arange(k, dtype=torch.int32) // gs,
    }
    want = (scales.float().repeat_interleave(gs, 0) * (codes - zeros.repeat_interleave(gs, 0))).T  # [N, K]
    assert torch.equal(dequantize_gptq_v1(t, "m", bits), want)


@pytest.mark.parametrize("variant", ["experts", "all-linear"])
def test_moequant_rows_run_the_cli_on_the_peers_calibration(tmp_path, variant):
    from moequant.calibration.data import CalibConfig
    from moequant.cli.common import calib_config
    from moequant.cli.main import build_parser
    from moequant.cli.plan import fixed_non_expert
    from moequant.config import Method, QuantSpec

    job = peers.Job("moequant", "gptq", variant, 3)
    args = build_parser().parse_args(peers.moequant_command(job, "tiny-moe", tmp_path / "o"))
    assert args.uniform and args.bits == 3.0 and args.method == "gptq" and args.group_size == 128
    assert not args.sym and args.batch_size == 8
    assert calib_config(args, "tiny-moe") == CalibConfig()  # the windows every peer gets
    spec = fixed_non_expert(args)
    assert spec == (QuantSpec(Method.GPTQ, 3, 128, sym=False) if variant == "all-linear" else None)


def test_weights_round_trip_through_the_fused_experts():
    from moequant.checkpoint.loading import load_model

    model = load_model(None)
    w = peers.original_weights(model)
    assert len(w) == 4 * (8 * 3 + 4)
    scaled = {k: v * 2 for k, v in w.items()}
    assert peers.apply_weights(model, scaled) == len(w)
    assert all(torch.equal(peers.original_weights(model)[k], scaled[k]) for k in w)
    with pytest.raises(
        peers.PeerFailed, match="no quantized weight for model.layers.0.mlp.experts.0.down_proj"
    ):
        peers.apply_weights(
            model, {k: v for k, v in w.items() if k != "model.layers.0.mlp.experts.0.down_proj"}
        )


def test_the_recorded_file_is_what_the_sweep_reads(tmp_path):
    from moequant.evals.sweep import PEERS_FORMAT

    def row(tool, wall, status="ok"):
        r = {"model": "bundled", "tool": tool, "method": "gptq" if tool == "moequant" else tool,
             "label": "moequant gptq" if tool == "moequant" else tool, "version": "9.9", "variant": "experts",
             "bits": 3, "status": status, "wall_s": wall}  # fmt: skip
        if status == "ok":
            r |= {"bits_per_weight": 3.19, "size_bytes": 2_700_000, "size_kind": "checkpoint on disk",
                  "ppl": {"english": 60.0, "overall": 62.0}, "kl_to_16bit": 0.01}  # fmt: skip
        else:
            r |= {"bits_per_weight": None, "size_bytes": None, "ppl": None}
        return r

    res = {
        "format": PEERS_FORMAT, "meta": {"date": "2026-12-07T00:00:00+00:00"}, "model": "bundled", "seq_len": 256,
        "tools": {}, "calibration": "c", "settings": "s", "eval": "e",
        "reference": {"size_bytes": 7_760_000, "ppl": {"english": 58.6, "overall": 61.7}},
        "rows": [row("moequant", 10.0), row("hqq", 5.0), row("auto-round", None, "failed: install: no | pipe"),
                 row("gptqmodel", None, "pending")],
    }  # fmt: skip
    out = tmp_path / "bench_peers"
    peers._finish(res, str(out))
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["wall_ratio"] for r in saved["rows"]] == [1.0, 0.5, None, None]
    table = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| ")]
    assert table[2] == (
        "| hqq 9.9 | experts | 3 | 3.190 | 2.700 | 62.000 | 60.00 | +0.49% | 1.00e-02 | 5.0 | 0.50x | ok |"
    )
    assert table[3].endswith("| - | - | - | failed: install: no / pipe |")
    assert table[4].endswith(
        "| - | - | - | pending |"
    )  # a row not measured yet (the file is rewritten per row)
    pts = load_peers([out.with_suffix(".json")], None)
    assert [p["label"] for p in pts] == ["moequant gptq W3 experts", "hqq W3 experts"]


def test_a_tool_that_cannot_install_is_a_failed_row_reason(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, stdout, stderr):
        calls.append(cmd)
        stdout.write("ERROR: No matching distribution found for hqq==0.2.8.post1\n")
        return argparse.Namespace(returncode=1 if "hqq==0.2.8.post1" in cmd else 0)

    monkeypatch.setattr(peers.subprocess, "run", fake_run)
    with pytest.raises(peers.PeerFailed, match="install: .*No matching distribution found for hqq"):
        peers.ensure_venv(tmp_path, peers.PEERS["hqq"], tmp_path / "install.log")
    assert calls[1][-1].startswith("torch==") and len(calls) == 3  # torch alone first, then the tool
