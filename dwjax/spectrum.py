"""Stage 3: decode the code axis and label it.  `python -m dwjax.spectrum --workdir=…`

Decodes evenly spaced codes in [0, 1] (paper §4.2: 500), saves them, proposes `labels.json` from the
DoG-family template bank unless the workdir already has one (a user's edits are never overwritten
without --relabel), and draws the spectrum as the paper's Figure 3.
"""
from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dwjax import figures, labels as labels_lib, paths, preprocess, templates


def decode_codes(model, num_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """`(codes [M] float64 = linspace(0, 1, M), coords [M, k*k-1] float32 decoder outputs)`."""
    codes = np.linspace(0.0, 1.0, num_codes)
    coords = np.asarray(model.decode(jnp.asarray(codes, jnp.float32)))
    return codes, coords


def coords_to_kernels(coords: np.ndarray, kernel_size: int) -> np.ndarray:
    """`[M, k*k-1]` decoder outputs → `[M, k, k]` unit, centred pixel-space kernels."""
    return np.asarray(preprocess.unembed(preprocess.normalise_rows(jnp.asarray(coords)), kernel_size))


def labels_path(workdir: str) -> str:
    return os.path.join(workdir, "labels.json")


def run_spectrum(workdir: str, num_codes: int = 500, relabel: bool = False, log=print) -> dict:
    """Writes `spectrum.npz`, `labels.json` (if absent or `relabel`) and `figures/spectrum.png`.

    Returns `{"spectrum", "labels", "figure"}` paths.
    """
    from dwjax.train import load_trained

    model, config = load_trained(workdir)
    k = int(config.kernel_size)
    codes, coords = decode_codes(model, num_codes)
    kernels = coords_to_kernels(coords, k)
    spec_path = os.path.join(workdir, "spectrum.npz")
    tmp = spec_path + ".tmp.npz"
    np.savez(tmp, codes=codes, coords=coords, kernels=kernels)
    os.replace(tmp, spec_path)
    lpath = labels_path(workdir)
    if relabel or not os.path.exists(lpath):
        proposal = labels_lib.propose_labels(kernels, codes, k)
        labels_lib.save_labels(lpath, proposal)
        log(f"proposed {len(proposal['intervals'])} labelled intervals → {lpath} (edit freely)")
    labels = labels_lib.load_labels(lpath, k)
    for iv in labels["intervals"]:
        log(f"  [{iv['start']:.3f}, {iv['end']:.3f})  {iv['label']}")
    fig = figures.plot_spectrum(kernels, codes, os.path.join(workdir, "figures", "spectrum.png"), labels,
                                title=f"{k}×{k} spectrum ({os.path.basename(os.path.normpath(workdir))})")
    bank, bank_class, _ = templates.template_bank(k)
    names = templates.class_names(k)
    gallery = {names[c]: bank[bank_class == c][:: max(1, int((bank_class == c).sum()) // 8)]
               for c in np.unique(bank_class)}
    bank_fig = figures.plot_gallery(gallery, os.path.join(workdir, "figures", "templates.png"),
                                    f"{k}×{k} DoG-family template bank (what the labels are matched against)")
    log(f"spectrum of {num_codes} codes → {spec_path}, figures → {fig}, {bank_fig}")
    return {"spectrum": spec_path, "labels": lpath, "figure": fig, "templates_figure": bank_fig}


FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A training run directory (default $DWJAX_HOME/runs/k<kernel_size>).")
    flags.DEFINE_integer("kernel_size", 5, "Picks the default workdir when --workdir is not given.")
    flags.DEFINE_integer("num_codes", 500, "Evenly spaced codes to decode.")
    flags.DEFINE_bool("relabel", False, "Replace an existing labels.json with a fresh proposal.")


def main(argv):
    del argv
    from dwjax.train import TrainError, quiet_logs
    from dwjax.checkpointing import CheckpointMismatch

    quiet_logs()
    paths.enable_compilation_cache()
    workdir = FLAGS.workdir or paths.default_workdir(FLAGS.kernel_size)
    if FLAGS.num_codes < 2:
        sys.exit(f"spectrum: --num_codes {FLAGS.num_codes}: need at least 2")
    try:
        run_spectrum(workdir, FLAGS.num_codes, FLAGS.relabel)
    except (TrainError, CheckpointMismatch, ValueError) as e:
        sys.exit(f"spectrum: {e}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
