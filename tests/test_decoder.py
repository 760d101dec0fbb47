"""The decoder without flax: the saved-parameter layout, the one forward pass shared by the nnx
model and inference, and a stage that decodes never importing flax."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from dwjax.configs import train as train_configs
from flax import nnx

from dwjax.io import run_checkpoints
from dwjax.io import workdir as workdir_lib
from dwjax.model import autoencoder as model_lib
from dwjax.model import decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN = (64, 32, 16, 8)


def _params(k: int = 5, seed: int = 3):
    return model_lib.init_params(k, HIDDEN, 0.01, seed)


def test_param_template_is_the_nnx_layout():
    for k in (3, 5, 7):
        graphdef, params = _params(k)
        template = decoder.param_template(k, HIDDEN)
        assert jax.tree.structure(template) == jax.tree.structure(params)
        for t, p in zip(jax.tree.leaves(template), jax.tree.leaves(params)):
            assert t.shape == p.shape and t.dtype == p.dtype


def test_model_decode_is_nnx_linear_and_inference_decode_agrees():
    graphdef, params = _params()
    model = model_lib.merge(graphdef, params)
    codes = jnp.linspace(0.0, 1.0, 257, dtype=jnp.float32)

    @nnx.jit
    def with_linear_layers(m, c):  # the chain of nnx.Linear calls decode_layers replaces
        x = jax.nn.leaky_relu(m.from_code(c[:, None]), 0.01)
        for layer in m.decoder[:-1]:
            x = jax.nn.leaky_relu(layer(x), 0.01)
        return jnp.tanh(m.decoder[-1](x))

    ours = np.asarray(nnx.jit(lambda m, c: m.decode(c))(model, codes))
    np.testing.assert_array_equal(ours, np.asarray(with_linear_layers(model, codes)))
    # inference: numpy float64, rounded once: within float32 rounding of the jax pass
    got_codes, coords = decoder.decode_codes(params, 0.01, 257)
    assert coords.dtype == np.float32 and coords.shape == (257, 24)
    np.testing.assert_array_equal(got_codes, np.linspace(0, 1, 257))
    np.testing.assert_allclose(coords, ours, atol=2e-6)
    # and it is the float64 network, written out here from the parameter dict, rounded once
    x = np.linspace(0, 1, 257)[:, None]
    names = [("from_code",)] + [("decoder", i) for i in range(len(HIDDEN))]
    for n, name in enumerate(names):
        layer = params[name[0]] if len(name) == 1 else params[name[0]][name[1]]
        x = x @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
        x = np.tanh(x) if n == len(names) - 1 else np.maximum(x, 0.01 * x)
    np.testing.assert_array_equal(coords, x.astype(np.float32))


def test_inference_stages_never_import_flax(tmp_path):
    """Loading a run's parameters and decoding, as spectrum and assign do, leaves flax (and
    orbax, optax) unimported: most of a short assign's start-up and exit."""
    k = 5
    config = train_configs.get_config(str(k))
    config.model.hidden = HIDDEN
    run = workdir_lib.RunDir(str(tmp_path / "run"))
    workdir_lib.ensure_dir(run)
    arch = workdir_lib.architecture(config)
    workdir_lib.write_config(run, config, arch)
    _, params = _params(k)
    os.makedirs(os.path.join(run.checkpoints, "7"))  # the newest step model.npz must match
    run_checkpoints.save_inference(run.model_npz, params, arch, step=7)
    code = (
        "import sys\n"
        "from dwjax import assign, spectrum\n"
        "from dwjax.io import workdir\n"
        "from dwjax.model import decoder, restore\n"
        f"p, c = restore.load_params(workdir.RunDir({run.path!r}))\n"
        "codes, coords = decoder.decode_codes(p, c.model.negative_slope, 100)\n"
        "np_sum = float(coords.astype('float64').sum())\n"
        "print(repr(np_sum), sorted(m for m in ('flax', 'orbax', 'optax') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    total, loaded = out.stdout.strip().split(" ", 1)
    assert loaded == "[]"
    _, coords = decoder.decode_codes(params, 0.01, 100)
    assert float(total) == float(coords.astype(np.float64).sum())
