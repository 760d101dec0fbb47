"""Benchmarks: `python -m dwjax.bench [--parts=convert,train,assign] [--quick] [--json=PATH]
[--benchmarks_md=BENCHMARKS.md]`

Runs the convert, train and assign benchmarks (dwjax.perf.convert_speed, train_speed,
assign_speed) and prints one table (dwjax.perf.results): every ratio measured in this run (ours vs
the plain PyTorch/numpy way, vs this machine's fp32 GEMM peak), the device kind and count and the
load average; on a GPU or TPU the absolute times too. The table is also written as JSON: the
machine, then one entry per benchmark with its rows and figures. Parts needing torch say so instead
of failing without it. `--benchmarks_md` rewrites the latest-run section of BENCHMARKS.md from this
run, keeping its history.

Sizes are flags (`--assign_n=10000000 --assign_small_n=1000000`, `--kmeans_n=50000000
--kmeans_small_n=5000000`, ...); the kernel sets are made in the system's temporary directory, and
a run it has no room for is refused before it starts.
"""
from __future__ import annotations

import compileall
import os
import shutil
import tempfile
import time
from typing import Callable, Sequence

from absl import app, flags

from dwjax import cli, runtime
from dwjax.errors import ConfigError
from dwjax.io import atomic, paths
from dwjax.perf import assign_speed, convert_speed, train_speed
from dwjax.perf import machine as machine_lib
from dwjax.perf import results

PARTS = ("convert", "train", "assign")
# (full, --quick) sizes: --quick is a smaller convert model, fewer epochs and kernels.
SIZES = {
    "convert_model": ("convnextv2_huge", "convnextv2_nano"),
    "convert_repeats": (2, 1),
    "train_epochs": (200, 4),           # 200: the default run's, for the end-to-end ratio
    "train_repeats": (2, 1),
    "train_batch_size": (256, 256),
    "train_synthetic": (0, 0),
    "assign_n": (1_000_000, 200_000),
    "assign_small_n": (250_000, 50_000),
    "naive_n": (100_000, 20_000),
    "assign_5x5_n": (500_000, 200_000),
    "degenerate_n": (1_000_000, 200_000),
    "kmeans_n": (2_000_000, 400_000),
    "kmeans_small_n": (500_000, 100_000),
}
# Sizes that may be 0 (that part skipped), and (smaller, larger) pairs of one comparison.
OPTIONAL = ("train_synthetic", "assign_5x5_n", "degenerate_n", "kmeans_n")
PAIRS = (("assign_small_n", "assign_n"), ("kmeans_small_n", "kmeans_n"))


def command_line(parts: Sequence[str], quick: bool, sizes: dict) -> str:
    """The command that reruns these parts and sizes (sizes given explicitly, in `SIZES` order)."""
    args = [] if list(parts) == list(PARTS) else [f"--parts={','.join(parts)}"]
    args += ["--quick"] if quick else []
    args += [f"--{k}={sizes[k]}" for k in SIZES if sizes.get(k) is not None]
    return " ".join(["python -m dwjax.bench", *args])


