"""The house rules, checked: stages are siblings, one owner per artifact path, and the one error
rule of every main (user errors are one line, bugs keep their traceback)."""
import ast
import errno
import glob
import io
import os
import re
import subprocess
import sys
import tokenize

import pytest

from dwjax import cli
from dwjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "dwjax")


def _modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name below `dwjax` (`assign`, `io.shards`, …)."""
    out = {}
    for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
        with open(path) as f:
            out[rel] = ast.parse(f.read(), path)
    return out


def _is_stage(tree: ast.Module) -> bool:
    """A stage is a module run as a program: it has an `if __name__ == "__main__":` block."""
    return any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)


def _imported_dwjax_modules(tree: ast.Module) -> set[str]:
    """Every dwjax module a module imports (dotted below `dwjax`), at top level or inside
    functions. `from dwjax.io import shards` gives `io.shards`; `from dwjax.io.shards import x`
    gives `io.shards` too."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name[len("dwjax."):] for a in node.names if a.name.startswith("dwjax.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "dwjax":
                found |= {a.name for a in node.names}
            elif node.module.startswith("dwjax."):
                below = node.module[len("dwjax."):]
                if below in ROLES:  # a role package: each name is a module of it
                    found |= {f"{below}.{a.name}" for a in node.names}
                else:
                    found.add(below)
    return found


# Role subpackages, and the roles each may import (besides itself). Stages (the top-level modules
# run as programs) may import any library module, never another stage. `errors` may be imported by
# anything; `cli` and `runtime` (what a stage's main shares) import io only, and only stages import
# them.
ROLES = {
    "io": set(),
    "model": {"io"},
    "search": {"model", "io"},
    "patterns": {"model", "io"},
    "views": {"patterns", "search", "model", "io"},
    "perf": {"patterns", "search", "model", "io"},
    "configs": set(),
}
TOP_LIBRARIES = {"__init__", "cli", "errors", "runtime"}


def _role(module: str) -> str | None:
    head = module.split(".")[0]
    return head if head in ROLES else None


def _layer_violations(modules: dict[str, ast.Module]) -> dict[str, list[str]]:
    stages = {name for name, tree in modules.items() if _is_stage(tree)}
    bad = {}
    for name, tree in modules.items():
        wrong = []
        for imported in sorted(_imported_dwjax_modules(tree)):
            target = _role(imported)
            if name in stages:
                ok = imported not in stages or imported == name
            elif _role(name) is not None:
                own = _role(name)
                ok = (target == own or target in ROLES[own] or target == "configs"
                      or imported in {"errors", "__version__"})
            else:  # cli, errors, __init__
                ok = target == "io" or imported in TOP_LIBRARIES or imported == "__version__"
            if not ok:
                wrong.append(imported)
        if wrong:
            bad[name] = wrong
    return bad


def test_the_package_shows_its_roles():
    modules = _modules()
    stages = {name for name, tree in modules.items() if _is_stage(tree)}
    assert {"convert", "train", "spectrum", "assign", "report", "dog", "bench"} <= stages
    top = {name for name in modules if "." not in name}
    assert top - stages <= TOP_LIBRARIES, f"top-level libraries: {sorted(top - stages)}"
    assert all(_role(name) for name in modules if "." in name)
    # no two modules whose names differ by a suffix (train/training, assign/assignments)
    short = sorted({name.rsplit(".", 1)[-1] for name in modules} - {"__init__"})
    pairs = [(a, b) for a in short for b in short if a != b and b.startswith(a)
             and b[len(a):].lstrip("_") in {"s", "ing", "ments", "er", "ed", "ion", "ions"}]
    assert not pairs


def test_stages_are_siblings_and_libraries_respect_their_layers():
    assert _layer_violations(_modules()) == {}


MAIN = "if __name__ == '__main__':\n    pass\n"


