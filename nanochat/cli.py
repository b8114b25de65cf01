"""Command-line flags from a dataclass: `--key=value`, `--key value` and `--key-with-dashes`.

Each field's type gives the parser and its `metadata["help"]` the help line. Bad input (unknown
flag, wrong type, missing value) raises UserError, which entry points print as one line.
"""

import dataclasses
import difflib
import sys

from nanochat.common import UserError

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def flag(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


def _convert(name, typ, text):
    if typ is bool:
        if text.lower() in TRUE:
            return True
        if text.lower() in FALSE:
            return False
        raise UserError(f"--{name} expects true or false, got {text!r}")
    try:
        if typ is int:
            return int(float(text)) if "e" in text.lower() and float(text).is_integer() else int(text.replace("_", ""))
        if typ is float:
            return float(text)
    except ValueError:
        raise UserError(f"--{name} expects {typ.__name__}, got {text!r}") from None
    return text


def format_help(cls, prog, description):
    lines = [f"usage: {prog} [--flag=value ...]", "", description.strip(), "", "flags:"]
    for f in dataclasses.fields(cls):
        default = f.default
        lines.append(f"  --{f.name}={default!r:<12} {f.metadata.get('help', '')}")
    lines.append("  --help                   show this message and exit")
    return "\n".join(lines)


def parse_args(cls, argv, prog, description):
    """Parse argv into an instance of dataclass `cls`. `--help` prints the flags and exits 0."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print(format_help(cls, prog, description))
            sys.exit(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; flags look like --name=value (see --help)")
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise UserError(f"unknown flag --{key}{hint}; see --help for the flags this script defines")
        typ = type(fields[key].default)
        if not eq:
            if typ is bool and (i >= len(argv) or argv[i].startswith("--")):
                text = "true"
            elif i < len(argv):
                text = argv[i]
                i += 1
            else:
                raise UserError(f"--{key} needs a value")
        values[key] = _convert(key, typ, text)
    return cls(**values)
