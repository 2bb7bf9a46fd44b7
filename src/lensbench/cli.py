"""The ``lensbench`` command: ``predict`` (a LightningCLI), ``plugins`` and ``plot``."""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from .cli_base import cli_base_class, default_experiment, run_cli
from .errors import LensbenchError, RunStopped
from .run_identity import MATMUL_KEY, VERSION_KEY, flatten, free_fields, is_free

SECTIONS = {"model": ("analyses", "lensbench.analysis.Analysis"), "data": (None, None)}


def _resolve_model_flag(argv: list[str], registries) -> list[str]:
    """``--model <registered name>`` on the command line, as in YAML; a bare name that is neither
    registered nor a file is refused with the registry's close matches."""
    out = list(argv)
    for i, arg in enumerate(out):
        value = out[i + 1] if arg == "--model" and i + 1 < len(out) else arg[8:] if arg.startswith("--model=") else None
        if value is not None and value not in registries.analyses and "." not in value and "/" not in value \
                and not Path(value).exists() and not value.startswith("{"):
            registries.analyses.get(value, "model")  # raises: unknown analysis, did you mean ...
        if arg == "--model" and i + 1 < len(out) and out[i + 1] in registries.analyses:
            cls = registries.analyses.get(out[i + 1])
            out[i + 1] = f"{cls.__module__}.{cls.__qualname__}"
        elif arg.startswith("--model=") and arg[8:] in registries.analyses:
            cls = registries.analyses.get(arg[8:])
            out[i] = f"--model={cls.__module__}.{cls.__qualname__}"
    return out


def _build_cli_class():
    class LensbenchCLI(cli_base_class()):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {"predict": {"model", "dataloaders", "datamodule"}}

        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            parser.set_defaults({
                "trainer.use_distributed_sampler": False,
                "trainer.logger": False,
                "trainer.enable_checkpointing": False,  # predict saves no checkpoint
                "trainer.enable_model_summary": False,
            })

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand]
            init = cfg.model.init_args
            if getattr(init, "experiment", None) is None:
                init.experiment = default_experiment(cfg.model.class_path, cfg.get("config") or [])
            super().before_instantiate_classes()

        def before_predict(self) -> None:
            parser = self._subcommand_parsers[self.subcommand]
            cfg = self.config[self.subcommand]
            text = parser.dump(cfg, skip_none=False)
            resolved = yaml.safe_load(text)
            # Placement (device_map, max_memory) never changes a result: a run resumes under another map.
            from .models.fingerprint import without_placement

            identity = flatten(without_placement({"model": resolved.get("model"), "data": resolved.get("data")}))
            identity.update(flatten({"data_fingerprint": self.datamodule.fingerprint(),
                                      "model_fingerprint": self.model.fingerprint(),
                                      "inputs_fingerprint": self.model.inputs_fingerprint()}))
            free = free_fields(self.model, self.datamodule)
            self.model.run_config = text
            self.model.run_identity = {k: v for k, v in identity.items() if not is_free(k, free)}
            self.model.identity_free = free
            self.trainer.callbacks.append(_matmul_precision_recorder(self.matmul_precision))

    return LensbenchCLI


def _matmul_precision_recorder(value: str):
    """A callback writing ``value`` and the lensbench version into run.json when this run made the
    folder (an existing folder's run.json is left byte for byte), and logging the precision; a
    resume with another one warns."""
    import json

    from lightning.pytorch.callbacks import Callback

    class MatmulPrecision(Callback):
        def on_predict_start(self, trainer, pl_module) -> None:
            from .run_folders import IDENTITY_FILE, atomic_write
            from .logs import console, run_log

            run_log.info(f"{MATMUL_KEY}: {value}")
            path = pl_module.run_dir / IDENTITY_FILE
            if not trainer.is_global_zero or not path.exists():
                return
            identity = json.loads(path.read_text())
            if getattr(pl_module, "_new_identity", False) and MATMUL_KEY not in identity:
                from . import __version__

                identity.update({MATMUL_KEY: value, VERSION_KEY: __version__})
                atomic_write(path, json.dumps(identity, indent=1, sort_keys=True))
            elif identity.get(MATMUL_KEY, value) != value:
                console.warning(f"lensbench: this run computes with {MATMUL_KEY} {value}; the run that made "
                                f"{pl_module.run_dir} used {identity[MATMUL_KEY]}")

    return MatmulPrecision()


