"""DoG initialisation of a torch model (paper appendix F) draws from the shared template bank."""
import numpy as np
import pytest

from dwjax import extract, labels, templates

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")


def test_dog_init_replaces_depthwise_kernels_with_the_paper_mix():
    from dwjax.dog_init import dog_init_

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False)
    before = extract.layers_from_module(model)
    stem_before = model.conv_stem.weight.detach().clone()
    done = dog_init_(model, seed=0)
    after = extract.layers_from_module(model)
    assert len(done) == len(before) == 16 and sum(done.values()) == sum(len(l.kernels) for l in before)
    assert torch.equal(model.conv_stem.weight, stem_before)  # regular convolutions untouched
    for b, a in zip(before, after):
        # same per-kernel energy as the Kaiming init it replaced
        assert np.isclose(np.linalg.norm(a.kernels, axis=(1, 2)).mean(),
                          np.linalg.norm(b.kernels, axis=(1, 2)).mean(), rtol=1e-4)
    kernels = np.concatenate([l.kernels for l in after if l.kernels.shape[1] == 5])
    cls, sim = labels.match_templates(kernels, 5)
    names = np.array(templates.class_names(5))[cls]
    on_centre = np.mean(names == "On-Centre")
    assert sim.min() > 0.95  # every kernel is a bank pattern
    assert 0.40 < on_centre < 0.50  # 45 % On-Centre in appendix F's mix
