"""Read-only commands exit with their own status (issue 23 item 9).

Reading Delta through ``DeltaTable.to_pyarrow_table()`` made a process abort at interpreter exit
(SIGABRT, exit 134) in about one run in ten once its work was done (see
:func:`finelake.lake.rs.read_delta`). The abort is random, so this runs real subprocesses many
times through ``tools/exit_check.py`` (which CI runs with 50 runs per command): 24 bare reads of
every table, 3 ``finelake tables``, 3 ``finelake sql`` and 1 ``finelake report`` on a lake of every
table with three files each. With ``to_pyarrow_table`` back in ``read_delta`` it failed
(4 of 24 bare reads aborted). 60 s on the shared 2-core machine at load average 16 (19 s of CPU).
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_read_only_commands_exit_0_every_time(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "exit_check.py"),
                        "--commands", "read:24,tables:3,sql:3,report:1,validate:6", "--rows", "100",
                        "--commits", "3", "--json", str(tmp_path / "exit.json")],
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout + p.stderr
    for name, runs in (("read", 24), ("tables", 3), ("sql", 3), ("report", 1), ("validate", 6)):
        assert f"exit-check {name}: runs={runs} failures=0 " in p.stdout, p.stdout
