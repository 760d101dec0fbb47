"""Sharded checkpoints and model directories (`io.checkpoint_shards`) through `convert
--checkpoint`: a directory or index of safetensors or `.bin` shards gives byte-equal shards and
the same layer table as the unsharded file; a missing shard is one line, nothing written."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from dwjax import convert as convert_mod
from dwjax.io import model_files
from dwjax.io.sources import SourceError, checkpoint_source

timm = pytest.importorskip("timm")
hub = pytest.importorskip("huggingface_hub")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    state = timm.create_model("mixnet_s", pretrained=False).state_dict()
    out = {"safetensors": str(d / "whole.safetensors"), "bin": str(d / "whole.bin")}
    save_file(state, out["safetensors"])
    torch.save(state, out["bin"])
    for kind, safe in (("safetensors_dir", True), ("bin_dir", False)):
        out[kind] = str(d / kind)
        os.makedirs(out[kind])
        hub.save_torch_state_dict(state, out[kind], max_shard_size="4MB",
                                  safe_serialization=safe)
    with open(os.path.join(out["safetensors_dir"], "config.json"), "w") as f:
        json.dump({"architecture": "mixnet_s", "num_classes": 1000}, f)
    return out


def convert_one(path, data):
    manifest = convert_mod.convert(data, [checkpoint_source(path)], log=lambda *_: None)
    (entry,) = manifest["sources"]
    with open(os.path.join(data, entry["dir"], "source.json")) as f:
        layers = json.load(f)["layers"]
    arrays = {name: open(os.path.join(data, entry["dir"], name), "rb").read()
              for name in entry["files"]}
    return entry, layers, arrays


@pytest.mark.parametrize("whole,sharded,fmt", [
    ("safetensors", "safetensors_dir", "safetensors-sharded"),
    ("bin", "bin_dir", "torch-sharded")])
def test_sharded_equals_unsharded(checkpoints, tmp_path, whole, sharded, fmt):
    shards = sorted(os.listdir(checkpoints[sharded]))
    assert sum(s.endswith((".safetensors", ".bin")) for s in shards) >= 2, shards
    ref_entry, ref_layers, ref_arrays = convert_one(checkpoints[whole], str(tmp_path / "a"))
    index = next(os.path.join(checkpoints[sharded], s) for s in shards
                 if s.endswith(".index.json"))
    for i, path in enumerate([checkpoints[sharded], index]):
        entry, layers, arrays = convert_one(path, str(tmp_path / f"b{i}"))
        assert entry["origin"]["format"] == fmt
        assert layers == ref_layers and len(layers) == 43
        assert entry["counts"] == ref_entry["counts"]
        assert arrays == ref_arrays  # every kernel and meta file byte for byte
    assert ref_entry["origin"]["format"] == {"safetensors": "safetensors",
                                             "bin": "torch-zip"}[whole]


def test_model_directory_records_its_architecture(checkpoints):
    opened = model_files.open_model(checkpoints["safetensors_dir"])
    assert opened.details == {"directory_file": "model.safetensors.index.json",
                              "architecture": "mixnet_s"}
    # the digest covers the index and every shard: changing one shard changes the source id
    names = sorted(os.listdir(checkpoints["safetensors_dir"]))
    assert [os.path.basename(p) for p in opened.files] == [
        "model.safetensors.index.json", *[n for n in names if n.endswith(".safetensors")]]


def test_a_missing_shard_is_one_line_and_nothing_is_written(checkpoints, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    src = checkpoints["safetensors_dir"]
    shards = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
    for name in ["config.json", "model.safetensors.index.json", shards[0]]:  # one shard only
        os.link(os.path.join(src, name), broken / name)
    missing = shards[1]
    out = tmp_path / "data"
    r = subprocess.run([sys.executable, "-m", "dwjax.convert", f"--checkpoint={broken}",
                        f"--data_dir={out}"], capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("convert: --checkpoint ") and f"shard {missing} is missing" in \
        lines[0]
    assert not out.exists()
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(SourceError, match="directory without a model weights file"):
        checkpoint_source(str(empty))
