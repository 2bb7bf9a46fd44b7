"""Benchmark: the perturbation analysis's two hot paths, each against its bare equivalent.

    python bench/perturbation.py [--model smollm2] [--group mlp_only] [--reps 5] [--write-docs]
    python bench/perturbation.py --memory-fraction 0.04 --oom-prompts 130 --oom-new-tokens 256   # GPU only

(a) state change: restoring the touched tensors and applying mult_gauss (SubjectManager.activate
    between two perturbed states) against a plain copy of the same bytes into the model (one
    ``copy_`` per tensor; also one fused ``torch._foreach_copy_`` of them all), and the
    noise draw alone (``normal_`` over as many elements, in chunks of ``--noise-chunk``: its floor);
(b) generation: lensbench.generation.generate (left padding, chat template, seeding, OOM back-off,
    token counting) against a bare ``model.generate`` on the same tokenized batch; both greedy and
    checked to produce the same tokens first. lensbench is timed twice: with the run's ``Batching``
    (prompts tokenized once per run, as the analysis does) and with a fresh one per call (prompts
    tokenized by every call);
(c) GPU only, with ``--memory-fraction``: the allocator capped with
    ``torch.cuda.set_per_process_memory_fraction``, ``--oom-prompts`` prompts generated in steps of
    ``--oom-batch`` (as the analysis hands them to generate) with one ``Batching`` for the run
    against a fresh one per step (the back-off forgotten after each step): out-of-memory errors
    caught and seconds.

Times are medians over --reps alternating repetitions, measured in one process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import alternate, cpu_name, median, report  # noqa: E402
SECTION = "## perturbation"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--group", default="mlp_only")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="load the model in this dtype (bfloat16, float16, float32)")
    parser.add_argument("--noise-chunk", type=int, default=None,
                        help="elements of noise drawn at a time (lensbench.perturbations.NOISE_CHUNK, a multiple "
                             "of 16)")
    parser.add_argument("--memory-fraction", type=float, default=None,
                        help="(c): cap CUDA's allocator at this fraction of the GPU and measure the back-off")
    parser.add_argument("--oom-prompts", type=int, default=130)
    parser.add_argument("--oom-batch", type=int, default=64)
    parser.add_argument("--oom-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (1 keeps a shared machine's other processes from stalling "
                             "parallel copies)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    import lensbench.perturbations as perturbations
    from lensbench.generation import Batching, GenerationSettings, build_inputs, generate
    from lensbench.models.loading import ModelSpec
    from lensbench.perturbations import PerturbationGrid
    from lensbench.plugins import active_registries
    from lensbench.state import SubjectManager

    if args.noise_chunk is not None:
        perturbations.NOISE_CHUNK = args.noise_chunk
    device = torch.device(args.device)
    spec = ModelSpec(args.model, dtype=args.dtype) if args.dtype else ModelSpec(args.model)
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
    touched_elements = sum(t.numel() for t in sources.values())
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    chunk = perturbations.NOISE_CHUNK
    noise = torch.empty(min(chunk, touched_elements), dtype=torch.float32, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def draw():
        left = touched_elements
        while left > 0:
            n = min(left, chunk)
            noise[:n].normal_(1.0, 0.1, generator=generator)
            left -= n

    change, copy, fused, drawn = [], [], [], []
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
        t = time.perf_counter()
        with torch.no_grad():
            torch._foreach_copy_([params[n] for n in names], [sources[n] for n in names])
        sync()
        fused.append(time.perf_counter() - t)
        t = time.perf_counter()
        draw()
        sync()
        drawn.append(time.perf_counter() - t)
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

    run = Batching(settings, device)  # the run's, as the analysis holds it: prompts tokenized once
    reference = bare()[:, batch["input_ids"].shape[1]:]
    ours = generate(model, tok, prompts, settings, seed=0, device=device, batching=run, key="bench")
    assert [g.output for g in ours] == [tok.decode(r[: g.tokens], skip_special_tokens=True)
                                        for r, g in zip(reference.tolist(), ours)], "outputs differ"
    sides = {"run": lambda: generate(model, tok, prompts, settings, seed=0, device=device, batching=run, key="bench"),
             "fresh": lambda: generate(model, tok, prompts, settings, seed=0, device=device),
             "bare": bare}
    timings = alternate(sides, args.reps)
    m = median
    rows = {
        "model, group": f"{spec.label()} ({dtype}), {args.group}: {len(names)} tensors, "
                        f"{touched_bytes / 2**20:.1f} MiB touched",
        "state change (restore + mult_gauss), median": f"{m(change) * 1e3:.1f} ms",
        "plain copy of the same bytes, median": f"{m(copy) * 1e3:.1f} ms",
        "ratio state change / copy (goal <= 3)": f"**{m(change) / m(copy):.1f}x**",
        "fused copy of the same bytes (one torch._foreach_copy_), median": f"{m(fused) * 1e3:.1f} ms "
                                                                           f"(state change {m(change) / m(fused):.1f}x it)",
        f"noise draw alone (normal_ in chunks of {chunk}), median": f"{m(drawn) * 1e3:.1f} ms "
                                                                    f"({m(drawn) / m(copy):.1f}x the copy)",
        f"generation, batch {args.batch} x {args.new_tokens} new tokens (greedy): lensbench generate, run's "
        "Batching (prompts tokenized once), median": f"{m(timings['run']):.2f} s",
        "lensbench generate, fresh Batching per call (prompts tokenized by the call), median":
            f"{m(timings['fresh']):.2f} s",
        "bare model.generate on the same batch, median": f"{m(timings['bare']):.2f} s",
        "throughput ratio lensbench / bare, run's Batching (goal >= 0.95)":
            f"**{m(timings['bare']) / m(timings['run']):.3f}**",
        "throughput ratio lensbench / bare, fresh Batching": f"{m(timings['bare']) / m(timings['fresh']):.3f}",
    }
    if args.memory_fraction is not None:
        rows.update(backoff(args, model, tok, device))
    for k, v in rows.items():
        print(f"{k}: {v.replace('**', '')}")
    if args.write_docs:
        write_docs(rows, args, device)


def backoff(args, model, tok, device) -> dict[str, str]:
    """(c): out-of-memory errors and seconds over a capped allocator, one Batching per run or per step."""
    from lensbench.data.modules import PromptDataModule
    from lensbench.generation import Batching, GenerationSettings, generate

    if device.type != "cuda":
        print("(c) needs a CUDA device: skipped")
        return {}
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(args.memory_fraction, device)
    pool = [p.text for p in PromptDataModule(["iq", "dreams"]).prompts]
    prompts = [pool[i % len(pool)] for i in range(args.oom_prompts)]
    settings = GenerationSettings(max_new_tokens=args.oom_new_tokens, do_sample=False, max_batch_size=args.oom_batch,
                                  memory_stop_above=1.0)  # the back-off alone: no stop near the cap
    out = {}
    for label, shared in (("one Batching for the run", True), ("a fresh Batching per step (forgets)", False)):
        run = Batching(settings, device)
        caught = 0
        t = time.perf_counter()
        for i in range(0, len(prompts), args.oom_batch):
            batching = run if shared else Batching(settings, device)
            generate(model, tok, prompts[i : i + args.oom_batch], settings, 0, device, batching=batching, key="s")
            caught += batching.out_of_memory if not shared else 0
        caught += run.out_of_memory if shared else 0
        torch.cuda.synchronize(device)
        out[f"capped at {args.memory_fraction} of the GPU, {args.oom_prompts} prompts x {args.oom_new_tokens} new "
            f"tokens, max_batch_size {args.oom_batch}: {label}"] = (f"{time.perf_counter() - t:.1f} s, {caught} "
                                                                    "out-of-memory errors caught")
        torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    return out


def write_docs(rows, args, device) -> None:
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, no GPU"
    options = (f" --dtype {args.dtype}" if args.dtype else "") + (f" --threads {args.threads}" if args.threads else "")
    path = report(
        SECTION,
        "The perturbation analysis's hot paths against their bare equivalents, in one process "
        f"(`python bench/perturbation.py --model {args.model} --group {args.group} --reps {args.reps} "
        f"--batch {args.batch} --new-tokens {args.new_tokens}{options} --write-docs`).",
        f"{machine}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)", rows,
        "A state change copies the touched tensors back (one fused copy) and multiplies them in place by "
        "`N(1, level)` noise drawn in float32 into one reusable buffer (mult_gauss), several tensors "
        "to a draw and to a fused multiply, so a GPU is not held up by one launch per tensor. "
        "The plain copy is one `copy_` per tensor; the fused copy, one `torch._foreach_copy_`. "
        "On a CPU the draw itself bounds it (torch's CPU generator makes its Gaussians one thread at a "
        "time, several times slower than copying the bytes); on a GPU the draw costs less than a copy "
        "(0.4x on an H200: see \"GPU suite\"). "
        "The lensbench generate call with the run's Batching is what the analysis makes: its prompts "
        "are tokenized once per run and reused in every state.")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
