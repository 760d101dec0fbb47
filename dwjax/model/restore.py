"""The trained autoencoder of a run directory, restored for inference: parameters alone (numpy,
no flax) or the nnx module."""
from __future__ import annotations

import ml_collections

from dwjax.errors import RunDirError
from dwjax.io import run_checkpoints, workdir
from dwjax.model import decoder


def load_params(run: workdir.RunDir) -> tuple[dict, ml_collections.ConfigDict]:
    """`(params, config)`: the latest checkpoint's pure-dict parameters (host arrays, the layout of
    `decoder.param_template`) and the train config. No optimizer state is read or built, and flax
    is not imported: what inference (`decoder.decode_codes`) needs."""
    config = workdir.read_config(run)
    arch = workdir.architecture(config)
    template = decoder.param_template(config.kernel_size, config.model.hidden)
    params = run_checkpoints.load_inference(run.model_npz, template, arch,
                                            run_checkpoints.latest_step(run.checkpoints))
    if params is None:  # no model.npz, or one older than the newest checkpoint
        params, _ = run_checkpoints.restore_params(run.checkpoints, template, arch)
    if params is None:
        raise RunDirError(f"--workdir {run.path}: no checkpoint (train first)")
    return params, config


def load_model(run: workdir.RunDir):
    """`(model, config)`: the nnx autoencoder with the latest checkpoint's parameters."""
    from dwjax.model import autoencoder as model_lib  # flax: only for callers that want the module

    params, config = load_params(run)
    structure = model_lib.graphdef(config.kernel_size, config.model.hidden,
                                   config.model.negative_slope)
    return model_lib.merge(structure, params), config
