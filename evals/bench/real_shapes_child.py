"""The real-shape benchmark's child: `moequant quantize ARGS` with every pass timed (evals/bench/real_shapes.py).

    python -m moequant.evals.bench.real_shapes_child TIMES_JSON -- quantize CKPT --bits 3 ...

Each timed pass is a wrap of the module attribute its caller looks the name up in (no library change); the
JSON gets [pass, start, seconds] rows in call order, rewritten as each pass starts (its seconds null until it
ends) and ends, so a run the memory limit kills (SIGKILL: no handler runs) still says which pass it died in.
"""

from __future__ import annotations

import inspect
import json
import sys
import time


def main(argv: list[str]) -> int:
    out, rest = argv[0], argv[argv.index("--") + 1 :]
    import moequant.api as api
    import moequant.plan.planner as planner
    import moequant.plan.probe as probe
    import moequant.quantize.run as qrun
    from moequant.cli.main import main as cli_main

    t0 = time.perf_counter()
    rows: list[list] = []

    def dump(rc=None) -> None:
        with open(out, "w") as f:
            json.dump({"rc": rc, "passes": rows}, f)

    def wrap(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            row = [label, round(start - t0, 2), None]
            rows.append(row)
            dump()
            if inspect.isgeneratorfunction(fn):  # a pass that yields its layers: timed until exhausted
                return _timed_iter(fn(*args, **kwargs), row, start)
            try:
                return fn(*args, **kwargs)
            finally:
                row[2] = round(time.perf_counter() - start, 2)
                dump()

        def _timed_iter(it, row, start):
            try:
                yield from it
            finally:
                row[2] = round(time.perf_counter() - start, 2)
                dump()

        setattr(owner, name, timed)

    wrap(api, "profile_pass", "profile pass")
    wrap(planner, "damage_from_source", "damage table")
    wrap(probe, "calibrate", "layer probe (measured)")
    wrap(probe, "calibrate_streamed", "layer probe (streamed)")
    wrap(qrun, "quantize_pass", "quantize pass")
    rc = 1
    try:
        rc = cli_main(rest)
    finally:
        rows.append(["whole command", 0.0, round(time.perf_counter() - t0, 2)])
        dump(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
