"""A real CUDA out-of-memory error, under a per-process memory cap, backs the generation batch size
off once in a run (not once per batch), and the run completes with every record."""

from __future__ import annotations

import gc
import json
import re
from dataclasses import replace

import torch
from .gpu_models import GPU, save_llama, suite_tokenizer

from lensbench.models.loading import ModelSpec, load_model

pytestmark = GPU

PROMPTS = 24  # three steps of max_batch_size 8: a back-off per batch would show three times
WORDS = 1400  # prompt length in tokens, about: eager attention makes each prompt cost memory


def _prompts() -> list[str]:
    tail = ("paris", "moon", "water", "train", "cell", "sea", "sun", "moss")
    return [" ".join(["the"] * WORDS) + f" {tail[i % len(tail)]} {tail[(i // len(tail)) % len(tail)]}"
            for i in range(PROMPTS)]


def test_a_real_out_of_memory_backs_off_once_per_run(tmp_path, cuda, monkeypatch):
    from lensbench.cli import main
    from lensbench.generation import GenerationSettings, generate
    from lensbench.results import ResultStore

    folder = save_llama(tmp_path / "wide", layers=2, hidden=512, heads=8, kv_heads=8, intermediate=1024)
    spec = ModelSpec(str(folder), attn_implementation="eager")
    prompts = _prompts()
    assert len(suite_tokenizer()(prompts[0])["input_ids"]) >= WORDS

    # What one more prompt costs at the peak of a generate call, measured on this GPU.
    loaded = load_model(spec, cuda, padding_side="left")
    settings = GenerationSettings(max_new_tokens=2, do_sample=False, max_batch_size=1, max_input_length=2048)

    def peak(n: int) -> int:
        torch.cuda.synchronize(cuda)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(cuda)
        generate(loaded.model, loaded.tokenizer, prompts[:n], replace(settings, max_batch_size=n), 0, cuda)
        return torch.cuda.max_memory_allocated(cuda)

    one, two = peak(1), peak(2)
    per_prompt, base = two - one, one - (two - one)
    assert per_prompt > 32 << 20, f"a prompt costs only {per_prompt / 2**20:.0f} MiB: too little to calibrate"
    del loaded
    gc.collect()
    torch.cuda.empty_cache()

    # A cap between 4 prompts (fits) and 8 (does not): max_batch_size 8 fails, 4 works.
    cap = base + 6 * per_prompt
    total = torch.cuda.get_device_properties(cuda).total_memory
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "run.yaml").write_text(
        "model:\n  class_path: perturbation\n  init_args:\n"
        f"    model: {{source: {folder}, attn_implementation: eager}}\n"
        "    perturbation: {method: mult_gauss, param_group: attn_only, levels: [0.1], n_rep: 1, "
        "include_baseline: false, seed: 1}\n"
        "    generation: {max_new_tokens: 2, do_sample: false, max_batch_size: 8, max_input_length: 2048}\n"
        f"    output_dir: {tmp_path / 'out'}\n    experiment: oom\n"
        "data:\n  class_path: lensbench.data.modules.PromptDataModule\n"
        f"  init_args:\n    prompts: [{tmp_path / 'prompts.txt'}]\n"
        "trainer:\n  accelerator: gpu\n  devices: 1\n")
    monkeypatch.setattr("sys.argv", ["lensbench"])
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total, cuda)
    try:
        code = main(["predict", "--config", str(tmp_path / "run.yaml")])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, cuda)
    run_dir = tmp_path / "out" / "oom"
    log = "\n".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.log")))
    assert code == 0, log[-3000:]
    backoffs = re.findall(r".*batch size \d+ -> \d+ after CUDA out-of-memory.*", log)
    assert len(backoffs) == 1, f"{len(backoffs)} back-offs (cap {cap / 2**20:.0f} MiB, a prompt "\
                               f"{per_prompt / 2**20:.0f} MiB): {backoffs}"
    assert "8 -> 4" in backoffs[0]
    records = list(ResultStore(run_dir).records())
    assert len(records) == PROMPTS
    assert {r["batch_size_effective"] for r in records} == {4}
    assert all(r["output"] is not None for r in records)
    assert json.loads((run_dir / "run.json").read_text())["float32_matmul_precision"] == "high"
