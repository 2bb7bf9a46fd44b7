"""Effective rank of one layer's dataset matrix, three ways: lensbench's, Roy and Vetterli's, and no clamp.

    python bench/effective_rank_variants.py [--model minilm --dataset retain --layer 2 --padding-side left]

The dataset matrix ``P`` has one row per text: the text's hidden states at ``--layer`` averaged over its
tokens (as layer_sweep's representation metrics pool them); ``Z = normalize_rows(P)`` (rows centred,
then scaled to unit norm). With ``H(p) = -Σ p log p``:

- lensbench (information_flow's): ``exp(H(λ))``, ``λ`` the eigenvalues of the Gram matrix of ``Z``
  clamped at 0 entry by entry and divided by its trace (``effective_rank`` of
  ``representation_metrics.csv``; checked here against ``RepresentationMetrics``);
- Roy and Vetterli (2007): ``exp(H(σ / Σσ))``, ``σ`` the singular values of ``Z``;
- no clamp: ``exp(H(σ² / Σσ²))``, the eigenvalues of the Gram matrix itself (what lensbench's figure
  would be without the reference's clamp).

All in float64. Prints the three numbers.
"""

from __future__ import annotations

import argparse
import math
import os



def entropy(p) -> float:
    import torch

    p = p[p > 0]
    return float(-(p * torch.log(p)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="an embedded alias, folder or hub id")
    parser.add_argument("--dataset", default="retain", help="a registered text dataset or a .txt/.jsonl file")
    parser.add_argument("--layer", type=int, default=2, help="hidden-state index (0: the embedding output)")
    parser.add_argument("--max-texts", type=int, default=1000)
    parser.add_argument("--padding-side", default="left", choices=["left", "right"],
                        help="the tokenizer's; layer_sweep pads on the left, as the reference (with right "
                             "padding an encoder such as MiniLM gives other states: its positions shift)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from lensbench.data.modules import load_datasets
    from lensbench.layer_sweep.metrics import RepresentationMetrics, matrix_entropy, normalize_rows
    from lensbench.models.loading import ModelSpec, load_model

    rows, _ = load_datasets([args.dataset], "dataset", args.max_texts)
    texts = [r["text"] for r in next(iter(rows.values()))]
    loaded = load_model(ModelSpec(args.model), padding_side=args.padding_side)
    model = getattr(loaded.model, "base_model", loaded.model).eval()
    batch = loaded.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].double().unsqueeze(-1)
    pooled = (hidden[args.layer].double() * mask).sum(1) / mask.sum(1)  # [N, D]: mean over real tokens
    z = normalize_rows(pooled)
    sigma = torch.linalg.svdvals(z)

    lensbench_rank = math.exp(matrix_entropy(z))
    reference = RepresentationMetrics(layers=[args.layer])
    reference.update(hidden, batch["attention_mask"])
    analysis_rank = reference.compute()[0]["effective_rank"]
    assert abs(analysis_rank - lensbench_rank) <= 1e-5 * lensbench_rank, (analysis_rank, lensbench_rank)
    roy_vetterli = math.exp(entropy(sigma / sigma.sum()))
    no_clamp = math.exp(entropy(sigma**2 / (sigma**2).sum()))

    n, d = z.shape
    print(f"{args.model}, {args.dataset} ({n} texts), layer {args.layer}, width {d}, {args.padding_side} padding")
    print(f"lensbench (clamped Gram spectrum, information_flow): {lensbench_rank:.2f}")
    print(f"Roy-Vetterli (singular values):                      {roy_vetterli:.2f}")
    print(f"no clamp (Gram spectrum = squared singular values):  {no_clamp:.2f}")


if __name__ == "__main__":
    main()
