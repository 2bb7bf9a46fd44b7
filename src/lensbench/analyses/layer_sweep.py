"""layer_sweep: the MTEB score and the representation metrics of every layer of every checkpoint.

After Skean et al. 2025, "Layer by Layer: Uncovering Hidden Representations in Language Models".
One work item per (model state, task): one forward pass over the task's texts gives the pooled
embedding of every requested layer (``LayerEmbeddings``), and the real ``mteb.evaluate`` then
scores each layer from those embeddings, its results kept in an MTEB ``ResultCache`` under the run
folder (each layer its own experiment). One work item per (model state, metrics dataset): one
forward pass gives prompt entropy, dataset entropy, curvature and effective rank of every layer.

Layers are numbered as in transformers' ``output_hidden_states``: 0 is the embedding output and
the last (``n``, the model's own output) has passed through the model's final norm. The embedding
of layer ``L`` is the reference's (OFSkean/information_flow): by default (``layer_norm: final``) the
final norm applies to every layer's hidden state, as it does to the output of the model cut to
``L`` blocks; the tokenizer pads on the left; on a GPU the model computes in float16. The model's
last layer is always scored (added when ``layers`` leaves it out).

Non-finite values: every work item counts per layer the distinct texts whose pooled embedding is
NaN or inf (``n_nonfinite_texts`` of each layer's row); such a layer scores NaN (MTEB, which
refuses NaN embeddings, is not left to stop the run) and the merge names them in one console warning.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..analysis import Analysis
from ..errors import LensbenchError
from ..hookspecs import hookimpl
from ..logs import console, run_log
from ..models.loading import ModelSpec
from ..perturbations import PerturbationGrid
from ..state import State
from ..stats import nonfinite_warning, place
from ..work import WorkItem

TABLE = "layer_sweep.csv"
METRICS_TABLE = "representation_metrics.csv"
MTEB_DIR = "mteb"
SPILL_DIR = "spill"
MTEB_DECIMALS = 6  # mteb.TaskResult.to_disk rounds scores to 6 decimals
LAST_TOKEN_HINT = "use pooling: mean or first"


def n_hidden_layers(model: torch.nn.Module) -> int:
    """Blocks of ``model`` (its text model's, for vision-language models): hidden states are 0..n."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise LensbenchError(f"cannot tell how many layers {type(model).__name__} has (no num_hidden_layers in its "
                         "config)", "model.init_args.layers")


def is_encoder_only(model: torch.nn.Module) -> bool:
    config = model.config
    return not getattr(config, "is_decoder", False) and not getattr(config, "is_encoder_decoder", False) and \
        not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                for a in (getattr(config, "architectures", None) or []))


#: Each work item's count of non-finite texts per layer, kept beside MTEB's results (``mteb/``
#: holds MTEB's own files only).
NONFINITE_DIR = "nonfinite_counts"


class _NonfiniteCounts:
    """The non-finite text counts of one work item, per layer, kept in a small JSON file once the
    first layer was embedded (one forward pass embeds every layer): a resume that reads every
    layer's score back from MTEB's result cache embeds nothing, and reads the counts here."""

    def __init__(self, folder: Path, key: str, layers: list[int]) -> None:
        from ..work import content_digest

        self.path = folder / f"{content_digest(key)}.json"
        self.layers = layers
        self.kept = False  # rewritten by every pass that embeds: a recomputed layer's counts replace older ones

    def keep(self, store) -> None:
        import json

        from ..run_folders import atomic_write

        if not self.kept:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps({str(layer): store.nonfinite_texts(layer) for layer in self.layers}))
            self.kept = True

    def read(self) -> dict[str, int] | None:
        import json

        try:
            value = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None


