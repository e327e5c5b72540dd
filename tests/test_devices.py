"""Every function that calls a model moves its inputs to the model's device and dtype, brings
the outputs back to the CPU as float32, and calls the model at most `batch_size` inputs at a
time. A CPU has one device, so two stand-ins catch a missing move: a model in bfloat16 fed
float32 images (PyTorch refuses the mix), and a model on the `meta` device whose every module
asserts that its inputs are on its parameters' device; there a complete call ends in the one
error of copying its meta outputs back to the CPU."""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from icm_lab.core.concepts import Concept
from icm_lab.engine.generation import Generator, Prefix
from icm_lab.engine.hooks import AddVector
from icm_lab.evaluation.metrics import ClipImageFeatures, InceptionFeatures, extract
from icm_lab.labeling.labelers import FAIRFACE_LABELS, ClipLabeler, FairFaceLabeler
from icm_lab.models.adapters import layer_registry
from icm_lab.models.clip import load_clip
from icm_lab.stages.components import build
from tests.conftest import make_config

CAME_BACK_FROM_META = "Cannot copy out of meta tensor"  # the call ran, then copied to the CPU


def images(n: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)) for _ in range(n)]


def guard(model: torch.nn.Module) -> torch.nn.Module:
    """Every module with weights asserts that each tensor it gets is on their device."""
    def check(module, args, kwargs):
        device = next(module.parameters(recurse=False)).device
        for x in [*args, *kwargs.values()]:
            if isinstance(x, torch.Tensor):
                assert x.device == device, f"{type(module).__name__} got {x.device}, is on {device}"

    for module in model.modules():
        if next(module.parameters(recurse=False), None) is not None:
            module.register_forward_pre_hook(check, with_kwargs=True)
    return model


def batches_seen(module: torch.nn.Module) -> list[int]:
    """The batch size of each forward call of `module`, appended as they happen."""
    seen = []
    module.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    return seen


@pytest.fixture
def clip():
    torch.manual_seed(0)
    return load_clip("icm-tiny-clip", None, "cpu", batch_size=2)


def concept(name: str) -> Concept:
    return Concept.from_config(make_config(f"concept={name}").concept)


def clip_calls(clip) -> dict:
    """Each CLIP code path, on 5 inputs."""
    labeler = lambda: ClipLabeler(concept("gender"), clip)  # noqa: E731 (encodes its texts)
    return {
        "encode_images": lambda: clip.encode_images(images(5)),
        "encode_texts": lambda: clip.encode_texts(["a photo of a person"] * 5),
        "fid_features": lambda: extract(images(5), ClipImageFeatures(clip)),
        "labeler": lambda: labeler()(images(5)),
    }


def test_clip_paths_feed_a_bfloat16_model_and_return_float32_cpu_features(clip):
    reference = {name: call() for name, call in clip_calls(clip).items()}
    clip.model.to(torch.bfloat16)
    for name, call in clip_calls(clip).items():
        out = call()
        if name == "labeler":
            out, reference[name] = torch.from_numpy(out.probs), torch.from_numpy(
                reference[name].probs)
        assert out.device.type == "cpu" and out.dtype in (torch.float32, torch.float64), name
        assert torch.allclose(out.float(), reference[name].float(), atol=0.1), name


@pytest.mark.parametrize("name", ["encode_images", "encode_texts", "fid_features", "labeler"])
def test_clip_paths_move_inputs_to_the_models_device_and_outputs_back(clip, name):
    guard(clip.model.to("meta"))
    with pytest.raises(NotImplementedError, match=CAME_BACK_FROM_META):
        clip_calls(clip)[name]()


def test_clip_paths_call_the_model_at_most_batch_size_inputs_at_a_time(clip):
    image_calls, text_calls = batches_seen(clip.model.visual), batches_seen(
        clip.model.token_embedding)
    for name, call in clip_calls(clip).items():
        image_calls.clear(), text_calls.clear()
        call()
        calls = image_calls or text_calls
        assert max(calls) <= 2 and sum(calls) == 5 and len(calls) == 3, (name, calls)


