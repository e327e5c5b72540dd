"""The oracle and FairFace labelers (the CLIP labeler is tested in test_concepts.py)."""

import numpy as np
import pytest
import torch
import torchvision
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms.functional import normalize, to_tensor

from icm_lab.core.concepts import Concept
from icm_lab.core.errors import UserError
from icm_lab.evaluation.metrics import fairness
from icm_lab.labeling.labelers import (
    FAIRFACE_LABELS,
    UNDECIDED,
    FairFaceLabeler,
    OracleLabeler,
    load_fairface,
)
from icm_lab.toy import world
from tests.conftest import make_config


def concept(name: str) -> Concept:
    return Concept.from_config(make_config(f"concept={name}").concept)


def blank() -> Image.Image:
    return Image.new("RGB", (32, 32), world.BACKGROUND)


def test_oracle_labeler_reads_the_concepts_attribute_and_leaves_empty_images_undecided():
    rng = np.random.default_rng(0)
    scenes = [world.Scene("circle", "blue", "small", "", True, True),
              world.Scene("square", "yellow", "large", "", True, True)]
    images = [world.render(scene, rng) for scene in scenes] + [blank()]
    colors = OracleLabeler(concept("color"))(images)
    assert colors.labels == ["blue", "yellow", UNDECIDED]
    assert colors.probs[0].tolist() == [0, 0, 1, 0] and np.isnan(colors.probs[2]).all()
    assert OracleLabeler(concept("size"))(images).labels == ["small", "large", UNDECIDED]
    # An image without a reading counts as undecided and stays out of the soft frequencies.
    result = fairness(colors.labels, colors.probs, colors.classes, np.full(4, 0.25))
    assert result["n_undecided"] == 1 and result["fd_soft"] == pytest.approx(result["fd"])


def test_oracle_labeler_refuses_concepts_outside_the_toy_world():
    with pytest.raises(ValueError, match="concept 'gender' has no `oracle:` attribute"):
        OracleLabeler(concept("gender"))


@pytest.fixture(scope="module")
def fairface_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet34(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, len(FAIRFACE_LABELS))
    path = tmp_path_factory.mktemp("fairface") / "res34_fair.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    pt = path.with_suffix(".pt")
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, pt)
    return path, pt, model


def test_fairface_loads_both_checkpoint_formats(fairface_checkpoint):
    path, pt, model = fairface_checkpoint
    x = torch.randn(1, 3, 224, 224)
    for checkpoint in (str(path), str(pt)):
        loaded = load_fairface(checkpoint).eval()
        assert torch.allclose(loaded(x), model.eval()(x), atol=1e-5)
    with pytest.raises(UserError, match="labeler.checkpoint='/nope.pt' is not a file"):
        load_fairface("/nope.pt")


def test_fairface_averages_every_face_of_an_image_and_no_face_is_undecided(
        fairface_checkpoint, monkeypatch):
    path, _, model = fairface_checkpoint
    labeler = FairFaceLabeler(concept("race"), str(path), min_confidence=0.0, device="cpu")
    rng = np.random.default_rng(0)
    crowd, face = (Image.fromarray(rng.integers(0, 255, (96, 96, 3), np.uint8)) for _ in "ab")
    # OpenCV finds faces in real photos; here the crops are pinned to check the arithmetic.
    crops = {id(crowd): [crowd.crop((0, 0, 40, 40)).resize((224, 224)),
                         crowd.crop((50, 50, 90, 90)).resize((224, 224))],
             id(face): [face.crop((25, 25, 55, 55)).resize((224, 224))]}
    monkeypatch.setattr(labeler, "face_crops", lambda im: crops.get(id(im), []))
    labels = labeler([crowd, blank(), face])
    assert labels.labels[1] == UNDECIDED and np.isnan(labels.probs[1]).all()
    assert labels.weights.tolist() == [2, 0, 1]  # faces per image: the soft-frequency weights

    def expected(crop):
        x = normalize(to_tensor(crop), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])[None]
        race = torch.softmax(model.eval()(x)[0, :7], dim=0).detach().numpy()
        names = FAIRFACE_LABELS[:7]
        return np.array([race[[names.index(n) for n in labels_]].sum()
                         for labels_ in concept("race").fairface_labels.values()])

    np.testing.assert_allclose(labels.probs[2], expected(crops[id(face)][0]), atol=1e-5)
    both = (expected(crops[id(crowd)][0]) + expected(crops[id(crowd)][1])) / 2
    np.testing.assert_allclose(labels.probs[0], both, atol=1e-5)  # the mean over its faces
    assert labels.probs[0].sum() == pytest.approx(1.0, abs=1e-5)


def test_fairface_real_detector_finds_no_face_in_a_plain_image(fairface_checkpoint):
    cfg = make_config("concept=gender", "labeler=fairface",
                      f"labeler.checkpoint={fairface_checkpoint[0]}")
    labeler = instantiate(cfg.labeler)(concept=concept("gender"))  # as the run builds it
    assert labeler.face_crops(Image.new("RGB", (128, 128), (200, 180, 160))) == []
    assert labeler([Image.new("RGB", (128, 128), (200, 180, 160))]).labels == [UNDECIDED]


def test_fairface_refuses_concepts_without_fairface_labels(fairface_checkpoint):
    with pytest.raises(ValueError, match="needs `fairface:` labels per class in concept 'color'"):
        FairFaceLabeler(concept("color"), str(fairface_checkpoint[0]), 0.5, "cpu")


def test_fairface_crops_every_face_grown_by_the_margin(fairface_checkpoint):
    labeler = FairFaceLabeler(concept("gender"), str(fairface_checkpoint[0]), 0.5, "cpu",
                              margin=0.25)

    class Detector:  # two faces found: both are cropped, the larger first
        def detectMultiScale(self, gray, **kwargs):  # noqa: N802 (OpenCV's name)
            return np.array([[0, 0, 10, 10], [40, 40, 40, 40]])

    labeler._detector = Detector()
    image = Image.fromarray(np.arange(128 * 128 * 3, dtype=np.uint8).reshape(128, 128, 3))
    large = image.crop((30, 30, 90, 90)).resize((224, 224))  # 40 px face + 10 px per side
    small = image.crop((0, 0, 12, 12)).resize((224, 224))  # clipped at the image's corner
    crops = labeler.face_crops(image)
    assert [np.asarray(c).tolist() for c in crops] == [np.asarray(large).tolist(),
                                                       np.asarray(small).tolist()]
