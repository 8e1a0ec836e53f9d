"""Every MoE family of the installed transformers through the whole pipeline, on a tiny random model each.

For each model type arch/families.py lists: build a tiny random model with the family's own classes
(arch/tiny.py), save it in bfloat16 with `save_pretrained` (so the checkpoint is in the family's published
key layout), profile it, quantize it from the folder (streamed, through transformers' conversion mapping)
at 8-bit RTN and at 4-bit GPTQ, reload each with `from_pretrained`, and compare the logits on fresh token ids
with the 16-bit model's: relative error ||l_q - l|| / ||l||.

`moequant families --check` prints the resulting table (the README's families table is this output).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MAX_REL_ERR_8BIT = 0.02  # the bound for 8-bit
MAX_REL_ERR_4BIT = 0.15  # 4-bit GPTQ at group size 32 on random weights: the measured spread is 0.02-0.08


@dataclass
class FamilyCheck:
    model_type: str
    status: str  # "ok" | "fails" | "unsupported" | "error"
    how: str = ""  # the derived adapter, in a few words
    err8: float | None = None
    err4: float | None = None
    reason: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from moequant.checkpoint.loading import load_model

    model = load_model(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def check_family(model_type: str, workdir: Path) -> FamilyCheck:
    """Run the pipeline on a tiny `model_type` under `workdir` (see module docstring)."""
    from moequant import api
    from moequant.arch.families import describe
    from moequant.arch.tiny import save_tiny
    from moequant.calibration.data import CalibData
    from moequant.calibration.profiler import ProfileConfig
    from moequant.config import Method, QuantizeConfig, QuantSpec
    from moequant.errors import MoEQuantError

    t0 = time.perf_counter()
    info = describe(model_type)
    if info.status in ("unsupported", "error"):
        return FamilyCheck(model_type, info.status, reason=info.reason, seconds=time.perf_counter() - t0)
    how = f"{info.layout}, {info.activation}, {info.routing}"
    src = workdir / model_type / "bf16"
    try:
        save_tiny(model_type, src, seed=0, dtype=torch.bfloat16)
        g = torch.Generator().manual_seed(0)
        data = CalibData(torch.randint(0, 256, (8, 32), generator=g), ["random"] * 8, "random token ids")
        ids = torch.randint(0, 256, (2, 32), generator=g)
        prof = api.profile(str(src), data, ProfileConfig(batch_size=4, progress=False))
        if not prof.layers:
            raise MoEQuantError("the profile recorded no MoE layer")
        ref = _logits(src, ids)
        errs = {}
        for bits, method in ((8, Method.RTN), (4, Method.GPTQ)):
            out = workdir / model_type / f"{method.value}{bits}"
            plan = api.make_uniform_plan(str(src), QuantSpec(method, bits, 32))
            api.quantize(str(src), plan, data, out, QuantizeConfig(progress=False, batch_size=4, min_tokens=1))
            errs[bits] = _rel(_logits(out, ids), ref)
    except Exception as err:  # noqa: BLE001 - a family failing is a row of the table, with its reason
        msg = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        return FamilyCheck(model_type, "error", how, reason=msg, seconds=time.perf_counter() - t0)
    ok = errs[8] <= MAX_REL_ERR_8BIT and errs[4] <= MAX_REL_ERR_4BIT
    return FamilyCheck(
        model_type,
        "ok" if ok else "fails",
        how,
        errs[8],
        errs[4],
        "" if ok else "logits error above the bound",
        time.perf_counter() - t0,
    )


def check_all(model_types: list[str] | None = None, workdir: Path | None = None, progress: bool = True):
    """check_family for every MoE family of this transformers (or `model_types`)."""
    from tqdm import tqdm

    from moequant.arch.families import moe_model_types

    types = model_types or moe_model_types()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        return [check_family(t, root) for t in tqdm(types, desc="families", disable=not progress)]


def markdown(checks: list[FamilyCheck]) -> str:
    """The README's families table."""
    import transformers

    lines = [
        f"transformers {transformers.__version__}: {sum(c.ok for c in checks)} of {len(checks)} MoE families "
        "quantize and reload (tiny random model each, `moequant families --check`).",
        "",
        "| family | result | adapter (derived) | 8-bit RTN logits err | 4-bit GPTQ logits err |",
        "|---|---|---|---|---|",
    ]
    for c in checks:
        e8 = f"{c.err8:.4f}" if c.err8 is not None else ""
        e4 = f"{c.err4:.4f}" if c.err4 is not None else ""
        result = "ok" if c.ok else f"{c.status}: {c.reason}".replace("|", "/")
        lines.append(f"| {c.model_type} | {result} | {c.how} | {e8} | {e4} |")
    return "\n".join(lines)