def run_predict(argv: list[str] | None) -> Any:
    from .analysis import Analysis
    from .data.modules import WorkDataModule
    from .plugins import active_registries, use_registries

    registries = active_registries()
    if argv is None:  # rewrite sys.argv itself: the DDP launcher re-runs it
        sys.argv[1:] = _resolve_model_flag(sys.argv[1:], registries)
    else:
        argv = _resolve_model_flag(argv, registries)
    with use_registries(registries):  # the analysis built from the config holds them
        return run_cli(
            _build_cli_class(),
            Analysis,
            WorkDataModule,
            registries,
            "Run a lensbench analysis: lensbench predict --config X.yaml",
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            seed_everything_default=False,
            args=argv,
        )


def cmd_plugins(args: argparse.Namespace) -> int:
    import os

    from .plugins import active_registries, autoload_disabled_by, blocked_plugins, installed_plugins

    registries = active_registries(keep_going=True)  # a plugin failing to import is listed, not fatal
    disabled_by = autoload_disabled_by()
    if disabled_by:
        print(f"plugin autoload: off ({disabled_by} is set): installed plugins are not loaded")
    print("columns: name, plugin, entry point ('-': built-in or registered in-process), description")
    for kind, registry in registries.kinds().items():
        print(f"{kind}:")
        entries = list(registry)
        if not entries:
            print("  (none)")
        for entry in entries:
            doc = getattr(entry.obj, "description", "") or (entry.obj.__doc__ or "").strip().splitlines()[0:1]
            doc = doc if isinstance(doc, str) else (doc[0] if doc else "")
            print(f"  {entry.name:<22} {entry.plugin:<32} {entry.entry_point or '-':<16} {doc}")
            for clash_kind, name, message in registries.clashes:
                if clash_kind == kind and name == entry.name:
                    print(f"  {'':<22} CLASH: {message}")
    installed = installed_plugins()
    blocked, _ = blocked_plugins(os.environ.get("LENSBENCH_BLOCK_PLUGINS", ""), installed)
    print("installed plugins (entry point, distribution; LENSBENCH_BLOCK_PLUGINS takes either name):")
    if not installed:
        print("  (none)")
    for name, dist in sorted(installed.items()):
        if name in registries.entry_points:
            status = "loaded"
        elif name in registries.failed:
            status = f"failed to import: {registries.failed[name]} (LENSBENCH_BLOCK_PLUGINS={name} skips it)"
        elif disabled_by:
            status = f"not loaded ({disabled_by})"
        elif name in blocked:
            status = "not loaded (LENSBENCH_BLOCK_PLUGINS)"
        else:
            status = "not loaded"
        print(f"  {name:<22} {dist:<32} {status}")
    from .plugins import MODULES_VAR, requested_modules

    if requested_modules():
        print(f"modules named by {MODULES_VAR}:")
        for name in requested_modules():
            failure = registries.failed.get(name)
            print(f"  {name:<22} {f'failed to import: {failure}' if failure else 'loaded'}")
    if registries.clashes:
        print(f"{len(registries.clashes)} name(s) registered twice (marked CLASH above): every other command "
              "refuses to run until each is resolved as its line says")
    return 0


def _is_fit_run(run_dir: Path, config: dict) -> bool:
    model = config.get("model")
    return (run_dir / "lightning").is_dir() or isinstance(model, dict) and "config" in model and "class_path" not in model


