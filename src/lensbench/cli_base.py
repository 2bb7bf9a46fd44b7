"""The LightningCLI every lensbench command builds on (``lensbench predict`` in ``lensbench.cli``,
``lensbench fit`` in ``lensbench.training.cli``): the YAML loader that refuses duplicate keys and
resolves registered analysis names, the ``float32_matmul_precision`` option, Lightning's trainer
errors as one line, Lightning's SIGTERM handler kept from broadcasting, and the default experiment
name. It takes the registries as an argument and imports no analysis, so both CLIs and the
analyses that run one (memory_ablation trains its model with ``lensbench fit``) build on it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import LensbenchError
from .run_identity import MATMUL_KEY

PARSER_MODE = "lensbench_yaml"


def _resolve_short_names(config: dict[str, Any], registries) -> None:
    """Replace a registered analysis name in ``model``/``model.class_path`` by its import path."""
    model = config.get("model")
    if isinstance(model, str):
        model = config["model"] = {"class_path": model}
    if isinstance(model, dict) and isinstance(model.get("class_path"), str):
        name = model["class_path"]
        if name in registries.analyses:
            cls = registries.analyses.get(name)
            model["class_path"] = f"{cls.__module__}.{cls.__qualname__}"
        elif "." not in name and name not in {cls.obj.__name__ for cls in registries.analyses}:
            registries.analyses.get(name, "model.class_path")  # raises with close matches


def _config_file_shown(path: str = "") -> str | None:
    """The config file jsonargparse is reading (as given on the command line), else ``path``."""
    try:
        from jsonargparse._util import config_load_stack  # private; jsonargparse is pinned <5

        stack = config_load_stack.get()
    except (ImportError, AttributeError):
        stack = ()
    return stack[-1][1] if stack else (path or None)


def _make_loader(registries):
    def load(text: str, path: str = "") -> Any:
        """``path``: given by jsonargparse when ``text`` is a whole config file (``--config``)."""
        from .yamlio import DuplicateKeyError, not_a_mapping, safe_load

        shown = _config_file_shown(path)
        try:
            value = safe_load(text)
        except DuplicateKeyError as exc:
            where = shown or f"the value {text.strip()[:60]!r}"
            raise LensbenchError(exc.describe(where), "config") from None
        except yaml.YAMLError as exc:
            if "\n" not in text.strip() and ": " not in text:
                raise  # one value, such as the glob "*.mlp.*": jsonargparse takes it as a string
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            where += f" of {shown}" if shown else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise LensbenchError(f"malformed YAML{where}: {problem}; fix the file's syntax", "config") from None
        problem = not_a_mapping(value, shown, "model:, data:, trainer:") if path else None  # a --config file
        if problem:
            raise LensbenchError(f"{problem}: the command's --print_config shows them", "config")
        # A whole run config (not, say, an analysis's own ``model:`` argument).
        if isinstance(value, dict) and "model" in value and ({"data", "trainer"} & value.keys()):
            _resolve_short_names(value, registries)
        return value

    return load


def cli_base_class():
    """LightningCLI with what every lensbench command shares: the ``float32_matmul_precision``
    option (set before any class is built), Lightning's trainer errors as one line naming the
    trainer section, and Lightning's SIGTERM handler kept from broadcasting (``_no_sigterm_broadcast``)."""
    from lightning.pytorch.cli import LightningCLI

    class LensbenchCLIBase(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument(f"--{MATMUL_KEY}", type=Optional[str], default=None,
                                help="torch.set_float32_matmul_precision for the run: highest, high (TF32 "
                                     "matmuls on GPUs) or medium; default: high where CUDA is available and "
                                     "trainer.accelerator is not cpu, else torch's own. Recorded in run.json, "
                                     "not matched on resume.")

        def parse_arguments(self, parser, args) -> None:
            """``args`` given (``main([...])`` in a test or a notebook, a pipeline's steps): Lightning
            warns when the process has command-line arguments too (pytest's, a notebook kernel's,
            ``lensbench pipeline``'s own), against mixing the two; lensbench passes the whole command
            line, so those are hidden from that check while the arguments are parsed, and only then
            (the DDP launcher, later, re-runs ``sys.argv`` as it is)."""
            if args is None:
                return super().parse_arguments(parser, args)
            argv = sys.argv
            sys.argv = argv[:1]
            try:
                super().parse_arguments(parser, args)
            finally:
                sys.argv = argv

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand]
            self.matmul_precision = apply_matmul_precision(cfg.get(MATMUL_KEY), cfg.get("trainer.accelerator"))

        def instantiate_trainer(self, **kwargs: Any):
            from lightning.fabric.utilities.exceptions import MisconfigurationException

            from .distributed import bounded_start, check_environment

            check_environment()  # MASTER_PORT, the rendezvous timeout: before the trainer says anything
            try:
                trainer = super().instantiate_trainer(**kwargs)
            except (TypeError, ValueError, ImportError, MisconfigurationException) as exc:  # Lightning's checks
                reason = str(exc).strip().rstrip(".").splitlines()[0]
                raise LensbenchError(f"{reason}; fix the trainer section of the config", "trainer") from None
            _no_sigterm_broadcast(trainer)
            bounded_start(trainer)  # a bounded rendezvous; child ranks that end with their launcher
            return trainer

    return LensbenchCLIBase


