"""TensorBoard event files written without tensorflow: framing, CRCs, and the training curves."""
import glob
import json
import os

import numpy as np
from dwjax.configs import train as train_configs

from dwjax import train
from dwjax.io import tb_events
from tests.helpers import make_data_dir


def test_crc32c_known_vector_and_round_trip(tmp_path):
    assert tb_events.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    w = tb_events.ScalarWriter(str(tmp_path))
    for step, v in [(1, 0.5), (2, 0.25), (300, -1.5)]:
        w.scalar("a/b", v, step)
    w.close()
    assert tb_events.read_scalars(w.path) == [("a/b", 0.5, 1), ("a/b", 0.25, 2), ("a/b", -1.5, 300)]
    raw = bytearray(open(w.path, "rb").read())
    raw[-6] ^= 1  # a flipped bit is caught by the CRC
    open(w.path, "wb").write(raw)
    try:
        tb_events.read_scalars(w.path)
        raise AssertionError("corruption not detected")
    except ValueError as e:
        assert "CRC" in str(e)


def test_training_writes_tensorboard_curves(tmp_path):
    x = np.random.default_rng(0).normal(size=(512, 5, 5)).astype(np.float32)
    d = make_data_dir(tmp_path, {"noise": x})
    c = train_configs.get_config("5")
    c.batch_size, c.num_epochs = 64, 2
    wd = str(tmp_path / "run")
    train.run(c, wd, d, log=lambda *_: None)
    (path,) = glob.glob(os.path.join(wd, "tensorboard", "events.out.tfevents.*"))
    scalars = tb_events.read_scalars(path)
    epochs = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl")) if '"epoch"' in l]
    got = [(s, v) for t, v, s in scalars if t == "train/epoch_loss"]
    assert [s for s, _ in got] == [e["step"] for e in epochs] == [8, 16]
    np.testing.assert_allclose([v for _, v in got], [e["epoch_loss"] for e in epochs], rtol=1e-6)
    assert sum(t == "train/loss" for t, _, _ in scalars) >= 10
