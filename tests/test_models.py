import open_clip
import pytest
import torch

from icm_lab.__main__ import layers_command
from icm_lab.models.layers import UnknownLayerError, layer_registry
from icm_lab.models.loading import ModelLoadError, load_pipeline, pipeline_call_kwargs
from icm_lab.models.tokenizers import clip_tokenizer
from tests.conftest import make_config

TWINS = ["tiny_sd15", "tiny_sdxl", "tiny_sana"]


@pytest.mark.parametrize("text", [
    "a photo of a person", "A FACE of a firefighter, smiling!", "naïve café — 123 émigré",
    "don't   stop it's", "",
])
def test_clip_tokenizer_matches_open_clip(text):
    ours = clip_tokenizer()(text).input_ids
    reference = open_clip.get_tokenizer("ViT-L-14")([text])[0].tolist()[: len(ours)]
    assert ours == reference
    assert ours[0] == 49406 and ours[-1] == 49407


def _generate(pipe, cfg, seed=3):
    kwargs = pipeline_call_kwargs(cfg) | {"num_inference_steps": 3}
    generator = [torch.Generator().manual_seed(seed)]
    return pipe(["a photo of a person"], generator=generator, output_type="np", **kwargs).images


@pytest.mark.parametrize("name", TWINS)
def test_twin_round_trips_through_from_pretrained(name, tiny, tmp_path):
    pipe, registry, cfg = tiny(name)
    pipe.save_pretrained(tmp_path / name)
    loaded_cfg = make_config(f"model={name}", f"model.pretrained={tmp_path / name}").model
    loaded = load_pipeline(loaded_cfg)
    assert type(loaded) is type(pipe)
    assert type(loaded.tokenizer) is type(pipe.tokenizer)
    assert layer_registry(loaded, loaded_cfg.resolution).layers == registry.layers
    assert (_generate(pipe, cfg) == _generate(loaded, loaded_cfg)).all()


def test_sd15_twin_has_sd15_hook_points(tiny):
    _, registry, _ = tiny("tiny_sd15")
    kinds = registry.table().kind.value_counts().to_dict()
    assert kinds == {"attn1": 16, "attn2": 16, "bottleneck": 1}
    for name in make_config("layers=paper_sd15").layers.select:
        assert registry[name].kind == "attn1"
    assert registry["mid_block"].resolution == 1  # 64 px / 8 (VAE) / 2 / 2 / 2


def test_registry_widths_are_read_from_modules(tiny):
    for name in TWINS:
        pipe, registry, _ = tiny(name)
        net = getattr(pipe, "unet", None) or pipe.transformer
        modules = dict(net.named_modules())
        for layer in registry.select("attn1") + registry.select("attn2"):
            assert modules[layer.name].to_out[0].out_features == layer.width


def test_sdxl_twin_has_two_text_encoders(tiny):
    pipe, registry, _ = tiny("tiny_sdxl")
    assert pipe.text_encoder is not None and pipe.text_encoder_2 is not None
    assert any(".transformer_blocks.1." in name for name in registry.names("attn1"))


def test_unknown_layer_lists_the_valid_names(tiny):
    _, registry, _ = tiny("tiny_sd15")
    with pytest.raises(UnknownLayerError) as error:
        registry["up_blocks.9.attentions.0.transformer_blocks.0.attn1"]
    assert "mid_block.attentions.0.transformer_blocks.0.attn1" in str(error.value)
    with pytest.raises(UnknownLayerError, match="valid kinds"):
        registry.select("attn3")


def test_missing_weights_give_a_clear_error(tmp_path):
    cfg = make_config("model=sd15", f"model.pretrained={tmp_path / 'absent'}", "model.device=cpu")
    with pytest.raises(ModelLoadError, match="model.pretrained="):
        load_pipeline(cfg.model)


def test_layers_command_prints_the_registry(capsys):
    layers_command(["model=tiny_sd15"])
    out = capsys.readouterr().out
    assert "tiny_sd15: 33 hook points" in out
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn1" in out


def test_full_size_sd15_registry_matches_the_paper_architecture():
    with torch.device("meta"):  # the real architecture, no memory, no weights
        from icm_lab.models.tiny import sd15_random

        pipe = sd15_random()
    table = layer_registry(pipe, 512).table()
    assert table.kind.value_counts().to_dict() == {"attn1": 16, "attn2": 16, "bottleneck": 1}
    assert sorted(set(table.width)) == [320, 640, 1280]
    paper = table.set_index("name").loc[list(make_config("layers=paper_sd15").layers.select)]
    assert list(paper.width) == [1280, 1280, 1280] and list(paper.resolution) == [8, 16, 16]


def test_experiment_is_a_delta_over_the_defaults():
    cfg = make_config("experiment=paper_sd15_gender")
    assert cfg.model.name == "sd15" and cfg.clip.model == "ViT-L-14"
    assert len(cfg.layers.select) == 3 and cfg.collect.n_images == 1000
