"""Synthetic memorization datasets: deterministic from a seed, written as JSONL splits.

Every generator draws from its own ``random.Random(seed)`` (never the global state), so a name,
a seed and options always give the same rows. Every row has ``text`` (the full training or
evaluation string), ``prompt`` (the text before the answer: what an evaluator feeds the model)
and ``answer`` (the exact expected continuation, without the trailing separator), so that
``text.startswith(prompt)`` and the answer follows the prompt, possibly after one space; rows
also carry metadata (ids, buckets, hops). Entities are 6-digit numbers (100000..999999), distinct
within a dataset. The exact formats:

``synthetic_qa`` (mask ``qa``): pairs ``(x, y)`` spread evenly over exposure ``buckets`` (the
remainder of ``num_pairs`` going to the first buckets); in each bucket ``heldout_fraction`` of the
pairs (rounded down) is never trained.

- ``format: pair``: text ``"{x}:{y} "``, prompt ``"{x}:"``, answer ``"{y}"``.
- ``format: question``: text ``"What is paired with {x}? {y}"``, prompt
  ``"What is paired with {x}?"``, answer ``"{y}"``.
- ``train``: each trained pair ``bucket`` times, shuffled (``pair_id``, ``bucket``, ``split: seen``);
  ``val``: per bucket up to ``val_per_bucket`` trained pairs and up to ``val_per_bucket`` held-out
  ones (``split`` ``seen`` / ``heldout``); ``test``: every pair once, by ``pair_id``. Rows also
  carry ``subject`` (x) and ``object`` (y).

``digit_lookup`` (mask ``digit_lookup``): text ``"{key}:{value} "``, prompt ``"{key}:"``, answer
``"{value}"``; distinct keys, values drawn independently. ``train``: each of ``num_pairs`` pairs
once; ``test_known``: ``test_size`` trained pairs (``known: true``); ``test_novel``: ``test_size``
keys never trained with random values, a control (``known: false``). Rows carry ``pair_id``.

``two_hop`` (mask ``digit_lookup``): chains ``A -> B -> C`` of distinct entities. ``train``: every
one-hop fact ``"{A}:{B} "`` and ``"{B}:{C} "`` (``hops: 1``, ``fact: first`` / ``second``) and, for
``known_fraction`` of the chains (rounded), the two-hop fact ``"{A}::{C} "`` (``hops: 2``,
``fact: direct``; the double colon means two hops), shuffled. ``test_known``: prompt ``"{A}::"``,
answer ``"{C}"``, text ``"{A}::{C} "`` for the chains whose direct fact was trained;
``test_novel``: the same for the others. Rows carry ``chain_id`` and ``hops``.

``hashhop`` (mask ``hashhop``): hashes of ``hash_length`` ASCII letters (upper and lower case,
like ``KmNp``), distinct; ``num_chains`` chains ``A0 -> A1 -> ... -> A{max_hops}``.

- One-hop fact (``train``): text ``"{Ai} = '{Ai+1}'"``, prompt ``"{Ai} = '"``, answer ``"{Ai+1}"``
  (``hops: 1``, ``cot: false``, ``link: i``), every link of every chain, shuffled.
- ``test``: for every chain and hop count k in 1..max_hops, two rows (``target`` is ``Ak``):

  - chain of thought (``cot: true``): text ``"hops={k} cot=1 {A0} = '{A1}' = '{A2}' ... = '{Ak}'"``,
    prompt ``"hops={k} cot=1 {A0} = '"``, answer ``"{A1}' = '{A2}' ... = '{Ak}"`` (the whole
    chain of thought, without the closing quote);
  - direct (``cot: false``): text ``"hops={k} cot=0 {A0} = '{Ak}'"``, prompt
    ``"hops={k} cot=0 {A0} = '"``, answer ``"{Ak}"``.

- ``train_multihop: true`` adds a separate set of ``num_chains`` chains to ``train``: their links
  and their multi-hop rows (both kinds, every k), in the formats of ``test``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import string
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..data.textio import read_lines
from ..errors import LensbenchError, did_you_mean
from ..hookspecs import hookimpl
from .masks import Span, get_mask

ENTITY_LOW, ENTITY_HIGH = 100000, 999999
ENTITY_COUNT = ENTITY_HIGH - ENTITY_LOW + 1
MANIFEST = "dataset.json"
#: Written before a folder's splits and removed after its manifest: a folder holding it and no
#: manifest is lensbench's own write, interrupted, and is written again.
WRITING = "dataset.json.writing"

Splits = dict[str, list[dict]]


def entities(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct 6-digit numbers as strings, in random order."""
    return [str(v) for v in rng.sample(range(ENTITY_LOW, ENTITY_HIGH + 1), n)]


