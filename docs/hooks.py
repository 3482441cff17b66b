"""MkDocs hook: the command-line reference (reference/cli.md) generated from the parser the
CLI itself uses, so every flag is documented as it is (a test checks that each appears)."""
import argparse

MARKER = "<!-- generated: the command line, from anil_fast.cli.build_parser -->"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    if action.metavar:
        return f"`{action.metavar}`"
    kind = getattr(action.type, "__name__", "str") if action.type else "str"
    return f"`{kind.upper()}`" + (" ..." if action.nargs in ("+", "*") else "")


def _options(parser: argparse.ArgumentParser) -> str:
    rows = ["| option | value | default | what it does |", "| --- | --- | --- | --- |"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
        default = "" if action.default in (None, False, argparse.SUPPRESS) else f"`{action.default}`"
        rows.append(f"| {names} | {_value(action)} | {default} | {_cell(action.help or '')} |")
    return "\n".join(rows)


def reference() -> str:
    from anil_fast.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    parts = [f"`anil-fast` (or `python -m anil_fast`), its commands and every option.\n\n"
             f"{_options(parser)}\n"]
    for name, command in sub.choices.items():
        parts.append(f"## anil-fast {name}\n\n{helps.get(name, '')}\n\n```text\n"
                     f"{command.format_usage().strip()}\n```\n\n{_options(command)}\n")
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files):
    if MARKER in markdown:
        return markdown.replace(MARKER, reference())
    return markdown
