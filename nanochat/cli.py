"""Command-line arguments from a dataclass: `--key=value`, `--key value` and `--key-with-dashes`.

Each field is one argument and its type annotation gives the parser: int, float, str, bool (`--flag`
alone means true; `--flag false` and `--flag=no` also work), `bool | None` (the same plus `auto`, read
as None: a real third choice such as --compile's "on for CUDA only") or a list of one of these, which
takes the values up to the next flag (`--files a b c`). Fields are declared with
  flag(default, help, check=None)     an optional --flag
  required(help, check=None)          a --flag that must be given
  positional(help, default=MISSING)   a bare argument, in field order; a list takes all that remain
  passthrough(help)                   everything after `--`, unparsed (e.g. flags for another script)
A field without a default must come before those with one (a dataclass rule), so required arguments
come first.

Values are checked where they are declared: `check` is a Check, a predicate with the rule it states
(at_least(1), above(0), between(0, 1), one_of("a", "b"), at_least(1).or_(-1)), and a float must be
finite. A field stores them as plain metadata ("help", "valid", "rule"), so a module that must not
import this one (the method's maths, adaptive_svd.SVDPolicy) declares checked fields with
dataclasses.field(metadata=...) alone. Rules between fields are one tuple per class,
`CHECKS = ((predicate(cfg), message with {field} placeholders), ...)`, next to its fields.
check_config(cfg) applies both (for the class and its bases); parse_args calls it, and so does code
that builds a config in Python. `parse_flags` returns only the arguments given, for checks that depend
on what the user set. Bad input (unknown or repeated flag, wrong type, a value its check refuses, a
missing value or required argument) raises UserError, which entry points print as one line; `--help`
prints every argument with its default and rule, descriptions in one column.

"Last flag wins" between a command's own flags and extra ones is merge_flags, used by the Python
runners and, through `python -m nanochat.cli merge N WORD...`, by the SLURM jobs (slurm/common.sh).
This module imports nothing heavy, so that call costs no torch start-up.
"""

import dataclasses
import difflib
import math
import shlex
import sys
import typing

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
AUTO = "auto"  # the third value of a `bool | None` flag
HELP_COLUMN_MAX = 40  # a longer left column puts its description on the next line


class UserError(Exception):
    """Bad input from the user. Entry points print it as one line and exit non-zero, no traceback."""
    exit_status = 2  # a subclass may carry its own (nanochat.jobs.Stopped: 128 + the signal, health.Diverged: 3)


@dataclasses.dataclass(frozen=True)
class Check:
    """A value's rule: `ok(value)` says whether it holds, `rule` says it to the user ("> 0")."""
    ok: typing.Callable
    rule: str

    def or_(self, special):
        """Also accept one special value (e.g. -1 = derive it)."""
        return Check(lambda v: v == special or self.ok(v), f"{self.rule} or {special}")


def at_least(lo):
    return Check(lambda v: v >= lo, f">= {lo}")


def above(lo):
    return Check(lambda v: v > lo, f"> {lo}")


def between(lo, hi, open_lo=False, open_hi=False):
    """lo <= v <= hi, either end open on request."""
    return Check(lambda v: (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi),
                 f"in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}")


def one_of(*choices):
    shown = [str(c) if c != "" else '"" (empty)' for c in choices]
    return Check(lambda v: v in choices, ", ".join(shown[:-1]) + f" or {shown[-1]}" if len(shown) > 1 else shown[0])


def _field(default, help, check=None, **meta):
    metadata = {"help": help, **meta}
    if check is not None:
        metadata.update(valid=check.ok, rule=check.rule)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(default, help, check=None):
    return _field(default, help, check)


def required(help, check=None):
    return _field(dataclasses.MISSING, help, check)


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


def _tristate(typ):
    return set(typing.get_args(typ)) == {bool, type(None)}


def _truth(name, text, auto=False):
    word = text.lower()
    if auto and word == AUTO:
        return None
    if word in TRUE or word in FALSE:
        return word in TRUE
    raise UserError(f"{name} expects true{', false or auto' if auto else ' or false'}, got {text!r}")


def _convert(name, typ, text):
    if typ is bool or _tristate(typ):
        return _truth(name, text, auto=typ is not bool)
    try:
        if typ is int:
            return int(float(text)) if "e" in text.lower() and float(text).is_integer() else int(text.replace("_", ""))
        if typ is float:
            return float(text)
        return text
    except ValueError:
        raise UserError(f"{name} expects {typ.__name__}, got {text!r}") from None


def _problem(label, f, value, text):
    """Why `value` (shown as `text`) is not a valid value of field f, or None."""
    rule = f.metadata.get("rule")
    if isinstance(value, float) and not math.isfinite(value):
        return f"{label}={text} is not a finite number" + (f": use {rule}" if rule else "")
    valid = f.metadata.get("valid")
    if valid is None or valid(value):
        return None
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"{label}={text} {'is out of range' if numeric else 'is not valid'}: use {rule}"


