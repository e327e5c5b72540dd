import json
from pathlib import Path

import diffusers
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from icm_lab.app.cli import layers_command
from icm_lab.app.runner import run
from icm_lab.core.errors import ConfigError, UserError
from icm_lab.core.layers import UnknownLayerError
from icm_lab.models.adapters import ADAPTERS, adapter_for, layer_registry, short_name
from icm_lab.models.clip import builds_quick_gelu, check_available, load_clip, tag_quick_gelu
from icm_lab.models.loading import ModelLoadError
from icm_lab.models.tokenizers import clip_tokenizer
from icm_lab.stages.components import build
from tests.conftest import make_config
from tests.real_configs import SDXL_UNET, config_folder

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
    kwargs = cfg.pipeline_kwargs() | {"num_inference_steps": 3}
    generator = [torch.Generator().manual_seed(seed)]
    return pipe(["a photo of a person"], generator=generator, output_type="np", **kwargs).images


@pytest.mark.parametrize("name", TWINS)
def test_twin_round_trips_through_from_pretrained(name, tiny, tmp_path):
    pipe, registry, cfg = tiny(name)
    pipe.save_pretrained(tmp_path / name)
    loaded_cfg = build(make_config(f"model={name}", f"model.pretrained={tmp_path / name}").model,
                       "model")
    loaded = loaded_cfg.load()
    assert type(loaded) is type(pipe)
    assert type(loaded.tokenizer) is type(pipe.tokenizer)
    assert layer_registry(loaded, loaded_cfg.resolution).layers == registry.layers
    assert (_generate(pipe, cfg) == _generate(loaded, loaded_cfg)).all()
    # The registry read from the saved configs alone (meta device, no weights) is the same.
    without_weights, adapter = loaded_cfg.registry_without_weights()
    assert without_weights.layers == registry.layers and adapter is adapter_for(pipe)


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
    # The real SDXL's block layout at tiny widths: the same block types, several transformer
    # layers in each cross-attention block (the real one has 2 and 10).
    for key in ("down_block_types", "up_block_types", "mid_block_type", "addition_embed_type"):
        assert pipe.unet.config[key] == type(pipe.unet.config[key])(SDXL_UNET[key])
    assert min(pipe.unet.config.transformer_layers_per_block[1:]) > 1


def test_unknown_layer_lists_the_valid_names(tiny):
    _, registry, _ = tiny("tiny_sd15")
    with pytest.raises(UnknownLayerError) as error:
        registry["up_blocks.9.attentions.0.transformer_blocks.0.attn1"]
    assert "mid_block.attentions.0.transformer_blocks.0.attn1" in str(error.value)
    with pytest.raises(UnknownLayerError, match="valid kinds"):
        registry.select("attn3")


def test_missing_weights_give_a_clear_error(tmp_path):
    cfg = make_config("model=sd15", f"model.pretrained={tmp_path / 'absent'}", "model.device=cpu")
    spec = build(cfg.model, "model")
    assert spec.registry_without_weights() is None  # nothing to read: the load says why
    with pytest.raises(ModelLoadError, match="model.pretrained="):
        spec.load()


