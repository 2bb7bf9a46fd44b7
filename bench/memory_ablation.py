"""Benchmark: a sweep over single-key ablations: per-state overhead against the evaluation, rows against whole tables.

    python3 bench/memory_ablation.py            # the shape below, K = 50 states; rewrites "## Memory ablation sweep"
    python3 bench/memory_ablation.py --quick    # a small shape, a few seconds: a smoke run; writes no docs
    python3 bench/memory_ablation.py --help     # --hidden, --n-keys, --states, --batch, --chars, ...

A random ``memory_llama`` model (lensbench.memory; float32, CPU; default: hidden 256, 2 layers, the
memory in layer 1, n_keys 256 = 65,536 slots, heads 4, topk 16, k_dim 128, v_dim = hidden: a values
table of 64 MiB) is built from a config and saved, with lensbench's ``chars`` tokenizer, to a
temporary folder, which two ``SubjectManager``s load (``ModelSpec(folder)``, as an analysis does).
The sweep is K states of one slot each, ``State("m", (TransformSpec("ablate_memory_values",
(("layer", 1), ("slots", (s,))), 0),))``, the K slots the evaluation batch reads most in layer 1
(as the memory-ablation analysis's ``top: {n: K, each: true}``). Each state is entered and
evaluated by both managers, side by side, the order alternating from one state to the next:

(a) rows (lensbench): the registered ``ablate_memory_values``, which touches ``Rows(values, slots)``:
    moving from one state to the next restores the previous slot's row and saves and zeroes the
    new one;
(b) whole table: a transform defined here (``zero_slot_whole_table``, in a ``Registry`` built here)
    that zeroes the same row but declares the whole ``model.layers.1.memory.values`` touched, so the
    manager keeps a whole copy and copies the whole table back at every state change;
(c) the evaluation of the state: one teacher-forced forward pass, ``model(input_ids=...,
    attention_mask=..., use_cache=False)`` under ``torch.inference_mode()``, over a batch like the
    analysis's (64 rows of about 14 characters, right-padded).

Timed: ``manager.activate(state)`` from the previous single-slot state (restore plus transform;
the first state is entered untimed) and the forward after it. Checked, outside the timed parts:
after each activation the state's row is zero and the previous state's row is back; both sides'
logits agree bit for bit in every state; after the sweep ``activate(State("m"))`` gives back
every parameter bit for bit (compared with copies taken at load) on both sides. Any failure exits
with status 1 before a figure is written. The machine may be shared: the CPU that other processes
take during the sweep is read from /proc/stat, and a sweep in which they took more than
``--disturbed`` of a core is run again (up to ``--retries`` times), the least disturbed one kept.

Goal (the memory-ablation issue): the per-state overhead under 5 % of the evaluation. Unless
``--no-docs`` (or ``--quick``), the section "## Memory ablation sweep" of docs/benchmarks.md is
rewritten.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (BENCHMARKS, OthersCpu, cpu_name, date_utc, fmt_ms, least_disturbed, load_average,  # noqa: E402
                     median, replace_sections, rotated, verdict)
from memory_layer import shape_args, shape_parser  # noqa: E402

SECTION = "## Memory ablation sweep"
GOAL = 0.05  # the goal: per-state overhead / evaluation
LAYER = 1
FULL = dict(hidden=256, n_keys=256, heads=4, topk=16, k_dim=128, layers=2, states=50, batch=64, chars=14)
QUICK = dict(hidden=64, n_keys=32, heads=2, topk=4, k_dim=32, layers=2, states=8, batch=8, chars=10)


def parse(argv):
    parser = shape_parser(__doc__, FULL, QUICK, "the sweep", "the sweep's wall time", 30.0)
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward passes before the sweep")
    args = shape_args(parser, argv, FULL, QUICK)
    if not 0 <= LAYER < args.layers:
        parser.error(f"--layers must be at least {LAYER + 1} (the memory is in layer {LAYER})")
    return args


def build_model(args, folder: Path):
    """A random memory_llama model and the chars tokenizer, saved to ``folder``."""
    import torch

    from lensbench.memory.model import MemoryLlamaConfig, MemoryLlamaForCausalLM
    from lensbench.synthetic.tokenizer import char_tokenizer

    tokenizer = char_tokenizer()
    torch.manual_seed(args.seed)
    config = MemoryLlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        memory_layers=[LAYER], memory_n_keys=args.n_keys, memory_heads=args.heads, memory_topk=args.topk,
        memory_k_dim=args.k_dim, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = MemoryLlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return config, tokenizer


def make_batch(tokenizer, args):
    """``batch`` rows of 3/4 to all of ``chars`` characters (question/answer-like), right-padded."""
    import random

    rng = random.Random(args.seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 ?:"
    texts = [f"Q{''.join(rng.choice(alphabet) for _ in range(rng.randint(max(1, 3 * args.chars // 4), args.chars) - 1))}"
             for _ in range(args.batch)]
    tokenizer.padding_side = "right"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    import lensbench  # noqa: F401  (registers memory_llama with transformers' Auto classes)
    from lensbench.models.loading import ModelSpec
    from lensbench.plugins import build_registries, get_plugin_manager
    from lensbench.registry import Registry
    from lensbench.state import State, SubjectManager, Transform, TransformSpec

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    load = " ".join(load_average() or ["n/a"])
    values_name = f"model.layers.{LAYER}.memory.values"

    class ZeroSlotWholeTable(Transform):
        """Zeroes one slot's value row but declares the WHOLE values table touched (the baseline)."""

        name = "zero_slot_whole_table"
        description = "one memory slot's value row zeroed; the whole values table saved and restored"

        def touched(self, subject) -> list[str]:
            return [values_name]

        def apply(self, subject, generator) -> None:
            subject.model.get_parameter(values_name)[self.params["slot"]] = 0.0

    whole_registry = Registry("perturbation", Transform)
    whole_registry.add(ZeroSlotWholeTable, "bench/memory_ablation.py")
    rows_registry = build_registries(get_plugin_manager(load_installed=False)).perturbations

    with tempfile.TemporaryDirectory(prefix="lensbench-memory-ablation-") as tmp:
        folder = Path(tmp) / "memory_llama"
        config, tokenizer = build_model(args, folder)
        specs = {"m": ModelSpec(str(folder))}
        device = torch.device("cpu")
        managers = {"rows": SubjectManager(specs, device, rows_registry),
                    "whole": SubjectManager(specs, device, whole_registry)}
        bare = State("m")
        models = {side: mgr.activate(bare).model for side, mgr in managers.items()}
        originals = {side: {n: p.detach().clone() for n, p in m.named_parameters()} for side, m in models.items()}
        values = {side: m.get_parameter(values_name) for side, m in models.items()}
        table_mib = values["rows"].numel() * values["rows"].element_size() / 2**20
        row_kib = values["rows"].shape[1] * values["rows"].element_size() / 2**10
        n_slots = values["rows"].shape[0]

        batch = make_batch(tokenizer, args)
        n_tokens = int(batch["attention_mask"].sum())

        def evaluate(model):
            with torch.inference_mode():
                return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).logits

        # The K slots the batch reads most in the memory layer (unablated model).
        mem = models["rows"].get_submodule(f"model.layers.{LAYER}.memory")
        mem.record = True
        try:
            base_logits = evaluate(models["rows"])
            read = mem.last_slots[batch["attention_mask"].bool()].reshape(-1)
        finally:
            mem.record, mem.last_slots, mem.last_weights = False, None, None
        counts = torch.bincount(read, minlength=n_slots)
        slots = torch.argsort(counts, descending=True, stable=True)[: args.states + 1].tolist()
        states = {
            "rows": [State("m", (TransformSpec("ablate_memory_values", (("layer", LAYER), ("slots", (s,))), 0),))
                     for s in slots],
            "whole": [State("m", (TransformSpec("zero_slot_whole_table", (("slot", s),), 0),)) for s in slots],
        }

        # Restore time inside activate (wrapping the manager's own _restore; the rest is the transform).
        restore_t: dict[str, list[float]] = {"rows": [], "whole": []}
        for side, mgr in managers.items():
            inner = mgr._restore

            def timed_restore(inner=inner, side=side):
                t0 = time.perf_counter()
                inner()
                restore_t[side].append(time.perf_counter() - t0)
            mgr._restore = timed_restore

        def check_state(side: str, i: int) -> str | None:
            v, orig = values[side], originals[side][values_name]
            if bool(v[slots[i]].any()):
                return f"{side}: slot {slots[i]} not zeroed in its state"
            if i and not torch.equal(v[slots[i - 1]], orig[slots[i - 1]]):
                return f"{side}: slot {slots[i - 1]} not restored when moving to slot {slots[i]}"
            return None

        for _ in range(args.warmup):
            for m in models.values():
                evaluate(m)
        print(f"machine: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load}")
        print(f"model: memory_llama, hidden {args.hidden}, {args.layers} layers, memory in layer {LAYER}: n_keys "
              f"{args.n_keys} ({n_slots:,} slots), heads {args.heads}, topk {args.topk}, k_dim {args.k_dim}, v_dim "
              f"{values['rows'].shape[1]} (values {table_mib:.1f} MiB); vocab {config.vocab_size}; batch "
              f"{tuple(batch['input_ids'].shape)} ({n_tokens} real tokens); {args.states} states")

        def sweep():
            """One pass over the states on both sides: ((timings, states whose logits differ from the
            unablated model's), others' CPU share); a failed check raises ``Mismatch``."""
            for side in managers:  # enter the first state untimed (the whole side copies its table here)
                managers[side].activate(states[side][0])
                restore_t[side].clear()
            activate_t: dict[str, list[float]] = {"rows": [], "whole": []}
            eval_t: dict[str, list[float]] = {"rows": [], "whole": []}
            changed = 0
            watch = OthersCpu()
            for i in range(1, args.states + 1):
                logits = {}
                for side in rotated(["rows", "whole"], i - 1):
                    t0 = time.perf_counter()
                    managers[side].activate(states[side][i])
                    t1 = time.perf_counter()
                    logits[side] = evaluate(models[side])
                    t2 = time.perf_counter()
                    activate_t[side].append(t1 - t0)
                    eval_t[side].append(t2 - t1)
                    problem = check_state(side, i)
                    if problem:
                        raise Mismatch(problem)
                if not torch.equal(logits["rows"], logits["whole"]):
                    raise Mismatch(f"the two sides' logits differ in the state of slot {slots[i]}")
                changed += int(not torch.equal(logits["rows"], base_logits))
            wall, others = watch.wall(), watch.share()
            restores = {side: list(ts) for side, ts in restore_t.items()}
            for side, mgr in managers.items():
                mgr.activate(bare)
                bad = [n for n, p in models[side].named_parameters() if not torch.equal(p, originals[side][n])]
                if bad:
                    raise Mismatch(f"{side}: after activating State('m') these parameters differ from the originals: {bad[:5]}")
            return ({"activate": activate_t, "eval": eval_t, "restore": restores, "wall": wall}, changed), others

        try:
            (timings, changed), others, attempts = least_disturbed(sweep, args.retries, args.disturbed,
                                                                   args.quiet_wait, label="sweep")
        except Mismatch as exc:
            print(f"MISMATCH: {exc}", file=sys.stderr)
            return 1
        activate_t, eval_t, restore_t, wall = (timings["activate"], timings["eval"], timings["restore"],
                                               timings["wall"])
        print(f"checks: every state's row zeroed and the previous one restored; both sides' logits equal in all "
              f"{args.states} states ({changed} differ from the unablated model's); State('m') restores every "
              "parameter bit for bit on both sides, after every sweep")

    med = median
    a, b = med(activate_t["rows"]), med(activate_t["whole"])
    e_rows, e_whole = med(eval_t["rows"]), med(eval_t["whole"])
    e = med(eval_t["rows"] + eval_t["whole"])
    ra, rb = med(restore_t["rows"]), med(restore_t["whole"])
    ratio_a, ratio_b, ratio_ba = a / e, b / e, b / a
    for side in ("rows", "whole"):
        print(f"  {side:6s} activate median {ms(med(activate_t[side]))} (min {ms(min(activate_t[side]))}, max "
              f"{ms(max(activate_t[side]))}), of which restore {ms(med(restore_t[side]))}; evaluation median "
              f"{ms(med(eval_t[side]))}")
    print(f"others' CPU during the sweep kept: {others:.0%} of a core; its wall time {wall:.1f} s; sweeps run: {attempts}")
    met = ratio_a < GOAL
    print(f"overhead / evaluation: rows {ratio_a:.2%} ({verdict(ratio_a, GOAL, f'{GOAL:.0%}', strict=True)}); whole "
          f"table {ratio_b:.2%}; whole / rows {ratio_ba:.1f}x")

    if args.quick or args.no_docs:
        return 0

    cmd = "python3 bench/memory_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    outcome = (f"**met**: {ratio_a:.2%} < {GOAL:.0%}" if met else f"**not met**: {ratio_a:.2%} >= {GOAL:.0%}")
    lines = [
        f"Goal (the memory-ablation issue): in a sweep over single-key ablations, the per-state overhead "
        f"(restore plus transform) stays under {GOAL:.0%} of the evaluation itself; compared against "
        "restoring whole tables.",
        "",
        f"Verdict: {outcome}.",
        "",
        f"A sweep over {args.states} single-slot states, `State(\"m\", (TransformSpec(\"ablate_memory_values\", "
        f"((\"layer\", {LAYER}), (\"slots\", (s,))), 0),))`, the {args.states} slots the evaluation batch reads "
        "most, entered by two `SubjectManager`s side by side in one process, the order alternating from one "
        "state to the next: (a) rows: the registered `ablate_memory_values`, which touches `Rows(values, "
        "slots)`, so the manager restores the previous slot's row and saves the new one; (b) whole table: "
        "a transform defined in the script that zeroes the same row but declares the whole "
        f"`{values_name}` touched, so the manager copies the whole table back at every state change. Timed: "
        "`manager.activate(state)` from the previous single-slot state (the first state entered untimed), "
        "and (c) the evaluation after it: one teacher-forced forward (`model(input_ids=..., attention_mask=..., "
        "use_cache=False)` under `torch.inference_mode()`). Before any figure was kept: each state's row was "
        "zero and the previous one back; both sides' logits were equal bit for bit in every state "
        f"({changed} of {args.states} differ from the unablated model's); `activate(State(\"m\"))` after the "
        "sweep gave back every parameter bit for bit on both sides.",
        "",
        f"- command: `{cmd.strip()}`",
        f"- machine: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"(`torch.set_num_threads(os.cpu_count())`); load average at start {load}; other processes took "
        f"{others:.0%} of a core during the sweep kept (from /proc/stat; the machine is shared: other jobs may run "
        f"beside the benchmark, so a sweep in which they took more than {args.disturbed:.0%} is run again, up to "
        f"{args.retries} times, after waiting up to {args.quiet_wait:.0f} s for a quiet machine, and the least "
        f"disturbed sweep kept; sweeps run: {attempts})",
        f"- date: {date_utc()}",
        f"- model: random `memory_llama` (float32, CPU, saved and loaded through `ModelSpec(folder)`), hidden "
        f"{args.hidden}, {args.layers} layers, memory in layer {LAYER}: n_keys {args.n_keys} ({n_slots:,} slots), "
        f"heads {args.heads}, topk {args.topk}, k_dim {args.k_dim}, v_dim {values['rows'].shape[1]}: values "
        f"{tuple(values['rows'].shape)}, {table_mib:.0f} MiB (one row {row_kib:.0f} KiB); vocab "
        f"{config.vocab_size} (`chars`)",
        f"- evaluation batch: {args.batch} rows x {batch['input_ids'].shape[1]} tokens, right-padded "
        f"({n_tokens} real tokens)",
        "",
        f"| figure (median over {args.states} states) | value |",
        "| --- | --- |",
        f"| (a) rows: `activate` (restore + transform) | {ms(a)} |",
        f"| (a) of which restore | {ms(ra)} |",
        f"| (b) whole table: `activate` (restore + transform) | {ms(b)} |",
        f"| (b) of which restore | {ms(rb)} |",
        f"| (c) evaluation: one forward, both sides pooled | {ms(e)} |",
        f"| (c) evaluation after (a) / after (b) | {ms(e_rows)} / {ms(e_whole)} |",
        f"| ratio (a) / (c) (goal < {GOAL:.0%}) | **{ratio_a:.2%}** |",
        f"| ratio (b) / (c) | **{ratio_b:.2%}** |",
        f"| ratio (b) / (a) | **{ratio_ba:.1f}x** |",
        "",
        reading(a=a, b=b, ra=ra, rb=rb, e=e, ratio_a=ratio_a, ratio_b=ratio_b, ratio_ba=ratio_ba,
                table_mib=table_mib, row_kib=row_kib, met=met),
    ]
    path = replace_sections(BENCHMARKS, {SECTION: lines})
    print(f"wrote the section '{SECTION}' of {path}")
    return 0


