"""docs/commands.md is what the CLI's argparse definitions say (tools/commands_doc.py), and names every option."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("commands_doc", ROOT / "tools" / "commands_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_commands_doc_is_current():
    text = _tool().render()
    assert (ROOT / "docs" / "commands.md").read_text() == text, "run: python tools/commands_doc.py"


def test_every_option_of_every_command_is_in_the_doc():
    from moequant.cli.main import build_parser

    text = (ROOT / "docs" / "commands.md").read_text()
    sub = build_parser()._subparsers._group_actions[0]
    for name, p in sub.choices.items():
        section = text.split(f"## moequant {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in p._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert f"`{opt}`" in section, (name, opt)