def test_offline_loads_read_the_cache_only(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE (set for the tests): from_pretrained gets local_files_only, so diffusers
    neither tries the Hub nor advises local_files_only=False; its failure is one line."""
    asked = {}

    def from_pretrained(name, **kwargs):
        asked.update(kwargs)
        raise OSError("Error no file named model_index.json found\n(more lines)")

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", from_pretrained)
    cfg = make_config("model=sd15", f"model.pretrained={tmp_path}", "model.device=cpu")
    with pytest.raises(ModelLoadError) as error:
        build(cfg.model, "model").load()
    assert asked["local_files_only"] is True
    assert str(error.value) == (f"could not load model=sd15 from {str(tmp_path)!r}: Error no "
                                "file named model_index.json found")


def test_weights_that_fail_to_load_leave_no_artefact_folder(tmp_path):
    cfg = make_config("model=sd15", f"model.pretrained={tmp_path / 'empty'}", "model.device=cpu",
                      "clip=tiny", f"paths.root={tmp_path}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "outputs").exists()  # no artefact folder, no lock


def test_a_random_clip_is_loaded_without_open_clip_saying_so(caplog):
    load_clip("icm-tiny-clip", None, "cpu")  # random on purpose: no warning for the user
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]


def test_layers_command_prints_the_registry(capsys):
    layers_command(["model=tiny_sd15"])
    out = capsys.readouterr().out
    assert "tiny_sd15: 33 hook points" in out
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn1" in out


def test_full_size_sd15_registry_matches_the_paper_architecture():
    # The real architecture on the meta device: no memory, no weights.
    registry, _ = build(make_config("model=sd15_random").model, "model").registry_without_weights()
    table = registry.table()
    assert table.kind.value_counts().to_dict() == {"attn1": 16, "attn2": 16, "bottleneck": 1}
    assert sorted(set(table.width)) == [320, 640, 1280]
    paper = table.set_index("name").loc[list(make_config("layers=paper_sd15").layers.select)]
    assert list(paper.width) == [1280, 1280, 1280] and list(paper.resolution) == [8, 16, 16]



def _full_size_registry(model: str, root: Path):
    """The registry of `model=NAME` read from the real checkpoint's configs (no weights)."""
    spec = build(make_config(f"model={model}",
                             f"model.pretrained={config_folder(model, root)}").model, "model")
    registry, adapter = spec.registry_without_weights()
    return registry.table(), adapter


def test_full_size_sdxl_registry_matches_the_real_unet(tmp_path):
    table, adapter = _full_size_registry("sdxl", tmp_path)
    assert adapter is ADAPTERS["UNet2DConditionModel"]
    assert table.kind.value_counts().to_dict() == {"attn1": 70, "attn2": 70, "bottleneck": 1}
    attn = table[table.kind == "attn1"]
    # 1024 px / 8 = 128 latent; the plain first block halves it before any attention.
    assert attn.groupby(["width", "resolution"]).size().to_dict() == {(640, 64): 10,
                                                                        (1280, 32): 60}
    # transformer_layers_per_block [1, 2, 10]: 10 transformer layers in the deepest blocks.
    assert "up_blocks.0.attentions.2.transformer_blocks.9.attn1" in set(attn.name)
    assert "mid_block.attentions.0.transformer_blocks.9.attn1" in set(attn.name)


def test_full_size_sana_registry_matches_the_1600m_transformer(tmp_path):
    table, adapter = _full_size_registry("sana", tmp_path)
    assert adapter is ADAPTERS["SanaTransformer2DModel"]
    assert table.kind.value_counts().to_dict() == {"attn1": 20, "attn2": 20}
    # 70 heads x 32 = 2240 wide; 1024 px / 32 (DC-AE) = 32 latent, patch 1.
    assert set(table.width) == {2240} and set(table.resolution) == {32}
    assert list(table[table.kind == "attn1"].name) == [
        f"transformer_blocks.{i}.attn1" for i in range(20)]


def test_experiment_is_a_delta_over_the_defaults():
    cfg = make_config("experiment=paper_sd15_gender")
    assert cfg.model.name == "sd15" and cfg.clip.model == "ViT-L-14-quickgelu"
    assert len(cfg.layers.select) == 3 and cfg.collect.n_images == 600


def test_the_toy_registry_is_read_without_weights(tiny):
    _, registry, spec = tiny("toy")
    without_weights, _ = spec.registry_without_weights()
    assert without_weights.layers == registry.layers


@pytest.mark.parametrize("name", TWINS)
def test_each_family_pairs_self_with_cross_attention(name, tiny):
    pipe, registry, _ = tiny(name)
    adapter = adapter_for(pipe)
    for layer in registry.select("attn1"):
        partner = adapter.cross_attention_of(layer, registry)
        assert partner.kind == "attn2" and partner.name.rsplit(".", 1)[0] == layer.name.rsplit(
            ".", 1)[0]
        assert short_name(layer.name) == adapter.short_name(layer.name)
    for layer in registry.select("bottleneck"):
        with pytest.raises(ConfigError, match="no cross-attention partner"):
            adapter.cross_attention_of(layer, registry)


def test_every_denoiser_class_has_one_adapter():
    assert set(ADAPTERS) == {"UNet2DConditionModel", "SanaTransformer2DModel"}
    assert short_name("up_blocks.1.attentions.0.transformer_blocks.0.attn1") == "up1.a0.t0"
    assert short_name("transformer_blocks.3.attn2") == "t3"


SHIPPED_CLIPS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "clip").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED_CLIPS)
def test_every_shipped_clip_builds_the_activation_its_weights_were_trained_with(name):
    clip = make_config("model=sd15", f"clip={name}").clip
    with torch.device("meta"):  # the architecture only: no weights, no memory
        net = open_clip.create_model(clip.model, pretrained=None, device="meta")
    built = {type(m) for m in net.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}
    if clip.pretrained in open_clip.list_pretrained_tags_by_model(clip.model):
        needs_quick = tag_quick_gelu(clip.model, clip.pretrained)  # open_clip's registry
    else:  # random, or a checkpoint of our own trained with the config as it stands
        needs_quick = builds_quick_gelu(clip.model)
    assert built == {QuickGELU if needs_quick else torch.nn.GELU}


def test_the_paper_clip_is_openai_vit_l14_with_quick_gelu():
    clip = make_config("model=sd15").clip
    assert (clip.model, clip.pretrained) == ("ViT-L-14-quickgelu", "openai")


def test_a_clip_whose_tag_needs_another_activation_is_refused():
    with pytest.raises(ConfigError, match="with QuickGELU.*use clip.model=ViT-L-14-quickgelu"):
        check_available("ViT-L-14", "openai")


def test_a_denoiser_without_an_adapter_is_named_not_mistaken(tmp_path):
    """An SD3-style folder (`transformer: SD3Transformer2DModel`) gets no Sana adapter merely
    because its denoiser is also called `transformer`."""
    folder = config_folder("sana", tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    spec = build(make_config("model=sana", f"model.pretrained={folder}").model, "model")
    with pytest.raises(UserError, match="no model adapter for denoiser SD3Transformer2DModel"):
        spec.registry_without_weights()
