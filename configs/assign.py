"""Assign config: `get_config()` (kernel size from the run), or `get_config("3")` for a size.

Used as `python -m dwjax.assign [--kernel_size=3]` with any field overridable:
`--config.threshold=0.25 --config.job.num_workers=4 --config.job.worker_index=1`.
Every field but `job` decides the rows and is recorded in `assignments/_meta/settings.json`;
`job` says how this process does its share and never changes a row.
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # None: the run's kernel size (needed for the 3×3 k-means path without a trained run)
    c.kernel_size = config_dict.placeholder(int) if not arg else int(arg)
    c.method = config_dict.placeholder(str)      # autoencoder | kmeans; None: kmeans for 3×3
    c.threshold = config_dict.placeholder(float)  # None: the paper's (0.2 for 5×5, 0.3 for 7×7)
    c.num_codes = 10_000                          # evenly spaced codes searched (autoencoder)
    # auto | brute | pruned: the nearest-code search (same rows on one backend; auto picks the
    # faster for the backend and the curve, and says why)
    c.search = "auto"
    c.format = "parquet"                          # parquet | csv
    c.kmeans = ml_collections.ConfigDict(dict(n_clusters=10, seed=0, max_fit=1_000_000))
    c.job = ml_collections.ConfigDict(dict(
        chunk_size=32_768,       # kernels per compiled call: memory is flat in the job's size
        part_size=1 << 20,       # rows per part file: a larger shard is cut into row ranges
        num_workers=1,           # independent workers sharing the job (SLURM arrays, VMs) …
        worker_index=0,          # … each takes every num_workers-th part
        overwrite=False,         # redo assignments made with other settings
        # host threads: chunks read ahead of the devices on all but one, part files written on
        # one; 0: the machine's cores, 1: everything in the calling thread. Never changes a row.
        # (On a CPU with several devices each device's lane reads its own chunks: search.lanes.)
        threads=0,
        # accept a worker whose search (backend, method, tiles, jax) differs from the job's;
        # each part then records its own
        allow_mixed=False,
    ))
    return c
