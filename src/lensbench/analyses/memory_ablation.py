"""memory_ablation: what a memory model answers, which memory slots it reads to answer, and what
each intervention on its memory (or on any model's heads and neurons) does to those answers.

Every intervention is a model state (a registered transform from ``lensbench.memory.interventions``
with its parameters), so sweeps over thousands of keys shard over ranks, resume, and compose with
other transforms. Each work item scores one batch of question-answer rows in one state with one
teacher-forced forward pass: for every answer token, whether it is the model's top prediction, its
probability, its rank and the entropy of the prediction. In the unablated state (``baseline``) it
also records which slots every memory layer read at the answer positions and how tokens route.
An answer position whose logits hold a NaN or inf has no prediction: it is counted
(``n_nonfinite_positions``), its row's and group's metrics are NaN, and the merge says so in one line.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..analysis import Analysis
from ..errors import LensbenchError
from ..hookspecs import hookimpl
from ..memory.data_check import check_same_data, trained_data
from ..memory.greedy import greedy_answers
from ..memory.key_statistics import figures as key_figures
from ..memory.key_statistics import write_correlation
from ..memory.key_statistics import write_tables as key_tables
from ..models.loading import ModelSpec
from ..state import State, TransformSpec
from ..stats import nonfinite_warning
from ..synthetic.datasets import GROUP_FIELDS, group_of
from ..tables import pyplot, save_figure, write_csv
from ..work import WorkItem

FIELD = "model.init_args"
BASELINE = "baseline"
ID_FIELDS = ("pair_id", "chain_id", "link")
#: Answer positions whose logits hold a NaN or inf (no prediction there): the row's metrics are NaN.
NONFINITE = "n_nonfinite_positions"
#: What the swap tables compare: greedy answers, or the top token per answer position given the true prefix.
SWAP_ANSWERS = ("generated", "teacher_forced")
METRICS = ["exact_match", "digit_accuracy", "answer_prob", "answer_rank", "answer_entropy"]


#: Transforms whose ``top`` states vary ``keys`` (the top slots' half-key rows) unless ``vary`` says otherwise.
KEYS_ONLY = {"ablate_memory_keys": "keys"}


def _slot_rows(slot: int, n_keys: int) -> str:
    """``[*,0,i1] [*,1,i2]``: the half-key rows (every head) that address ``slot``."""
    i1, i2 = divmod(slot, n_keys)
    return f"[*,0,{i1}] [*,1,{i2}]"


#: Where ``top`` and ``random`` count the reads: the answer positions (those key_activations.jsonl
#: records), or every real token of the rows.
POSITIONS = ("answer", "all")


@dataclass
class TopSlots:
    """The ``n`` slots of memory ``layer`` read most often (unablated model) by the rows of
    ``group`` (e.g. ``bucket=4/seen``; null: every row), at their answer positions (``positions:
    answer``, the positions key_activations.jsonl records) or at every real token (``all``)."""

    n: int = 10
    layer: int | None = None
    group: str | None = None
    each: bool = False
    """One state per slot (true), or one state with all ``n`` together (false). Swaps always take
    every pair of the ``n`` slots."""
    positions: str = "answer"


#: Which slots ``random`` draws from: those the group reads (at least once, at ``positions``), or all.
POOLS = ("read", "all")


@dataclass
class RandomSets:
    """``count`` random sets of ``size`` slots each (drawn with ``seed``), from the slots of memory
    ``layer`` that the rows of ``group`` read at least once at ``positions`` in the unablated model
    (``pool: read``, the control for ``top``), or from every slot (``pool: all``)."""

    size: int = 10
    count: int = 5
    seed: int = 0
    pool: str = "read"
    layer: int | None = None
    group: str | None = None
    positions: str = "answer"


@dataclass
class Intervention:
    """A family of states: one registered transform, fixed ``params``, and the values of one
    parameter (``vary``) that differ from state to state."""

    transform: str
    """A registered transform: mask_memory_keys, ablate_memory_keys, ablate_memory_values, ablate_memory,
    swap_memory_keys, swap_memory_values, ablate_attention_head, ablate_mlp_neurons, or any other."""
    params: dict[str, Any] = field(default_factory=dict)
    """Parameters every state of the family shares, e.g. {layer: 1, mode: zero}."""
    vary: str | None = None
    """The parameter set per state: slots, keys, head, neurons, or pair (a and b of a swap)."""
    values: list[Any] | None = None
    """Explicit values of ``vary``, one state each (e.g. [[3], [17, 18]] for slots)."""
    every: bool = False
    """Every value ``vary`` can take on this model, one by one (every slot, half-key row, head or neuron)."""
    limit: int | None = None
    """With ``every``: only the first N values."""
    top: TopSlots | None = None
    """The slots read most by a group of rows (slots, or the pairs of them for swaps; with ``vary:
    keys``, the default of ablate_memory_keys, the half-key rows that address them in every head)."""
    random: RandomSets | None = None
    """Random sets of slots."""
    name: str | None = None
    """Label in outputs; default: the transform's name."""


