"""A fresh interpreter in which a `sys.meta_path` finder makes every import of torch or transformers (and
their submodules) fail, installed before anything of vtc is imported: `run_blocked(body, *args, tmp_path=...)`.
The body can call `assert_still_clean()`; `sys.argv[1:]` are `args`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCK = textwrap.dedent("""
    import sys

    BLOCKED = ("torch", "transformers")
    already = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    if already:
        raise SystemExit(f"imported before the blocker was installed: {already}")

    class BlockHeavyImports:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"import of {name!r} is blocked: the vtc runtime must not need it")
            return None

    sys.meta_path.insert(0, BlockHeavyImports())

    def assert_still_clean():
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
""")


def run_blocked(body: str, *args, tmp_path: Path) -> subprocess.CompletedProcess:
    code = BLOCK + textwrap.dedent(body)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc
