"""One hook engine to read (record) and write (add) layer outputs while a pipeline denoises.

The engine never counts module calls to know the step. A pre-hook on the denoiser reads the
timestep the pipeline passes to it and looks its index up in the scheduler's timesteps, so the
step is right for any step count, with or without classifier-free guidance (CFG), and for
samplers that call the denoiser more than once per step. The same pre-hook reads
`pipe.do_classifier_free_guidance` to know whether the batch is CFG-doubled, `[uncond | cond]`
in diffusers, and so which rows are the conditional half. The argument names and the half
order come from the model's adapter.

    with DenoiserHooks(pipe, registry, record=names, interventions=[AddVector(...)]) as hooks:
        images = pipe(prompts, ...).images
    activations = hooks.recording()   # {layer: float16 array [batch, steps, width]}

One mechanism does everything: `wrap_forward` routes a module's `forward` through a
`ForwardHook` (`before` edits the inputs, `call` runs or skips the forward, `after` reads or
edits the output), the way diffusers' `HookRegistry` does, with public Python only. Recording,
steering (`AddVector`), swapping the text context (`SwapContext`) and the denoiser's step
tracking are hooks; so is the gate on the denoiser that counts the calls that compute
(`hooks.calls`) and, with `skip_before=s`, answers the calls of steps before s with zeros at
once, for a generation that continues from cached latents (`generation.Prefix`) which
overwrite what those steps produced. Every wrapper is undone when the block exits, on
exceptions too, in reverse order, leaving the module as it was.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DiffusionPipeline

from icm_lab.config.schema import Halves
from icm_lab.core.layers import LayerRegistry
from icm_lab.models.adapters import TextContext, adapter_for
from icm_lab.models.loading import like_parameters


class ForwardHook:
    """What one wrapper does around a module's forward. Each step is optional."""

    def before(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return args, kwargs

    def call(self, forward: Callable, args: tuple, kwargs: dict[str, Any]) -> Any:
        return forward(*args, **kwargs)

    def after(self, output: Any) -> Any:
        return output


def wrap_forward(module: torch.nn.Module, hook: ForwardHook) -> Callable[[], None]:
    """Route `module.forward` through `hook` (an instance attribute that shadows the class's
    method, which `nn.Module.__call__` then calls); returns the function that undoes it.
    Wrappers nest, the last one outermost. Undone in reverse order, each restores what it
    shadowed; undone while another wrapper sits on top of it, it becomes a pass-through (the
    one on top still calls it), so no edit outlives its engine in any order of exits."""
    shadowed = vars(module).get("forward")  # another wrapper's, or None: the class's method
    inner = module.forward
    active = [hook]

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not active:
            return inner(*args, **kwargs)
        args, kwargs = hook.before(args, kwargs)
        return hook.after(hook.call(inner, args, kwargs))

    module.forward = functools.update_wrapper(forward, inner)  # keeps the signature
    forward.icm_lab_wrapper = (active, shadowed)  # what unwrapping the one on top skips

    def unwrap() -> None:
        active.clear()
        if vars(module).get("forward") is not forward:
            return  # covered: a pass-through until the wrapper on top goes
        restore = shadowed
        while restore is not None and not getattr(restore, "icm_lab_wrapper", ([True],))[0]:
            restore = restore.icm_lab_wrapper[1]  # a pass-through left by an earlier exit
        if restore is None:
            del module.forward
        else:
            module.forward = restore

    return unwrap


class Intervention:
    """An edit to one layer during a step window: plain, serialisable data (pyvene-style).
    Each kind makes the `ForwardHook` that applies it."""

    layer: str
    start: int
    end: int | None

    def active(self, state: StepState) -> bool:
        end = state.n_steps if self.end is None else self.end
        return self.start <= state.step < end

    def hook(self, state: StepState, net: torch.nn.Module) -> ForwardHook:
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> Intervention:
        """The same intervention for samples `start:stop` only (one batch of a larger plan)."""
        raise NotImplementedError


@dataclass
class AddVector(Intervention):
    """Add a vector to every token of one layer's output.

    `vectors` is `[batch, width]` (the same every step) or `[batch, steps, width]`, one row per
    conditional sample. A sample whose row is all zeros is left untouched, so one batch can hold
    steered and unsteered samples with several targets. The vector is added at steps
    `start <= step < end`, to the conditional half or to both CFG halves. With `renorm`, each
    token is rescaled back to its original norm after the addition.
    """

    layer: str
    vectors: torch.Tensor
    start: int = 0
    end: int | None = None
    halves: Literal["cond", "both"] = "cond"
    renorm: bool = False

    def __post_init__(self) -> None:
        if self.vectors.ndim not in (2, 3):
            raise ValueError(
                f"intervention on {self.layer}: vectors must be [batch, width] or "
                f"[batch, steps, width], got shape {tuple(self.vectors.shape)}"
            )
        if not torch.isfinite(self.vectors).all():
            raise ValueError(f"intervention on {self.layer}: vectors hold NaN or infinity")
        if self.halves not in set(Halves):
            raise ValueError(f"halves must be 'cond' or 'both', got {self.halves!r}")

    def hook(self, state: StepState, net: torch.nn.Module) -> ForwardHook:
        return _AddHook(self, state, net)

    def rows(self, start: int, stop: int) -> AddVector:
        return replace(self, vectors=self.vectors[start:stop])


@dataclass
class SwapContext(Intervention):
    """Replace the text context (`encoder_hidden_states`) that reaches one cross-attention layer,
    on the conditional half only: the explicit-conditioning baseline. `context` is
    `[batch, tokens, dim]`, one row per conditional sample, from the pipeline's own encoder
    (`adapter.text_context`). Where attn2 also takes the text's attention mask (Sana), `mask`
    is the swapped prompt's, in the form the layer receives it, and is swapped with the context:
    the original prompt's mask would hide or expose the wrong tokens of the new one."""

    layer: str
    context: torch.Tensor
    start: int = 0
    end: int | None = None
    mask: torch.Tensor | None = None

    @classmethod
    def of(cls, layer: str, text: TextContext, start: int = 0,
           end: int | None = None) -> SwapContext:
        return cls(layer, text.context, start, end, text.mask)

    def rows(self, start: int, stop: int) -> SwapContext:
        mask = None if self.mask is None else self.mask[start:stop]
        return replace(self, context=self.context[start:stop], mask=mask)

    def hook(self, state: StepState, net: torch.nn.Module) -> ForwardHook:
        return _SwapHook(self, state, net)


class _SwapHook(ForwardHook):
    """Swaps one attn2 layer's text context (and mask) on the conditional rows."""

    def __init__(self, swap: SwapContext, state: StepState, net: torch.nn.Module):
        self.swap, self.state = swap, state
        self.context = like_parameters(swap.context, net)
        self.mask = None if swap.mask is None else like_parameters(swap.mask, net)

    def before(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        swap, state, mask = self.swap, self.state, self.mask
        if not swap.active(state):
            return args, kwargs
        original = kwargs.get("encoder_hidden_states")
        if original is None:
            raise ValueError(f"{swap.layer} gets no encoder_hidden_states: not an attn2 layer")
        swapped = {"encoder_hidden_states": _swap_rows(swap.layer, "context", original,
                                                       self.context, state)}
        original_mask = kwargs.get("attention_mask")
        if (original_mask is None) != (mask is None):
            raise ValueError(f"{swap.layer} gets {'no' if original_mask is None else 'a'} "
                             f"text attention mask but the swap has "
                             f"{'none' if mask is None else 'one'}; build it with "
                             "SwapContext.of(layer, adapter.text_context(...))")
        if mask is not None:
            swapped["attention_mask"] = _swap_rows(swap.layer, "mask", original_mask, mask,
                                                   state)
        return args, {**kwargs, **swapped}


def _swap_rows(layer: str, what: str, original: torch.Tensor, rows: torch.Tensor,
               state: StepState) -> torch.Tensor:
    """`original` with its conditional rows replaced by `rows` (shapes checked)."""
    if rows.shape[0] != state.cond_batch or rows.shape[1:] != original.shape[1:]:
        raise ValueError(
            f"{what} for {layer} has shape {tuple(rows.shape)}; the layer expects "
            f"[{state.cond_batch}, {', '.join(map(str, original.shape[1:]))}]"
        )
    swapped = original.clone()
    swapped[state.cond_rows] = rows
    return swapped


@dataclass
class StepState:
    """What the denoiser's current call tells the hooks."""

    step: int = -1
    n_steps: int = 0
    batch: int = 0
    sample: tuple[torch.Size, torch.dtype, torch.device] | None = None  # the latents' layout
    cfg: bool = False
    cond_last: bool = True  # CFG batch order: [uncond | cond] (diffusers) or [cond | uncond]

    @property
    def cond_rows(self) -> slice:
        if not self.cfg:
            return slice(0, self.batch)
        half = self.batch // 2
        return slice(half, self.batch) if self.cond_last else slice(0, half)

    @property
    def uncond_offset(self) -> int:
        """Row offset from a conditional sample to its unconditional twin."""
        return -self.cond_batch if self.cond_last else self.cond_batch

    @property
    def cond_batch(self) -> int:
        return self.batch // 2 if self.cfg else self.batch


class DenoiserHooks:
    """Context manager that records and/or steers the given layers of a pipeline's denoiser."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        registry: LayerRegistry,
        record: Sequence[str] = (),
        interventions: Iterable[Intervention] = (),
        skip_before: int = 0,
    ):
        self.pipe = pipe
        self.adapter = adapter_for(pipe)
        self.net = self.adapter.denoiser(pipe)
        self.record_layers = [registry[name] for name in record]
        self.interventions = list(interventions)
        for intervention in self.interventions:
            registry[intervention.layer]  # unknown layer: a clear error now, not mid-generation
        self.state = StepState(cond_last=self.adapter.cond_half_last)
        self.skip_before = skip_before
        self.out_channels = getattr(self.net.config, "out_channels", None)
        self.calls = 0  # denoiser calls that computed (skipped prefix steps not counted)
        self._signature = inspect.signature(self.net.forward)
        self._timesteps: tuple[Any, torch.Tensor, torch.Tensor] | None = None
        self._unwrap: list[Callable[[], None]] = []
        self._means: dict[str, torch.Tensor] = {}
        self._steps: dict[int, torch.Tensor] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> DenoiserHooks:
        try:
            self._attach()
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._detach()

    def _attach(self) -> None:
        modules = dict(self.net.named_modules())
        # Interventions first, so a layer that is both steered and recorded records its output
        # after steering (the last wrapper runs outermost).
        for intervention in self.interventions:
            self._wrap(modules[intervention.layer], intervention.hook(self.state, self.net))
        for layer in self.record_layers:
            self._wrap(modules[layer.name], _Record(self, layer.name))
        self._wrap(self.net, _Denoiser(self))

    def _wrap(self, module: torch.nn.Module, hook: ForwardHook) -> None:
        self._unwrap.append(wrap_forward(module, hook))

    def _detach(self) -> None:
        while self._unwrap:  # innermost last; one that is covered turns into a pass-through
            self._unwrap.pop()()

    # -- step tracking ---------------------------------------------------------------------
    def _on_denoiser_call(self, args: tuple, kwargs: dict) -> None:
        bound = self._signature.bind(*args, **kwargs).arguments
        timestep = bound[self.adapter.timestep_arg]
        sample = bound[self.adapter.sample_arg]
        self.state.step, self.state.n_steps = self._step_index(timestep)
        self.state.batch = sample.shape[0]
        self.state.sample = (sample.shape, sample.dtype, sample.device)
        self.state.cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))

    def _step_index(self, timestep: torch.Tensor | float) -> tuple[int, int]:
        """Index of `timestep` among the scheduler's distinct timesteps, nearest match.

        Nearest, not exact, because pipelines may cast the timestep to a low-precision dtype
        (Sana uses bf16). Consecutive repeats (Heun-style samplers) count as one step. The
        value is read from a host copy of the schedule when `timestep` is a view of it (the SD
        pipelines pass `t` itself), so no step waits on the GPU; only a cast copy is read from
        the device.
        """
        timesteps = self.pipe.scheduler.timesteps
        if self._timesteps is None or self._timesteps[0] is not timesteps:  # a new schedule
            host = timesteps.detach().float().cpu()  # once per schedule, before the first step
            self._timesteps = (timesteps, host, torch.unique_consecutive(host))
        _, host, distinct = self._timesteps
        position = view_position(timestep, timesteps)
        t = float(host[position] if position is not None
                  else torch.as_tensor(timestep).reshape(-1)[0])
        return int(torch.argmin((distinct - t).abs())), len(distinct)

    # -- recording -------------------------------------------------------------------------
    def _record(self, name: str, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        cond = out[self.state.cond_rows]
        # Mean over spatial tokens: [B, T, C] attention outputs or [B, C, H, W] feature maps.
        dims = (1,) if cond.ndim == 3 else (2, 3)
        self._means[name] = cond.mean(dim=dims, dtype=torch.float32)

    def _on_denoiser_done(self) -> None:
        missing = [layer.name for layer in self.record_layers if layer.name not in self._means]
        if missing:
            raise RuntimeError(f"layers {missing} were not called at step {self.state.step}")
        # Stays on the device; a Heun-style second call overwrites its step's first.
        self._steps[self.state.step] = torch.cat(
            [self._means[layer.name] for layer in self.record_layers], dim=1
        )
        self._means.clear()

    def recording(self) -> dict[str, np.ndarray]:
        """The recorded means, `{layer: float16 [batch, steps, width]}`, one transfer in all."""
        if not self._steps:
            raise RuntimeError("nothing was recorded: run the pipeline inside the `with` block")
        n_steps = self.state.n_steps
        if sorted(self._steps) != list(range(n_steps)):
            raise RuntimeError(f"recorded steps {sorted(self._steps)} but expected {n_steps}")
        stacked = torch.stack([self._steps[s] for s in range(n_steps)], dim=1)
        stacked = stacked.to("cpu", torch.float16).numpy()
        widths = np.cumsum([0] + [layer.width for layer in self.record_layers])
        return {
            layer.name: stacked[:, :, widths[i] : widths[i + 1]]
            for i, layer in enumerate(self.record_layers)
        }


class _Record(ForwardHook):
    """Keeps one layer's output mean over tokens, for the step the denoiser is at."""

    def __init__(self, engine: DenoiserHooks, name: str):
        self.engine, self.name = engine, name

    def after(self, output: Any) -> Any:
        self.engine._record(self.name, output)
        return output


class _Denoiser(ForwardHook):
    """On the denoiser: reads the step from its inputs, counts the calls that compute, answers
    those of steps before `skip_before` with zeros without computing, and closes the step's
    recording."""

    def __init__(self, engine: DenoiserHooks):
        self.engine = engine

    def before(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        self.engine._on_denoiser_call(args, kwargs)
        return args, kwargs

    def call(self, forward: Callable, args: tuple, kwargs: dict[str, Any]) -> Any:
        engine, state = self.engine, self.engine.state
        if state.step >= engine.skip_before:
            engine.calls += 1
            output = forward(*args, **kwargs)
            if engine.record_layers:
                engine._on_denoiser_done()
            return output
        if kwargs.get("return_dict", True):
            raise RuntimeError("a skipped denoiser call must be made with return_dict=False, "
                               "as diffusers pipelines make it")
        shape, dtype, device = state.sample
        channels = engine.out_channels or shape[1]
        return (torch.zeros((shape[0], channels, *shape[2:]), dtype=dtype, device=device),)


def view_position(view: Any, base: torch.Tensor) -> int | None:
    """Where `view`, a scalar of the 1-d `base` or that scalar expanded, sits in `base`, read
    from the storage's metadata alone (no device read); None if it is no such view."""
    if not (isinstance(view, torch.Tensor) and isinstance(base, torch.Tensor)) or base.ndim != 1:
        return None
    if view.dtype != base.dtype or view.device != base.device or any(view.stride()):
        return None  # a cast copy, or a tensor that is not one repeated element
    if view.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
        return None
    offset, stride = view.storage_offset() - base.storage_offset(), base.stride(0)
    if stride <= 0 or offset % stride or not 0 <= offset // stride < len(base):
        return None
    return offset // stride


class _AddHook(ForwardHook):
    """Applies one AddVector to the layer's output, its vectors moved to the device once."""

    def __init__(self, intervention: AddVector, state: StepState, net: torch.nn.Module):
        self.spec = intervention
        self.state = state
        vectors = intervention.vectors
        nonzero = vectors.reshape(len(vectors), -1).abs().sum(dim=1) > 0  # where they are
        self.vectors = like_parameters(vectors, net)
        self.active = torch.nonzero(nonzero).flatten().to(self.vectors.device)

    def after(self, output: Any) -> Any:
        spec, state = self.spec, self.state
        if not spec.active(state) or len(self.active) == 0:
            return output
        if len(self.vectors) != state.cond_batch:
            raise ValueError(
                f"intervention on {spec.layer} has {len(self.vectors)} vectors but the "
                f"conditional batch has {state.cond_batch} samples"
            )
        out = output[0] if isinstance(output, tuple) else output
        vectors = self.vectors[:, state.step] if self.vectors.ndim == 3 else self.vectors
        delta = vectors[self.active]
        rows = self.active + state.cond_rows.start
        if state.cfg and spec.halves == "both":
            rows = torch.cat([rows + state.uncond_offset, rows])
            delta = torch.cat([delta, delta])
        # Broadcast over tokens: [n, C] -> [n, 1, C] for [B, T, C], [n, C, 1, 1] for [B, C, H, W].
        delta = delta[:, None, :] if out.ndim == 3 else delta[:, :, None, None]
        channel_dim = -1 if out.ndim == 3 else 1
        before = out[rows]
        after = before + delta
        if spec.renorm:
            scale = before.norm(dim=channel_dim, keepdim=True) / after.norm(
                dim=channel_dim, keepdim=True
            ).clamp_min(1e-12)
            after = after * scale
        out[rows] = after  # in place: untouched rows stay bit-for-bit what the layer produced
        return output