def _type_ok(typ, value):
    many, typ = _element_type(typ)
    if many:
        return isinstance(value, list) and all(_type_ok(typ, v) for v in value)
    if _tristate(typ):
        return value is None or isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _label(f):
    return _metavar(f) if _kind(f) == "positional" else f"--{f.name}"


def _show(value):
    return AUTO if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_config(cfg):
    """Every field's check and the cross-field CHECKS of cfg's class and its bases; raises one UserError
    naming every problem. The rules between fields are read only once each field is valid on its own."""
    fields = [f for f in dataclasses.fields(cfg) if _kind(f) != "passthrough"]
    types = typing.get_type_hints(type(cfg))
    problems = []
    for f in fields:
        value = getattr(cfg, f.name)
        if not _type_ok(types[f.name], value):  # only a config built in Python can get here
            problems.append(f"{_label(f)}={value!r} is a {type(value).__name__}; the flag takes {types[f.name]}")
            continue
        for v in value if isinstance(value, list) else [value]:
            problems.append(_problem(_label(f), f, v, _show(v)))
    problems = [p for p in problems if p]
    if not problems:
        values = {f.name: getattr(cfg, f.name) for f in fields}
        for klass in reversed(type(cfg).__mro__):  # a base class's rules first
            problems += [message.format(**values) for ok, message in vars(klass).get("CHECKS", ()) if not ok(cfg)]
    if problems:
        raise UserError("; ".join(problems))


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
        if f.metadata.get("rule"):
            help_text += f" (valid: {f.metadata['rule']})"
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
            elif _tristate(types[f.name]):
                left = f"--{f.name}={_show(default)}"
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


def _checked(label, f, typ, text):
    value = _convert(label, typ, text)
    problem = _problem(label, f, value, text)
    if problem:
        raise UserError(problem)
    return value


def parse_flags(cls, argv, prog, description):
    """The arguments given in argv, converted and checked one by one: {field name: value}. `--help` prints
    the help and exits 0."""
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
            value = _checked(_metavar(fields[name]), fields[name], typ, arg)
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
        if many:
            texts = [text] if eq else []
            while not eq and i < len(argv) and not argv[i].startswith("--"):
                texts.append(argv[i])
                i += 1
            if not texts:
                raise UserError(f"--{key} needs at least one value")
            values[key] = [_checked(f"--{key}", fields[key], typ, t) for t in texts]
            continue
        if not eq:
            if typ is bool or _tristate(typ):  # alone it means true; a truth word after it is its value
                words = TRUE + FALSE + ((AUTO,) if typ is not bool else ())
                take = i < len(argv) and argv[i].lower() in words
            elif i < len(argv) and not argv[i].startswith("--"):
                take = True
            else:
                raise UserError(f"--{key} needs a value")
            text = argv[i] if take else "true"
            i += take
        values[key] = _checked(f"--{key}", fields[key], typ, text)
    missing = [name for name, f in fields.items() if name not in values and _default(f) is dataclasses.MISSING]
    if missing:
        names = ", ".join(_metavar(fields[n]) if _kind(fields[n]) == "positional" else f"--{n}" for n in missing)
        raise UserError(f"missing {names}; see --help")
    return values


def parse_args(cls, argv, prog, description):
    """Parse argv into an instance of dataclass `cls`, checked as a whole (check_config). `--help` prints
    the arguments and exits 0."""
    cfg = cls(**parse_flags(cls, argv, prog, description))
    check_config(cfg)
    return cfg


def flag_name(word):
    """The field name of a `--name` or `--name=value` word (dashes and underscores are one name), else None."""
    if not word.startswith("--") or word == "--":
        return None
    return word[2:].partition("=")[0].replace("-", "_")


def merge_flags(base, override):
    """`base` without the flags that `override` gives again, then `override` whole: the last flag wins.
    A flag is `--name=value`, or `--name` with the words after it up to the next flag (`--name value`,
    `--files a b`); other words of `base` (a `--` for a launcher) stay where they are. A flag that
    `override` itself repeats reaches the script's parser, which refuses it."""
    given = {flag_name(w) for w in override} - {None}
    merged, drop_values = [], False
    for word in base:
        name = flag_name(word)
        if name is None and word != "--" and drop_values:
            continue  # a value of a dropped `--name value`
        drop_values = False
        if name in given:
            drop_values = "=" not in word
            continue
        merged.append(word)
    return merged + list(override)


def main(argv):
    """`python -m nanochat.cli merge N WORD...`: the first N words are a command's own flags, the others
    extra flags that replace them; prints the merged words as one shell-quoted line."""
    if len(argv) < 2 or argv[0] != "merge" or not argv[1].isdigit() or int(argv[1]) > len(argv) - 2:
        raise UserError("usage: python -m nanochat.cli merge N WORD... (the first N words are the command's own flags)")
    n = int(argv[1])
    print(shlex.join(merge_flags(argv[2:2 + n], argv[2 + n:])))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"error: {e}")
