"""DoG-figure config: `python -m dwjax.dog [--kernel_size=5] [--config.sigma_c=0.8]`."""
import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kernel_size = int(arg) if arg else 7          # odd, ≥ 3: the kernels are [k, k]
    c.formats = "png,pdf"                           # any of png, pdf, svg
    c.sigma_c = config_dict.placeholder(float)      # centre σ (px); None: mid of the bank's range
    c.sigma_s = config_dict.placeholder(float)      # surround σ (px); None: 1.6·sigma_c
    c.cross_sigmas = "0.4,0.5,0.6,0.7,0.8"          # σ of each cross in Fig. 15 (its range)
    return c