#: Warning messages of Lightning that say nothing to a lensbench user.
QUIET = (
    r".*predict returned None.*",
    r".*overridden `transfer_batch_to_device`.*",
    r".*isinstance\(treespec, LeafSpec\)",
    r".*does not have many workers which may be a bottleneck.*",
)


def run_cli(cli_class: Any, model: Any, data: Any, registries: Any, description: str,
            quiet: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """``cli_class(model, data, **kwargs)`` with what every lensbench command shares: Lightning's
    and jsonargparse's advice kept off the console (``QUIET`` and ``quiet``: warning messages to
    ignore), the YAML loader resolving registered names, one-line errors (no exit inside the
    parser), no config-saving callback; torch's float32 matmul precision given back afterwards (a
    run in this process sets its own)."""
    import os
    import warnings

    from jsonargparse import set_loader

    from .logs import quiet_lightning

    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # Lightning's calls, not the user's
    for pattern in (*QUIET, *quiet):
        warnings.filterwarnings("ignore", message=pattern)
    quiet_lightning()
    set_loader(PARSER_MODE, _make_loader(registries), exceptions=(yaml.YAMLError,))
    previous = _matmul_precision_now()
    try:
        return cli_class(model, data, save_config_callback=None,
                         parser_kwargs={"parser_mode": PARSER_MODE, "exit_on_error": False, "description": description},
                         **kwargs)
    finally:
        if previous is not None:
            import torch

            torch.set_float32_matmul_precision(previous)


def default_experiment(class_path: str, configs: list) -> str:
    """``<analysis name>/<config stem>``: run folders of two analyses never collide."""
    import importlib

    module, _, attr = str(class_path).rpartition(".")
    try:
        name = getattr(importlib.import_module(module), attr).name or attr.lower()
    except (ImportError, AttributeError, ValueError):
        name = attr.lower()
    stem = Path(str(configs[-1])).stem if configs else None
    return f"{name}/{stem}" if stem else name


#: torch's float32 matmul precisions (``MATMUL_KEY``, in ``lensbench.run_identity``).
MATMUL_PRECISIONS = ("highest", "high", "medium")


def apply_matmul_precision(value: str | None, accelerator: Any = None) -> str:
    """Set ``torch.set_float32_matmul_precision`` to ``value`` (default: high where CUDA is
    available and the trainer may use it, else torch's current setting) and return it."""
    import torch

    if value is None:
        cpu_only = str(accelerator).lower() in ("cpu", "mps", "tpu", "xla", "hpu") if isinstance(accelerator, str) else False
        value = "high" if torch.cuda.is_available() and not cpu_only else _matmul_precision_now() or "highest"
    if value not in MATMUL_PRECISIONS:
        raise LensbenchError(f"{value!r} is not a float32 matmul precision; use one of "
                             f"{', '.join(MATMUL_PRECISIONS)}", MATMUL_KEY)
    torch.set_float32_matmul_precision(value)
    return value


def _matmul_precision_now() -> str | None:
    """torch's float32 matmul precision; None when it has none (backends set apart through the new API)."""
    import torch

    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def _no_sigterm_broadcast(trainer: Any) -> None:
    """Keep Lightning's SIGTERM handler from broadcasting inside the handler. Lightning 2.6 makes
    every rank that gets SIGTERM call ``dist.broadcast(..., src=0)`` there: a rank signalled alone
    (``kill`` of one rank) waits in it for the DDP timeout (30 minutes by default), and a rank
    signalled twice (a ``kill`` of the process group, then Lightning's forwarding) waits for a rank
    0 that is gone. lensbench stops each signalled rank itself (``RunStopped``); a rank left running
    stops at its next collective in one line. Lightning's forwarding of the signal to the child
    ranks it launched is kept."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is None or not hasattr(connector, "_sigterm_notifier_fn"):
        return

    def notify(signum: Any, frame: Any) -> None:
        if not connector.received_sigterm:
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        connector.received_sigterm = True

    connector._sigterm_notifier_fn = notify
