"""Shared-prefix generation: a generation that continues from cached latents equals one from
scratch bit for bit, and skips exactly the prefix's denoiser calls."""

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from icm_lab.engine.generation import Generator, Prefix
from icm_lab.engine.hooks import AddVector
from icm_lab.stages.resources import Resources
from tests.conftest import make_config

N, STEPS = 3, 10


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


def generator_for(tiny, name: str) -> Generator:
    pipe, registry, spec = tiny(name)
    spec = replace(spec, steps=STEPS, batch_size=2)
    assert spec.guidance > 1  # classifier-free guidance on: both CFG halves go through the cache
    return Generator(pipe, registry, spec)


def steering(generator: Generator, start: int) -> list[AddVector]:
    layer = generator.registry.names("attn1")[0]
    vectors = torch.randn(N, generator.registry[layer].width, generator=torch.Generator()
                          .manual_seed(0)) * 20
    vectors[1] = 0  # an untouched sample in a steered batch
    return [AddVector(layer, vectors, start=start)]


@pytest.mark.parametrize("name", ["toy", pytest.param("tiny_sd15", marks=pytest.mark.slow),
                                  pytest.param("tiny_sana", marks=pytest.mark.slow)])
def test_continuing_from_the_cached_prefix_is_bit_identical(name, tiny, tmp_path):
    generator = generator_for(tiny, name)
    prompts, seeds, start = ["a circle"] * N, [3, 4, 5], 3
    edits = steering(generator, start)
    scratch = pixels(generator.all(prompts, seeds, edits))
    prefix = Prefix(tmp_path, start)

    calls = generator.calls
    base = pixels(generator.all(prompts, seeds, prefix=prefix))  # writes the prefix
    assert generator.calls - calls == 2 * STEPS  # two batches, nothing skipped
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "0000000-0000002.safetensors", "0000002-0000003.safetensors"]

    calls = generator.calls
    resumed = pixels(generator.all(prompts, seeds, edits, prefix=prefix))
    assert generator.calls - calls == 2 * (STEPS - start)  # the prefix is not recomputed
    for a, b in zip(scratch, resumed, strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(base[1], resumed[1])  # the untouched sample is the base image
    assert not np.array_equal(base[0], resumed[0])  # and the steered one is not
    plain = pixels(generator.all(prompts, seeds))  # writing the prefix changed nothing
    assert all(np.array_equal(a, b) for a, b in zip(plain, base, strict=True))


def test_a_scheduler_with_history_is_refused_for_caching(tiny, tmp_path, caplog):
    generator = generator_for(tiny, "tiny_sd15")
    pipe = generator.pipeline
    original = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
    try:
        prompts, seeds = ["a photo of a person"] * 2, [0, 1]
        scratch = pixels(generator.all(prompts, seeds))
        with caplog.at_level(logging.WARNING, logger="icm_lab"):
            cached = pixels(generator.all(prompts, seeds, prefix=Prefix(tmp_path, 4)))
    finally:
        pipe.scheduler = original
    assert "DPMSolverMultistepScheduler keeps state between steps" in caplog.text
    assert not list(tmp_path.iterdir())  # nothing cached
    assert all(np.array_equal(a, b) for a, b in zip(scratch, cached, strict=True))


def test_steering_inside_the_prefix_is_refused(tiny, tmp_path):
    generator = generator_for(tiny, "tiny_sd15")
    with pytest.raises(ValueError, match="start before the cached prefix ends"):
        generator.all(["a photo of a person"] * N, [0, 1, 2], steering(generator, 2),
                      prefix=Prefix(tmp_path, 3))


def test_the_prefix_key_holds_everything_the_latents_depend_on(tiny, tmp_path):
    pipe, _, _ = tiny("tiny_sd15")

    def prefix(*overrides: str, seeds=(0, 1), step=3):
        cfg = make_config(f"paths.root={tmp_path}", *overrides)
        return Resources(cfg, tmp_path / "run", pipeline=pipe).prefix(["a", "a"], seeds, step)

    same = prefix().root
    assert prefix().root == same and prefix().step == 3
    others = {prefix("model.guidance=3").root, prefix("model.batch_size=1").root,
              prefix(seeds=(0, 2)).root, prefix(step=4).root, prefix("model.steps=30").root}
    assert len(others) == 5 and same not in others
    assert prefix(step=0) is None  # steered from the first step: nothing to share