def test_the_layer_check_catches_a_wrong_import():
    modules = {"io.shards": ast.parse("from dwjax.model import preprocess\n"),
               "search.nearest": ast.parse("def f():\n    from dwjax.views import tables\n"),
               "views.page": ast.parse("from dwjax.io import atomic\nfrom dwjax import cli\n"),
               "assign": ast.parse(f"from dwjax import report\n{MAIN}"),
               "report": ast.parse(f"from dwjax.views import page\n{MAIN}")}
    assert _layer_violations(modules) == {"io.shards": ["model.preprocess"],
                                          "search.nearest": ["views.tables"],
                                          "views.page": ["cli"], "assign": ["report"]}


def test_the_import_check_catches_a_stage_importing_a_stage():
    tree = ast.parse("def f():\n    from dwjax.train import run\n"
                     "import dwjax.report\nfrom dwjax import spectrum as s\n"
                     "from dwjax.io import paths\nfrom dwjax.io.shards import Shard\n")
    assert _imported_dwjax_modules(tree) == {"train", "report", "spectrum", "io.paths",
                                             "io.shards"}


# Artifact file names and who alone may spell them.
OWNERS = {
    '"config.json"': "io.workdir", '"labels.json"': "io.workdir", '"metrics.jsonl"': "io.workdir",
    '"spectrum.npz"': "io.workdir", '"kmeans_k': "io.workdir", '"checkpoints"': "io.workdir",
    '"manifest.json"': "io.shards", '"source.json"': "io.shards", '.npy"': "io.shards",
    '"settings.json"': "io.assignment_files", '"summary.json"': "io.assignment_files",
    '"bank.txt"': "io.masterkey_files", '"bank.npy"': "io.masterkey_files",
    '"coverage.csv"': "io.masterkey_files", '"functional.csv"': "io.masterkey_files",
}


def _string_literals(tree: ast.Module) -> list[str]:
    """Every string constant of a module, docstrings left out (they may describe the layout)."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and id(n) not in docs]


# Files of the same name that are another artifact: a Hugging Face model directory's config.json;
# the master-key bank's .npy (not a kernel shard).
ALSO_SPELT = {('"config.json"', "io.checkpoint_shards"), ('"config.json"', "io.model_files"),
              ('"config.json"', "io.keras_file"),
              ('.npy"', "io.masterkey_files")}


def test_each_artifact_path_has_one_owner():
    modules = _modules()
    assert set(OWNERS.values()) <= set(modules)
    for name, tree in modules.items():
        strings = _string_literals(tree)
        for literal, owner in OWNERS.items():
            if name != owner and (literal, name) not in ALSO_SPELT:
                bad = [s for s in strings if literal.strip('"') in s
                       and (literal.startswith('"') and s.startswith(literal.strip('"'))
                            or literal.endswith('"') and s.endswith(literal.strip('"')))]
                assert not bad, f"{name} spells {literal} (owned by {owner})"


def test_user_errors_become_one_line_and_bugs_propagate(capsys):
    with pytest.raises(SystemExit) as e:
        with cli.user_errors("demo"):
            raise ConfigError("--config.x 3: too\nbig")
    assert e.value.code == 1
    assert capsys.readouterr().err == "demo: --config.x 3: too big\n"
    # Ctrl-C (exit 130, "<stage>: interrupted") is tested on a real run in test_failures.py
    with pytest.raises(SystemExit) as e:
        with cli.user_errors("demo"):
            raise OSError(errno.ENOSPC, "No space left on device", "/data/x.npy")
    assert e.value.code == 1
    assert capsys.readouterr().err == "demo: /data/x.npy: No space left on device\n"
    for bug in (ValueError("internal"), KeyError("k"), OSError(errno.EBADF, "bad fd")):
        with pytest.raises(type(bug)):
            with cli.user_errors("demo"):
                raise bug


_BUGGY_REPORT = """
from dwjax import cli, report
def broken(*args, **kwargs):
    raise ValueError("an internal bug")
