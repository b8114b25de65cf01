"""The cells and tables of the experiment reports (markdown), and the files a report is kept in."""

import json
import os


def fmt(value, spec=".4f"):
    """A table cell: n/a for a missing value, yes/no for a bool, ints with thousands separators."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return format(value, spec)


def fmt_pm(mean, sd, spec=".4f"):
    """'mean ± sd' (just the mean when there is no sd)."""
    return fmt(mean, spec) if sd is None else f"{fmt(mean, spec)} ± {fmt(sd, spec)}"


def fmt_interval(iv, spec=".4f"):
    """'[lo, hi]' of a nanochat.stats.t_interval result (n/a for fewer than two values)."""
    return "n/a" if iv["lo"] is None else f"[{fmt(iv['lo'], spec)}, {fmt(iv['hi'], spec)}]"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_json_and_markdown(out, stem, data, text):
    """<out>/<stem>.json (the numbers) and <out>/<stem>.md (the text a person reads), `out` made if missing."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(text)
