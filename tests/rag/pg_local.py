"""A throwaway PostgreSQL server with pgvector, from the ``pgserver`` wheel's binaries (PostgreSQL +
pgvector built in), in its own data directory on a free port, stopped and deleted on exit. PostgreSQL
refuses to run as root: as root, the binaries are copied where ``nobody`` can run them (the wheel sits
under /root) and run through ``runuser``. Used by the rag tests' ``pg_url`` fixture and by
``benchmarks/rag.py``; import as ``from pg_local import local_postgres`` (tests/rag on ``sys.path``)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_postgres() -> Iterator[str | None]:
    """``postgresql://`` URL of a fresh server with the vector extension available; None when pgserver
    is not installed or the server cannot start."""
    spec = importlib.util.find_spec("pgserver")  # only its binaries are used (importing it warns)
    if spec is None or spec.origin is None:
        yield None
        return
    install = Path(spec.origin).parent / "pginstall"
    root = Path(tempfile.mkdtemp(prefix="lamina-pgvector-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(root)
            yield None
            return
        # the same layout as in site-packages: the binaries find their libraries at $ORIGIN/../../../pgserver.libs
        site = install.parent.parent
        install = Path(shutil.copytree(install, root / "site" / "pgserver" / "pginstall", symlinks=True))
        if (site / "pgserver.libs").is_dir():
            shutil.copytree(site / "pgserver.libs", root / "site" / "pgserver.libs")
        nobody = pwd.getpwnam("nobody")
        os.chmod(root, 0o755)
        (root / "run").mkdir()
        os.chown(root / "run", nobody.pw_uid, nobody.pw_gid)
        as_user = [runuser, "-u", "nobody", "--"]
        run = root / "run"
    else:
        run = root
    data, port, bindir = run / "data", _free_port(), install / "bin"
    started = False
    try:
        try:
            subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "lamina", "--auth=trust"],
                           check=True, capture_output=True, timeout=120)  # fmt: skip
            options = f"-p {port} -k {run} -c listen_addresses=127.0.0.1 -c fsync=off"
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(run / "log"), "-o",
                            options, "-w", "start"], check=True, capture_output=True, timeout=120)  # fmt: skip
            started = True
        except (subprocess.SubprocessError, OSError):
            url = None
        else:
            url = f"postgresql://lamina@127.0.0.1:{port}/postgres"
        yield url
    finally:
        if started:
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=120)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
