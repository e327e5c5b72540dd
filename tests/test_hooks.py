import inspect

import numpy as np
import pytest
import torch
from diffusers import HeunDiscreteScheduler

from icm_lab.engine.hooks import (
    AddVector,
    DenoiserHooks,
    ForwardHook,
    SwapContext,
    view_position,
    wrap_forward,
)
from icm_lab.models.adapters import adapter_for, denoiser

PROMPTS = ["a photo of a person", "a portrait of someone", "a face of a tourist"]


def generate(pipe, cfg, steps, guidance, prompts=PROMPTS, output_type="np"):
    kwargs = cfg.pipeline_kwargs() | {"num_inference_steps": steps, "guidance_scale": guidance}
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, generator=generators, output_type=output_type, **kwargs).images


@pytest.mark.parametrize("name", ["tiny_sd15", "tiny_sdxl", "tiny_sana"])
def test_recorded_shapes(name, tiny):
    pipe, registry, cfg = tiny(name)
    with DenoiserHooks(pipe, registry, record=registry.names()) as hooks:
        generate(pipe, cfg, steps=4, guidance=5.0)
    recording = hooks.recording()
    assert list(recording) == registry.names()
    for layer in registry:
        assert recording[layer.name].shape == (len(PROMPTS), 4, layer.width)
        assert recording[layer.name].dtype == np.float16


@pytest.mark.parametrize("name", ["tiny_sd15", "tiny_sana"])
@pytest.mark.parametrize("guidance", [5.0, 1.0])
@pytest.mark.parametrize("steps", [3, 7, 12])
def test_step_index_comes_from_the_timestep(name, guidance, steps, tiny):
    """At every denoiser call the engine's step is the index of the timestep being denoised."""
    pipe, registry, cfg = tiny(name)
    seen = []
    with DenoiserHooks(pipe, registry, record=registry.names("attn1")[:1]) as hooks:
        def spy(module, args, kwargs, output):
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            seen.append((hooks.state.step, float(torch.as_tensor(timestep).reshape(-1)[0]),
                         hooks.state.cfg, hooks.state.batch))

        # A torch forward hook runs after the engine's wrapper, once the step is set.
        handle = hooks.net.register_forward_hook(spy, with_kwargs=True)
        try:
            generate(pipe, cfg, steps=steps, guidance=guidance)
        finally:
            handle.remove()
    timesteps = pipe.scheduler.timesteps.float()
    assert [s for s, *_ in seen] == list(range(steps))
    for step, timestep, cfg_on, batch in seen:
        assert abs(timesteps[step].item() - timestep) < 1e-3 * max(1.0, timestep) + 4
        assert cfg_on == (guidance > 1)
        assert batch == len(PROMPTS) * (2 if guidance > 1 else 1)
    assert hooks.recording()[registry.names("attn1")[0]].shape[1] == steps


def test_multi_evaluation_sampler_counts_steps_not_calls(tiny):
    pipe, registry, cfg = tiny("tiny_sd15")
    original = pipe.scheduler
    pipe.scheduler = HeunDiscreteScheduler.from_config(original.config)
    try:
        with DenoiserHooks(pipe, registry, record=registry.names("attn1")) as hooks:
            generate(pipe, cfg, steps=5, guidance=5.0)
    finally:
        pipe.scheduler = original
    assert hooks.state.n_steps == 5
    assert hooks.recording()[registry.names("attn1")[0]].shape[1] == 5


def test_records_the_conditional_half(tiny):
    pipe, registry, cfg = tiny("tiny_sd15")
    layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    module = dict(pipe.unet.named_modules())[layer]
    outputs = []
    handle = module.register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone()))
    try:
        with DenoiserHooks(pipe, registry, record=[layer]) as hooks:
            generate(pipe, cfg, steps=3, guidance=5.0)
    finally:
        handle.remove()
    recorded = hooks.recording()[layer]
    n = len(PROMPTS)
    for step, full in enumerate(outputs):
        assert full.shape[0] == 2 * n
        cond, uncond = full[n:].mean(dim=1), full[:n].mean(dim=1)
        np.testing.assert_allclose(recorded[:, step], cond.half().numpy(), rtol=1e-3, atol=1e-4)
        assert not np.allclose(recorded[:, step], uncond.half().numpy(), atol=1e-3)


