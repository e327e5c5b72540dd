import numpy as np
import pytest
import torch
from PIL import Image

from icm_lab.core.concepts import Concept
from icm_lab.labeling.labelers import UNDECIDED, ClipLabeler
from tests.conftest import make_config

OCCUPATIONS = ["firefighter", "doctor", "receptionist", "nurse"]


@pytest.mark.parametrize("name,classes", [
    ("gender", ["male", "female"]),
    ("age", ["young", "adult", "old"]),
    ("race", ["white", "black", "asian", "indian"]),
])
def test_people_concepts(name, classes):
    concept = Concept.from_config(make_config(f"concept={name}").concept)
    assert list(concept.classes) == classes
    assert len(set(concept.neutral_prompts)) >= 100
    for k in classes:
        assert concept.explicit_prompts[k] and concept.classifier_texts[k]
    for job in OCCUPATIONS:
        assert f"A face of a {job}" in concept.eval_prompts
    assert len(concept.eval_prompts) > len(OCCUPATIONS)
    np.testing.assert_allclose(concept.target, 1 / len(classes))
    words = [w.lower() for k in classes for w in concept.class_words[k]]
    assert not any(w in p.lower() for p in concept.neutral_prompts for w in words)


def test_target_must_be_a_distribution():
    cfg = make_config("concept=gender", "concept.target=[0.7,0.3]").concept
    np.testing.assert_allclose(Concept.from_config(cfg).target, [0.7, 0.3])
    with pytest.raises(ValueError, match="2 non-negative shares summing to 1"):
        Concept.from_config(make_config("concept.target=[0.7,0.7]").concept)


class FakeClip:
    """Encoders with known outputs, so the labeler's arithmetic can be checked by hand."""

    def __init__(self, text_features, image_features, scale=10.0):
        self.text_features, self.image_features = text_features, image_features
        self.model = type("M", (), {"logit_scale": torch.tensor(np.log(scale))})()

    def encode_texts(self, texts):
        assert len(texts) == len(self.text_features)
        return self.text_features

    def encode_images(self, images):
        return self.image_features[[image.info["i"] for image in images]]


def _images(n):
    images = []
    for i in range(n):
        image = Image.new("RGB", (8, 8))
        image.info["i"] = i
        images.append(image)
    return images


def test_labeler_scores_a_class_by_its_best_text():
    concept = Concept.from_config(make_config("concept=gender").concept)
    n_male, n_female = (len(concept.classifier_texts[k]) for k in ("male", "female"))
    text = torch.zeros(n_male + n_female, 3)
    text[:n_male, 0] = 1  # male texts point at x...
    text[n_male - 1] = torch.tensor([0.0, 1.0, 0.0])  # ...except one, at y
    text[n_male:, 2] = 1  # female texts point at z
    image = torch.tensor([[0.0, 0.9, 0.1], [0.1, 0.0, 0.9], [0.5, 0.0, 0.5]])
    labels = ClipLabeler(concept, FakeClip(text, image), min_confidence=0.6)(
        _images(3)
    )
    expected_scores = np.array([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]])
    expected = np.exp(10 * expected_scores) / np.exp(10 * expected_scores).sum(1, keepdims=True)
    np.testing.assert_allclose(labels.probs, expected, rtol=1e-5)
    assert labels.labels == ["male", "female", UNDECIDED]


def test_labeler_refuses_zero_images():
    concept = Concept.from_config(make_config("concept=gender").concept)
    n = sum(len(t) for t in concept.classifier_texts.values())
    labeler = ClipLabeler(concept, FakeClip(torch.eye(n, 3), torch.eye(3)), 0.5)
    with pytest.raises(ValueError, match="zero images"):
        labeler([])
