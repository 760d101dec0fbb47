"""A bench result as text: the one table `python -m dwjax.bench` prints, and the "latest run"
section of BENCHMARKS.md (`--benchmarks_md`).

BENCHMARKS.md holds the latest run between two HTML comment markers (`BEGIN`, `END`); everything
outside them (the title, the history below) is kept byte for byte. The section is a pure function
of the result dict (its date and command are recorded in it), so rendering the same result twice,
or over its own output, gives the same bytes.
"""
from __future__ import annotations

import os
import textwrap

from dwjax.errors import UserError
from dwjax.io import atomic

BEGIN = "<!-- dwjax.bench latest: begin -->"
END = "<!-- dwjax.bench latest: end -->"
TITLE = "# BENCHMARKS\n"


class BenchmarksFileError(UserError):
    """A BENCHMARKS.md-style file without one pair of latest-run markers, in order."""


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def note_lines(part: str, note: str, width: int = 100) -> list[str]:
    """A benchmark's note (what a row counts, why it has no ratio) as lines of at most `width`
    columns under the table's part column."""
    return textwrap.wrap(note, width, initial_indent=f"{part:<9}note: ",
                         subsequent_indent=" " * 15, break_on_hyphens=False)


def table(result: dict) -> str:
    """The one table: a line per ratio ([unit] after the measure), each benchmark's notes, then
    the machine and the load averages; at most 100 columns."""
    m = result["machine"]
    lines = [f"{'part':<9}{'measure [unit]':<47}{'ours':>11}{'reference':>11}{'ratio':>8}  target"]
    for e in result["benchmarks"]:
        if e["skipped"]:
            lines.append(f"{e['benchmark']:<9}{e['skipped']}")
        for r in e["rows"]:
            ratio = "-" if r["ratio"] is None else (
                f"{r['ratio']:.0%}" if r.get("percent") else f"{r['ratio']:.2f}x")
            what = f"{r['what']} [{r['unit']}]"
            lines.append(f"{e['benchmark']:<9}{what:<47}{_fmt(r['ours']):>11}"
                         f"{_fmt(r['reference']):>11}{ratio:>8}  {r['target']}".rstrip())
        for note in e.get("notes", []):
            lines += note_lines(e["benchmark"], note)
    sizes = result.get("sizes", {})
    if any(e["benchmark"] == "convert" and not e["skipped"] for e in result["benchmarks"]):
        lines.append(f"convert model: {sizes.get('convert_model')}")
    lines.append(f"device: {m['device_count']} x {m['device_kind']} ({m['backend']}); "
                 f"{m['cpus']} CPUs ({m['cpu']})")
    lines.append(f"jax {m['jax']}, numpy {m['numpy']}, torch {m['torch'] or 'not installed'}")
    lines.append(f"load average (1, 5, 15 min): {m['load_average']} at start, "
                 f"{result['load_average_end']} at end")
    lines.append(f"{result['seconds']:.0f} s in all" + (" (--quick sizes)" if result["quick"]
                                                       else ""))
    if m["backend"] != "cpu":
        for e in result["benchmarks"]:
            for name, sec in e.get("seconds", {}).items():
                lines.append(f"time  {e['benchmark']:<8}{name:<24}{sec:>10.3f} s")
    return "\n".join(lines)


def latest_section(result: dict) -> str:
    """The text between the markers: a heading, the run's date and command, and its table."""
    when = result.get("date") or "undated"
    command = result.get("command") or "python -m dwjax.bench"
    return (f"## Latest run\n\n{when}: `{command}`\n\n"
            f"```text\n{table(result)}\n```\n")


def _markers(text: str, where: str) -> tuple[int, int]:
    """Offsets of `BEGIN` and `END` in `text`; a `BenchmarksFileError` naming `where` unless each
    occurs once, in that order."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise BenchmarksFileError(
            f"{where}: expected one '{BEGIN}' line and, after it, one '{END}' line around the "
            "latest run")
    return text.index(BEGIN), text.index(END)


def render(text: str | None, result: dict, where: str = "BENCHMARKS.md") -> str:
    """`text` (a BENCHMARKS.md, or None for a new file) with its latest-run section replaced by
    `result`'s; everything outside the markers is kept as it is."""
    block = f"{BEGIN}\n{latest_section(result)}{END}"
    if text is None:
        return f"{TITLE}\n{block}\n"
    begin, end = _markers(text, where)
    return text[:begin] + block + text[end + len(END):]


def _read(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def check_benchmarks_md(path: str) -> None:
    """Fails before a long run when `path` exists but has no latest-run markers to rewrite."""
    text = _read(path)
    if text is not None:
        _markers(text, path)


def write_benchmarks_md(path: str, result: dict) -> None:
    """Rewrites the latest-run section of `path` (creates the file if missing), atomically."""
    text = render(_read(path), result, where=path)
    with atomic.atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