cli.run_workdir_stage("report", broken, "Run directory")
"""


def test_a_bug_in_a_stage_keeps_its_traceback(tmp_path):
    """A plain ValueError inside a stage is a bug: the main must not turn it into a tidy line."""
    p = subprocess.run([sys.executable, "-c", _BUGGY_REPORT, f"--workdir={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 1
    assert "Traceback" in p.stderr and "ValueError: an internal bug" in p.stderr
    # the same stage with a user error: one line, no traceback
    p = subprocess.run([sys.executable, "-m", "dwjax.report", f"--workdir={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and p.stderr.startswith("report: ")


# Comments and docstrings say why, not how fast: a measured timing or rate goes stale with the
# next machine or jax release (benchmarks: `python -m dwjax.bench`, figures in BENCHMARKS.md).
# A measurement is a number with a time unit ("~22 s", "1 ms"), a rate per second ("12 GFLOP/s",
# "3M rows/s") or a speed claim ("~10× faster", "4x slower", "−16%", "~10% of wall time", "costs
# ~15% more"). Kernel sizes (7×7), shapes ([N, k*k-1]), thresholds and the paper's mixes are not.
_NUMBER = r"(?<![\w.])~?\d[\d,]*(?:\.\d+)?"
_MEASURED = re.compile(
    _NUMBER + r"\s?(?:s|ms|µs|us|ns|min|sec|secs|seconds|minutes?|hours?)(?![\w/])"
    r"|" + _NUMBER + r"\s?[kKMGT]?\s?[A-Za-z]*/s(?![\w/])"
    r"|" + _NUMBER + r"\s?[×x]\s?(?:faster|slower|quicker|speed-?up|as fast|the speed)"
    r"|" + _NUMBER + r"\s?%\s?(?:faster|slower|quicker|speed-?up|of (?:the )?(?:wall|run)[- ]?time)"
    r"|(?<![\w.])[−+-]\d+(?:\.\d+)?\s?%"
    r"|\b(?:cost|costs|took|takes|saves|saved)\s+(?:about\s+)?" + _NUMBER + r"\s?(?:%|×|x\b)"
    r"|\bspeed-?up of " + _NUMBER)


def _measured_claims(source: str) -> list[str]:
    """`"<line>: <match>"` for every measured timing or rate in a module's comments and
    docstrings."""
    texts = [(tok.start[0], tok.string)
             for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                texts.append((node.body[0].lineno, doc))
    return [f"{line + text[:m.start()].count(chr(10))}: {m.group()}"
            for line, text in texts for m in _MEASURED.finditer(text)]


def test_no_comment_or_docstring_carries_a_measured_timing():
    found = {}
    for path in sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            claims = _measured_claims(f.read())
        if claims:
            found[os.path.relpath(path, ROOT)] = claims
    assert not found, f"measured timings in comments or docstrings (say why instead): {found}"


def test_the_timing_check_catches_a_planted_measurement():
    planted = ('"""Fast.\n\nRuns ~10× faster than argsort (~22 s on 2 CPU cores)."""\n'
               "def f():\n"
               '    """Per step ~1 ms; 0.23 s per 1M rows, 12.5 GFLOP/s."""\n'
               "    return 1  # tile_m = 16: −16%; an int32 max measured 4x slower\n")
    assert sorted(_measured_claims(planted)) == ["3: ~10× faster", "3: ~22 s", "5: 0.23 s",
                                                 "5: 12.5 GFLOP/s", "5: ~1 ms", "6: 4x slower",
                                                 "6: −16%"]
    innocent = ('"""Kernels `[N, k*k-1]` on a 5×5 or 7×7 grid; threshold 0.3 for 7×7."""\n'
                "MIX = 0.45  # the paper's 45% on-center, 10 % off-center; σ = 0.4 … 0.8 px\n"
                "TOL = 2.0 ** -22  # ~2 float32 ulps; 1e-5 is ~100× float32 rounding; idx = −1\n")
    assert _measured_claims(innocent) == []
