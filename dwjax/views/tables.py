"""The numbers behind the report (library module; the `report` stage draws and writes them).

Every function is pure: assignment statistics or rows in, table rows or arrays out, so tests
recompute each CSV from the rows it came from.

Shares follow the paper (§5, Figs. 7, 8, 11): a class's share is its count over *all* kernels of
the group (layer, source, checkpoint), so the shares of a group sum to its clustered fraction and
the unclustered and dead kernels are the gap to 1.
"""
from __future__ import annotations

import numpy as np

from dwjax.io import assignment_files
from dwjax.model import preprocess
from dwjax.patterns import templates

# Paper order of the bars (Fig. 7): centre-surround first, then crosses, derivatives, squares;
# "Others" always last so it sits apart on top of the stack.
_ORDER = ("On-Centre", "Off-Centre", "On-Centre Cross", "Off-Centre Cross",
          templates.FIRST_DERIVATIVE, "On-Centre 1st derivative (x)",
          "On-Centre 1st derivative (y)", "Off-Centre 1st derivative (x)",
          "Off-Centre 1st derivative (y)", "On-Centre 2nd derivative", "Off-Centre 2nd derivative",
          "On-Square", "Off-Square")


def class_order(names) -> list[str]:
    """Class names in the paper's order; unknown names (k-means "cluster i") next, "Others" last."""
    names = list(dict.fromkeys(names))
    known = [c for c in _ORDER if c in names]
    rest = sorted(c for c in names if c not in _ORDER and c != templates.OTHERS)
    return known + rest + ([templates.OTHERS] if templates.OTHERS in names else [])


def run_classes(groups: list[dict]) -> list[str]:
    """Every clustered class that occurs in `groups` (statistics dicts with `labels`), in order."""
    return class_order(c for g in groups for c in assignment_files.clustered_labels(g["labels"]))


def shares_of_all(groups: list[dict], classes: list[str]) -> np.ndarray:
    """`[G, C]`: each class's count over *all* kernels of the group (dead and unclustered
    included), so row sums are the groups' clustered fractions."""
    counts = np.array([[g["labels"].get(c, 0) for c in classes] for g in groups], float)
    kernels = np.array([g["kernels"] for g in groups], float)
    return counts.reshape(len(groups), len(classes)) / np.maximum(kernels, 1)[:, None]


def clustered_fraction(groups: list[dict]) -> np.ndarray:
    """`[G]` clustered kernels over all kernels of each group."""
    return np.array([g["clustered"] / max(1, g["kernels"]) for g in groups], float)


def merged(classes: list[str], shares: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Folds the four first-derivative subtypes into one class (Fig. 7); `[G, C]` → `[G, C']`."""
    out_names = class_order(templates.merged_class(c) for c in classes)
    out = np.zeros((len(shares), len(out_names)))
    for j, c in enumerate(classes):
        out[:, out_names.index(templates.merged_class(c))] += shares[:, j]
    return out_names, out


# ------------------------------------------------------------------------------ rows → groups
# ------------------------------------------------------------------------- total activation
QUARTILE_COLUMNS = ("class", "kernels", "min", "q1", "median", "q3", "max", "mean")


def activation_quartiles(label: np.ndarray, clustered: np.ndarray, total: np.ndarray
                         ) -> list[list]:
    """Per clustered class (paper order): n, min, quartiles, max and mean of the total activation
    (sum of the raw kernel's weights, Fig. 10). Inputs are rows `[N]`."""
    label = np.asarray(label, dtype=object)  # a str per row would cost ~4 bytes a character
    out = []
    for c in class_order(label[clustered]):
        x = np.asarray(total[clustered & (label == c)], np.float64)
        q = np.percentile(x, [0, 25, 50, 75, 100])
        out.append([c, len(x), *q.tolist(), float(x.mean())])
    return out


# ------------------------------------------------------------------------------------------ PCA
def pca(kernels: np.ndarray, n_components: int = 3) -> dict:
    """PCA of centred unit kernels (Fig. 4: kernels "vectorized and centered").

    Args:
      kernels: `[N, k, k]` raw kernels (dead ones must be dropped first).
    Returns:
      `{"projection": [N, n_components], "components": [n_components, k*k],
      "explained_variance": [k*k], "explained_variance_ratio": [k*k]}` (variances with N − 1).
    """
    x = np.asarray(preprocess.centre_and_normalise(np.asarray(kernels, np.float32)), np.float64)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    var = s ** 2 / max(1, len(x) - 1)
    return {"projection": x @ vt[:n_components].T, "components": vt[:n_components],
            "explained_variance": var, "explained_variance_ratio": var / var.sum()}


# ------------------------------------------------------------------ k-means vs the autoencoder
def kmeans_clustered(coords: np.ndarray, centroids: np.ndarray, threshold: float) -> np.ndarray:
    """`[N]` bool: a kernel's cosine dissimilarity to its nearest *normalised* centroid is below
    `threshold`, the rule the autoencoder's decoded codes are judged by.

    Args:
      coords: `[N, k*k-1]` unit hyperplane coordinates (`preprocess.embed`).
      centroids: `[K, k*k-1]` k-means centroids in the same space.
    """
    c = np.asarray(preprocess.normalise_rows(np.asarray(centroids, np.float32)))
    best = np.max(np.asarray(coords, np.float32) @ c.T, axis=1)
    return (1.0 - best) < threshold


# ------------------------------------------------------------------------------ per-model table
def model_summary(source_json: dict, parameters: int | None) -> dict:
    """Tables 3/4's columns from a source's `source.json`: parameters (None when no checkpoint file
    is known), depthwise layers and kernels, per kernel size."""
    sizes: dict[str, list[int]] = {}
    for layer in source_json.get("layers", []):
        s = sizes.setdefault(layer["size"], [0, 0])
        s[0] += 1
        s[1] += int(layer["channels"])
    return {"parameters": parameters, "depthwise_layers": len(source_json.get("layers", [])),
            "sizes": {k: {"layers": v[0], "kernels": v[1]} for k, v in sorted(sizes.items())}}


# Buffers a state dict holds beside the parameters (not counted, as a model's parameter count).
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def count_parameters(tensors: dict) -> int:
    """Elements of every tensor of a lazily opened checkpoint (`{name: LazyTensor}` with `shape`),
    BatchNorm buffers left out; nothing is loaded."""
    return int(sum(int(np.prod(t.shape)) for name, t in tensors.items()
                   if not name.endswith(_BUFFERS)))
