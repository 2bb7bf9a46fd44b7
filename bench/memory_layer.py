"""Benchmark: the product-key memory layer against a dense SwiGLU MLP, and its embedding-bag read against a gather.

    python3 bench/memory_layer.py              # the shape below, 11 repetitions; rewrites "## Memory layer"
    python3 bench/memory_layer.py --quick      # a small shape, a few seconds: a smoke run; writes no docs
    python3 bench/memory_layer.py --help       # --hidden, --n-keys, --heads, --topk, --k-dim, --reps, ...

Two comparisons, each timed side by side in one process (warm-up first, then ``--reps``
repetitions whose order rotates from one to the next; medians reported, best of the
repetitions alongside), with ``torch.set_num_threads`` set to the machine's core count:

1. ``ProductKeyMemory`` (lensbench.memory.layer; default shape: hidden 512, n_keys 256 = 65,536
   slots, heads 4, topk 32, k_dim 256, v_dim = hidden, not gated) against a dense SwiGLU MLP
   (Llama's: gate/up/down ``Linear`` without bias, ``down(silu(gate(x)) * up(x))``) with the
   same ACTIVE parameters per token, on the same input of ``batch x tokens`` positions (8 x 128),
   forward and forward+backward. The memory's active parameters per token are its query
   projection (hidden * heads * k_dim) and the value rows it reads (heads * topk * v_dim), plus
   gate and out when gated. The key tables (heads * n_keys * k_dim) are scored in full by every
   token but are NOT counted as active parameters; their scoring FLOPs are reported on their own
   line. The dense MLP's intermediate size is active / (3 * hidden), rounded. Backward: the input
   requires grad (as inside a model) and every parameter does; gradients are set to None before
   each repetition (``zero_grad(set_to_none=True)``), so each backward allocates its gradients.
2. The read alone: ``F.embedding_bag(slots, values, mode="sum", per_sample_weights=weights)``
   (as ``ProductKeyMemory.read``) against a plain gather ``(values[slots] * weights[..., None])
   .sum((1, 2))``, forward and forward+backward (gradients to the values and to the weights),
   with the same slots and weights: those the memory layer chose for the benchmark's input.
   Before any time is kept the two outputs must agree (allclose) and so must the gradients of
   the values and of the weights; otherwise the script stops with exit status 1.

Within the first comparison, the layer's forward as it is (``select`` takes the top-k of the
``topk x topk`` candidate sums, then builds the int64 slot ids of the chosen only) is timed against
the same layer whose ``select`` first builds the slot ids of all ``topk x topk`` candidates and
gathers the chosen from them (``select_all_ids_first``, the formula lensbench used before), after
checking that both give equal outputs (``torch.equal``); the ratio of the medians and the median
of the rounds' ratios (both sides run in every round) are recorded.

No goal is set by the project for these figures; they are recorded. Unless ``--no-docs`` (or
``--quick``), the section "## Memory layer" of docs/benchmarks.md is rewritten.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (BENCHMARKS, OthersCpu, alternate, cpu_name, date_utc, fmt_ms, least_disturbed,  # noqa: E402
                     load_average, median, replace_sections)

SECTION = "## Memory layer"
FULL = dict(hidden=512, n_keys=256, heads=4, topk=32, k_dim=256, batch=8, tokens=128, reps=11)
QUICK = dict(hidden=128, n_keys=64, heads=2, topk=8, k_dim=64, batch=2, tokens=32, reps=5)


def shape_parser(doc: str, full: dict, quick: dict, what: str, span: str, quiet_wait: float) -> argparse.ArgumentParser:
    """The options the memory benchmarks share: ``--quick``, one integer option per shape field of
    ``full`` (default: ``full``'s value, ``quick``'s with --quick; see ``shape_args``), and the
    disturbance handling of ``what`` (a comparison, the sweep) measured over ``span``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small shape, a smoke run (writes no docs)")
    for name in full:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"default {full[name]} ({quick[name]} with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retries", type=int, default=2,
                        help=f"times {what} is run again when other processes disturbed it (default 2)")
    parser.add_argument("--disturbed", type=float, default=0.10,
                        help=f"others' CPU, as a fraction of {span}, above which {what} counts as disturbed "
                             "(default 0.10)")
    parser.add_argument("--quiet-wait", type=float, default=quiet_wait,
                        help=f"seconds to wait at most, before each attempt, for the machine to be quiet "
                             f"(default {quiet_wait:g})")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    return parser