def cmd_plot(args: argparse.Namespace) -> int:
    from .analysis import load_run_config
    from .training.curves import CURVES, plot_runs

    run_dirs = [Path(d) for d in args.run_dir]
    if len(run_dirs) > 1:  # training runs on one figure
        for run_dir in run_dirs:
            if not _is_fit_run(run_dir, load_run_config(run_dir)):
                raise LensbenchError(f"{run_dir} is not a training run (lensbench fit); plot draws several runs on one "
                                     "figure only for training runs: give fit run folders, or plot an analysis "
                                     "run alone")
        print(plot_runs(run_dirs, Path(args.out or "fit_curves.png")))
        return 0
    run_dir, = run_dirs
    config = load_run_config(run_dir)
    model = config.get("model")
    class_path = model.get("class_path", "") if isinstance(model, dict) else ""
    if not class_path or not isinstance(class_path, str):
        if _is_fit_run(run_dir, config):
            print(plot_runs(run_dirs, Path(args.out) if args.out else run_dir / CURVES))
            from .report import write_report
            from .training.curves import FitRun

            print(write_report([run_dir], [FitRun]))
            return 0
        raise LensbenchError(f"{run_dir}/config.yaml names no analysis (model.class_path); give the output folder "
                             "of a lensbench predict run")
    cls = _analysis_class(class_path)
    if cls is None:
        raise LensbenchError(f"{run_dir}/config.yaml names analysis {class_path!r}, which is not installed",
                             "model.class_path")
    for path in cls.plot(run_dir):
        print(path)
    from .report import write_report

    print(write_report([run_dir], [cls]))
    return 0


def _analysis_class(class_path: Any) -> Any:
    """The installed analysis that a run's config names (class path or registry name); None if none."""
    from .plugins import active_registries

    for entry in active_registries().analyses:
        cls = entry.obj
        if f"{cls.__module__}.{cls.__qualname__}" == class_path or entry.name == class_path:
            return cls
    return None


def cmd_report(args: argparse.Namespace) -> int:
    """``lensbench report RUN [RUN ...] [-o FILE]``: one self-contained page of the runs' tables and
    figures (an analysis that is not installed gets the default sections)."""
    from .analysis import load_run_config
    from .report import write_report
    from .training.curves import FitRun

    run_dirs = [Path(d) for d in args.run_dir]
    classes = []
    for run_dir in run_dirs:
        config = load_run_config(run_dir)
        model = config.get("model")
        classes.append(FitRun if _is_fit_run(run_dir, config) else
                       _analysis_class(model.get("class_path")) if isinstance(model, dict) else None)
    print(write_report(run_dirs, classes, Path(args.out) if args.out else None))
    return 0