def ms(seconds: float) -> str:
    return fmt_ms(seconds, 2, small=3)


class Mismatch(Exception):
    """A check of the sweep failed: no figure is kept."""


def reading(*, a, b, ra, rb, e, ratio_a, ratio_b, ratio_ba, table_mib, row_kib, met) -> str:
    """The short reading under the table; its comparisons follow the figures."""
    text = (
        f"Reading. With rows, a state change moves two {row_kib:.0f} KiB rows (the previous slot's back, the "
        f"new slot's saved) and zeroes one: {ms(a)} per state, {ratio_a:.2%} of the {ms(e)} forward, so the "
        f"goal is {'met' if met else 'NOT met'}. Of it, the restore takes {ms(ra)}; the rest is entering the "
        "state (state ids, the registry look-up, the transform's validation and `touched`, the saved index and "
        "row, a seeded generator, `index_fill_` of one row), work whose size does not depend on the table's. "
        f"Declaring the whole table touched makes every state change copy {table_mib:.0f} MiB back "
        f"({ms(rb)}): {ms(b)} per state, {ratio_b:.1%} of the forward and {ratio_ba:.1f}x the rows' overhead; "
        "that copy grows with the table, the rows' work does not."
    )
    if ratio_b >= GOAL:
        text += f" Restoring whole tables would not meet the {GOAL:.0%} goal on this model."
    return text


if __name__ == "__main__":
    sys.exit(main())
