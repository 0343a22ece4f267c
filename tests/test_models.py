"""Backbones: ResNet-50 with torchvision's state_dict layout, pretrained weights from a file, model=auto."""

import pytest
import torch

from noisymix.distributed.models import PretrainedError, auto_model, create_model


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """Random weights in torchvision's ResNet-50 layout, 1000-class classifier included, as a plain state_dict."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(create_model("resnet50", 3, 1000, 224).state_dict(), path)
    return path


def test_resnet50_has_torchvisions_keys_and_shapes():
    state = create_model("resnet50", 3, 1000, 224).state_dict()
    assert len(state) == 320 and list(state)[:2] == ["conv1.weight", "bn1.weight"] and list(state)[-1] == "fc.bias"
    assert state["layer3.5.conv2.weight"].shape == (256, 256, 3, 3) and state["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    assert sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked")) == 25_610_152


def test_pretrained_weights_load_everything_but_the_classifier(imagenet_file):
    torch.manual_seed(1)
    model = create_model("resnet50", 3, 14, 224, pretrained=str(imagenet_file))
    source = torch.load(imagenet_file, weights_only=True)
    assert torch.equal(model.state_dict()["layer2.1.conv1.weight"], source["layer2.1.conv1.weight"])
    assert model.fc.weight.shape == (14, 2048), "the classifier is new, for this dataset's classes"
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 14)


def test_a_pretrained_file_that_does_not_fit_names_the_first_mismatch(imagenet_file, tmp_path):
    state = torch.load(imagenet_file, weights_only=True)
    cases = {"missing": {k: v for k, v in state.items() if k != "layer1.0.conv2.weight"},
             "shape": {**state, "bn1.weight": torch.ones(3)},
             "extra": {**state, "layer5.0.conv1.weight": torch.ones(1)},
             "wrapped": {"state_dict": state}}
    for name, content in cases.items():
        torch.save(content, tmp_path / f"{name}.pth")
    with pytest.raises(PretrainedError, match="lacks layer1.0.conv2.weight"):
        create_model("resnet50", 3, 14, 224, pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(PretrainedError, match=r"bn1.weight has shape \(3,\), the model's is \(64,\)"):
        create_model("resnet50", 3, 14, 224, pretrained=str(tmp_path / "shape.pth"))
    with pytest.raises(PretrainedError, match="holds layer5.0.conv1.weight"):
        create_model("resnet50", 3, 14, 224, pretrained=str(tmp_path / "extra.pth"))
    create_model("resnet50", 3, 14, 224, pretrained=str(tmp_path / "wrapped.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedError, match="cannot read pretrained weights"):
        create_model("resnet50", 3, 14, 224, pretrained=str(tmp_path / "junk.pth"))
    with pytest.raises(PretrainedError, match="lacks"):
        create_model("small_cnn", 3, 14, 28, pretrained=str(imagenet_file))


def test_auto_picks_the_backbone_by_input_size():
    assert [auto_model(s) for s in (8, 28, 32, 96, 128, 224)] == ["small_cnn"] * 2 + ["preact_resnet18"] * 2 + ["resnet50"] * 2
