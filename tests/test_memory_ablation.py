"""memory_ablation on a memory model trained inside the test: its evaluation agrees with training's,
interventions change what they should (masking the slots a pair reads lowers its answer's
probability, zeroed values cost accuracy, swapping the values of the slots two pairs read swaps
their answers), two processes equal one, and bad input is one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lensbench.cli import main

DATA = {"dataset": "synthetic_qa", "options": {"num_pairs": 32, "buckets": [4, 16], "heldout_fraction": 0.125},
        "seed": 0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """32 pairs (2 held out per bucket), memory at layer 1 and a 4-neuron MLP in layer 0, so the
    answers must come from the memory; a few seconds on a CPU."""
    folder = tmp_path_factory.mktemp("memory_run")
    config = {
        "model": {"tokenizer": "chars", "lr": 0.003, "warmup_steps": 10, "decay": "constant", "save_every": 1000,
                  "track_memory_every": 0,
                  "config": {"model_type": "memory_llama", "hidden_size": 32, "intermediate_size": 4,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "memory_layers": [1], "memory_n_keys": 16, "memory_heads": 2, "memory_topk": 4,
                             "memory_k_dim": 32, "max_position_embeddings": 32}},
        "data": {**DATA, "max_length": 16, "batch_size": 32, "val_split": None},
        "trainer": {"max_steps": 400, "accelerator": "cpu", "enable_progress_bar": False},
    }
    (folder / "train.yaml").write_text(yaml.safe_dump(config))
    run(folder, ["fit", "--config", "train.yaml"])
    return folder


def run(folder: Path, args: list[str]) -> int:
    import os

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        code = main(args)
    finally:
        os.chdir(cwd)
    assert code == 0
    return code


def analysis(folder: Path, name: str, interventions: list | None = None, **model) -> Path:
    config = {"model": {"class_path": "memory_ablation",
                        "init_args": {"model": "outputs/fit/train", "interventions": interventions or [],
                                      "experiment": name, **model}},
              "data": {"class_path": "lensbench.data.answers.AnswerDataModule",
                       "init_args": {**DATA, "splits": ["test"], "batch_size": 8}},
              "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return folder / f"{name}.yaml"


def test_evaluation_agrees_with_training_and_records_the_slots_read(trained):
    run(trained, ["predict", "--config", str(analysis(trained, "eval"))])
    out = trained / "outputs" / "eval"
    acc = pd.read_csv(out / "accuracy.csv")
    base = acc[acc.intervention == "baseline"].set_index("group")["exact_match"]
    fit = pd.read_csv(trained / "outputs/fit/train/exact_match.csv").set_index("group")["exact_match"]
    assert base.sort_index().round(6).to_dict() == fit.sort_index().round(6).to_dict()  # two implementations agree
    assert base["bucket=16/seen"] >= 0.9 and base["bucket=16/heldout"] == 0.0
    examples = pd.read_csv(out / "examples.csv")
    assert len(examples) == 32 and set(examples.columns) >= {"answer", "prediction", "exact", "digit_accuracy",
                                                            "answer_prob", "answer_rank", "answer_entropy"}
    right = examples[examples.exact]
    assert (right.prediction.astype(str).str.strip() == right.answer.astype(str)).all()
    assert (right.answer_rank == 0).all() and (right.digit_accuracy == 1).all()
    activations = [json.loads(line) for line in (out / "key_activations.jsonl").open()]
    assert len(activations) == 32
    first = activations[0]
    n_answer = len(first["token_right"])
    assert len(first["slots"]["1"]) == n_answer and all(len(s) == 2 * 4 for s in first["slots"]["1"])
    assert all(abs(sum(w[:4]) - 1) < 1e-3 for w in first["weights"]["1"])  # softmax per head
    usage = pd.read_csv(out / "slot_usage.csv")
    assert usage["count"].sum() == sum(len(a["slots"]["1"]) * 8 for a in activations)
    summary = pd.read_csv(out / "memory_summary.csv")
    assert summary.loc[0, "slots"] == 256 and summary.loc[0, "used"] == usage.slot.nunique()
    assert len(pd.read_csv(out / "value_norms.csv")) == 256


def test_masking_what_a_pair_reads_lowers_its_answer_and_zeroed_values_cost_accuracy(trained):
    if not (trained / "outputs" / "eval").exists():
        run(trained, ["predict", "--config", str(analysis(trained, "eval"))])
    activations = [json.loads(line) for line in (trained / "outputs/eval/key_activations.jsonl").open()]
    target = next(a for a in activations if a["exact"] and a["split"] == "seen")
    read = sorted({s for row in target["slots"]["1"] for s in row})
    interventions = [
        {"name": "mask_pair", "transform": "mask_memory_keys", "params": {"layer": 1}, "vary": "slots", "values": [read]},
        {"name": "values", "transform": "ablate_memory", "params": {"layer": 1, "part": "values"}},
        {"name": "swap", "transform": "swap_memory_values", "params": {"layer": 1}, "top": {"n": 3}},
    ]
    run(trained, ["predict", "--config", str(analysis(trained, "ablate", interventions))])
    out = trained / "outputs" / "ablate"
    examples = pd.read_csv(out / "examples.csv", keep_default_na=False)
    masked = examples[(examples.intervention == "mask_pair") & (examples["index"] == target["index"])]
    before = examples[(examples.intervention == "baseline") & (examples["index"] == target["index"])]
    # the masked slots are never read again: the pair's answer loses probability (in a memory this
    # small the next-best slots, shared with other pairs, may still carry it)
    assert masked.answer_prob.iloc[0] < before.answer_prob.iloc[0] - 0.05
    acc = pd.read_csv(out / "accuracy.csv", keep_default_na=False)
    zeroed = acc[(acc.intervention == "values") & (acc.group == "bucket=16/seen")]
    assert zeroed.exact_drop.iloc[0] > 0.3
    assert (acc[acc.intervention == "baseline"].exact_drop == 0).all()
    matrix = pd.read_csv(out / "impact_matrix.csv", keep_default_na=False)
    assert sorted(matrix.intervention) == ["mask_pair", "values"]  # swaps are not impacts
    swaps = pd.read_csv(out / "swap_matrix.csv")
    assert len(swaps) == 3 and set(swaps.columns) == {"intervention", "a", "b", "changed", "follow", "follow_share"}
    position = pd.read_csv(out / "position_impact.csv", keep_default_na=False)
    assert set(position.intervention) == {"baseline", "mask_pair", "values", "swap"}
    assert (out / "impact_matrix.png").is_file() and (out / "accuracy_by_bucket.png").is_file()


def test_two_processes_equal_one(trained):
    from conftest import clean_env, lensbench

    interventions = [{"name": "random", "transform": "mask_memory_keys", "params": {"layer": 1}, "vary": "slots",
                      "random": {"size": 8, "count": 3, "seed": 1}}]
    one = analysis(trained, "one", interventions)
    two = analysis(trained, "two", interventions)
    assert lensbench("predict", "--config", str(one), cwd=trained, env=clean_env()).returncode == 0
    result = lensbench("predict", "--config", str(two), "--trainer.devices", "2", "--trainer.strategy", "ddp",
                       cwd=trained, env=clean_env())
    assert result.returncode == 0, result.stderr[-2000:]
    a = pd.read_csv(trained / "outputs/one/accuracy.csv")
    b = pd.read_csv(trained / "outputs/two/accuracy.csv")
    pd.testing.assert_frame_equal(a, b)
    assert len(list((trained / "outputs/two/shards").iterdir())) == 2


@pytest.mark.parametrize("intervention,fragment", [
    ({"transform": "mask_memory_keys", "params": {"layer": 1}, "vary": "slots", "values": [[256]]},
     "slot 256 is out of range; this memory has slots 0..255"),
    ({"transform": "ablate_memory_values", "params": {"layer": 0}, "vary": "slots", "values": [[1]]},
     "layer 0 is not a memory layer"),
    ({"transform": "swap_memory_keys", "params": {"layer": 1}, "vary": "pair", "values": [[0, 16]]},
     "row 16 is out of range"),
    ({"transform": "mask_memory_keys", "params": {"layer": 1}, "top": {"n": 4, "group": "bucket=5/seen"}},
     "no row is in group 'bucket=5/seen'"),
    ({"transform": "mask_memory_keyz", "params": {"layer": 1}}, "did you mean 'mask_memory_keys'"),
])
def test_bad_interventions_are_one_line_before_work(trained, capsys, intervention, fragment):
    import os

    config = analysis(trained, "bad", [intervention])
    cwd = os.getcwd()
    os.chdir(trained)
    try:
        code = main(["predict", "--config", str(config)])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and fragment in err[0], err
    assert not (trained / "outputs/bad/shards").exists() or not any((trained / "outputs/bad/shards").iterdir())


def test_a_dataset_without_answers_is_refused(tmp_path, capsys):
    from lensbench.data.answers import AnswerDataModule
    from lensbench.errors import LensbenchError

    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "just text"}) + "\n")
    with pytest.raises(LensbenchError, match="has no prompt and answer"):
        AnswerDataModule(dataset=None, path=str(tmp_path))


def test_facts_take_their_last_word_as_the_answer(tmp_path):
    from lensbench.data.answers import AnswerDataModule
    from lensbench.synthetic.masks import last_word_spans

    (tmp_path / "facts.txt").write_text("The capital of France is Paris.\nWater boils at 100 degrees.\n")
    data = AnswerDataModule(dataset=None, facts=str(tmp_path / "facts.txt"))
    assert data.mask == "last_word"
    rows = data.rows["facts"]
    assert [(r["prompt"], r["answer"]) for r in rows] == [("The capital of France is ", "Paris"),
                                                         ("Water boils at 100 ", "degrees")]
    assert last_word_spans("It is Nairobi!  ") == [(6, 13)] and last_word_spans("...") == []
    with pytest.raises(Exception, match="give one of dataset"):
        AnswerDataModule(facts=str(tmp_path / "facts.txt"))  # dataset keeps its default: two sources


def test_a_killed_sweep_resumes_to_the_uninterrupted_result(trained):
    from conftest import clean_env, lensbench
    from helpers_cli import sigkill_when_stored

    sweep = [{"name": "slot", "transform": "ablate_memory_values", "params": {"layer": 1}, "vary": "slots",
              "every": True, "limit": 120}]
    for name in ("whole", "killed"):
        analysis(trained, name, sweep)
    assert lensbench("predict", "--config", "whole.yaml", cwd=trained, env=clean_env()).returncode == 0
    run_dir = trained / "outputs" / "killed"
    shard = run_dir / "shards" / "rank00000.jsonl"
    stored = sigkill_when_stored(["predict", "--config", "killed.yaml"], trained, shard, 40)
    assert 40 <= stored < 121 * 4, "the kill must land mid-sweep"
    assert not (run_dir / "accuracy.csv").exists()
    resumed = lensbench("predict", "--config", "killed.yaml", cwd=trained, env=clean_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    keys = [json.loads(line)["key"] for line in shard.read_text().splitlines() if line.strip()]
    assert len(keys) == len(set(keys)) == 121 * 4  # nothing recomputed twice, nothing missing
    for table in ("accuracy.csv", "impact_matrix.csv", "slot_usage.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(run_dir / table), pd.read_csv(trained / "outputs/whole" / table))


SWAP_PAIRS = {"num_pairs": 32, "buckets": [1], "heldout_fraction": 0.0}


@pytest.fixture(scope="module")
def memory_only(tmp_path_factory) -> Path:
    """A memory model whose answers can live only in its memory: the fixture ``trained`` stores
    much of each answer outside the memory (with the memory output zeroed it still gets the first
    answer digit of 21 of 27 pairs, and the whole memory output of another pair moves a prediction
    only a third of the time), so value swaps seldom move its answers (swapping two pairs' dominant
    slots swapped their first answer digits for 2 of 277 pairs). Here every parameter but
    the memory's (query, keys, values) and the unembedding stays at its random initialisation
    (seed 0): the subject reaches the memory as random features, and only the memory can store the
    32 synthetic_qa pairs it memorises (800 full-batch AdamW steps, a few seconds on a CPU)."""
    import torch

    from lensbench.memory import MemoryLlamaConfig, MemoryLlamaForCausalLM
    from lensbench.synthetic.collate import PaddedCollator
    from lensbench.synthetic.datasets import SyntheticQA
    from lensbench.testing import char_tokenizer, save_char_tokenizer

    tokenizer = char_tokenizer()
    qa = SyntheticQA()
    rows = qa.generate(0, qa.options(SWAP_PAIRS, "data.options"))["test"]
    batch = PaddedCollator(tokenizer, "qa", 16)(rows)
    torch.manual_seed(0)
    config = MemoryLlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=4, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                               memory_layers=[1], memory_n_keys=16, memory_heads=1, memory_topk=4, memory_k_dim=32,
                               memory_query_norm=True, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = MemoryLlamaForCausalLM(config)
    decay = {"model.layers.1.memory.query.weight": 0.1, "lm_head.weight": 0.1,  # the trained parameters, with
             "model.layers.1.memory.keys": 0.0, "model.layers.1.memory.values": 0.0}  # lensbench fit's decay
    for name, param in model.named_parameters():
        param.requires_grad_(name in decay)
    named = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [named[n]], "weight_decay": wd} for n, wd in decay.items()], lr=0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small: threads only wait for each other
    try:
        for _ in range(800):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("models") / "memory_only"
    model.save_pretrained(folder)
    save_char_tokenizer(folder)
    return folder


def test_swapping_the_values_of_two_pairs_slots_swaps_their_answers(memory_only):
    """Two memorised pairs A and B with different first answer digits: the slots each reads where it
    predicts its first answer token (the prompt's last position), swapped slot for slot by rank
    (A's dominant slot with B's dominant slot, A's second with B's second, ...) through the
    registered ``swap_memory_values`` transform, one per slot pair, as one model state: A's first
    answer token becomes B's and B's becomes A's; restoring the state gives back the original
    logits bit for bit.

    Answers are 6 digits, one token each (chars tokenizer), so only the first answer token is
    checked: the later digits are predicted at other positions, which read other slots.
    The whole read set (topk = 4 slots) is swapped, not the dominant slot alone: in a memory this
    small the answer is spread over the slots read (the dominant slot carries 0.3 to 0.8 of the
    weight), and swapping the dominant slots alone moves both answers for only 161 of the 441
    eligible pairs. After the swap A reads B's values with A's weights, which gives B's memory
    output exactly when the weights agree; so the pair is the one whose read sets are disjoint and
    whose weights agree most (in this model the 80 closest of the 309 such pairs all swap, 262 of
    the 309 do; the chosen one by about 6.5 logits)."""
    import itertools

    import torch

    from lensbench.models.loading import ModelSpec
    from lensbench.plugins import build_registries, get_plugin_manager
    from lensbench.state import State, SubjectManager, TransformSpec
    from lensbench.synthetic.collate import PaddedCollator
    from lensbench.synthetic.datasets import SyntheticQA

    registry = build_registries(get_plugin_manager(load_installed=False)).perturbations
    manager = SubjectManager({"m": ModelSpec(str(memory_only))}, torch.device("cpu"), registry)
    loaded = manager.activate(State("m"))
    mem = loaded.model.get_submodule("model.layers.1.memory")
    qa = SyntheticQA()
    rows = qa.generate(0, qa.options(SWAP_PAIRS, "data.options"))["test"]
    batch = PaddedCollator(loaded.tokenizer, "qa", 16)(rows)
    target = batch["labels"][:, 1:]  # logits[:, p] predict token p + 1
    answer_pos = [(t != -100).nonzero().flatten() for t in target]
    first = torch.stack([p[0] for p in answer_pos])
    rows_ = torch.arange(len(rows))

    def forward(record: bool = False):
        mem.record = record
        try:
            with torch.no_grad():
                logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      use_cache=False).logits
            return logits, mem.last_slots, mem.last_weights
        finally:
            mem.record = False
            mem.last_slots = mem.last_weights = None

    base, slots, weights = forward(record=True)
    right = [b for b, p in enumerate(answer_pos) if torch.equal(base[b, p].argmax(-1), target[b, p])]
    assert len(right) >= 28, f"the model memorises the pairs ({len(right)} of 32 right)"
    truth = target[rows_, first]  # each pair's first answer token (its prediction, for the right ones)
    read = {b: slots[b, first[b]].reshape(-1).tolist() for b in right}  # [heads * topk], best first per head
    weight = {b: weights[b, first[b]].reshape(-1) for b in right}
    candidates = [(float((weight[a] - weight[b]).abs().sum()), a, b) for a, b in itertools.combinations(right, 2)
                  if truth[a] != truth[b] and not set(read[a]) & set(read[b])]
    assert candidates
    _, a, b = min(candidates)
    swap = State("m", tuple(TransformSpec("swap_memory_values", (("a", x), ("b", y), ("layer", 1)))
                            for x, y in zip(read[a], read[b])))
    clean = mem.values.detach().clone()
    manager.activate(swap)
    assert torch.equal(mem.values[read[a]], clean[read[b]]) and torch.equal(mem.values[read[b]], clean[read[a]])
    swapped = forward()[0]
    decode = loaded.tokenizer.decode
    got = {r: decode([int(swapped[r, first[r]].argmax())]) for r in (a, b)}
    summary = (f"pairs {a} ({rows[a]['answer']}) and {b} ({rows[b]['answer']}), slots {read[a]} and {read[b]}, "
               f"first answer tokens after the swap {got}")
    assert swapped[a, first[a]].argmax() == truth[b], summary
    assert swapped[b, first[b]].argmax() == truth[a], summary
    manager.activate(State("m"))
    restored = forward()[0]
    assert torch.equal(restored, base)
    assert restored[a, first[a]].argmax() == truth[a] and restored[b, first[b]].argmax() == truth[b]


def test_a_nan_memory_slot_is_counted_said_once_and_the_run_finishes(trained):
    """One value of one slot set to NaN in a copy of the trained checkpoint: exactly the answer
    positions that read the slot (the NaN run's own key_activations.jsonl says which) have NaN
    logits; each row counts them in n_nonfinite_positions, a group holding one has NaN metrics, the
    other groups and the state with every value zeroed keep theirs, the merge says so in one console
    line, and the figures are drawn. Records stored before the count (the field and the None
    entries of token_right absent) merge with the count unknown (NaN) and the same metrics."""
    import logging
    import math
    import shutil

    from safetensors.torch import load_file, save_file

    from lensbench.analyses.memory_ablation import MemoryAblation
    from lensbench.results import ResultStore

    if not (trained / "outputs" / "eval").exists():
        run(trained, ["predict", "--config", str(analysis(trained, "eval"))])
    clean = [json.loads(line) for line in (trained / "outputs/eval/key_activations.jsonl").open()]
    groups: dict[int, set] = {}
    reads: dict[int, int] = {}
    for a in clean:
        for s in {s for row in a["slots"]["1"] for s in row}:
            groups.setdefault(s, set()).add((a["split"], a["bucket"]))
            reads[s] = reads.get(s, 0) + 1
    slot = max((s for s in groups if len(groups[s]) < 4), key=lambda s: reads[s])  # a group left clean
    checkpoint = next((trained / "outputs/fit/train").glob("checkpoint-*"))
    shutil.rmtree(trained / "nanmodel", ignore_errors=True)
    shutil.copytree(checkpoint, trained / "nanmodel")
    weights = load_file(trained / "nanmodel" / "model.safetensors")
    weights["model.layers.1.memory.values"][slot, 0] = math.nan
    save_file(weights, trained / "nanmodel" / "model.safetensors", metadata={"format": "pt"})

    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    console = logging.getLogger("lightning.pytorch.lensbench")
    console.addHandler(handler)
    try:
        zeroed = [{"name": "values", "transform": "ablate_memory", "params": {"layer": 1, "part": "values"}}]
        run(trained, ["predict", "--config", str(analysis(trained, "nan", zeroed, model="nanmodel"))])
    finally:
        console.removeHandler(handler)
    out = trained / "outputs" / "nan"
    read = {a["index"]: sum(slot in row for row in a["slots"]["1"])
            for a in map(json.loads, (out / "key_activations.jsonl").open())}
    total = sum(read.values())
    assert 0 < sum(n > 0 for n in read.values()) < len(read), read

    examples = pd.read_csv(out / "examples.csv", keep_default_na=False, na_values=[""])
    base = examples[examples.intervention == "baseline"].set_index("index")
    assert base["n_nonfinite_positions"].to_dict() == read
    bad = base[base.n_nonfinite_positions > 0]
    assert bad[["exact", "answer_prob", "answer_rank", "answer_entropy", "digit_accuracy"]].isna().all().all()
    good = base[base.n_nonfinite_positions == 0]
    assert good[["exact", "answer_prob", "answer_rank", "digit_accuracy"]].notna().all().all()
    assert (examples[examples.intervention == "values"].n_nonfinite_positions == 0).all()

    acc = pd.read_csv(out / "accuracy.csv", keep_default_na=False, na_values=[""])
    per_group = base.groupby("group")["n_nonfinite_positions"].sum()
    baseline = acc[acc.intervention == "baseline"].set_index("group")
    assert baseline["n_nonfinite_positions"].to_dict() == per_group.to_dict()
    metrics = ["exact_match", "digit_accuracy", "answer_prob", "answer_rank", "answer_entropy"]
    assert baseline.loc[per_group > 0, metrics].isna().all().all()
    assert baseline.loc[per_group == 0, metrics].notna().all().all()
    clean_rows = good[good.group.isin(per_group[per_group == 0].index)]
    assert baseline.loc[per_group == 0, "exact_match"].to_dict() == pytest.approx(
        clean_rows["exact"].astype(float).groupby(clean_rows["group"]).mean().to_dict())
    values = acc[acc.intervention == "values"].set_index("group")
    assert (values.n_nonfinite_positions == 0).all() and values[metrics].notna().all().all()
    assert values.loc[per_group > 0, "exact_drop"].isna().all()
    assert values.loc[per_group == 0, "exact_drop"].notna().all()
    position = pd.read_csv(out / "position_impact.csv", keep_default_na=False, na_values=[""])
    assert position[position.intervention == "baseline"].n_nonfinite_positions.sum() == total
    matrix = pd.read_csv(out / "impact_matrix.csv", keep_default_na=False, na_values=[""])
    assert list(matrix.intervention) == ["values"] and set(matrix.columns) >= set(per_group.index)

    lines = [line for line in said if line.startswith("memory_ablation: ")]
    assert len(lines) == 1, said
    first = per_group[per_group > 0].index[0]
    assert lines[0].startswith(f"memory_ablation: {total} non-finite (NaN or inf) answer positions (baseline / "), lines
    assert f"baseline / {first}: {per_group[first]}" in lines[0], lines
    assert "counted in n_nonfinite_positions of accuracy.csv" in lines[0], lines
    for png in ("accuracy_by_bucket.png", "impact_matrix.png"):
        assert (out / png).stat().st_size > 1000, png

    old = []  # the clean model's records as an earlier version stored them: no count
    for rec in ResultStore(trained / "outputs" / "eval").records():
        for ex in rec["examples"]:
            ex.pop("n_nonfinite_positions")
        old.append(rec)
    said.clear()
    (trained / "old_records").mkdir(exist_ok=True)
    console.addHandler(handler)
    try:
        MemoryAblation.merge(old, (trained / "old_records").resolve())
    finally:
        console.removeHandler(handler)
    assert not [line for line in said if line.startswith("memory_ablation: ")], said
    now = pd.read_csv(trained / "outputs/eval/accuracy.csv")
    then = pd.read_csv(trained / "old_records/accuracy.csv")
    assert (now.n_nonfinite_positions == 0).all() and then.n_nonfinite_positions.isna().all()
    pd.testing.assert_frame_equal(then.drop(columns="n_nonfinite_positions"), now.drop(columns="n_nonfinite_positions"))
    assert pd.read_csv(trained / "old_records/examples.csv").n_nonfinite_positions.isna().all()


def _answer_reads(folder: Path, group: str) -> dict[int, int]:
    """Slot -> reads of memory layer 1 at the answer positions of ``group``'s rows, from the
    unablated model's key_activations.jsonl (the positions it records)."""
    from lensbench.synthetic.datasets import group_of

    counts: dict[int, int] = {}
    for a in map(json.loads, (folder / "key_activations.jsonl").open()):
        if group_of(a) == group:
            for row in a["slots"]["1"]:
                for s in row:
                    counts[s] = counts.get(s, 0) + 1
    return counts


def test_top_ranks_the_slots_read_at_answer_positions_and_random_draws_from_read_slots(trained):
    """``top`` takes the slots the group reads most at its answer positions (where the prompt's
    digits, read at every other position, do not count), ``positions: all`` those read most at
    every token; ``random`` draws ``count`` different sets from the slots the group reads, as
    ``random.Random(seed)`` does over them, and random_sets.csv gives the spread of their drops."""
    import random

    group = "bucket=16/seen"
    mask = {"transform": "mask_memory_keys", "params": {"layer": 1}}
    interventions = [{**mask, "name": "top_answer", "top": {"n": 8, "group": group}},
                     {**mask, "name": "top_all", "top": {"n": 8, "group": group, "positions": "all"}},
                     {**mask, "name": "rand", "vary": "slots", "random": {"size": 6, "count": 4, "seed": 5, "group": group}},
                     {**mask, "name": "rand_all", "vary": "slots",
                      "random": {"size": 6, "count": 2, "seed": 5, "pool": "all"}}]
    run(trained, ["predict", "--config", str(analysis(trained, "top", interventions))])
    out = trained / "outputs" / "top"
    reads = _answer_reads(out, group)
    ranked = sorted(reads, key=lambda s: (-reads[s], s))
    acc = pd.read_csv(out / "accuracy.csv", keep_default_na=False)
    targets = {iv: [json.loads(t) for t in dict.fromkeys(acc[acc.intervention == iv].target)]
               for iv in ("top_answer", "top_all", "rand", "rand_all")}
    assert targets["top_answer"] == [ranked[:8]]
    # in this model 2 of the 8 slots read most at every token are not among the 8 read most at answer positions
    assert set(targets["top_all"][0]) != set(ranked[:8]), "the test needs all-position reads to rank other slots"

    pool = sorted(reads)
    rng = random.Random(5)
    examples = pd.read_csv(out / "examples.csv", keep_default_na=False, dtype={"target": str})
    drawn = examples[examples.intervention == "rand"].drop_duplicates("draw").sort_values("draw")
    assert list(drawn.draw.astype(int)) == [0, 1, 2, 3]
    assert [json.loads(t) for t in drawn.target] == [sorted(rng.sample(pool, 6)) for _ in range(4)]  # seed reproduces
    assert all(set(t) <= set(reads) for t in targets["rand"])
    assert len({tuple(t) for t in targets["rand"]}) == 4
    assert any(not set(t) <= set(reads) for t in targets["rand_all"])  # pool: all reaches unread slots

    spread = pd.read_csv(out / "random_sets.csv")
    assert set(spread.intervention) == {"rand", "rand_all"} and (spread[spread.intervention == "rand"].draws == 4).all()
    row = spread[(spread.intervention == "rand") & (spread.group == group)].iloc[0]
    drops = acc[(acc.intervention == "rand") & (acc.group == group)].exact_drop.astype(float)
    assert row.exact_drop_mean == pytest.approx(drops.mean()) and row.exact_drop_sd == pytest.approx(drops.std())
    assert row.exact_drop_min == pytest.approx(drops.min()) and row.exact_drop_max == pytest.approx(drops.max())


def test_generated_answers_are_greedy_and_swaps_change_them(memory_only, tmp_path):
    """Every state's rows carry the greedy answer (``generated``, ``generated_exact``): equal, row
    for row, to an argmax loop written here (one token at a time, no padding, in the unablated
    model and in a swap state); swapping the values of the slots the rows read most changes
    generated answers, and swap_predictions.csv lists them as generated answers."""
    import torch

    from lensbench.models.loading import ModelSpec
    from lensbench.plugins import build_registries, get_plugin_manager
    from lensbench.state import State, SubjectManager, TransformSpec
    from lensbench.synthetic.collate import PaddedCollator
    from lensbench.synthetic.datasets import SyntheticQA

    interventions = [{"name": "swap", "transform": "swap_memory_values", "params": {"layer": 1}, "top": {"n": 4}}]
    config = {"model": {"class_path": "memory_ablation",
                        "init_args": {"model": str(memory_only), "interventions": interventions, "experiment": "gen"}},
              "data": {"class_path": "lensbench.data.answers.AnswerDataModule",
                       "init_args": {"dataset": "synthetic_qa", "options": SWAP_PAIRS, "seed": 0, "batch_size": 8}},
              "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}}
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(config))
    run(tmp_path, ["predict", "--config", "gen.yaml"])
    out = tmp_path / "outputs" / "gen"
    text = {c: str for c in ("answer", "prediction", "generated", "target", "baseline_prediction")}
    examples = pd.read_csv(out / "examples.csv", keep_default_na=False, dtype=text)
    base = examples[examples.intervention == "baseline"].set_index("index")
    assert (base.generated_exact == (base.generated == base.answer)).all()
    assert base.generated_exact.sum() >= 28  # the model memorises its pairs

    changed = pd.read_csv(out / "swap_predictions.csv", keep_default_na=False, dtype=text)
    assert len(changed) > 0 and (changed.compared == "generated").all()
    swapped = examples[examples.intervention == "swap"].set_index(["target", "index"])
    for r in changed.to_dict("records"):
        assert r["prediction"] == swapped.loc[(r["target"], r["index"]), "generated"] != base.loc[r["index"], "generated"]
        assert r["baseline_prediction"] == base.loc[r["index"], "generated"]
    acc = pd.read_csv(out / "accuracy.csv", keep_default_na=False)
    assert "generated_exact_match" in acc.columns

    registry = build_registries(get_plugin_manager(load_installed=False)).perturbations
    manager = SubjectManager({"m": ModelSpec(str(memory_only))}, torch.device("cpu"), registry)
    qa = SyntheticQA()
    rows = qa.generate(0, qa.options(SWAP_PAIRS, "data.options"))["test"]
    target = changed.target.iloc[0]
    a, b = json.loads(target)
    states = {"": State("m"), target: State("m", (TransformSpec("swap_memory_values", (("a", a), ("b", b), ("layer", 1))),))}
    for label, state in states.items():
        loaded = manager.activate(state)
        collate = PaddedCollator(loaded.tokenizer, "qa", 128)
        mine = examples[examples.intervention == ("swap" if label else "baseline")]
        mine = mine[mine.target == label].set_index("index")
        for i in [*changed[changed.target == target]["index"].head(3), 0, 1]:
            ids, labels = collate.encode(rows[i]["text"])
            first = next(k for k, lab in enumerate(labels) if lab != -100)
            seq = ids[:first]
            for _ in range(len(ids) - first):
                with torch.no_grad():
                    logits = loaded.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                seq.append(int(logits.argmax()))
            assert mine.loc[i, "generated"] == loaded.tokenizer.decode(seq[first:]).strip(), (label, i)