_NOISE = ("Does not validate", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>")


def _string_given(inner: list[str]) -> str | None:
    """What is wrong when a string was given where a list or a mapping is expected, from the lines of
    jsonargparse's error below the innermost key (its "Expected a path but X either not accessible or
    invalid" says only that X is not a file to read the value from)."""
    def first(pattern: str) -> str | None:
        return next((m.group(1) for m in (re.match(pattern, line) for line in inner) if m), None)

    given = first(r"Given value: (.*)$")
    if first(r"Given value type: <class '([\w.]+)'>") != "str" or given is None:
        return None
    shown = given if len(given) <= 60 else given[:57] + "..."
    subtypes = first(r"Subtypes: \[(.*)\]$") or ""
    expected = {m.group(1) for m in (re.match(r"Expected a <class '([\w.]+)'>", line) for line in inner) if m}
    if "list" in expected or re.match(r"(list|tuple|set|Sequence|Iterable)\[", subtypes):
        return f"expected a list, got the string {shown!r}; write [{shown}]"
    cls = re.search(r"<class '((?!NoneType)[\w.]+\.\w+)'>", subtypes)
    if cls or any(line.startswith("Expected a dot import path") for line in inner):
        what = cls.group(1).rsplit(".", 1)[-1] if cls else "a class"
        return (f"expected a mapping ({what} settings), got the string {shown!r}; write {{key: value, ...}} "
                "(--print_config shows the keys)")
    return None


def _short_error(exc: BaseException) -> str:
    """One line out of a nested jsonargparse error: the innermost field and its problem."""
    path: list[str] = []
    problem = ""
    inner: list[str] = []  # the lines indented below the innermost key
    key_indent = -1
    for raw in str(exc).splitlines():
        line = raw.strip().lstrip("- ").strip()
        indent = len(raw) - len(raw.lstrip())
        match = re.match(r'Parser key "([^"]+)":\s*(.*)', line)
        if match:
            path.append(match.group(1))
            problem = match.group(2)
            inner, key_indent = [], indent
        elif line.startswith("Problem with given class_path"):
            path.append("init_args")
        elif line and not line.startswith(_NOISE) and not problem:
            problem = line
        if line and not match and indent <= key_indent:
            key_indent = 1 << 30  # the innermost key's lines have ended
        elif line and not match:
            inner.append(line)
    problem = _string_given(inner) or problem
    problem = re.sub(r"<class '([\w.]+)'>", r"\1", problem or str(exc).splitlines()[0])
    if "is not accepted" in problem:
        problem += "; check its spelling against `lensbench predict --print_config`"
    return f"{'.'.join(path)}: {problem}" if path else problem


_IMPORT_FAILURE = re.compile(r"No module named '([\w.]+)'|module '([\w.]+)' has no attribute '(\w+)'")


def _unimportable_class(exc: BaseException) -> LensbenchError | None:
    """A class path that cannot be imported (``model.class_path``, ``data.class_path``, a class in
    init_args or the trainer section), out of jsonargparse's nested error: the field that names it and
    the fix. A run folder's config.yaml names a plugin's classes by import path, so rerunning it after
    the plugin is uninstalled lands here."""
    lines = str(exc).splitlines()
    keys: list[tuple[int, str, bool]] = []  # (indent, path segment, a jsonargparse "Parser key")
    for i, raw in enumerate(lines):
        indent = len(raw) - len(raw.lstrip())
        line = raw.strip().lstrip("- ").strip()
        while keys and line and indent <= keys[-1][0]:
            keys.pop()
        key = re.match(r'Parser key "([^"]+)":', line)
        given = re.match(r"Problem with given class_path '([^']+)':$", line)
        if key:
            keys.append((indent, key.group(1), True))
        elif given:
            failure = _IMPORT_FAILURE.fullmatch(lines[i + 1].strip()) if i + 1 < len(lines) else None
            if failure is None:
                keys.append((indent, "init_args", False))
                continue
            path = [segment for _, segment, _ in keys]
            if keys and keys[-1][2]:  # a list given to the innermost key: which item
                path[-1] += _item_index(lines[i + 1:], keys[-1][0], given.group(1))
            field = ".".join([*path, "class_path"])
            return LensbenchError(_import_fix(given.group(1), failure), field)
    return None


def _item_index(lines: list[str], key_indent: int, class_path: str) -> str:
    """``[i]`` when the key's given value (its "Given value:" line) is a list whose item i names ``class_path``."""
    import ast

    for raw in lines:
        indent = len(raw) - len(raw.lstrip())
        if raw.strip() and indent <= key_indent:
            break
        if indent == key_indent + 2 and raw.strip().startswith("Given value: "):
            try:
                value = ast.literal_eval(raw.strip()[len("Given value: "):])
            except (ValueError, SyntaxError):
                return ""
            if isinstance(value, list):
                for index, item in enumerate(value):
                    if class_path in (item, item.get("class_path") if isinstance(item, dict) else None):
                        return f"[{index}]"
            return ""
    return ""


def _import_fix(class_path: str, failure: re.Match) -> str:
    """What is wrong with ``class_path`` (``failure``: Python's import error) and how to fix it."""
    module = class_path.rpartition(".")[0]
    missing, owner = failure.group(1), failure.group(2)
    head = f"`{class_path}` cannot be imported ({failure.group(0)})"
    if (owner or missing or "").split(".")[0] == "lensbench":
        return f"{head}: lensbench has no such class; check the class path's spelling"
    if missing and not (module == missing or module.startswith(missing + ".")):
        return f"{head}: its module needs {missing!r}, which is not installed; install it"
    return (f"{head}: is the plugin that provides it installed{'' if missing else ', in a version that has it'}? "
            "(`lensbench plugins` lists what is)")


def _debug() -> bool:
    """``LENSBENCH_DEBUG=1``: full tracebacks instead of one-line errors."""
    import os

    return os.environ.get("LENSBENCH_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def _environment_error(exc: BaseException) -> str:
    """One line for a failure of the machine rather than of lensbench (a file, a folder, a
    permission, the disk, memory), with what to check."""
    import errno

    if isinstance(exc, MemoryError):
        return "out of memory; use a smaller model, dtype or batch size (LENSBENCH_DEBUG=1 shows the traceback)"
    where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    fix = {errno.ENOSPC: "free disk space or write elsewhere (model.init_args.output_dir)",
           errno.EFBIG: "raise the file size limit (ulimit -f), free disk space or write elsewhere "
                        "(model.init_args.output_dir)",
           errno.EDQUOT: "free disk space or write elsewhere (model.init_args.output_dir)",
           errno.EACCES: "check the permissions of that path", errno.EPERM: "check the permissions of that path",
           errno.EROFS: "write to another folder (model.init_args.output_dir)",
           errno.ENOENT: "check that the path exists"}.get(exc.errno, "check that path and the machine")
    return f"{what}{where}; {fix} (LENSBENCH_DEBUG=1 shows the traceback)"


#: How each command resumes after a stop (a signal, a failure of the machine, a lost rank).
RESUME = {"predict": "the results stored so far are kept: run the same command again to resume",
          "pipeline": "the results stored so far are kept: run the same command again to resume",
          "fit": "run the same command again to resume from the last checkpoint (lightning/last.ckpt)"}


def _stop_on_signals() -> dict[int, Any]:
    """SIGTERM and SIGINT raise ``RunStopped`` where the run stands (once: a second Ctrl-C while
    stopping ends the process at once, as without lensbench; a repeated SIGTERM is ignored, as
    launchers repeat it: Lightning forwards a SIGTERM to its child ranks, which a ``kill`` of the
    process group or ``scancel`` reached too). Returns the handlers replaced."""
    stopping: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        if stopping and signum == signal.SIGTERM:  # already stopping: the same request again
            return
        if stopping:  # a second Ctrl-C: stop now
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        stopping.append(signum)
        raise RunStopped(signum)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, stop)
    return previous


def _peer_lost(exc: BaseException) -> str | None:
    """The first line of a torch.distributed error saying that another rank is gone or timed out."""
    text = str(exc)
    markers = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
               "Socket Timeout", "DistNetworkError", "DistBackendError", "Connection refused")
    chain: BaseException | None = exc
    names = set()
    while chain is not None:
        names.add(type(chain).__name__)
        chain = chain.__cause__ or chain.__context__
    if not ({"DistBackendError", "DistNetworkError", "DistStoreError"} & names or
            (isinstance(exc, RuntimeError) and any(m in text for m in markers) and "gloo" in text.lower())):
        return None
    line = (text.strip().splitlines() or [type(exc).__name__])[0]
    line = re.sub(r"^\[[^\]]*\]\s*", "", line).split(". This is typically")[0]  # gloo's source location, advice
    return line[:160]


