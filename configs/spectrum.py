"""Spectrum config: `python -m dwjax.spectrum [--config.relabel=true]`."""
import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # picks the default run directory ($DWJAX_HOME/runs/k<k>) when --workdir is not given
    c.kernel_size = config_dict.placeholder(int) if not arg else int(arg)
    c.num_codes = 500        # evenly spaced codes decoded and labelled (paper §4.2)
    c.relabel = False        # replace an existing labels.json with a fresh proposal
    return c