@pytest.fixture
def fairface(tmp_path):
    """A random FairFace labeler whose detector finds one face in every image."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = torchvision.models.resnet34(weights=None)
    net.fc = torch.nn.Linear(net.fc.in_features, len(FAIRFACE_LABELS))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "ff.safetensors")
    labeler = FairFaceLabeler(concept("gender"), str(tmp_path / "ff.safetensors"),
                              min_confidence=0.0, device="cpu", batch_size=2)

    class Detector:  # OpenCV finds faces in photos only: one pinned face per image
        def detectMultiScale(self, gray, **kwargs):  # noqa: N802 (OpenCV's name)
            return np.array([[8, 8, 16, 16]])

    labeler._detector = Detector()
    labeler.model.conv1.stride = labeler.model.conv1.kernel_size  # a cheaper forward pass
    return labeler


def test_fairface_feeds_a_bfloat16_model_in_bounded_batches(fairface):
    reference = fairface(images(3)).probs
    fairface.model.to(torch.bfloat16)
    seen = batches_seen(fairface.model)
    probs = fairface(images(3)).probs
    assert probs.dtype == np.float64 and np.allclose(probs, reference, atol=0.05)
    assert seen == [2, 1]


def test_fairface_moves_crops_to_the_models_device_and_logits_back(fairface):
    guard(fairface.model.to("meta"))
    with pytest.raises(NotImplementedError, match=CAME_BACK_FROM_META):
        fairface(images(3))


class _Inception(torch.nn.Module):
    """Stands in for torchmetrics' Inception (weights cannot be downloaded here): it takes
    8-bit images, as the real one asserts."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8
        return self.fc(x.to(self.fc.weight.dtype).mean(dim=(2, 3)))


def test_inception_features_move_images_to_the_network_in_bounded_batches():
    torch.manual_seed(0)
    net = _Inception()
    seen = batches_seen(net)
    features = extract(images(5), InceptionFeatures(net, batch_size=2, num_features=4))
    assert features.shape == (5, 4) and features.device.type == "cpu" and seen == [2, 2, 1]
    net.to(torch.bfloat16)
    assert extract(images(5), InceptionFeatures(net, 2, 4)).dtype == torch.float64
    guard(net.to("meta"))
    with pytest.raises(NotImplementedError, match=CAME_BACK_FROM_META):
        extract(images(5), InceptionFeatures(net, 2, 4))


def test_inception_input_is_resized_to_299_the_way_clean_fid_does():
    """clean-fid: PIL bicubic per channel on the 0-255 float image (antialiased), then 8 bits."""
    from icm_lab.evaluation.metrics import clean_resize

    torch.manual_seed(0)
    batch = torch.rand(2, 3, 64, 48)
    out = clean_resize(batch)
    assert out.shape == (2, 3, 299, 299) and out.dtype == torch.uint8
    channel = Image.fromarray((batch[1, 2] * 255).numpy(), mode="F")
    expected = np.asarray(channel.resize((299, 299), Image.BICUBIC)).clip(0, 255)
    assert np.abs(out[1, 2].numpy().astype(float) - expected).max() <= 0.5 + 1e-3
    seen = []
    net = _Inception()
    net.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    extract(images(3), InceptionFeatures(net, 3, 4))
    assert seen == [(3, 3, 299, 299)]


@pytest.mark.parametrize("name", ["toy", pytest.param("tiny_sd15", marks=pytest.mark.slow)])
def test_generation_records_and_steers_a_bfloat16_model(name, tmp_path):
    """The generation path itself in bfloat16, as on a GPU: float32 steering vectors, recording
    hooks and the cached prefix all meet bfloat16 activations; PyTorch refuses any mix."""
    spec = build(make_config(f"model={name}", "model.dtype=bfloat16", "model.steps=4",
                             "model.batch_size=2").model, "model")
    pipe = spec.load()
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}
    registry = layer_registry(pipe, spec.resolution)
    generator = Generator(pipe, registry, spec)
    layer = registry.names("attn1")[0]
    vectors = torch.zeros(2, registry[layer].width)  # float32, as steering plans hold them
    vectors[0] = 50.0
    steer = [AddVector(layer, vectors, start=1)]
    prompt = spec_prompt(name)
    base, recorded = generator.batch([prompt] * 2, [1, 2], record=[layer],
                                     prefix=Prefix(tmp_path, 1))
    assert recorded[layer].shape == (2, 4, registry[layer].width)
    assert np.isfinite(recorded[layer]).all()
    steered, _ = generator.batch([prompt] * 2, [1, 2], steer, prefix=Prefix(tmp_path, 1))
    assert not np.array_equal(np.asarray(base[0]), np.asarray(steered[0]))  # steered
    assert np.array_equal(np.asarray(base[1]), np.asarray(steered[1]))  # untouched, exact


def spec_prompt(model: str) -> str:
    return "a circle" if model == "toy" else "a photo of a person"