class MemoryAblation(Analysis):
    """Accuracy, answer logits, memory key activations, and interventions on a memory model."""

    name = "memory_ablation"
    extendable = ("interventions",)  # no perturbation grid: interventions are its states

    def __init__(
        self,
        model: str | ModelSpec = "outputs/fit/train_synthetic_qa",
        train_config: str | None = None,
        interventions: list[Intervention] | None = None,
        record_slots: bool = True,
        max_length: int = 128,
        swap_answers: str = "generated",
        allow_other_data: bool = False,
        experiment: str | None = None,
        output_dir: str = "outputs",
    ) -> None:
        """
        Args:
            model: The model: a ``lensbench fit`` run folder (its latest ``checkpoint-<step>`` is
                used), one checkpoint folder, any model lensbench loads, or a ``ModelSpec``.
            train_config: When ``model`` does not exist yet: the ``lensbench fit`` config that
                trains it, run first (it says so).
            interventions: Families of intervention states, each scored against the unablated model.
                None: evaluation only.
            record_slots: In the unablated state, record the slots and weights every memory layer
                reads at the answer positions (key_activations.jsonl, slot_usage.csv, routing.csv).
            max_length: Longest tokenized row (a longer one is an error).
            swap_answers: What swap_predictions.csv and swap_matrix.csv compare: the greedy
                ``generated`` answers, or the ``teacher_forced`` predictions.
            allow_other_data: Evaluate data other than the model's training data (a held-out
                study). Off: data whose dataset, seed or options differ from those the ``lensbench
                fit`` run recorded (run.json next to the model, or train_config) is refused.
            experiment: Run name; results go to ``<output_dir>/<experiment>/``.
            output_dir: Folder holding one sub-folder per experiment.
        """
        super().__init__(experiment=experiment, output_dir=output_dir)
        spec = ModelSpec(model) if isinstance(model, str) else model
        if train_config is not None and not Path(spec.source).exists():
            train_first(train_config, spec.source)
        self.spec = self.declare_model(latest_checkpoint(spec), f"{FIELD}.model")
        self.label = self.spec.label()
        self.interventions = list(interventions or [])
        for i, iv in enumerate(self.interventions):
            where = f"{FIELD}.interventions[{i}]"
            self.registries.perturbations.get(iv.transform, f"{where}.transform")
            chosen = [k for k, v in (("values", iv.values), ("every", iv.every or None), ("top", iv.top),
                                     ("random", iv.random)) if v is not None]
            if len(chosen) > 1:
                raise LensbenchError(f"give one of values, every, top and random, not {' and '.join(chosen)}", where)
            if chosen and iv.vary is None and chosen[0] != "top":
                raise LensbenchError("name the parameter that varies (vary: slots, keys, head, neurons or pair)",
                                     f"{where}.vary")
        names = [iv.name or iv.transform for iv in self.interventions]
        if len(set(names)) != len(names):
            raise LensbenchError("two interventions have the same name; give each a `name`", f"{FIELD}.interventions")
        if max_length < 2:
            raise LensbenchError(f"must be at least 2, got {max_length}", f"{FIELD}.max_length")
        if swap_answers not in SWAP_ANSWERS:
            raise LensbenchError(f"must be one of {', '.join(SWAP_ANSWERS)}, got {swap_answers!r}",
                                 f"{FIELD}.swap_answers")
        self.record_slots = record_slots
        self.max_length = max_length
        self.swap_answers = swap_answers
        self.allow_other_data = allow_other_data
        self.trained_data = trained_data(self.spec.source, train_config)
        self._states: list[State] | None = None

    # -- states ----------------------------------------------------------------------------------
    def states(self) -> list[State]:
        if self._states is None:
            source = getattr(self.trainer.datamodule, "source", None)
            if self.trained_data is not None and source is not None and not self.allow_other_data:
                check_same_data(self.trained_data, source, "data.init_args", f"{FIELD}.allow_other_data",
                                self.registries.synthetic_datasets)
            states = [State(self.label, labels=(("intervention", BASELINE), ("transform", ""), ("target", "")))]
            for i, iv in enumerate(self.interventions):
                states += self._family(iv, f"{FIELD}.interventions[{i}]")
            self._states = states
        return self._states

    def _config(self) -> dict[str, Any]:
        """The model's config.json (read once)."""
        if getattr(self, "_config_cache", None) is None:
            from ..models.checkpoint import open_checkpoint

            config = open_checkpoint(self.spec, f"{FIELD}.model").config or {}
            self._config_cache = config.get("text_config", config)
        return self._config_cache

    def _family(self, iv: Intervention, where: str) -> list[State]:
        name = iv.name or iv.transform
        targets: list[str] | None = None  # labels other than the value's JSON (the top slots' keys)
        if iv.values is not None:
            values = list(iv.values)
        elif iv.every:
            values = self._every(iv, where)[: iv.limit]
        elif iv.top is not None:
            slots = self._top_slots(iv, where)
            if iv.transform.startswith("swap"):
                values = [[a, b] for j, a in enumerate(slots) for b in slots[j + 1:]]
                iv = Intervention(**{**iv.__dict__, "vary": "pair"})
            else:
                groups = [[s] for s in slots] if iv.top.each else [slots]
                iv = Intervention(**{**iv.__dict__, "vary": iv.vary or KEYS_ONLY.get(iv.transform, "slots")})
                values = groups
                if iv.vary == "keys":  # the half-key rows that address the slots (every head)
                    values = [self._slot_keys(iv, g, where) for g in groups]
                    targets = [f"slot {g[0]} keys {_slot_rows(g[0], self._memory_shape(iv, where)['keys'])}"
                               if len(g) == 1 else f"keys of slots {json.dumps(g, separators=(',', ':'))}"
                               for g in groups]
        elif iv.random is not None:
            values = self._random_sets(iv, where)
        else:
            values = [None]  # one state: the transform with its fixed params
        states = []
        for k, value in enumerate(values):
            params = dict(iv.params)
            if iv.vary == "pair":
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    raise LensbenchError(f"a pair is [a, b], got {value!r}", f"{where}.values")
                params["a"], params["b"] = value
            elif value is not None:
                params[iv.vary] = value
            self._check(iv, params, where)
            spec = TransformSpec(iv.transform, tuple(sorted((k, _frozen(v)) for k, v in params.items())))
            target = targets[k] if targets else "" if value is None else json.dumps(value, separators=(",", ":"))
            draw = (("draw", k),) if iv.random is not None else ()  # random sets: which draw (random_sets.csv)
            states.append(State(self.label, (spec,), labels=(("intervention", name), ("transform", iv.transform),
                                                             ("target", target), *draw)))
        if not states:
            raise LensbenchError("selects no state; give values, or check limit", where)
        return states

    def _memory_shape(self, iv: Intervention, where: str) -> dict[str, int]:
        config = self._config()
        chosen = iv.top or iv.random
        layer = iv.params.get("layer", chosen.layer if chosen else None)
        if config.get("model_type") != "memory_llama" or layer not in (config.get("memory_layers") or []):
            raise LensbenchError(f"layer {layer!r} is not a memory layer of {self.label} (memory layers: "
                                 f"{config.get('memory_layers') or 'none'}); set params.layer", f"{where}.params.layer")
        n_keys = int(config["memory_n_keys"])
        return {"slots": n_keys * n_keys, "keys": n_keys, "heads": int(config["memory_heads"])}

    MEMORY_TRANSFORMS = ("mask_memory_keys", "ablate_memory_values", "ablate_memory", "swap_memory_keys",
                         "swap_memory_values", "ablate_memory_keys")

    def _check(self, iv: Intervention, params: dict[str, Any], where: str) -> None:
        """Indices out of range for this model, before any work (the transform checks again when applied)."""
        if iv.transform not in self.MEMORY_TRANSFORMS:
            return
        shape = self._memory_shape(Intervention(iv.transform, params), where)

        def within(values: Any, size: int, what: str, key: str) -> None:
            for v in values if isinstance(values, (list, tuple)) else [values]:
                if not isinstance(v, int) or not 0 <= v < size:
                    raise LensbenchError(f"{what} {v!r} is out of range; this memory has {what}s 0..{size - 1}",
                                         f"{where}.{'values' if key == iv.vary else 'params.' + key}")

        if "slots" in params:
            within(params["slots"], shape["slots"], "slot", "slots")
        if "keys" in params:
            for key in params["keys"]:
                if not isinstance(key, (list, tuple)) or len(key) != 3:
                    raise LensbenchError(f"a key is [head, half, row], got {key!r}", f"{where}.values")
                within(key[0], shape["heads"], "head", "keys")
                within(key[1], 2, "half", "keys")
                within(key[2], shape["keys"], "row", "keys")
        if iv.transform.startswith("swap"):
            size = shape["slots"] if iv.transform == "swap_memory_values" else shape["keys"]
            within([params.get("a"), params.get("b")], size, "slot" if size == shape["slots"] else "row", "pair")

    def _slot_keys(self, iv: Intervention, slots: list[int], where: str) -> list[list[int]]:
        """The half-key rows that address ``slots`` (slot ``i1 * n_keys + i2``: row i1 of half 0
        and row i2 of half 1), in every head: [[head, half, row], ...], each once."""
        shape = self._memory_shape(iv, where)
        rows = [(h, half, row) for s in slots for half, row in enumerate(divmod(s, shape["keys"]))
                for h in range(shape["heads"])]
        return [list(k) for k in dict.fromkeys(rows)]

    def _every(self, iv: Intervention, where: str) -> list[Any]:
        vary = iv.vary
        if vary == "slots":
            return [[s] for s in range(self._memory_shape(iv, where)["slots"])]
        if vary == "keys":
            shape = self._memory_shape(iv, where)
            return [[[h, s, r]] for h in range(shape["heads"]) for s in (0, 1) for r in range(shape["keys"])]
        config = self._config()
        if vary == "head":
            return list(range(int(config["num_attention_heads"])))
        if vary == "neurons":
            return [[n] for n in range(int(config["intermediate_size"]))]
        raise LensbenchError(f"every cannot enumerate {vary!r}; use slots, keys, head or neurons, or give values",
                             f"{where}.vary")

    def _top_slots(self, iv: Intervention, where: str) -> list[int]:
        """The ``top.n`` slots of ``layer`` that the rows of ``top.group`` read most in the unablated model."""
        top = iv.top
        n_slots = self._memory_shape(iv, where)["slots"]
        if not 1 <= top.n <= n_slots:
            raise LensbenchError(f"top.n must be 1..{n_slots}, got {top.n}", f"{where}.top.n")
        counts = self._read_counts(iv.params.get("layer", top.layer), top.group, top.positions, n_slots, f"{where}.top")
        return torch.argsort(counts, descending=True, stable=True)[: top.n].tolist()

    def _random_sets(self, iv: Intervention, where: str) -> list[list[int]]:
        """``count`` sorted sets of ``size`` slots drawn with ``seed`` from the pool (the slots the
        group reads, or all)."""
        rs = iv.random
        n_slots = self._memory_shape(iv, where)["slots"]
        if rs.pool not in POOLS:
            raise LensbenchError(f"pool must be one of {', '.join(POOLS)}, got {rs.pool!r}", f"{where}.random.pool")
        pool = list(range(n_slots))
        if rs.pool == "read":
            counts = self._read_counts(iv.params.get("layer", rs.layer), rs.group, rs.positions, n_slots,
                                       f"{where}.random")
            pool = counts.nonzero().flatten().tolist()
        if not 1 <= rs.size <= len(pool) or rs.count < 1:
            what = (f"the {len(pool)} slots the rows read" if rs.pool == "read" else f"the {n_slots} slots")
            raise LensbenchError(f"random sets need 1 <= size <= {len(pool)} ({what}) and count >= 1; got size "
                                 f"{rs.size}, count {rs.count}" + ("; or set pool: all" if rs.pool == "read" else ""),
                                 f"{where}.random.size")
        rng = random.Random(rs.seed)
        return [sorted(rng.sample(pool, rs.size)) for _ in range(rs.count)]

    def _read_counts(self, layer: int | None, group: str | None, positions: str, n_slots: int,
                     where: str) -> torch.Tensor:
        """How often the unablated model's memory ``layer`` reads each slot on the rows of ``group``
        (null: every row), at their answer positions (``positions: answer``: the positions
        key_activations.jsonl records) or at every real token (``all``); computed once per
        (layer, group, positions)."""
        from ..models.loading import load_model

        if positions not in POSITIONS:
            raise LensbenchError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}",
                                 f"{where}.positions")
        cache = self.__dict__.setdefault("_reads", {})
        if (layer, group, positions) in cache:
            return cache[layer, group, positions]
        rows = [r for rows in self.trainer.datamodule.rows.values() for r in rows
                if group is None or group_of(r) == group]
        if not rows:
            groups = sorted({group_of(r) for rows in self.trainer.datamodule.rows.values() for r in rows})
            raise LensbenchError(f"no row is in group {group!r}; groups: {', '.join(groups)}", f"{where}.group")
        loaded = load_model(self.spec, device=self.device, field=f"{FIELD}.model")
        counts = torch.zeros(n_slots, dtype=torch.long)
        collate = self._collator(loaded.tokenizer)
        mem = loaded.model.get_submodule(loaded.anatomy.memory_names[layer][0])
        for start in range(0, len(rows), 32):
            batch = collate(rows[start:start + 32])
            slots = self._forward(loaded, batch, [mem])[1][0]  # [batch, length, heads, topk]
            if positions == "answer":  # logits at position p predict label p + 1
                at = batch["labels"][:, 1:] != -100
                at = torch.cat([at, torch.zeros_like(at[:, :1])], 1)
            else:
                at = batch["attention_mask"].bool()
            counts += torch.bincount(slots[at.to(slots.device)].reshape(-1).cpu(), minlength=n_slots)
        del loaded
        cache[layer, group, positions] = counts
        return counts

    # -- one work item ---------------------------------------------------------------------------
    def _end_marker(self, loaded) -> tuple[int, frozenset[int]]:
        """Tokens generated past the answer and the ids they must be: the end-of-sequence token when
        the training data appended one (``append_eos``), else none."""
        if not (self.trained_data and self.trained_data[0].get("append_eos")):
            return 0, frozenset()
        from ..generation import _eos_ids

        return 1, frozenset(_eos_ids(loaded.model, loaded.tokenizer))

    def _collator(self, tokenizer):
        from ..synthetic.collate import PaddedCollator

        return PaddedCollator(tokenizer, self.trainer.datamodule.mask, self.max_length, field="data.init_args")

    def _forward(self, loaded, batch: dict, memories: list) -> tuple[Any, list[torch.Tensor], list[torch.Tensor]]:
        for mem in memories:
            mem.record = True
        try:
            with torch.inference_mode():
                out = loaded.model(input_ids=batch["input_ids"].to(self.device),
                                   attention_mask=batch["attention_mask"].to(self.device), use_cache=False)
            slots = [mem.last_slots for mem in memories]
            weights = [mem.last_weights for mem in memories]
        finally:
            for mem in memories:
                mem.record = False
                mem.last_slots = mem.last_weights = None
        return out, slots, weights

    def process(self, item: WorkItem) -> dict[str, Any]:
        loaded = self.subjects.activate(item.state)
        rows = item.payload.rows
        collate = self._collator(loaded.tokenizer)
        batch = collate(rows)
        baseline = not item.state.transforms
        layers = sorted(loaded.anatomy.memory_names) if baseline and self.record_slots else []
        memories = [loaded.model.get_submodule(loaded.anatomy.memory_names[i][0]) for i in layers]
        out, slots, weights = self._forward(loaded, batch, memories)
        logits = out.logits[:, :-1].float()
        target = batch["labels"][:, 1:].to(logits.device)
        extra, ends = self._end_marker(loaded)
        greedy = greedy_answers(loaded.model, batch["input_ids"], batch["labels"], logits, collate.pad_id, extra, ends)
        examples = []
        for b, row in enumerate(rows):
            pos = (target[b] != -100).nonzero().flatten()
            true = target[b, pos]
            lg = logits[b, pos]
            logp = torch.log_softmax(lg, -1)
            top = lg.argmax(-1)
            right = (top == true)
            rank = (lg > lg.gather(1, true[:, None])).sum(-1)
            finite = torch.isfinite(lg).all(-1)  # an answer position with a NaN or inf logit: no prediction
            n_bad = int((~finite).sum())
            example = {f: row[f] for f in (*GROUP_FIELDS, *ID_FIELDS) if row.get(f) is not None}
            example.update({
                "index": item.payload.start + b,
                "answer": row["answer"],
                "prediction": loaded.tokenizer.decode(top.tolist()).strip(),
                "exact": bool(right.all()) if not n_bad else None,
                "token_right": [int(r) if f else None for r, f in zip(right.tolist(), finite.tolist())],
                "answer_prob": float(logp.gather(1, true[:, None]).exp().mean()) if not n_bad else math.nan,
                "answer_rank": float(rank.float().mean()) if not n_bad else math.nan,
                "answer_entropy": float(-(logp.exp() * logp).sum(-1).mean()) if not n_bad else math.nan,
                "n_nonfinite_positions": n_bad,
                "generated": loaded.tokenizer.decode(greedy[b].tokens).strip(),
                "generated_exact": greedy[b].exact if greedy[b].finite else None,
            })
            if layers:
                example["slots"] = {str(i): s[b, pos].reshape(len(pos), -1).tolist() for i, s in zip(layers, slots)}
                example["weights"] = {str(i): [[round(x, 5) for x in r] for r in w[b, pos].reshape(len(pos), -1).tolist()]
                                      for i, w in zip(layers, weights)}
            examples.append(example)
        record: dict[str, Any] = {"labels": dict(item.state.labels), "examples": examples}
        if layers:
            record["routing"] = routing(loaded.tokenizer, batch, layers, slots)
        return record

    # -- merge -----------------------------------------------------------------------------------
    @classmethod
    def merge(cls, records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
        import pandas as pd

        run_dir = Path(run_dir)
        rows = []
        for rec in records:
            for ex in rec["examples"]:
                rows.append({**rec["labels"], **{k: v for k, v in ex.items() if k not in ("slots", "weights")}})
        examples = pd.DataFrame(rows)
        if NONFINITE not in examples:  # records stored before the count: unknown (NaN), not 0
            examples[NONFINITE] = math.nan
        for column in ("generated", "generated_exact"):  # records stored before generation: unknown
            if column not in examples:
                examples[column] = None
        if "draw" in examples:  # random sets' draw number; empty for other states
            examples["draw"] = examples["draw"].astype("Int64")
        examples["digit_accuracy"] = examples["token_right"].map(
            lambda r: math.nan if None in r else sum(r) / len(r) if r else 0.0)
        fields = [f for f in GROUP_FIELDS if f in examples.columns]
        examples["group"] = examples.apply(group_of, axis=1)
        outputs = [write_csv(examples.drop(columns=["token_right"]).sort_values(
            ["intervention", "target", "index"], kind="stable"), run_dir / "examples.csv")]

        keys = ["intervention", "transform", "target", "group", *fields]
        scored = examples.assign(**{c: examples[c].map(lambda v: math.nan if pd.isna(v) else float(v))
                                    for c in ("exact", "generated_exact")})
        acc = (scored.groupby(keys, dropna=False, sort=False)
               .agg(n=("exact", "size"), exact_match=("exact", "mean"), digit_accuracy=("digit_accuracy", "mean"),
                    answer_prob=("answer_prob", "mean"), answer_rank=("answer_rank", "mean"),
                    answer_entropy=("answer_entropy", "mean"),
                    generated_exact_match=("generated_exact", "mean"), **{NONFINITE: (NONFINITE, "sum")},
                    _counted=(NONFINITE, "count")).reset_index())
        acc.loc[acc.pop("_counted") < acc["n"], NONFINITE] = math.nan  # a row of unknown count: the sum is unknown
        acc.loc[acc[NONFINITE] > 0, METRICS] = math.nan  # not the finite rows' mean: the group's is not finite
        base = acc[acc.intervention == BASELINE].set_index("group")
        acc["exact_drop"] = acc["group"].map(base["exact_match"]) - acc["exact_match"]
        acc["digit_drop"] = acc["group"].map(base["digit_accuracy"]) - acc["digit_accuracy"]
        acc = _with_intervals(scored, acc)
        outputs.append(write_csv(acc.sort_values(["intervention", "target", *fields], kind="stable"),
                                 run_dir / "accuracy.csv"))
        bad = {f"{iv}{' ' + t if t else ''} / {g}": int(c)
               for iv, t, g, c in zip(acc.intervention, acc.target, acc.group, acc[NONFINITE]) if c > 0}
        nonfinite_warning("memory_ablation", bad, "answer positions", NONFINITE, "accuracy.csv")

        ablated = acc[(acc.intervention != BASELINE) & ~acc["transform"].astype(str).str.startswith("swap")]
        if len(acc[acc.intervention != BASELINE]):
            outputs += _position_impact(examples, run_dir)
            outputs += _swaps(examples, run_dir, "generated" if examples["generated"].notna().all() else "prediction")
        if len(ablated):
            order = list(dict.fromkeys(acc.sort_values([*fields], kind="stable")["group"]))
            matrix = (ablated.groupby(["intervention", "target", "group"], sort=False)["exact_drop"].mean()
                      .unstack("group", sort=False))  # a state or group whose drops are all NaN keeps its row or column
            matrix = matrix[[g for g in order if g in matrix.columns]].rename_axis(columns=None).reset_index()
            outputs.append(write_csv(matrix, run_dir / "impact_matrix.csv"))
        outputs += _random_spread(examples, acc, run_dir)
        outputs += _slot_tables(records, run_dir)
        outputs += key_tables(records, acc, run_dir, swaps=run_dir / "swap_matrix.csv" in outputs)
        return outputs

    def finalize(self) -> list[Path]:
        outputs = super().finalize()
        if self.swap_answers == "teacher_forced" and (self.run_dir / "swap_matrix.csv").exists():
            import pandas as pd

            text = {c: str for c in ("answer", "prediction", "generated", "target")}
            _swaps(pd.read_csv(self.run_dir / "examples.csv", keep_default_na=False, na_values=[""], dtype=text),
                   self.run_dir, "prediction")
            write_correlation(pd.read_csv(self.run_dir / "accuracy.csv", keep_default_na=False, na_values=[""],
                                          dtype={"target": str}), self.run_dir / "swap_matrix.csv", self.run_dir)
        with torch.inference_mode():  # the model was loaded inside Lightning's inference mode
            loaded = self.subjects.activate(self.states()[0])
        if loaded.anatomy.memory_names:
            import pandas as pd

            rows = []
            for layer, names in sorted(loaded.anatomy.memory_names.items()):
                mem = loaded.model.get_submodule(names[0])
                norms = mem.values.detach().float().norm(dim=-1).cpu()
                rows += [{"layer": layer, "slot": s, "value_norm": float(v)} for s, v in enumerate(norms.tolist())]
            outputs.append(write_csv(pd.DataFrame(rows), self.run_dir / "value_norms.csv"))
            usage = self.run_dir / "slot_usage.csv"
            if usage.exists():  # the seed's analyze_key_occurrences: how much of the memory is ever read
                used = pd.read_csv(usage).groupby("layer")["slot"].nunique()
                summary = pd.DataFrame([{"layer": layer, "slots": loaded.model.get_submodule(names[0]).n_slots,
                                         "used": int(used.get(layer, 0))}
                                        for layer, names in sorted(loaded.anatomy.memory_names.items())])
                summary["unused_share"] = 1 - summary["used"] / summary["slots"]
                outputs.append(write_csv(summary, self.run_dir / "memory_summary.csv"))
        return outputs

    @classmethod
    def plot(cls, run_dir: Path) -> list[Path]:
        import pandas as pd

        from ..heatmaps import panels_figure

        plt = pyplot()
        run_dir = Path(run_dir)
        outputs = []
        acc = pd.read_csv(run_dir / "accuracy.csv")
        base = acc[acc.intervention == BASELINE]
        if "bucket" in base.columns and base["bucket"].notna().any():
            fig, ax = plt.subplots(figsize=(6, 4))
            for split, group in base.groupby(base["split"].fillna("all") if "split" in base else [0] * len(base)):
                group = group.sort_values("bucket")
                ax.errorbar(group["bucket"], group["exact_match"], yerr=_yerr(group, "exact_match"), marker="o",
                            capsize=3, label=str(split))
            ax.set_xscale("log", base=2)
            ax.set_xlabel("exposure bucket")
            ax.set_ylabel("exact match (95% Wilson interval)")
            ax.set_title("Accuracy per exposure bucket (unablated)")
            ax.legend()
            fig.tight_layout()
            out = run_dir / "accuracy_by_bucket.png"
            save_figure(fig, out, dpi=120)
            plt.close(fig)
            outputs.append(out)
        outputs += _drop_figure(plt, acc, run_dir)
        path = run_dir / "impact_matrix.csv"
        if path.exists():
            table = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"target": str})
            values = table.drop(columns=["intervention", "target"]).apply(pd.to_numeric, errors="coerce")
            blocks = []  # one panel per family (intervention name), each with its own colour scale
            for family, rows in table.groupby(table["intervention"].astype(str), sort=False).groups.items():
                targets = table.loc[rows, "target"].fillna("").astype(str)
                blocks.append((family, values.loc[rows].to_numpy(dtype=float),
                               [t or family for t in targets], [str(c) for c in values.columns]))
            if blocks:
                fig = panels_figure(plt, blocks, "exact-match drop", "Impact of each intervention per group")
                outputs.append(_save(plt, fig, run_dir / "impact_matrix.png"))
        path = run_dir / "swap_matrix.csv"
        if path.exists():
            table = pd.read_csv(path).dropna(subset=["a", "b"])
            for iv, group in table.groupby("intervention", sort=False):
                slots = sorted({int(x) for x in group["a"]} | {int(x) for x in group["b"]})
                grid = [[float("nan")] * len(slots) for _ in slots]
                for a, b, c in zip(group["a"], group["b"], group["changed"]):
                    grid[slots.index(int(a))][slots.index(int(b))] = grid[slots.index(int(b))][slots.index(int(a))] = c
                import numpy as np

                outputs.append(_heatmap(plt, np.array(grid), [str(x) for x in slots], [str(x) for x in slots],
                                        "predictions changed", f"Swaps: {iv}", run_dir / f"swap_matrix_{iv}.png"))
        outputs += key_figures(plt, run_dir)
        return outputs