class LayerSweep(Analysis):
    """MTEB main score and representation metrics per (checkpoint, layer)."""

    name = "layer_sweep"
    # More checkpoints' revisions or more levels of a perturbation grid add states.
    extendable = ("revisions", *Analysis.extendable)
    checkpoints_extendable = True  # more revisions: more checkpoints, each with its own fingerprint
    padding_side = "left"  # as the reference's tokenizer: mean pooling then takes the last `length` states

    def __init__(
        self,
        models: list[str | ModelSpec] | None = None,
        revisions: list[str] | None = None,
        layers: list[int] | None = None,
        pooling: str = "mean",
        layer_norm: str = "final",
        metrics_layer_norm: str = "none",
        padding_side: str = "left",
        batch_size: int = 32,
        max_length: int | None = None,
        embedding_memory_mb: float = 2048,
        alpha: float = 1.0,
        perturbation: PerturbationGrid | None = None,
        experiment: str | None = None,
        output_dir: str = "outputs",
    ) -> None:
        """
        Args:
            models: Models to sweep: embedded aliases (``minilm``, ``smollm2``), hub ids, folders,
                .safetensors or .gguf files, or full ``ModelSpec`` entries (a looped or otherwise
                transformed model is a spec with ``transforms``). Default: minilm.
            revisions: Hub revisions (branches, tags, commits such as ``step94000``) of every model:
                each (model, revision) is one checkpoint. Default: each model's own ``revision``.
            layers: Layer indices as in ``output_hidden_states`` (0 = embedding output; negative
                counts from the last). Default: every layer.
            pooling: ``mean`` over non-padding tokens, or the ``first`` or ``last`` non-padding token.
            layer_norm: The embedding of the tasks' texts at layer ``L < n``: ``final`` passes its
                hidden state through the model's final norm (the anatomy's ``final_norm``: Llama's
                ``norm``, GPT-NeoX's ``final_layer_norm``), as information_flow's truncated model
                (``text_automodel_wrapper.py``) does; ``none`` keeps the raw hidden state. Layer
                ``n`` is the model's output either way; a model without a final norm (BERT) is
                unchanged.
            metrics_layer_norm: The same choice for the representation metrics; default ``none``,
                as information_flow computes them on the full model's ``hidden_states``
                (``experiments/mteb-harness.py``, ``run_entropy_metrics``;
                ``experiments/utils/misc/metric_utils.py``): raw intermediate layers, the last normed.
            padding_side: ``left`` (the default, as information_flow's tokenizer) or ``right``. Pooling
                reads the real tokens from the attention mask either way, but a model with absolute
                position embeddings (BERT, MiniLM) gives a left-padded text other positions, so its
                embedding then depends on the longest text of its batch; ``right`` avoids that.
            batch_size: Texts per forward pass.
            max_length: Truncate texts to this many tokens. Default: the model's context.
            embedding_memory_mb: Pooled embeddings of a task (layers x texts x width, float32) beyond
                this many MiB are written to disk under the run folder and memory-mapped.
            alpha: Order of the matrix-based Renyi entropy of the representation metrics (1: Shannon).
            perturbation: Sweep every model at a grid of perturbed states as well.
            experiment: Name of the run: results go to ``<output_dir>/<experiment>/``.
            output_dir: Folder holding one sub-folder per experiment.
        """
        super().__init__(experiment=experiment, output_dir=output_dir)
        from ..layer_sweep.embeddings import LAYER_NORMS, POOLINGS

        if pooling not in POOLINGS:
            raise LensbenchError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}",
                                 "model.init_args.pooling")
        for key, value in (("layer_norm", layer_norm), ("metrics_layer_norm", metrics_layer_norm)):
            if value not in LAYER_NORMS:
                raise LensbenchError(f"unknown {key} {value!r}; use final (the model's final norm on every "
                                     "layer, as information_flow) or none (raw hidden states)", f"model.init_args.{key}")
        if padding_side not in ("left", "right"):
            raise LensbenchError(f"unknown padding_side {padding_side!r}; use left (as information_flow) or right",
                                 "model.init_args.padding_side")
        self.padding_side = padding_side
        for key, value, low in (("batch_size", batch_size, 1), ("embedding_memory_mb", embedding_memory_mb, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or \
                    (key == "embedding_memory_mb" and value <= 0):
                raise LensbenchError(f"must be a positive number, got {value!r}", f"model.init_args.{key}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise LensbenchError(f"must be a positive number of tokens or null, got {max_length!r}",
                                 "model.init_args.max_length")
        if not alpha > 0:
            raise LensbenchError(f"must be positive, got {alpha!r}", "model.init_args.alpha")
        if layers is not None and (not layers or len(set(layers)) != len(layers)):
            raise LensbenchError("must list distinct layer indices, or be null for every layer",
                                 "model.init_args.layers")
        self.pooling, self.batch_size, self.max_length = pooling, int(batch_size), max_length
        self.layer_norm, self.metrics_layer_norm = layer_norm, metrics_layer_norm
        self.memory_limit = int(embedding_memory_mb * (1 << 20))
        self.alpha = float(alpha)
        self.layer_request = None if layers is None else [int(x) for x in layers]
        self.checkpoints: dict[str, tuple[str, str | None]] = {}  # label -> (model, revision)
        for i, entry in enumerate(self.model_entries(models, default=("minilm",))):
            base = ModelSpec(entry) if isinstance(entry, str) else entry
            for rev in (revisions or [base.revision]):
                spec = dataclasses.replace(base, revision=rev)
                if revisions:
                    spec.name = f"{base.label()}@{rev}"
                self.declare_model(spec, f"model.init_args.models[{i}]")
                self.checkpoints[spec.label()] = (base.label(), rev)
        self.declare_grid(perturbation)
        self._layers: dict[str, list[int]] = {}  # checkpoint -> resolved layer indices
        self._last: dict[str, int] = {}  # checkpoint -> n, the index of its last hidden state

    # -- what the base class asks ----------------------------------------------------------------
    def subject_specs(self) -> dict[str, ModelSpec]:
        """The specs, each loading in float16 on a CUDA device (the reference's dtype) and float32
        elsewhere, unless it sets its own ``dtype``."""
        from ..layer_sweep.embeddings import reference_dtype

        return {label: dataclasses.replace(spec, dtype=reference_dtype(spec.dtype, self.device))
                for label, spec in self.specs.items()}

    def compute_dtypes(self) -> dict[str, str | None]:
        """The dtype each checkpoint computes in depends on the device (float16 on a GPU, float32 on
        the CPU, unless its entry sets ``dtype``): it joins the run identity, so a run resumed on
        another kind of device is refused rather than mixing float16 and float32 results."""
        return {label: spec.dtype for label, spec in self.subject_specs().items()}

    @classmethod
    def holds_results(cls, run_dir: Path) -> bool:
        """Stored records, or MTEB scores of a work item cut short (kept under ``mteb/``)."""
        return super().holds_results(run_dir) or any((Path(run_dir) / MTEB_DIR).rglob("*.json"))

    def prepare_run_dir(self) -> None:
        from ..layer_sweep import progress

        progress.start(self.run_dir)

    # -- one work item ---------------------------------------------------------------------------
    def _activate(self, state: State):
        """The model in ``state``, with its layer indices checked (before any of its work)."""
        loaded = self.subjects.activate(state)
        if state.checkpoint not in self._layers:
            n = n_hidden_layers(loaded.model)
            wanted = list(range(n + 1)) if self.layer_request is None else self.layer_request
            resolved = []
            for layer in wanted:
                index = layer + n + 1 if layer < 0 else layer
                if not 0 <= index <= n:
                    raise LensbenchError(f"layer {layer} is outside {state.checkpoint}, whose hidden states are "
                                         f"0..{n} (0 = embedding output, {n} = last block); give layers in "
                                         f"{-(n + 1)}..{n}", "model.init_args.layers")
                resolved.append(index)
            if len(set(resolved)) != len(resolved):
                raise LensbenchError(f"names one layer of {state.checkpoint} twice (negative and positive index)",
                                     "model.init_args.layers")
            if n not in resolved:  # the model's output: what a layer's score is compared with
                resolved.append(n)
            if self.pooling == "last" and is_encoder_only(loaded.model) and \
                    getattr(loaded.tokenizer, "pad_token", None) is not None:
                raise LensbenchError(f"{state.checkpoint} is an encoder-only model: its last non-padding token is a "
                                     f"separator that sees the whole text, not a summary a causal model builds; "
                                     f"{LAST_TOKEN_HINT}", "model.init_args.pooling")
            self._layers[state.checkpoint] = resolved
            self._last[state.checkpoint] = n
        return loaded

    def _embedding(self, item: WorkItem, loaded, setting: str) -> tuple[Any, dict[str, Any]]:
        """The final norm module to apply under ``setting`` (None: raw states), and the record's
        fields saying what was computed: ``layer_norm`` (the setting), ``final_norm`` (the module
        applied to layers ``0 .. n-1``, null when none was: ``none``, or a model without a final
        norm), ``model_last_layer`` (``n``) and ``dtype``."""
        from ..layer_sweep.embeddings import final_norm

        name, module = final_norm(loaded) if setting == "final" else (None, None)
        dtype = str(getattr(loaded.model, "dtype", "")).removeprefix("torch.")
        return module, {"layer_norm": setting, "final_norm": name,
                        "model_last_layer": self._last[item.state.checkpoint], "dtype": dtype}

    def _base(self, item: WorkItem) -> dict[str, Any]:
        model, revision = self.checkpoints[item.state.checkpoint]
        return {"model": model, "revision": revision or "", "checkpoint": item.state.checkpoint,
                "labels": dict(item.state.labels)}

    def process(self, item: WorkItem) -> dict[str, Any]:
        loaded = self._activate(item.state)
        backbone = getattr(loaded.model, "base_model", loaded.model)
        if item.key[1] == "metrics":
            return self._metrics(item, loaded, backbone)
        return self._task(item, loaded, backbone)

    def _metrics(self, item: WorkItem, loaded, backbone) -> dict[str, Any]:
        from ..layer_sweep.data import TaskTexts
        from ..layer_sweep.embeddings import layer_states
        from ..layer_sweep.metrics import RepresentationMetrics

        layers = self._layers[item.state.checkpoint]
        norm, embedding = self._embedding(item, loaded, self.metrics_layer_norm)
        payload = item.payload
        if isinstance(payload, TaskTexts):  # a task's own texts, drawn now (an MTEB task's data loads here)
            texts, where = payload.texts(), {"dataset": payload.name, "source": "task", "sample_seed": payload.seed}
        else:  # a metrics dataset's first max_metric_texts texts
            texts, where = list(payload.texts), {"dataset": payload.dataset, "source": "dataset", "sample_seed": None}
        acc = RepresentationMetrics(alpha=self.alpha)
        limit, _ = self.length_limit(item.state.checkpoint, loaded)
        for start in range(0, len(texts), self.batch_size):
            kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True}
            if limit is not None:
                kwargs.update(truncation=True, max_length=limit)
            batch = loaded.tokenizer(texts[start : start + self.batch_size], **kwargs).to(self.device)
            acc.update(layer_states(backbone, batch, layers, norm), batch["attention_mask"])
        rows = acc.compute()
        for row, layer in zip(rows, layers):
            row["layer"] = layer
        return {"kind": "metrics", **self._base(item), **where, "n_texts": len(texts),
                "alpha": self.alpha, **embedding, "layers": rows}

    def _task(self, item: WorkItem, loaded, backbone) -> dict[str, Any]:
        import mteb
        from sklearn.exceptions import ConvergenceWarning

        from ..layer_sweep import progress
        from ..layer_sweep.embeddings import LayerEmbeddings, layer_meta, make_encoder
        from ..layer_sweep.result_cache import ResultRecord, embedding_settings
        from ..layer_sweep.tasks import ensure_loaded, task_texts

        unit = item.payload
        task = unit.ref.task
        ensure_loaded(task, "data.init_args.tasks")
        layers = self._layers[item.state.checkpoint]
        base = self._base(item)
        norm, embedding = self._embedding(item, loaded, self.layer_norm)
        store = LayerEmbeddings(backbone, loaded.tokenizer, layers, self.pooling, self.batch_size,
                                self.length_limit(item.state.checkpoint, loaded)[0], self.device, self.memory_limit,
                                self.run_dir / SPILL_DIR / f"rank{self.global_rank}", final_norm=norm)
        experiment = {"pooling": self.pooling}
        if item.state.transforms:
            from ..work import content_digest

            experiment["state"] = content_digest(item.state.id)
        dim = getattr(getattr(loaded.model, "config", None), "hidden_size", None)
        cache = mteb.ResultCache(self.run_dir / MTEB_DIR)
        counted = _NonfiniteCounts(self.run_dir / NONFINITE_DIR, item.key_str, layers)
        # A cached result is read back only when computed from this task content and these settings.
        record = ResultRecord(self.run_dir, item.key_str, {"state": item.state.id, "task_digest": unit.ref.digest,
                                                          **embedding_settings(self, loaded, backbone)})
        paths = {layer: cache.get_task_result_path(task.metadata.name, layer_meta(
            base["model"], base["revision"] or None, layer, experiment, dim)) for layer in layers}
        reused = record.drop_stale(paths, task.metadata.revision,
                                   place(item.state.checkpoint, unit.name, item.state.labels))
        scores = []
        try:
            for layer in layers:
                begin = time.perf_counter()
                meta = layer_meta(base["model"], base["revision"] or None, layer, experiment, dim)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)  # a classifier's, not the sweep's
                    try:
                        result = mteb.evaluate(make_encoder(store, layer, meta), task, cache=cache,
                                               overwrite_strategy="only-missing", show_progress_bar=False)
                    except Exception:
                        if not store.nonfinite_texts(layer):
                            raise
                        result = None  # MTEB (scikit-learn) refuses NaN embeddings: the layer scores NaN
                if store.n_texts:  # every layer's count, kept beside MTEB's results for a resume that reads them
                    counted.keep(store)
                unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
                for w in caught:
                    if not issubclass(w.category, ConvergenceWarning):
                        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                # Rounded as MTEB's result files are: a layer read back from them on resume scores the same.
                score = math.nan if result is None or store.nonfinite_texts(layer) else \
                    round(float(result.task_results[0].get_score()), MTEB_DECIMALS)
                duration = reused[layer] if layer in reused else time.perf_counter() - begin
                if layer not in reused:  # a layer read back keeps the seconds it first took
                    record.record(layer, paths[layer], duration)
                stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
                scores.append({"layer": layer, "main_score": score, "duration_s": duration, "time": stamp})
                progress.append(self.run_dir, {"model": base["model"], "revision": base["revision"],
                                               "state": item.state.id, "layer": layer, "task": unit.name,
                                               "status": "done", "main_score": score, "duration_s": duration,
                                               "time": stamp})
                run_log.info(f"{item.state.checkpoint} layer {layer} {unit.name}: {score:.4f} ({duration:.1f} s"
                             + (", read back from MTEB's cache)" if layer in reused else ")")
                             + (f"; MTEB's classifier did not converge {unconverged} times" if unconverged else ""))
            kept = None if store.n_texts else counted.read()  # every layer read back from MTEB's cache
            for row in scores:  # over every text embedded; None (unknown): counts of an older run not kept
                row["n_nonfinite_texts"] = store.nonfinite_texts(row["layer"]) if store.n_texts else \
                    None if kept is None else kept.get(str(row["layer"]))
                if row["n_nonfinite_texts"]:
                    row["main_score"] = math.nan
        finally:
            forward_passes, spilled, peak = store.forward_passes, store.spilled, store.peak_resident
            store.close()
        return {"kind": "task", **base, "task": unit.name, "task_type": unit.task_type,
                "n_texts": task_texts(task), "pooling": self.pooling, **embedding, "scores": scores,
                "forward_passes": forward_passes, "spilled_chunks": spilled, "peak_embedding_bytes": peak}

    # -- tables and figures ----------------------------------------------------------------------
    @classmethod
    def merge(cls, records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
        from ..layer_sweep.collect import write_tables

        written = write_tables(records, Path(run_dir))
        cls._warn_nonfinite(records)
        tasks = [r for r in records if r.get("kind") == "task"]
        spilled = sum(r.get("spilled_chunks", 0) for r in tasks)
        if spilled:
            console.info(f"layer_sweep: {spilled} embedding chunks went to disk (embedding_memory_mb)")
        # Every rank is done: what spill/ still holds (empty rank folders, chunks of a killed run) is scratch.
        shutil.rmtree(Path(run_dir) / SPILL_DIR, ignore_errors=True)
        return written

    @staticmethod
    def _warn_nonfinite(records: list[dict[str, Any]]) -> None:
        """One console line naming where pooled embeddings were not finite (records stored before the
        count was kept lack it: unknown, not counted)."""
        bad: dict[str, int] = {}
        tables: list[str] = []
        for rec in records:
            rows = rec.get("scores") if rec.get("kind") == "task" else rec.get("layers")
            where = rec.get("task") if rec.get("kind") == "task" else rec.get("dataset")
            for row in rows or []:
                n = row.get("n_nonfinite_texts") or 0
                if n:
                    model = rec.get("checkpoint", rec.get("model"))
                    key = f"{place(model, where, rec.get('labels'))} layer {row['layer']}"
                    bad[key] = bad.get(key, 0) + n
                    table = TABLE if rec.get("kind") == "task" else METRICS_TABLE
                    tables += [table] if table not in tables else []
        nonfinite_warning("layer_sweep", bad, "pooled text embeddings", "n_nonfinite_texts", " and ".join(tables))

    @classmethod
    def plot(cls, run_dir: Path) -> list[Path]:
        from ..layer_sweep.collect import draw_figures

        return draw_figures(Path(run_dir))


@hookimpl
def lensbench_register_analyses() -> list[type]:
    return [LayerSweep]