def main(argv: list[str] | None = None) -> int:
    from_sys = argv is None
    if from_sys and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `lensbench plugins | head` ends quietly
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    previous = _stop_on_signals() if from_sys and command in RESUME else {}
    try:
        if previous:  # a rank Lightning's launcher started stops when that process dies
            from .distributed import end_with_launcher

            end_with_launcher()
        return _main(argv, from_sys)
    except RunStopped as exc:
        if _debug():
            raise
        print(f"lensbench: error: {exc}; {RESUME[command]}", file=sys.stderr)
        return 128 + exc.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _main(argv: list[str], from_sys: bool) -> int:
    top = argparse.ArgumentParser(
        prog="lensbench",
        description="Analyses of language-model internals. Commands: predict (run an analysis from a "
        "config), fit (train a model, such as a memory model), plugins (list what is registered), plot (redraw figures of a finished run).",
    )
    sub = top.add_subparsers(dest="command")
    sub.add_parser("predict", help="run an analysis: lensbench predict --config X.yaml", add_help=False)
    sub.add_parser("fit", help="train a model (memory models): lensbench fit --config X.yaml", add_help=False)
    sub.add_parser("pipeline", help="param_diff and activation_norms of one base and others, and a summary: "
                   "lensbench pipeline --config X.yaml", add_help=False)
    sub.add_parser("plugins", help="list registered analyses, perturbations, metrics and datasets")
    plot = sub.add_parser("plot", help="redraw an analysis's figures from its stored results, or draw the "
                          "training curves of one or several lensbench fit runs on one figure")
    plot.add_argument("run_dir", nargs="+", help="output folder of a run (holds config.yaml); several: fit runs")
    plot.add_argument("--out", default=None, help="the figure of fit runs (default: <run>/curves.png for one, "
                      "fit_curves.png for several)")
    report = sub.add_parser("report", help="write one self-contained HTML page (report.html) of the tables, "
                            "figures, config and logs of one or several runs, side by side")
    report.add_argument("run_dir", nargs="+", help="output folder of a run (holds config.yaml)")
    report.add_argument("-o", "--out", default=None, help="the page (default: <run>/report.html for one run, "
                        "report.html for several)")
    try:
        if argv and argv[0] == "predict":
            run_predict(None if from_sys else argv)
            return 0
        if argv and argv[0] == "pipeline":
            from .pipeline import run_pipeline

            return run_pipeline(argv[1:], run_predict)
        if argv and argv[0] == "fit":
            from .training.cli import run_fit

            run_fit(None if from_sys else argv)
            return 0
        args = top.parse_args(argv)
        if args.command == "plugins":
            return cmd_plugins(args)
        if args.command == "plot":
            return cmd_plot(args)
        if args.command == "report":
            return cmd_report(args)
        top.print_help()
        return 2
    except LensbenchError as exc:
        if _debug():
            raise
        print(f"lensbench: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, MemoryError) as exc:  # the environment: files, folders, permissions, disk space, memory
        if _debug():
            raise
        print(f"lensbench: error: {_environment_error(exc)}", file=sys.stderr)
        return 1
    except RunStopped:
        raise
    except Exception as exc:  # jsonargparse's ArgumentError and friends
        from jsonargparse import ArgumentError

        if type(exc).__name__ == "OutOfMemoryError" and not _debug():  # torch.cuda.OutOfMemoryError
            print("lensbench: error: the GPU ran out of memory; lower the batch size (data.init_args.batch_size, "
                  "generation.max_batch_size) or use a smaller dtype (LENSBENCH_DEBUG=1 shows the traceback)",
                  file=sys.stderr)
            return 1
        cause = exc
        while cause is not None:
            if isinstance(cause, LensbenchError) and not _debug():
                print(f"lensbench: error: {cause}", file=sys.stderr)
                return 1
            cause = cause.__cause__ or cause.__context__
        unimportable = _unimportable_class(exc) if isinstance(exc, ArgumentError) else None
        if unimportable is not None:  # bad input, as a LensbenchError
            print(f"lensbench: error: {unimportable}", file=sys.stderr)
            return 1
        if isinstance(exc, ArgumentError):
            print(f"lensbench: error: {_short_error(exc)}", file=sys.stderr)
            return 2
        lost = _peer_lost(exc)
        if lost is not None and not _debug():
            if "timed out" in lost.lower() or "timeout" in lost.lower():  # a rank that hangs, not one that died
                lost += ": no answer within the DDP timeout, trainer.strategy.init_args.timeout"
            print(f"lensbench: error: another rank of this distributed run stopped or stopped answering ({lost}); "
                  f"{RESUME.get(argv[0] if argv else '', 'run the same command again')}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