def latest_checkpoint(spec: ModelSpec) -> ModelSpec:
    """A ``lensbench fit`` run folder (no config.json, ``checkpoint-<step>`` inside) stands for its
    latest checkpoint."""
    import dataclasses
    import re

    folder = Path(spec.source)
    if folder.is_dir() and not (folder / "config.json").exists():
        steps = sorted((int(m.group(1)), p) for p in folder.iterdir()
                       if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / "config.json").exists())
        if steps:
            return dataclasses.replace(spec, source=str(steps[-1][1]), name=spec.name or folder.name)
    return spec


def train_first(config: str, model: str) -> None:
    """Run ``lensbench fit --config <config>`` in this process, saying so, to make ``model``."""
    from ..logs import console

    if not Path(config).is_file():
        raise LensbenchError(f"{model!r} does not exist and train_config {config!r} is not a file; train the model "
                             "first (lensbench fit --config ...) or fix the path", f"{FIELD}.train_config")
    console.info(f"lensbench: {model} does not exist yet: training it first with lensbench fit --config {config}")
    from ..training.cli import run_fit

    run_fit(["fit", "--config", config])
    if not Path(model).exists():
        raise LensbenchError(f"training with {config} did not write {model}; point model at its run folder "
                             "(outputs/<experiment>)", f"{FIELD}.model")


