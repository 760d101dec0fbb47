"""Report config: `python -m dwjax.report [--config.layers=13,14,15 --config.compare=a,b]`."""
import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # which assignments to report when a run holds several sizes; also picks the default workdir
    c.kernel_size = config_dict.placeholder(int) if not arg else int(arg)
    c.layers = ""            # depthwise layers to sample, e.g. "13,14,15" (paper Figs. 20, 21)
    c.compare = ""           # two or more source ids compared layer by layer (Figs. 18, 26)
    c.timeline = ""          # source ids that are checkpoints of one run, in order (Figs. 24, 25)
    c.formats = "png,pdf"    # figure formats (png is always written)
    c.seed = 0               # seed of every random sample
    return c
