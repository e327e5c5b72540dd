"""The paper's protocol as experiments: every pinned value, so a later change of a default cannot
drift the protocol (conf/paper_protocol.yaml, conf/experiment/paper_*.yaml)."""

import numpy as np
import pytest

from icm_lab.core.selection import step_window
from icm_lab.steering.plans import PAPER_BATCH, assign_targets
from tests.conftest import make_config

PAPER_LAYERS = ["mid_block.attentions.0.transformer_blocks.0.attn1",
                "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                "up_blocks.1.attentions.1.transformer_blocks.0.attn1"]
GENERATION = {  # model name, dtype, scheduler, steps, guidance, resolution
    "paper_sd15_gender": ("sd15", "float16", "DDIMScheduler", 50, 7.5, 512),
    "paper_sd15_age": ("sd15", "float16", "DDIMScheduler", 50, 7.5, 512),
    "paper_sd15_race": ("sd15", "float16", "DDIMScheduler", 50, 7.5, 512),
    "paper_sdxl_gender": ("sdxl", "float16", "DDIMScheduler", 50, 5.0, 1024),
    "paper_sana_gender": ("sana", "bfloat16", None, 20, 4.5, 1024),
}
FAIRFACE = {
    "gender": {"male": ["Male"], "female": ["Female"]},
    "age": {"young": ["0-2", "3-9", "10-19"], "adult": ["20-29", "30-39", "40-49", "50-59"],
            "old": ["60-69", "70+"]},
    "race": {"white": ["White"], "black": ["Black"], "asian": ["East Asian", "Southeast Asian"],
             "indian": ["Indian"]},  # Latino_Hispanic and Middle Eastern: dropped
}


@pytest.mark.parametrize("name", sorted(GENERATION))
def test_paper_experiment_pins_the_protocol(name):
    cfg = make_config(f"experiment={name}")
    m = cfg.model
    assert (m.name, m.dtype, m.scheduler, m.steps, m.guidance, m.resolution) == GENERATION[name]
    concept = name.split("_")[-1]
    assert cfg.concept.name == concept
    assert {k: list(v.fairface) for k, v in cfg.concept.classes.items()} == FAIRFACE[concept]
    assert list(cfg.concept.eval_prompts) == [f"A face of a {job}" for job in
                                              ("firefighter", "doctor", "receptionist", "nurse")]
    assert cfg.concept.target is None  # uniform
    # localization: 5 images per neutral prompt, one per-image stratified 80/20 split, seed 42,
    # StandardScaler + L2 logistic regression with C = 1
    assert cfg.collect.n_images == 5 * len(cfg.concept.templates) * len(cfg.concept.subjects)
    assert (cfg.localize.split, cfg.localize.test_size, cfg.localize.folds, cfg.seed) == (
        "image", 0.2, 1, 42)
    assert (cfg.probe.name, cfg.probe.C) == ("sklearn", 1.0)
    # steering
    assert cfg.method._target_ == "icm_lab.steering.methods.Icm"
    s = cfg.steer
    assert (s.alpha, s.start, s.end, s.halves, s.direction, s.units, s.policy) == (
        15.0, 0.3, None, "cond", "probe", "raw", "paper_batch")
    window = step_window(s.start, s.end, m.steps)
    assert (window.start, window.stop) == ((15, 50) if m.steps == 50 else (6, 20))
    if m.name == "sd15":
        assert list(cfg.layers.select) == PAPER_LAYERS
    else:  # the paper's layers for these models are not public: this project's localization
        assert (cfg.layers.select, cfg.layers.kind, cfg.layers.k, cfg.layers.rank_by) == (
            "auto", "attn1", 3, "separability")
    # evaluation
    assert cfg.labeler._target_ == "icm_lab.labeling.labelers.FairFaceLabeler"
    assert cfg.labeler.min_confidence == 0.0
    assert (cfg.eval.n_images_per_prompt, cfg.eval.features) == (512, "inception")
    assert (cfg.clip.model, cfg.clip.pretrained) == ("ViT-L-14-quickgelu", "openai")


def test_paper_batch_draws_one_class_per_batch_of_16():
    targets = assign_targets(100, np.array([0.5, 0.5]), seed=3, policy="paper_batch")
    batches = [targets[i:i + PAPER_BATCH] for i in range(0, 100, PAPER_BATCH)]
    assert PAPER_BATCH == 16 and len(batches) == 7 and len(batches[-1]) == 4
    assert all(len(set(batch)) == 1 for batch in batches)
    assert np.array_equal(targets, assign_targets(100, np.array([0.5, 0.5]), seed=3,
                                                  policy="paper_batch"))  # seeded
    draws = np.concatenate([assign_targets(16 * 50, np.array([0.25] * 4), seed=s,
                                           policy="paper_batch")[::16] for s in range(20)])
    shares = np.bincount(draws, minlength=4) / len(draws)
    assert np.abs(shares - 0.25).max() < 0.05  # uniform over classes, not one class
    assert set(assign_targets(64, np.array([0.0, 1.0]), seed=0, policy="paper_batch")) == {1}