def _yerr(table, column: str):
    """Error bars of ``column`` from its interval columns (lensbench.intervals.error_bars)."""
    from ..intervals import error_bars

    return error_bars(table, column)


#: The most states ``exact_drop.png`` draws (those with the largest mean drop).
DROP_FIGURE_STATES = 12


def _drop_figure(plt, acc, run_dir: Path) -> list[Path]:
    """``exact_drop.png``: each ablation state's exact-match drop per group with its 95% paired
    bootstrap interval (the ``DROP_FIGURE_STATES`` states of largest mean drop when there are more)."""
    from ..heatmaps import shorten

    ablated = acc[(acc.intervention != BASELINE) & ~acc["transform"].astype(str).str.startswith("swap")]
    if not len(ablated) or "exact_drop_ci_low" not in ablated:
        return []
    label = ablated["intervention"].astype(object).fillna("").astype(str) + " " + \
        ablated["target"].astype(object).fillna("").astype(str)
    ablated = ablated.assign(state=label.str.strip())
    ranked = ablated.groupby("state", sort=False)["exact_drop"].mean().sort_values(ascending=False, kind="stable")
    shown = list(ranked.index[:DROP_FIGURE_STATES])
    groups = list(dict.fromkeys(acc["group"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 2 + 0.6 * len(groups)), 4.5))
    width = 0.8 / len(shown)
    for j, state in enumerate(shown):
        part = ablated[ablated.state == state].set_index("group").reindex(groups)
        x = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        ax.errorbar(x, part["exact_drop"], yerr=_yerr(part, "exact_drop"), fmt="o", ms=3, capsize=2, label=shorten(state))
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("exact-match drop (95% paired bootstrap)")
    more = f" ({len(shown)} of {len(ranked)} states, largest mean drop)" if len(ranked) > len(shown) else ""
    ax.set_title("Drop against the unablated model" + more, fontsize=9)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    out = run_dir / "exact_drop.png"
    save_figure(fig, out, dpi=120)
    plt.close(fig)
    return [out]


