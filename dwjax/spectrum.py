"""Stage 3: decode the code axis and label it.  `python -m dwjax.spectrum --workdir=…`

Decodes evenly spaced codes in [0, 1] (paper §4.2: 500), saves them, proposes `labels.json` from the
DoG-family template bank unless the workdir already has one (a user's edits are never overwritten
without --config.relabel=true), and draws the spectrum as the paper's Figure 3.
"""
from __future__ import annotations

import os
from typing import Callable

import ml_collections
import numpy as np

from dwjax import cli
from dwjax.errors import ConfigError
from dwjax.io import atomic
from dwjax.io import workdir as workdir_lib
from dwjax.model import decoder, preprocess, restore
from dwjax.patterns import labels as labels_lib
from dwjax.patterns import templates
from dwjax.views import plotting


def run(config: ml_collections.ConfigDict, workdir: str, *,
        log: Callable[[str], None] = print) -> dict:
    """Writes `spectrum.npz`, `labels.json` (if absent or `config.relabel`) and the figures.

    `config` is `configs/spectrum.py`'s. Returns `{"spectrum", "labels", "figure",
    "templates_figure"}` paths.
    """
    num_codes, relabel = config.num_codes, config.relabel
    if num_codes < 2:
        raise ConfigError(f"--config.num_codes {num_codes}: need at least 2")
    run = workdir_lib.RunDir(workdir)
    params, config = restore.load_params(run)
    k = int(config.kernel_size)
    codes, coords = decoder.decode_codes(params, config.model.negative_slope, num_codes)
    kernels = preprocess.coords_to_kernels(coords, k)
    atomic.save_npz(run.spectrum_npz, codes=codes, coords=coords, kernels=kernels)
    if relabel or not os.path.exists(run.labels_json):
        proposal = labels_lib.propose_labels(kernels, codes, k)
        labels_lib.save_labels(run.labels_json, proposal)
        log(f"proposed {len(proposal['intervals'])} labelled intervals → {run.labels_json} "
            "(edit freely)")
    labels = labels_lib.load_labels(run.labels_json, k)
    for iv in labels["intervals"]:
        log(f"  [{iv['start']:.3f}, {iv['end']:.3f})  {iv['label']}")
    name = os.path.basename(os.path.normpath(workdir))
    fig = plotting.plot_spectrum(kernels, codes, run.figure("spectrum.png"), labels,
                                title=f"{k}×{k} spectrum ({name})")
    bank, bank_class, _ = templates.template_bank(k)
    names = templates.class_names(k)
    gallery = {names[c]: bank[bank_class == c][:: max(1, int((bank_class == c).sum()) // 8)]
               for c in np.unique(bank_class)}
    bank_fig = plotting.plot_gallery(
        gallery, run.figure("templates.png"),
        f"{k}×{k} DoG-family template bank (labels are fitted to these families posed freely)")
    log(f"spectrum of {num_codes} codes → {run.spectrum_npz}, figures → {fig}, {bank_fig}")
    return {"spectrum": run.spectrum_npz, "labels": run.labels_json, "figure": fig,
            "templates_figure": bank_fig}


if __name__ == "__main__":
    cli.run_workdir_stage("spectrum", run, "A training run directory")