def _need_entities(n: int, what: str, field: str) -> None:
    if n > ENTITY_COUNT:
        raise LensbenchError(f"{what} need {n} distinct 6-digit entities, more than the {ENTITY_COUNT} there are; "
                             f"lower it", field)


class SyntheticDataset:
    """A generator of one synthetic dataset, registered under ``name``.

    Subclasses set ``name``, ``description``, ``mask`` (the default answer-mask type of
    ``lensbench.synthetic.masks``), ``splits`` (the split names ``generate`` returns), ``version``
    (change it whenever an edit changes the rows ``generate`` returns: cached rows of another
    version are never reused) and an ``Options`` dataclass, and implement ``check`` (ranges) and
    ``generate``; ``answer_spans`` says where a row's answer is when the mask types cannot.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    mask: ClassVar[str] = "none"
    splits: ClassVar[tuple[str, ...]] = ()
    version: ClassVar[str] = "1"

    @dataclass
    class Options:
        """No options."""

    def options(self, raw: dict | Any | None, field: str) -> Any:
        """Validated ``Options`` from a config mapping (or an ``Options``); ``field`` is its config
        path (``data.init_args.options``). Unknown names, wrong types and out-of-range values raise
        ``LensbenchError`` naming ``field.<option>``."""
        if raw is None:
            raw = {}
        elif isinstance(raw, self.Options):
            raw = dataclasses.asdict(raw)
        if not isinstance(raw, dict):
            raise LensbenchError(f"options must be a mapping of option names to values, got {raw!r}", field)
        known = [f.name for f in dataclasses.fields(self.Options)]
        hints = typing.get_type_hints(self.Options)
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                raise LensbenchError(f"{self.name} has no option {key!r}; {did_you_mean(str(key), known)}",
                                     f"{field}.{key}")
            values[key] = _coerce(value, hints[key], f"{field}.{key}")
        opts = self.Options(**values)
        self.check(opts, field)
        return opts

    def check(self, opts: Any, field: str) -> None:
        """Raise ``LensbenchError`` naming ``field.<option>`` for an out-of-range option."""

    def generate(self, seed: int, options: Any) -> Splits:
        """Split name -> rows, deterministic in ``seed`` and ``options`` (validated ones)."""
        raise NotImplementedError

    def answer_spans(self, row: dict, mask: str) -> list[Span]:
        """The character spans ``[(start, end), ...]`` (end exclusive) of ``row["text"]`` that are
        the answer: trained by ``lensbench fit`` and scored by memory_ablation. ``mask`` is the
        mask type in use (the config's ``mask``, else ``self.mask``). Default: that mask type's
        spans of the text; override it when rows say where their answer is in another way."""
        return get_mask(mask)(row["text"])

    answer_spans.default = True  # a subclass's own answer_spans lacks it: errors then name its hook

    def identity(self) -> str:
        """``module:qualname`` of the generator's class, recorded in (and checked against) a
        cache folder's manifest, so that two plugins' datasets of one name never share rows."""
        cls = type(self)
        return f"{cls.__module__}:{cls.__qualname__}"

    def __repr__(self) -> str:
        return f"<synthetic dataset {self.name!r}>"


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, field: str) -> Any:
    """``value`` checked against a simple annotation: int, float, bool, str, list[int]."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise LensbenchError(f"must be a list of {_type_name(item)}, got {value!r}", field)
        return [_coerce(v, item, field) for v in value]
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, True)
    if not ok:
        raise LensbenchError(f"must be {_type_name(hint)}, got {value!r}", field)
    return float(value) if hint is float else value


def _at_least(value: int, minimum: int, field: str) -> None:
    if value < minimum:
        raise LensbenchError(f"must be at least {minimum}, got {value}", field)