def _heatmap(plt, values, rows: list[str], cols: list[str], label: str, title: str, out: Path) -> Path:
    """One heatmap (lensbench.heatmaps.draw_block): colour bar over the data's range, NaN blank."""
    from ..heatmaps import block_inches, draw_block, figure_size

    fig, ax = plt.subplots(figsize=figure_size(len(cols), [block_inches(len(rows))]), layout="constrained")
    draw_block(fig, ax, values, rows, cols, label, title)
    return _save(plt, fig, out)


def _save(plt, fig, out: Path) -> Path:
    try:
        save_figure(fig, out, dpi=120)
    finally:
        plt.close(fig)
    return out


def _frozen(value: Any) -> Any:
    """A hashable copy of a parameter value (lists become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def token_type(text: str) -> str:
    stripped = text.strip()
    if not stripped:
        return "space"
    if stripped.isdigit():
        return "digit"
    if stripped.isalpha():
        return "word"
    return "operator"


def routing(tokenizer, batch: dict, layers: list[int], slots: list[torch.Tensor]) -> dict[str, Any]:
    """Slot counts per memory layer by token type (digit, word, operator, space) and by position,
    over every real token of the batch."""
    mask = batch["attention_mask"].bool()
    ids = batch["input_ids"]
    out: dict[str, Any] = {}
    for layer, s in zip(layers, slots):
        by_type: dict[str, dict[str, int]] = {}
        by_pos: dict[str, dict[str, int]] = {}
        for b in range(ids.shape[0]):
            pos = 0
            for t in range(ids.shape[1]):
                if not mask[b, t]:
                    continue
                kind = token_type(tokenizer.decode([int(ids[b, t])]))
                for slot in s[b, t].reshape(-1).tolist():
                    by_type.setdefault(kind, {})[str(slot)] = by_type.get(kind, {}).get(str(slot), 0) + 1
                    by_pos.setdefault(str(pos), {})[str(slot)] = by_pos.get(str(pos), {}).get(str(slot), 0) + 1
                pos += 1
        out[str(layer)] = {"type": by_type, "position": by_pos}
    return out


#: The drops of accuracy.csv that carry an interval and a p-value, and the per-row outcome each is
#: the mean difference of (binary ``exact``: McNemar; ``digit_accuracy``: Wilcoxon signed-rank).
DROPS = {"exact_drop": "exact", "digit_drop": "digit_accuracy"}


def _with_intervals(scored, acc):
    """``acc`` with the uncertainty of its rates (lensbench.intervals): Wilson 95% interval of each
    group's exact match, t interval of its digit accuracy, and for every state's drops the paired
    bootstrap 95% interval (seeded, ``BOOTSTRAP_SEED``) and the paired test's p-value, each row of
    the state paired with the same row (split, index) of the unablated model. NaN where the metric
    is (a row with non-finite logits makes its group's statistics NaN)."""
    from ..intervals import mean_interval, paired_bootstrap, paired_p, wilson

    acc["exact_match_ci_low"], acc["exact_match_ci_high"] = wilson((acc["exact_match"] * acc["n"]).round(), acc["n"])
    keys = ["intervention", "target", "group"]
    if "generated_exact_match" in acc:  # the greedy answers' exact match, over the rows that have one
        counted = scored.groupby(keys, sort=False)["generated_exact"].count()
        n = [counted.get(k, 0) for k in zip(*(acc[c] for c in keys))]
        acc["generated_exact_match_ci_low"], acc["generated_exact_match_ci_high"] = wilson(
            (acc["generated_exact_match"] * n).round(), n)
    digit = {key: mean_interval(part["digit_accuracy"]) for key, part in scored.groupby(keys, sort=False)}
    where = list(zip(*(acc[k] for k in keys)))
    acc["digit_accuracy_ci_low"] = [digit.get(k, (math.nan,) * 2)[0] for k in where]
    acc["digit_accuracy_ci_high"] = [digit.get(k, (math.nan,) * 2)[1] for k in where]

    on = ["group", *[c for c in ("split", "index") if c in scored.columns]]
    base = scored.loc[scored.intervention == BASELINE, [*on, *DROPS.values()]]
    stats: dict = {}
    if not base.duplicated(on).any():  # else rows cannot be paired: intervals stay NaN
        joined = scored[[*keys, *on[1:], *DROPS.values()]].merge(base, on=on, how="left", suffixes=("", "_base"))
        for key, part in joined.groupby(keys, sort=False):
            row = {}
            for drop, outcome in DROPS.items():
                before, after = part[f"{outcome}_base"].to_numpy(float), part[outcome].to_numpy(float)
                row[f"{drop}_ci_low"], row[f"{drop}_ci_high"] = paired_bootstrap(before, after)
                row[f"{drop}_p"] = paired_p(before, after)
            stats[key] = row
    for drop in DROPS:
        for end in ("_ci_low", "_ci_high", "_p"):
            acc[drop + end] = [stats.get(k, {}).get(drop + end, math.nan) for k in where]
    return acc


def _position_impact(examples, run_dir: Path) -> list[Path]:
    """Accuracy of each answer token position per state (with its Wilson interval), and its drop
    against the baseline (paired bootstrap interval and McNemar p-value over the rows)."""
    import pandas as pd

    from ..intervals import mcnemar_p, paired_bootstrap, wilson

    unablated = examples[examples.intervention == BASELINE]
    before = dict(zip(_row_keys(unablated), unablated["token_right"]))
    rows = []
    for (iv, target), group in examples.groupby(["intervention", "target"], sort=False):
        width = max(len(r) for r in group["token_right"])
        known = group[NONFINITE].notna().all()  # records stored before the count: unknown
        for p in range(width):
            hits = [r[p] for r in group["token_right"] if len(r) > p]
            bad = hits.count(None)
            low, high = wilson(sum(hits), len(hits)) if not bad else (math.nan, math.nan)
            # paired with the unablated model's same row at this position (None: not finite -> NaN)
            pairs = [(before[key][p], r[p]) for key, r in zip(_row_keys(group), group["token_right"])
                     if len(r) > p and len(before.get(key, ())) > p]
            after = [b for _, b in pairs]
            before_p = [a for a, _ in pairs]
            drop_low, drop_high = paired_bootstrap(before_p, after) if pairs else (math.nan, math.nan)
            rows.append({"intervention": iv, "target": target, "position": p, "n": len(hits),
                         "token_accuracy": sum(hits) / len(hits) if not bad else math.nan,
                         "token_accuracy_ci_low": low, "token_accuracy_ci_high": high,
                         NONFINITE: bad if known else math.nan,
                         "drop_ci_low": drop_low, "drop_ci_high": drop_high,
                         "drop_p": mcnemar_p(before_p, after) if pairs else math.nan})
    table = pd.DataFrame(rows)
    base = table[table.intervention == BASELINE].set_index("position")["token_accuracy"]
    table.insert(table.columns.get_loc("drop_ci_low"), "drop", table["position"].map(base) - table["token_accuracy"])
    return [write_csv(table, run_dir / "position_impact.csv")]


def _row_keys(rows) -> list[tuple]:
    """Each row's identity across states: (split, index), split "" where rows have none."""
    split = rows["split"].fillna("") if "split" in rows else [""] * len(rows)
    return list(zip(split, rows["index"]))


def _random_spread(examples, acc, run_dir: Path) -> list[Path]:
    """Per family of random sets and group: how many draws, and the mean, sd, min and max of their
    ``exact_drop`` and ``digit_drop`` (the spread a control's drop has from draw to draw)."""
    import pandas as pd

    if "draw" not in examples.columns:
        return []
    families = list(dict.fromkeys(examples.loc[examples["draw"].notna(), "intervention"]))
    rows = []
    for (iv, group), part in acc[acc.intervention.isin(families)].groupby(["intervention", "group"], sort=False):
        row = {"intervention": iv, "group": group, "draws": len(part)}
        for col in ("exact_drop", "digit_drop"):
            row.update({f"{col}_mean": part[col].mean(), f"{col}_sd": part[col].std(ddof=1) if len(part) > 1 else math.nan,
                        f"{col}_min": part[col].min(), f"{col}_max": part[col].max()})
        rows.append(row)
    if not rows:
        return []
    return [write_csv(pd.DataFrame(rows), run_dir / "random_sets.csv")]


def _swaps(examples, run_dir: Path, column: str = "generated") -> list[Path]:
    """For swap states: the answers (``column``: the greedy ``generated`` ones, or the teacher-forced
    ``prediction``) that changed, and whether each now gives the answer of another row of its split
    (``follows``: that row's index); per swapped pair, the share of changed answers that follow
    another row's answer (``swap_matrix.csv``)."""
    import pandas as pd

    examples = examples.assign(prediction=examples[column])

    swapped = examples[examples["transform"].astype(str).str.startswith("swap")]
    if not len(swapped):
        return []
    base = examples[examples.intervention == BASELINE]
    split = base["split"] if "split" in base else pd.Series("", index=base.index)
    before = {(sp, i): p for sp, i, p in zip(split, base["index"], base["prediction"])}
    owner = {(sp, a): i for sp, i, a in zip(split, base["index"], base["answer"])}
    out = []
    for _, r in swapped.iterrows():
        sp = r["split"] if "split" in r else ""
        old = before.get((sp, r["index"]))
        if r["prediction"] == old:
            continue
        follows = owner.get((sp, r["prediction"]))
        follows = None if follows == r["index"] else follows
        out.append({"intervention": r["intervention"], "target": r["target"], "split": sp, "index": r["index"],
                    "answer": r["answer"], "baseline_prediction": old, "prediction": r["prediction"], "follows": follows,
                    "compared": "teacher_forced" if column == "prediction" else column})
    columns = ["intervention", "target", "split", "index", "answer", "baseline_prediction", "prediction", "follows",
               "compared"]
    changed = pd.DataFrame(out, columns=columns)
    outputs = [write_csv(changed, run_dir / "swap_predictions.csv")]
    rows = []
    for (iv, target), _ in swapped.groupby(["intervention", "target"], sort=False):
        pair = json.loads(target) if target else []
        mine = changed[(changed.intervention == iv) & (changed.target == target)]
        rows.append({"intervention": iv, "a": pair[0] if len(pair) == 2 else None, "b": pair[1] if len(pair) == 2 else None,
                     "changed": len(mine), "follow": int(mine["follows"].notna().sum()),
                     "follow_share": float(mine["follows"].notna().mean()) if len(mine) else 0.0})
    outputs.append(write_csv(pd.DataFrame(rows), run_dir / "swap_matrix.csv"))
    return outputs


def _slot_tables(records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    """Baseline slot usage (count and summed weight at answer positions per layer and slot),
    key activations per example, and routing by token type and position."""
    import pandas as pd

    usage: dict[tuple[int, int], list[float]] = {}
    activations = []
    route_type: dict[tuple, dict[str, int]] = {}
    route_pos: dict[tuple, dict[str, int]] = {}
    for rec in records:
        if rec["labels"].get("intervention") != BASELINE:
            continue
        for ex in rec["examples"]:
            if "slots" not in ex:
                continue
            activations.append(dict(ex))
            for layer, per_pos in ex["slots"].items():
                for slots, weights in zip(per_pos, ex["weights"][layer]):
                    for s, w in zip(slots, weights):
                        u = usage.setdefault((int(layer), s), [0, 0.0])
                        u[0] += 1
                        u[1] += w
        for layer, r in (rec.get("routing") or {}).items():
            for kind, counts in r["type"].items():
                acc = route_type.setdefault((int(layer), kind), {})
                for s, c in counts.items():
                    acc[s] = acc.get(s, 0) + c
            for pos, counts in r["position"].items():
                acc = route_pos.setdefault((int(layer), int(pos)), {})
                for s, c in counts.items():
                    acc[s] = acc.get(s, 0) + c
    if not activations:
        return []
    path = run_dir / "key_activations.jsonl"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(a, sort_keys=True) + "\n" for a in activations))
    tmp.replace(path)
    table = pd.DataFrame([{"layer": l, "slot": s, "count": c, "weight": w} for (l, s), (c, w) in sorted(usage.items())])
    table["share"] = table["count"] / table.groupby("layer")["count"].transform("sum")
    outputs = [path, write_csv(table.sort_values(["layer", "count"], ascending=[True, False], kind="stable"),
                               run_dir / "slot_usage.csv")]

    def describe(counts: dict[str, int]) -> dict[str, Any]:
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:10]
        return {"reads": sum(counts.values()), "distinct_slots": len(counts),
                "top_slots": " ".join(f"{s}:{c}" for s, c in top)}

    rows = [{"layer": l, "by": "token_type", "value": k, **describe(c)} for (l, k), c in sorted(route_type.items())]
    rows += [{"layer": l, "by": "position", "value": str(p), **describe(c)} for (l, p), c in sorted(route_pos.items())]
    outputs.append(write_csv(pd.DataFrame(rows), run_dir / "routing.csv"))
    return outputs


@hookimpl
def lensbench_register_analyses() -> list[type]:
    return [MemoryAblation]
