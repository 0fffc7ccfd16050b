"""Command line: ``python -m wan_w4a4 <command> ...`` (also installed as ``wan-w4a4``).

Sub-commands live in the modules that own the work; this file only dispatches, importing each
module when its command is chosen so that ``--help`` stays fast and needs neither ComfyUI nor Triton.
"""
import argparse
import importlib
import logging
import sys

# command -> (module, one-line help). Each module exposes add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "calibrate": ("wan_w4a4.apps.calibrate", "build W4A4 states for the two Wan2.2 experts"),
    "demo": ("wan_w4a4.apps.demo", "calibrate, quantize and sample the embedded mini model (CPU)"),
    "serve": ("wan_w4a4.apps.serve", "start ComfyUI's own main.py (its web UI) with this pack loaded"),
}


def default_text(default) -> str:
    """An option's default as its value is typed: on/off for booleans, tuples as comma-separated lists."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) or "none"
    return str(default)


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, unless its help text already says it or it has none
    (None, a switch that is off until given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is argparse.SUPPRESS or action.nargs == 0:
            return text
        return f"{text} (default: {default_text(default).replace('%', '%%')})"


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The command line; ``commands``: the commands whose options are declared (default all). The
    others are listed by name only, their modules not imported: ``serve`` must not import torch
    before ComfyUI's main.py chooses its CUDA allocator, and the other commands' options import it."""
    parser = argparse.ArgumentParser(prog="wan_w4a4", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        if commands is not None and name not in commands:
            continue
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError as e:  # a command whose module is not built yet still lists itself
            p.set_defaults(_import_error=e)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the first word that is not an option is the command (the only global option takes no value)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([command] if command in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "_import_error", None) is not None:
        parser.error(f"command {args.command!r} is unavailable: {args._import_error}")
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