def _fraction(value: float, field: str, closed: bool = False) -> None:
    if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        interval = "[0, 1]" if closed else "[0, 1)"
        raise LensbenchError(f"must be a fraction in {interval}, got {value}", field)


def _choice(value: str, choices: tuple[str, ...], field: str) -> None:
    if value not in choices:
        raise LensbenchError(f"unknown value {value!r}; {did_you_mean(value, list(choices))}", field)


# --- synthetic_qa -------------------------------------------------------------------------------------


class SyntheticQA(SyntheticDataset):
    """Entity pairs seen a controlled number of times (exposure buckets), some never trained."""

    name = "synthetic_qa"
    version = "1"
    description = "6-digit entity pairs in exposure buckets (1..128 repetitions), 10% held out per bucket"
    mask = "qa"
    splits = ("train", "val", "test")
    formats = ("pair", "question")

    @dataclass
    class Options:
        num_pairs: int = 10000
        """Number of entity pairs, spread evenly over the buckets (the remainder to the first ones)."""
        buckets: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])
        """Exposure buckets: a trained pair of bucket b appears b times in train."""
        heldout_fraction: float = 0.1
        """Fraction of each bucket's pairs (rounded down) never trained."""
        val_per_bucket: int = 20
        """Trained pairs, and held-out pairs, sampled per bucket into val."""
        format: str = "pair"
        """``pair`` (``"{x}:{y} "``) or ``question`` (``"What is paired with {x}? {y}"``)."""

    def check(self, opts: Options, field: str) -> None:
        _at_least(opts.num_pairs, 1, f"{field}.num_pairs")
        if not opts.buckets:
            raise LensbenchError("must list at least one exposure bucket", f"{field}.buckets")
        for b in opts.buckets:
            if b < 1:
                raise LensbenchError(f"buckets must be positive integers, got {b}", f"{field}.buckets")
        if len(set(opts.buckets)) != len(opts.buckets):
            raise LensbenchError(f"buckets must be distinct, got {opts.buckets}", f"{field}.buckets")
        if opts.num_pairs < len(opts.buckets):
            raise LensbenchError(f"must be at least the number of buckets ({len(opts.buckets)}), got "
                                 f"{opts.num_pairs}", f"{field}.num_pairs")
        _fraction(opts.heldout_fraction, f"{field}.heldout_fraction")
        _at_least(opts.val_per_bucket, 0, f"{field}.val_per_bucket")
        _choice(opts.format, self.formats, f"{field}.format")
        _need_entities(2 * opts.num_pairs, f"{opts.num_pairs} pairs", f"{field}.num_pairs")

    @staticmethod
    def render(x: str, y: str, fmt: str) -> dict[str, str]:
        """``text``, ``prompt`` and ``answer`` of the pair ``(x, y)`` in format ``fmt``."""
        if fmt == "question":
            prompt = f"What is paired with {x}?"
            return {"text": f"{prompt} {y}", "prompt": prompt, "answer": y}
        return {"text": f"{x}:{y} ", "prompt": f"{x}:", "answer": y}

    def generate(self, seed: int, options: Options) -> Splits:
        rng = random.Random(seed)
        nb = len(options.buckets)
        sizes = [options.num_pairs // nb + (1 if i < options.num_pairs % nb else 0) for i in range(nb)]
        ents = entities(rng, 2 * options.num_pairs)
        train: list[dict] = []
        val: list[dict] = []
        test: list[dict] = []
        pair_id = 0
        for bucket, size in zip(options.buckets, sizes):
            held = int(size * options.heldout_fraction + 1e-9)
            rows = []
            for i in range(size):
                x, y = ents[2 * pair_id], ents[2 * pair_id + 1]
                split = "heldout" if i < held else "seen"
                rows.append({**self.render(x, y, options.format), "pair_id": pair_id, "bucket": bucket,
                             "split": split, "subject": x, "object": y})
                pair_id += 1
            seen = [r for r in rows if r["split"] == "seen"]
            heldout = [r for r in rows if r["split"] == "heldout"]
            for row in seen:
                train.extend(dict(row) for _ in range(bucket))
            val.extend(dict(r) for r in rng.sample(seen, min(options.val_per_bucket, len(seen))))
            val.extend(dict(r) for r in rng.sample(heldout, min(options.val_per_bucket, len(heldout))))
            test.extend(rows)
        rng.shuffle(train)
        return {"train": train, "val": val, "test": test}


# --- digit_lookup -------------------------------------------------------------------------------------


class DigitLookup(SyntheticDataset):
    """Random 6-digit key -> value pairs, each seen once; novel keys as a control."""

    name = "digit_lookup"
    version = "1"
    description = "Random 6-digit key:value pairs, each trained once, with known and novel test keys"
    mask = "digit_lookup"
    splits = ("train", "test_known", "test_novel")

    @dataclass
    class Options:
        num_pairs: int = 6000
        """Number of trained key:value pairs (6000, 20000, 200000, ...)."""
        test_size: int = 1000
        """Rows in each test split (test_known is capped at num_pairs)."""

    def check(self, opts: Options, field: str) -> None:
        _at_least(opts.num_pairs, 1, f"{field}.num_pairs")
        _at_least(opts.test_size, 1, f"{field}.test_size")
        _need_entities(opts.num_pairs + opts.test_size, f"{opts.num_pairs} pairs and {opts.test_size} novel keys",
                       f"{field}.num_pairs")

    def generate(self, seed: int, options: Options) -> Splits:
        rng = random.Random(seed)
        n, m = options.num_pairs, options.test_size
        keys = entities(rng, n + m)
        values = [str(rng.randint(ENTITY_LOW, ENTITY_HIGH)) for _ in range(n + m)]

        def row(i: int, known: bool) -> dict:
            key, value = keys[i], values[i]
            return {"text": f"{key}:{value} ", "prompt": f"{key}:", "answer": value, "pair_id": i, "known": known}

        train = [row(i, True) for i in range(n)]
        test_known = [dict(train[i]) for i in sorted(rng.sample(range(n), min(m, n)))]
        test_novel = [row(n + j, False) for j in range(m)]
        return {"train": train, "test_known": test_known, "test_novel": test_novel}


# --- two_hop ------------------------------------------------------------------------------------------


class TwoHop(SyntheticDataset):
    """Chains A -> B -> C: one-hop facts always trained, the direct two-hop fact for some chains."""

    name = "two_hop"
    version = "1"
    description = "Chains A:B, B:C of 6-digit entities; the two-hop fact A::C trained for half of them"
    mask = "digit_lookup"
    splits = ("train", "test_known", "test_novel")

    @dataclass
    class Options:
        num_chains: int = 2000
        """Number of chains A -> B -> C."""
        known_fraction: float = 0.5
        """Fraction of the chains (rounded) whose direct two-hop fact ``A::C`` is trained."""

    def check(self, opts: Options, field: str) -> None:
        _at_least(opts.num_chains, 1, f"{field}.num_chains")
        _fraction(opts.known_fraction, f"{field}.known_fraction", closed=True)
        _need_entities(3 * opts.num_chains, f"{opts.num_chains} chains", f"{field}.num_chains")

    def generate(self, seed: int, options: Options) -> Splits:
        rng = random.Random(seed)
        n = options.num_chains
        ents = entities(rng, 3 * n)
        known = set(rng.sample(range(n), round(n * options.known_fraction)))
        train: list[dict] = []
        test_known: list[dict] = []
        test_novel: list[dict] = []
        for c in range(n):
            a, b, z = ents[3 * c: 3 * c + 3]
            train.append({"text": f"{a}:{b} ", "prompt": f"{a}:", "answer": b, "chain_id": c, "hops": 1,
                          "fact": "first"})
            train.append({"text": f"{b}:{z} ", "prompt": f"{b}:", "answer": z, "chain_id": c, "hops": 1,
                          "fact": "second"})
            direct = {"text": f"{a}::{z} ", "prompt": f"{a}::", "answer": z, "chain_id": c, "hops": 2}
            if c in known:
                train.append({**direct, "fact": "direct"})
                test_known.append({**direct, "known": True})
            else:
                test_novel.append({**direct, "known": False})
        rng.shuffle(train)
        return {"train": train, "test_known": test_known, "test_novel": test_novel}


# --- hashhop ------------------------------------------------------------------------------------------

LETTERS = string.ascii_letters


class HashHop(SyntheticDataset):
    """Chains of random letter hashes: links trained, multi-hop lookups evaluated with and without
    chain of thought."""

    name = "hashhop"
    version = "1"
    description = "Chains of random letter hashes (KmNp = 'QrSt'), k-hop lookups with and without chain of thought"
    mask = "hashhop"
    splits = ("train", "test")

    @dataclass
    class Options:
        num_chains: int = 1000
        """Number of evaluated chains."""
        max_hops: int = 4
        """Links per chain; test asks every hop count 1..max_hops."""
        hash_length: int = 4
        """Letters per hash."""
        train_multihop: bool = False
        """Also train the multi-hop rows of a separate set of num_chains chains."""

    def check(self, opts: Options, field: str) -> None:
        _at_least(opts.num_chains, 1, f"{field}.num_chains")
        _at_least(opts.max_hops, 1, f"{field}.max_hops")
        _at_least(opts.hash_length, 1, f"{field}.hash_length")
        needed = self._needed(opts)
        if needed > len(LETTERS) ** opts.hash_length:
            raise LensbenchError(f"{needed} distinct hashes of {opts.hash_length} letters are needed, more than the "
                                 f"{len(LETTERS) ** opts.hash_length} there are; raise hash_length",
                                 f"{field}.hash_length")

    @staticmethod
    def _needed(opts: Options) -> int:
        return opts.num_chains * (opts.max_hops + 1) * (2 if opts.train_multihop else 1)

    @staticmethod
    def hashes(rng: random.Random, n: int, length: int) -> list[str]:
        """``n`` distinct strings of ``length`` random ASCII letters."""
        capacity = len(LETTERS) ** length
        if n > capacity // 2:  # dense: sample indices, then spell them in base 52
            out = []
            for index in rng.sample(range(capacity), n):
                chars = []
                for _ in range(length):
                    index, digit = divmod(index, len(LETTERS))
                    chars.append(LETTERS[digit])
                out.append("".join(chars))
            return out
        seen: set[str] = set()
        out = []
        while len(out) < n:
            h = "".join(rng.choice(LETTERS) for _ in range(length))
            if h not in seen:
                seen.add(h)
                out.append(h)
        return out

    @staticmethod
    def link(chain: list[str], i: int, chain_id: int) -> dict:
        """The one-hop fact ``chain[i] -> chain[i + 1]``."""
        a, b = chain[i], chain[i + 1]
        return {"text": f"{a} = '{b}'", "prompt": f"{a} = '", "answer": b, "chain_id": chain_id, "hops": 1,
                "cot": False, "link": i, "target": b}

    @staticmethod
    def multihop(chain: list[str], k: int, cot: bool, chain_id: int) -> dict:
        """The k-hop lookup from ``chain[0]``, with or without chain of thought."""
        prompt = f"hops={k} cot={int(cot)} {chain[0]} = '"
        answer = "' = '".join(chain[1: k + 1]) if cot else chain[k]
        return {"text": f"{prompt}{answer}'", "prompt": prompt, "answer": answer, "chain_id": chain_id, "hops": k,
                "cot": cot, "target": chain[k]}

    def generate(self, seed: int, options: Options) -> Splits:
        rng = random.Random(seed)
        n, h = options.num_chains, options.max_hops
        pool = self.hashes(rng, self._needed(options), options.hash_length)
        chains = [pool[c * (h + 1): (c + 1) * (h + 1)] for c in range(len(pool) // (h + 1))]
        train = [self.link(chains[c], i, c) for c in range(len(chains)) for i in range(h)]
        test = [self.multihop(chains[c], k, cot, c) for c in range(n) for k in range(1, h + 1) for cot in (True, False)]
        if options.train_multihop:
            train += [self.multihop(chains[c], k, cot, c) for c in range(n, 2 * n) for k in range(1, h + 1)
                      for cot in (True, False)]
        rng.shuffle(train)
        return {"train": train, "test": test}


# --- files --------------------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_splits(splits: Splits, folder: str | Path, manifest: dict | None = None) -> Path:
    """Write ``<folder>/<split>.jsonl`` for every split, then ``<folder>/dataset.json``.

    Each file is written to a temporary name and renamed into place, and the manifest (``manifest``
    such as ``{name, seed, options}`` plus ``counts``: split -> rows) comes last, so a folder with a
    manifest always holds complete splits. Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / WRITING, "")
    for split, rows in splits.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        _write_atomic(folder / f"{split}.jsonl", text)
    info = {**(manifest or {}), "counts": {split: len(rows) for split, rows in splits.items()}}
    _write_atomic(folder / MANIFEST, json.dumps(info, indent=2) + "\n")
    (folder / WRITING).unlink(missing_ok=True)  # another rank writing the same rows may have taken it
    return folder


def read_manifest(folder: str | Path, field: str | None = None) -> dict | None:
    """The manifest of ``folder``, or None when it has none."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LensbenchError(f"{path} is not valid JSON (line {exc.lineno}); delete the folder to regenerate it",
                             field) from None
    if not isinstance(info, dict) or not isinstance(info.get("counts"), dict):
        raise LensbenchError(f"{path} is not a synthetic-dataset manifest; delete the folder or choose another",
                             field)
    return info


def read_splits(folder: str | Path, field: str | None = None) -> Splits:
    """The splits written by ``write_splits``: the manifest's splits, else every ``*.jsonl`` file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LensbenchError(f"{folder} is not a folder of synthetic splits; generate it first or fix the path",
                             field)
    info = read_manifest(folder, field)
    names = list(info["counts"]) if info else sorted(p.stem for p in folder.glob("*.jsonl"))
    if not names:
        raise LensbenchError(f"{folder} holds no .jsonl splits; generate the dataset first or fix the path", field)
    splits: Splits = {}
    for name in names:
        path = folder / f"{name}.jsonl"
        lines = read_lines(path, field, "delete the folder to regenerate it")
        rows = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise LensbenchError(f"{path}:{lineno} is not valid JSON; fix that line or delete the folder to "
                                     f"regenerate it", field) from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise LensbenchError(f"{path}:{lineno} has no string 'text' field; delete the folder to regenerate "
                                     f"it", field)
            rows.append(row)
        if info and len(rows) != info["counts"][name]:
            raise LensbenchError(f"{path} holds {len(rows)} rows but the manifest says {info['counts'][name]}; "
                                 f"delete the folder to regenerate it", field)
        splits[name] = rows
    return splits


def materialize(name: str, seed: int, options: dict | Any | None, folder: str | Path, registry: Any,
                field: str = "data.init_args", folder_field: str | None = None) -> Splits:
    """The splits of dataset ``name`` for ``seed`` and ``options``, cached in ``folder``.

    Generates and writes them when ``folder`` has no manifest; reads them back, without
    generating, when the manifest matches: same name, seed and validated options, same generator
    ``version`` and class (``identity()``). A manifest written before these two were recorded
    counts as version ``"1"`` of whichever class has the name. Any difference raises
    ``LensbenchError`` naming ``folder_field`` (default ``<field>.folder``), and nothing in the
    folder is changed. ``registry`` is the synthetic-dataset registry (``Registries.synthetic_datasets``);
    ``field`` is the config path of the block holding ``name``, ``seed`` and ``options``.
    """
    dataset: SyntheticDataset = registry.get(name, f"{field}.name")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise LensbenchError(f"seed must be an integer, got {seed!r}", f"{field}.seed")
    opts = dataset.options(options, f"{field}.options")
    folder_field = folder_field or f"{field}.folder"
    wanted = {"name": name, "seed": seed, "options": json.loads(json.dumps(dataclasses.asdict(opts)))}
    made_by = {"version": str(dataset.version), "generator": dataset.identity()}
    folder = Path(folder)
    info = read_manifest(folder, folder_field)
    if info is None:
        theirs = sorted(p.name for p in folder.glob("*.jsonl")) if not (folder / WRITING).exists() else []
        if theirs:  # rows lensbench did not write: never overwritten
            raise LensbenchError(f"{folder} holds {', '.join(theirs[:3])}{' ...' if len(theirs) > 3 else ''} but no "
                                 f"{MANIFEST}, so its rows are not a generated {name} dataset and would be "
                                 f"overwritten; choose an empty or new folder (or read these files with `{field}.path`)",
                                 folder_field)
        splits = dataset.generate(seed, opts)
        write_splits(splits, folder, {**wanted, **made_by, "mask": dataset.mask})
        return splits
    differ = [f"{key} ({info.get(key)!r} there, {value!r} asked)" for key, value in wanted.items()
              if info.get(key) != value]
    if differ:
        raise LensbenchError(f"{folder} already holds another synthetic dataset, differing in "
                             f"{'; '.join(differ)}; delete the folder or choose another", folder_field)
    there = {"version": "1", "generator": made_by["generator"], **info}  # a manifest from before versions
    if there["generator"] != made_by["generator"]:
        raise LensbenchError(f"{folder} holds rows of another generator named {name!r} ({there['generator']}, not "
                             f"{made_by['generator']}); delete the folder or choose another", folder_field)
    if str(there["version"]) != made_by["version"]:
        raise LensbenchError(f"{folder} holds rows of {name} version {there['version']!r}, but its generator is now "
                             f"version {made_by['version']!r}; delete the folder to regenerate them, or choose "
                             f"another folder", folder_field)
    return read_splits(folder, folder_field)


#: Row fields that form accuracy groups (``group_of``), in the order they appear in a group's name.
GROUP_FIELDS = ("bucket", "hops", "cot", "known", "split")


def group_of(row: Any) -> str:
    """The accuracy group of a row (a dict or a pandas row): ``bucket=4/seen``, ``hops=2/test_novel``
    and the like, from the ``GROUP_FIELDS`` it carries; ``all`` when it carries none."""
    parts = []
    for key in GROUP_FIELDS:
        value = row.get(key)
        if value is None or value != value:  # missing, or NaN in a table
            continue
        if key == "split":
            parts.append(str(value))
        else:
            parts.append(f"{key}={int(value) if key == 'bucket' else value}")
    return "/".join(parts) or "all"


def load_dataset(dataset: str | None, options: dict | None, seed: int, path: str | None, data_dir: str | None,
                 field: str, mask: str | None = None, *, registry: Any) -> tuple[Splits, str]:
    """The splits of a registered synthetic dataset (generated once into ``data_dir``, default
    ``default_folder``) or of a folder of JSONL splits (``path``), and the answer mask they train
    with: ``mask`` when given, else the dataset's (a folder's: its manifest's ``mask``, else
    ``none``); for a registered dataset it is a ``DatasetMask`` bound to the generator, so its
    ``answer_spans`` picks the trained characters. Exactly one of ``dataset`` and ``path`` is
    given. ``field`` is the config block's path; ``registry`` the synthetic-dataset registry
    (``Registries.synthetic_datasets``)."""
    from .masks import DatasetMask

    if (dataset is None) == (path is None):
        raise LensbenchError("give either dataset (a registered name) or path (a folder of JSONL splits), not "
                             f"{'both' if dataset else 'neither'}", f"{field}.dataset")
    if path is not None:
        manifest = read_manifest(Path(path), f"{field}.path") or {}
        return read_splits(Path(path), f"{field}.path"), mask or manifest.get("mask", "none")
    generator = registry.get(dataset, f"{field}.dataset")
    folder = Path(data_dir) if data_dir else default_folder(dataset, seed, options, generator)
    splits = materialize(dataset, seed, options, folder, registry, field, f"{field}.data_dir")
    return splits, DatasetMask(mask or generator.mask, generator)


def default_folder(name: str, seed: int, options: dict | None, generator: SyntheticDataset) -> Path:
    """Where a generated dataset goes unless a config says: ``outputs/datasets/<name>-seed<seed>-<hash>``
    (relative to the working folder), shared by training and analyses. The hash covers the options
    as given, the generator's ``version`` and its class (``identity()``), so a generator whose
    version changed writes a new folder. ``generator`` is the registered dataset ``name``."""
    import hashlib

    key = {"options": options or {}, "version": str(generator.version), "generator": generator.identity()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return Path("outputs") / "datasets" / f"{name}-seed{seed}-{digest}"


@hookimpl
def lensbench_register_synthetic_datasets() -> list[SyntheticDataset]:
    return [SyntheticQA(), DigitLookup(), TwoHop(), HashHop()]
