"""The fork server itself: a fault whose condition already holds when the job starts."""

from __future__ import annotations

import signal

from conftest import clean_env


def test_a_job_killed_before_its_child_opens_its_output_still_gets_a_result(forks, tmp_path):
    """The files already hold the lines the fault waits for, so the signal goes out at the first poll,
    possibly before the child has opened its stdout and stderr; the server still answers."""
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "rank00000.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    done = forks.one(["--help"], tmp_path, clean_env(),
                     fault={"signal": "SIGKILL", "glob": "shards/*.jsonl", "lines": 1})
    assert done.fault and done.returncode == -signal.SIGKILL
    # the server goes on answering after it
    after = forks.one(["--help"], tmp_path, clean_env())
    assert after.returncode == 0 and "predict" in after.stdout, after.stderr[-2000:]
