"""Master-key config: `python -m dwjax.masterkeys [--kernel_size=3]` on a run directory.

Any field is overridable: `--config.num_filters=8 --config.num_candidates=50`,
`--config.bank=/path/8Filters.txt` (masterfiltmodel's text format), `--config.bank=scale_space
--config.scale_space="dx 1.1 0.95; T 0.61 0.6"`, `--config.check.enabled=true` (the functional
check on an ImageNet model of the embedded default). Every field but `job` and `check` decides the
rows and is recorded in `masterkeys/rows/_meta/settings.json`.
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # None: the run's kernel size
    c.kernel_size = config_dict.placeholder(int) if not arg else int(arg)
    # derive: greedy from the run's decoded codes | kmeans: greedy from the run's k-means
    # centroids (3×3 path) | scale_space: the filters of `scale_space` | a path: a bank file
    c.bank = "derive"
    c.num_candidates = 50     # evenly spaced codes decoded as candidates (derive)
    c.num_filters = 8         # K, the bank's size (derive, kmeans)
    c.curve = 16              # the coverage curve's largest K (at most the candidates)
    c.sample = 200_000        # live kernels the selection and the curve are judged on (a bound)
    c.seed = 0                # the sample's and k-means' seed
    # `op σx σy; …` (dwjax.patterns.scale_space) or a preset name
    c.scale_space = "lindeberg_b"
    c.job = ml_collections.ConfigDict(dict(
        chunk_size=65_536,    # kernels fitted per block (memory is flat in the job's size)
        part_size=1 << 20,    # rows per part file
        num_workers=1,        # independent workers sharing the job …
        worker_index=0,       # … each takes every num_workers-th part
        overwrite=False,      # redo rows made with other settings
    ))
    # the functional check: an ImageNet model of the embedded default with its k×k depthwise
    # kernels replaced (MobileNetV2 for 3×3, EfficientNet-Lite0 for 5×5), on the photographs
    # scikit-image ships; top-1 agreement and logit cosine per K against two controls
    c.check = ml_collections.ConfigDict(dict(
        enabled=False,
        ks="1,2,4,8,16",      # bank sizes: the first K filters of the greedy order
        images=0,             # photographs used (0: every one available)
        views_per_image=20,   # 2 scales × 5 crops × 2 flips
        batch_size=64,
    ))
    return c