def run_bench(parts: Sequence[str] = PARTS, quick: bool = False, json_path: str | None = None,
              log: Callable[[str], None] = print, **sizes) -> dict:
    """Runs `parts`; returns (and writes to `json_path`) `{"machine", "benchmarks", ...}`, with
    the date and the command that reruns it.

    `sizes` overrides `SIZES` (None keeps the full or --quick default)."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ConfigError(f"--parts {','.join(parts)}: expected some of {','.join(PARTS)}")
    bad = set(sizes) - set(SIZES)
    if bad:
        raise ConfigError(f"unknown sizes {sorted(bad)}")
    s = {k: (sizes.get(k) if sizes.get(k) is not None else v[int(quick)])
         for k, v in SIZES.items()}
    machine = machine_lib.describe()
    log(f"machine: {machine['cpus']} CPUs ({machine['cpu']}), {machine['device_count']} x "
        f"{machine['device_kind']} ({machine['backend']}), jax {machine['jax']}, "
        f"load average {machine['load_average']}")
    t0 = time.perf_counter()
    entries = []
    for part in PARTS:
        if part not in parts:
            continue
        if part == "convert":
            entries.append(convert_speed.run(s["convert_model"], s["convert_repeats"], log=log))
        elif part == "train":
            entries.append(train_speed.run(s["train_epochs"], s["train_batch_size"],
                                           synthetic=s["train_synthetic"],
                                           repeats=s["train_repeats"], log=log))
        else:
            entries.append(assign_speed.run(
                s["assign_n"], s["assign_small_n"], s["naive_n"], n_5x5=s["assign_5x5_n"],
                n_degenerate=s["degenerate_n"], n_kmeans=s["kmeans_n"],
                small_kmeans=s["kmeans_small_n"], log=log))
    result = {"format": "dwjax-bench/1", "date": time.strftime("%Y-%m-%d", time.gmtime()),
              "command": command_line(parts, quick, sizes), "quick": quick, "sizes": s,
              "machine": machine, "load_average_end": machine_lib.load_average(),
              "seconds": time.perf_counter() - t0, "benchmarks": entries}
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        atomic.write_json(json_path, result)
    return result


def check_sizes(sizes: dict, quick: bool, parts: Sequence[str]) -> None:
    """Refuses sizes that cannot make a run, and an assign run the temporary directory has no
    room for, before anything runs (`ConfigError`, one line)."""
    for k, v in sizes.items():
        if isinstance(v, int) and v < (0 if k in OPTIONAL else 1):
            raise ConfigError(f"--{k} {v}: must be at least {0 if k in OPTIONAL else 1}")
    s = {k: (sizes.get(k) if sizes.get(k) is not None else v[int(quick)])
         for k, v in SIZES.items()}
    for small, big in PAIRS:
        if s[big] and s[small] >= s[big]:
            raise ConfigError(f"--{small} {s[small]}: must be below --{big} {s[big]}")
    if "assign" in parts:
        need = assign_speed.disk_bytes(s["assign_n"], s["assign_small_n"], s["kmeans_n"],
                                       s["kmeans_small_n"])
        where = tempfile.gettempdir()
        free = shutil.disk_usage(where).free
        if need > free:
            raise ConfigError(f"--assign_n {s['assign_n']}, --kmeans_n {s['kmeans_n']}: need "
                              f"about {need / 1e9:.1f} GB free in {where}, which has "
                              f"{free / 1e9:.1f} GB")


FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_list("parts", list(PARTS), "Which benchmarks: some of convert,train,assign.")
    flags.DEFINE_bool("quick", False, "Smaller sizes (a smaller convert model, fewer kernels).")
    flags.DEFINE_string("json", None, "Where to write the table as JSON (default "
                        "$DWJAX_HOME/bench.json).")
    flags.DEFINE_string("benchmarks_md", None, "A BENCHMARKS.md whose latest-run section (between "
                        "its two marker comments) this run rewrites; the rest of it is kept.")
    flags.DEFINE_string("convert_model", None, "timm model saved as the convert benchmark's "
                        f"checkpoint (default {SIZES['convert_model'][0]}; --quick "
                        f"{SIZES['convert_model'][1]}).")
    flags.DEFINE_integer("convert_repeats", None, "Runs of each convert method (last reported).")
    flags.DEFINE_integer("train_epochs", None, "Epochs of the train benchmark.")
    flags.DEFINE_integer("train_batch_size", None, "Batch of the train benchmark.")
    flags.DEFINE_integer("train_repeats", None, "Runs of each side of the train benchmark.")
    flags.DEFINE_integer("train_synthetic", None, "N random kernels to train on instead of the "
                         "embedded default (0: the embedded default).")
    flags.DEFINE_integer("assign_n", None, "Kernels of the assign benchmark.")
    flags.DEFINE_integer("assign_small_n", None, "The smaller N of the peak-RSS comparison.")
    flags.DEFINE_integer("naive_n", None, "Kernels of the naive full-matrix assignment.")
    flags.DEFINE_integer("assign_5x5_n", None, "At most this many distinct real 5x5 kernels (the "
                         "embedded default's) for the trained-5x5 pruned vs brute-force "
                         "comparison; 0 skips it.")
    flags.DEFINE_integer("degenerate_n", None, "Kernels of the degenerate-curve comparison "
                         "(--config.search=auto vs brute vs pruned end to end); 0 skips it.")
    flags.DEFINE_integer("kmeans_n", None, "3x3 kernels of the k-means peak-RSS comparison "
                         "(`python -m dwjax.assign --kernel_size=3`); 0 skips it.")
    flags.DEFINE_integer("kmeans_small_n", None, "The smaller N of the k-means comparison.")


def main(argv):
    del argv
    cli.setup()
    runtime.use_every_cpu_core()  # as `python -m dwjax.assign` runs its search
    # The commands timed start from bytecode, as after the README's install (an editable install
    # alone has none, and PYTHONDONTWRITEBYTECODE would keep every start compiling the sources).
    compileall.compile_dir(os.path.dirname(os.path.abspath(__file__)), quiet=2)
    with cli.user_errors("bench"):
        sizes = {k: getattr(FLAGS, k) for k in SIZES}
        check_sizes(sizes, FLAGS.quick, FLAGS.parts)
        json_path = FLAGS.json or os.path.join(paths.home(), "bench.json")
        if FLAGS.benchmarks_md:  # a file without markers fails now, not after the run
            results.check_benchmarks_md(FLAGS.benchmarks_md)
        result = run_bench(FLAGS.parts, FLAGS.quick, json_path, **sizes)
        if FLAGS.benchmarks_md:
            results.write_benchmarks_md(FLAGS.benchmarks_md, result)
    print("\n" + results.table(result))
    print(f"\nJSON: {json_path}")
    if FLAGS.benchmarks_md:
        print(f"latest run written to {FLAGS.benchmarks_md}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