@pytest.mark.parametrize("name", ["mid_block.attentions.0.transformer_blocks.0.attn1", "mid_block"])
def test_add_changes_only_chosen_samples_from_start(name, tiny):
    pipe, registry, cfg = tiny("tiny_sd15")
    layer = registry[name]
    steps, start = 8, 4
    vectors = torch.zeros(len(PROMPTS), layer.width)
    vectors[1] = 3.0  # steer sample 1 only
    intervention = AddVector(layer.name, vectors, start=start)

    with DenoiserHooks(pipe, registry, record=registry.names()) as base_hooks:
        base_images = generate(pipe, cfg, steps, 5.0)
    with DenoiserHooks(pipe, registry, record=registry.names(),
                       interventions=[intervention]) as hooks:
        images = generate(pipe, cfg, steps, 5.0)
    base, steered = base_hooks.recording(), hooks.recording()

    for name in registry.names():
        for sample in (0, 2):
            assert np.array_equal(base[name][sample], steered[name][sample])
        assert np.array_equal(base[name][1, :start], steered[name][1, :start])
    target = steered[layer.name][1, start:].astype(np.float32)
    shift = target - base[layer.name][1, start:].astype(np.float32)
    np.testing.assert_allclose(shift, 3.0, atol=2e-2)  # recorded after the addition
    assert np.array_equal(images[0], base_images[0]) and np.array_equal(images[2], base_images[2])
    assert not np.array_equal(images[1], base_images[1])


def test_per_step_vectors_and_renorm_keep_token_norms(tiny):
    pipe, registry, cfg = tiny("tiny_sd15")
    layer = registry["up_blocks.1.attentions.1.transformer_blocks.0.attn1"]
    module = dict(pipe.unet.named_modules())[layer.name]
    vectors = torch.randn(len(PROMPTS), 3, layer.width, generator=torch.Generator().manual_seed(0))
    before, after = [], []

    def spy(store):
        return lambda m, a, out: store.append(out.detach().clone())

    class Spy(ForwardHook):  # wrapped before the engine's: inside it, so it sees the output first
        def after(self, output):
            before.append(output.detach().clone())
            return output

    unwrap = wrap_forward(module, Spy())
    try:
        intervention = AddVector(layer.name, 10 * vectors, start=1, renorm=True, halves="both")
        with DenoiserHooks(pipe, registry, interventions=[intervention]):
            # a torch forward hook runs after every wrapper: it sees the steered output
            last = module.register_forward_hook(spy(after))
            generate(pipe, cfg, steps=3, guidance=5.0)
            last.remove()
    finally:
        unwrap()
    assert "forward" not in vars(module)
    assert torch.equal(before[0], after[0])  # step 0 is before the window
    for step in (1, 2):
        assert not torch.allclose(before[step], after[step])
        torch.testing.assert_close(after[step].norm(dim=-1), before[step].norm(dim=-1))
        # Both CFG halves got the same per-step vector before renormalisation.
        n = len(PROMPTS)
        direction = (after[step] - before[step])[:n].mean(dim=1)
        assert torch.nn.functional.cosine_similarity(direction, vectors[:, step]).min() > 0.5


def test_hooks_are_removed_on_exceptions(tiny):
    pipe, registry, cfg = tiny("tiny_sd15")
    modules = [pipe.unet, *pipe.unet.modules()]
    bad = AddVector(registry.names("attn1")[0], torch.ones(5, registry.select("attn1")[0].width))
    with pytest.raises(ValueError, match="conditional batch has 3"):
        with DenoiserHooks(pipe, registry, record=registry.names(), interventions=[bad]):
            generate(pipe, cfg, steps=2, guidance=5.0)
    assert all("forward" not in vars(m) for m in modules)  # every wrapper undone


