"""The notebook-facing API: every advertised name resolves, and listing plugins stays light."""

from __future__ import annotations

import subprocess
import sys

import catsdogs


def test_every_public_name_resolves():
    from catsdogs.experiment import spec as experiment
    from catsdogs.features import extraction as features
    from catsdogs.runs import runner, submission

    for name in catsdogs.__all__:
        assert getattr(catsdogs, name) is not None, name
    assert catsdogs.extract is features.extract
    assert catsdogs.run_experiment is runner.run_experiment
    assert catsdogs.load_experiment is experiment.load_experiment
    assert catsdogs.score_submission is submission.score_submission


def test_import_and_registry_do_not_load_tensorflow():
    code = ("import sys, catsdogs; reg = catsdogs.get_registry(); "
            "assert 'resnet50' in reg.names('backbones'); print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
