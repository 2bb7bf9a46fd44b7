"""Benchmark: loop_identity's replay (every loop count from one forward) against looped forwards.

    python bench/loop_identity.py [--layers 16 --hidden 256 --loops 0 1 2 4 8 16 --reps 5] [--write-docs]

A random Llama built from a config (no download), one batch of random token ids with some right
padding, blocks ``start..end`` looped. Three ways to get the per-token metrics of every loop count,
timed side by side in one process, the order rotating from one repetition to the next:

- replay (lensbench): ``BlockReplay``: one captured forward, one pass of the block range per extra
  loop, one tail pass (remaining blocks, final norm, LM head) per loop count, as the analysis runs;
- deepest: ONE forward of a model whose block list repeats the range ``max(loops)`` times, with
  ``output_hidden_states`` (every h_out(k) is one of its hidden states): the metrics of every k,
  but the perplexity of the deepest k only;
- per-k: one forward of a looped model per loop count, as the seed's scripts do (metrics and
  perplexity of every k).

The replay is also timed without its tail passes ("replay, metrics only"), the work "deepest"
does. Before any time is reported, h_out(k) of every k must agree between the three (relative
1e-5) and the per-k perplexities between replay and per-k. Figures: medians over ``--reps``.
With ``--write-docs`` the section "## loop_identity" of docs/benchmarks.md is rewritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import alternate, cpu_name, median, report, verdict  # noqa: E402

SECTION = "## loop_identity"


GOAL = 1.2  # the goal: replay / the single deepest forward

def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=max(256, args.tokens))
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    ids = torch.randint(3, args.vocab, (args.batch, args.tokens))
    mask = torch.ones_like(ids)
    for row in range(1, args.batch, 2):  # every other row right-padded by a quarter
        mask[row, -args.tokens // 4:] = 0
        ids[row, -args.tokens // 4:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def looped(model, start: int, end: int, k: int):
    """A model whose block list repeats start..end k times, holding copies of ``model``'s weights
    (a model of its own: transformers' output capture hooks each block once per model)."""
    import copy

    from transformers import LlamaForCausalLM

    n = model.config.num_hidden_layers
    order = [*range(start), *[i for _ in range(k) for i in range(start, end + 1)], *range(end + 1, n)]
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(order)
    twin = LlamaForCausalLM(config).eval().requires_grad_(False)
    source = model.state_dict()
    state = {}
    for name in twin.state_dict():
        if name.startswith("model.layers."):
            j, rest = name.removeprefix("model.layers.").split(".", 1)
            state[name] = source[f"model.layers.{order[int(j)]}.{rest}"]
        else:
            state[name] = source[name]
    twin.load_state_dict(state)
    return twin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--start", type=int, default=6)
    parser.add_argument("--end", type=int, default=8)
    parser.add_argument("--loops", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from lensbench.analyses.loop_identity import perplexity_state, token_stats
    from lensbench.models.anatomy import find_anatomy
    from lensbench.models.replay import BlockReplay

    model, enc = build(args)
    mask = enc["attention_mask"].bool()
    counts = sorted(set(args.loops))
    width = args.end - args.start + 1
    replay = BlockReplay(model, find_anatomy(model), args.start, args.end)
    deepest_model = looped(model, args.start, args.end, counts[-1])
    per_k_models = {k: looped(model, args.start, args.end, k) for k in counts}

    def metrics(h_in, h, prev):
        return token_stats(h_in[mask].double(), h[mask].double(), None if prev is None else prev[mask].double())

    def run_replay(tails: bool = True):
        out = {}
        cap = replay.capture(dict(enc))
        h_in = prev = h = cap.h_in
        for k in range(counts[-1] + 1):
            h = cap.h_out if k == 1 else replay.loop(cap, h) if k > 1 else h
            if k in counts:
                out[k] = {"h": h, **metrics(h_in, h, prev if k else None)}
                if tails:
                    out[k]["ppl"] = perplexity_state(replay.logits_after(cap, None if k == 1 else h),
                                                     enc["input_ids"], mask)
            prev = h
        return out

    def run_deepest():
        hs = deepest_model(**enc, output_hidden_states=True, use_cache=False).hidden_states
        h_in = hs[args.start]
        at = {k: h_in if k == 0 else hs[args.start + k * width] for k in range(counts[-1] + 1)}
        return {k: {"h": at[k], **metrics(h_in, at[k], at[k - 1] if k else None)} for k in counts}

    def run_per_k():
        out = {}
        for k in counts:
            res = per_k_models[k](**enc, output_hidden_states=True, use_cache=False)
            h_in = res.hidden_states[args.start]
            h = res.hidden_states[args.start + k * width]
            out[k] = {"h": h, **metrics(h_in, h, None), "ppl": perplexity_state(res.logits, enc["input_ids"], mask)}
        return out

    sides = {"replay": run_replay, "replay, metrics only": lambda: run_replay(False),
             "deepest": run_deepest, "per-k": run_per_k}
    results = {}
    with torch.inference_mode():
        for name, fn in sides.items():  # warm-up, and the results checked below
            results[name] = fn()
        for k in counts:
            ref = results["per-k"][k]["h"]
            for name in ("replay", "deepest"):
                got = results[name][k]["h"]
                if not torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())):
                    print(f"MISMATCH: h_out({k}) of {name} differs from per-k by "
                          f"{float((got - ref).abs().max()):.3g}", file=sys.stderr)
                    return 1
            a, b = results["replay"][k]["ppl"], results["per-k"][k]["ppl"]
            if a["count"] != b["count"] or abs(a["total"] - b["total"]) > 1e-5 * abs(b["total"]):
                print(f"MISMATCH: perplexity at k={k}: replay {a} per-k {b}", file=sys.stderr)
                return 1
        times = alternate(sides, args.reps)
    med = {name: median(ts) for name, ts in times.items()}
    machine = f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"machine: {machine}")
    print(f"model: random Llama, {args.layers} layers, width {args.hidden}, vocab {args.vocab}; batch {args.batch} x "
          f"{args.tokens} tokens; blocks {args.start}..{args.end}; loop counts {counts}; {args.reps} reps")
    for name in sides:
        print(f"  {name:22s} median {med[name]:.3f} s  ({', '.join(f'{t:.3f}' for t in times[name])})")
    rows = {
        "replay, all loop counts with perplexity (s, median)": f"{med['replay']:.3f}",
        "per-k: one looped forward per loop count (s, median)": f"{med['per-k']:.3f}",
        "deepest: one forward of the deepest looped model (s, median)": f"{med['deepest']:.3f}",
        "replay, metrics only (s, median)": f"{med['replay, metrics only']:.3f}",
        "ratio replay / per-k": f"**{med['replay'] / med['per-k']:.3f}**",
        "ratio replay, metrics only / deepest": f"**{med['replay, metrics only'] / med['deepest']:.3f}**",
        "ratio replay (with every perplexity) / deepest": f"**{med['replay'] / med['deepest']:.3f}**",
    }
    metrics_only, with_ppl = med["replay, metrics only"] / med["deepest"], med["replay"] / med["deepest"]

    summary = (f"Time ratio replay/deepest: metrics only (the analysis with `perplexity: false`) {metrics_only:.3f} ({verdict(metrics_only, GOAL)}); with every "
               f"loop count's perplexity {with_ppl:.3f} ({verdict(with_ppl, GOAL)}: each loop count needs its own tail "
               "pass, blocks end+1..N-1, final norm and LM head on its h_out(k), which the single deepest forward "
               "does not compute, as it scores the deepest k only). Against one looped forward per loop count "
               f"(the seed's way, every perplexity included): {med['replay'] / med['per-k']:.3f}.")
    print(summary)
    for key, value in rows.items():
        if key.startswith("ratio"):
            print(f"{key}: {value.strip('*')}")
    if args.write_docs:
        cmd = "python bench/loop_identity.py " + " ".join(argv if argv is not None else sys.argv[1:])
        path = report(
            SECTION,
            f"Goal (the loop_identity issue): all loop counts from one run take at most {GOAL}x the single "
            "forward with the deepest loop count.\n\n"
            "loop_identity's replay (one captured forward, one pass of the looped blocks per extra loop, one "
            "tail pass per loop count) against (a) ONE forward of a model whose block list repeats the range "
            "max(k) times (every h_out(k) from its hidden states, the perplexity of the deepest k only) and "
            "(b) one looped forward per loop count as the seed does, side by side in one process, order "
            "rotating. h_out(k) of every k agreed (relative 1e-5) and the per-k perplexities of replay and (b) "
            f"agreed before any time was kept. Random Llama, {args.layers} layers, width {args.hidden}, vocab "
            f"{args.vocab}; batch {args.batch} x {args.tokens} tokens; blocks {args.start}..{args.end}; loop "
            f"counts {counts}; median of {args.reps} repetitions.",
            machine, rows, f"{summary}\n\nCommand: `{cmd.strip()}`. The machine is shared: other jobs may run "
            "beside it.")
        print(f"wrote the section '{SECTION}' of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
