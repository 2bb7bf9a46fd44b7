"""Benchmark: the perturbation analysis's two hot paths, each against its bare equivalent.

    python bench/perturbation.py [--model smollm2] [--group mlp_only] [--reps 5] [--write-docs]

(a) state change: restoring the touched tensors and applying mult_gauss (SubjectManager.activate
    between two perturbed states) against a plain copy of the same bytes into the model;
(b) generation: lensbench.generation.generate (left padding, chat template, seeding, OOM back-off,
    token counting) against a bare ``model.generate`` on the same tokenized batch; both greedy and
    checked to produce the same tokens first.

Times are medians over --reps alternating repetitions, measured in one process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cpu_name, report  # noqa: E402
SECTION = "## perturbation"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--group", default="mlp_only")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    from lensbench.generation import GenerationSettings, build_inputs, generate
    from lensbench.models.loading import ModelSpec
    from lensbench.perturbations import PerturbationGrid
    from lensbench.plugins import active_registries
    from lensbench.state import SubjectManager

    device = torch.device(args.device)
    spec = ModelSpec(args.model)
    registry = active_registries().perturbations
    grid = PerturbationGrid(method="mult_gauss", param_group=args.group, levels=[0.1, 0.2], include_baseline=False)
    states = grid.states(spec.label(), registry, "perturbation")
    manager = SubjectManager({spec.label(): spec}, device, registry, padding_side="left")
    manager.activate(states[0])
    loaded = manager.loaded
    params = dict(loaded.model.named_parameters())
    names = manager.touched_names()
    sources = {n: params[n].detach().clone() for n in names}
    touched_bytes = sum(t.numel() * t.element_size() for t in sources.values())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    change, copy = [], []
    for rep in range(args.reps):
        t = time.perf_counter()
        manager.activate(states[(rep + 1) % 2])
        sync()
        change.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad():
            for n in names:
                params[n].copy_(sources[n])
        sync()
        copy.append(time.perf_counter() - t)
    manager.activate(states[0])

    # (b) generation, greedy, same inputs
    from lensbench.data.modules import PromptDataModule

    prompts = [p.text for p in PromptDataModule(["iq"], max_prompts=args.batch).prompts]
    settings = GenerationSettings(max_new_tokens=args.new_tokens, do_sample=False, max_batch_size=args.batch)
    tok, model = loaded.tokenizer, loaded.model
    texts, chat = build_inputs(tok, prompts, None)
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)

    def bare():
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
        sync()
        return out

    reference = bare()[:, batch["input_ids"].shape[1]:]
    ours = generate(model, tok, prompts, settings, seed=0, device=device)
    assert [g.output for g in ours] == [tok.decode(r[: g.tokens], skip_special_tokens=True)
                                        for r, g in zip(reference.tolist(), ours)], "outputs differ"
    lens_t, bare_t = [], []
    for rep in range(args.reps):
        order = (0, 1) if rep % 2 == 0 else (1, 0)
        for side in order:
            t = time.perf_counter()
            if side == 0:
                generate(model, tok, prompts, settings, seed=0, device=device)
                lens_t.append(time.perf_counter() - t)
            else:
                bare()
                bare_t.append(time.perf_counter() - t)
    m = statistics.median
    rows = {
        "model, group": f"{spec.label()}, {args.group}: {len(names)} tensors, {touched_bytes / 2**20:.1f} MiB touched",
        "state change (restore + mult_gauss), median": f"{m(change) * 1e3:.1f} ms",
        "plain copy of the same bytes, median": f"{m(copy) * 1e3:.1f} ms",
        "ratio state change / copy": f"**{m(change) / m(copy):.1f}x**",
        f"generation, batch {args.batch} x {args.new_tokens} new tokens (greedy): lensbench generate, median": f"{m(lens_t):.2f} s",
        "bare model.generate on the same batch, median": f"{m(bare_t):.2f} s",
        "throughput ratio lensbench / bare (goal >= 0.95)": f"**{m(bare_t) / m(lens_t):.3f}**",
    }
    for k, v in rows.items():
        print(f"{k}: {v.replace('**', '')}")
    if args.write_docs:
        write_docs(rows, args, device)


def write_docs(rows, args, device) -> None:
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, no GPU"
    path = report(
        SECTION,
        "The perturbation analysis's hot paths against their bare equivalents, in one process "
        f"(`python bench/perturbation.py --model {args.model} --group {args.group} --reps {args.reps} "
        f"--batch {args.batch} --new-tokens {args.new_tokens} --write-docs`).",
        f"{machine}, torch {torch.__version__}", rows,
        "A state change restores the touched tensors (one copy) and draws a Gaussian for every touched weight "
        "(mult_gauss); drawing the noise, not the restore, is most of its cost, so the ratio to a bare copy is "
        "the price of the noise itself.")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
