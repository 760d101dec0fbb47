"""Train config: `get_config("5")` for 5×5 kernels; 3 and 7 too, any other k derives from k.

Used as `python -m dwjax.train --kernel_size=5` or `--config=configs/train.py:7`, with any field
overridable: `--config.num_epochs=100 --config.batch_size=1024
--config.model.hidden="(512,256,128,64)"`.
"""
import ml_collections

# Per-size choices; sizes not listed use the 7×7 row. The epochs are sized for the embedded default
# (tens of thousands of kernels); on a million kernels fewer epochs suffice (--config.num_epochs).
# Time and loss of the defaults: BENCHMARKS.md.
_PER_SIZE = {
    3: dict(num_epochs=100, learning_rate=3e-3),
    5: dict(num_epochs=200, learning_rate=3e-3),
    7: dict(num_epochs=200, learning_rate=2e-3),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    k = int(arg) if arg else 5
    per = _PER_SIZE.get(k, _PER_SIZE[7])
    c = ml_collections.ConfigDict()
    c.kernel_size = k
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(hidden=(256, 128, 64, 32), negative_slope=0.01))
    c.batch_size = 256                  # global: split over every device of every host
    c.num_epochs = per["num_epochs"]
    c.optimizer = "adam"                # adam | adamw | sgd
    c.learning_rate = per["learning_rate"]
    c.weight_decay = 0.0                # adamw only
    c.schedule = "cosine"               # cosine | constant
    c.warmup_epochs = 1.0
    c.end_learning_rate_fraction = 0.02
    # most optimizer steps per jitted call (lax.scan); an epoch is cut into as few, as even
    # calls as fit (93 steps: 3 × 31), so one or two compiled programs; same updates either way
    c.steps_per_call = 32
    c.checkpoint_every_epochs = 5
    c.max_to_keep = 3
    c.eval_batch_size = 8192
    return c
