"""Every dot product the assignment runs is float32 at HIGHEST precision on every backend (TPU/GPU
would otherwise run DEFAULT-precision dots as bf16 passes). That keeps backends within float32
rounding of each other; it does not make their rows equal on near-ties (BUILD_NOTES, "Nearest-code
search": settings.json records the backend and refuses to mix).

`assert_highest_precision(text)` checks a lowered program's text and is meant for reuse: e.g. the
train step, `assert_highest_precision(jax.jit(step).lower(*args).as_text())`.
"""
import glob
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwjax.model import mesh as mesh_lib
from dwjax.model import preprocess
from dwjax.search import kmeans, nearest

# A dot's op name in StableHLO / MHLO / HLO text, and its precision as each prints it:
# `precision = [HIGHEST, HIGHEST]` (StableHLO, jax 0.10), `#stablehlo<precision HIGHEST>` (older
# StableHLO), `operand_precision={highest,highest}` (HLO).
_DOT = re.compile(r"\b(?:stablehlo|mhlo)\.(?:dot_general|dot)\b|=\s*f32\[[^\]]*\][^=]*\bdot\(")
_HIGHEST = re.compile(r"precision = \[HIGHEST, HIGHEST\]"
                      r"|precision_config = \[#(?:stable|m)hlo<precision HIGHEST>, "
                      r"#(?:stable|m)hlo<precision HIGHEST>\]"
                      r"|operand_precision=\{highest,highest\}")


def assert_highest_precision(text: str, min_dots: int = 1) -> int:
    """Asserts every dot in a lowered program's text (`jax.jit(f).lower(...).as_text()`) states
    HIGHEST precision for both operands, and that there are at least `min_dots` of them.

    Returns the number of dots found (to check the pattern sees what it should).
    """
    dots = [line.strip() for line in text.splitlines() if _DOT.search(line)]
    assert len(dots) >= min_dots, f"expected ≥ {min_dots} dot(s), found {len(dots)}"
    bad = [line for line in dots if not _HIGHEST.search(line)]
    assert not bad, "dots without HIGHEST precision:\n" + "\n".join(line[:300] for line in bad)
    return len(dots)


def test_helper_rejects_default_precision():
    a = jnp.ones((4, 3))
    with pytest.raises(AssertionError, match="without HIGHEST"):
        assert_highest_precision(jax.jit(lambda v: v @ v.T).lower(a).as_text())
    with pytest.raises(AssertionError, match="expected"):
        assert_highest_precision(jax.jit(lambda v: v + 1).lower(a).as_text())
    highest = jax.jit(lambda v: jnp.matmul(v, v.T, precision=jax.lax.Precision.HIGHEST))
    assert assert_highest_precision(highest.lower(a).as_text()) == 1


@pytest.mark.parametrize("method", ["brute", "pruned"])
def test_nearest_chunk_dots_are_highest(method):
    """The compiled chunk function (embedding, search, refinement; shard_map body included)."""
    mesh = mesh_lib.data_mesh()
    rep = mesh_lib.replicated(mesh)
    recon = np.random.default_rng(0).standard_normal((300, 24)).astype(np.float32)
    r_tiles = jax.device_put(nearest.tiles(recon, 64), rep)
    tables = None if method == "brute" else jax.device_put(nearest.pruned_tables(r_tiles), rep)
    basis = jax.device_put(preprocess.hyperplane_basis(5), rep)
    x = nearest._put(mesh, np.zeros((64, 5, 5), np.float32))
    text = nearest._compiled(mesh, 300, method).lower(x, r_tiles, basis, tables).as_text()
    # brute: embedding, tile loop, refinement; pruned adds the lower-bound and cap GEMMs.
    assert assert_highest_precision(text, min_dots=3 if method == "brute" else 4)


def test_preprocess_and_kmeans_dots_are_highest():
    kern = jnp.zeros((8, 3, 3))
    assert_highest_precision(jax.jit(preprocess.embed).lower(kern).as_text())
    coords = jnp.zeros((8, 8))
    assert_highest_precision(jax.jit(lambda c: preprocess.unembed(c, 3)).lower(coords).as_text())
    x, c = jnp.zeros((64, 9)), jnp.zeros((10, 9))
    # k-means assignment computes Σ(x − c)² elementwise (no dot at all: nothing to pin); the
    # Lloyd update's one-hot sums are a dot.
    assert_highest_precision(kmeans._assign_block.lower(x, c).as_text(), min_dots=0)
    lloyd = kmeans._lloyd.lower(x, c, 10, 1e-6, chunk=32).as_text()
    assert_highest_precision(lloyd, min_dots=1)


def test_train_step_dots_are_highest():
    """Every dot of the jitted train step (forward, backward, optimizer) states HIGHEST, so a TPU
    or GPU trains what the CPU does. (Inference decodes on the host in float64: test_decoder.)"""
    from dwjax.configs import train as train_configs

    from dwjax.model import autoencoder as model_lib
    from dwjax.model import steps as steps_lib

    config = train_configs.get_config("5")
    graphdef, params = model_lib.init_params(5, config.model.hidden, config.model.negative_slope,
                                             0)
    tx = steps_lib.make_optimizer(config, 10)
    mesh = mesh_lib.data_mesh()
    steps = steps_lib.make_train_steps(graphdef, tx, mesh)
    kernels = jnp.zeros((2, 8, 5, 5), jnp.float32)
    text = steps.lower(params, tx.init(params), kernels).as_text()
    n = assert_highest_precision(text, min_dots=10)  # 10 layers forward alone
    assert n >= 20  # and their gradients


def test_precision_is_defined_once():
    """preprocess.PRECISION is the one definition: no other module of dwjax spells HIGHEST."""
    assert preprocess.PRECISION == jax.lax.Precision.HIGHEST
    package = os.path.dirname(os.path.dirname(os.path.abspath(preprocess.__file__)))
    spelled = []
    for path in glob.glob(os.path.join(package, "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            code = [line.split("#")[0] for line in f]
        spelled += [os.path.relpath(path, package) for line in code if "Precision.HIGHEST" in line]
    assert spelled == [os.path.join("model", "preprocess.py")]
