"""LayerEmbeddings: one forward pass per batch of new texts gives every layer's pooled embedding,
equal to ``output_hidden_states`` pooled by hand; spilled chunks read back the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lensbench.layer_sweep.embeddings import LayerEmbeddings, batch_texts, pool

TEXTS = ["the cat sat on the mat", "a dog", "the tree was in the garden of the house by the river",
         "it is", "the cat sat on the mat", "from this day on we are what we was"]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    return model.base_model, AutoTokenizer.from_pretrained(tiny_model)


def _by_hand(backbone, tokenizer, text: str, layer: int, pooling: str) -> np.ndarray:
    ids = tokenizer(text, return_tensors="pt")  # one text alone: no padding at all
    with torch.no_grad():
        hidden = backbone(**ids, output_hidden_states=True).hidden_states[layer][0]
    vec = {"mean": hidden.mean(dim=0), "first": hidden[0], "last": hidden[-1]}[pooling]
    return vec.float().numpy()


@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_every_layer_equals_hidden_states_pooled_by_hand(tiny, pooling, side):
    backbone, tokenizer = tiny
    tokenizer.padding_side = side
    store = LayerEmbeddings(backbone, tokenizer, [0, 1, 2], pooling, batch_size=4)
    for layer in (2, 0, 1):  # any order: the first request computes every layer
        got = store.get(layer, TEXTS)
        want = np.stack([_by_hand(backbone, tokenizer, t, layer, pooling) for t in TEXTS])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert store.n_texts == 5  # the repeated text is embedded once
    assert store.forward_passes == 2  # 5 distinct texts in batches of 4, for all three layers


def test_spilled_chunks_read_back_the_same_and_bound_memory(tiny, tmp_path):
    backbone, tokenizer = tiny
    kept = LayerEmbeddings(backbone, tokenizer, [0, 2], batch_size=2)
    spill = tmp_path / "spill"
    small = LayerEmbeddings(backbone, tokenizer, [0, 2], batch_size=2, memory_limit=600, spill_dir=spill)
    for layer in (0, 2):
        np.testing.assert_array_equal(small.get(layer, TEXTS), kept.get(layer, TEXTS))
    row_bytes = 2 * backbone.config.hidden_size * 4  # two layers of float32
    assert small.spilled >= 2 and len(list(spill.glob("*.npy"))) == small.spilled
    assert small.peak_resident <= 600 + 2 * row_bytes  # the limit plus one batch
    assert kept.spilled == 0 and kept.peak_resident == 5 * row_bytes
    small.close()
    assert not spill.exists()


def test_pool_finds_tokens_from_the_mask():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    assert pool(hidden, mask, "first")[:, 0].tolist() == [1.0, 4.0]
    assert pool(hidden, mask, "last")[:, 0].tolist() == [2.0, 7.0]
    assert pool(hidden, mask, "mean")[:, 0].tolist() == [1.5, 5.5]
    hidden[0, 0, 0] = hidden[0, 3, 0] = float("nan")  # a padding position's state never enters
    assert pool(hidden, mask, "mean")[:, 0].tolist() == [1.5, 5.5]
    assert pool(hidden.half(), mask, "mean").dtype == torch.float32  # summed in float32


def test_batch_texts_reads_the_text_mteb_joined():
    assert batch_texts({"text": ["a b", "d"], "title": ["a", ""], "body": ["b", "d"]}) == ["a b", "d"]
    with pytest.raises(Exception, match="without text"):
        batch_texts({"image": [1]})