def test_nested_engines_count_their_own_calls_and_leave_no_trace(tiny):
    pipe, registry, cfg = tiny("tiny_sd15")
    with DenoiserHooks(pipe, registry) as outer:
        with DenoiserHooks(pipe, registry, record=registry.names("attn1")[:1]) as inner:
            generate(pipe, cfg, steps=3, guidance=5.0)
        generate(pipe, cfg, steps=2, guidance=5.0)
    assert (outer.calls, inner.calls) == (5, 3)
    assert all("forward" not in vars(m) for m in pipe.unet.modules())


def test_intervention_rejects_bad_vectors(tiny):
    with pytest.raises(ValueError, match="NaN"):
        AddVector("mid_block", torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        AddVector("mid_block", torch.ones(4))


@pytest.mark.parametrize("name", ["tiny_sd15", "tiny_sdxl", "tiny_sana"])
def test_swap_context_reaches_one_layer_on_the_conditional_half(name, tiny):
    pipe, registry, cfg = tiny(name)
    call_kwargs = cfg.pipeline_kwargs()
    context = adapter_for(pipe).text_context
    target = registry.names("attn2")[-1]
    seen = []
    spy = _spy_attn2(pipe, target, seen)
    try:
        # The pipeline's own context, swapped in unchanged, must change nothing at all.
        same = context(pipe, PROMPTS, call_kwargs)
        with DenoiserHooks(pipe, registry, interventions=[SwapContext.of(target, same)]):
            generate(pipe, cfg, steps=2, guidance=5.0)
        assert len(seen) == 2
        n = len(PROMPTS)
        torch.testing.assert_close(seen[0][0][n:], same.context, rtol=1e-5, atol=1e-5)

        explicit = context(pipe, ["a photo of a woman"] * n, call_kwargs)
        with DenoiserHooks(pipe, registry, record=[target],
                           interventions=[SwapContext.of(target, explicit)]) as hooks:
            generate(pipe, cfg, steps=2, guidance=5.0)
    finally:
        spy.remove()
    # The spy ran before the swap (registered first), so check what the layer then recorded.
    with DenoiserHooks(pipe, registry, record=[target]) as base:
        generate(pipe, cfg, steps=2, guidance=5.0)
    assert not np.array_equal(hooks.recording()[target], base.recording()[target])
    short = SwapContext(target, explicit.context[:1], mask=_rows(explicit.mask, 1))
    with pytest.raises(ValueError, match="expects"):
        with DenoiserHooks(pipe, registry, interventions=[short]):
            generate(pipe, cfg, steps=1, guidance=5.0)


def _spy_attn2(pipe, layer, seen):
    """Record (context, mask) as `layer` receives them, before any swap hook runs."""
    module = dict(denoiser(pipe).named_modules())[layer]

    def spy(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        seen.append((kwargs["encoder_hidden_states"].clone(),
                     None if mask is None else mask.clone()))

    return module.register_forward_pre_hook(spy, with_kwargs=True)


def _rows(tensor, n):
    return None if tensor is None else tensor[:n]


def test_sana_swap_context_and_mask_are_what_the_pipeline_itself_passes(tiny):
    """Sana's explicit swap must encode the prompt the way `SanaPipeline.__call__` does (its
    complex human instruction prefixed: the twin's config sets a non-empty one) and carry that
    prompt's attention mask: both equal what attn2 receives when the pipeline is called with
    the prompt itself."""
    pipe, registry, cfg = tiny("tiny_sana")
    call_kwargs = cfg.pipeline_kwargs()
    assert call_kwargs["complex_human_instruction"], "the twin must exercise the instruction"
    prompts = ["a woman", "a photo of an elderly man with a hat"]  # masks of unequal length
    target = registry.names("attn2")[0]
    seen = []
    spy = _spy_attn2(pipe, target, seen)
    try:
        generate(pipe, cfg, steps=1, guidance=5.0, prompts=prompts)
    finally:
        spy.remove()
    text = adapter_for(pipe).text_context(pipe, prompts, call_kwargs)
    context, mask = seen[0]
    n = len(prompts)
    torch.testing.assert_close(text.context, context[n:], rtol=1e-5, atol=1e-5)
    assert text.mask is not None and torch.equal(text.mask, mask[n:])
    assert not torch.equal(text.mask[0], text.mask[1])  # the mask is the prompt's own
    # Without the instruction the encoding differs: the test would catch a swap that drops it.
    plain = adapter_for(pipe).text_context(
        pipe, prompts, call_kwargs | {"complex_human_instruction": None})
    assert not torch.allclose(plain.context, text.context, atol=1e-3)


def test_sana_swap_everywhere_is_the_explicit_prompt(tiny):
    """Swapping context and mask at every attn2 layer is the explicit prompt (Sana's text
    reaches the transformer only there); a mask left unswapped is refused."""
    pipe, registry, cfg = tiny("tiny_sana")
    explicit = ["a photo of a woman with long hair"] * len(PROMPTS)
    text = adapter_for(pipe).text_context(pipe, explicit, cfg.pipeline_kwargs())
    swaps = [SwapContext.of(name, text) for name in registry.names("attn2")]
    with DenoiserHooks(pipe, registry, interventions=swaps):
        swapped = generate(pipe, cfg, steps=2, guidance=5.0)
    np.testing.assert_allclose(swapped, generate(pipe, cfg, steps=2, guidance=5.0,
                                                 prompts=explicit), atol=1e-4)
    with pytest.raises(ValueError, match="attention mask"):
        with DenoiserHooks(pipe, registry,
                           interventions=[SwapContext(swaps[0].layer, text.context)]):
            generate(pipe, cfg, steps=1, guidance=5.0)


def test_sana_swap_uses_the_pipelines_default_instruction(tiny):
    """A call that sets no instruction gets `SanaPipeline.__call__`'s default (the real
    model's config sets none), and so must the swap."""
    pipe, _, cfg = tiny("tiny_sana")
    adapter = adapter_for(pipe)
    options = adapter.call_encode_options(pipe, {"max_sequence_length": 32})
    default = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"]
    assert options["complex_human_instruction"] == default.default
    assert len(default.default) > 3 and options["max_sequence_length"] == 32
    assert options["clean_caption"] is False


def test_a_timestep_that_views_the_schedule_is_located_without_reading_it():
    """The SD pipelines pass `t`, an element of `scheduler.timesteps`: its position comes from
    the storage's metadata (no device read, no host sync on a GPU); a cast copy (Sana's bf16)
    is not a view and is read instead."""
    schedule = torch.tensor([981, 961, 941, 921])
    for i, t in enumerate(schedule):
        assert view_position(t, schedule) == i
    assert view_position(schedule[2].expand(4), schedule) == 2  # t.expand(batch)
    assert view_position(schedule[2].clone(), schedule) is None
    assert view_position(schedule[2].to(torch.bfloat16), schedule) is None
    assert view_position(schedule[1:3], schedule) is None
    assert view_position(941, schedule) is None


def test_engines_that_exit_out_of_order_leave_no_edit_behind(tiny):
    """A steering engine that exits while another still wraps the same modules stops steering
    at once; when both are gone the pipeline generates exactly as before."""
    pipe, registry, cfg = tiny("tiny_sd15")
    layer = registry.select("attn1")[0]
    push = AddVector(layer.name, 50 * torch.ones(len(PROMPTS), layer.width))
    plain = generate(pipe, cfg, steps=2, guidance=5.0)
    steering, recording = (DenoiserHooks(pipe, registry, interventions=[push]),
                           DenoiserHooks(pipe, registry, record=[layer.name]))
    steering.__enter__()
    recording.__enter__()
    steering.__exit__(None, None, None)  # out of order: the recorder still wraps the layer
    assert np.array_equal(generate(pipe, cfg, steps=2, guidance=5.0), plain)
    recording.__exit__(None, None, None)
    assert np.array_equal(generate(pipe, cfg, steps=2, guidance=5.0), plain)
    assert all(vars(m).get("forward") is None for m in pipe.unet.modules())
