"""tox's inline plugin for this project (tox 4 loads ``toxfile.py`` beside ``tox.ini`` by itself).

With ``CATSDOGS_TOX_DROP_ENVS=1``, each test env's virtualenv is removed as soon as that env has
run, passed or failed, so that the nine envs need the disk of the largest one (about 3.5 GB) instead
of all of them together (about 25 GB: each holds its own TensorFlow). The CI sets it; a developer
who reruns envs leaves it unset and keeps them. The packaging env (the built wheel) is kept.
"""

from __future__ import annotations

import os
import shutil

from tox.plugin import impl
from tox.tox_env.api import ToxEnv
from tox.tox_env.runner import RunToxEnv

DROP_ENVS = "CATSDOGS_TOX_DROP_ENVS"


def _dropping() -> bool:
    return os.environ.get(DROP_ENVS, "").strip().lower() not in {"", "0", "false", "no"}


@impl
def tox_env_teardown(tox_env: ToxEnv) -> None:
    if not _dropping() or not isinstance(tox_env, RunToxEnv):
        return
    env_dir = tox_env.env_dir
    if env_dir.is_dir():
        shutil.rmtree(env_dir)
        print(f"{tox_env.name}: removed {env_dir} ({DROP_ENVS}=1)", flush=True)