def shape_args(parser: argparse.ArgumentParser, argv, full: dict, quick: dict) -> argparse.Namespace:
    """Parse ``argv``; shape fields not given take ``quick``'s value with --quick, else ``full``'s."""
    args = parser.parse_args(argv)
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def parse(argv):
    parser = shape_parser(__doc__, FULL, QUICK, "a comparison", "a side's wall time", 60.0)
    parser.add_argument("--v-dim", type=int, default=None, help="default: hidden")
    parser.add_argument("--gated", action="store_true", help="the memory+ variant (gate and out projections)")
    parser.add_argument("--warmup", type=int, default=2)
    return shape_args(parser, argv, FULL, QUICK)


def compare(sides: dict, args) -> tuple[dict[str, list[float]], float, int]:
    """Seconds per call of each side (``args.warmup`` untimed rounds on the first attempt, then
    ``args.reps`` rounds whose order rotates), once the machine is quiet, run again while other
    processes took more than ``args.disturbed`` of the rounds' wall time in CPU (/proc/stat, whose
    10 ms ticks are too coarse for one call); the least disturbed attempt, others' share of a core
    during it, and the attempts made."""
    warmup = [args.warmup]

    def attempt():
        alternate(sides, 0, warmup.pop() if warmup else 0)
        watch = OthersCpu()
        return alternate(sides, args.reps), watch.share()

    return least_disturbed(attempt, args.retries, args.disturbed, args.quiet_wait)


def select_all_ids_first(mem, x):
    """``ProductKeyMemory.select`` as it was: the slot ids of all ``topk x topk`` candidates built
    before the top-k is taken (same chosen slots, same weights)."""
    import torch

    k = mem.topk
    kk = min(mem.n_keys, k + int(mem.blocked_slots.numel()))
    s1, i1 = mem.half_scores(x).topk(kk, dim=-1)
    sums = s1[:, :, 0, :, None] + s1[:, :, 1, None, :]
    slots = i1[:, :, 0, :, None] * mem.n_keys + i1[:, :, 1, None, :]
    if mem.blocked_slots.numel():
        sums = sums.masked_fill(torch.isin(slots, mem.blocked_slots), float("-inf"))
    best, pos = sums.flatten(2).topk(k, dim=-1)
    return slots.flatten(2).gather(-1, pos), torch.softmax(best.float(), dim=-1).to(x.dtype)


