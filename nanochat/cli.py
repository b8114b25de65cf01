"""Command-line arguments from a dataclass: `--key=value`, `--key value` and `--key-with-dashes`.

Each field is one argument and its type annotation gives the parser: int, float, str, bool (`--flag`
alone means true; `--flag false` and `--flag=no` also work) or a list of one of these, which takes the
values up to the next flag (`--files a b c`). Fields are declared with
  flag(default, help, choices=None)   an optional --flag
  required(help, choices=None)        a --flag that must be given
  positional(help, default=MISSING)   a bare argument, in field order; a list takes all that remain
  passthrough(help)                   everything after `--`, unparsed (e.g. flags for another script)
A field without a default must come before those with one (a dataclass rule), so required arguments
come first. `parse_args` returns the dataclass; `parse_flags` only the arguments given, for checks
that depend on what the user set. Bad input (unknown or repeated flag, wrong type, a value outside
its choices, a missing value or required argument) raises UserError, which entry points print as one
line; `--help` prints every argument with its default, descriptions in one column.
"""

import dataclasses
import difflib
import sys
import typing

from nanochat.common import UserError

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
HELP_COLUMN_MAX = 40  # a longer left column puts its description on the next line


def _field(default, help, **meta):
    metadata = {"help": help, **meta}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(default, help, choices=None):
    return _field(default, help, choices=choices)


def required(help, choices=None):
    return dataclasses.field(metadata={"help": help, "choices": choices})


def positional(help, default=dataclasses.MISSING):
    return _field(default, help, positional=True)


def passthrough(help):
    return dataclasses.field(default_factory=list, metadata={"help": help, "passthrough": True})


def _kind(f):
    return "passthrough" if f.metadata.get("passthrough") else "positional" if f.metadata.get("positional") else "flag"


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _element_type(typ):
    """(is a list, the type of one value)."""
    if typing.get_origin(typ) is list:
        return True, typing.get_args(typ)[0]
    return False, typ


def _convert(name, typ, text, choices=None):
    if typ is bool:
        if text.lower() in TRUE:
            value = True
        elif text.lower() in FALSE:
            value = False
        else:
            raise UserError(f"{name} expects true or false, got {text!r}")
    else:
        try:
            if typ is int:
                value = int(float(text)) if "e" in text.lower() and float(text).is_integer() else int(text.replace("_", ""))
            elif typ is float:
                value = float(text)
            else:
                value = text
        except ValueError:
            raise UserError(f"{name} expects {typ.__name__}, got {text!r}") from None
    if choices is not None and value not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(str, choices))}; got {text!r}")
    return value


def _metavar(f):
    return f.name.upper()


def format_help(cls, prog, description):
    fields = dataclasses.fields(cls)
    types = typing.get_type_hints(cls)
    usage = [prog]
    for f in fields:
        if _kind(f) == "positional":
            many = " ..." if _element_type(types[f.name])[0] else ""
            usage.append(f"{_metavar(f)}{many}" if _default(f) is dataclasses.MISSING else f"[{_metavar(f)}{many}]")
    usage.append("[--flag=value ...]")
    usage += [f"[-- {_metavar(f)} ...]" for f in fields if _kind(f) == "passthrough"]
    args, flags = [], []
    for f in fields:
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += f" (one of: {', '.join(map(str, f.metadata['choices']))})"
        if _kind(f) == "positional":
            args.append((_metavar(f) + (" ..." if _element_type(types[f.name])[0] else ""), help_text))
        elif _kind(f) == "passthrough":
            args.append((f"-- {_metavar(f)} ...", help_text))
        else:
            default = _default(f)
            if default is dataclasses.MISSING:
                left = f"--{f.name}=<required>"
            elif isinstance(default, list):
                left = f"--{f.name} {' '.join(map(str, default))}" if default else f"--{f.name} ..."
            else:
                left = f"--{f.name}={default!r}"
            flags.append((left, help_text))
    flags.append(("--help", "show this message and exit"))
    width = min(HELP_COLUMN_MAX, max(len(left) for left, _ in args + flags))
    lines = [f"usage: {' '.join(usage)}", "", description.strip(), ""]
    for title, rows in (("arguments:", args), ("flags:", flags)):
        if not rows:
            continue
        lines.append(title)
        for left, text in rows:
            if len(left) > width:
                lines += [f"  {left}", f"  {'':<{width}}  {text}"]
            else:
                lines.append(f"  {left:<{width}}  {text}")
        lines.append("")
    return "\n".join(lines).rstrip()


def parse_flags(cls, argv, prog, description):
    """The arguments given in argv, converted: {field name: value}. `--help` prints the help and exits 0."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = typing.get_type_hints(cls)
    flags = {name for name, f in fields.items() if _kind(f) == "flag"}
    positionals = [name for name, f in fields.items() if _kind(f) == "positional"]
    rest = next((name for name, f in fields.items() if _kind(f) == "passthrough"), None)
    values = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print(format_help(cls, prog, description))
            sys.exit(0)
        if arg == "--":
            if rest is None:
                raise UserError("unexpected '--': this script passes no arguments on (see --help)")
            values[rest] = list(argv[i:])
            break
        if not arg.startswith("--"):
            if not positionals:
                taken = [_metavar(f) for f in fields.values() if _kind(f) == "positional"]
                where = f"{' and '.join(taken)} already given" if taken else "flags look like --name=value"
                raise UserError(f"unexpected argument {arg!r}; {where} (see --help)")
            name = positionals[0]
            many, typ = _element_type(types[name])
            value = _convert(_metavar(fields[name]), typ, arg)
            if many:
                values.setdefault(name, []).append(value)
            else:
                values[name] = value
                positionals.pop(0)
            continue
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in flags:
            close = difflib.get_close_matches(key, flags, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise UserError(f"unknown flag --{key}{hint}; see --help for the flags this script defines")
        if key in values:
            raise UserError(f"--{key} is given twice; give each flag once")
        many, typ = _element_type(types[key])
        choices = fields[key].metadata.get("choices")
        if many:
            texts = [text] if eq else []
            while not eq and i < len(argv) and not argv[i].startswith("--"):
                texts.append(argv[i])
                i += 1
            if not texts:
                raise UserError(f"--{key} needs at least one value")
            values[key] = [_convert(f"--{key}", typ, t, choices) for t in texts]
            continue
        if not eq:
            if typ is bool:
                take = i < len(argv) and argv[i].lower() in TRUE + FALSE
            elif i < len(argv) and not argv[i].startswith("--"):
                take = True
            else:
                raise UserError(f"--{key} needs a value")
            text = argv[i] if take else "true"
            i += take
        values[key] = _convert(f"--{key}", typ, text, choices)
    missing = [name for name, f in fields.items() if name not in values and _default(f) is dataclasses.MISSING]
    if missing:
        names = ", ".join(_metavar(fields[n]) if _kind(fields[n]) == "positional" else f"--{n}" for n in missing)
        raise UserError(f"missing {names}; see --help")
    return values


def parse_args(cls, argv, prog, description):
    """Parse argv into an instance of dataclass `cls`. `--help` prints the arguments and exits 0."""
    return cls(**parse_flags(cls, argv, prog, description))
