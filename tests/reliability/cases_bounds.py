"""Catalogue cases (test_catalogue.py): values beyond what torch or the model can take, and the
start of a distributed run: a MASTER_PORT out of range, a rendezvous timeout that is not a number
of seconds, a rendezvous that never completes (rank 1 of 2 alone, rank 0 never started: it waits
LENSBENCH_RENDEZVOUS_TIMEOUT=2 s, not torch's 30 minutes), seeds beyond 64 bits, a pipeline section
that is not a mapping. Generation settings beyond the model's context are clamped with a warning,
not refused (tests/test_bounds.py)."""

from __future__ import annotations

import socket
from pathlib import Path

NORMS = ("predict", "--model", "activation_norms", "--model.init_args.models", "[tiny]",
         "--data", "lensbench.data.modules.TextDataModule", "--data.init_args.datasets", "[texts.txt]",
         "--trainer.accelerator", "cpu")
DDP2 = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
PERTURBATION = ("predict", "--model", "perturbation", "--model.init_args.model", "tiny",
                "--data", "lensbench.data.modules.PromptDataModule", "--data.init_args.prompts", "[texts.txt]",
                "--trainer.accelerator", "cpu", "--model.init_args.generation", "{do_sample: false, max_new_tokens: 2}")
HUGE_SEED = 2**70


def _free_port() -> str:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


#: id -> (arguments, exit code, fragment of the one line)
CASES = {
    "master_port_out_of_range": ((*NORMS, *DDP2), 1,
                                 "MASTER_PORT: must be a TCP port number in 1..65535, got '99999'; set it to a free "
                                 "port"),
    "rendezvous_timeout_not_seconds": ((*NORMS, *DDP2), 1,
                                       "LENSBENCH_RENDEZVOUS_TIMEOUT: must be a positive number of seconds, got 'soon'"),
    "rendezvous_never_completes": ((*NORMS, *DDP2), 1,
                                   "MASTER_ADDR: rank 1 of 2 waited 2 s (LENSBENCH_RENDEZVOUS_TIMEOUT) at 127.0.0.1:"),
    "perturbation_seed_beyond_64_bits": ((*PERTURBATION, "--model.init_args.perturbation",
                                          f"{{levels: [0.1], seed: {HUGE_SEED}}}"), 1,
                                         "model.init_args.perturbation.seed: a seed must lie in "
                                         f"-9223372036854775808..18446744073709551615 (torch's generator takes 64-bit "
                                         f"seeds), got {HUGE_SEED}"),
    "perturbation_last_repetition_seed_beyond_64_bits": (
        (*PERTURBATION, "--model.init_args.perturbation", f"{{levels: [0.1], seed: {2**64 - 1}, n_rep: 2}}"), 1,
        f"model.init_args.perturbation.seed: a seed must lie in -9223372036854775808..18446744073709551615 (torch's "
        f"generator takes 64-bit seeds), got {2**64 - 1} (its last repetition uses {2**64})"),
    "pipeline_param_diff_not_a_mapping": (("pipeline", "--config", "param_diff_5.yaml"), 1,
                                          "param_diff: must be a mapping of settings (tol, max_iter, compute_dtype, "
                                          "include, exclude), got 5"),
    "pipeline_seed_beyond_64_bits": (("pipeline", "--config", "huge_seed.yaml"), 1,
                                     f"others[0].seed: a seed must lie in -9223372036854775808..18446744073709551615 "
                                     f"(torch's generator takes 64-bit seeds), got {HUGE_SEED}"),
    "transform_seed_beyond_64_bits": (("predict", "--model", "activation_norms", "--model.init_args.models",
                                       f"[{{source: tiny, transforms: [{{name: mult_gauss, params: {{level: 0.1}}, "
                                       f"seed: {HUGE_SEED}}}]}}]", *NORMS[5:]), 1,
                                      f"model.init_args.models[0].transforms[0].seed: a seed must lie in "
                                      f"-9223372036854775808..18446744073709551615 (torch's generator takes 64-bit "
                                      f"seeds), got {HUGE_SEED}"),
    "param_diff_perturbed_seed_beyond_64_bits": (
        ("predict", "--model", "param_diff", "--data", "lensbench.data.checkpoints.CheckpointPairs",
         "--data.init_args.base", "tiny", "--data.init_args.others",
         f"[{{perturbation: mult_gauss, level: 0.1, seed: {HUGE_SEED}}}]", "--trainer.accelerator", "cpu"), 1,
        "data.init_args.others[0].seed: a seed must lie in -9223372036854775808..18446744073709551615"),
}
#: Extra environment variables of a case: id -> {name: value}.
ENV = {
    "master_port_out_of_range": {"MASTER_PORT": "99999"},
    "rendezvous_timeout_not_seconds": {"LENSBENCH_RENDEZVOUS_TIMEOUT": "soon"},
    # rank 1 of 2 as an external launcher starts it; rank 0 is never started
    "rendezvous_never_completes": {"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": _free_port(), "LENSBENCH_RENDEZVOUS_TIMEOUT": "2"},
}


def prepare(root: Path, tiny_model: Path, forks) -> None:
    """The pipeline configs its cases name."""
    rest = "activation_norms: {datasets: [texts.txt]}\ntrainer: {accelerator: cpu}\n"
    (root / "param_diff_5.yaml").write_text(f"base: tiny\nothers: [tiny]\nparam_diff: 5\n{rest}")
    (root / "huge_seed.yaml").write_text(
        "base: tiny\nothers:\n  - {perturbation: mult_gauss, level: 0.1, param_group: all, seed: %d}\n%s"
        % (HUGE_SEED, rest))