def fmt_count(n: float) -> str:
    return f"{n:,.0f}"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch
    import torch.nn.functional as F
    from torch import nn

    from lensbench.memory.layer import ProductKeyMemory

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    torch.manual_seed(args.seed)
    load = " ".join(load_average() or ["n/a"])

    h, nk, heads, topk, kd = args.hidden, args.n_keys, args.heads, args.topk, args.k_dim
    mem = ProductKeyMemory(h, n_keys=nk, heads=heads, topk=topk, k_dim=kd, v_dim=args.v_dim, gated=args.gated)
    vd = mem.v_dim
    n_tok = args.batch * args.tokens

    # Active parameters per token (the keys are not counted; see the docstring).
    active = {"query": h * heads * kd, "values read": heads * topk * vd}
    if mem.gate is not None:
        active["gate"] = h * vd
    if mem.out is not None:
        active["out"] = vd * h
    n_active = sum(active.values())
    n_keys_params = mem.keys.numel()
    inter = max(1, round(n_active / (3 * h)))

    class SwiGLU(nn.Module):
        def __init__(self, hidden: int, intermediate: int) -> None:
            super().__init__()
            self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
            self.up_proj = nn.Linear(hidden, intermediate, bias=False)
            self.down_proj = nn.Linear(intermediate, hidden, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    dense = SwiGLU(h, inter)
    for lin in (dense.gate_proj, dense.up_proj, dense.down_proj):
        nn.init.normal_(lin.weight, std=0.02)
    n_dense = sum(p.numel() for p in dense.parameters())
    n_mem_total = sum(p.numel() for p in mem.parameters())

    # FLOPs per token (multiply-add = 2 FLOPs).
    kk = min(nk, topk)
    flops_mem = {
        "query projection": 2 * h * heads * kd,
        "key scoring (all heads x 2 x n_keys half-keys)": 2 * heads * nk * kd,
        "top-k candidate sums": heads * kk * kk,
        "value read (weighted sum)": 2 * heads * topk * vd,
    }
    if mem.gate is not None:
        flops_mem["gate"] = 2 * h * vd
    if mem.out is not None:
        flops_mem["out"] = 2 * vd * h
    flops_dense = 2 * n_dense

    x = torch.randn(args.batch, args.tokens, h)
    xg = x.clone().requires_grad_(True)
    gy = torch.randn(args.batch, args.tokens, h)

    def clear(*mods_or_tensors):
        for m in mods_or_tensors:
            if isinstance(m, nn.Module):
                m.zero_grad(set_to_none=True)
            else:
                m.grad = None

    def fwd(mod):
        def run():
            with torch.no_grad():
                mod(x)
        return run

    def fwd_bwd(mod):
        def run():
            clear(mod, xg)
            mod(xg).backward(gy)
        return run

    print(f"machine: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load}")
    print(f"memory: hidden {h}, n_keys {nk} ({nk * nk:,} slots), heads {heads}, topk {topk}, k_dim {kd}, "
          f"v_dim {vd}, gated {args.gated}; tokens {args.batch} x {args.tokens} = {n_tok}; "
          f"{args.reps} reps after {args.warmup} warm-up rounds")
    print(f"dense SwiGLU: intermediate {inter}")

    def select_fwd():
        with torch.no_grad():
            mem.select(x.reshape(-1, h))

    import copy

    before = copy.deepcopy(mem)  # the same weights, the search as it was
    before.select = lambda flat: select_all_ids_first(before, flat)
    with torch.no_grad():
        if not torch.equal(mem(x), before(x)):
            print("MISMATCH: the layer's search and the one building all candidates' ids first disagree",
                  file=sys.stderr)
            return 1

    print("timing 1: memory layer against dense SwiGLU, and against its search as it was")
    t1, o1, a1 = compare({"memory fwd": fwd(mem), "dense fwd": fwd(dense),
                          "memory fwd+bwd": fwd_bwd(mem), "dense fwd+bwd": fwd_bwd(dense),
                          "memory select fwd": select_fwd, "memory fwd, ids first": fwd(before)}, args)

    # 2. the read: same slots and weights (those the layer chose for x).
    with torch.no_grad():
        slots, weights = mem.select(x.reshape(-1, h))
    values = mem.values.detach().clone().requires_grad_(True)
    w = weights.detach().clone().requires_grad_(True)
    gr = torch.randn(n_tok, vd)
    flat_slots = slots.reshape(n_tok, -1)

    def bag(v, wt):
        return F.embedding_bag(flat_slots, v, mode="sum", per_sample_weights=wt.reshape(n_tok, -1))

    def gather(v, wt):
        return (v[slots] * wt[..., None]).sum(dim=(1, 2))

    results = {}
    for name, fn in (("bag", bag), ("gather", gather)):
        clear(values, w)
        out = fn(values, w)
        out.backward(gr)
        results[name] = (out.detach(), values.grad.clone(), w.grad.clone())
    checks = {}
    for i, what in enumerate(("output", "values gradient", "weights gradient")):
        a, b = results["bag"][i], results["gather"][i]
        scale = float(b.abs().max())
        diff = float((a - b).abs().max())
        checks[what] = (diff, scale)
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)):
            print(f"MISMATCH: embedding_bag and gather disagree on the {what}: largest difference {diff:.3g} "
                  f"(largest magnitude {scale:.3g})", file=sys.stderr)
            return 1
    print("bag and gather agree: " + "; ".join(f"{k} max |diff| {d:.2e} (max |value| {s:.2e})"
                                                for k, (d, s) in checks.items()))

    def read_fwd(fn):
        def run():
            with torch.no_grad():
                fn(values, w)
        return run

    def read_fwd_bwd(fn):
        def run():
            clear(values, w)
            fn(values, w).backward(gr)
        return run

    print("timing 2: embedding_bag against gather")
    t2, o2, a2 = compare({"bag fwd": read_fwd(bag), "gather fwd": read_fwd(gather),
                          "bag fwd+bwd": read_fwd_bwd(bag), "gather fwd+bwd": read_fwd_bwd(gather)}, args)

    times = {**t1, **t2}
    others = {**dict.fromkeys(t1, o1), **dict.fromkeys(t2, o2)}
    med = {k: median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    ms = fmt_ms
    ratios = {
        "memory / dense, forward": med["memory fwd"] / med["dense fwd"],
        "memory, chosen ids / all ids first, forward": med["memory fwd"] / med["memory fwd, ids first"],
        "memory / dense, forward+backward": med["memory fwd+bwd"] / med["dense fwd+bwd"],
        "bag / gather, forward": med["bag fwd"] / med["gather fwd"],
        "bag / gather, forward+backward": med["bag fwd+bwd"] / med["gather fwd+bwd"],
    }

    pairs = [a / b for a, b in zip(times["memory fwd"], times["memory fwd, ids first"])]
    paired = median(pairs)

    print(f"\n{'side':18s} {'median':>11s} {'best':>11s}  all (ms)")
    for k, v in times.items():
        print(f"{k:18s} {ms(med[k]):>11s} {ms(best[k]):>11s}  {', '.join(f'{t * 1e3:.1f}' for t in v)}")
    print(f"others' CPU during the timing (share of one core): memory vs dense {o1:.0%} ({a1} attempt(s)), "
          f"bag vs gather {o2:.0%} ({a2} attempt(s))")
    print("\nparameters:")
    print(f"  memory active per token {fmt_count(n_active)} ({', '.join(f'{k} {fmt_count(v)}' for k, v in active.items())}); "
          f"key tables {fmt_count(n_keys_params)} (scored in full, not counted); total {fmt_count(n_mem_total)}")
    print(f"  dense  active per token = total {fmt_count(n_dense)} (3 x {h} x {inter})")
    print("FLOPs per token:")
    for k, v in flops_mem.items():
        print(f"  memory {k}: {fmt_count(v)}")
    print(f"  memory total {fmt_count(sum(flops_mem.values()))}; dense {fmt_count(flops_dense)}")
    print("ratios (medians):")
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}")
    print(f"  memory, chosen ids / all ids first, forward, median of the rounds' ratios: {paired:.3f} "
          f"({min(pairs):.3f} to {max(pairs):.3f})")

    if args.quick or args.no_docs:
        return 0

    cmd = "python3 bench/memory_layer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    grad_mib = mem.values.numel() * mem.values.element_size() / 2**20
    gathered_mib = n_tok * heads * topk * vd * 4 / 2**20
    def row(label, a, b):
        return (f"| {label} | {ms(med[a])} ({ms(best[a])}) | {ms(med[b])} ({ms(best[b])}) | **{med[a] / med[b]:.3f}** "
                f"| {others[a]:.0%} |")
    lines = [
        "Recorded, not judged: the project sets no goal for these figures.",
        "",
        "`ProductKeyMemory` (src/lensbench/memory/layer.py) against a dense SwiGLU MLP (Llama's: gate/up/down "
        "`Linear` without bias, `down(silu(gate(x)) * up(x))`) of equal ACTIVE parameters per token, and the "
        "layer's `F.embedding_bag` read against a plain gather, each pair timed side by side in one process "
        f"(float32, {args.warmup} warm-up rounds, then {args.reps} repetitions in rotating order; median, best in "
        "brackets). Forward runs under `no_grad`; forward+backward has the input and every parameter require "
        "grad, back-propagates a fixed random output gradient, and sets the gradients to None first "
        "(`zero_grad(set_to_none=True)`), so each backward allocates its gradients.",
        "",
        f"- command: `{cmd.strip()}`",
        f"- machine: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"(`torch.set_num_threads(os.cpu_count())`); load average at start {load} (the machine is shared: "
        "other jobs may run beside the benchmark)",
        f"- date: {date_utc()}",
        f"- memory: hidden {h}, n_keys {nk} ({nk * nk:,} slots), heads {heads}, topk {topk}, k_dim {kd}, "
        f"v_dim {vd}, {'gated (memory+)' if args.gated else 'not gated'}; input {args.batch} x {args.tokens} = "
        f"{n_tok} tokens",
        f"- dense SwiGLU: hidden {h}, intermediate {inter} (= active / (3 x {h}))",
        "",
        "| parameters | memory | dense SwiGLU |",
        "| --- | ---: | ---: |",
        f"| active per token | {fmt_count(n_active)} ({' + '.join(f'{k} {fmt_count(v)}' for k, v in active.items())}) "
        f"| {fmt_count(n_dense)} |",
        f"| key tables (scored in full by every token; not counted as active) | {fmt_count(n_keys_params)} | - |",
        f"| total | {fmt_count(n_mem_total)} | {fmt_count(n_dense)} |",
        f"| FLOPs per token, forward | {fmt_count(sum(flops_mem.values()))} | {fmt_count(flops_dense)} |",
        "",
        "Memory FLOPs per token (forward): " + "; ".join(f"{k} {fmt_count(v)}" for k, v in flops_mem.items())
        + f". Counting the key tables as active would make it {fmt_count(n_active + n_keys_params)} active "
        f"parameters, a dense intermediate of {round((n_active + n_keys_params) / (3 * h))}.",
        "",
        f"| time for {n_tok} tokens, median (best) | memory / bag | dense / gather | ratio (medians) "
        "| others' CPU during the comparison |",
        "| --- | ---: | ---: | ---: | ---: |",
        row("memory layer vs dense SwiGLU, forward", "memory fwd", "dense fwd"),
        row("memory layer vs dense SwiGLU, forward+backward", "memory fwd+bwd", "dense fwd+bwd"),
        row("read: embedding_bag vs gather, forward", "bag fwd", "gather fwd"),
        row("read: embedding_bag vs gather, forward+backward", "bag fwd+bwd", "gather fwd+bwd"),
        f"| memory layer's `select` alone (query, key scoring, top-k), forward | {ms(med['memory select fwd'])} "
        f"({ms(best['memory select fwd'])}) | | | {others['memory select fwd']:.0%} |",
        row("memory layer forward: ids of the chosen slots only (now) vs ids of all topk x topk candidates "
            "first (before; equal output, checked)", "memory fwd", "memory fwd, ids first"),
        "",
        "Now against before, round by round (both sides run in every round, so a disturbance that lasts a "
        f"round slows both): median of the {args.reps} ratios now / before "
        f"**{paired:.3f}** (range {min(pairs):.3f} to {max(pairs):.3f}).",
        "",
        "Others' CPU: the CPU time other processes took during a comparison's timed rounds (from "
        "/proc/stat), as a share of their wall time (0% on a quiet machine; 100% is one core taken). A "
        f"comparison above {args.disturbed:.0%} is run again, up to {args.retries} times, and the least "
        f"disturbed attempt kept (each attempt first waits, up to {args.quiet_wait:.0f} s, for 3 "
        f"seconds in which others take at most that share); attempts made: {a1} (memory vs dense), {a2} (bag vs "
        "gather).",
        "",
        "The read compared uses the slots and weights the layer chose for the benchmark's input. Before any "
        "time was kept, embedding_bag and gather agreed (allclose, rtol 1e-4, atol 1e-5 x largest magnitude): "
        + "; ".join(f"{k} largest difference {d:.1e} (largest magnitude {s:.1e})" for k, (d, s) in checks.items())
        + ".",
        "",
        reading(
            fwd=ratios["memory / dense, forward"], ids=ratios["memory, chosen ids / all ids first, forward"], fb=ratios["memory / dense, forward+backward"],
            select=med["memory select fwd"] * 1e3, mem_fwd=med["memory fwd"] * 1e3, bag_ms=med["bag fwd"] * 1e3,
            bag_fb_ms=med["bag fwd+bwd"] * 1e3, mem_fb_ms=med["memory fwd+bwd"] * 1e3,
            bag_f=ratios["bag / gather, forward"], bag_fb=ratios["bag / gather, forward+backward"],
            grad_mib=grad_mib, gathered_mib=gathered_mib, dense_mib=n_dense * 4 / 2**20, flop_ratio=sum(flops_mem.values()) / flops_dense,
            key_share=flops_mem["key scoring (all heads x 2 x n_keys half-keys)"] / sum(flops_mem.values())),
    ]
    path = replace_sections(BENCHMARKS, {SECTION: lines})
    print(f"wrote the section '{SECTION}' of {path}")
    return 0


def reading(*, fwd, ids, fb, select, mem_fwd, bag_ms, bag_fb_ms, mem_fb_ms, bag_f, bag_fb, grad_mib, gathered_mib, dense_mib, flop_ratio,
            key_share) -> str:
    """The short reading of the figures written under the tables; its comparisons follow the figures."""
    than = lambda r: "faster than" if r < 1 else "slower than"  # noqa: E731
    share = select / mem_fwd
    text = (
        f"Reading. At equal active parameters the memory layer does {flop_ratio:.2f}x the dense MLP's forward "
        f"FLOPs per token ({key_share:.0%} of the memory's FLOPs score the key tables, which the active count "
        f"leaves out), and its forward takes {fwd:.2f}x the dense forward's time. `select` alone takes "
        f"{select:.1f} of the {mem_fwd:.1f} ms ({share:.0%}): besides the query projection and the key scoring "
        "it runs a top-k over the n_keys half-keys of each half and head, builds the topk x topk candidate sums "
        "and takes a top-k over those, then the slot ids of the chosen, work a dense MLP has none of; building "
        f"the ids of all candidates first, as the layer did before, made its forward {1 / ids:.2f}x as long "
        f"(now / before {ids:.3f}); the read (one embedding bag) "
        f"took {bag_ms:.1f} ms in the second comparison. Forward+backward is {fb:.2f}x the dense MLP's: the "
        "values' gradient is dense (`F.embedding_bag` with `sparse=False`, as the layer calls it), a "
        f"{grad_mib:.0f} MiB tensor allocated and filled on every backward although only the rows read are "
        f"non-zero, while the dense MLP's gradients are the size of its weights ({dense_mib:.1f} MiB); the "
        f"read's forward+backward alone took {bag_fb_ms:.1f} ms, against {mem_fb_ms:.1f} ms for the whole layer's. "
        f"The embedding-bag read is {than(bag_f)} the gather forward ({bag_f:.3f}x) and {than(bag_fb)} it "
        f"forward+backward ({bag_fb:.3f}x). The gather materialises every row read ({gathered_mib:.0f} MiB for "
        "this input, and a gradient of that size in the backward) before summing, the bag sums as it reads; "
        "both produce the same dense values' gradient."
    )
    if bag_f < 1 and bag_fb < 1:
        text += " On this machine the layer's `F.embedding_bag` is the faster of the two reads."
    return text


if __name__ == "__main__":
    sys.exit(main())
