"""Options -> typed policy. Every bad option is a ValueError that names it and its allowed values. Beside the Config, the
CallerFacts that tokensparse.compile() hands the backend."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from tokensparse.policies import POLICIES, KVPolicy, LanguagePolicy, Policy

# Options the backend itself takes, beside the policy's own.
BACKEND_OPTIONS = ("policy", "inductor", "regional", "cudagraphs")


@dataclasses.dataclass(frozen=True)
class Config:
    """What tokensparse does to a model: a vision-encoder policy (ToMe, TopK), a language-model policy
    (FastV, PyramidDrop, DivPrune, VisualExit, VisionZip, DTD) that prunes vision tokens of a VLM's sequence, and a
    KV-cache policy (SnapKV, StreamingLLM, H2O) that shrinks a decoder's cache for decoding."""

    vision: Optional[Policy] = None
    llm: Optional[LanguagePolicy] = None
    kv: Optional[KVPolicy] = None
    inductor: bool = True
    regional: bool = True      # compile each distinct block once and reuse it (tokensparse.regions)
    # GPU serving: static token counts, one whole graph, replayed as a CUDA graph (Inductor's
    # triton.cudagraphs) without the per-kernel launch cost that a pruned ViT's small ops add.
    cudagraphs: bool = False

    def __post_init__(self):
        if self.vision is not None and (not isinstance(self.vision, Policy) or self.vision.stage != "vision"):
            raise ValueError(f"vision={self.vision!r} must be a vision-encoder policy such as tokensparse.ToMe(r=8)")
        if self.llm is not None and (not isinstance(self.llm, Policy) or self.llm.stage != "llm"):
            raise ValueError(f"llm={self.llm!r} must be a language-model policy such as "
                             f"tokensparse.FastV(layer=2, keep=0.25)")
        if self.kv is not None and (not isinstance(self.kv, Policy) or self.kv.stage != "kv"):
            raise ValueError(f"kv={self.kv!r} must be a KV-cache policy such as tokensparse.SnapKV(budget=512)")
        if self.vision is not None and self.llm is not None and self.llm.stage_in_tower:
            raise ValueError(f"vision={self.vision.name} and llm={self.llm.name} together are not supported: both "
                             f"choose the tokens at the vision tower's output; use one of them")
        _check_flags(self, ("inductor", "regional", "cudagraphs"))
        if self.cudagraphs and not self.inductor:
            raise ValueError("cudagraphs=True needs inductor=True: the CUDA graphs are Inductor's")
        if self.cudagraphs and (self.llm is not None or self.kv is not None):
            raise ValueError("cudagraphs=True is for vision-encoder policies (vision=) only so far: a language "
                             "model's token counts follow the prompt and its cache, which CUDA graphs would "
                             "re-record at every new length; it has not been built or measured for generate()")

    @property
    def policy(self) -> Optional[Policy]:
        """The token policy this config applies first (vision=, else llm=); in a VLM's graph llm= follows vision=,
        and kv= is applied after both."""
        return self.vision if self.vision is not None else self.llm


def sequence_policy(config: Config) -> Optional[Policy]:
    """The policy that shortens the language model's sequence: llm=, else vision= (in a VLM's tower), or None."""
    return config.llm if config.llm is not None else config.vision


def sequence_option(config: Config) -> str:
    """How the user named that policy: "llm=fastv", "vision=tome"."""
    return f"{'llm' if config.llm is not None else 'vision'}={sequence_policy(config).name}"


@dataclasses.dataclass(frozen=True)
class CallerFacts:
    """What the caller of the backend does around the graphs it compiles, beside the Config: tokensparse.compile()'s
    forward and generate() (runtime/generate.py), or the ONNX generation export. The passes read them from
    PassContext; the backend alone (torch.compile(backend="tokensparse")) gets none of them."""

    # The decoder layers cut each decode step's padding mask to their own (pruned) cache length: then prompts with
    # left padding can be pruned in graphs that return the cache.
    decode_masks_follow_cache: bool = False
    # The forward refuses padded batches with a StaticCache and hands each decode step of a padded batch a padding
    # mask over every position seen, which each decoder layer cuts to the last columns, as long as its evicted
    # cache: then the KV policies may evict from a StaticCache (whose decode masks they rebuild over the buffer's
    # slots) and from padded batches.
    kv_masks_follow_cache: bool = False
    # For a KV policy on a model with sliding-window layers, whose generate() caches record the positions of their
    # entries: each decoder layer's sliding window (0 for a full-attention layer), by which the layer's attention
    # sees the entries it holds (fx/passes/sliding_positions.py).
    sliding_windows: tuple = ()
    # The backend compiles a vision encoder's blocks one region each (Config.regional): the first block's token
    # count is then symbolic, as after a cut, so that it can share the later blocks' compile.
    compiled_by_regions: bool = False
    # The forward checks, before the prefill runs, that every sample holds as many image tokens: a language-model
    # policy's kept length is then known from the image features' shape, with no read to the host in the graph.
    image_counts_checked: bool = False

    def __post_init__(self):
        _check_flags(self, ("decode_masks_follow_cache", "kv_masks_follow_cache", "compiled_by_regions",
                            "image_counts_checked"))
        if not (isinstance(self.sliding_windows, tuple) and all(isinstance(window, int) and window >= 0
                                                               for window in self.sliding_windows)):
            raise ValueError(f"sliding_windows={self.sliding_windows!r} must be a tuple of each decoder layer's "
                             f"window (0 for a full-attention layer)")


def _check_flags(settings, names: tuple) -> None:
    for name in names:
        if not isinstance(getattr(settings, name), bool):
            raise ValueError(f"{name}={getattr(settings, name)!r} must be True or False")


# What a caller that does nothing around the graphs hands the backend (torch.compile(backend="tokensparse") alone).
NO_FACTS = CallerFacts()


def config_from_options(options: Optional[Mapping[str, Any]]) -> Config:
    """Turn torch.compile(..., options={...}) into a Config, naming any option that is wrong."""
    if isinstance(options, Config):
        return options
    if isinstance(options, Policy):
        slot = options.stage
        raise ValueError(f"got the policy {options!r} where a Config or an options dict goes: pass "
                         f"tokensparse.Config({slot}={options!r})")
    if isinstance(options, str):
        raise ValueError(f"got the string {options!r} where a Config or an options dict goes: pass "
                         f"{{'policy': {options!r}, ...}} or a tokensparse.Config")
    if not isinstance(options, Mapping) and options is not None:
        raise ValueError(f"got {type(options).__name__} {options!r} where a tokensparse.Config or an options dict "
                         f"goes")
    options = dict(options or {})
    if "policy" not in options:
        raise ValueError(f"options has no 'policy': choose one of {sorted(POLICIES)}")
    name = options.pop("policy")
    if isinstance(name, Policy):
        policy = name
    elif name not in POLICIES:
        raise ValueError(f"policy={name!r} is unknown: choose one of {sorted(POLICIES)}")
    else:
        cls = POLICIES[name]
        fields = {f.name for f in dataclasses.fields(cls)}
        policy_options = {key: options.pop(key) for key in list(options) if key in fields}
        policy = cls(**policy_options)
    backend_options = {key: options.pop(key) for key in list(options) if key in BACKEND_OPTIONS}
    if options:
        allowed = sorted({f.name for f in dataclasses.fields(type(policy))} | set(BACKEND_OPTIONS))
        raise ValueError(f"option {sorted(options)[0]!r} is unknown for policy {policy.name!r}: "
                         f"allowed options are {allowed}")
    return Config(**{policy.stage: policy}, **backend_options)
