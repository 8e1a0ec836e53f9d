"""Write docs/commands.md, the command reference, from the CLI's own argparse definitions.

    python tools/commands_doc.py            # rewrite docs/commands.md
    python tools/commands_doc.py --check    # exit 1 if docs/commands.md is not what the CLI defines

tests/cli/test_commands_doc.py runs the check, so the reference cannot drift from the CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "commands.md"

HEADER = """# Command reference

Generated from the CLI's own definitions by `python tools/commands_doc.py` (a test checks it is current); the
same text as `moequant COMMAND --help`. What the main job does and prints: [the README](../README.md); inputs
that are refused and the line each gets: [bad_inputs.md](bad_inputs.md); longer notes on calibration size,
defaults, devices, torchrun and the Python API: [reference.md](reference.md).
"""


def _option(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.nargs == 0:
        return names
    meta = action.metavar or (
        "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()
    )
    return f"{names} `{meta}`"


def _help(action: argparse.Action) -> str:
    text = " ".join((action.help or "").split()).replace("|", "\\|")
    if "%(default)" in text:
        text = text.replace("%(default)s", str(action.default))
    default = action.default
    if action.option_strings and action.nargs != 0 and default not in (None, argparse.SUPPRESS, "", []):
        if "default" not in text.lower():
            text += f" (default: `{default}`)"
    return text


def render() -> str:
    from moequant.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    out = [HEADER]
    out.append("| command | what it does |\n|---|---|")
    for name in sub.choices:
        out.append(f"| [`moequant {name}`](#moequant-{name}) | {' '.join((helps.get(name) or '').split())} |")
    for name, p in sub.choices.items():
        out.append(f"\n## moequant {name}\n")
        if helps.get(name):
            out.append(" ".join(helps[name].split()) + "\n")
        usage = " ".join(p.format_usage().split())
        out.append(f"```\n{usage.removeprefix('usage: ')}\n```\n")
        rows = [
            a for a in p._actions if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS
        ]
        out.append("| argument | meaning |\n|---|---|")
        out.extend(f"| {_option(a)} | {_help(a)} |" for a in rows)
    return "\n".join(out) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is not what the CLI defines: run python tools/commands_doc.py")
            return 1
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
